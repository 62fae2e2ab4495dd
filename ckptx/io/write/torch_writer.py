"""Write a plan to a torch zip checkpoint (`.pth`/`.pt`/`.bin`/`.ckpt`) atomically, streamed tensor by tensor.

The file is what `torch.save(OrderedDict)` writes, record for record: `archive/data.pkl` (see
torch_pickle.py), `.format_version`, `.storage_alignment`, `byteorder`, one stored record per storage
`archive/data/<key>` (64-byte aligned, see zip_records.py), `version` and `.data/serialization_id`.
Which storages there are, and where each tensor lies in them, is decided first (torch_layout.py), then where
every record goes (zip_records.py): the whole file is laid out before a byte is written. Each record's bytes are
then written at their offset (units.py): spans of the source file are copied by the kernel (copy_file_range) and
checksummed through short memory maps (or the CRC is taken from the source zip's directory when a whole record is
copied), memory tensors are written from where they are, and computed tensors are computed one at a time. The
CRC-32 of a record written in pieces (by several workers) is combined from theirs; the data descriptors, the
serialization id and the central directory are written last. Torch is not imported unless a tensor is computed or
read from memory.

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
from pathlib import Path
from typing import Any

from ckptx.gcpause import without_gc
from ckptx.io.crc import stored_record_crcs
from ckptx.io.spans import BLOCK, Progress
from ckptx.io.write.output_layout import (
    Copy,
    Fill,
    LayoutBuilder,
    Literal,
    OutputLayout,
    Piece,
    Stored,
    absolute,
    tensor_fill,
)
from ckptx.io.write.torch_layout import FileBytes, MemoryBytes, StorageRecord, TorchLayout, plan_layout
from ckptx.io.write.torch_pickle import ITEM_SIZES, state_dict_pickle
from ckptx.io.write.writer import OutputOptions, Writer
from ckptx.io.write.zip_records import ZipLayout
from ckptx.planning.entry import PlanEntry
from ckptx.planning.source import Source

ARCHIVE = "archive"  # the top folder torch.save uses when it writes to a file object
_FORMAT_VERSION = (".format_version", b"1")
_HEAD = ((".storage_alignment", b"64"), ("byteorder", b"little"))
_SERIALIZATION_ID = ".data/serialization_id"


class TorchWriter(Writer):
    """One torch zip file (`.pth`, `.pt`, `.bin`, `.ckpt`): a state dict `torch.load` reads (also with
    `weights_only=True` and `mmap=True`), with `options.state_metadata` as its `_metadata` when given."""

    format = "torch"
    force_zip64 = False
    """Write the zip64 form of files over 4 GiB whatever the size (tests set it to see that form small)."""

    def files(self) -> list[Path]:
        """The file."""
        return [self.destination]

    def non_tensor_note(self, source: Source) -> str | None:
        """A state dict file holds tensors (and `_metadata`); the source's other entries are not carried over."""
        if not source.non_tensors:
            return None
        return f"non-tensor entries not carried over: {', '.join(sorted(source.non_tensors))}"

    @without_gc  # 100,000 tensors: 0.9 s instead of 2.2 s (each full collection walks the plan again)
    def layout(self, source: Source) -> OutputLayout:
        """The whole archive. Raises DestinationError, before writing a byte, for a tensor the format cannot hold
        (e.g. a quantized dtype)."""
        records = plan_layout(self.entries, source, self.destination)
        pickled = state_dict_pickle(records.tensors, self.options.state_metadata)
        builder = LayoutBuilder()
        finish = lay_out_archive(builder, self.destination, records, pickled, source, force_zip64=self.force_zip64)
        return builder.build(finish, planned_bytes=sum(entry.meta.nbytes for entry in self.entries))


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


def lay_out_archive(
    builder: LayoutBuilder,
    final: Path,
    layout: TorchLayout,
    pickled: bytes,
    source: Source,
    *,
    force_zip64: bool = False,
) -> Any:
    """The whole zip archive added to `builder` as one file: small records, every storage record of `layout` (a
    checksummed group each), `version` and the serialization id's header. Returns the finishing function: given the
    records' CRC-32s, the pieces that hold them (descriptors, the serialization id, the central directory)."""
    index = builder.file(final.name, final)
    archive = ZipLayout(ARCHIVE, force_zip64=force_zip64)

    def literal(name: str, data: bytes) -> None:
        offset, raw = archive.literal(name, data)
        builder.literal(index, offset, raw)

    literal("data.pkl", pickled)
    placements = [record_placement(record) for record in layout.records]
    for name, data in _HEAD if any(p is not None for p in placements) else (_FORMAT_VERSION, *_HEAD):
        literal(name, data)
    known: dict[str, dict[tuple[int, int], int]] = {}
    storages: list[tuple[int, int]] = []  # (zip record, checksummed group)
    for record, placement in zip(layout.records, placements):
        number, offset, header, data_offset = archive.add(f"data/{record.key}", record.nbytes, congruent_to=placement)
        builder.literal(index, offset, header)
        group = builder.group(record.nbytes)
        fill = _record_fill(record, source, known)
        builder.add(Piece(index, data_offset, record.nbytes, fill, record.entries[0].key, group))
        if len(record.entries) > 1:
            builder.holders[record.entries[0].key] = tuple(entry.key for entry in record.entries)
        storages.append((number, group))
    literal("version", b"3\n")
    sid, offset, header, sid_data = archive.add(_SERIALIZATION_ID, 40)
    builder.literal(index, offset, header)
    builder.resize(index, archive.size)

    def finish(crcs: Sequence[int]) -> list[Piece]:
        pieces = []
        for number, group in storages:
            archive.set_crc(number, crcs[group])
            descriptor = archive.descriptor(number)
            if descriptor is not None:
                pieces.append(Piece(index, descriptor[0], len(descriptor[1]), Literal(descriptor[1])))
        identity = serialization_id(archive.checksums()[:-1])
        archive.set_crc(sid, zlib.crc32(identity))
        pieces.append(Piece(index, sid_data, len(identity), Literal(identity)))
        descriptor = archive.descriptor(sid)
        assert descriptor is not None  # the id is 40 bytes
        for offset, data in (descriptor, archive.directory()):
            pieces.append(Piece(index, offset, len(data), Literal(data)))
        return pieces

    return finish


def _record_fill(record: StorageRecord, source: Source, known: dict[str, dict[tuple[int, int], int]]) -> Fill:
    """Where a storage record's bytes come from: copied spans (the CRC from the source zip's directory when the record
    is a whole record there), a tensor in memory, or the entry computed (streamed through a byte kernel if it can)."""
    fill = record.fill
    if isinstance(fill, FileBytes):
        crc = None
        if len(fill.spans) == 1:
            span = fill.spans[0]
            if span.file not in known:
                known[span.file] = stored_record_crcs(span.file)
            crc = known[span.file].get((span.offset, span.nbytes))
        return Copy(tuple(absolute(span) for span in fill.spans), crc)
    if isinstance(fill, MemoryBytes):
        return Stored(record.entries[0].sources[0], fill.start, fill.compact)
    return tensor_fill(fill.entry, source)


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


def serialization_id(checksums: Sequence[tuple[str, int | None]]) -> bytes:
    """40 digits naming the file's content, as torch writes one: 20 from the record names, 20 from their CRCs."""
    names = hashlib.blake2b("\n".join(sorted(n for n, _ in checksums)).encode(), digest_size=8).digest()
    crcs = zlib.crc32(b"".join((crc or 0).to_bytes(4, "little") for _, crc in checksums))
    return f"{int.from_bytes(names, 'little'):020d}{crcs:020d}".encode("ascii")
