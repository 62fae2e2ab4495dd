"""FP8 block (de)quantization: the reference formulas block by block, bit for bit, streamed and in memory, for shapes
that are not multiples of the block; scales in another shard; the scales consumed; bad scales refused."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import ckptx
from ckptx.conversion.pipeline import convert
from ckptx.errors import PlanError, TensorOpError
from ckptx.rules.loader import load_rules
from tests.ops.helpers import apply, plan_problems, randn, stream

FP8 = torch.float8_e4m3fn


def fp8_weight(*shape: int, seed: int = 0) -> torch.Tensor:
    """Random float8_e4m3fn values over most of the type's range."""
    return (randn(*shape, seed=seed) * 100).clamp(-448, 448).to(FP8)


def scales_for(shape: tuple[int, ...], block: tuple[int, int], seed: int = 1) -> torch.Tensor:
    grid = (*shape[:-2], math.ceil(shape[-2] / block[0]), math.ceil(shape[-1] / block[1]))
    return torch.rand(grid, generator=torch.Generator().manual_seed(seed)) * 1e-2 + 1e-4


def reference_dequantize(weight: torch.Tensor, scales: torch.Tensor, block: tuple[int, int], dtype) -> torch.Tensor:
    """DeepSeek's weight_dequant written out block by block: fp32(x) * s, rounded to dtype."""
    out = torch.empty(weight.shape, dtype=dtype)
    b0, b1 = block
    for index in itertools.product(*(range(n) for n in scales.shape)):
        *lead, i, j = index
        rows, cols = slice(i * b0, (i + 1) * b0), slice(j * b1, (j + 1) * b1)
        part = weight[(*lead, rows, cols)].to(torch.float32) * scales[index]
        out[(*lead, rows, cols)] = part.to(dtype)
    return out


def reference_quantize(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's weight_quant block by block in float32: s = amax / 448 (1 for a zero block), x / s."""
    b0, b1 = block
    rows, cols = weight.shape
    scales = torch.empty(math.ceil(rows / b0), math.ceil(cols / b1))
    values = torch.empty(weight.shape, dtype=FP8)
    for i, j in itertools.product(*(range(n) for n in scales.shape)):
        part = weight[i * b0 : (i + 1) * b0, j * b1 : (j + 1) * b1].to(torch.float32)
        amax = part.abs().max()
        s = amax / 448.0 if amax > 0 else torch.tensor(1.0)
        scales[i, j] = s
        values[i * b0 : (i + 1) * b0, j * b1 : (j + 1) * b1] = (part / s).clamp(-448, 448).to(FP8)
    return values, scales


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.uint8)


@pytest.mark.parametrize(
    ("shape", "block", "dtype"),
    [
        ((300, 200), (128, 128), "bfloat16"),
        ((257, 129), (128, 128), "float16"),
        ((129, 1), (128, 128), "float32"),
        ((3, 130, 70), (64, 32), "bfloat16"),
    ],
)
def test_dequantize_is_the_reference_formula_bit_for_bit(tmp_path: Path, shape, block, dtype) -> None:
    weight, scales = fp8_weight(*shape), scales_for(shape, block)
    state = {"layer.weight": weight, "layer.weight_scale_inv": scales, "layer.bias": randn(shape[-2])}
    out = apply(tmp_path, f"- dequantize_fp8: {{block: {list(block)}, dtype: {dtype}}}", state)
    assert list(out) == ["layer.weight", "layer.bias"]
    expected = reference_dequantize(weight, scales, block, getattr(torch, dtype))
    assert out["layer.weight"].dtype == expected.dtype
    assert torch.equal(bits(out["layer.weight"]), bits(expected))
    assert torch.equal(out["layer.bias"], state["layer.bias"])


def test_scales_in_another_shard_are_read_by_key_and_consumed(tmp_path: Path) -> None:
    weight, scales = fp8_weight(200, 300), scales_for((200, 300), (128, 128))
    save_file({"a.weight": weight, "b.weight": randn(4, 4)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"a.weight_scale_inv": scales}, str(tmp_path / "model-00002-of-00002.safetensors"))
    index = {
        "metadata": {},
        "weight_map": {
            "a.weight": "model-00001-of-00002.safetensors",
            "b.weight": "model-00001-of-00002.safetensors",
            "a.weight_scale_inv": "model-00002-of-00002.safetensors",
        },
    }
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    result = convert(tmp_path / "model.safetensors.index.json", tmp_path / "out.safetensors", "quant/fp8-block-to-bf16")
    entry = next(e for e in result.plan.entries if e.key == "a.weight")
    assert entry.sources == ("a.weight", "a.weight_scale_inv") and result.plan.dropped == []
    out = load_file(str(tmp_path / "out.safetensors"))
    assert set(out) == {"a.weight", "b.weight"}
    assert torch.equal(bits(out["a.weight"]), bits(reference_dequantize(weight, scales, (128, 128), torch.bfloat16)))


