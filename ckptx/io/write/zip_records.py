"""Zip records laid out exactly as torch's writer (miniz in PyTorchStreamWriter) lays them out, before any is written.

Every record is stored (no compression). Its local header carries no CRC or sizes (bit 3) and an extra field
`FB<len>ZZZ...` that pads the data to a multiple of 64 bytes (`.storage_alignment`), or, when the caller asks
for it, to an offset congruent to a given one modulo the file system block (so a record copied from a span of
another file keeps its bytes at their source offsets modulo the block: shared on copy-on-write file
systems, page-aligned copies elsewhere); a data descriptor
(`PK\\x07\\x08`, CRC, sizes) follows non-empty data. A record whose size or header offset reaches 4 GiB gets a
zip64 extra field and 8-byte sizes in its descriptor; the archive always ends with a zip64 end record, its
locator and the classic end record. This is the layout torch's reader assumes when it works out storage
offsets itself (`torch.utils.serialization.config.load.calculate_storage_offsets`).

`ZipLayout` only computes: where each record's header and data go and the header's bytes, so the data can be written
later at fixed offsets by anyone; the descriptors and the central directory, which hold the CRC-32s, are made once
those are known (`set_crc`, `descriptor`, `directory`). Sizes never depend on a CRC, so the file's size is known
from the start.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from ckptx.io.spans import BLOCK

ALIGNMENT = 64
_MAX32 = 0xFFFFFFFF
_LOCAL = struct.Struct("<4s5H3L2H")
_CENTRAL = struct.Struct("<4s6H3L5H2L")
_DESCRIPTOR32 = struct.Struct("<4s3L")
_DESCRIPTOR64 = struct.Struct("<4sL2Q")
_ZIP64_END = struct.Struct("<4sQ2H2L4Q")
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_END = struct.Struct("<4s4H2LH")
_UTF8, _HAS_DESCRIPTOR = 0x0800, 0x0008
_ZIP64_VERSION = 45


@dataclass(frozen=True)
class _Record:
    """Where one record lies and whether its size or header offset needs the zip64 form."""

    name: bytes
    header_offset: int
    data_offset: int
    size: int
    big_size: bool
    big_offset: bool

    @property
    def zip64(self) -> bool:
        """A zip64 record: 8-byte sizes in its descriptor."""
        return self.big_size or self.big_offset


class ZipLayout:
    """Stored records one after another from offset 0, then the central directory.

    `prefix` is the archive's top folder (`archive` gives `archive/data.pkl`). `force_zip64` gives every
    record and the end records the zip64 form even below 4 GiB (the layout of big files, testable small).
    """

    def __init__(self, prefix: str, *, force_zip64: bool = False) -> None:
        self._prefix = prefix
        self._force = force_zip64
        self._records: list[_Record] = []
        self._crcs: list[int | None] = []
        self.position = 0
        """Where the next record (or the central directory) starts."""

    def add(self, name: str, size: int, *, congruent_to: int | None = None) -> tuple[int, int, bytes, int]:
        """Lay out record `prefix/name` of `size` bytes after the ones before it: its index, its header's offset,
        the header's bytes and its data's offset. The data starts at the next multiple of 64, or, with
        `congruent_to`, at the next offset congruent to it modulo BLOCK (up to BLOCK - 1 bytes of padding)."""
        raw = f"{self._prefix}/{name}".encode()
        offset = self.position
        big_size, big_offset = self._force or size >= _MAX32, self._force or offset >= _MAX32
        extra = _zip64_extra(size if big_size else None, size if big_size else None, offset if big_offset else None)
        start = offset + _LOCAL.size + len(raw) + len(extra) + 4
        padding = -start % ALIGNMENT if congruent_to is None else (congruent_to - start) % BLOCK
        extra += b"FB" + struct.pack("<H", padding) + b"Z" * padding
        flags = _UTF8 | (_HAS_DESCRIPTOR if size else 0)
        header = _LOCAL.pack(b"PK\x03\x04", 0, flags, 0, 0, 0, 0, 0, 0, len(raw), len(extra)) + raw + extra
        record = _Record(raw, offset, start + padding, size, big_size, big_offset)
        self._records.append(record)
        self._crcs.append(0 if size == 0 else None)
        self.position = record.data_offset + size + (_descriptor_layout(record).size if size else 0)
        return len(self._records) - 1, offset, header, record.data_offset

    def literal(self, name: str, data: bytes) -> tuple[int, bytes]:
        """A whole small record whose data is known now: its offset and its bytes (header, data, descriptor)."""
        index, offset, header, _ = self.add(name, len(data))
        self.set_crc(index, zlib.crc32(data))
        return offset, header + data + (self.descriptor(index) or (0, b""))[1]

    def set_crc(self, index: int, crc: int) -> None:
        """The CRC-32 of record `index`'s data."""
        self._crcs[index] = crc

    def descriptor(self, index: int) -> tuple[int, bytes] | None:
        """Record `index`'s data descriptor (its CRC must be set) and where it goes; None for an empty record."""
        record, crc = self._records[index], self._crcs[index]
        if record.size == 0:
            return None
        if crc is None:
            raise RuntimeError(f"zip record {record.name.decode()!r} has no CRC-32 yet")
        layout = _descriptor_layout(record)
        return record.data_offset + record.size, layout.pack(b"PK\x07\x08", crc, record.size, record.size)

    def checksums(self) -> list[tuple[str, int | None]]:
        """Every record's name (without the prefix) and CRC-32 so far."""
        cut = len(self._prefix) + 1
        return [(r.name.decode()[cut:], crc) for r, crc in zip(self._records, self._crcs)]

    @property
    def size(self) -> int:
        """The archive's size: the records, then the central directory and the end records."""
        return self.position + len(self._directory([0] * len(self._records)))

    def directory(self) -> tuple[int, bytes]:
        """The central directory and end records (every CRC set) and where they go."""
        missing = [r.name.decode() for r, crc in zip(self._records, self._crcs) if crc is None]
        if missing:
            raise RuntimeError(f"zip records without a CRC-32: {', '.join(missing[:3])}")
        return self.position, self._directory([crc or 0 for crc in self._crcs])

    def _directory(self, crcs: list[int]) -> bytes:
        start = self.position
        central = b"".join(_central_entry(record, crc) for record, crc in zip(self._records, crcs))
        count = len(self._records)
        zip64_end = start + len(central)
        size = len(central)
        entries = 0xFFFF if self._force else min(count, 0xFFFF)
        return (
            central
            + _ZIP64_END.pack(
                b"PK\x06\x06", _ZIP64_END.size - 12, 0x031E, _ZIP64_VERSION, 0, 0, count, count, size, start
            )
            + _ZIP64_LOCATOR.pack(b"PK\x06\x07", 0, zip64_end, 1)
            + _END.pack(
                b"PK\x05\x06",
                0,
                0,
                entries,
                entries,
                _MAX32 if self._force else min(size, _MAX32),
                _MAX32 if self._force else min(start, _MAX32),
                0,
            )
        )


