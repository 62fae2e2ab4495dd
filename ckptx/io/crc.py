"""CRC-32 of raw spans without holding them in memory: read through short-lived memory maps in a background
thread (while the kernel copies the same bytes), or taken from the source zip's own directory."""

from __future__ import annotations

import mmap
import os
import struct
import threading
import zipfile
import zlib
from concurrent.futures import Future, ThreadPoolExecutor

from ckptx.errors import SourceError
from ckptx.io.source import RawSpan

WINDOW = 32 * 1024 * 1024  # bytes mapped at a time: what checksumming adds to resident memory
SMALL = 1024 * 1024  # spans up to this size are read with one pread instead
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")


def span_crc(span: RawSpan, stop: threading.Event | None = None, fd: int | None = None) -> int:
    """The CRC-32 of `span`'s bytes: read at once when small, else mapped WINDOW bytes at a time (each
    window unmapped before the next). `fd` is the file opened for reading, if the caller has it open."""
    own = fd is None
    fd = os.open(span.file, os.O_RDONLY) if fd is None else fd
    try:
        if os.fstat(fd).st_size < span.offset + span.nbytes:
            raise SourceError(f"{span.file}: ends before byte {span.offset + span.nbytes} of a tensor at "
                              f"{span.offset}; the file is truncated or changed")
        if span.nbytes <= SMALL:
            return zlib.crc32(os.pread(fd, span.nbytes, span.offset))
        return _mapped_crc(fd, span, stop)
    finally:
        if own:
            os.close(fd)


def _mapped_crc(fd: int, span: RawSpan, stop: threading.Event | None) -> int:
    crc = 0
    done = 0
    while done < span.nbytes:
        if stop is not None and stop.is_set():
            return 0
        start = span.offset + done
        base = start - start % mmap.ALLOCATIONGRANULARITY
        length = min(WINDOW, span.nbytes - done)
        with mmap.mmap(fd, start - base + length, prot=mmap.PROT_READ, offset=base) as window:
            with memoryview(window) as view:
                crc = zlib.crc32(view[start - base:], crc)
        done += length
    return crc


class CrcThread:
    """Checksums spans in one background thread, in the order they are submitted.

    `zlib.crc32` releases the GIL, so this runs beside the kernel copy of the same bytes. Use as a
    context manager: leaving it stops the thread (after at most one window) when a write failed, and
    closes the files it opened.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptx-crc")
        self._stop = threading.Event()
        self._fds: dict[str, int] = {}  # used by the worker thread only

    def submit(self, span: RawSpan) -> Future[int]:
        """Start (or queue) the checksum of `span`."""
        return self._pool.submit(self._crc, span)

    def _crc(self, span: RawSpan) -> int:
        fd = self._fds.get(span.file)
        if fd is None:
            fd = self._fds[span.file] = os.open(span.file, os.O_RDONLY)
        return span_crc(span, self._stop, fd)

    def __enter__(self) -> "CrcThread":
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None:
            self._stop.set()
        self._pool.shutdown(wait=True, cancel_futures=exc_type is not None)
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def stored_record_crcs(path: str) -> dict[tuple[int, int], int]:
    """(data offset, size) -> CRC-32 of every stored record of zip file `path`, as its central directory
    records it; empty when `path` is not a readable zip. A CRC of 0 for a non-empty record is left out
    (torch writes 0 when asked not to compute CRCs)."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":
                return {}
            with zipfile.ZipFile(f) as archive:
                infos = [i for i in archive.infolist()
                         if i.compress_type == zipfile.ZIP_STORED and i.file_size == i.compress_size and i.CRC]
            found = {}
            for info in infos:
                f.seek(info.header_offset)
                fields = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
                if fields[0] == b"PK\x03\x04":
                    data = info.header_offset + _LOCAL_HEADER.size + fields[-2] + fields[-1]
                    found[data, info.file_size] = info.CRC
            return found
    except (OSError, zipfile.BadZipFile, struct.error, ValueError):
        return {}
