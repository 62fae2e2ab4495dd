"""Benchmark `ckptx batch`: wall time of -j 1 against -j N on many small checkpoints.

    .venv/bin/python benchmarks/batch.py                      # 40 checkpoints of ~20 MB, -j 1 and -j 2
    .venv/bin/python benchmarks/batch.py --checkpoints 8 --mb 5 --workers 1 2 --repeat 1   # quick

Each checkpoint is a DDP training checkpoint (`torch.save`, `module.` keys under `model`, plus an epoch
counter); the jobs file converts every one (to safetensors, or --format torch) with a strip-prefix recipe
(and an fp16 cast unless --no-cast),
validated against a manifest target. Each run is a fresh `ckptx batch` process, timed end to end
(start-up, planning every job, worker start-up, writing), on a warm page cache; the outputs are
deleted between runs. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import record  # noqa: E402  (benchmarks/record.py)

RULES = """ckptx: 1
name: bench
extract: model
steps:
  - strip_prefix: module.
"""
CAST = "  - cast: {dtype: float16}\n"


def make_checkpoints(root: Path, count: int, megabytes: float, *, cast: bool, fmt: str) -> Path:
    """`count` checkpoints of about `megabytes` MB each, a rule file, a manifest target and a jobs file."""
    from ckptx.dtypes import TensorMeta
    from ckptx.io.manifest import write_manifest

    rows = max(1, int(megabytes * 1024 * 1024 / 4 / 4 / 1024))
    shapes = {f"layer{i}.weight": (rows, 1024) for i in range(4)} | {f"layer{i}.bias": (1024,) for i in range(4)}
    generator = torch.Generator().manual_seed(0)
    for n in range(count):
        state = {f"module.{k}": torch.randn(shape, generator=generator) for k, shape in shapes.items()}
        path = root / "runs" / f"run{n:03d}" / "checkpoint.pth"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": state, "epoch": n}, path)
    dtype = "float16" if cast else "float32"
    write_manifest(root / "target.json", {k: TensorMeta(shape, dtype) for k, shape in shapes.items()})
    (root / "bench.yaml").write_text(RULES + (CAST if cast else ""), encoding="utf-8")
    jobs = root / "jobs.yaml"
    jobs.write_text(
        "ckptx: 1\n"
        f"defaults: {{rules: bench.yaml, target: {{manifest: target.json}}, format: {fmt}}}\n"
        "jobs:\n"
        "  - {glob: 'runs/*/checkpoint.pth', dst: 'out/{parent}'}\n",
        encoding="utf-8",
    )
    return jobs


def run_once(jobs: Path, workers: int) -> float:
    """Seconds for one `ckptx batch -j workers` from scratch (outputs removed first)."""
    shutil.rmtree(jobs.parent / "out", ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "ckptx", "batch", str(jobs), "-j", str(workers), "--json"],
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"ckptx batch -j {workers} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return seconds


def main() -> None:
    """Generate the checkpoints, time each worker count, print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", type=int, default=40)
    parser.add_argument("--mb", type=float, default=20.0, help="approximate size of one checkpoint")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=3, help="runs per worker count (median and best shown)")
    parser.add_argument("--no-cast", dest="cast", action="store_false", help="only strip the prefix (no fp16 cast)")
    parser.add_argument("--format", choices=["safetensors", "torch"], default="safetensors", help="output format")
    parser.add_argument("--workdir", type=Path, help="keep the files here (default: a temporary folder)")
    parser.add_argument("--json", metavar="FILE", help="also write the timings as JSON (benchmarks/record.py)")
    args = parser.parse_args()
    recorder = record.Recorder("batch")

    root = args.workdir or Path(tempfile.mkdtemp(prefix="ckptx-bench-batch-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        jobs = make_checkpoints(root, args.checkpoints, args.mb, cast=args.cast, fmt=args.format)
        total = sum(p.stat().st_size for p in (root / "runs").rglob("*.pth"))
        times = {w: [] for w in args.workers}
        for _ in range(args.repeat):
            for workers in args.workers:  # interleaved, so drift in machine load hits every count alike
                times[workers].append(run_once(jobs, workers))
        base = statistics.median(times[args.workers[0]])
        print(
            f"{args.checkpoints} checkpoints, {total / 2**20:.0f} MiB in total, to {args.format}"
            f"{' with an fp16 cast' if args.cast else ''}; {os.cpu_count()} CPUs; torch {torch.__version__}; "
            f"{args.repeat} runs each\n"
        )
        print(f"| workers | median s | best s | MiB/s (median) | speed-up vs -j {args.workers[0]} |")
        print("|---|---|---|---|---|")
        for workers, runs in times.items():
            median = statistics.median(runs)
            print(
                f"| -j {workers} | {median:.2f} | {min(runs):.2f} | {total / 2**20 / median:.0f} | "
                f"{base / median:.2f}x |"
            )
        recorder.write(
            args.json,
            {
                "checkpoints": args.checkpoints,
                "total_bytes": total,
                "format": args.format,
                "cast": args.cast,
                "repeat": args.repeat,
                "seconds": {str(w): runs for w, runs in times.items()},
            },
        )
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
