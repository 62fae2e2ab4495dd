"""Torch zip checkpoints as a lazy source whose unchanged tensors can be byte-copied from the file.

`torch.save` stores each storage uncompressed as the zip record `<archive>/data/<key>`. Which storage a
tensor views, and where in it, is written in `data.pkl`: a stub unpickler (it imports nothing and runs
nothing) reads those references, and the zip local headers give each record's file offset. A span is
returned only when it is exactly the tensor's little-endian row-major bytes.

Two ways in. When `data.pkl` holds nothing but containers, numbers, strings and tensors (the usual state
dict), `open_zip_without_torch` builds the source from those references alone: torch is never imported
until an op needs a tensor. Otherwise torch loads the file (safe globals, `--allow-global`) memory-mapped,
and its tensors must agree with the references on shape, strides, offset and mapped address before any
span is trusted (`TorchZipSource`).
"""

from __future__ import annotations

import io
import math
import pickle
import struct
import sys
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, ClassVar

from ckptx._lazy import lazy_module
from ckptx.dtypes import DTYPES, dtype_name, from_storage
from ckptx.errors import SourceError
from ckptx.io.read import unpickle
from ckptx.io.read.state_dict import MappingSource, extract, top_level_of
from ckptx.io.spans import read_span
from ckptx.planning.source import RawSpan
from ckptx.text import python_name, quoted

if TYPE_CHECKING:  # pragma: no cover
    import torch
else:
    torch = lazy_module("torch")


_LOCAL_HEADER = struct.Struct("<4s5HL2L2H")
_LOCAL_SIGNATURE = b"PK\x03\x04"
MAX_INFLATE_RATIO = (
    100  # torch.save stores records uncompressed; a re-zipped checkpoint of real weights stays far below
)
_SMALL_RECORD = 1 << 20  # records that inflate to less than this are never a memory problem
_INT64 = 2**63 - 1


def check_archive(path: Path, display: str) -> None:
    """Refuse a zip archive that torch and Python's zipfile could read differently, or that inflates to far more
    than it stores: data before the archive (a pickle with a zip appended), two records of one name, records
    past the end of the file, and compressed records that inflate more than MAX_INFLATE_RATIO times (a 1.5 MB
    `data.pkl` that becomes gigabytes). Nothing is inflated here; torch.load is called only after this."""
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        struct.error,
        ValueError,
        EOFError,
        NotImplementedError,
        OverflowError,
    ) as exc:
        raise SourceError(
            f"{display}: not a readable torch checkpoint: the zip archive is truncated or corrupt "
            f"({exc}); download or save it again"
        ) from None
    check_records(infos, size, display)


def check_records(infos: Sequence[zipfile.ZipInfo], size: int, display: str) -> None:
    """`check_archive`'s rules for the records of an archive of `size` bytes that is already open (a DeepSpeed
    `.pt` file, a torch.save archive inside a DCP file): every archive ckptx reads is held to them before any
    record is inflated."""
    if not infos or min(i.header_offset for i in infos) != 0:
        raise SourceError(
            f"{display}: not a readable torch checkpoint: the zip directory does not start at byte 0 "
            f"(data before the archive, or another archive appended); save it again with torch.save"
        )
    twice = _repeated(i.filename for i in infos)
    if twice is not None:
        raise SourceError(
            f"{display}: not a readable torch checkpoint: the zip archive holds two records named "
            f"{quoted(twice)}; readers disagree on which one counts: save it again with torch.save"
        )
    for info in infos:
        _check_record(info, size, display)


