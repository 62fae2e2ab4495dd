"""MXFP4 dequantization equals transformers' convert_moe_packed_tensors bit for bit, shape and layout included."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

import ckptx
from ckptx.conversion.pipeline import convert
from ckptx.rules.loader import load_rules
from tests.ops.helpers import plan_problems, recipe, stream


def packed(*shape: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random packed bytes [..., G, B] and exponents [..., G] over every byte value."""
    generator = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)
    scales = torch.randint(0, 256, shape[:-1], generator=generator, dtype=torch.uint8)
    return blocks, scales


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.uint8)


def same_bits(state: dict, made) -> dict:
    """The recipe applied in memory and streamed through the writer: the same bytes (NaN-free comparison)."""
    in_memory = ckptx.apply(made, state)
    streamed = stream(Path(made.files[0].path).parent, made, state)
    assert set(streamed) == set(in_memory)  # safetensors files keep keys sorted
    for key, tensor in in_memory.items():
        assert torch.equal(bits(streamed[key]), bits(tensor)), key
    return in_memory


@pytest.mark.parametrize("shape", [(4, 12, 3, 16), (2, 5, 7, 16), (3, 2, 4, 2, 16), (1, 256, 16, 16)])
def test_dequantize_equals_transformers_bit_for_bit(tmp_path: Path, shape) -> None:
    blocks, scales = packed(*shape)
    if shape == (1, 256, 16, 16):  # every byte with every exponent
        blocks = torch.arange(256, dtype=torch.uint8).repeat(256).reshape(shape)
        scales = torch.arange(256, dtype=torch.uint8).reshape(1, 256, 1).repeat(1, 1, 16)
    state = {"experts.gate_up_proj_blocks": blocks, "experts.gate_up_proj_scales": scales, "norm": torch.ones(3)}
    out = same_bits(state, recipe(tmp_path, "- dequantize_mxfp4:"))
    expected = convert_moe_packed_tensors(blocks, scales)
    assert list(out) == ["experts.gate_up_proj", "norm"]
    assert out["experts.gate_up_proj"].shape == expected.shape and out["experts.gate_up_proj"].dtype == expected.dtype
    assert torch.equal(bits(out["experts.gate_up_proj"]), bits(expected))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_other_dtypes_equal_transformers_with_that_dtype(tmp_path: Path, dtype: str) -> None:
    blocks, scales = packed(3, 6, 2, 16, seed=1)
    scales = scales % 40 + 107  # within float16's range
    out = same_bits(
        {"x_blocks": blocks, "x_scales": scales}, recipe(tmp_path, f"- dequantize_mxfp4: {{dtype: {dtype}}}")
    )
    expected = convert_moe_packed_tensors(blocks, scales, dtype=getattr(torch, dtype))
    assert torch.equal(bits(out["x"]), bits(expected))


def test_without_transpose_rows_stay_as_stored(tmp_path: Path) -> None:
    blocks, scales = packed(3, 6, 2, 16, seed=2)
    out = same_bits(
        {"x_blocks": blocks, "x_scales": scales}, recipe(tmp_path, "- dequantize_mxfp4: {transpose: false}")
    )
    expected = convert_moe_packed_tensors(blocks, scales).transpose(1, 2)
    assert out["x"].shape == (3, 6, 64) and torch.equal(bits(out["x"]), bits(expected))


def test_blocks_without_scales_are_refused(tmp_path: Path) -> None:
    blocks, _ = packed(2, 3, 1, 16)
    problems = plan_problems(tmp_path, "- dequantize_mxfp4:", {"x_blocks": blocks})
    assert (
        "tensor 'x_blocks' has no 'x_scales' at this step; MXFP4 blocks need their scales (set `scales_suffix`, "
        "or leave them out of `match`)" in problems
    )


def test_scales_of_the_wrong_shape_are_refused(tmp_path: Path) -> None:
    blocks, scales = packed(2, 3, 2, 16)
    problems = plan_problems(tmp_path, "- dequantize_mxfp4:", {"x_blocks": blocks, "x_scales": scales[:, :, :1]})
    assert "tensor 'x_blocks': blocks uint8[2, 3, 2, 16] need scales of shape [2, 3, 2], got uint8[2, 3, 1]" in problems


def test_gpt_oss_experts_dequantize_into_the_model(tmp_path: Path) -> None:
    """A tiny GptOssForCausalLM's experts as MXFP4 blocks and scales: the shipped recipe gives tensors that load
    strictly into the model, each equal to transformers' own dequantization."""
    from ckptx.factories import transformers_model

    model = transformers_model(
        "GptOssForCausalLM",
        vocab_size=64,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        layer_types=["full_attention"],
    )
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    expected = {}
    for name in ("gate_up_proj", "down_proj"):
        key = f"model.layers.0.mlp.experts.{name}"
        experts, cols, rows = state.pop(key).shape  # the class holds [experts, in, out]
        blocks, scales = packed(experts, rows, cols // 32, 16, seed=len(name))
        scales = scales % 8 + 120
        state[f"{key}_blocks"], state[f"{key}_scales"] = blocks, scales
        expected[key] = convert_moe_packed_tensors(blocks, scales)
    save_file(state, str(tmp_path / "gpt-oss.safetensors"))
    manifest = {k: v.to(torch.bfloat16) if k in expected else v for k, v in model.state_dict().items()}
    save_file(manifest, str(tmp_path / "target.safetensors"))  # the model's own keys, shapes and dtypes
    result = convert(
        tmp_path / "gpt-oss.safetensors",
        tmp_path / "out.safetensors",
        "quant/mxfp4-to-bf16",
        target=str(tmp_path / "target.safetensors"),
    )
    assert result.report is not None and result.report.ok, str(result.report)
    out = load_file(str(tmp_path / "out.safetensors"))
    for key, tensor in expected.items():
        assert torch.equal(bits(out[key]), bits(tensor)), key
    model.to(torch.bfloat16).load_state_dict(out, strict=True)


def test_shipped_recipe_is_not_invertible_and_says_why() -> None:
    from ckptx.errors import RuleError
    from ckptx.rules.inverse import invert_recipe

    with pytest.raises(RuleError, match="MXFP4 quantization .* is not implemented"):
        invert_recipe(load_rules("quant/mxfp4-to-bf16"))
