"""CRC-32 of raw spans without holding them in memory: read through short-lived memory maps in background
threads (while the kernel copies the same bytes), or taken from the source zip's own directory.

A big span is checksummed in pieces on several threads and the pieces' CRCs are combined (`crc32_combine`, the
algorithm of zlib's own `crc32_combine`, which Python's zlib does not expose). Where the copy itself costs
nothing (a copy-on-write clone) the checksum is all the work: the CRC of 2 GiB in the page cache took
0.60-0.91 s on one thread and 0.32-0.34 s on two (2 cores).
"""

from __future__ import annotations

import functools
import mmap
import os
import struct
import threading
import zipfile
import zlib
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from ckptx.errors import SourceError
from ckptx.planning.source import RawSpan

WINDOW = 32 * 1024 * 1024  # bytes mapped at a time: what checksumming adds to resident memory
SMALL = 1024 * 1024  # spans up to this size are read with one pread instead
PIECE = 16 * 1024 * 1024  # spans of at least two pieces are split across the threads
_POLY = 0xEDB88320  # CRC-32 (reflected)
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")


def span_crc(span: RawSpan, stop: threading.Event | None = None, fd: int | None = None, crc: int = 0) -> int:
    """The CRC-32 of `span`'s bytes (continuing `crc`, the CRC of bytes before them): read at once when small,
    else mapped WINDOW bytes at a time (each window unmapped before the next). `fd` is the file opened for
    reading, if the caller has it open."""
    own = fd is None
    fd = os.open(span.file, os.O_RDONLY) if fd is None else fd
    try:
        if os.fstat(fd).st_size < span.offset + span.nbytes:
            raise SourceError(
                f"{span.file}: ends before byte {span.offset + span.nbytes} of a tensor at "
                f"{span.offset}; the file is truncated or changed"
            )
        if span.nbytes <= SMALL:
            return zlib.crc32(os.pread(fd, span.nbytes, span.offset), crc)
        return _mapped_crc(fd, span, stop, crc)
    finally:
        if own:
            os.close(fd)


def _mapped_crc(fd: int, span: RawSpan, stop: threading.Event | None, crc: int) -> int:
    done = 0
    while done < span.nbytes:
        if stop is not None and stop.is_set():
            return 0
        start = span.offset + done
        base = start - start % mmap.ALLOCATIONGRANULARITY
        length = min(WINDOW, span.nbytes - done)
        with mmap.mmap(fd, start - base + length, prot=mmap.PROT_READ, offset=base) as window:
            with memoryview(window) as view:
                crc = zlib.crc32(view[start - base :], crc)
        done += length
    return crc


