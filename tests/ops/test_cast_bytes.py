"""Float casts streamed through the numpy byte kernel give the bytes torch's `.to()` gives."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckptx.conversion.pipeline import convert
from ckptx.dtypes import TensorMeta
from ckptx.io import spans
from ckptx.io.write import units
from ckptx.planning.expr import SourceRef, byte_converter, node

FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def hard_values(dtype: torch.dtype, *, nan: bool = True) -> torch.Tensor:
    """Zeros, subnormals, extremes, infinities, NaN, rounding ties of every target type, and random values."""
    special = [
        0.0,
        -0.0,
        1.0,
        -1.0,
        1 + 2**-8,
        1 + 3 * 2**-8,
        1 + 2**-11,
        1 + 3 * 2**-11,
        65504.0,
        65520.0,
        1e5,
        -1e5,
        6e-8,
        3e-8,
        1e-40,
        -1e-40,
        1e-45,
        3.4e38,
        -3.4e38,
        1e300,
        1e-300,
        float("inf"),
        float("-inf"),
    ] + [float("nan")] * nan
    finite = torch.finfo(dtype)
    special += [finite.max, finite.min, finite.tiny, finite.tiny / 4]
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(4000, generator=generator, dtype=torch.float64) * torch.logspace(
        -30, 30, 4000, dtype=torch.float64
    )
    return torch.cat([torch.tensor(special, dtype=torch.float64), noise]).to(dtype)


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal bit for bit, except that a NaN may be any NaN."""
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), nan)
    as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[expected.element_size()]
    assert torch.equal(actual[~nan].view(as_int), expected[~nan].view(as_int))


@pytest.mark.parametrize(("source", "target"), [p for p in itertools.product(FLOATS, FLOATS) if p[0] != p[1]])
def test_byte_kernel_equals_torch_to(source: torch.dtype, target: torch.dtype) -> None:
    """The numpy kernel itself (a chunk with no NaN), bit for bit."""
    values = hard_values(source, nan=False)
    expr = node(
        "cast", [SourceRef("w", TensorMeta(tuple(values.shape), str(source)[6:]))], "here", dtype=str(target)[6:]
    )
    key, convert_bytes = byte_converter(expr)
    raw = values.view(torch.uint8).numpy().tobytes()
    out = torch.frombuffer(bytearray(convert_bytes(raw)), dtype=target)
    assert key == "w"
    assert_same_bits(out, values.to(target))
    assert torch.equal(out.view(torch.uint8), values.to(target).view(torch.uint8))


NAN_BITS = {
    torch.float16: [0x7E00, 0xFE00, 0x7C01, 0x7DFF, 0x7E01, 0xFFFF],
    torch.bfloat16: [0x7FC0, 0xFFC0, 0x7F81, 0x7FBF, 0x7FC1, 0xFFFF],
    torch.float32: [0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FBFFFFF, 0xFF800001, 0x7FFFFFFF],
    torch.float64: [0x7FF8000000000000, -0x0008000000000000, 0x7FF0000000000001, 0x7FF7FFFFFFFFFFFF],
}
AS_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


@pytest.mark.parametrize(("source", "target"), [p for p in itertools.product(FLOATS, FLOATS) if p[0] != p[1]])
def test_nan_payloads_are_the_bytes_torch_writes(source: torch.dtype, target: torch.dtype) -> None:
    """Quiet, signaling, negative and payload-carrying NaNs, among ordinary values: every output byte is torch's."""
    size = torch.empty(0, dtype=source).element_size()
    bits = [b - (1 << 8 * size) if b >= 1 << (8 * size - 1) else b for b in NAN_BITS[source]]
    nans = torch.tensor(bits * 8, dtype=AS_INT[size]).view(source)
    values = torch.cat([hard_values(source, nan=False)[:50], nans, hard_values(source, nan=False)[50:100]])
    expr = node(
        "cast", [SourceRef("w", TensorMeta(tuple(values.shape), str(source)[6:]))], "here", dtype=str(target)[6:]
    )
    _, convert_bytes = byte_converter(expr)
    out = bytes(convert_bytes(values.view(torch.uint8).numpy().tobytes()))
    assert out == values.to(target).view(torch.uint8).numpy().tobytes()


def test_integer_casts_have_no_byte_kernel() -> None:
    expr = node("cast", [SourceRef("w", TensorMeta((3,), "int64"))], "here", dtype="float32")
    assert byte_converter(expr) is None


def test_a_cast_streamed_in_many_chunks_equals_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spans, "CONVERT_CHUNK", 64)
    monkeypatch.setattr(units, "materialize", lambda *a: pytest.fail("computed with torch"))
    state = {"w": hard_values(torch.float32).reshape(-1, 4), "b": torch.randn(7, dtype=torch.float64)}
    save_file(state, str(tmp_path / "src.safetensors"))
    rules = tmp_path / "cast.yaml"
    rules.write_text("ckptx: 1\nsteps:\n  - cast: {dtype: bfloat16}\n", encoding="utf-8")
    convert(tmp_path / "src.safetensors", tmp_path / "out.safetensors", str(rules))
    out = load_file(str(tmp_path / "out.safetensors"))
    for key, value in state.items():
        assert out[key].shape == value.shape
        assert_same_bits(out[key], value.to(torch.bfloat16))
