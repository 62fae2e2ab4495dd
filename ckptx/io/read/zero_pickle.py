"""Reading DeepSpeed's `.pt` files without deepspeed or torch: an allow-listing stub unpickler, and tensors as byte
ranges.

Each `*_model_states.pt` / `*_optim_states.pt` is a torch zip. Its `data.pkl` goes through the stub unpickler of
`torch_zip.py` (tensors become `TensorRef`s to storage records, nothing is loaded), extended so that the DeepSpeed
classes the pickles name become inert stand-ins and every other global the stub does not model is refused
(`ForeignGlobal`) before anything is built with it. `PickledFile` turns the references into `Partition`s
(flat runs of elements) and `Stored` tensors, each checked against its zip record and the file's size.
"""

from __future__ import annotations

import io
import math
import struct
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ckptx.dtypes import DTYPES
from ckptx.errors import ForeignGlobal, SourceError
from ckptx.files import regular_size
from ckptx.io.read import unpickle
from ckptx.io.read.state_dict import unsupported_tensor
from ckptx.io.read.torch_zip import Record, StubUnpickler, TensorRef, check_records, read_archive
from ckptx.planning.source import RawSpan
from ckptx.text import python_name, summary

__all__ = [
    "ALLOWED_GLOBALS",
    "Partition",
    "PickledFile",
    "StandIn",
    "Stored",
    "describe",
    "first_line",
    "read_pickled",
]


class StandIn:
    """Inert data for an object a DeepSpeed pickle names: the arguments it was built with and its pickled state.

    Nothing of DeepSpeed runs: building one only stores what the pickle hands over.
    """

    global_name: ClassVar[str] = ""
    args: tuple[Any, ...]
    state: Any

    def __new__(cls, *args: Any, **kwargs: Any) -> StandIn:
        obj = super().__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<{self.global_name} stand-in>"


class _Enum(int):
    """Stands in for a DeepSpeed int enum (`ZeroStageEnum(3)` is the int 3)."""

    global_name: ClassVar[str] = ""


class _Size(tuple[int, ...]):
    """Stands in for `torch.Size`: the tuple of dimensions."""


def _stand_in(base: type, module: str, name: str) -> type:
    return type(name, (base,), {"global_name": f"{module}.{name}", "__module__": __name__})


# Exactly the globals DeepSpeed's ZeRO checkpoints name beyond what the stub unpickler already models (tensor
# rebuilds, storage types, dtypes, OrderedDict). Each maps to an inert stand-in; none is ever imported.
ALLOWED_GLOBALS: Mapping[tuple[str, str], type] = {
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"): _stand_in(
        StandIn, "deepspeed.runtime.fp16.loss_scaler", "LossScaler"
    ),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"): _stand_in(
        StandIn, "deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"
    ),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"): _stand_in(
        _Enum, "deepspeed.runtime.zero.config", "ZeroStageEnum"
    ),
    ("deepspeed.utils.tensor_fragment", "fragment_address"): _stand_in(
        StandIn, "deepspeed.utils.tensor_fragment", "fragment_address"
    ),
    ("torch", "Size"): _Size,
    ("torch", "Tensor"): _stand_in(StandIn, "torch", "Tensor"),  # the type argument of _rebuild_from_type_v2
}


class _ZeroUnpickler(StubUnpickler):
    """The stub unpickler, with DeepSpeed's classes as stand-ins and every other unmodelled global refused."""

    def __init__(self, data: bytes, file: str, record: str) -> None:
        super().__init__(io.BytesIO(data))
        self._where = (file, record)

    def find_class(self, module: str, name: str) -> Any:
        allowed = ALLOWED_GLOBALS.get((module, name))
        if allowed is not None:
            return allowed
        known = len(self.unknown)
        found = super().find_class(module, name)
        if len(self.unknown) > known:
            file, record = self._where
            raise ForeignGlobal(
                file,
                python_name(module, name),
                fmt="DeepSpeed ZeRO checkpoints",
                where=record,
                advice="check where this file came from",
            )
        return found


