"""The one dtype table: every dtype ckptx reads or writes, with its name in each format it meets.

Readers, writers, the cast kernel, the invert rules and the rule schema all look dtypes up here, so a dtype is
either known everywhere or refused everywhere with the same message. No torch at import time: a torch dtype
object is looked up by name when asked for (`DType.torch`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ckptx.errors import UnsupportedDtype

__all__ = [
    "DTYPES",
    "DType",
    "TensorMeta",
    "UnsupportedDtype",
    "dtype_name",
    "from_safetensors",
    "from_storage",
    "lookup",
    "lossless_casts",
    "safetensors_code",
    "torch_dtype",
]


@dataclass(frozen=True)
class DType:
    """One dtype: torch's name (`float32`), its size, its kind, and how each format names it.

    `digits`/`emax`/`emin` describe the values a floating type holds exactly (significand bits with the
    implicit one, largest and smallest binary exponent including subnormals); `bits`/`signed` an integer's range.
    They decide which casts lose nothing (`lossless_casts`).
    """

    name: str
    itemsize: int
    kind: str  # "float", "complex", "int", "bool", or "bits" (raw or packed: never cast or computed on)
    safetensors: str | None = None  # the header's code, when safetensors (the Python library) holds it
    storage: str | None = None  # torch.save's legacy storage class; None: UntypedStorage plus the dtype
    numpy: str | None = None  # little-endian numpy code, when numpy has the type
    digits: int = 0
    emax: int = 0
    emin: int = 0
    bits: int = 0
    signed: bool = False
    finite: bool = False  # no infinities (the float8 `fn`/`fnuz`/`fnu` types)
    no_negative_zero: bool = False  # `fnuz`/`fnu`: the sign bit pattern of -0.0 is NaN (or there is no sign)

    @property
    def is_floating(self) -> bool:
        """A real floating-point type."""
        return self.kind == "float"

    @property
    def castable(self) -> bool:
        """A `cast` step may convert to and from it (every kind but raw bits); the rule schema lists these."""
        return self.kind != "bits"

    @property
    def is_complex(self) -> bool:
        """A complex type."""
        return self.kind == "complex"

    @property
    def is_integer(self) -> bool:
        """An integer type (bool excluded)."""
        return self.kind == "int"

    @property
    def torch(self) -> Any:
        """The torch dtype object (imports torch)."""
        import torch

        return getattr(torch, self.name)


def _float(
    name: str, size: int, code: str | None, storage: str | None, numpy: str | None, digits: int, emax: int, emin: int
) -> DType:
    finite, unsigned_zero = name.endswith(("fn", "fnuz", "fnu")), name.endswith(("fnuz", "fnu"))
    return DType(
        name,
        size,
        "float",
        code,
        storage,
        numpy,
        digits=digits,
        emax=emax,
        emin=emin,
        finite=finite,
        no_negative_zero=unsigned_zero,
    )


def _int(name: str, size: int, code: str, storage: str | None, signed: bool) -> DType:
    return DType(name, size, "int", code, storage, f"<{'i' if signed else 'u'}{size}", bits=8 * size, signed=signed)


_TABLE = (
    _float("float64", 8, "F64", "DoubleStorage", "<f8", 53, 1024, -1074),
    _float("float32", 4, "F32", "FloatStorage", "<f4", 24, 128, -149),
    _float("float16", 2, "F16", "HalfStorage", "<f2", 11, 16, -24),
    _float("bfloat16", 2, "BF16", "BFloat16Storage", None, 8, 128, -133),
    _float("float8_e4m3fn", 1, "F8_E4M3", None, None, 4, 9, -9),
    _float("float8_e5m2", 1, "F8_E5M2", None, None, 3, 16, -16),
    _float("float8_e4m3fnuz", 1, "F8_E4M3FNUZ", None, None, 4, 8, -10),
    _float("float8_e5m2fnuz", 1, "F8_E5M2FNUZ", None, None, 3, 16, -17),
    _float("float8_e8m0fnu", 1, None, None, None, 1, 128, -127),
    DType("complex32", 4, "complex", None, None, None, digits=11, emax=16, emin=-24),
    DType("complex64", 8, "complex", "C64", "ComplexFloatStorage", "<c8", digits=24, emax=128, emin=-149),
    DType("complex128", 16, "complex", None, "ComplexDoubleStorage", "<c16", digits=53, emax=1024, emin=-1074),
    _int("int64", 8, "I64", "LongStorage", True),
    _int("int32", 4, "I32", "IntStorage", True),
    _int("int16", 2, "I16", "ShortStorage", True),
    _int("int8", 1, "I8", "CharStorage", True),
    _int("uint64", 8, "U64", None, False),
    _int("uint32", 4, "U32", None, False),
    _int("uint16", 2, "U16", None, False),
    _int("uint8", 1, "U8", "ByteStorage", False),
    DType("bool", 1, "bool", "BOOL", "BoolStorage", "?", bits=1),
    DType("bcomplex32", 4, "complex", digits=8, emax=128, emin=-133),
    # Raw bits and packed sub-byte types: stored, copied and written as they are, never cast or computed on.
    DType("float4_e2m1fn_x2", 1, "bits"),
    DType("bits8", 1, "bits"),
    DType("bits16", 2, "bits"),
    DType("bits1x8", 1, "bits"),
    DType("bits2x4", 1, "bits"),
    DType("bits4x2", 1, "bits"),
)

DTYPES: dict[str, DType] = {d.name: d for d in _TABLE}
_BY_SAFETENSORS = {d.safetensors: d for d in _TABLE if d.safetensors}
_BY_STORAGE = {d.storage: d for d in _TABLE if d.storage}


def lookup(name: str, *, key: str = "", where: str = "") -> DType:
    """The table's entry for a torch dtype name; UnsupportedDtype (naming `key` and `where`) if it has none."""
    found = DTYPES.get(name)
    if found is None:
        place = f"tensor '{key}'" if key else "a tensor"
        source = f"{where}: " if where else ""
        raise UnsupportedDtype(
            f"{source}{place} has dtype {name}, which ckptx cannot convert (quantized, sparse-bit "
            f"or unknown); supported: {', '.join(DTYPES)}"
        )
    return found


