"""The GGUF format (llama.cpp) as ckptx reads and writes it: value and tensor type codes, their block sizes, and
the numpy (de)quantization of the block types ckptx handles itself, each bit for bit what the `gguf` package
(`gguf.quants`, version 0.19) computes: F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q6_K to float32, and float32 to F16,
BF16 and Q8_0 (as llama.cpp's `quantize_row_q8_0_ref`: d = amax / 127, values rounded half away from zero).
Other block types are dequantized by the `gguf` package when it is installed (`pip install ckptx[gguf]`).

Layout (version 2 and 3, little-endian): `GGUF`, version u32, tensor count u64, metadata count u64; each metadata
entry a string key, a u32 value type and the value; each tensor a string name, u32 n_dims, n_dims u64 sizes
(fastest-varying first: the reverse of torch's shape), u32 type, u64 offset from the start of the data section;
the data section starts at the next multiple of `general.alignment` (default 32), each tensor aligned the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckptx._lazy import lazy_module

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
else:
    np = lazy_module("numpy")

__all__ = [
    "ALIGNMENT_KEY",
    "DEFAULT_ALIGNMENT",
    "GGML_TYPES",
    "MAGIC",
    "VALUE_TYPES",
    "GgmlType",
    "as_float32",
    "dequantize",
    "quantize",
    "type_named",
]

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
ALIGNMENT_KEY = "general.alignment"
QK_K = 256

# metadata value types: code -> (name, struct format of a scalar, or None for string/array)
VALUE_TYPES: dict[int, tuple[str, str | None]] = {
    0: ("uint8", "<B"),
    1: ("int8", "<b"),
    2: ("uint16", "<H"),
    3: ("int16", "<h"),
    4: ("uint32", "<I"),
    5: ("int32", "<i"),
    6: ("float32", "<f"),
    7: ("bool", "<?"),
    8: ("string", None),
    9: ("array", None),
    10: ("uint64", "<Q"),
    11: ("int64", "<q"),
    12: ("float64", "<d"),
}
STRING, ARRAY = 8, 9


@dataclass(frozen=True)
class GgmlType:
    """One ggml tensor type: its code, name, values per block and bytes per block, and the torch dtype a tensor of
    it is read as (its own for plain types, float32 for block-quantized ones)."""

    code: int
    name: str
    block_size: int
    type_size: int
    dtype: str

    @property
    def plain(self) -> bool:
        """Stored as the elements of its dtype (its bytes can be copied as they are)."""
        return self.block_size == 1


_TYPES = (
    GgmlType(0, "F32", 1, 4, "float32"),
    GgmlType(1, "F16", 1, 2, "float16"),
    GgmlType(2, "Q4_0", 32, 18, "float32"),
    GgmlType(3, "Q4_1", 32, 20, "float32"),
    GgmlType(6, "Q5_0", 32, 22, "float32"),
    GgmlType(7, "Q5_1", 32, 24, "float32"),
    GgmlType(8, "Q8_0", 32, 34, "float32"),
    GgmlType(9, "Q8_1", 32, 36, "float32"),
    GgmlType(10, "Q2_K", 256, 84, "float32"),
    GgmlType(11, "Q3_K", 256, 110, "float32"),
    GgmlType(12, "Q4_K", 256, 144, "float32"),
    GgmlType(13, "Q5_K", 256, 176, "float32"),
    GgmlType(14, "Q6_K", 256, 210, "float32"),
    GgmlType(15, "Q8_K", 256, 292, "float32"),
    GgmlType(16, "IQ2_XXS", 256, 66, "float32"),
    GgmlType(17, "IQ2_XS", 256, 74, "float32"),
    GgmlType(18, "IQ3_XXS", 256, 98, "float32"),
    GgmlType(19, "IQ1_S", 256, 50, "float32"),
    GgmlType(20, "IQ4_NL", 32, 18, "float32"),
    GgmlType(21, "IQ3_S", 256, 110, "float32"),
    GgmlType(22, "IQ2_S", 256, 82, "float32"),
    GgmlType(23, "IQ4_XS", 256, 136, "float32"),
    GgmlType(24, "I8", 1, 1, "int8"),
    GgmlType(25, "I16", 1, 2, "int16"),
    GgmlType(26, "I32", 1, 4, "int32"),
    GgmlType(27, "I64", 1, 8, "int64"),
    GgmlType(28, "F64", 1, 8, "float64"),
    GgmlType(29, "IQ1_M", 256, 56, "float32"),
    GgmlType(30, "BF16", 1, 2, "bfloat16"),
    GgmlType(34, "TQ1_0", 256, 54, "float32"),
    GgmlType(35, "TQ2_0", 256, 66, "float32"),
    GgmlType(39, "MXFP4", 32, 17, "float32"),
)
GGML_TYPES: dict[int, GgmlType] = {t.code: t for t in _TYPES}
_BY_NAME = {t.name: t for t in _TYPES}


def type_named(name: str) -> GgmlType:
    """The ggml type called `name` (`Q8_0`, `F16`, ...)."""
    return _BY_NAME[name.upper()]


# --- dequantization: raw blocks -> float32, as gguf.quants ---------------------------------------------------


def _f16(raw: Any) -> Any:
    return np.ascontiguousarray(raw).view("<f2").astype("<f4")


def _q8_0(blocks: Any) -> Any:
    d, x = _f16(blocks[:, :2]), blocks[:, 2:].view("<i1").astype("<f4")
    return x * d


def _q4_0(blocks: Any) -> Any:
    n = blocks.shape[0]
    d = _f16(blocks[:, :2])
    qs = blocks[:, 2:].reshape(n, -1, 1, 16) >> np.array([0, 4], dtype="<u1").reshape(1, 1, 2, 1)
    qs = (qs & np.uint8(0x0F)).reshape(n, -1).astype("<i1") - np.int8(8)
    return d * qs.astype("<f4")


def _scale_min_k4(scales: Any) -> tuple[Any, Any]:
    n = scales.shape[0]
    d, m, m_d = np.split(scales.reshape(n, 3, 4), 3, axis=-2)
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mins = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.reshape(n, 8), mins.reshape(n, 8)


def _q4_k(blocks: Any) -> Any:
    n = blocks.shape[0]
    d, dmin = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    sc, m = _scale_min_k4(blocks[:, 4:16])
    scaled = (d * sc.astype("<f4")).reshape(n, -1, 1)
    offset = (dmin * m.astype("<f4")).reshape(n, -1, 1)
    qs = blocks[:, 16:].reshape(n, -1, 1, 32) >> np.array([0, 4], dtype="<u1").reshape(1, 1, 2, 1)
    qs = (qs & np.uint8(0x0F)).reshape(n, -1, 32).astype("<f4")
    return (scaled * qs - offset).reshape(n, QK_K)


def _q6_k(blocks: Any) -> Any:
    n = blocks.shape[0]
    ql, qh = blocks[:, : QK_K // 2], blocks[:, QK_K // 2 : QK_K // 2 + QK_K // 4]
    scales, d = blocks[:, QK_K // 2 + QK_K // 4 : QK_K // 2 + QK_K // 4 + QK_K // 16], blocks[:, -2:]
    d = (_f16(d) * np.ascontiguousarray(scales).view("<i1").astype("<f4")).reshape(n, QK_K // 16, 1)
    ql = ql.reshape(n, -1, 1, 64) >> np.array([0, 4], dtype="<u1").reshape(1, 1, 2, 1)
    ql = (ql & np.uint8(0x0F)).reshape(n, -1, 32)
    qh = qh.reshape(n, -1, 1, 32) >> np.array([0, 2, 4, 6], dtype="<u1").reshape(1, 1, 4, 1)
    qh = (qh & np.uint8(0x03)).reshape(n, -1, 32)
    q = (ql | (qh << np.uint8(4))).astype("<i1") - np.int8(32)
    return (d * q.reshape(n, QK_K // 16, -1).astype("<f4")).reshape(n, QK_K)


_DEQUANTIZERS = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_K": _q4_k, "Q6_K": _q6_k}
NATIVE = ("F32", "F16", "BF16", *_DEQUANTIZERS)  # what ckptx dequantizes without the gguf package


def dequantize(data: bytes, ggml: GgmlType, numel: int) -> Any:
    """A block-quantized tensor's raw bytes as a flat float32 array of `numel` values. ImportError when the type
    needs the `gguf` package and it is not installed."""
    raw = np.frombuffer(data, dtype="<u1")
    if ggml.name in _DEQUANTIZERS:
        blocks = raw.reshape(-1, ggml.type_size)
        out = np.empty((blocks.shape[0], ggml.block_size), dtype="<f4")
        for start in range(0, blocks.shape[0], 4096):  # bounded temporaries, as gguf does in groups of rows
            out[start : start + 4096] = _DEQUANTIZERS[ggml.name](blocks[start : start + 4096])
        return out.reshape(numel)
    from gguf import GGMLQuantizationType, quants  # the optional extra: ckptx[gguf]

    return quants.dequantize(raw.reshape(-1, ggml.type_size), GGMLQuantizationType(ggml.code)).reshape(numel)


# --- quantization: float32 -> raw bytes, as gguf.quants ------------------------------------------------------


def _round_half_away(values: Any) -> Any:
    """gguf's `np_roundf`: round half away from zero."""
    a = np.abs(values)
    floored = np.floor(a)
    return np.sign(values) * (floored + np.floor(2 * (a - floored)))


