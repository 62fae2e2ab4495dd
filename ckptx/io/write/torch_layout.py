"""Which storage records a `.pth` output has and where each tensor lies in them, worked out before any byte
is written (and without reading tensor data for tensors that are spans of a file).

Storage identity, and so ties, come from the source:

- A tensor copied unchanged from a file (it has a raw span) is identified by its bytes in that file: tensors
  whose spans overlap (a tied weight has the same span twice; a view lies inside its base) share one record
  that covers the union of their spans, each at its own element offset.
- A tensor whose bytes are pieces of files (the chunks of a sharded DCP tensor, `Source.raw_spans`) gets a
  record of its own that copies the pieces one after another.
- A tensor copied unchanged from memory (legacy `.pth`, a memory-mapped tensor with no span, an in-memory
  state dict) is identified by its `untyped_storage()`: tensors whose extents in one storage overlap share
  a record covering the union of those extents, each with its own offset and strides (so a tensor and its
  transpose stay one storage).
- A tensor alone in its storage is written compact: just its own elements, row-major (a view of a larger
  storage does not drag the rest of it along; a non-contiguous tensor becomes contiguous, same values).
- Computed tensors get records of their own, except that entries computing the same ops from the same
  source bytes (a tied pair cast together) are computed once and share one record.

Only tensors of one dtype share a record (torch cannot load one storage viewed as two dtypes).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptx._lazy import lazy_module
from ckptx.dtypes import dtype_name
from ckptx.errors import DestinationError
from ckptx.io.write.torch_pickle import ITEM_SIZES, PickledStorage, PickledTensor, item_size
from ckptx.planning.entry import PlanEntry
from ckptx.planning.expr import OpNode, SourceRef, sources_of
from ckptx.planning.source import RawSpan, Source

if TYPE_CHECKING:  # pragma: no cover
    import torch
else:
    torch = lazy_module("torch")


@dataclass(frozen=True)
class FileBytes:
    """A record copied from spans of source files, one after another (mostly one span)."""

    spans: tuple[RawSpan, ...]


@dataclass(frozen=True)
class MemoryBytes:
    """A record taken from a tensor in memory: its bytes `start:start + nbytes` of its storage, or, when
    `compact`, the tensor's own elements in row-major order."""

    tensor: Any
    start: int
    compact: bool


@dataclass(frozen=True)
class ComputedBytes:
    """A record computed from the plan entry's expression when it is written."""

    entry: PlanEntry


@dataclass(frozen=True)
class StorageRecord:
    """One `data/<key>` record: its dtype, size, where its bytes come from, and the entries that view it."""

    key: str
    dtype: str
    nbytes: int
    fill: FileBytes | MemoryBytes | ComputedBytes
    entries: tuple[PlanEntry, ...]

    @property
    def planned_bytes(self) -> int:
        """The bytes of the entries it holds, as the plan counts them (for progress)."""
        return sum(entry.meta.nbytes for entry in self.entries)


@dataclass(frozen=True)
class TorchLayout:
    """The records in key order, and every entry's tensor (storage, offset, size, stride) in entry order."""

    records: tuple[StorageRecord, ...]
    tensors: tuple[tuple[str, PickledTensor], ...]


@dataclass(frozen=True)
class _Slot:
    """An entry placed in a byte interval of some identity (a file, a storage, a computation)."""

    index: int
    entry: PlanEntry
    group: tuple[Hashable, ...]  # (kind, identity...): ("file", path), ("computed", ...), ("own", ...), ...
    start: int
    end: int
    fill: FileBytes | MemoryBytes | ComputedBytes
    stride: tuple[int, ...] | None = None  # None: row-major


