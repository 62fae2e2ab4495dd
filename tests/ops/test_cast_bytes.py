"""Float casts streamed through the numpy byte kernel give the bytes torch's `.to()` gives."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckptx.convert import convert
from ckptx.io import safetensors_writer, spans
from ckptx.ops.registry import SourceRef, TensorMeta, byte_converter, node

FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def hard_values(dtype: torch.dtype) -> torch.Tensor:
    """Zeros, subnormals, extremes, infinities, NaN, rounding ties of every target type, and random values."""
    special = [0.0, -0.0, 1.0, -1.0, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-11, 1 + 3 * 2**-11, 65504.0, 65520.0, 1e5,
               -1e5, 6e-8, 3e-8, 1e-40, -1e-40, 1e-45, 3.4e38, -3.4e38, 1e300, 1e-300, float("inf"),
               float("-inf"), float("nan")]
    finite = torch.finfo(dtype)
    special += [finite.max, finite.min, finite.tiny, finite.tiny / 4]
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(4000, generator=generator, dtype=torch.float64) * torch.logspace(-30, 30, 4000, dtype=torch.float64)
    return torch.cat([torch.tensor(special, dtype=torch.float64), noise]).to(dtype)


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal bit for bit, except that a NaN may be any NaN."""
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), nan)
    as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[expected.element_size()]
    assert torch.equal(actual[~nan].view(as_int), expected[~nan].view(as_int))


@pytest.mark.parametrize(("source", "target"), [p for p in itertools.product(FLOATS, FLOATS) if p[0] != p[1]])
def test_byte_kernel_equals_torch_to(source: torch.dtype, target: torch.dtype) -> None:
    values = hard_values(source)
    expr = node("cast", [SourceRef("w", TensorMeta(tuple(values.shape), str(source)[6:]))], "here",
                dtype=str(target)[6:])
    key, convert_bytes = byte_converter(expr)
    raw = values.view(torch.uint8).numpy().tobytes()
    out = torch.frombuffer(bytearray(convert_bytes(raw)), dtype=target)
    assert key == "w"
    assert_same_bits(out, values.to(target))


def test_integer_casts_have_no_byte_kernel() -> None:
    expr = node("cast", [SourceRef("w", TensorMeta((3,), "int64"))], "here", dtype="float32")
    assert byte_converter(expr) is None


def test_a_cast_streamed_in_many_chunks_equals_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spans, "CONVERT_CHUNK", 64)
    monkeypatch.setattr(safetensors_writer, "materialize", lambda *a: pytest.fail("computed with torch"))
    state = {"w": hard_values(torch.float32).reshape(-1, 4), "b": torch.randn(7, dtype=torch.float64)}
    save_file(state, str(tmp_path / "src.safetensors"))
    rules = tmp_path / "cast.yaml"
    rules.write_text("ckptx: 1\nsteps:\n  - cast: {dtype: bfloat16}\n", encoding="utf-8")
    convert(tmp_path / "src.safetensors", tmp_path / "out.safetensors", str(rules))
    out = load_file(str(tmp_path / "out.safetensors"))
    for key, value in state.items():
        assert out[key].shape == value.shape
        assert_same_bits(out[key], value.to(torch.bfloat16))