def test_a_float8_weight_without_its_scales_is_refused(tmp_path: Path) -> None:
    problems = plan_problems(tmp_path, "- dequantize_fp8:", {"w": fp8_weight(4, 4)})
    assert (
        "tensor 'w' is float8_e4m3fn but the checkpoint has no 'w_scale_inv' at this step; without its scales it "
        "cannot be dequantized (set `scale_suffix`, or leave it out of `match`)" in problems
    )


def test_scales_of_the_wrong_shape_are_refused_naming_the_block(tmp_path: Path) -> None:
    state = {"w": fp8_weight(256, 130), "w_scale_inv": torch.ones(2, 1)}
    problems = plan_problems(tmp_path, "- dequantize_fp8:", state)
    assert (
        "tensor 'w': float8_e4m3fn[256, 130] needs scales of shape [2, 2] for blocks of 128x128, got float32[2, 1]; "
        "set `block` to the checkpoint's block size (config.json: weight_block_size)" in problems
    )


def test_other_suffix_and_float8_e5m2(tmp_path: Path) -> None:
    weight = (randn(40, 50) * 1000).to(torch.float8_e5m2)
    scales = scales_for((40, 50), (16, 16))
    out = apply(tmp_path, "- dequantize_fp8: {scale_suffix: .scale, block: 16}", {"w": weight, "w.scale": scales})
    assert torch.equal(bits(out["w"]), bits(reference_dequantize(weight, scales, (16, 16), torch.bfloat16)))


@pytest.mark.parametrize(("shape", "dtype"), [((300, 200), torch.bfloat16), ((129, 257), torch.float32)])
def test_quantize_is_deepseeks_weight_quant_bit_for_bit(tmp_path: Path, shape, dtype) -> None:
    weight = randn(*shape, seed=3).to(dtype)
    weight[:128, :128] = 0  # a block of zeros gets the scale 1
    state = {"layer.weight": weight, "norm.weight": randn(shape[1])}
    out = apply(tmp_path, "- quantize_fp8:", state)
    assert list(out) == ["layer.weight", "layer.weight_scale_inv", "norm.weight"]
    values, scales = reference_quantize(weight, (128, 128))
    assert torch.equal(bits(out["layer.weight"]), bits(values))
    assert torch.equal(out["layer.weight_scale_inv"], scales) and scales[0, 0] == 1.0
    assert torch.equal(out["norm.weight"], state["norm.weight"])


def test_quantize_then_dequantize_gives_the_weights_back_within_fp8_precision(tmp_path: Path) -> None:
    weight = randn(300, 260, seed=4)
    quantized = apply(tmp_path, "- quantize_fp8:", {"w": weight})
    back = apply(tmp_path, "- dequantize_fp8: {dtype: float32}", quantized)["w"]
    values, scales = reference_quantize(weight, (128, 128))
    assert torch.equal(back, reference_dequantize(values, scales, (128, 128), torch.float32))
    error = (back - weight).abs() / scales.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :260]
    assert error.max() <= 16  # half a step of float8_e4m3fn's 3-bit mantissa at 448 (step 32), in units of s


def test_quantizing_inf_or_nan_is_refused(tmp_path: Path) -> None:
    weight = randn(8, 8)
    weight[3, 3] = float("inf")
    with pytest.raises(TensorOpError, match="a block holds inf or NaN"):
        ckptx.apply(load_rules_text(tmp_path, "- quantize_fp8:"), {"w": weight})
    save_file({"w": weight}, str(tmp_path / "inf.safetensors"))
    with pytest.raises(TensorOpError, match="tensor 'w' .*a block holds inf or NaN"):
        made = load_rules_text(tmp_path, "- quantize_fp8:")
        convert(tmp_path / "inf.safetensors", tmp_path / "out.safetensors", made)
    assert not (tmp_path / "out.safetensors").exists()


