"""Write a plan to a torch zip checkpoint (`.pth`/`.pt`/`.bin`/`.ckpt`) atomically, streamed tensor by tensor.

The file is what `torch.save(OrderedDict)` writes, record for record: `archive/data.pkl` (see
torch_pickle.py), `.format_version`, `.storage_alignment`, `byteorder`, one stored record per storage
`archive/data/<key>` (64-byte aligned, see zip_records.py), `version` and `.data/serialization_id`.
Which storages there are, and where each tensor lies in them, is decided first (torch_layout.py); then
each record is written in turn: spans of the source file are copied by the kernel (copy_file_range) while a
background thread checksums them through short memory maps (or the CRC is taken from the source zip's
directory when a whole record is copied), memory tensors are written from where they are, and computed
tensors are computed one at a time. Torch is not imported unless a tensor is computed or read from memory.

A record copied from file spans is placed, through its header's padding, at an offset congruent modulo the file
system block to the source offset of its largest span that holds a whole block (`record_placement`): a
copy-on-write file system (XFS, btrfs) then shares those blocks instead of copying them, and other file systems
copy page-aligned runs.
Such a file leaves out `.format_version`: with it, torch may compute record offsets itself assuming the
minimal 64-byte padding (`torch.utils.serialization.config.load.calculate_storage_offsets`, and the offsets
it gives tensors loaded on the meta device); without it, torch reads every offset from the record's header,
as it does for files written before that record existed.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from ckptx._lazy import lazy_module
from ckptx.errors import DestinationError, TensorOpError
from ckptx.io.card import EntryObserver, ObservedFile
from ckptx.io.crc import CrcThread, stored_record_crcs
from ckptx.io.spans import BLOCK, Progress, SpanCopier, write_bytes
from ckptx.io.streamed import write_streamed
from ckptx.io.write.atomic import sync_file
from ckptx.io.write.torch_layout import ComputedBytes, FileBytes, MemoryBytes, StorageRecord, TorchLayout, plan_layout
from ckptx.io.write.torch_pickle import ITEM_SIZES, state_dict_pickle
from ckptx.io.write.writer import Move, OutputOptions, Writer
from ckptx.io.write.zip_records import ZipRecords
from ckptx.planning.entry import PlanEntry
from ckptx.planning.execute import materialize
from ckptx.planning.source import RawSpan, Source

if TYPE_CHECKING:  # pragma: no cover
    import torch
else:
    torch = lazy_module("torch")


ARCHIVE = "archive"  # the top folder torch.save uses when it writes to a file object
_OBSERVED = 64 * 1024 * 1024  # bytes of a tensor from memory handed to an observer at once
_FORMAT_VERSION = (".format_version", b"1")
_HEAD = ((".storage_alignment", b"64"), ("byteorder", b"little"))


class TorchWriter(Writer):
    """One torch zip file (`.pth`, `.pt`, `.bin`, `.ckpt`): a state dict `torch.load` reads (also with
    `weights_only=True` and `mmap=True`), with `options.state_metadata` as its `_metadata` when given."""

    format = "torch"

    def files(self) -> list[Path]:
        """The file."""
        return [self.destination]

    def non_tensor_note(self, source: Source) -> str | None:
        """A state dict file holds tensors (and `_metadata`); the source's other entries are not carried over."""
        if not source.non_tensors:
            return None
        return f"non-tensor entries not carried over: {', '.join(sorted(source.non_tensors))}"

    def stage(
        self, folder: Path, source: Source, progress: Progress | None, observer: EntryObserver | None = None
    ) -> list[Move]:
        """The whole archive, fsynced. Raises DestinationError, before writing a byte, for a tensor the format
        cannot hold (e.g. a quantized dtype)."""
        layout = plan_layout(self.entries, source, self.destination)
        pickled = state_dict_pickle(layout.tensors, self.options.state_metadata)
        staged = folder / self.destination.name
        with open(staged, "wb") as out:
            write_archive(out, layout, pickled, source, progress, observer=observer)
            sync_file(out)
        return [(staged, self.destination)]


