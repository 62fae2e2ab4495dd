"""DCP benchmark (not part of the test suite): `ckptx convert DIR -o x.safetensors` against torch's own route.

    /work/main/.venv/bin/python benchmarks/dcp_bench.py [--size-gib 2] [--ranks 4] [--workdir DIR] [--keep]

Writes a `--ranks`-rank DCP folder of about `--size-gib` GiB with `mp.spawn` + gloo on the CPU: per layer a
Shard(0) float32 matrix, a Shard(1) float32 matrix and a replicated norm, plus `epoch` and `step`. Each rank
builds only its own shards (`DTensor.from_local`), so generating takes about 1/ranks of the size per process.
Then, in the same run and each under benchmarks/measure.py (wall time, peak RSS of the process):
- ckptx: `python -m ckptx convert DIR -o ckptx.safetensors -r <extract: [model]>`
- torch: `dcp_to_torch_save(DIR, ref.pt)`, `torch.load(ref.pt)`, `safetensors.torch.save_file(sd['model'], ...)`
and checks, tensor by tensor, that both outputs are equal. Prints a Markdown table. The folder is removed at
the end unless `--keep`. The children import the ckptx of this source tree.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HIDDEN = 4096
GOAL_MIB = 300


def _layers(size_gib: float) -> int:
    per_layer = 2 * HIDDEN * (HIDDEN // 2) * 4  # two float32 matrices of HIDDEN x HIDDEN/2
    return max(1, round(size_gib * 2**30 / per_layer))


def _worker(rank: int, world: int, out: str, port: int, layers: int) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        g = torch.Generator().manual_seed(1000 + rank)
        model = {}
        for i in range(layers):
            rows = torch.randn(HIDDEN // world, HIDDEN // 2, generator=g)
            cols = torch.randn(HIDDEN // 2, HIDDEN // world, generator=g)
            model[f"layers.{i}.attn.weight"] = DTensor.from_local(rows, mesh, [Shard(0)], run_check=False)
            model[f"layers.{i}.mlp.weight"] = DTensor.from_local(cols, mesh, [Shard(1)], run_check=False)
            norm = torch.Generator().manual_seed(i)
            model[f"layers.{i}.norm.weight"] = DTensor.from_local(
                torch.randn(HIDDEN, generator=norm), mesh, [Replicate()], run_check=False
            )
        dcp.save({"model": model, "epoch": 3, "step": torch.tensor(1000)}, checkpoint_id=out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def write_dcp(out: Path, ranks: int, size_gib: float) -> int:
    """Write the DCP folder; returns its number of layers."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    layers = _layers(size_gib)
    mp.spawn(_worker, args=(ranks, str(out), port, layers), nprocs=ranks, join=True)
    return layers


def measure(command: list[str]) -> dict[str, object]:
    """Wall time and peak RSS of `command`, from benchmarks/measure.py."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "measure.py"), *command],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    result = json.loads(done.stdout)
    if result["returncode"] != 0:
        raise SystemExit(f"{' '.join(command)} failed: {result['stderr']}")
    return result


_TORCH_ROUTE = textwrap.dedent("""
    import sys, torch
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    dcp_to_torch_save(sys.argv[1], sys.argv[2])
    state = torch.load(sys.argv[2], weights_only=False)
    save_file(state["model"], sys.argv[3])
""")

_CHECK = textwrap.dedent("""
    import sys, torch
    from safetensors import safe_open
    with safe_open(sys.argv[1], "pt") as a, safe_open(sys.argv[2], "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys()), "different keys"
        for key in a.keys():
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key
    print("equal")
""")


def main(argv: list[str] | None = None) -> int:
    """Write the folder, run both routes, print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gib", type=float, default=2.0)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--workdir", type=Path, default=None, help="where to write (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument("--json", metavar="FILE", help="also write the result as JSON (benchmarks/record.py)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO / "benchmarks"))
    import record

    recorder = record.Recorder("dcp_bench")
    work = Path(tempfile.mkdtemp(prefix="ckptx-dcp-bench-", dir=args.workdir))
    try:
        folder = work / "dcp"
        layers = write_dcp(folder, args.ranks, args.size_gib)
        size = sum(p.stat().st_size for p in folder.iterdir())
        rules = work / "model.yaml"
        rules.write_text("ckptx: 1\nname: dcp-model\nextract: [model]\nsteps: []\n", encoding="utf-8")
        ours = measure(
            [
                sys.executable,
                "-m",
                "ckptx",
                "convert",
                str(folder),
                "-o",
                str(work / "ckptx.safetensors"),
                "-r",
                str(rules),
            ]
        )
        theirs = measure(
            [sys.executable, "-c", _TORCH_ROUTE, str(folder), str(work / "ref.pt"), str(work / "ref.safetensors")]
        )
        check = subprocess.run(
            [sys.executable, "-c", _CHECK, str(work / "ckptx.safetensors"), str(work / "ref.safetensors")],
            capture_output=True,
            text=True,
            check=False,
        )
        print(
            f"DCP folder: {args.ranks} ranks, {layers} layers x (Shard(0), Shard(1), Replicate()), "
            f"{size / 2**30:.2f} GiB in {len(list(folder.iterdir()))} files"
        )
        print("\n| route | wall (s) | peak RSS (MiB) |\n|---|---:|---:|")
        for name, row in (
            ("ckptx convert -> safetensors", ours),
            ("dcp_to_torch_save + torch.load + save_file", theirs),
        ):
            print(f"| {name} | {row['wall']:.2f} | {int(row['maxrss_kib']) / 1024:.0f} |")
        peak = int(ours["maxrss_kib"]) / 1024
        print(f"\noutputs equal: {check.stdout.strip() == 'equal' or check.stderr.strip()[-300:]}")
        print(f"goal ckptx peak RSS <= {GOAL_MIB} MiB: {'met' if peak <= GOAL_MIB else 'NOT met'} ({peak:.0f} MiB)")
        recorder.write(
            args.json,
            {
                "ranks": args.ranks,
                "layers": layers,
                "bytes": size,
                "files": len(list(folder.iterdir())),
                "equal": check.stdout.strip() == "equal",
                "routes": {
                    name: {"wall": row["wall"], "rss_mib": int(row["maxrss_kib"]) / 1024}
                    for name, row in (("ckptx", ours), ("torch", theirs))
                },
            },
        )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