def _descriptor_layout(record: _Record) -> struct.Struct:
    return _DESCRIPTOR64 if record.zip64 else _DESCRIPTOR32


def _central_entry(record: _Record, crc: int) -> bytes:
    """The central directory entry; sizes and offset that reach 4 GiB move to a zip64 extra field."""
    big_size, big_offset = record.big_size, record.big_offset
    extra = _zip64_extra(
        record.size if big_size else None,
        record.size if big_size else None,
        record.header_offset if big_offset else None,
    )
    flags = _UTF8 | (_HAS_DESCRIPTOR if record.size else 0)
    size = _MAX32 if big_size else record.size
    return (
        _CENTRAL.pack(
            b"PK\x01\x02",
            0,
            _ZIP64_VERSION if record.zip64 else 0,
            flags,
            0,
            0,
            0,
            crc,
            size,
            size,
            len(record.name),
            len(extra),
            0,
            0,
            0,
            0,
            _MAX32 if big_offset else record.header_offset,
        )
        + record.name
        + extra
    )


def _zip64_extra(size: int | None, compressed: int | None, offset: int | None) -> bytes:
    """The zip64 extended information field with the values that are given (none: no field)."""
    values = [v for v in (size, compressed, offset) if v is not None]
    if not values:
        return b""
    return struct.pack(f"<2H{len(values)}Q", 0x0001, 8 * len(values), *values)
