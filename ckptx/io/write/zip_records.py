"""A streaming zip writer that lays records out exactly as torch's writer (miniz in PyTorchStreamWriter) does.

Every record is stored (no compression). Its local header carries no CRC or sizes (bit 3) and an extra field
`FB<len>ZZZ...` that pads the data to a multiple of 64 bytes (`.storage_alignment`), or, when the caller asks
for it, to an offset congruent to a given one modulo the file system block (so a record copied from a span of
another file keeps its bytes at their source offsets modulo the block: shared on copy-on-write file
systems, page-aligned copies elsewhere); a data descriptor
(`PK\\x07\\x08`, CRC, sizes) follows non-empty data. A record whose size or header offset reaches 4 GiB gets a
zip64 extra field and 8-byte sizes in its descriptor; the archive always ends with a zip64 end record, its
locator and the classic end record. This is the layout torch's reader assumes when it works out storage
offsets itself (`torch.utils.serialization.config.load.calculate_storage_offsets`).

The data of a record is written by the caller between `begin` and `end`; its CRC-32 may be given later
(`set_crc`, e.g. from a thread that checksums the bytes while they are copied) and is patched into the
descriptor before `finish` writes the central directory.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from typing import BinaryIO

from ckptx.errors import TensorOpError
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


class ZipRecords:
    """Append stored records to `out` (at its current end), then `finish` with the central directory.

    `prefix` is the archive's top folder (`archive` gives `archive/data.pkl`). `force_zip64` gives every
    record and the end records the zip64 form even below 4 GiB (the layout of big files, testable small).
    """

    def __init__(self, out: BinaryIO, prefix: str, *, force_zip64: bool = False) -> None:
        self._out = out
        self._prefix = prefix
        self._force = force_zip64
        self._records: list[_Record] = []
        self._crcs: list[int | None] = []
        self._late: list[int] = []
        self._open = False

    def begin(self, name: str, size: int, *, congruent_to: int | None = None) -> int:
        """Write the local header of record `prefix/name` that will hold `size` bytes; returns its index.
        Its data starts at the next multiple of 64, or, with `congruent_to`, at the next offset congruent to
        it modulo BLOCK (up to BLOCK - 1 bytes of padding)."""
        if self._open:
            raise RuntimeError(f"zip record {self._records[-1].name!r} is still open")
        raw = f"{self._prefix}/{name}".encode()
        offset = self._out.tell()
        big_size, big_offset = self._force or size >= _MAX32, self._force or offset >= _MAX32
        extra = _zip64_extra(size if big_size else None, size if big_size else None, offset if big_offset else None)
        start = offset + _LOCAL.size + len(raw) + len(extra) + 4
        padding = -start % ALIGNMENT if congruent_to is None else (congruent_to - start) % BLOCK
        extra += b"FB" + struct.pack("<H", padding) + b"Z" * padding
        flags = _UTF8 | (_HAS_DESCRIPTOR if size else 0)
        self._out.write(_LOCAL.pack(b"PK\x03\x04", 0, flags, 0, 0, 0, 0, 0, 0, len(raw), len(extra)) + raw + extra)
        self._records.append(_Record(raw, offset, start + padding, size, big_size, big_offset))
        self._crcs.append(None)
        self._open = True
        return len(self._records) - 1

    def written(self) -> int:
        """Bytes of data written so far into the open record."""
        return self._out.tell() - self._records[-1].data_offset

    def end(self, crc: int | None) -> None:
        """Close the open record after its data; `crc` None means it comes later through `set_crc`."""
        if not self._open:
            raise RuntimeError("no zip record is open")
        record, index = self._records[-1], len(self._records) - 1
        if self.written() != record.size:
            raise TensorOpError(
                f"{record.name.decode()}: {self.written()} bytes were written for a record of "
                f"{record.size}; the source changed while it was copied, convert again"
            )
        self._open = False
        if record.size == 0:
            self._crcs[index] = 0
            return
        self._crcs[index] = crc
        if crc is None:
            self._late.append(index)
        layout = _DESCRIPTOR64 if record.zip64 else _DESCRIPTOR32
        self._out.write(layout.pack(b"PK\x07\x08", crc or 0, record.size, record.size))

    def set_crc(self, index: int, crc: int) -> None:
        """The CRC-32 of a record closed with `end(None)`."""
        self._crcs[index] = crc

    def add(self, name: str, data: bytes) -> int:
        """A whole small record; returns its CRC-32."""
        crc = zlib.crc32(data)
        self.begin(name, len(data))
        self._out.write(data)
        self.end(crc)
        return crc

    def checksums(self) -> list[tuple[str, int | None]]:
        """Every record's name (without the prefix) and CRC-32 so far."""
        cut = len(self._prefix) + 1
        return [(r.name.decode()[cut:], crc) for r, crc in zip(self._records, self._crcs)]

    def finish(self) -> None:
        """Patch the CRCs given late into their descriptors, then write the central directory and end records."""
        self._patch_late_crcs()
        start = self._out.tell()
        for record, crc in zip(self._records, self._crcs):
            self._out.write(_central_entry(record, crc or 0))
        size = self._out.tell() - start
        count = len(self._records)
        zip64_end = self._out.tell()
        self._out.write(
            _ZIP64_END.pack(
                b"PK\x06\x06", _ZIP64_END.size - 12, 0x031E, _ZIP64_VERSION, 0, 0, count, count, size, start
            )
        )
        self._out.write(_ZIP64_LOCATOR.pack(b"PK\x06\x07", 0, zip64_end, 1))
        entries = 0xFFFF if self._force else min(count, 0xFFFF)
        self._out.write(
            _END.pack(
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

    def _patch_late_crcs(self) -> None:
        missing = [r.name.decode() for r, crc in zip(self._records, self._crcs) if crc is None]
        if missing or self._open:
            raise RuntimeError(f"zip records open or without a CRC-32: {', '.join(missing[:3])}")
        self._out.flush()
        fd = self._out.fileno()
        for index in self._late:
            record = self._records[index]
            os.pwrite(fd, struct.pack("<L", self._crcs[index]), record.data_offset + record.size + 4)


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
