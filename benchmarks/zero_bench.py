"""ckptx benchmark (not part of the test suite): a DeepSpeed ZeRO-3 folder to one file, ckptx vs zero_to_fp32.py.

    .venv/bin/python benchmarks/zero_bench.py [--width 2048] [--layers 16] [--rounds 2] [--workdir DIR]

Writes a real ZeRO-3 checkpoint with DeepSpeed on the CPU (2 ranks, gloo, fp32, one AdamW step;
tests/helpers/deepspeed_train.py, the model of the tests scaled up: `layers` blocks of two width x (width+3)
matrices, ~512 MiB of fp32 parameters at the defaults), then times, in rounds (order reversed every other
round), each command under benchmarks/measure.py (wall time, peak RSS of the command and its children):
- `ckptx convert DIR -r identity.yaml -o x.safetensors` (identity recipe: no steps),
- `python DIR/zero_to_fp32.py DIR OUT` (its default output, OUT/pytorch_model.bin; its `--safe_serialization`
  refuses this model: safetensors will not save the tied embedding/head weights, which share memory).
Outputs are deleted between commands; the first round's outputs are compared tensor for tensor. The page
cache is warm (the checkpoint was just written). Prints a Markdown table. Needs deepspeed installed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from tests.helpers.deepspeed_train import launch  # noqa: E402

sys.path.insert(0, str(HERE))
import record  # noqa: E402  (benchmarks/record.py)

MIB = 1024 * 1024


def measure(command: list[str], env: dict[str, str]) -> dict[str, float]:
    """Wall time and peak RSS (MiB) of `command`, run under measure.py."""
    done = subprocess.run(
        [sys.executable, str(HERE / "measure.py"), *command], env=env, capture_output=True, text=True, check=True
    )
    result = json.loads(done.stdout)
    if result["returncode"] != 0:
        raise SystemExit(f"{' '.join(command)} failed ({result['returncode']}):\n{result['stderr']}")
    return {"wall": result["wall"], "rss_mib": result["maxrss_kib"] / 1024}


def commands(folder: Path, work: Path) -> dict[str, tuple[list[str], Path]]:
    """Each benchmarked command and the output it writes."""
    identity = work / "identity.yaml"
    identity.write_text("ckptx: 1\nname: identity\nsteps: []\n", encoding="utf-8")
    script = str(folder / "zero_to_fp32.py")
    return {
        "ckptx convert -> .safetensors": (
            [
                sys.executable,
                "-m",
                "ckptx",
                "convert",
                str(folder),
                "-r",
                str(identity),
                "-o",
                str(work / "ckptx.safetensors"),
            ],
            work / "ckptx.safetensors",
        ),
        "zero_to_fp32.py (pytorch_model.bin)": (
            [sys.executable, script, str(folder), str(work / "z2f-bin")],
            work / "z2f-bin",
        ),
    }


def remove(path: Path) -> None:
    """Delete an output file or folder."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def compare(ours: Path, theirs: Path) -> int:
    """Tensors compared (raises when any differs): ckptx's safetensors vs zero_to_fp32.py's pytorch_model.bin."""
    import torch
    from safetensors.torch import load_file

    got = load_file(ours)
    want = torch.load(theirs / "pytorch_model.bin", map_location="cpu", weights_only=True)
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key
    return len(want)


def main() -> None:
    """Write the checkpoint, run the rounds, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None, help="where to write (default: a temporary folder)")
    parser.add_argument("--json", metavar="FILE", help="also write the rounds as JSON (benchmarks/record.py)")
    args = parser.parse_args()
    recorder = record.Recorder("zero_bench")
    work = Path(tempfile.mkdtemp(prefix="zero-bench-", dir=args.workdir))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "DS_ACCELERATOR": "cpu",
        "CUDA_VISIBLE_DEVICES": "",
    }
    try:
        launch(
            work / "ckpt", stages=(3,), dtypes=("fp32",), steps=1, width=args.width, layers=args.layers, timeout=1800
        )
        folder = work / "ckpt" / "zero3-fp32"
        on_disk = sum(p.stat().st_size for p in folder.rglob("*.pt"))
        todo = commands(folder, work)
        rows: dict[str, list[dict[str, float]]] = {name: [] for name in todo}
        for round_ in range(args.rounds):
            order = list(todo) if round_ % 2 == 0 else list(reversed(todo))
            for name in order:
                command, output = todo[name]
                rows[name].append(measure(command, env))
                if round_ > 0:
                    remove(output)
            if round_ == 0:
                checked = compare(
                    todo["ckptx convert -> .safetensors"][1], todo["zero_to_fp32.py (pytorch_model.bin)"][1]
                )
                for name in todo:
                    remove(todo[name][1])
        from ckptx.io.read.open import open_source

        with open_source(folder) as source:
            state_mib = sum(m.nbytes for m in source.tensors.values()) / MIB
        print(
            f"ZeRO-3, 2 ranks, fp32: {state_mib:,.0f} MiB fp32 state dict, {on_disk / MIB:,.0f} MiB of .pt files "
            f"(partitions + Adam moments); {checked} tensors, equal tensor for tensor; {args.rounds} rounds, "
            f"warm page cache"
        )
        print("\n| command | wall s (each round) | peak RSS MiB (max) |\n| --- | --- | --- |")
        for name, results in rows.items():
            walls = ", ".join(f"{r['wall']:.2f}" for r in results)
            print(f"| {name} | {walls} | {max(r['rss_mib'] for r in results):,.0f} |")
        recorder.write(
            args.json,
            {
                "stage": 3,
                "ranks": 2,
                "width": args.width,
                "layers": args.layers,
                "state_dict_mib": state_mib,
                "pt_files_mib": on_disk / MIB,
                "tensors": checked,
                "rounds": rows,
            },
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
