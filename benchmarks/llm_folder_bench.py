"""Casting a HuggingFace model folder to bfloat16: ckptx against `cp -r` + `sync` and transformers itself.

    python benchmarks/llm_folder_bench.py [--hidden 1024] [--layers 8] [--repeats 3] [--json FILE]

Builds a float32 LlamaForCausalLM folder with `save_pretrained` (sharded at 200 MB, a tokenizer file beside it),
then runs, in turn and `--repeats` times (paired runs: one of each per round, so a slow moment of the shared
machine hits all three alike):

- `cp`: `cp -r DIR OUT && sync` (the floor: bytes copied, nothing decoded);
- `ckptx`: `ckptx convert DIR/ -o OUT/ --dtype bfloat16` (plan, validate against the class, streamed cast);
- `transformers`: `from_pretrained(DIR, dtype=torch.bfloat16)` then `save_pretrained(OUT)`, what a user would
  write with the peer's own tool.

Each run goes through benchmarks/measure.py (wall time, CPU time, peak RSS of the process tree); on a shared
machine the CPU time is the steadier figure. `--json` writes the medians and every run (benchmarks/record.py).
Both ckptx and transformers pay for importing transformers (and torch): on a small folder that is most of it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import record

HERE = Path(__file__).resolve().parent
NAIVE = (
    "import sys, torch, transformers\n"
    "m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)\n"
    "m.save_pretrained(sys.argv[2], max_shard_size='200MB')\n"
)


def build(folder: Path, hidden: int, layers: int) -> int:
    """A float32 Llama folder; its weight bytes."""
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=hidden // 256 or 1, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(folder, max_shard_size="200MB")
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def measure(command: list[str]) -> dict[str, Any]:
    done = subprocess.run([sys.executable, str(HERE / "measure.py"), *command], capture_output=True, text=True)
    result: dict[str, Any] = json.loads(done.stdout)
    if result["returncode"] != 0:
        raise SystemExit(f"{command[0]} failed: {result['stderr']}")
    return result


def main(argv: list[str] | None = None) -> int:
    """Build the folder, run the three paired, print and record the medians."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", metavar="FILE", help="also write the result as JSON (benchmarks/record.py)")
    args = parser.parse_args(argv)
    recorder = record.Recorder("llm_folder_bench")
    runs: dict[str, list[dict[str, Any]]] = {"cp": [], "ckptx": [], "transformers": []}
    with tempfile.TemporaryDirectory(dir=HERE.parent) as tmp:
        root = Path(tmp)
        src = root / "llama"
        size = build(src, args.hidden, args.layers)
        for _ in range(args.repeats):
            for name in runs:
                out = root / f"out-{name}"
                shutil.rmtree(out, ignore_errors=True)
                command = {
                    "cp": ["sh", "-c", f"cp -r '{src}' '{out}' && sync"],
                    "ckptx": [
                        sys.executable,
                        "-m",
                        "ckptx",
                        "convert",
                        f"{src}/",
                        "-o",
                        f"{out}/",
                        "--dtype",
                        "bfloat16",
                    ],
                    "transformers": [sys.executable, "-c", NAIVE, str(src), str(out)],
                }[name]
                runs[name].append(measure(command))
                shutil.rmtree(out, ignore_errors=True)
    medians = {
        name: {
            "wall_s": round(statistics.median(r["wall"] for r in found), 2),
            "cpu_s": round(statistics.median(r["user"] + r["sys"] for r in found), 2),
            "peak_rss_mib": round(statistics.median(r["maxrss_kib"] for r in found) / 1024, 1),
        }
        for name, found in runs.items()
    }
    print(f"float32 Llama folder: {size / 2**20:.0f} MiB of weights; medians of {args.repeats} paired runs")
    for name, m in medians.items():
        print(f"  {name:13s} {m['wall_s']:7.2f} s wall  {m['cpu_s']:7.2f} s CPU  peak RSS {m['peak_rss_mib']:8.1f} MiB")
    recorder.write(
        args.json,
        {
            "weights_mib": round(size / 2**20, 1),
            "repeats": args.repeats,
            "medians": medians,
            "runs": {
                k: [{"wall": r["wall"], "cpu": r["user"] + r["sys"], "maxrss_kib": r["maxrss_kib"]} for r in v]
                for k, v in runs.items()
            },
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
