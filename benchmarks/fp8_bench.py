"""Benchmark of FP8 block dequantization (not part of the test suite): a synthetic DeepSeek-style FP8 checkpoint
(float8_e4m3fn weights + float32 `*_scale_inv`, 128x128 blocks, shapes not all multiples of 128) converted to
bfloat16 by `ckptx convert -r quant/fp8-block-to-bf16`, against a CPU port of DeepSeek's `fp8_cast_bf16.py` (load
the shard with safetensors, `weight_dequant` each weight with torch, `save_file`) and `cp` + `sync` of the input,
in shuffled paired rounds.

    .venv/bin/python benchmarks/fp8_bench.py --size-gib 1 [--repeat 3] [--json FILE]

Every command runs under measure.py (wall time, peak RSS of the process and its children); outputs are deleted
and `sync` run after each. Prints, per command, the median wall time, the median over rounds of its wall / the
same round's `cp + sync`, and the highest peak RSS. Goal: ckptx's peak RSS <= 400 MiB for a 1 GiB checkpoint.
`--json FILE` results: {"size_gib", "rounds", "commands": {name: {"wall_s": [...], "median_wall_s",
"median_ratio_to_cp", "max_rss_mib"}}}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import record  # noqa: E402  (benchmarks/record.py)

REFERENCE = """
import sys, torch
from safetensors.torch import load_file, save_file
def weight_dequant(x, s, block=128):  # DeepSeek's kernel.weight_dequant, on the CPU
    rows, cols = x.shape
    full = s.repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
    return (x.float() * full).to(torch.bfloat16)
state = load_file(sys.argv[1])
out = {}
for key, tensor in state.items():
    if key.endswith("_scale_inv"):
        continue
    if tensor.dtype == torch.float8_e4m3fn:
        out[key] = weight_dequant(tensor, state[key + "_scale_inv"])
    else:
        out[key] = tensor
save_file(out, sys.argv[2])
"""


def synthesize(path: Path, size_gib: float) -> None:
    """An FP8 checkpoint of about `size_gib` GiB written with numpy (no torch): weights of 7168 x 2000-ish."""
    import numpy as np

    rng = np.random.default_rng(0)
    rows, cols = 7168, 2000  # 2000 is not a multiple of 128: partial edge blocks
    count = max(1, int(size_gib * 2**30 // (rows * cols)))
    header: dict[str, object] = {}
    offset = 0
    grid = (-(-rows // 128), -(-cols // 128))
    for i in range(count):
        for key, dtype, shape, size in (
            (f"model.layers.{i}.mlp.down_proj.weight", "F8_E4M3", [rows, cols], rows * cols),
            (f"model.layers.{i}.mlp.down_proj.weight_scale_inv", "F32", list(grid), grid[0] * grid[1] * 4),
        ):
            header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
            offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    chunk = rng.integers(0, 0x7E, rows * cols, dtype=np.uint8)  # finite float8 values
    scales = (rng.random(grid[0] * grid[1], dtype=np.float32) * 1e-3).astype("<f4").tobytes()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _ in range(count):
            f.write(chunk.tobytes())
            f.write(scales)


def measure(command: list[str]) -> dict:
    done = subprocess.run(
        [sys.executable, str(HERE / "measure.py"), *command], capture_output=True, text=True, check=True
    )
    result = json.loads(done.stdout)
    if result["returncode"] != 0:
        raise SystemExit(f"{command[0]} failed: {result['stderr']}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gib", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    recorder = record.Recorder("fp8_bench")
    work = Path(tempfile.mkdtemp(prefix="ckptx-fp8-", dir=os.environ.get("BENCH_DIR")))
    try:
        src = work / "fp8.safetensors"
        synthesize(src, args.size_gib)
        reference = work / "reference.py"
        reference.write_text(REFERENCE)
        out = work / "out.safetensors"
        ckptx = [sys.executable, "-c", "import sys; from ckptx.cli import main; sys.exit(main(sys.argv[1:]))"]
        commands = {
            "cp + sync": ["sh", "-c", f"cp {src} {out} && sync"],
            "ckptx": [*ckptx, "convert", str(src), "-r", "quant/fp8-block-to-bf16", "-o", str(out), "--force"],
            "reference (CPU port of fp8_cast_bf16.py)": [sys.executable, str(reference), str(src), str(out)],
        }
        runs: dict[str, list[dict]] = {name: [] for name in commands}
        ratios: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.repeat):
            order = list(commands)
            random.shuffle(order)
            walls = {}
            for name in order:
                result = measure(commands[name])
                out.unlink(missing_ok=True)
                subprocess.run(["sync"], check=True)
                runs[name].append(result)
                walls[name] = result["wall"]
            for name in commands:
                ratios[name].append(walls[name] / walls["cp + sync"])
        results = {"size_gib": round(src.stat().st_size / 2**30, 3), "rounds": args.repeat, "commands": {}}
        print(f"FP8 -> bf16 of {results['size_gib']} GiB, {args.repeat} rounds")
        for name, found in runs.items():
            wall = [r["wall"] for r in found]
            rss = max(r["maxrss_kib"] for r in found) / 1024
            row = {
                "wall_s": [round(w, 3) for w in wall],
                "median_wall_s": round(statistics.median(wall), 3),
                "median_ratio_to_cp": round(statistics.median(ratios[name]), 2),
                "max_rss_mib": round(rss, 1),
            }
            results["commands"][name] = row
            print(f"  {name:45s} {row['median_wall_s']:8.2f} s  x{row['median_ratio_to_cp']:<5} {rss:8.1f} MiB")
        recorder.write(args.json, results)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
