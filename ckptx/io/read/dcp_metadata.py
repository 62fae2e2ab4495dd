"""The `.metadata` file of a torch.distributed.checkpoint (DCP) folder, read without torch and without running it.

`dcp.save` pickles a `torch.distributed.checkpoint.metadata.Metadata` (torch reads it back with an unrestricted
`pickle.load`). Here a restricted unpickler maps the handful of globals a real save names to inert stand-ins
(`_ALLOWED`), and refuses every other global, persistent id or extension code with a `ForeignGlobal` error
before anything of it is called. The stand-ins cannot be changed by the pickle (BUILD on them fails), so one
hostile file cannot alter how later files are read. The stand-ins are then checked and turned into frozen dataclasses:
`DcpMetadata` with one `DcpTensor` (global shape, dtype, chunks with their storage items) or `DcpBytes`
(a pickled non-tensor value) per flattened key, and the key's original path from `planner_data`.
"""

from __future__ import annotations

import io
import itertools
import math
import pickle
import re
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, BinaryIO, ClassVar, TypeGuard

from ckptx.dtypes import DTYPES, TensorMeta
from ckptx.errors import ForeignGlobal, SourceError
from ckptx.gcpause import without_gc
from ckptx.io.read import unpickle
from ckptx.text import python_name, quoted, summary
from ckptx.text import shown as shown_text

__all__ = [
    "DcpBytes",
    "DcpChunk",
    "DcpEntry",
    "DcpMetadata",
    "DcpTensor",
    "PathItem",
    "StorageItem",
    "chunk_text",
    "parse_metadata",
    "read_metadata",
]

PathItem = str | int

_DCP = "torch.distributed.checkpoint metadata files"
_INT64 = 2**63 - 1  # torch sizes, offsets and file positions are int64
MAX_PATH = 512
"""Items in one `planner_data` path: how deep the saved state dict nests (a real one: a handful)."""
_NOT_TORCH = (
    "ckptx did not run it (torch's own reader would): the file is corrupt or not from dcp.save, do not load it "
    "with torch"
)


@dataclass(frozen=True)
class StorageItem:
    """Where one saved item lies: a file of the folder (its relative name), byte offset and length."""

    file: str
    offset: int
    length: int


@dataclass(frozen=True)
class DcpChunk:
    """One saved piece of a tensor: its offsets and sizes in the global tensor, and where it is stored."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    item: StorageItem

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.sizes)


@dataclass(frozen=True)
class DcpTensor:
    """A tensor of the checkpoint: its flattened key, original path, global shape and dtype, and chunks."""

    is_tensor_ref: ClassVar[bool] = True  # `ckptx.io.source.is_tensor` counts it as a tensor

    key: str
    path: tuple[PathItem, ...]
    meta: TensorMeta
    chunks: tuple[DcpChunk, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        """The global shape."""
        return self.meta.shape

    @property
    def dtype(self) -> str:
        """The dtype name (`float32`)."""
        return self.meta.dtype

    @property
    def sharded_dims(self) -> tuple[int, ...]:
        """The dimensions along which the chunks start at different offsets."""
        return tuple(d for d in range(len(self.shape)) if len({c.offsets[d] for c in self.chunks}) > 1)

    @property
    def whole_chunk(self) -> DcpChunk | None:
        """The chunk holding the whole tensor, when one does."""
        return next((c for c in self.chunks if c.sizes == self.shape), None)


@dataclass(frozen=True)
class DcpBytes:
    """A non-tensor value of the checkpoint (`epoch`, a learning rate), pickled in one storage item."""

    key: str
    path: tuple[PathItem, ...]
    item: StorageItem


DcpEntry = DcpTensor | DcpBytes


@dataclass(frozen=True)
class DcpMetadata:
    """A checked `.metadata`: every entry in the file's order, the DCP version, and the files it names."""

    entries: tuple[DcpEntry, ...]
    version: str | None
    files: tuple[str, ...]


