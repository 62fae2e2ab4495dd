"""SHA-256 and summary statistics of a tensor's bytes, computed chunk by chunk in bounded memory, without torch.

`TensorDigest` takes the bytes of one tensor as they are stored (little-endian, row-major) in pieces of any length
and gives their SHA-256 and `TensorStats`: element count, mean, standard deviation, min and max over the finite
values, and counts of zeros, NaNs and infinities. Floats of every width (float16, bfloat16 and the float8 types
are decoded with numpy: bfloat16 by a shift, float8 through a table), integers and bool are summarised; complex
tensors over their real and imaginary parts taken as separate values; raw-bit types get a hash and no statistics.

Statistics accumulate in float64 and merge (Chan's formula), so pieces of one tensor may be summarised on
different threads (`Moments.merge`) and partial results combined later; every result is a frozen, picklable value.
Sums of values and of squares are taken in float64 (a float32 square is exact there); a chunk whose mean dwarfs
its spread, or of float64 or integer values, is centred on its mean first, so its variance keeps its digits.
Measured on this machine (2 cores shared, load 8): statistics 0.42 GB/s of float32 per thread, SHA-256 0.6-1.1 GB/s.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckptx._lazy import lazy_module
from ckptx.dtypes import DTYPES

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
else:
    np = lazy_module("numpy")

__all__ = ["STATS_CHUNK", "Moments", "TensorDigest", "TensorStats", "TensorSummary", "decode"]

STATS_CHUNK = 1024 * 1024  # bytes summarised at once: numpy's temporaries stay in the cache (measured 2-3x faster
# than 8 MiB pieces for float32 on this machine)


@dataclass(frozen=True)
class TensorStats:
    """Summary statistics of a tensor's values: mean, std (population), min and max over its finite values (None
    when it has none), and counts of all elements, zeros, NaNs and infinities."""

    count: int
    mean: float | None
    std: float | None
    min: float | None
    max: float | None
    zeros: int
    nan: int
    inf: int

    @property
    def finite(self) -> int:
        """Elements that are neither NaN nor infinite."""
        return self.count - self.nan - self.inf

    @property
    def all_zero(self) -> bool:
        """Every element is zero (an empty tensor is not)."""
        return self.count > 0 and self.zeros == self.count

    @property
    def constant(self) -> bool:
        """Every element has the same finite value (an empty tensor is not constant)."""
        return self.count > 0 and self.finite == self.count and self.min == self.max

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (the card's `stats`)."""
        return {
            "count": self.count,
            "mean": self.mean,
            "std": self.std,
            "min": self.min,
            "max": self.max,
            "zeros": self.zeros,
            "nan": self.nan,
            "inf": self.inf,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorStats:
        """The inverse of `to_dict`."""
        return cls(
            int(data["count"]),
            _number(data.get("mean")),
            _number(data.get("std")),
            _number(data.get("min")),
            _number(data.get("max")),
            int(data["zeros"]),
            int(data["nan"]),
            int(data["inf"]),
        )


def _number(value: Any) -> float | None:
    return None if value is None else float(value)


@dataclass(frozen=True)
class Moments:
    """Mergeable running statistics: counts, and mean and sum of squared deviations over the finite values."""

    count: int = 0
    finite: int = 0
    mean: float = 0.0
    m2: float = 0.0
    low: float = math.inf
    high: float = -math.inf
    zeros: int = 0
    nan: int = 0
    inf: int = 0

    def merge(self, other: Moments) -> Moments:
        """The statistics of both sets of values together (Chan et al.'s pairwise update)."""
        n = self.finite + other.finite
        if n == 0:
            mean, m2 = 0.0, 0.0
        else:
            delta = other.mean - self.mean
            mean = self.mean + delta * other.finite / n
            m2 = self.m2 + other.m2 + delta * delta * self.finite * other.finite / n
        return Moments(
            self.count + other.count,
            n,
            mean,
            m2,
            min(self.low, other.low),
            max(self.high, other.high),
            self.zeros + other.zeros,
            self.nan + other.nan,
            self.inf + other.inf,
        )

    def stats(self, integral: bool = False) -> TensorStats:
        """The summary; `integral` gives min and max as whole numbers (integer and bool tensors)."""
        if self.finite == 0:
            return TensorStats(self.count, None, None, None, None, self.zeros, self.nan, self.inf)
        low, high = (float(int(self.low)), float(int(self.high))) if integral else (self.low, self.high)
        std = math.sqrt(max(self.m2, 0.0) / self.finite)
        return TensorStats(self.count, self.mean, std, low, high, self.zeros, self.nan, self.inf)


def summarize(values: Any) -> Moments:
    """The moments of a 1-D numpy array of numbers (float32, float64, or any integer type)."""
    n = int(values.size)
    if n == 0:
        return Moments()
    floating = values.dtype.kind == "f"
    if not floating:
        values = values.astype(np.float64)
    zeros = n - int(np.count_nonzero(values))
    low, high = np.minimum.reduce(values), np.maximum.reduce(values)
    nan = inf = 0
    if floating and not (math.isfinite(low) and math.isfinite(high)):
        nan_mask = np.isnan(values)
        inf_mask = np.isinf(values)
        nan, inf = int(np.count_nonzero(nan_mask)), int(np.count_nonzero(inf_mask))
        values = values[~(nan_mask | inf_mask)]
        if values.size == 0:
            return Moments(n, 0, 0.0, 0.0, math.inf, -math.inf, zeros, nan, inf)
        low, high = np.minimum.reduce(values), np.maximum.reduce(values)
    finite = int(values.size)
    # Raw moments first: a float32 (or float16/bfloat16) value squared in float64 is exact, so only the sums round.
    # Measured: 1.6x the speed of centring first. Centred in float64 when the mean dwarfs the spread (the raw
    # second moment would then cancel).
    shift = 0.0
    s1 = float(np.add.reduce(values, dtype=np.float64))
    s2 = float(np.einsum("i,i->", values, values, dtype=np.float64))
    if values.dtype != np.float32 or s2 * finite > 1e6 * max(s2 * finite - s1 * s1, 0.0):
        shift = s1 / finite
        wide = values.astype(np.float64)  # a copy: the input may be a read-only view of file bytes
        wide -= shift
        s1 = float(np.add.reduce(wide))
        np.square(wide, out=wide)
        s2 = float(np.add.reduce(wide))
    mean = float(shift) + s1 / finite
    m2 = max(s2 - s1 * s1 / finite, 0.0)
    return Moments(n, finite, mean, m2, float(low), float(high), zeros, nan, inf)


# --- decoding little-endian bytes to numbers ------------------------------------------------------------------

_NATIVE = {
    "float64": "<f8",
    "float32": "<f4",
    "float16": "<f2",
    "int64": "<i8",
    "int32": "<i4",
    "int16": "<i2",
    "int8": "i1",
    "uint64": "<u8",
    "uint32": "<u4",
    "uint16": "<u2",
    "uint8": "u1",
    "bool": "u1",
}
_COMPONENTS = {"complex128": "float64", "complex64": "float32", "complex32": "float16", "bcomplex32": "bfloat16"}
_FLOAT8 = {  # name: (exponent bits, mantissa bits, bias, kind of special values)
    "float8_e4m3fn": (4, 3, 7, "fn"),
    "float8_e5m2": (5, 2, 15, "ieee"),
    "float8_e4m3fnuz": (4, 3, 8, "fnuz"),
    "float8_e5m2fnuz": (5, 2, 16, "fnuz"),
}
_TABLES: dict[str, Any] = {}


def component_dtype(dtype: str) -> str | None:
    """The dtype whose elements `decode` gives for `dtype` (a complex type's parts), or None for raw bits."""
    if dtype in _COMPONENTS:
        return _COMPONENTS[dtype]
    info = DTYPES.get(dtype)
    return None if info is None or info.kind == "bits" else dtype


def decode(data: Any, dtype: str) -> Any:
    """Whole elements of `dtype` in little-endian bytes as a numpy array of numbers (float32 for floats up to 32
    bits, float64 for float64, the integer type for integers, uint8 for bool; complex as its parts), or None for
    a type without numbers (raw bits)."""
    dtype = _COMPONENTS.get(dtype, dtype)
    code = _NATIVE.get(dtype)
    if code is not None:
        values = np.frombuffer(data, dtype=code)
        return values.astype(np.float32) if dtype == "float16" else values
    if dtype == "bfloat16":
        return (np.frombuffer(data, dtype="<u2").astype("<u4") << 16).view("<f4")
    table = _float8_table(dtype)
    if table is None:
        return None
    return table[np.frombuffer(data, dtype="u1")]


def _float8_table(dtype: str) -> Any:
    """The 256 values of a float8 type as float32 (None for a type that is not float8)."""
    if dtype in _TABLES:
        return _TABLES[dtype]
    if dtype == "float8_e8m0fnu":
        codes = np.arange(256, dtype=np.float64)
        table = np.exp2(codes - 127)
        table[255] = np.nan
    elif dtype in _FLOAT8:
        table = np.array([_float8_value(code, *_FLOAT8[dtype]) for code in range(256)], dtype=np.float64)
    else:
        return None
    _TABLES[dtype] = table.astype(np.float32)
    return _TABLES[dtype]


def _float8_value(code: int, exp_bits: int, man_bits: int, bias: int, kind: str) -> float:
    sign = -1.0 if code & 0x80 else 1.0
    exponent = (code >> man_bits) & ((1 << exp_bits) - 1)
    mantissa = code & ((1 << man_bits) - 1)
    top = (1 << exp_bits) - 1
    if kind == "fnuz" and code == 0x80:
        return math.nan
    if kind == "fn" and exponent == top and mantissa == (1 << man_bits) - 1:
        return math.nan
    if kind == "ieee" and exponent == top:
        return sign * math.inf if mantissa == 0 else math.nan
    if exponent == 0:
        return sign * mantissa / (1 << man_bits) * 2.0 ** (1 - bias)
    return sign * (1 + mantissa / (1 << man_bits)) * 2.0 ** (exponent - bias)


# --- one tensor's bytes, in pieces ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSummary:
    """What the bytes of one tensor hash and summarise to."""

    sha256: str
    nbytes: int
    stats: TensorStats | None


class TensorDigest:
    """SHA-256 and statistics of one tensor's bytes, fed in pieces of any length with `update`.

    `hash_only` or `stats_only` leave out the other half (e.g. when threads share the work of one big tensor:
    one hashes the whole, others summarise pieces and `Moments.merge` them).
    """

    def __init__(self, dtype: str, *, hash_only: bool = False, stats_only: bool = False) -> None:
        self.dtype = dtype
        self._sha = None if stats_only else hashlib.sha256()
        part = None if hash_only else component_dtype(dtype)
        self._item = DTYPES[part].itemsize if part is not None else 0
        self._moments: Moments | None = Moments() if part is not None else None
        self._pending = bytearray()
        self._nbytes = 0

    def update(self, data: Any) -> None:
        """Add the next bytes of the tensor."""
        view = memoryview(data).cast("B")
        self._nbytes += len(view)
        if self._sha is not None:
            self._sha.update(view)
        if self._moments is None:
            return
        if self._pending:
            taken = view[: STATS_CHUNK - len(self._pending)]
            self._pending += taken
            view = view[len(taken) :]
            if len(self._pending) < STATS_CHUNK:
                return
            self._add(self._pending)
            self._pending = bytearray()
        whole = len(view) - len(view) % STATS_CHUNK
        for start in range(0, whole, STATS_CHUNK):
            self._add(view[start : start + STATS_CHUNK])
        self._pending = bytearray(view[whole:])

    def _add(self, data: Any) -> None:
        assert self._moments is not None
        self._moments = self._moments.merge(summarize(decode(data, self.dtype)))

    @property
    def moments(self) -> Moments | None:
        """The statistics of everything fed (None when not computed). Values are summarised in blocks of STATS_CHUNK
        bytes counted from the tensor's first byte, merged in order, whatever the pieces `update` was given: the
        float64 sums, and so the statistics to the last digit, do not depend on how the bytes were cut."""
        if self._moments is None:
            return None
        tail = len(self._pending) - len(self._pending) % self._item
        return self._moments.merge(summarize(decode(self._pending[:tail], self.dtype))) if tail else self._moments

    def summary(self) -> TensorSummary:
        """The hash (empty when not computed) and statistics of everything fed."""
        stats = None
        moments = self.moments
        if moments is not None:
            stats = moments.stats(integral=DTYPES[self.dtype].kind in ("int", "bool"))
        return TensorSummary(self._sha.hexdigest() if self._sha is not None else "", self._nbytes, stats)