def _repeated(names: Iterable[str]) -> str | None:
    """The first name that appears a second time, in one pass."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            return name
        seen.add(name)
    return None


def _check_record(info: zipfile.ZipInfo, size: int, display: str) -> None:
    name = quoted(info.filename)
    if info.header_offset + info.compress_size > size:
        raise SourceError(
            f"{display}: not a readable torch checkpoint: zip record {name} at byte "
            f"{info.header_offset} runs past the end of the file ({size} bytes): it is truncated"
        )
    if info.compress_type == zipfile.ZIP_STORED:
        if info.file_size != info.compress_size:
            raise SourceError(
                f"{display}: not a readable torch checkpoint: stored zip record {name} at byte "
                f"{info.header_offset} says {info.file_size} bytes but holds {info.compress_size}"
            )
        return
    if info.file_size > _SMALL_RECORD and info.file_size > MAX_INFLATE_RATIO * info.compress_size:
        raise SourceError(
            f"{display}: compressed zip record {name} at byte {info.header_offset} would inflate "
            f"{info.compress_size:,} bytes to {info.file_size:,}, more than {MAX_INFLATE_RATIO} times; "
            f"torch.save never compresses: refused as a decompression bomb (re-save it with torch.save "
            f"if you trust it)"
        )


# torch.save names a storage by its legacy typed class (torch/storage.py `_dtype_to_storage_type_map`, the
# table's `storage` column); dtypes without one are saved as `torch.storage.UntypedStorage` bytes with the dtype
# given to `_rebuild_tensor_v3`.
def _storage_dtype(module: str, name: str) -> str | None:
    if (module, name) == ("torch.storage", "UntypedStorage"):
        return "uint8"
    found = from_storage(name) if module == "torch" else None
    return found.name if found else None


@dataclass(frozen=True)
class _DtypeGlobal:
    """A global that stands for a dtype, as the stub unpickler sees it: a storage type (`torch.FloatStorage`)
    or a dtype (`torch.float8_e4m3fn`, the dtype argument of `_rebuild_tensor_v3`)."""

    dtype: str


@dataclass(frozen=True)
class StorageRef:
    """A storage as `data.pkl` names it: its record key and, when known, its dtype."""

    key: str
    dtype: str | None = None


@dataclass(frozen=True)
class TensorRef:
    """A tensor as `data.pkl` describes it: storage, element offset, size and stride."""

    is_tensor_ref: ClassVar[bool] = True

    storage: StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    plain: bool
    explicit_dtype: str | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """The tensor's shape."""
        return self.size

    @property
    def dtype(self) -> str | None:
        """The dtype name (`float32`), from `_rebuild_tensor_v3` or else the storage type; None if unknown."""
        return self.explicit_dtype or self.storage.dtype


@dataclass(frozen=True)
class Record:
    """Where one zip record's bytes lie in the file."""

    offset: int
    size: int