def chunk_text(chunk: DcpChunk) -> str:
    """`[5:10, 0:8]`: the chunk's place in the global tensor."""
    return "[" + ", ".join(f"{o}:{o + s}" for o, s in zip(chunk.offsets, chunk.sizes)) + "]"


# ---- the restricted unpickler -------------------------------------------------------------------------------


class _Stub:
    """An inert stand-in for one DCP metadata class: keeps what the pickle gives it and runs nothing (slots: a
    pickle can set no other attribute, and a metadata of a million chunks takes half the memory)."""

    __slots__ = ("args", "fields", "state")

    def __init__(self, *args: Any) -> None:
        self.args = args
        self.state: Any = None
        self.fields: dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        self.state = state
        self.fields = state if type(state) is dict else {}

    def get(self, name: str, default: Any = None) -> Any:
        """A field of the pickled object's state dict."""
        return self.fields.get(name, default)


class _MetadataStub(_Stub):
    """Stands in for `Metadata`."""

    __slots__ = ()


class _TensorStorageStub(_Stub):
    """Stands in for `TensorStorageMetadata`."""

    __slots__ = ()


class _BytesStorageStub(_Stub):
    """Stands in for `BytesStorageMetadata`."""

    __slots__ = ()


class _ChunkStub(_Stub):
    """Stands in for `ChunkStorageMetadata`."""

    __slots__ = ()


class _IndexStub(_Stub):
    """Stands in for `MetadataIndex` (hashed by identity: the pickle's dict keys stay inert)."""

    __slots__ = ()


class _PropertiesStub(_Stub):
    """Stands in for `TensorProperties` (its state is a tuple: dtype, layout, requires_grad, memory format, pin)."""

    __slots__ = ()


class _StorageMetaStub(_Stub):
    """Stands in for `StorageMeta`."""

    __slots__ = ()


class _StorageInfoStub(_Stub):
    """Stands in for `filesystem._StorageInfo`."""

    __slots__ = ()


class _Value:
    """An immutable stand-in for a torch value the pickle names (a dtype, a layout).

    `__slots__` and a refusing `__setstate__`: a pickle's BUILD cannot give it a state or attributes.
    """

    __slots__ = ("name",)
    name: str

    def __init__(self, name: str) -> None:
        object.__setattr__(self, "name", name)

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __setstate__(self, state: Any) -> None:
        raise ValueError(f"torch.{self.name} takes no pickled state")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Value) and type(other) is type(self) and other.name == self.name

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.name))

    def __repr__(self) -> str:
        return f"torch.{self.name}"


class _Dtype(_Value):
    """A dtype ckptx reads (`torch.float32`)."""

    __slots__ = ()


class _UnknownDtype(_Value):
    """A `torch.<dtype>` global whose dtype ckptx cannot read."""

    __slots__ = ()


class _Layout(_Value):
    """A tensor layout (`torch.strided`), as `torch.serialization._get_layout` names it."""

    __slots__ = ()


class _Call:
    """An immutable stand-in for a helper the pickle calls (`torch.Size`, `_get_layout`): runs `function`."""

    __slots__ = ("function",)
    function: Callable[..., Any]

    def __init__(self, function: Callable[..., Any]) -> None:
        object.__setattr__(self, "function", function)

    def __call__(self, *args: Any) -> Any:
        return self.function(*args)

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("stand-ins are immutable")

    def __setstate__(self, state: Any) -> None:
        raise ValueError("a called global takes no pickled state")


def _size(dims: Any = ()) -> tuple[int, ...]:
    if type(dims) is not tuple and type(dims) is not list:
        raise ValueError(f"torch.Size of {summary(dims)}")
    for d in dims:
        if type(d) is not int:
            raise ValueError(f"torch.Size of {summary(dims)}")
    return tuple(dims)


def _memory_format(code: Any) -> int:
    if type(code) is not int:
        raise ValueError(f"memory format {summary(code)}")
    return code


def _path(*parts: Any) -> str:
    if not all(isinstance(p, str) for p in parts):
        raise ValueError(f"a path of {summary(parts)}")
    return "/".join(parts)