class CrcThread:
    """Checksums spans in one background thread, in the order they are submitted.

    `zlib.crc32` releases the GIL, so this runs beside the kernel copy of the same bytes. Use as a
    context manager: leaving it stops the thread (after at most one window) when a write failed, and
    closes the files it opened.
    """

    def __init__(self, threads: int | None = None) -> None:
        self._threads = threads or min(4, os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(max_workers=self._threads, thread_name_prefix="ckptx-crc")
        self._stop = threading.Event()
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def submit(self, span: RawSpan) -> Future[int]:
        """Start (or queue) the checksum of `span`: in up to one piece per thread when it is big."""
        pieces = min(self._threads, span.nbytes // PIECE)
        if pieces < 2:
            return self._pool.submit(self._crc, span)
        size = -(-span.nbytes // pieces)
        parts = [
            (
                self._pool.submit(self._crc, RawSpan(span.file, span.offset + start, min(size, span.nbytes - start))),
                min(size, span.nbytes - start),
            )
            for start in range(0, span.nbytes, size)
        ]
        return _combined(parts)

    def submit_all(self, spans: Sequence[RawSpan]) -> Future[int]:
        """Start the checksum of the bytes of `spans` one after another: a big span as `submit` does, runs of
        smaller ones (a DCP tensor sharded on a later dimension is one span per row of each chunk) as one task
        each that carries the CRC from span to span. 32,768 spans of 2 KiB took 2.6 s as one task
        each (then combined), 0.18 s in runs."""
        parts: list[tuple[Future[int], int]] = []
        run: list[RawSpan] = []
        size = 0

        def flush() -> None:
            nonlocal size
            if run:
                parts.append((self._pool.submit(self._crc_run, tuple(run)), size))
                run.clear()
                size = 0

        for span in spans:
            if span.nbytes >= 2 * PIECE:
                flush()
                parts.append((self.submit(span), span.nbytes))
                continue
            run.append(span)
            size += span.nbytes
            if size >= PIECE:
                flush()
        flush()
        return parts[0][0] if len(parts) == 1 else _combined(parts)

    def _crc(self, span: RawSpan) -> int:
        return span_crc(span, self._stop, self._fd(span.file))

    def _crc_run(self, spans: tuple[RawSpan, ...]) -> int:
        crc = 0
        for span in spans:
            crc = span_crc(span, self._stop, self._fd(span.file), crc)
        return crc

    def _fd(self, file: str) -> int:
        with self._lock:
            fd = self._fds.get(file)
            if fd is None:
                fd = self._fds[file] = os.open(file, os.O_RDONLY)
            return fd

    def __enter__(self) -> CrcThread:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None:
            self._stop.set()
        self._pool.shutdown(wait=True, cancel_futures=exc_type is not None)
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _combined(parts: list[tuple[Future[int], int]]) -> Future[int]:
    """A future of the CRC-32 of consecutive pieces, given each piece's future CRC and length."""
    whole: Future[int] = Future()
    remaining = [len(parts)]
    lock = threading.Lock()

    def one_done(_: Future[int]) -> None:
        with lock:
            remaining[0] -= 1
            if remaining[0]:
                return
        if any(part.cancelled() for part, _ in parts):  # the writer failed and stopped the threads
            whole.cancel()
            return
        failed = next((part.exception() for part, _ in parts if part.exception() is not None), None)
        if failed is not None:
            whole.set_exception(failed)
            return
        crc = 0
        for part, length in parts:
            crc = crc32_combine(crc, part.result(), length)
        whole.set_result(crc)

    for part, _ in parts:
        part.add_done_callback(one_done)
    return whole


def crc32_combine(crc1: int, crc2: int, length2: int) -> int:
    """The CRC-32 of A + B from the CRC-32 of A, that of B and B's length (zlib's crc32_combine): crc1 times
    x^(8 * length2) modulo the CRC polynomial, plus crc2."""
    return _multiply(_x_power(8 * length2), crc1) ^ crc2


def _multiply(a: int, b: int) -> int:
    """a times b modulo the CRC polynomial (bit-reflected, as zlib's multmodp)."""
    product = 0
    mask = 1 << 31
    while a:
        if a & mask:
            product ^= b
            a ^= mask
        mask >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1
    return product


@functools.lru_cache(maxsize=256)
def _x_power(n: int) -> int:
    """x^n modulo the CRC polynomial, by squaring (zlib's x2nmodp); cached, since the pieces combined are mostly of
    a few lengths (a write's chunks): a combine then costs one multiplication (10 us) instead of 0.5 ms."""
    result, square = 1 << 31, 1 << 30  # x^0, x^1
    while n:
        if n & 1:
            result = _multiply(square, result)
        square = _multiply(square, square)
        n >>= 1
    return result


def stored_record_crcs(path: str) -> dict[tuple[int, int], int]:
    """(data offset, size) -> CRC-32 of every stored record of zip file `path`, as its central directory
    records it; empty when `path` is not a readable zip. A CRC of 0 for a non-empty record is left out
    (torch writes 0 when asked not to compute CRCs)."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":
                return {}
            with zipfile.ZipFile(f) as archive:
                infos = [
                    i
                    for i in archive.infolist()
                    if i.compress_type == zipfile.ZIP_STORED and i.file_size == i.compress_size and i.CRC
                ]
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