def write_torch(
    dst: Path,
    entries: Sequence[PlanEntry],
    source: Source,
    *,
    state_metadata: Any = None,
    progress: Progress | None = None,
) -> int:
    """Write `entries` to `dst` as a torch zip state dict, atomically (replacing a file there). Returns its size."""
    return TorchWriter(dst, entries, OutputOptions(state_metadata=state_metadata)).write(source, progress)


def write_archive(
    out: BinaryIO,
    layout: TorchLayout,
    pickled: bytes,
    source: Source,
    progress: Progress | None = None,
    *,
    force_zip64: bool = False,
    observer: EntryObserver | None = None,
) -> None:
    """The whole zip archive: small records, every storage record of `layout`, then the directory.
    `force_zip64` writes the zip64 form of files over 4 GiB (see ZipRecords) whatever the size. `observer` is told
    each tensor's own row-major bytes (see `_RecordWriter`)."""
    archive = ZipRecords(out, ARCHIVE, force_zip64=force_zip64)
    archive.add("data.pkl", pickled)
    placements = [record_placement(record) for record in layout.records]
    head = _HEAD if any(p is not None for p in placements) else (_FORMAT_VERSION, *_HEAD)
    for name, data in head:
        archive.add(name, data)
    late: list[tuple[int, Future[int]]] = []
    with CrcThread() as crcs, SpanCopier(out, progress) as copier:
        writer = _RecordWriter(out, source, copier, crcs, progress, observer)
        for record, placement in zip(layout.records, placements):
            index = archive.begin(f"data/{record.key}", record.nbytes, congruent_to=placement)
            crc = writer.write(record)
            _check_size(archive.written(), record)
            archive.end(crc if isinstance(crc, int) else None)
            if not isinstance(crc, int):
                late.append((index, crc))
            if progress and record.planned_bytes > record.nbytes:
                progress(record.planned_bytes - record.nbytes)
        for index, future in late:
            archive.set_crc(index, future.result())
    archive.add("version", b"3\n")
    archive.add(".data/serialization_id", serialization_id(archive.checksums()))
    archive.finish()


def record_placement(record: StorageRecord) -> int | None:
    """The offset (modulo BLOCK) a record's data should start at so that one of its copied spans keeps its source
    offset modulo the block: the largest span that holds a whole block (what can be shared) and whose placement
    puts elements on their boundaries (torch's loaders get aligned elements); None (torch's 64-byte placement)
    when no span qualifies or the record is not copied from files."""
    fill = record.fill
    if not isinstance(fill, FileBytes):
        return None
    at, best, largest = 0, None, 0
    for span in fill.spans:
        placement = (span.offset - at) % BLOCK
        if (
            span.nbytes > largest
            and -span.offset % BLOCK + BLOCK <= span.nbytes
            and placement % ITEM_SIZES[record.dtype] == 0
        ):
            best, largest = placement, span.nbytes
        at += span.nbytes
    return best


def _check_size(written: int, record: StorageRecord) -> None:
    """A record's bytes are what the plan says, or the error names its tensors."""
    if written != record.nbytes:
        keys = ", ".join(f"'{entry.key}'" for entry in record.entries[:3])
        raise TensorOpError(
            f"tensor {keys}: {written} bytes were written, the plan says {record.nbytes} for "
            f"{record.entries[0].meta}; the source file is inconsistent or changed while it was "
            f"read; check it (ckptx inspect) and convert again"
        )


def serialization_id(checksums: Sequence[tuple[str, int | None]]) -> bytes:
    """40 digits naming the file's content, as torch writes one: 20 from the record names, 20 from their CRCs."""
    names = hashlib.blake2b("\n".join(sorted(n for n, _ in checksums)).encode(), digest_size=8).digest()
    crcs = zlib.crc32(b"".join((crc or 0).to_bytes(4, "little") for _, crc in checksums))
    return f"{int.from_bytes(names, 'little'):020d}{crcs:020d}".encode("ascii")


