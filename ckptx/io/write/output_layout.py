"""The header-first layout of an output: every file it writes, each file's size, and every byte range in it with
what fills it, decided from the plan (and the source's metadata) before any tensor data moves.

A byte range is a `Piece`: `nbytes` bytes at `offset` of file `file`, filled by

- `Copy`: spans of source files, one after another (an unchanged tensor, a sharded tensor's chunks, a file copied
  into a model folder), copied by the kernel;
- `Convert`: one span run through an op's byte kernel (a float cast), whole elements at a time;
- `Blocks`: spans run through an op's blockwise byte kernel (a dequantization reading a weight and its scales),
  piece by piece;
- `Quantize`: a tensor's values as a GGUF tensor type (float16, Q8_0...), a block of rows at a time, read from its
  span or computed with torch first;
- `Compute`: a plan entry computed with torch from the source;
- `Stored`: a tensor the source holds in memory (no span in a file): bytes of its storage;
- `Literal`: bytes known when laid out (headers, a pickle, an index, zip records' local headers).

Because every offset is fixed, the ranges can be written in any order, by any number of workers, into files sized
beforehand: the output's bytes never depend on who wrote what when. A piece may belong to a checksummed `group`
(a zip record, whose CRC-32 is combined from its pieces' by the coordinator) at byte `at` of it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from ckptx.dtypes import lookup
from ckptx.planning.entry import PlanEntry
from ckptx.planning.expr import OpNode, TakeInput, block_converter, byte_converter, unchanged
from ckptx.planning.expr import Piece as KernelPiece
from ckptx.planning.source import RawSpan, Source

__all__ = [
    "Blocks",
    "Compute",
    "Convert",
    "Copy",
    "Fill",
    "LaidFile",
    "LayoutBuilder",
    "Literal",
    "OutputLayout",
    "Piece",
    "Quantize",
    "Stored",
    "absolute",
    "tensor_fill",
]


@dataclass(frozen=True)
class Copy:
    """Bytes copied from files, one span after another; `known_crc` is their CRC-32 when the source's zip directory
    already holds it (a whole record copied)."""

    spans: tuple[RawSpan, ...]
    known_crc: int | None = None


@dataclass(frozen=True)
class Convert:
    """One span run through the byte kernel of `expr` (an op on one source tensor), whole elements at a time:
    `sizes` are the element sizes of the op's input and output."""

    span: RawSpan
    expr: OpNode
    sizes: tuple[int, int]


@dataclass(frozen=True)
class Blocks:
    """Spans of source files (one per input of `expr`, in input order) run through the op's blockwise byte kernel
    (see planning/expr.py `block_converter`): its pieces' outputs one after another."""

    spans: tuple[RawSpan, ...]
    expr: OpNode


@dataclass(frozen=True)
class Quantize:
    """A float tensor's values as GGUF tensor type `ggml` (`F16`, `Q8_0`...), `rows` rows of `row` values at a time:
    read from `span` (holding them as `dtype`), made by a blockwise byte kernel (`blocks`, whose pieces are whole
    rows: a rotary reordering), or else computed from `entry` with torch first."""

    ggml: str
    dtype: str
    row: int
    span: RawSpan | None = None
    entry: PlanEntry | None = None
    blocks: Blocks | None = None


@dataclass(frozen=True)
class Compute:
    """A plan entry computed with torch from the source, whole."""

    entry: PlanEntry


@dataclass(frozen=True)
class Stored:
    """A tensor the source holds in memory: bytes `start:start + nbytes` of the storage of `source.load(key)`, or,
    when `compact`, its own elements in row-major order."""

    key: str
    start: int
    compact: bool


@dataclass(frozen=True)
class Literal:
    """Bytes known when the output is laid out."""

    data: bytes


Fill = Copy | Convert | Blocks | Quantize | Compute | Stored | Literal


class Piece(NamedTuple):
    """`nbytes` bytes at `offset` of the layout's file number `file`, and what fills them.

    `key` names the tensor (or record) they belong to, for messages and observers; `group` the checksummed record
    they belong to (-1: none) and `at` where in that tensor or record they start. A named tuple: a layout of a
    trillion-parameter model has 100,000 of them.
    """

    file: int
    offset: int
    nbytes: int
    fill: Fill
    key: str = ""
    group: int = -1
    at: int = 0


@dataclass(frozen=True)
class LaidFile:
    """One file of the output: its name in the staging folder, where it is published, and its size."""

    name: str
    final: Path
    size: int


@dataclass(frozen=True)
class OutputLayout:
    """Every file of an output (in publishing order, the file that completes the set last) and every piece of them.

    `groups` holds the size of each checksummed record; `finish(crcs)`, given the CRC-32 of every group, gives the
    pieces that depend on them (a zip's data descriptors and central directory). `planned_bytes` is what progress
    counts (the plan's tensor bytes: a tensor shared by two keys counts twice). A piece holds the bytes of the tensor
    its key names, or of every tensor `holders` names for its key (a torch storage record viewed by several).
    """

    files: tuple[LaidFile, ...]
    pieces: tuple[Piece, ...]
    groups: tuple[int, ...] = ()
    finish: Callable[[Sequence[int]], list[Piece]] | None = field(default=None, compare=False)
    planned_bytes: int = 0
    holders: Mapping[str, tuple[str, ...]] = field(default_factory=dict, compare=False)


