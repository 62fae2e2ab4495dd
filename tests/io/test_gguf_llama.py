"""The LlamaForCausalLM config a GGUF's metadata describes (ckptx/io/read/gguf_llama.py): values a Llama config
cannot hold, or that would load and compute NaN or something else, are problems named by key, never written."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from ckptx.io.read.gguf_llama import hf_llama_config

GOOD = {
    "general.architecture": "llama",
    "llama.embedding_length": 8,
    "llama.feed_forward_length": 16,
    "llama.attention.head_count": 2,
    "llama.attention.head_count_kv": 2,
    "llama.block_count": 1,
    "llama.context_length": 32,
    "llama.attention.layer_norm_rms_epsilon": 1e-5,
}
BLOCK = ("attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def shapes(blocks: int = 1) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {"token_embd.weight": (16, 8), "output_norm.weight": (8,)}
    for b in range(blocks):
        out |= {f"blk.{b}.{name}.weight": (8, 8) for name in BLOCK}
    return out


def test_good_metadata_gives_the_config_without_problems() -> None:
    made = hf_llama_config(GOOD, shapes())
    assert not made.problems
    assert made.document["num_hidden_layers"] == 1 and made.document["rms_norm_eps"] == 1e-5


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("llama.attention.head_count", 0, "llama.attention.head_count is 0, not a whole number of at least 1"),
        ("llama.attention.head_count_kv", 0, "llama.attention.head_count_kv is 0, not a whole number"),
        ("llama.attention.head_count", 3, "llama.embedding_length 8 is not a multiple of head_count 3"),
        ("llama.block_count", 2**32 - 1, "llama.block_count is 4294967295, but the file holds the tensors of 1 blocks"),
        ("llama.attention.layer_norm_rms_epsilon", math.nan, "layer_norm_rms_epsilon is nan, not a finite number"),
        ("llama.attention.layer_norm_rms_epsilon", 0.0, "layer_norm_rms_epsilon is 0.0, not a finite number above 0"),
        ("llama.rope.freq_base", math.inf, "llama.rope.freq_base is inf, not a finite number above 0"),
        (
            "llama.attention.key_length",
            "x" * 100,
            "llama.attention.key_length is 'xxxxxxxxxxxxxxxxxxxx",
        ),
        ("llama.feed_forward_length", 2.5, "llama.feed_forward_length is 2.5, not a whole number of at least 1"),
        ("llama.expert_count", 8, "llama.expert_count is 8: a mixture of experts"),
    ],
)
def test_metadata_a_llama_config_cannot_hold_is_a_named_problem(key: str, value: object, problem: str) -> None:
    made = hf_llama_config({**GOOD, key: value}, shapes())
    assert any(problem in p for p in made.problems), made.problems


def test_a_block_count_beyond_the_tensors_is_refused_before_a_model_is_built(tmp_path: Path, run_cli) -> None:
    """4,294,967,295 blocks stated over one block of tensors: refused in one line (building that model on the
    meta device would not end)."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    path = tmp_path / "lying.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2**32 - 1)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_context_length(32)
    writer.add_layer_norm_rms_eps(1e-5)
    for name, shape in shapes().items():
        writer.add_tensor(name, np.zeros(shape[::-1] if len(shape) == 1 else shape, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    result = run_cli("convert", path, "-r", "gguf/llama-to-hf", "-o", f"{tmp_path / 'hf'}/")
    assert result.code == 2 and result.err.count("\n") == 1
    assert "llama.block_count is 4294967295, but the file holds the tensors of 1 blocks" in result.err
    assert not (tmp_path / "hf").exists()
