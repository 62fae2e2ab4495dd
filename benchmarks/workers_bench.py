"""One conversion, many workers: `ckptx convert` in one process, with `--workers 2`, and on a Dask LocalCluster of 2
worker processes, against `cp` + `sync` and the naive script, on the same sharded checkpoint in the same rounds.

    .venv/bin/python benchmarks/workers_bench.py --rounds 5 --json benchmarks/results/workers_bench.json

The source is `--tensors` float32 matrices of 64 MiB (24: 1.5 GiB) in safetensors shards of 6 and an index. Two
cases: every tensor cast to bfloat16 (cast-heavy: the output is half the input) and every key renamed (copies).
Outputs are sharded safetensors (`--max-shard-size 400MB`). Each round runs every command once, in a new order
after the first round, each under benchmarks/measure.py (wall time; peak RSS of the process and the children it
waited for); the ckptx commands also print `--json`, whose `units` give each worker's peak RSS. Before every command
the inputs are read (warm page cache), and every output is removed and `sync` run after it. The Dask cluster is
started once, before the rounds, and the commands connect to it with `--scheduler` (a cluster that is already up,
as on a real one). Every ckptx output of a round is compared, file by file (SHA-256), with the one-process output.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import record  # noqa: E402  (benchmarks/record.py)

TENSOR = (4096, 4096)  # 64 MiB of float32
PER_SHARD = 6
RULES = {
    "cast": "ckptx: 1\nsteps:\n  - cast: {dtype: bfloat16}\n",
    "rename": "ckptx: 1\nsteps:\n  - rename: [['^layers\\.', 'blocks.']]\n",
}
NAIVE = r"""
import json, os, re, sys
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file
index, out, case = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
state = {}
for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
    state.update(load_file(index.parent / shard))
if case == "cast":
    state = {k: v.to(torch.bfloat16) for k, v in state.items()}
else:
    state = {re.sub(r"^layers\.", "blocks.", k): v for k, v in state.items()}
limit, shards, size = 400_000_000, [[]], 0
for key, value in state.items():
    if shards[-1] and size + value.nbytes > limit:
        shards.append([])
        size = 0
    shards[-1].append(key)
    size += value.nbytes
names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
for name, keys in zip(names, shards):
    save_file({k: state[k] for k in keys}, str(out / name), metadata={"format": "pt"})
