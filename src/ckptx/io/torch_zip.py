"""Torch zip checkpoints as a lazy source whose unchanged tensors can be byte-copied from the file.

`torch.save` stores each storage uncompressed as the zip record `<archive>/data/<key>`. Which storage a
tensor views, and where in it, is written in `data.pkl`: a stub unpickler (it imports nothing and runs
nothing) reads those references, the zip local headers give each record's file offset, and the tensors
torch itself loaded (memory-mapped) must agree on shape, strides, offset and mapped address before any
span is trusted. A span is returned only when it is exactly the tensor's little-endian row-major bytes.
"""

from __future__ import annotations

import io
import pickle
import struct
import sys
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ckptx._lazy import lazy_module
from ckptx.io.source import MappingSource, RawSpan, extract
from ckptx.io.spans import read_span

torch = lazy_module("torch")


_LOCAL_HEADER = struct.Struct("<4s5HL2L2H")
_LOCAL_SIGNATURE = b"PK\x03\x04"


@dataclass(frozen=True)
class StorageRef:
    """A storage as `data.pkl` names it: its record key."""

    key: str


@dataclass(frozen=True)
class TensorRef:
    """A tensor as `data.pkl` describes it: storage, element offset, size and stride."""

    storage: StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    plain: bool


@dataclass(frozen=True)
class Record:
    """Where one zip record's bytes lie in the file."""

    offset: int
    size: int


class _Opaque(dict):  # type: ignore[type-arg]
    """Stands in for any object the stub unpickler does not model; keeps dict items so paths can go through it."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "_Opaque":
        return dict.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()

    def __call__(self, *args: Any, **kwargs: Any) -> "_Opaque":
        return _Opaque()

    def __setstate__(self, state: Any) -> None:
        pass

    def append(self, item: Any) -> None:
        """Ignored (lists of unknown type)."""

    def extend(self, items: Any) -> None:
        """Ignored (lists of unknown type)."""


def _tensor(storage: Any, offset: Any, size: Any, stride: Any, *rest: Any, metadata: Any = None) -> Any:
    if not isinstance(storage, StorageRef) or not isinstance(size, tuple) or not isinstance(stride, tuple):
        return _Opaque()
    return TensorRef(storage, int(offset), tuple(int(d) for d in size), tuple(int(s) for s in stride), not metadata)


def _tensor_v2(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False, hooks: Any = None,
               metadata: Any = None) -> Any:
    return _tensor(storage, offset, size, stride, metadata=metadata)


def _tensor_v3(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False, hooks: Any = None,
               dtype: Any = None, metadata: Any = None) -> Any:
    return _tensor(storage, offset, size, stride, metadata=metadata)


def _first(data: Any, *rest: Any) -> Any:
    return data


def _from_type(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    return func(*args) if callable(func) and isinstance(args, tuple) else _Opaque()


_KNOWN: dict[tuple[str, str], Callable[..., Any]] = {
    ("torch._utils", "_rebuild_tensor"): _tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _first,
    ("torch._utils", "_rebuild_parameter_with_state"): _first,
    ("torch._tensor", "_rebuild_from_type_v2"): _from_type,
    ("collections", "OrderedDict"): OrderedDict,
}


class _StubUnpickler(pickle.Unpickler):
    """Unpickles `data.pkl` into dicts, lists and TensorRefs; every other global becomes an inert `_Opaque`."""

    def find_class(self, module: str, name: str) -> Any:
        return _KNOWN.get((module, name), _Opaque)

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage"):
            key = pid[2].decode("ascii") if isinstance(pid[2], bytes) else str(pid[2])
            return StorageRef(key)
        return _Opaque()


def zip_spans(path: str, found_at: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, RawSpan]:
    """Raw spans of the memory-mapped `tensors` (the state dict at `found_at` of torch zip file `path`).

    Best effort: a tensor gets no span when anything disagrees or is unknown; a file whose references
    cannot be read gets none at all (its tensors are then read through torch as before).
    """
    try:
        with zipfile.ZipFile(path) as archive:
            pickled, records, little = _read_archive(archive, path)
        refs, _ = extract(_StubUnpickler(io.BytesIO(pickled)).load(), [found_at], file=path)
    except Exception:  # noqa: BLE001 - best effort: without references the tensors are read through torch
        return {}
    if not little:
        return {}
    spans: dict[str, RawSpan] = {}
    bases = set()
    for key, tensor in tensors.items():
        ref = refs.get(key)
        record = records.get(ref.storage.key) if isinstance(ref, TensorRef) else None
        if record is None or not _agrees(ref, tensor):
            continue
        start = record.offset + ref.offset * tensor.element_size()
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes == 0 or start + nbytes > record.offset + record.size:
            continue
        bases.add(tensor.untyped_storage().data_ptr() - record.offset)
        spans[key] = RawSpan(path, start, nbytes)
    # Every storage torch mapped is a slice of one map of the whole file: one common base, or no trust.
    return spans if len(bases) == 1 else {}


def _agrees(ref: TensorRef, tensor: torch.Tensor) -> bool:
    """The pickle's description matches the tensor torch built, and its bytes are plain row-major ones."""
    return (ref.plain and type(tensor) in (torch.Tensor, torch.nn.Parameter) and tensor.layout == torch.strided
            and tuple(tensor.shape) == ref.size and tuple(tensor.stride()) == ref.stride
            and tensor.storage_offset() == ref.offset and tensor.is_contiguous()
            and not tensor.is_conj() and not tensor.is_neg() and tensor.device.type == "cpu")


