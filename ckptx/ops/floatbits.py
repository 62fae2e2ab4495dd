"""Float formats as numpy bit operations, for the byte kernels of the quantization steps (no torch): float8 bytes
decoded to float32, float32 rounded to float8_e4m3fn, bfloat16, float16 or float32 bytes. Each gives the bits
torch's `.to()` gives for the same values (round to nearest even, torch's saturation and NaN rules for
float8_e4m3fn); NaN inputs are left to the callers, which hand such pieces to torch itself."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ckptx._lazy import lazy_module

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
else:
    np = lazy_module("numpy")

__all__ = ["E4M3_MAX", "FLOAT8", "OUTPUT_FLOATS", "decode_float8", "encode_e4m3fn", "encode_float", "float8_table"]

E4M3_MAX = 448.0  # the largest finite float8_e4m3fn
FLOAT8 = ("float8_e4m3fn", "float8_e5m2")  # the float8 dtypes the dequantize step reads
OUTPUT_FLOATS = ("bfloat16", "float16", "float32")  # what a dequantization writes
_TABLES: dict[str, Any] = {}


def float8_table(dtype: str) -> Any:
    """The 256 float32 values of a float8 dtype's bytes, as torch's `.float()` gives them (NaN bits included)."""
    table = _TABLES.get(dtype)
    if table is None:
        codes = np.arange(256, dtype="<u4")
        if dtype == "float8_e5m2":  # the upper byte of a float16, its NaNs quieted as torch widens them
            table = (codes.astype("<u2") << 8).view("<f2").astype("<f4")
            bits = table.view("<u4")
            bits[np.isnan(table)] |= 0x00400000
        else:
            table = _e4m3fn_values(codes)
        _TABLES[dtype] = table
    return table


def _e4m3fn_values(codes: Any) -> Any:
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exponent, mantissa = (codes >> 3) & 0xF, codes & 0x7
    normal = (1 + mantissa / 8.0) * np.exp2(exponent.astype("<f8") - 7)
    values = (sign * np.where(exponent == 0, mantissa / 8.0 * 2.0**-6, normal)).astype("<f4")
    bits = values.view("<u4")
    nan = (codes & 0x7F) == 0x7F  # torch widens the two NaN bytes to 0x7FF00000 / 0xFFF00000
    bits[nan] = np.where(codes[nan] & 0x80, 0xFFF00000, 0x7FF00000).astype("<u4")
    return values


def decode_float8(data: bytes, dtype: str) -> Any:
    """Float8 bytes as a float32 array (exact)."""
    return float8_table(dtype)[np.frombuffer(data, dtype="<u1")]


def encode_e4m3fn(values: Any) -> Any:
    """Float32 values rounded to float8_e4m3fn bytes as torch (2.14) rounds them: to nearest even, subnormals
    below 2^-6, magnitudes above 448 (inf included) saturated to 448, NaN the byte 0x7F with its sign."""
    single = np.ascontiguousarray(values, dtype="<f4")
    bits = single.view("<u4").astype("<i8")
    sign = (bits >> 24) & 0x80
    magnitude = bits & 0x7FFFFFFF
    normal = ((magnitude + 0x7FFFF + ((magnitude >> 20) & 1)) >> 20) - (120 << 3)
    with np.errstate(invalid="ignore"):
        small = np.rint(np.abs(single).astype("<f8") * 512.0)
    small = np.where(magnitude < (121 << 23), small, 0).astype("<i8")
    code = np.where(magnitude < (121 << 23), small, np.minimum(normal, 0x7E))
    code = np.where(magnitude > 0x7F800000, 0x7F, code)
    return (code | sign).astype("<u1")


def encode_float(values: Any, dtype: str) -> bytes:
    """Float32 values as little-endian bytes of `dtype` (bfloat16, float16 or float32), rounded to nearest even."""
    single = np.ascontiguousarray(values, dtype="<f4")
    if dtype == "float32":
        return single.tobytes()
    with np.errstate(over="ignore"):  # overflow to inf is the cast's meaning, as in torch
        if dtype == "float16":
            return single.astype("<f2").tobytes()
    bits = single.view("<u4")
    return ((bits + ((bits >> 16) & 1) + 0x7FFF) >> 16).astype("<u2").tobytes()