def _layout(name: Any) -> _Layout:
    if not isinstance(name, str):
        raise ValueError(f"a layout named by {summary(name)}")
    return _Layout(name)


_META = "torch.distributed.checkpoint.metadata"
# The stub classes keep the state BUILD gives them (their `__setstate__`; on the class itself BUILD fails);
# everything else is immutable. OrderedDict is a built-in type: BUILD cannot change it either.
_ALLOWED: dict[tuple[str, str], Callable[..., Any]] = {
    (_META, "Metadata"): _MetadataStub,
    (_META, "TensorStorageMetadata"): _TensorStorageStub,
    (_META, "BytesStorageMetadata"): _BytesStorageStub,
    (_META, "ChunkStorageMetadata"): _ChunkStub,
    (_META, "MetadataIndex"): _IndexStub,
    (_META, "TensorProperties"): _PropertiesStub,
    (_META, "StorageMeta"): _StorageMetaStub,
    (_META, "_MEM_FORMAT_ENCODING"): _Call(_memory_format),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfoStub,
    ("torch", "Size"): _Call(_size),
    ("torch.serialization", "_get_layout"): _Call(_layout),
    ("pathlib", "PosixPath"): _Call(_path),
    ("pathlib", "PurePosixPath"): _Call(_path),
    ("pathlib", "WindowsPath"): _Call(_path),
    ("pathlib", "PureWindowsPath"): _Call(_path),
    ("collections", "OrderedDict"): OrderedDict,
}
_DTYPE_NAME = re.compile(
    r"(?:b?float|u?int|complex|qu?int|bits)\d+(?:_\w+|x\d+)?|bool|half|double|c?float|chalf|cdouble"
)


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only stand-ins (`_ALLOWED`, dtypes); any other global or a persistent id is refused."""

    def __init__(self, file: Any, shown: str) -> None:
        super().__init__(file)
        self._shown = shown

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED.get((module, name))
        if allowed is not None:
            return allowed
        if module == "torch" and name in DTYPES:
            return _Dtype(name)
        if module == "torch" and _DTYPE_NAME.fullmatch(name):
            return _UnknownDtype(name)
        raise ForeignGlobal(self._shown, python_name(module, name), fmt=_DCP, advice=_NOT_TORCH)

    def persistent_load(self, pid: Any) -> Any:
        raise ForeignGlobal(self._shown, f"persistent id ({type(pid).__name__})", fmt=_DCP, advice=_NOT_TORCH)


@without_gc
def read_metadata(
    data: bytes | BinaryIO, shown: str, *, bound: int | None = None, again: Callable[[], BinaryIO] | None = None
) -> DcpMetadata:
    """Unpickle `.metadata` (its bytes, or the open file: read as the unpickler goes, never whole) with the
    restricted unpickler and check it (`shown` names the file). For a file, `bound` is `unpickle.nesting_bound`
    of its bytes and `again()` reads them once more from the start (to measure how deep they nest)."""
    if isinstance(data, bytes):
        bound, again = unpickle.nesting_bound(data), lambda: io.BytesIO(data)
    try:
        unpickler = _MetadataUnpickler(io.BytesIO(data) if isinstance(data, bytes) else data, shown)
        obj = unpickle.load(unpickler.load, bound if bound is not None else unpickle.MAX_NESTING + 1, shown, again)
    except SourceError:
        raise
    except Exception as exc:  # noqa: BLE001 - any malformed pickle is a bad input, never a crash
        raise SourceError(
            f"{shown}: not a readable DCP .metadata pickle ({_reason(exc)}); the file is truncated or "
            f"corrupt: copy it again from where the checkpoint was saved"
        ) from None
    return parse_metadata(obj, shown)


def _reason(exc: BaseException) -> str:
    """Why the unpickler stopped, without a byte of the file (an UnpicklingError's message may quote one)."""
    if isinstance(exc, pickle.UnpicklingError):
        return "not a pickle, or a broken one"
    for kind, reason in ((EOFError, "it ends early"), (MemoryError, "too large"), (RecursionError, "nested too deep")):
        if isinstance(exc, kind):
            return reason
    text = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    return shown_text(text)


# ---- checking the stand-ins ---------------------------------------------------------------------------------


def parse_metadata(obj: Any, shown: str) -> DcpMetadata:
    """Check an unpickled `Metadata` stand-in and build the frozen `DcpMetadata`."""
    if not isinstance(obj, _MetadataStub):
        raise SourceError(
            f"{shown}: not DCP metadata: the pickle holds {type(obj).__name__}, not a "
            f"torch.distributed.checkpoint Metadata"
        )
    described = obj.get("state_dict_metadata")
    if not isinstance(described, dict):
        raise SourceError(f"{shown}: not DCP metadata: state_dict_metadata is missing or not a dict")
    paths = obj.get("planner_data") or {}
    storage = _storage_items(obj.get("storage_data"), shown)
    entries = tuple(_entry(key, value, _path_of(key, paths, shown), storage, shown) for key, value in described.items())
    version = obj.get("version")
    files = tuple(
        sorted(
            {c.item.file for e in entries if isinstance(e, DcpTensor) for c in e.chunks}
            | {e.item.file for e in entries if isinstance(e, DcpBytes)}
        )
    )
    shown_version = None if version is None else version[:40] if isinstance(version, str) else summary(version)
    return DcpMetadata(entries, shown_version, files)


def _path_of(key: Any, paths: Any, shown: str) -> tuple[PathItem, ...]:
    """The key's original path from `planner_data` (as `dcp_to_torch_save` restores it), else the key itself."""
    if not isinstance(key, str):
        raise SourceError(f"{shown}: not DCP metadata: key {summary(key)} is not a string")
    path = paths.get(key) if isinstance(paths, dict) else None
    if path is None:
        return (key,)
    if (
        not isinstance(path, (tuple, list))
        or not path
        or len(path) > MAX_PATH
        or not all(type(p) is str or type(p) is int and 0 <= p <= _INT64 for p in path)
    ):
        raise SourceError(
            f"{shown}: entry {quoted(key)}: planner_data path {summary(path)} is not a sequence of at most "
            f"{MAX_PATH} names and list indices; the file is corrupt"
        )
    return tuple(path)


def _storage_items(data: Any, shown: str) -> dict[tuple[str, tuple[int, ...] | None], StorageItem]:
    """storage_data as (fqn, chunk offsets or None) -> StorageItem, every item checked."""
    if not isinstance(data, dict):
        raise SourceError(
            f"{shown}: not DCP metadata: storage_data is missing or not a dict (written by a "
            f"storage writer ckptx does not read?)"
        )
    items: dict[tuple[str, tuple[int, ...] | None], StorageItem] = {}
    names: set[str] = set()  # file names already checked (a rank file holds many items)
    for index, info in data.items():
        fields = index.fields if isinstance(index, _IndexStub) else {}
        fqn, offset = fields.get("fqn"), fields.get("offset")
        if not isinstance(fqn, str):
            raise SourceError(f"{shown}: not DCP metadata: a storage_data key is not a MetadataIndex")
        if offset is not None and not _dims(offset):
            raise SourceError(
                f"{shown}: entry {quoted(fqn)}: storage index offset {summary(offset)} is not a torch.Size"
            )
        items[fqn, offset] = _storage_item(fqn, info, shown, names)
    return items


def _storage_item(fqn: str, info: Any, shown: str, names: set[str]) -> StorageItem:
    if not isinstance(info, _StorageInfoStub):
        raise SourceError(
            f"{shown}: entry {quoted(fqn)}: storage info is {summary(info)}, not a file system "
            f"_StorageInfo (saved with a storage writer ckptx does not read)"
        )
    fields = info.fields
    name, offset, length = fields.get("relative_path"), fields.get("offset"), fields.get("length")
    if (
        not isinstance(name, str)
        or type(offset) is not int
        or type(length) is not int
        or not 0 <= offset <= _INT64
        or not 0 <= length <= _INT64
    ):
        raise SourceError(
            f"{shown}: entry {quoted(fqn)}: storage info {summary(info.state)} needs a file name and a "
            f"non-negative offset and length; the file is corrupt"
        )
    if name not in names:
        parts = PurePosixPath(name).parts
        if not parts or PurePosixPath(name).is_absolute() or ".." in parts or "\\" in name:
            raise SourceError(
                f"{shown}: entry {quoted(fqn)}: storage file {quoted(name)} is not a file name inside the "
                f"checkpoint folder; the metadata is corrupt or hostile"
            )
        names.add(name)
    if fields.get("transform_descriptors"):
        raise SourceError(
            f"{shown}: entry {quoted(fqn)} is stored through the DCP stream transform(s) "
            f"{_names(fields.get('transform_descriptors'))}, which ckptx does not read; convert the "
            f"folder with torch.distributed.checkpoint.format_utils.dcp_to_torch_save first"
        )
    return StorageItem(name, offset, length)


def _names(value: Any) -> str:
    """`['zstd']` for a short list of strings, else `summary(value)`."""
    if isinstance(value, (list, tuple)) and len(value) <= 8 and all(isinstance(v, str) for v in value):
        return "[" + ", ".join(summary(v) for v in value) + "]"
    return summary(value)


def _entry(
    key: str,
    value: Any,
    path: tuple[PathItem, ...],
    storage: Mapping[tuple[str, tuple[int, ...] | None], StorageItem],
    shown: str,
) -> DcpEntry:
    if isinstance(value, _BytesStorageStub):
        item = storage.get((key, None))
        if item is None:
            raise SourceError(
                f"{shown}: entry {quoted(key)} (a pickled value) has no storage_data item; the file is corrupt"
            )
        return DcpBytes(key, path, item)
    if not isinstance(value, _TensorStorageStub):
        raise SourceError(f"{shown}: entry {quoted(key)} is {summary(value)}, neither a tensor nor a bytes entry")
    meta = TensorMeta(_shape(key, value.get("size"), shown), _dtype(key, value.get("properties"), shown))
    chunks = tuple(
        _chunk(key, i, c, meta, storage, shown) for i, c in enumerate(_list(key, value.get("chunks"), shown))
    )
    _check_cover(key, meta.shape, chunks, shown)
    return DcpTensor(key, path, meta, chunks)


def _list(key: str, chunks: Any, shown: str) -> list[Any]:
    if not isinstance(chunks, list):
        raise SourceError(f"{shown}: tensor {quoted(key)}: chunks is not a list; the file is corrupt")
    return chunks


def _shape(key: str, size: Any, shown: str) -> tuple[int, ...]:
    if not _dims(size) or any(d < 0 for d in size) or math.prod(size) > _INT64:
        raise SourceError(
            f"{shown}: tensor {quoted(key)}: size {summary(size)} is not a torch.Size of non-negative dims"
        )
    return size


def _dims(value: Any) -> TypeGuard[tuple[int, ...]]:
    """A tuple of ints within int64, as the `torch.Size` stand-in gives."""
    if type(value) is not tuple:
        return False
    for d in value:  # a loop, not all(): called for every chunk of every tensor
        if type(d) is not int or not -_INT64 <= d <= _INT64:
            return False
    return True


def _dtype(key: str, properties: Any, shown: str) -> str:
    state = properties.state if isinstance(properties, _PropertiesStub) else None
    if isinstance(state, tuple) and state:
        dtype, layout = state[0], state[1] if len(state) > 1 else None
    elif isinstance(state, dict):
        dtype, layout = state.get("dtype"), state.get("layout")
    else:
        raise SourceError(f"{shown}: tensor {quoted(key)}: properties are not TensorProperties; the file is corrupt")
    if isinstance(dtype, _UnknownDtype):
        raise SourceError(
            f"{shown}: tensor {quoted(key)} has dtype torch.{shown_text(dtype.name)}, which ckptx cannot read "
            f"(known: {', '.join(DTYPES)})"
        )
    if not isinstance(dtype, _Dtype) or dtype.name not in DTYPES:
        raise SourceError(
            f"{shown}: tensor {quoted(key)}: dtype {summary(dtype)} is not a torch dtype; the file is corrupt"
        )
    if layout is not None and layout != _Layout("torch.strided"):
        name = quoted(layout.name) if isinstance(layout, _Layout) else summary(layout)
        raise SourceError(
            f"{shown}: tensor {quoted(key)} has layout {name}; ckptx reads dense (torch.strided) tensors only"
        )
    return dtype.name


def _chunk(
    key: str,
    number: int,
    chunk: Any,
    meta: TensorMeta,
    storage: Mapping[tuple[str, tuple[int, ...] | None], StorageItem],
    shown: str,
) -> DcpChunk:
    fields = chunk.fields if isinstance(chunk, _ChunkStub) else {}
    offsets, sizes = fields.get("offsets"), fields.get("sizes")
    rank = len(meta.shape)
    if not _dims(offsets) or not _dims(sizes) or len(offsets) != rank or len(sizes) != rank:
        raise SourceError(
            f"{shown}: tensor {quoted(key)} {meta}: chunk {number} needs offsets and sizes of {rank} dims, "
            f"has {summary(offsets)} and {summary(sizes)}"
        )
    item = storage.get((key, offsets))
    if item is None:
        raise SourceError(
            f"{shown}: tensor {quoted(key)}: chunk {number} at offsets {list(offsets)} has no storage_data "
            f"item; the file is corrupt"
        )
    found = DcpChunk(offsets, sizes, item)
    if any(o < 0 or s < 0 or o + s > d for o, s, d in zip(offsets, sizes, meta.shape)):
        raise SourceError(f"{shown}: tensor {quoted(key)} {meta}: chunk {chunk_text(found)} lies outside the tensor")
    return found


def _check_cover(key: str, shape: tuple[int, ...], chunks: Sequence[DcpChunk], shown: str) -> None:
    """The non-empty chunks tile the tensor: no two overlap and together they hold every element.

    Checked in time linear in the chunks (200,000 one-element chunks in 0.2 s of CPU, a grid of 400 x 400 in
    0.4 s, medians of 5 on the shared 2-core machine; the pairwise check it replaces took minutes): see
    `tiles_exactly`. Only when they do not tile is a pair that overlaps looked for, to
    name it, with a bounded number of comparisons.
    """
    filled = [c for c in chunks if c.numel]
    if tiles_exactly(shape, filled):
        return
    overlap = _first_overlap(filled, len(shape))
    if overlap is not None:
        a, b = overlap
        raise SourceError(
            f"{shown}: tensor {quoted(key)} {list(shape)}: chunks {chunk_text(a)} and {chunk_text(b)} "
            f"overlap; the metadata is corrupt"
        )
    total = sum(c.numel for c in filled)
    if total != math.prod(shape):
        raise SourceError(
            f"{shown}: tensor {quoted(key)} {list(shape)}: its chunks hold {total} of "
            f"{math.prod(shape)} elements (a rank's chunks are missing from the metadata)"
        )
    raise SourceError(
        f"{shown}: tensor {quoted(key)} {list(shape)}: its {len(filled)} chunks overlap (they hold as many "
        f"elements as the tensor but do not tile it); the metadata is corrupt"
    )


_MAX_CORNERS = 1 << 23  # signed corners counted by `tiles_exactly` (2^d per chunk over d sharded dims)
_MAX_COMPARISONS = 2_000_000  # chunk pairs `_first_overlap` compares to name an overlap


def tiles_exactly(shape: tuple[int, ...], chunks: Sequence[DcpChunk]) -> bool:
    """The chunks (non-empty, each inside the tensor) cover every element of `shape` exactly once.

    A box's indicator is the signed sum of the orthants at its 2^d corners (+ at the corner of its lower ends,
    and a sign flip per upper end taken); orthants at distinct points are linearly independent, so the chunks
    tile the tensor exactly when their signed corners, summed, are the tensor's own. Dimensions every chunk
    spans whole are left out first (a Shard(0) tensor is one dimension whatever its rank). False also when
    there are more corners than `_MAX_CORNERS` to count (the caller then looks for an overlap pair itself).
    """
    if not chunks:
        return math.prod(shape) == 0
    if len(shape) == 0:
        return len(chunks) == 1
    dims = [d for d in range(len(shape)) if any(c.offsets[d] != 0 or c.sizes[d] != shape[d] for c in chunks)]
    if not dims:
        return len(chunks) == 1
    if len(chunks) << len(dims) > _MAX_CORNERS:
        return False
    plus: Counter[tuple[int, ...]] = Counter()  # corners taken with an even number of upper ends
    minus: Counter[tuple[int, ...]] = Counter()  # ... with an odd number
    for corner, sign in _corners([0] * len(dims), [shape[d] for d in dims]):
        (minus if sign > 0 else plus)[corner] += 1  # the tensor's own corners, on the other side
    if len(dims) == 1:  # Shard(0) and its kind: counted in C (Counter.update)
        (d,) = dims
        plus.update((c.offsets[d],) for c in chunks)
        minus.update((c.offsets[d] + c.sizes[d],) for c in chunks)
    elif len(dims) == 2:  # FSDP x TP grids
        a, b = dims
        plus.update(corner for c in chunks for corner in _plus_corners_2d(c, a, b))
        minus.update(corner for c in chunks for corner in _minus_corners_2d(c, a, b))
    else:
        for chunk in chunks:
            lo = [chunk.offsets[d] for d in dims]
            hi = [chunk.offsets[d] + chunk.sizes[d] for d in dims]
            for corner, sign in _corners(lo, hi):
                (plus if sign > 0 else minus)[corner] += 1
    return plus == minus


def _plus_corners_2d(chunk: DcpChunk, a: int, b: int) -> tuple[tuple[int, int], tuple[int, int]]:
    lo0, lo1 = chunk.offsets[a], chunk.offsets[b]
    return (lo0, lo1), (lo0 + chunk.sizes[a], lo1 + chunk.sizes[b])


def _minus_corners_2d(chunk: DcpChunk, a: int, b: int) -> tuple[tuple[int, int], tuple[int, int]]:
    lo0, lo1 = chunk.offsets[a], chunk.offsets[b]
    return (lo0 + chunk.sizes[a], lo1), (lo0, lo1 + chunk.sizes[b])


def _corners(lo: Sequence[int], hi: Sequence[int]) -> Iterator[tuple[tuple[int, ...], int]]:
    """The 2^d corners of the box [lo, hi) with their signs: -1 to the power of the upper ends taken."""
    for choice in itertools.product((False, True), repeat=len(lo)):
        corner = tuple(h if upper else low for low, h, upper in zip(lo, hi, choice))
        yield corner, -1 if sum(choice) % 2 else 1


def _first_overlap(chunks: Sequence[DcpChunk], rank: int) -> tuple[DcpChunk, DcpChunk] | None:
    """Two chunks that share an element, found by sweeping the dimension with the most distinct offsets; None when
    there are none, or when `_MAX_COMPARISONS` pairs were compared without finding one."""
    if rank == 0:
        return (chunks[0], chunks[1]) if len(chunks) > 1 else None
    dim = max(range(rank), key=lambda d: len({c.offsets[d] for c in chunks}))
    ordered = sorted(chunks, key=lambda c: c.offsets[dim])
    budget = _MAX_COMPARISONS
    for i, a in enumerate(ordered):
        for j in range(i + 1, len(ordered)):
            b = ordered[j]
            if b.offsets[dim] >= a.offsets[dim] + a.sizes[dim]:
                break
            budget -= 1
            if budget < 0:
                return None
            if all(
                b.offsets[d] < a.offsets[d] + a.sizes[d] and a.offsets[d] < b.offsets[d] + b.sizes[d]
                for d in range(rank)
            ):
                return a, b
    return None
