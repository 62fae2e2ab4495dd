"""The shipped LLaMA recipes (LlamaForCausalLM <-> fused qkv/gate_up as in Phi3ForCausalLM), on real transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from .conftest import require_library

# A tiny Llama with grouped-query attention: 4 heads of 8, 2 key/value heads -> q 32, k and v 16 rows.
CONFIG = {
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 48,
    "layers": 2,
    "heads": 4,
    "kv_heads": 2,
    "max_positions": 64,
}
SETS = [arg for name, value in CONFIG.items() for arg in ("--set", f"{name}={value}")]
REVERSE_SETS = SETS + ["--set", "q_size=32", "--set", "kv_size=16"]


def _model(architecture: str, seed: int) -> torch.nn.Module:
    from ckptx.factories import transformers_model

    model = transformers_model(
        architecture,
        vocab_size=128,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=None,
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1 + (1.0 if tensor.dim() == 1 else 0))
    return model.eval()


def _tokens() -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def llama(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    require_library("hf")
    model = _model("LlamaForCausalLM", seed=1)
    path = tmp_path / "llama.safetensors"
    save_file(model.state_dict(), str(path))
    return model, path


def test_llama_to_fused_loads_strictly_in_phi3_with_the_same_logits(run_cli, llama, tmp_path: Path) -> None:
    source, src = llama
    dst = tmp_path / "fused.safetensors"
    result = run_cli("convert", src, "-r", "llama/llama-to-fused-qkv", "-o", dst, *SETS, "--verify", "--json")
    assert result.code == 0, result.out + result.err
    assert result.json["validation"]["ok"] and result.json["verification"]["max_abs_diff"] < 1e-4
    fused = load_file(str(dst))
    first = source.state_dict()
    assert torch.equal(
        fused["model.layers.0.self_attn.qkv_proj.weight"],
        torch.cat([first[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"]),
    )
    target = _model("Phi3ForCausalLM", seed=2)
    target.load_state_dict(fused, strict=True)
    with torch.no_grad():
        assert (target(_tokens()).logits - source(_tokens()).logits).abs().max().item() < 1e-4


def test_round_trips_are_bit_exact(run_cli, llama, tmp_path: Path) -> None:
    source, src = llama
    fused, back, reverse = (tmp_path / f"{n}.safetensors" for n in ("fused", "back", "reverse"))
    assert run_cli("convert", src, "-r", "llama/llama-to-fused-qkv", "-o", fused, *SETS).code == 0
    result = run_cli(
        "convert", fused, "-r", "llama/fused-qkv-to-llama", "-o", back, *REVERSE_SETS, "--verify", "--json"
    )
    assert result.code == 0 and result.json["verification"]["ok"], result.out + result.err
    original = load_file(str(src))
    for path in (back, reverse):
        if path is reverse:  # the reverse is traced on the recipe's verify source model to learn q/k/v sizes
            result = run_cli("convert", fused, "-r", "llama/llama-to-fused-qkv", "--reverse", "-o", reverse, *SETS)
            assert result.code == 0, result.out + result.err
        out = load_file(str(path))
        assert sorted(out) == sorted(original) and all(torch.equal(out[k], original[k]) for k in original)
    _model("LlamaForCausalLM", seed=3).load_state_dict(load_file(str(reverse)), strict=True)


def test_phi3_model_converts_to_llama_with_the_same_logits(run_cli, tmp_path: Path) -> None:
    require_library("hf")
    source = _model("Phi3ForCausalLM", seed=4)
    src = tmp_path / "phi3.safetensors"
    save_file(source.state_dict(), str(src))
    dst = tmp_path / "llama.pth"
    result = run_cli("convert", src, "-r", "llama/fused-qkv-to-llama", "-o", dst, *REVERSE_SETS, "--verify", "--json")
    assert result.code == 0 and result.json["verification"]["max_abs_diff"] < 1e-4, result.out + result.err
    target = _model("LlamaForCausalLM", seed=5)
    target.load_state_dict(torch.load(dst, weights_only=True), strict=True)
    with torch.no_grad():
        assert (target(_tokens()).logits - source(_tokens()).logits).abs().max().item() < 1e-4