weight_map = {k: name for name, keys in zip(names, shards) for k in keys}
total = sum(v.nbytes for v in state.values())
index = {"metadata": {"total_size": total}, "weight_map": weight_map}
(out / "model.safetensors.index.json").write_text(json.dumps(index))
for path in out.iterdir():
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
"""


def make_source(folder: Path, tensors: int) -> Path:
    """`tensors` float32 64 MiB matrices (pseudo-random) in shards of PER_SHARD, and the index; returns the index."""
    import numpy as np

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    count = -(-tensors // PER_SHARD)
    weight_map, total = {}, 0
    for shard in range(count):
        name = f"model-{shard + 1:05d}-of-{count:05d}.safetensors"
        keys = [f"layers.{i}.weight" for i in range(shard * PER_SHARD, min(tensors, (shard + 1) * PER_SHARD))]
        nbytes = TENSOR[0] * TENSOR[1] * 4
        header = {
            k: {"dtype": "F32", "shape": list(TENSOR), "data_offsets": [i * nbytes, (i + 1) * nbytes]}
            for i, k in enumerate(keys)
        }
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(folder / name, "wb") as out:
            out.write(len(raw).to_bytes(8, "little") + raw)
            for _ in keys:
                out.write((rng.standard_normal(TENSOR[0] * TENSOR[1], dtype=np.float32) * 0.02).tobytes())
        weight_map |= dict.fromkeys(keys, name)
        total += nbytes * len(keys)
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return index


def env() -> dict[str, str]:
    """The children import this tree's ckptx."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def measure(argv: list[str], inputs: list[Path], stdout: Path | None = None) -> dict[str, Any]:
    """One measured run of `argv` (inputs read first: a warm page cache)."""
    for path in inputs:
        subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)
    prefix = [f"--stdout={stdout}"] if stdout else []
    done = subprocess.run(
        [sys.executable, str(HERE / "measure.py"), *prefix, *argv],
        env=env(),
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(done.stdout)
    if result["returncode"] != 0:
        said = stdout.read_text() if stdout is not None and stdout.exists() else ""
        raise SystemExit(f"benchmark command failed: {' '.join(argv)}\n{result['stderr']}{said}")
    return result


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tensors", type=int, default=24, help="64 MiB float32 tensors in the source (default 24)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=None, help="where the files go (default: a temporary folder)")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON (benchmarks/record.py)")
    args = parser.parse_args()
    recorder = record.Recorder("workers_bench")
    work = Path(tempfile.mkdtemp(prefix="ckptx-workers-", dir=args.workdir))
    try:
        results = run(work, args.tensors, args.rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    recorder.write(args.json, results)
    print(json.dumps(results["summary"], indent=1))


def run(work: Path, tensors: int, rounds: int) -> dict[str, Any]:
    from distributed import LocalCluster

    os.environ.update(env())  # the cluster's workers import this tree's ckptx too (spawned: this sys.path, this env)
    sys.path.insert(0, str(REPO))

    index = make_source(work / "src", tensors)
    shards = sorted(index.parent.glob("*.safetensors"))
    src_bytes = sum(p.stat().st_size for p in shards)
    out = work / "out"
    for case, text in RULES.items():
        (work / f"{case}.yaml").write_text(text)
    (work / "naive.py").write_text(NAIVE)
    py = sys.executable
    commands: list[tuple[str, str, list[str], bool]] = [
        (
            "baseline",
            "cp + sync",
            ["sh", "-c", 'cp "$0"/*.safetensors "$1"/ && sync "$1"/*', str(index.parent), str(out)],
            False,
        )
    ]
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        for case in RULES:
            rules = str(work / f"{case}.yaml")
            dst = str(out / "model.safetensors.index.json")
            convert = [
                py,
                "-m",
                "ckptx",
                "convert",
                str(index),
                "-r",
                rules,
                "-o",
                dst,
                "--max-shard-size",
                "400MB",
                "--json",
            ]
            commands += [
                (
                    case,
                    "naive: load every shard, convert, save_file",
                    [py, str(work / "naive.py"), str(index), str(out), case],
                    False,
                ),
                (case, "ckptx convert (one process)", convert, True),
                (case, "ckptx convert --workers 2", [*convert, "--workers", "2"], True),
                (
                    case,
                    "ckptx convert --executor dask (LocalCluster, 2 workers)",
                    [*convert, "--executor", "dask", "--scheduler", cluster.scheduler_address],
                    True,
                ),
            ]
        runs: list[list[dict[str, Any]]] = [[] for _ in commands]
        identical = True
        order = list(range(len(commands)))
        for number in range(rounds):
            if number:
                random.Random(number).shuffle(order)
            reference: dict[str, dict[str, str]] = {}
            for k in order:
                case, name, argv, is_ckptx = commands[k]
                print(f"  round {number + 1}/{rounds}: {case}: {name} ...", file=sys.stderr, flush=True)
                out.mkdir()
                stdout = work / "stdout.json" if is_ckptx else None
                result = measure(argv, shards, stdout)
                if stdout is not None:
                    units = json.loads(stdout.read_text())["units"]
                    result["worker_peak_rss_mib"] = max(u["worker_peak_rss"] for u in units) / 2**20
                    result["units"] = len(units)
                    result["workers"] = len({u["worker"] for u in units})
                    found = digests(out)
                    if case in reference and found != reference[case]:
                        identical = False
                    reference.setdefault(case, found)
                shutil.rmtree(out)
                subprocess.run(["sync"], check=True)
                runs[k].append(result)
    rows = []
    for (case, name, argv, _), results in zip(commands, runs):
        rows.append(
            {
                "case": case,
                "name": name,
                "walls": [r["wall"] for r in results],
                "rss_mib": max(r["maxrss_kib"] for r in results) / 1024,
                "worker_peak_rss_mib": max((r.get("worker_peak_rss_mib", 0.0) for r in results), default=0.0),
                "units": results[0].get("units"),
                "workers": results[0].get("workers"),
                "command": " ".join(a.replace(str(work) + "/", "") for a in argv).replace(sys.executable, "python"),
            }
        )
    return {
        "tensors": tensors,
        "bytes": src_bytes,
        "rounds": rounds,
        "identical": identical,
        "rows": rows,
        "summary": summary(rows),
    }


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of paired ratios: each command's wall over the others' in the same round."""
    walls = {(r["case"], r["name"]): r["walls"] for r in rows}
    cp = walls[("baseline", "cp + sync")]

    def paired(a: list[float], b: list[float]) -> float:
        return statistics.median(x / y for x, y in zip(a, b))

    found: dict[str, Any] = {}
    for case in RULES:
        one = walls[(case, "ckptx convert (one process)")]
        two = walls[(case, "ckptx convert --workers 2")]
        dask = walls[(case, "ckptx convert --executor dask (LocalCluster, 2 workers)")]
        found[case] = {
            "one process / cp+sync": paired(one, cp),
            "--workers 2 / cp+sync": paired(two, cp),
            "dask / cp+sync": paired(dask, cp),
            "speed-up of --workers 2 over one process": paired(one, two),
            "speed-up of dask over one process": paired(one, dask),
            "median wall one process": statistics.median(one),
            "median wall --workers 2": statistics.median(two),
            "median wall dask": statistics.median(dask),
            "median wall cp+sync": statistics.median(cp),
        }
    return found


if __name__ == "__main__":
    main()