@dataclass(frozen=True)
class PickledFile:
    """One `.pt` file read without torch: its pickled object (tensors as TensorRefs) and its storage records."""

    file: str
    obj: Any
    records: Mapping[str, Record]
    size: int

    def partition(self, ref: Any, where: str) -> Partition:
        """`ref` (a 1-D contiguous tensor of this file) as a Partition, checked against its record and the file."""
        _check_numbers(self.file, ref, where)
        if not isinstance(ref, TensorRef) or len(ref.shape) != 1 or ref.stride != (1,) and ref.shape[0] > 1:
            raise SourceError(
                f"{self.file}: {where} is {describe(ref)}, not a flat (1-D, contiguous) tensor; "
                f"the file is not a ZeRO checkpoint DeepSpeed wrote"
            )
        start, _, dtype = self._bounds(ref, where, ref.shape[0])
        return Partition(self.file, start, ref.shape[0], dtype)

    def stored(self, ref: Any, where: str) -> Stored:
        """`ref` (any strided tensor of this file) as a Stored tensor, checked against its record and the file."""
        if not isinstance(ref, TensorRef):
            raise SourceError(f"{self.file}: {where} is {describe(ref)}, not a tensor")
        _check_numbers(self.file, ref, where)
        if not ref.plain:
            raise SourceError(
                f"{self.file}: {where} carries tensor metadata (conjugate/negative bits) ckptx does "
                f"not read; convert it with zero_to_fp32.py"
            )
        if len(ref.stride) != len(ref.shape):
            raise SourceError(f"{self.file}: {where} is {describe(ref)}: its strides do not fit its shape")
        overlap = unsupported_tensor(ref)
        if overlap is not None:  # a stride-0 view: a few stored bytes that would be written out many times
            raise SourceError(f"{self.file}: {where} is {overlap}")
        numel = math.prod(ref.shape)
        extent = 0 if numel == 0 else 1 + sum((d - 1) * s for d, s in zip(ref.shape, ref.stride))
        start, _, dtype = self._bounds(ref, where, extent)
        contiguous = _row_major(ref.shape, ref.stride)
        return Stored(self.file, start, extent, dtype, ref.shape, None if contiguous else ref.stride)

    def _bounds(self, ref: TensorRef, where: str, extent: int) -> tuple[int, int, str]:
        dtype = ref.dtype
        if dtype not in DTYPES:
            raise SourceError(f"{self.file}: {where} has dtype {dtype}, which ckptx cannot read")
        record = self.records.get(ref.storage.key)
        if record is None:
            raise SourceError(
                f"{self.file}: {where} points to storage record 'data/{ref.storage.key}', which the "
                f"zip does not hold (or holds compressed); the file is damaged"
            )
        item = DTYPES[dtype].itemsize
        start, nbytes = record.offset + ref.offset * item, extent * item
        if ref.offset < 0 or ref.offset * item + nbytes > record.size:
            raise SourceError(
                f"{self.file}: {where} needs {nbytes} bytes at element {ref.offset} of record "
                f"'data/{ref.storage.key}', which holds {record.size} bytes; the partition is "
                f"truncated or the pickle does not match it"
            )
        if record.offset + record.size > self.size:
            raise SourceError(
                f"{self.file}: record 'data/{ref.storage.key}' ends at byte "
                f"{record.offset + record.size} but the file has {self.size} bytes; it is truncated"
            )
        return start, nbytes, dtype