def _quantize_q8_0(blocks: Any) -> Any:
    d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore"):
        inverse = np.where(d == 0, np.float32(0), np.float32(1) / d)
    qs = _round_half_away(blocks * inverse)
    return np.concatenate([d.astype("<f2").view("<u1"), qs.astype("<i1").view("<u1")], axis=1)


def _quantize_bf16(values: Any) -> Any:
    bits = values.view("<u4")
    bits = np.where((bits & 0x7FFFFFFF) > 0x7F800000, (bits & np.uint32(0xFFFF0000)) | np.uint32(64 << 16), bits)
    return ((bits.astype("<u8") + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype("<u2")


def as_float32(data: bytes, dtype: str) -> Any:
    """Little-endian float bytes of `dtype` (float32, float16, bfloat16, float64) as float32 values."""
    if dtype == "bfloat16":
        return (np.frombuffer(data, dtype="<u2").astype("<u4") << 16).view("<f4")
    code = {"float32": "<f4", "float16": "<f2", "float64": "<f8"}[dtype]
    return np.frombuffer(data, dtype=code).astype("<f4")


def quantize(values: Any, name: str) -> bytes:
    """Float32 values (whole rows) as raw bytes of ggml type `name` (F32, F16, BF16 or Q8_0)."""
    single = np.ascontiguousarray(values, dtype="<f4").reshape(-1)
    if name == "F32":
        return single.tobytes()
    if name == "F16":
        with np.errstate(over="ignore"):
            return single.astype("<f2").tobytes()
    if name == "BF16":
        return _quantize_bf16(single).tobytes()
    if name == "Q8_0":
        return _quantize_q8_0(single.reshape(-1, 32)).tobytes()
    raise ValueError(f"ckptx writes GGUF tensors as F32, F16, BF16 or Q8_0, not {name}")
