"""Raw tensor bytes: read one span into a fresh tensor, or copy runs of spans file-to-file in the kernel.

Neither goes through a memory map, so the pages read never count toward the process's resident memory.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, BinaryIO

from ckptx._lazy import lazy_module
from ckptx.dtypes import TensorMeta, torch_dtype
from ckptx.errors import SourceError, TensorOpError
from ckptx.planning.expr import Converter
from ckptx.planning.source import RawSpan

if TYPE_CHECKING:  # pragma: no cover
    import torch
else:
    torch = lazy_module("torch")


CHUNK = 64 * 1024 * 1024
BLOCK = 4096  # file system block size the writers align copies to (copy-on-write clones need it)
# Copies are issued from destination offsets that are multiples of FOLIO. On ext4 (Linux 6.18, large folios)
# a 2 GiB copy_file_range loop took 1.17 s from 64 KiB-aligned destination offsets and 1.65 s from 4 KiB-aligned
# ones (page cache warm, caches dropped between runs; the source offset's alignment made no difference).
FOLIO = 64 * 1024
CONVERT_CHUNK = 8 * 1024 * 1024  # a multiple of every element size; numpy temporaries stay a few times this
Progress = Callable[[int], None]


def read_span(span: RawSpan, meta: TensorMeta) -> torch.Tensor:
    """The tensor whose row-major little-endian bytes are `span`, read with pread into new memory."""
    data = torch.empty(span.nbytes, dtype=torch.uint8)
    if span.nbytes:
        view = data.numpy().data
        fd = os.open(span.file, os.O_RDONLY)
        try:
            done = 0
            while done < span.nbytes:
                got = os.preadv(fd, [view[done : done + CHUNK]], span.offset + done)
                if got <= 0:
                    raise _ended_early(span, done)
                done += got
        finally:
            os.close(fd)
    return data.view(torch_dtype(meta.dtype)).reshape(meta.shape)


def convert_span(out: BinaryIO, span: RawSpan, convert: Converter, progress: Progress | None = None) -> int:
    """Write `convert(piece)` for each piece of `span`, read in CONVERT_CHUNK bytes (whole elements) at a time:
    an elementwise op streamed in bounded memory. Returns the bytes written."""
    written = 0
    fd = os.open(span.file, os.O_RDONLY)
    try:
        for start in range(0, span.nbytes, CONVERT_CHUNK):
            want = min(CONVERT_CHUNK, span.nbytes - start)
            piece = os.pread(fd, want, span.offset + start)
            if len(piece) < want:
                raise _ended_early(span, start + len(piece))
            converted = convert(piece)
            out.write(converted)
            written += len(converted)
            if progress:
                progress(len(converted))
    finally:
        os.close(fd)
    return written


def _ended_early(span: RawSpan, done: int) -> SourceError:
    return SourceError(
        f"{span.file}: ended at byte {span.offset + done} while reading a tensor of "
        f"{span.nbytes} bytes at {span.offset}; the file is truncated or changed"
    )


class SpanCopier:
    """Append spans of source files to `out`; adjacent spans of one file are merged into one kernel copy.

    `add` only queues a span; call `flush` before writing anything else to `out`, and `close` at the end.
    """

    def __init__(self, out: BinaryIO, progress: Progress | None = None) -> None:
        self._out = out
        self._progress = progress
        self._pending: RawSpan | None = None
        self._fds: dict[str, int] = {}

    def add(self, span: RawSpan) -> None:
        """Queue `span` after everything queued or written so far."""
        pending = self._pending
        if pending is not None and pending.file == span.file and pending.offset + pending.nbytes == span.offset:
            self._pending = RawSpan(span.file, pending.offset, pending.nbytes + span.nbytes)
            return
        self.flush()
        self._pending = span

    def flush(self) -> None:
        """Copy the queued run of bytes now."""
        span, self._pending = self._pending, None
        if span is None or span.nbytes == 0:
            return
        fd = self._fds.get(span.file)
        if fd is None:
            fd = self._fds[span.file] = os.open(span.file, os.O_RDONLY)
            if hasattr(os, "posix_fadvise"):  # bigger read-ahead, as cp asks for
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        self._out.flush()
        done = _kernel_copy(fd, self._out.fileno(), span, self._out.tell(), self._progress)
        self._out.seek(0, os.SEEK_END)
        if done < span.nbytes:
            _buffered_copy(fd, self._out, RawSpan(span.file, span.offset + done, span.nbytes - done), self._progress)

    def close(self) -> None:
        """Copy what is queued and close the source files."""
        try:
            self.flush()
        finally:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __enter__(self) -> SpanCopier:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None:
            self._pending = None
        self.close()


def write_bytes(out: BinaryIO, data: memoryview, progress: Progress | None = None) -> None:
    """Write `data` in chunks, reporting each chunk to `progress`."""
    for start in range(0, len(data), CHUNK):
        piece = data[start : start + CHUNK]
        out.write(piece)
        if progress:
            progress(len(piece))


def _kernel_copy(src_fd: int, dst_fd: int, span: RawSpan, at: int, progress: Progress | None) -> int:
    """Copy `span` to destination offset `at` (the file's position) with copy_file_range, in calls that end
    first on a block boundary of the destination (an unaligned head can't be cloned), then on a FOLIO boundary,
    then every CHUNK bytes (so progress moves); returns the bytes copied before any fallback."""
    copy_range = getattr(os, "copy_file_range", None)
    done = 0
    while copy_range is not None and done < span.nbytes:
        position = at + done
        want = min(-position % BLOCK or -position % FOLIO or CHUNK, CHUNK, span.nbytes - done)
        try:
            got = copy_range(src_fd, dst_fd, want, span.offset + done)
        except OSError:
            break
        if got <= 0:
            break
        done += got
        if progress:
            progress(got)
    return done


def _buffered_copy(src_fd: int, out: BinaryIO, span: RawSpan, progress: Progress | None) -> None:
    done = 0
    while done < span.nbytes:
        chunk = os.pread(src_fd, min(CHUNK, span.nbytes - done), span.offset + done)
        if not chunk:
            raise TensorOpError(f"{span.file}: ended early while copying tensor bytes (file changed or truncated)")
        out.write(chunk)
        done += len(chunk)
        if progress:
            progress(len(chunk))
