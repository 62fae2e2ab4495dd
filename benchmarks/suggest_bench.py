"""`ckptx suggest` at scale: a 100,000-key LLM-like source against a 100,000-key target given as a manifest.

The source is a safetensors file in the HuggingFace Llama layout (`model.layers.N.self_attn.q_proj.weight`,
grouped-query k/v, gate/up/down MLP, two RMSNorms per layer), its header in registration order (with
`--sorted-header`, in name order as `save_file` writes it: then nothing but names tells gate from up or
one norm from the other, and suggest flags those rows as close calls); the target is a manifest in Meta's original
layout (`layers.N.attention.wq.weight`,
`feed_forward.w1/w2/w3`, `attention_norm`, `ffn_norm`, `tok_embeddings`, `output`). The data section is a
sparse file (only the header is ever read). Reported: wall and CPU seconds of the whole `suggest()` call (read
both sides, align, generalize, write the recipe, re-plan it on the 100,000 keys, validate), best of `--repeat`,
with the machine's load average (on a shared machine, wall time above CPU time is time spent waiting).

    .venv/bin/python benchmarks/suggest_bench.py [--layers 11111] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import tempfile
import time
from pathlib import Path

HIDDEN, KV, FFN, VOCAB = 16, 8, 40, 64


def hf_layout(layers: int) -> list[tuple[str, list[int]]]:
    """(key, shape) of a Llama-like model in transformers' names, in registration order."""
    out = [("model.embed_tokens.weight", [VOCAB, HIDDEN])]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", [HIDDEN, HIDDEN]),
            (p + "self_attn.k_proj.weight", [KV, HIDDEN]),
            (p + "self_attn.v_proj.weight", [KV, HIDDEN]),
            (p + "self_attn.o_proj.weight", [HIDDEN, HIDDEN]),
            (p + "mlp.gate_proj.weight", [FFN, HIDDEN]),
            (p + "mlp.up_proj.weight", [FFN, HIDDEN]),
            (p + "mlp.down_proj.weight", [HIDDEN, FFN]),
            (p + "input_layernorm.weight", [HIDDEN]),
            (p + "post_attention_layernorm.weight", [HIDDEN]),
        ]
    return out + [("model.norm.weight", [HIDDEN]), ("lm_head.weight", [VOCAB, HIDDEN])]


def meta_layout(layers: int) -> list[tuple[str, list[int]]]:
    """The same model in Meta's original names and registration order."""
    out = [("tok_embeddings.weight", [VOCAB, HIDDEN])]
    for i in range(layers):
        p = f"layers.{i}."
        out += [
            (p + "attention.wq.weight", [HIDDEN, HIDDEN]),
            (p + "attention.wk.weight", [KV, HIDDEN]),
            (p + "attention.wv.weight", [KV, HIDDEN]),
            (p + "attention.wo.weight", [HIDDEN, HIDDEN]),
            (p + "feed_forward.w1.weight", [FFN, HIDDEN]),
            (p + "feed_forward.w2.weight", [HIDDEN, FFN]),
            (p + "feed_forward.w3.weight", [FFN, HIDDEN]),
            (p + "attention_norm.weight", [HIDDEN]),
            (p + "ffn_norm.weight", [HIDDEN]),
        ]
    return out + [("norm.weight", [HIDDEN]), ("output.weight", [VOCAB, HIDDEN])]


def expected_mapping(layers: int) -> dict[str, str]:
    """target key -> source key, as the two codebases define them."""
    names = {
        "self_attn.q_proj": "attention.wq",
        "self_attn.k_proj": "attention.wk",
        "self_attn.v_proj": "attention.wv",
        "self_attn.o_proj": "attention.wo",
        "mlp.gate_proj": "feed_forward.w1",
        "mlp.down_proj": "feed_forward.w2",
        "mlp.up_proj": "feed_forward.w3",
        "input_layernorm": "attention_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    out = {
        "tok_embeddings.weight": "model.embed_tokens.weight",
        "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    for i in range(layers):
        for hf, meta in names.items():
            out[f"layers.{i}.{meta}.weight"] = f"model.layers.{i}.{hf}.weight"
    return out


def write_source(path: Path, layers: int, sorted_header: bool = False) -> int:
    """A safetensors file of the HF layout (float16), data section sparse."""
    header, offset = {}, 0
    layout = hf_layout(layers)
    for key, shape in sorted(layout) if sorted_header else layout:
        nbytes = 2 * _numel(shape)
        header[key] = {"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return len(header)


def write_target(path: Path, layers: int) -> int:
    """A ckptx manifest of the Meta layout."""
    tensors = {k: {"shape": s, "dtype": "float16"} for k, s in meta_layout(layers)}
    path.write_text(json.dumps({"ckptx_manifest": 1, "source": "bench", "tensors": tensors}), encoding="utf-8")
    return len(tensors)


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=11111, help="9 tensors per layer (+3): 11111 -> 100,002 keys")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sorted-header", action="store_true", help="source header in name order")
    parser.add_argument("--json", metavar="FILE", help="also write the result as JSON (benchmarks/record.py)")
    args = parser.parse_args()
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import record  # benchmarks/record.py

    recorder = record.Recorder("suggest_bench")
    from ckptx.suggestion.engine import suggest

    with tempfile.TemporaryDirectory(prefix="ckptx-suggest-bench-") as tmp:
        src, dst = Path(tmp) / "hf_llama.safetensors", Path(tmp) / "meta_llama.json"
        n_src, n_dst = write_source(src, args.layers, args.sorted_header), write_target(dst, args.layers)
        times, cpu = [], []
        for _ in range(args.repeat):
            started, started_cpu = time.perf_counter(), time.process_time()
            result = suggest(src, str(dst), output=Path(tmp) / "rules.yaml")
            times.append(time.perf_counter() - started)
            cpu.append(time.process_time() - started_cpu)
        want = expected_mapping(args.layers)
        got = {k: d.sources[0] for k, d in result.decided.items()}
        wrong = sum(1 for k, v in want.items() if got.get(k) != v)
        rows = result.text.count("\n      - [")
        close = len(result.report.close_calls)
        found = {
            "source_keys": n_src,
            "target_keys": n_dst,
            "best_seconds": round(min(times), 2),
            "all_seconds": [round(t, 2) for t in times],
            "best_cpu_seconds": round(min(cpu), 2),
            "all_cpu_seconds": [round(t, 2) for t in cpu],
            "load_average_1min": round(os.getloadavg()[0], 2),
            "validated": result.report.ok,
            "wrongly_mapped": wrong,
            "close_calls": close,
            "undecided": len(result.report.undecided),  # q/k rows: rotary layouts differ, head size unknown
            "rename_rows": rows,
            "sorted_header": args.sorted_header,
        }
        print(json.dumps(found, indent=1))
        recorder.write(args.json, found)


if __name__ == "__main__":
    main()
