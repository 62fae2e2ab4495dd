"""Benchmark of HF -> GGUF (not part of the test suite): a float32 LlamaForCausalLM folder of about 1 GiB (random
init, save_pretrained, a small sentencepiece tokenizer.model) converted to GGUF f16 and q8_0 by `ckptx convert -r
hf/llama-to-gguf --dtype ...` and by llama.cpp's own `convert_hf_to_gguf.py` (the copy vendored for the tests,
tests/vendor/llama_cpp), against `cp` + `sync` of the folder's weights, in shuffled paired rounds.

    python benchmarks/gguf_bench.py [--hidden 1024] [--layers 18] [--repeat 3] [--json FILE]

Every command runs under measure.py (wall time, CPU time, peak RSS of the process and its children); llama.cpp's
converter is followed by `sync` (ckptx fsyncs its output before renaming it into place, cp is followed by `sync`),
outputs are deleted and `sync` run after each. Prints, per command, the median wall time, the median over rounds of
its wall / the same round's `cp + sync`, the median CPU time and the highest peak RSS. `--json FILE` results:
{"weights_gib", "rounds", "commands": {name: {"wall_s": [...], "median_wall_s", "median_ratio_to_cp",
"median_cpu_s", "max_rss_mib", "output_mib"}}}.
"""

from __future__ import annotations

import argparse
import io
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
sys.path.insert(0, str(HERE))

import record  # noqa: E402  (benchmarks/record.py)

CONVERTER = HERE.parent / "tests" / "vendor" / "llama_cpp" / "convert_hf_to_gguf.py"


def build(folder: Path, hidden: int, layers: int) -> int:
    """A float32 Llama folder with a tokenizer.model; its weight bytes."""
    import sentencepiece
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=hidden // 256 or 1, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    text = ("the quick brown fox jumps over the lazy dog " * 3 + "hello world ckptx converts checkpoints ") * 20
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(text.split(" ")), model_writer=model, vocab_size=60, model_type="bpe",
        bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2, hard_vocab_limit=False,
    )  # fmt: skip
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def measure(command: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, str(HERE / "measure.py"), *command], capture_output=True, text=True, check=True, env=env
    )
    result: dict[str, Any] = json.loads(done.stdout)
    if result["returncode"] != 0:
        raise SystemExit(f"{command[0]} failed: {result['stderr']}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    recorder = record.Recorder("gguf_bench")
    work = Path(tempfile.mkdtemp(prefix="ckptx-gguf-", dir=os.environ.get("BENCH_DIR")))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("PYTHONSAFEPATH", None)  # the converter imports its `conversion` package from the script's folder
    try:
        src = work / "llama"
        size = build(src, args.hidden, args.layers)
        out = work / "out.gguf"
        weights = " ".join(str(p) for p in sorted(src.glob("*.safetensors")))
        ckptx = [sys.executable, "-c", "import sys; from ckptx.cli import main; sys.exit(main(sys.argv[1:]))"]
        commands: dict[str, list[str]] = {"cp + sync": ["sh", "-c", f"mkdir -p {out} && cp {weights} {out} && sync"]}
        for dtype, outtype in (("float16", "f16"), ("q8_0", "q8_0")):
            commands[f"ckptx --dtype {dtype}"] = [
                *ckptx, "convert", str(src), "-r", "hf/llama-to-gguf", "-o", str(out), "--dtype", dtype,
            ]  # fmt: skip
            commands[f"convert_hf_to_gguf.py --outtype {outtype}"] = [
                "sh", "-c",
                f"{sys.executable} {CONVERTER} {src} --outtype {outtype} --outfile {out} && sync",
            ]  # fmt: skip
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in commands}
        ratios: dict[str, list[float]] = {name: [] for name in commands}
        outputs: dict[str, int] = {}
        for _ in range(args.repeat):
            order = list(commands)
            random.shuffle(order)
            walls = {}
            for name in order:
                result = measure(commands[name], env)
                outputs[name] = sum(p.stat().st_size for p in out.rglob("*")) if out.is_dir() else out.stat().st_size
                shutil.rmtree(out) if out.is_dir() else out.unlink()
                subprocess.run(["sync"], check=True)
                runs[name].append(result)
                walls[name] = result["wall"]
            for name in commands:
                ratios[name].append(walls[name] / walls["cp + sync"])
        results: dict[str, Any] = {"weights_gib": round(size / 2**30, 3), "rounds": args.repeat, "commands": {}}
        print(f"HF (float32, {results['weights_gib']} GiB) -> GGUF, {args.repeat} rounds")
        for name, found in runs.items():
            wall = [r["wall"] for r in found]
            row = {
                "wall_s": [round(w, 3) for w in wall],
                "median_wall_s": round(statistics.median(wall), 3),
                "median_ratio_to_cp": round(statistics.median(ratios[name]), 2),
                "median_cpu_s": round(statistics.median(r["user"] + r["sys"] for r in found), 2),
                "max_rss_mib": round(max(r["maxrss_kib"] for r in found) / 1024, 1),
                "output_mib": round(outputs[name] / 2**20, 1),
            }
            results["commands"][name] = row
            print(
                f"  {name:38s} {row['median_wall_s']:8.2f} s  x{row['median_ratio_to_cp']:<6} "
                f"CPU {row['median_cpu_s']:8.2f} s  {row['max_rss_mib']:8.1f} MiB  -> {row['output_mib']:.0f} MiB"
            )
        recorder.write(args.json, results)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