def test_shipped_quantize_recipe_leaves_embeddings_norms_and_router_alone(tmp_path: Path) -> None:
    state = {
        "model.embed_tokens.weight": randn(10, 8),
        "model.layers.0.self_attn.q_proj.weight": randn(8, 8),
        "model.layers.0.mlp.gate.weight": randn(4, 8),
        "model.layers.0.mlp.gate_proj.weight": randn(16, 8),
        "model.layers.0.input_layernorm.weight": randn(8),
        "lm_head.weight": randn(10, 8),
    }
    out = ckptx.apply(load_rules("quant/bf16-to-fp8-block"), state)
    quantized = {k for k, v in out.items() if v.dtype == FP8}
    assert quantized == {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.gate_proj.weight"}
    assert set(out) == set(state) | {f"{k}_scale_inv" for k in quantized}


def test_shipped_dequantize_recipe_composes_with_a_rename(tmp_path: Path) -> None:
    weight, scales = fp8_weight(130, 129), scales_for((130, 129), (128, 128))
    rename = tmp_path / "rename.yaml"
    rename.write_text("ckptx: 1\nsteps:\n  - rename: [['^old\\.', 'new.']]\n")
    save_file({"old.weight": weight, "old.weight_scale_inv": scales}, str(tmp_path / "fp8.safetensors"))
    convert(tmp_path / "fp8.safetensors", tmp_path / "out.safetensors", ["quant/fp8-block-to-bf16", str(rename)])
    out = load_file(str(tmp_path / "out.safetensors"))
    assert list(out) == ["new.weight"]
    assert torch.equal(bits(out["new.weight"]), bits(reference_dequantize(weight, scales, (128, 128), torch.bfloat16)))


def test_invert_of_dequantize_is_quantize_of_the_dequantized_keys(tmp_path: Path) -> None:
    state = {"w": fp8_weight(4, 4), "w_scale_inv": torch.ones(1, 1), "b": randn(4)}
    made = load_rules_text(tmp_path, "- dequantize_fp8:")
    from ckptx.conversion.reverse import reverse_recipe

    reverse = reverse_recipe(made, original=state).recipe
    out = ckptx.apply(reverse, ckptx.apply(made, state))
    assert set(out) == {"w", "w_scale_inv", "b"} and out["w"].dtype == FP8


def test_dequantize_streams_without_importing_torch(tmp_path: Path) -> None:
    weight, scales = fp8_weight(300, 260), scales_for((300, 260), (128, 128))
    save_file({"w": weight, "w_scale_inv": scales}, str(tmp_path / "fp8.safetensors"))
    code = (
        "import sys\n"
        "from ckptx.conversion.pipeline import convert\n"
        f"convert({str(tmp_path / 'fp8.safetensors')!r}, {str(tmp_path / 'out.safetensors')!r}, "
        "'quant/fp8-block-to-bf16')\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
    out = load_file(str(tmp_path / "out.safetensors"))
    assert torch.equal(bits(out["w"]), bits(reference_dequantize(weight, scales, (128, 128), torch.bfloat16)))


def test_a_plan_error_lists_every_bad_weight(tmp_path: Path) -> None:
    state = {"a": fp8_weight(4, 4), "b": fp8_weight(4, 4)}
    with pytest.raises(PlanError) as caught:
        ckptx.apply(load_rules_text(tmp_path, "- dequantize_fp8:"), state)
    assert "'a_scale_inv'" in str(caught.value) and "'b_scale_inv'" in str(caught.value)


def load_rules_text(tmp_path: Path, steps: str):
    from tests.ops.helpers import recipe

    return recipe(tmp_path, steps)


def test_a_nan_byte_dequantizes_to_the_bits_torch_writes(tmp_path: Path) -> None:
    weight = fp8_weight(130, 140)
    raw = weight.view(torch.uint8)
    raw[5, 7], raw[129, 139] = 0x7F, 0xFF  # the two NaN bytes of float8_e4m3fn
    scales = scales_for((130, 140), (128, 128))
    state = {"w": weight, "w_scale_inv": scales}
    expected = bits(reference_dequantize(weight, scales, (128, 128), torch.bfloat16))
    made = load_rules_text(tmp_path, "- dequantize_fp8:")
    assert torch.equal(bits(stream(tmp_path, made, state)["w"]), expected)  # NaN != NaN: compare the bits
    assert torch.equal(bits(ckptx.apply(made, state)["w"]), expected)