def plan_layout(entries: Sequence[PlanEntry], source: Source, dst: Path) -> TorchLayout:
    """The storage records and tensor placements for `entries`; raises DestinationError (before anything is
    written) for a tensor a torch zip file cannot hold."""
    identities: dict[str, Hashable] = {}
    slots = [_slot(i, entry, source, dst, identities) for i, entry in enumerate(entries)]
    groups = _merge(slots)
    groups.sort(key=lambda members: min(s.index for s in members))
    records: list[StorageRecord] = []
    placed: dict[int, PickledTensor] = {}
    for key, members in enumerate(groups):
        record = _record(str(key), members)
        records.append(record)
        itemsize = ITEM_SIZES[record.dtype]
        storage = PickledStorage(record.key, record.dtype, record.nbytes // itemsize)
        base = min(s.start for s in members) if len(members) > 1 else members[0].start
        for slot in members:
            shape = slot.entry.meta.shape
            offset = (slot.start - base) // itemsize
            stride = slot.stride if slot.stride is not None and len(members) > 1 else contiguous_strides(shape)
            placed[slot.index] = PickledTensor(storage, offset, shape, stride)
    tensors = tuple((entry.key, placed[i]) for i, entry in enumerate(entries))
    return TorchLayout(tuple(records), tensors)


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Row-major strides of `shape`, as torch gives them (a 0 or 1 dimension counts as 1)."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _slot(index: int, entry: PlanEntry, source: Source, dst: Path, identities: dict[str, Hashable]) -> _Slot:
    meta = entry.meta
    itemsize = item_size(meta.dtype)
    if itemsize is None:
        supported = ", ".join(sorted(ITEM_SIZES))
        raise DestinationError(
            f"tensor '{entry.key}': dtype {meta.dtype} is not one ckptx writes to a torch "
            f"file ({dst.name}); it writes {supported}; drop the tensor (a `drop` step) or "
            f"cast it to one of those (a `cast` step)"
        )
    nbytes = math.prod(meta.shape) * itemsize
    if entry.is_copy:
        span = source.raw_span(entry.sources[0])
        if span is not None and span.nbytes == nbytes:
            group = ("file", span.file, meta.dtype, span.offset % itemsize) if nbytes else ("empty", index)
            return _Slot(index, entry, group, span.offset, span.offset + nbytes, FileBytes((span,)))
        pieces = source.raw_spans(entry.sources[0]) if span is None else None
        if pieces is not None and sum(piece.nbytes for piece in pieces) == nbytes:
            return _Slot(index, entry, ("own", index), 0, nbytes, FileBytes(tuple(pieces)))
        tensor = _source_tensor(entry, source, dst)
        if tensor is not None:
            return _memory_slot(index, entry, tensor, itemsize)
    return _Slot(
        index, entry, _computation(entry, source, identities) or ("own", index), 0, nbytes, ComputedBytes(entry)
    )


def _source_tensor(entry: PlanEntry, source: Source, dst: Path) -> Any:
    """The source tensor of a copied entry without a span, when its storage can be written as it is
    (dense, on the CPU, no lazy conjugation or negation, the dtype and shape the plan says); else None."""
    tensor = source.load(entry.sources[0])
    if tensor.layout != torch.strided or tensor.is_quantized:
        raise DestinationError(
            f"tensor '{entry.key}' is a {tensor.layout} {dtype_name(tensor.dtype)} tensor; "
            f"a torch zip file written by ckptx ({dst.name}) holds dense tensors; convert it "
            f"to a dense tensor first or leave it out of the recipe"
        )
    if (
        tensor.device.type != "cpu"
        or tensor.is_conj()
        or tensor.is_neg()
        or dtype_name(tensor.dtype) != entry.meta.dtype
        or tuple(tensor.shape) != entry.meta.shape
    ):
        return None
    return tensor


def _memory_slot(index: int, entry: PlanEntry, tensor: Any, itemsize: int) -> _Slot:
    """A tensor in memory, placed at its extent in its storage: from its first element to its last."""
    if tensor.numel() == 0:
        return _Slot(index, entry, ("empty", index), 0, 0, MemoryBytes(tensor, 0, compact=True))
    last = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    start = tensor.storage_offset() * itemsize
    group = ("memory", tensor.untyped_storage().data_ptr(), entry.meta.dtype)
    return _Slot(
        index,
        entry,
        group,
        start,
        start + (last + 1) * itemsize,
        MemoryBytes(tensor, start, compact=False),
        tuple(tensor.stride()),
    )


def _computation(entry: PlanEntry, source: Source, identities: dict[str, Hashable]) -> tuple[Hashable, ...] | None:
    """What an entry computes, with each source tensor named by its bytes (so tied sources are one); None
    when it reads no source tensor or its parameters cannot be compared."""
    if not sources_of(entry.expr):
        return None
    try:
        computation = ("computed", _canonical(entry.expr, source, identities))
        hash(computation)
    except TypeError:
        return None
    return computation


def _canonical(expr: SourceRef | OpNode, source: Source, identities: dict[str, Hashable]) -> Hashable:
    if isinstance(expr, SourceRef):
        if expr.key not in identities:
            identities[expr.key] = _identity(expr.key, source)
        return ("source", identities[expr.key], expr.meta)
    return (
        "op",
        expr.op,
        expr.params,
        tuple(_canonical(child, source, identities) for child in expr.inputs),
        expr.meta,
    )


def _identity(key: str, source: Source) -> Hashable:
    """A source tensor named by where its bytes are: its span, else its storage and geometry, else its key."""
    span = source.raw_span(key)
    if span is not None and span.nbytes == source.tensors[key].nbytes:
        return ("file", span.file, span.offset, span.nbytes)
    tensor = source.load(key)
    if tensor.layout != torch.strided or tensor.numel() == 0:
        return ("key", key)
    return (
        "memory",
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tuple(tensor.stride()),
        dtype_name(tensor.dtype),
        tensor.is_conj(),
        tensor.is_neg(),
    )


def _merge(slots: list[_Slot]) -> list[list[_Slot]]:
    """Slots of one group whose byte intervals overlap, joined (computed slots: equal computations joined)."""
    by_group: dict[tuple[Hashable, ...], list[_Slot]] = {}
    for slot in slots:
        by_group.setdefault(slot.group, []).append(slot)
    merged: list[list[_Slot]] = []
    for group, members in by_group.items():
        if group[0] in ("computed", "own", "empty"):
            merged.append(members)
            continue
        members.sort(key=lambda s: (s.start, s.index))
        current, end = [members[0]], members[0].end
        for slot in members[1:]:
            if slot.start < end:
                current.append(slot)
                end = max(end, slot.end)
            else:
                merged.append(current)
                current, end = [slot], slot.end
        merged.append(current)
    return merged


def _record(key: str, members: list[_Slot]) -> StorageRecord:
    members.sort(key=lambda s: s.index)
    first = members[0]
    dtype = first.entry.meta.dtype
    entries = tuple(s.entry for s in members)
    if isinstance(first.fill, ComputedBytes) or first.group[0] == "own":
        return StorageRecord(key, dtype, first.end - first.start, first.fill, entries)
    start, end = min(s.start for s in members), max(s.end for s in members)
    if isinstance(first.fill, FileBytes):
        file = first.fill.spans[0].file
        return StorageRecord(key, dtype, end - start, FileBytes((RawSpan(file, start, end - start),)), entries)
    if len(members) == 1:
        return StorageRecord(
            key,
            dtype,
            first.entry.meta.numel * ITEM_SIZES[dtype],
            MemoryBytes(first.fill.tensor, 0, compact=True),
            entries,
        )
    return StorageRecord(key, dtype, end - start, MemoryBytes(first.fill.tensor, start, compact=False), entries)