def read_pickled(path: Path) -> PickledFile:
    """`path`'s pickle through the allow-listing stub unpickler; every failure is a one-line SourceError."""
    file = str(path)
    size = regular_size(path, file)  # a FIFO in place of a rank file would block the open forever
    try:
        with open(path, "rb", buffering=0) as f, zipfile.ZipFile(f) as archive:  # unbuffered: see torch_zip
            check_records(archive.infolist(), size, file)  # before anything is inflated
            data, records, little = read_archive(archive, f)
            record = next(i.filename for i in archive.infolist() if i.filename.endswith("/data.pkl"))
    except FileNotFoundError:
        raise SourceError(f"{file}: no such file") from None
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        ValueError,
        OSError,
        EOFError,
        KeyError,
        struct.error,
        NotImplementedError,
        OverflowError,
    ) as exc:
        raise SourceError(
            f"{file}: not a readable torch zip file ({first_line(exc)}); it is truncated or "
            f"damaged: copy it again from where training wrote it"
        ) from None
    if not little:
        raise SourceError(f"{file}: its storages are big-endian; ckptx reads little-endian checkpoints only")
    unpickler = _ZeroUnpickler(data, file, record)
    try:
        obj = unpickle.load(unpickler.load, unpickle.nesting_bound(data), file, lambda: io.BytesIO(data))
    except SourceError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged pickle raises anything; report it as one line
        raise SourceError(
            f"{file}: {record} is not a readable pickle ({type(exc).__name__}: {first_line(exc)}); the file is damaged"
        ) from None
    if unpickler.unknown:
        raise SourceError(f"{file}: {record} uses {unpickler.unknown[0]}, which a torch checkpoint never holds")
    if not isinstance(obj, dict):
        raise SourceError(f"{file}: holds a {type(obj).__name__}, not the dict DeepSpeed saves")
    return PickledFile(file, obj, records, size)


_INT64 = 2**63 - 1


def _check_numbers(file: str, ref: Any, where: str) -> None:
    """A tensor's offset, sizes and strides lie in [0, 2^63) (torch's int64), so that no later sum or message
    works with a negative or a 5000-digit number."""
    if isinstance(ref, TensorRef) and not all(0 <= n <= _INT64 for n in (ref.offset, *ref.shape, *ref.stride)):
        raise SourceError(
            f"{file}: {where} has a size, stride or offset that is negative or beyond int64; the file is corrupt"
        )


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def describe(value: Any) -> str:
    """What a pickled value is, for messages: `a float32 tensor of shape [3] with strides [1]`, `a dict`."""
    if isinstance(value, TensorRef):
        return f"a {value.dtype} tensor of shape {_numbers(value.shape)} with strides {_numbers(value.stride)}"
    return summary(value)


def _numbers(values: Sequence[int]) -> str:
    """`[3, 4]`; a huge number (a 5000-digit LONG4 has no printable repr) by its size."""
    return "[" + ", ".join(str(n) if abs(n) < 2**70 else f"<{n.bit_length()}-bit number>" for n in values) + "]"


def _row_major(shape: Sequence[int], stride: Sequence[int]) -> bool:
    expected = 1
    for size, step in zip(reversed(shape), reversed(stride)):
        if size != 1 and step != expected:
            return False
        expected *= size
    return True


@dataclass(frozen=True)
class Partition:
    """A flat run of `numel` elements of `dtype` starting at byte `start` of `file`."""

    file: str
    start: int
    numel: int
    dtype: str

    def span(self, first: int, count: int) -> RawSpan:
        """The bytes of elements [first, first + count) of this partition."""
        item = DTYPES[self.dtype].itemsize
        return RawSpan(self.file, self.start + first * item, count * item)


@dataclass(frozen=True)
class Stored:
    """A tensor stored whole in a model-states file (a buffer, a ZeRO-2 frozen parameter); `stride` if not row-major."""

    file: str
    start: int
    extent: int
    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...] | None

    def spans(self) -> tuple[RawSpan, ...]:
        """The bytes that hold it (for a strided tensor, the range its elements lie in)."""
        return (Partition(self.file, self.start, self.extent, self.dtype).span(0, self.extent),) if self.extent else ()
