"""Raw tensor bytes: read one span into a fresh tensor, read or write bytes at fixed offsets, or copy a span
file-to-file in the kernel to a fixed offset of the destination.

None of these goes through a memory map, so the pages read never count toward the process's resident memory.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from ckptx._lazy import lazy_module
from ckptx.dtypes import TensorMeta, torch_dtype
from ckptx.errors import SourceError
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
CONVERT_CHUNK = 8 * 1024 * 1024  # a multiple of every element size: what one byte-kernel call converts
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


def _ended_early(span: RawSpan, done: int) -> SourceError:
    return SourceError(
        f"{span.file}: ended at byte {span.offset + done} while reading a tensor of "
        f"{span.nbytes} bytes at {span.offset}; the file is truncated or changed"
    )


def read_exact(fd: int, span: RawSpan) -> bytes:
    """The bytes of `span` from the open file `fd`; SourceError when the file ends first."""
    data = os.pread(fd, span.nbytes, span.offset)
    if len(data) < span.nbytes:  # a regular file gives all asked for unless it ends
        raise _ended_early(span, len(data))
    return data


def write_at(fd: int, data: bytes | memoryview, offset: int) -> None:
    """Write all of `data` at `offset` of the open file `fd` (its position does not move)."""
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done : done + CHUNK], offset + done)


def copy_pieces(span: RawSpan, at: int) -> list[tuple[RawSpan, int]]:
    """`span`, to be copied to destination offset `at`, cut into the pieces separate copies take: a head up to the
    next FOLIO boundary of the destination, then CHUNK bytes each (so copies run side by side and progress moves)."""
    pieces = []
    done = 0
    while done < span.nbytes:
        position = at + done
        want = min(-position % FOLIO or CHUNK, CHUNK, span.nbytes - done)
        pieces.append((RawSpan(span.file, span.offset + done, want), position))
        done += want
    return pieces


def copy_span(src_fd: int, dst_fd: int, span: RawSpan, at: int) -> None:
    """Copy `span` (of the file open as `src_fd`) to offset `at` of `dst_fd`: in the kernel (copy_file_range, which
    clones blocks on a copy-on-write file system), else through memory."""
    done = _kernel_copy(src_fd, dst_fd, span, at)
    while done < span.nbytes:
        chunk = os.pread(src_fd, min(CHUNK, span.nbytes - done), span.offset + done)
        if not chunk:
            raise _ended_early(span, done)
        write_at(dst_fd, chunk, at + done)
        done += len(chunk)


def _kernel_copy(src_fd: int, dst_fd: int, span: RawSpan, at: int) -> int:
    """Copy `span` to destination offset `at` with copy_file_range, in calls that end first on a block boundary of
    the destination (an unaligned head can't be cloned), then on a FOLIO boundary, then every CHUNK bytes; returns
    the bytes copied before any fallback."""
    copy_range = getattr(os, "copy_file_range", None)
    done = 0
    while copy_range is not None and done < span.nbytes:
        position = at + done
        want = min(-position % BLOCK or -position % FOLIO or CHUNK, CHUNK, span.nbytes - done)
        try:
            got = copy_range(src_fd, dst_fd, want, span.offset + done, position)
        except OSError:
            break
        if got <= 0:
            break
        done += got
    return done