class _Opaque(dict[Any, Any]):
    """Stands in for any object the stub unpickler does not model; keeps dict items so paths can go through it."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Opaque:
        return dict.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()

    def __call__(self, *args: Any, **kwargs: Any) -> _Opaque:
        return _Opaque()

    def __setstate__(self, state: Any) -> None:
        pass

    def append(self, item: Any) -> None:
        """Ignored (lists of unknown type)."""

    def extend(self, items: Any) -> None:
        """Ignored (lists of unknown type)."""


def _tensor(
    storage: Any, offset: Any, size: Any, stride: Any, *rest: Any, metadata: Any = None, dtype: Any = None
) -> Any:
    if not isinstance(storage, StorageRef) or not isinstance(size, tuple) or not isinstance(stride, tuple):
        return _Opaque()
    return TensorRef(
        storage,
        int(offset),
        tuple(int(d) for d in size),
        tuple(int(s) for s in stride),
        not metadata,
        dtype.dtype if isinstance(dtype, _DtypeGlobal) else None,
    )


def _tensor_v2(
    storage: Any,
    offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    hooks: Any = None,
    metadata: Any = None,
) -> Any:
    return _tensor(storage, offset, size, stride, metadata=metadata)


def _tensor_v3(
    storage: Any,
    offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    hooks: Any = None,
    dtype: Any = None,
    metadata: Any = None,
) -> Any:
    return _tensor(storage, offset, size, stride, metadata=metadata, dtype=dtype)


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


class StubUnpickler(pickle.Unpickler):
    """Unpickles `data.pkl` into dicts, lists and TensorRefs; every other global becomes an inert `_Opaque`.

    `unknown` lists the globals and persistent ids it did not model: when it is empty, the result is
    the whole checkpoint (as torch would build it, with TensorRefs for tensors).
    """

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file)
        self.unknown: list[str] = []

    def find_class(self, module: str, name: str) -> Any:
        known = _KNOWN.get((module, name))
        if known is not None:
            return known
        storage_dtype = _storage_dtype(module, name)
        if storage_dtype is not None:
            return _DtypeGlobal(storage_dtype)
        if module == "torch" and name in DTYPES:
            return _DtypeGlobal(name)
        self.unknown.append(python_name(module, name))
        return _Opaque

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage"):
            key = pid[2].decode("ascii") if isinstance(pid[2], bytes) else str(pid[2])
            return StorageRef(key, pid[1].dtype if isinstance(pid[1], _DtypeGlobal) else None)
        self.unknown.append(f"persistent id ({type(pid).__name__})")
        return _Opaque()


def open_zip_without_torch(
    path: Path, extract_paths: Sequence[str], *, display: str, where: str = ""
) -> ZipSpanSource | None:
    """The checkpoint read from its references alone, torch not imported; None when torch must read it.

    That is the case when `data.pkl` uses any global besides tensor rebuilds, storage types, dtypes and
    OrderedDict (torch's safe loader then decides, with `--allow-global`), when storages are big-endian,
    or when a tensor of the state dict is not a plain row-major slice of its storage record. Raises the
    same SourceError as the torch path when the state dict is not where the recipe says.
    """
    references = references_or_none(str(path))
    if references is None:
        return None
    obj, unknown, records, little = references
    if unknown or not little:
        return None
    state, found_at = extract(obj, extract_paths, file=display, where=where)
    spans = {}
    for key, value in state.items():
        if isinstance(value, TensorRef):
            check_ref(key, value, records, display)
            span = row_major_span(value, records, str(path))
            if span is None:
                return None
            spans[key] = span
    top = top_level_of(obj)
    return ZipSpanSource(display, state, spans, extracted_from=found_at, top_level=top)


def check_ref(key: Any, ref: TensorRef, records: Mapping[str, Record], display: str) -> None:
    """A tensor `data.pkl` describes is refused, naming its key, when its sizes, strides or offset are negative or
    beyond int64, or when its elements reach past the end of the storage record they view."""
    numbers = (ref.offset, *ref.size, *ref.stride)
    where = f"{display}: tensor {quoted(key) if isinstance(key, str) else repr(type(key).__name__)}"
    if len(ref.size) != len(ref.stride) or any(not 0 <= n <= _INT64 for n in numbers):
        raise SourceError(
            f"{where} has size {_short(ref.size)}, stride {_short(ref.stride)} and offset "
            f"{_short((ref.offset,))}: negative, out of range or mismatched; the file is corrupt"
        )
    record = records.get(ref.storage.key)
    item = DTYPES[ref.dtype].itemsize if ref.dtype in DTYPES else None
    if record is None or item is None or not math.prod(ref.size):
        return  # torch decides (compressed records, unknown dtypes); an empty tensor reads nothing
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride))
    if (last + 1) * item > record.size:
        raise SourceError(
            f"{where} reaches byte {(last + 1) * item:,} of its storage record "
            f"data/{ref.storage.key}, which has {record.size:,}: the file is corrupt or truncated"
        )


def _short(numbers: tuple[int, ...]) -> str:
    """Numbers for a message, a huge one by its size (a 5000-digit LONG4 has no printable repr)."""
    return "[" + ", ".join(str(n) if abs(n) < 2**70 else f"<{n.bit_length()}-bit number>" for n in numbers) + "]"


def row_major_span(ref: TensorRef, records: Mapping[str, Record], path: str) -> RawSpan | None:
    """The bytes of `ref` when it is a plain, row-major, in-bounds slice of its storage record."""
    record = records.get(ref.storage.key)
    if record is None or not ref.plain or ref.dtype not in DTYPES or ref.offset < 0:
        return None
    numel = math.prod(ref.size)
    expected = 1
    for size, stride in zip(reversed(ref.size), reversed(ref.stride)):
        if size != 1 and stride != expected and numel:
            return None
        expected *= size
    item = DTYPES[ref.dtype].itemsize
    start, nbytes = record.offset + ref.offset * item, numel * item
    if nbytes and start + nbytes > record.offset + record.size:
        return None
    return RawSpan(path, start, nbytes)


def zip_spans(path: str, found_at: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, RawSpan]:
    """Raw spans of the memory-mapped `tensors` (the state dict at `found_at` of torch zip file `path`).

    Best effort: a tensor gets no span when anything disagrees or is unknown; a file whose references
    cannot be read gets none at all (its tensors are then read through torch as before).
    """
    references = references_or_none(path)
    if references is None:
        return {}
    obj, _, records, little = references
    found = _lookup_state(obj, found_at)
    if found is None or not little:
        return {}
    refs = found
    spans: dict[str, RawSpan] = {}
    bases = set()
    for key, tensor in tensors.items():
        ref = refs.get(key)
        if not isinstance(ref, TensorRef) or not _agrees(ref, tensor):
            continue
        span = row_major_span(ref, records, path)
        if span is None or span.nbytes == 0:
            continue
        bases.add(tensor.untyped_storage().data_ptr() - records[ref.storage.key].offset)
        spans[key] = span
    # Every storage torch mapped is a slice of one map of the whole file: one common base, or no trust.
    return spans if len(bases) == 1 else {}


def _agrees(ref: TensorRef, tensor: torch.Tensor) -> bool:
    """The pickle's description matches the tensor torch built, and its bytes are plain row-major ones."""
    return bool(
        ref.plain
        and type(tensor) in (torch.Tensor, torch.nn.Parameter)
        and tensor.layout == torch.strided
        and dtype_name(tensor.dtype) == ref.dtype
        and tuple(tensor.shape) == ref.size
        and tuple(tensor.stride()) == ref.stride
        and tensor.storage_offset() == ref.offset
        and tensor.is_contiguous()
        and not tensor.is_conj()
        and not tensor.is_neg()
        and tensor.device.type == "cpu"
    )


def read_references(path: str) -> tuple[Any, list[str], dict[str, Record], bool]:
    """`data.pkl` as the stub unpickler builds it, the globals it did not model, the `data/<key>` records by
    key, and whether the storages are little-endian. Raises on a malformed archive or pickle."""
    # unbuffered: each record's local header costs a 30-byte read, not an 8 KiB block of partition bytes
    with open(path, "rb", buffering=0) as f, zipfile.ZipFile(f) as archive:
        pickled, records, little = read_archive(archive, f)
    unpickler = StubUnpickler(io.BytesIO(pickled))
    obj = unpickle.load(unpickler.load, unpickle.nesting_bound(pickled), path, lambda: io.BytesIO(pickled))
    return obj, unpickler.unknown, records, little


def references_or_none(path: str) -> tuple[Any, list[str], dict[str, Record], bool] | None:
    """`read_references(path)`, or None when the file is anything but a well-formed torch zip archive: the caller
    then reads it through torch's own loader, which reports precisely what is wrong."""
    try:
        return read_references(path)
    except Exception:  # noqa: BLE001 - any failure of the stub reader hands the file to torch (never ignored)
        return None


def _lookup_state(obj: Any, found_at: str) -> Mapping[str, Any] | None:
    """The state dict at `found_at` in the references' object tree, or None when it is not a mapping there."""
    try:
        refs, _ = extract(obj, [found_at], file="")
    except SourceError:
        return None
    return refs


def read_archive(archive: zipfile.ZipFile, f: BinaryIO | io.RawIOBase) -> tuple[bytes, dict[str, Record], bool]:
    """`data.pkl`, the stored `data/<key>` records by key (offsets in `f`, the archive's file), and whether the
    storages are little-endian."""
    infos = archive.infolist()
    pickles = [i for i in infos if i.filename.count("/") == 1 and i.filename.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise ValueError("not one data.pkl")
    prefix = pickles[0].filename[: -len("data.pkl")]
    order = next((i for i in infos if i.filename == prefix + "byteorder"), None)
    byteorder = archive.read(order).decode("ascii").strip() if order else sys.byteorder
    records = {}
    for info in infos:
        name = info.filename
        if name.startswith(prefix + "data/") and info.compress_type == zipfile.ZIP_STORED:
            records[name[len(prefix) + 5 :]] = Record(_data_offset(f, info), info.file_size)
    return archive.read(pickles[0]), records, byteorder == "little"


def _data_offset(f: Any, info: zipfile.ZipInfo) -> int:
    """Where a record's bytes start: after its local header, whose name and extra lengths may differ from the
    directory's."""
    f.seek(info.header_offset)
    fields = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
    if fields[0] != _LOCAL_SIGNATURE:
        raise ValueError(f"no local header at {info.header_offset}")
    name_len, extra_len = fields[-2], fields[-1]
    encoding = "utf-8" if info.flag_bits & 0x800 else "cp437"
    if f.read(name_len) != info.orig_filename.encode(encoding, "surrogateescape"):
        raise ValueError(f"the local header at {info.header_offset} names another record")
    return info.header_offset + _LOCAL_HEADER.size + name_len + extra_len


class TorchZipSource(MappingSource):
    """A memory-mapped torch zip checkpoint whose plain tensors also have raw spans in the file.

    Spans are worked out on first use. `load` of a spanned tensor reads its bytes with pread into new
    memory rather than touching the map, so resident memory does not grow with every tensor read.
    """

    def __init__(
        self,
        file: str,
        display: str,
        state: Mapping[str, Any],
        *,
        extracted_from: str,
        top_level: Mapping[str, str],
        keep_alive: Any,
    ) -> None:
        super().__init__(
            display, "torch-zip", state, extracted_from=extracted_from, top_level=top_level, keep_alive=keep_alive
        )
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


class ZipSpanSource(MappingSource):
    """A torch zip checkpoint read without torch: every tensor is a span of the file, loaded with pread."""

    def __init__(
        self,
        display: str,
        state: Mapping[str, Any],
        spans: Mapping[str, RawSpan],
        *,
        extracted_from: str,
        top_level: Mapping[str, str],
    ) -> None:
        super().__init__(display, "torch-zip", state, extracted_from=extracted_from, top_level=top_level)
        self._spans = dict(spans)

    def raw_span(self, key: str) -> RawSpan:
        """Where `key`'s bytes lie in the zip file."""
        return self._spans[key]

    def load(self, key: str) -> torch.Tensor:
        """The tensor, read from its span into new memory."""
        return read_span(self._spans[key], self.tensors[key])