def _read_archive(archive: zipfile.ZipFile, path: str) -> tuple[bytes, dict[str, Record], bool]:
    """`data.pkl`, the stored `data/<key>` records by key, and whether the storages are little-endian."""
    infos = archive.infolist()
    pickles = [i for i in infos if i.filename.count("/") == 1 and i.filename.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise ValueError("not one data.pkl")
    prefix = pickles[0].filename[: -len("data.pkl")]
    order = next((i for i in infos if i.filename == prefix + "byteorder"), None)
    byteorder = archive.read(order).decode("ascii").strip() if order else sys.byteorder
    records = {}
    with open(path, "rb") as f:
        for info in infos:
            name = info.filename
            if name.startswith(prefix + "data/") and info.compress_type == zipfile.ZIP_STORED:
                records[name[len(prefix) + 5:]] = Record(_data_offset(f, info), info.file_size)
    return archive.read(pickles[0]), records, byteorder == "little"


def _data_offset(f: Any, info: zipfile.ZipInfo) -> int:
    """Where a record's bytes start: after its local header, whose name and extra lengths may differ from the directory's."""
    f.seek(info.header_offset)
    fields = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
    if fields[0] != _LOCAL_SIGNATURE:
        raise ValueError(f"no local header at {info.header_offset}")
    name_len, extra_len = fields[-2], fields[-1]
    return info.header_offset + _LOCAL_HEADER.size + name_len + extra_len


class TorchZipSource(MappingSource):
    """A memory-mapped torch zip checkpoint whose plain tensors also have raw spans in the file.

    Spans are worked out on first use. `load` of a spanned tensor reads its bytes with pread into new
    memory rather than touching the map, so resident memory does not grow with every tensor read.
    """

    def __init__(self, file: str, display: str, state: Mapping[str, Any], *, extracted_from: str,
                 top_level: Mapping[str, str], keep_alive: Any) -> None:
        super().__init__(display, "torch-zip", state, extracted_from=extracted_from, top_level=top_level,
                         keep_alive=keep_alive)
        self._file = file
        self._spans: dict[str, RawSpan] | None = None

    def raw_span(self, key: str) -> RawSpan | None:
        """Where `key`'s bytes lie in the zip file, when they can be copied as they are."""
        if self._spans is None:
            self._spans = zip_spans(self._file, self.extracted_from, self._state)
        return self._spans.get(key)

    def load(self, key: str) -> torch.Tensor:
        """The tensor: read from its span into new memory when it has one, else the memory-mapped tensor."""
        span = self.raw_span(key)
        return read_span(span, self.tensors[key]) if span is not None else super().load(key)