def safetensors_code(name: str, *, key: str = "", where: str = "") -> str:
    """The safetensors code of a dtype; UnsupportedDtype naming the key when safetensors cannot hold it."""
    code = lookup(name, key=key, where=where).safetensors
    if code is None:
        source = f"{where}: " if where else ""
        raise UnsupportedDtype(
            f"{source}tensor '{key}' has dtype {name}, which safetensors cannot hold; write a "
            f".pth file instead, or add a `cast` step"
        )
    return code


def from_safetensors(code: str) -> DType | None:
    """The dtype of a safetensors header code, or None for an unknown code."""
    return _BY_SAFETENSORS.get(code)


def from_storage(class_name: str) -> DType | None:
    """The dtype of a legacy torch storage class name (`FloatStorage`), or None."""
    return _BY_STORAGE.get(class_name)


def dtype_name(dtype: Any) -> str:
    """`torch.float32` -> `float32`."""
    return str(dtype).removeprefix("torch.")


def torch_dtype(name: str) -> Any:
    """`float32` -> `torch.float32` (imports torch)."""
    return lookup(name).torch


def _holds(wide: DType, narrow: DType) -> bool:
    """Every value of `narrow` is a value of `wide`."""
    if wide.name == "float8_e8m0fnu":  # powers of two only: no zero, no sign
        return False
    if narrow.kind == "bool":
        return wide.kind in ("int", "float")
    if narrow.kind == "int":
        magnitude_bits = narrow.bits - narrow.signed
        if wide.kind == "int":
            return wide.bits - wide.signed >= magnitude_bits and (wide.signed or not narrow.signed)
        return wide.kind == "float" and wide.digits >= magnitude_bits
    if narrow.kind != wide.kind or narrow.kind not in ("float", "complex"):
        return False
    if wide.finite and not narrow.finite or wide.no_negative_zero and not narrow.no_negative_zero:
        return False
    return wide.digits >= narrow.digits and wide.emax >= narrow.emax and wide.emin <= narrow.emin


def lossless_casts(name: str) -> frozenset[str]:
    """The dtypes that hold every value of `name` (so a cast to them can be undone exactly)."""
    narrow = DTYPES.get(name)
    if narrow is None:
        return frozenset()
    return frozenset(d.name for d in _TABLE if d is not narrow and _holds(d, narrow))


@dataclass(frozen=True)
class TensorMeta:
    """What the plan knows about a tensor without reading it: shape and dtype name (torch's, e.g. `float32`)."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes (UnsupportedDtype for a dtype the table lacks)."""
        return self.numel * lookup(self.dtype).itemsize

    def __str__(self) -> str:
        return f"{self.dtype}{list(self.shape)}"