class _RecordWriter:
    """Writes one storage record's bytes at the end of `out` and gives its CRC-32 (or a future of it).

    An `observer` is told, for every tensor of the record, the tensor's own row-major bytes (a record holding
    several views of one storage is observed once per view): the source spans of a copied tensor, the bytes of
    a tensor from memory, the computed bytes of a computed one."""

    def __init__(
        self,
        out: BinaryIO,
        source: Source,
        copier: SpanCopier,
        crcs: CrcThread,
        progress: Progress | None,
        observer: EntryObserver | None = None,
    ) -> None:
        self._out = out
        self._source = source
        self._copier = copier
        self._crcs = crcs
        self._progress = progress
        self._observer = observer
        self._known: dict[str, dict[tuple[int, int], int]] = {}

    def write(self, record: StorageRecord) -> int | Future[int]:
        """Copy, write or compute the record's bytes."""
        crc = self._write(record)
        if self._observer is not None:
            for entry in record.entries:
                self._observer.finish(entry)
        return crc

    def _write(self, record: StorageRecord) -> int | Future[int]:
        fill = record.fill
        if record.nbytes == 0:
            return 0
        if isinstance(fill, FileBytes):
            if self._observer is not None:
                for entry in record.entries:
                    self._observer.observe_copy(entry, tuple(self._source.raw_spans(entry.sources[0]) or ()))
            return self._copy(fill.spans)
        if isinstance(fill, MemoryBytes):
            return self._from_memory(fill, record)
        return self._computed(fill, record.entries)

    def _copy(self, spans: Sequence[RawSpan]) -> int | Future[int]:
        """Spans copied by the kernel; the CRC of one span from the source zip's directory when it is a whole
        record there, else checksummed beside the copy."""
        crc: int | Future[int] | None = None
        if len(spans) == 1:
            span = spans[0]
            if span.file not in self._known:
                self._known[span.file] = stored_record_crcs(span.file)
            crc = self._known[span.file].get((span.offset, span.nbytes))
        if crc is None:
            crc = self._crcs.submit_all(spans)
        for span in spans:
            self._copier.add(span)
        self._copier.flush()
        return crc

    def _from_memory(self, fill: MemoryBytes, record: StorageRecord) -> int:
        if fill.compact:
            data = tensor_bytes(fill.tensor, record.entries[0].key)
            progress = self._progress
        else:
            storage = fill.tensor.untyped_storage()
            data = torch.empty(0, dtype=torch.uint8).set_(storage, fill.start, (record.nbytes,), (1,)).numpy()
            progress = None
            if self._progress:
                self._progress(min(record.nbytes, record.planned_bytes))
        view = memoryview(data)
        write_bytes(self._out, view, progress)
        if self._observer is not None:
            for entry in record.entries:
                own = view if fill.compact else tensor_bytes(self._source.load(entry.sources[0]), entry.key)
                for start in range(0, len(own), _OBSERVED):
                    self._observer.observe_bytes(entry, own[start : start + _OBSERVED])
        return zlib.crc32(view)

    def _computed(self, fill: ComputedBytes, entries: Sequence[PlanEntry]) -> int:
        """Computed now: streamed through the op's byte kernel when it has one, else computed whole."""
        entry = fill.entry
        writer = _CrcWriter(self._out)
        out = cast(BinaryIO, writer if self._observer is None else ObservedFile(writer, self._observer, entries))
        if not write_streamed(out, entry, self._source, self._progress):
            write_bytes(out, memoryview(tensor_bytes(materialize(entry, self._source), entry.key)), self._progress)
        return writer.crc


def tensor_bytes(tensor: Any, key: str) -> Any:
    """A tensor's elements in row-major order as a uint8 array (no copy when it is already contiguous)."""
    if tensor.layout != torch.strided:
        raise DestinationError(
            f"tensor '{key}' is a {tensor.layout} tensor; a torch zip file written by ckptx "
            f"holds dense tensors; make it dense in the recipe or leave it out"
        )
    flat = tensor.detach().cpu().resolve_conj().resolve_neg().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy()


class _CrcWriter:
    """Forwards writes to a file and keeps the CRC-32 of what went through."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self.crc = 0

    def write(self, data: Any) -> int:
        """Write `data` (bytes or a buffer) and add it to the CRC."""
        self.crc = zlib.crc32(data, self.crc)
        return self._out.write(data)