class LayoutBuilder:
    """Collects the files, pieces and checksummed groups of a layout."""

    def __init__(self) -> None:
        self.files: list[LaidFile] = []
        self.pieces: list[Piece] = []
        self.groups: list[int] = []
        self.holders: dict[str, tuple[str, ...]] = {}

    def file(self, name: str, final: Path, size: int = 0) -> int:
        """A new file; its index."""
        self.files.append(LaidFile(name, final, size))
        return len(self.files) - 1

    def resize(self, index: int, size: int) -> None:
        """The size of a file known only once its pieces are laid out."""
        file = self.files[index]
        self.files[index] = LaidFile(file.name, file.final, size)

    def group(self, nbytes: int) -> int:
        """A new checksummed record of `nbytes` bytes; its index."""
        self.groups.append(nbytes)
        return len(self.groups) - 1

    def add(self, piece: Piece) -> None:
        """One piece (an empty one is left out: there is nothing to write)."""
        if piece.nbytes:
            self.pieces.append(piece)

    def literal(self, file: int, offset: int, data: bytes, key: str = "") -> None:
        """Bytes known now, at `offset` of `file`."""
        self.add(Piece(file, offset, len(data), Literal(data), key))

    def build(
        self, finish: Callable[[Sequence[int]], list[Piece]] | None = None, planned_bytes: int = 0
    ) -> OutputLayout:
        """The layout."""
        return OutputLayout(
            tuple(self.files), tuple(self.pieces), tuple(self.groups), finish, planned_bytes, dict(self.holders)
        )


def absolute(span: RawSpan) -> RawSpan:
    """`span` with an absolute file path: a worker process (or a Dask worker in another folder) opens it as given."""
    return span if os.path.isabs(span.file) else RawSpan(os.path.abspath(span.file), span.offset, span.nbytes)


def tensor_fill(entry: PlanEntry, source: Source, nbytes: int | None = None) -> Fill:
    """How the bytes of one output tensor (of `nbytes` bytes, when the caller knows) are made: copied from the
    source's spans when unchanged and in files, streamed through the op's byte kernel when it has one (a float cast
    of a tensor with a raw span, a dequantization of tensors with raw spans), else computed whole with torch."""
    nbytes = entry.meta.nbytes if nbytes is None else nbytes
    if entry.is_copy:
        spans = source.raw_spans(entry.sources[0])
        if spans is not None and sum(span.nbytes for span in spans) == nbytes:
            return Copy(tuple(absolute(span) for span in spans))
        return Compute(entry)
    streamed = byte_converter(entry.expr)
    if streamed is not None and isinstance(entry.expr, OpNode):
        key = streamed[0]
        span = source.raw_span(key)
        meta = source.tensors[key]
        if span is not None and span.nbytes == meta.nbytes:
            if streamed[1] is unchanged:  # a reshape: the same bytes, copied in the kernel
                return Copy((absolute(span),))
            sizes = (lookup(meta.dtype).itemsize, lookup(entry.meta.dtype).itemsize)
            return Convert(absolute(span), entry.expr, sizes)
    blocks = block_converter(entry.expr) if isinstance(entry.expr, OpNode) else None
    if blocks is not None and isinstance(entry.expr, OpNode):
        found = [whole_span(source, key) for key in blocks[0]]
        spans = tuple(absolute(span) for span in found if span is not None)
        if len(spans) == len(found):
            return _taken(spans, blocks[1], nbytes) or Blocks(spans, entry.expr)
    return Compute(entry)


def _taken(spans: tuple[RawSpan, ...], pieces: Iterable[KernelPiece], nbytes: int) -> Copy | None:
    """A blockwise op whose pieces only take byte ranges of their inputs (a split along dimension 0, a
    concatenation) as a Copy of those ranges (kernel copies; shared blocks on copy-on-write), else None."""
    parts: list[RawSpan] = []
    for piece in pieces:
        if not isinstance(piece.convert, TakeInput):
            return None
        span = spans[piece.convert.which]
        start, stop = piece.ranges[piece.convert.which]
        if not 0 <= start <= stop <= span.nbytes:
            return None
        if parts and parts[-1].file == span.file and parts[-1].offset + parts[-1].nbytes == span.offset + start:
            last = parts.pop()  # consecutive ranges of one file: one span
            parts.append(RawSpan(last.file, last.offset, last.nbytes + stop - start))
        else:
            parts.append(RawSpan(span.file, span.offset + start, stop - start))
    return Copy(tuple(parts)) if sum(p.nbytes for p in parts) == nbytes else None


def whole_span(source: Source, key: str) -> RawSpan | None:
    """The raw bytes of source tensor `key` as one span of a file, when they are that (a tensor stored as it is)."""
    span = source.raw_span(key)
    return span if span is not None and span.nbytes == source.tensors[key].nbytes else None
