"""A computed tensor written through its op's byte kernel, in bounded memory and without torch: an elementwise op
(a float cast) chunk by chunk, a blockwise op (a dequantization reading a weight and its scales) piece by piece.
Callers compute the tensor with torch when `write_streamed` says it cannot."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import BinaryIO

from ckptx.errors import TensorOpError
from ckptx.io.spans import Progress, convert_span
from ckptx.planning.entry import PlanEntry
from ckptx.planning.expr import Piece, block_converter, byte_converter
from ckptx.planning.source import RawSpan, Source

__all__ = ["write_streamed"]


def write_streamed(out: BinaryIO, entry: PlanEntry, source: Source, progress: Progress | None = None) -> bool:
    """Write `entry`'s bytes through its op's byte kernel when it has one and its inputs are whole raw spans of the
    source; False (nothing written) when it cannot, and the caller computes the tensor with torch."""
    single = byte_converter(entry.expr)
    if single is not None:
        span = _whole_span(source, single[0])
        if span is None:
            return False
        _check_size(entry, convert_span(out, span, single[1], progress), (single[0],))
        return True
    blocks = block_converter(entry.expr)
    if blocks is None:
        return False
    keys, pieces = blocks
    spans = [_whole_span(source, key) for key in keys]
    if any(span is None for span in spans):
        return False
    try:
        written = _convert_pieces(out, [s for s in spans if s is not None], pieces, progress)
    except ValueError as exc:  # a kernel refusing its data (a block of inf to quantize)
        raise TensorOpError(f"tensor '{entry.key}' (from {', '.join(keys)}): {exc}") from None
    _check_size(entry, written, keys)
    return True


def _whole_span(source: Source, key: str) -> RawSpan | None:
    """The raw bytes of `key` as one span of a file, when they are that (a tensor stored as it is)."""
    span = source.raw_span(key)
    return span if span is not None and span.nbytes == source.tensors[key].nbytes else None


def _convert_pieces(out: BinaryIO, spans: Sequence[RawSpan], pieces: Iterable[Piece], progress: Progress | None) -> int:
    """Write each piece's output, reading its byte ranges of each input span with pread; the bytes written."""
    fds: dict[str, int] = {}
    written = 0
    try:
        for span in spans:
            if span.file not in fds:
                fds[span.file] = os.open(span.file, os.O_RDONLY)
        for piece in pieces:
            data = [_read(fds[span.file], span, start, stop) for span, (start, stop) in zip(spans, piece.ranges)]
            converted = piece.convert(data)
            out.write(converted)
            written += len(converted)
            if progress:
                progress(len(converted))
    finally:
        for fd in fds.values():
            os.close(fd)
    return written


def _read(fd: int, span: RawSpan, start: int, stop: int) -> bytes:
    if not 0 <= start <= stop <= span.nbytes:
        raise TensorOpError(f"{span.file}: a byte kernel asked for bytes {start}-{stop} of a {span.nbytes}-byte tensor")
    data = os.pread(fd, stop - start, span.offset + start)
    if len(data) < stop - start:
        raise TensorOpError(
            f"{span.file}: ended at byte {span.offset + start + len(data)} while reading a tensor of "
            f"{span.nbytes} bytes at {span.offset}; the file is truncated or changed"
        )
    return data


def _check_size(entry: PlanEntry, written: int, keys: Sequence[str]) -> None:
    if written != entry.meta.nbytes:
        raise TensorOpError(
            f"tensor '{entry.key}' (from {', '.join(keys)}): wrote {written} bytes, the plan says "
            f"{entry.meta.nbytes} for {entry.meta}; the source file is inconsistent"
        )
