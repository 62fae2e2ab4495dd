"""Work units: byte ranges of one staged output file, each written by one worker at its fixed offsets.

`plan_units` cuts a layout's pieces (see layout.py) into units: by output file, and a big file into runs of pieces
of about the same cost (a piece bigger than that is cut at byte boundaries: a copy anywhere, a byte-kernel
conversion at whole elements). `run_unit` writes one unit into its pre-sized staged file, in this process or in a
worker (it pickles: pieces, paths, how to open the source again); what it did (bytes, the CRC-32 of every
checksummed range, an observer's records) comes back as a `UnitResult` for the coordinator to check and merge.

Inside a unit, byte-kernel conversions are cut into chunks that are read and converted on a small thread pool
(numpy, zlib and the reads release the GIL), and CRC-32s of copied spans are taken there too; the unit's own thread
writes the chunks, in order, and copies spans with copy_file_range. One writer per file: two threads (or two
processes) writing one file at once on ext4 took 1.2-2.1 s for 768 MiB where one took 0.3-0.5 s (the inode's
write lock). At most two chunks per thread are in flight (memory stays a few chunks). Each written range is handed
to the kernel's writeback at once (posix_fadvise DONTNEED), so the disk writes while the unit computes and the
final fsync has little left: 768 MiB written while computing took 1.5-1.7 s so and 1.9-2.9 s with the fsync at
the end (2-core machine under load). Computed tensors (torch) are computed one at a time in the unit's own thread.
`write_piece` is the one function that puts one piece's bytes at their offset: an observer passed to the unit sees
each tensor's bytes there (copied spans, or the bytes computed), and progress is reported there.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from ckptx._lazy import lazy_module
from ckptx.dtypes import lookup
from ckptx.errors import DestinationError, TensorOpError
from ckptx.gcpause import without_gc
from ckptx.io import spans
from ckptx.io.crc import span_crc
from ckptx.io.gguf import as_float32, quantize, type_named
from ckptx.io.read.open import SourceSpec
from ckptx.io.spans import CHUNK, FOLIO, Progress, copy_pieces, copy_span, read_exact, write_at
from ckptx.io.write.output_layout import Blocks, Compute, Convert, Copy, Literal, OutputLayout, Piece, Quantize, Stored
from ckptx.planning.execute import materialize
from ckptx.planning.expr import block_converter, byte_converter
from ckptx.planning.source import RawSpan, Source
from ckptx.workers.cores import kernel_threads

if TYPE_CHECKING:  # pragma: no cover
    import torch
else:
    torch = lazy_module("torch")

__all__ = [
    "CLAIM_SIZE",
    "Observer",
    "UnitResult",
    "WorkUnit",
    "plan_units",
    "run_unit",
    "tensor_bytes",
    "worker_name",
    "write_piece",
]

CLAIM_SIZE = 128  # bytes per unit in the claims file: the `host:pid` of the worker that took it
MIN_UNIT = 16 * 1024 * 1024  # no unit is planned smaller (in cost) than this: a unit costs a task and a file open
COMPUTE_COST = 4  # a byte computed with torch costs about this many copied bytes; a converted byte 2
QUANTIZE_ROWS_BYTES = 8 * 1024 * 1024  # float32 bytes of rows quantized at once for a GGUF tensor


class Observer(Protocol):
    """Sees each output tensor's bytes as a unit writes them (a provenance card, a digest), in the unit's own thread:
    copied bytes as the source span they come from, computed bytes as they are; `at` is where in tensor (or zip
    record) `key` they start. `result()` must pickle: it travels back in the unit's result."""

    def copied(self, key: str, at: int, span: RawSpan) -> None:
        """`span`'s bytes were copied to byte `at` of `key`."""

    def computed(self, key: str, at: int, data: memoryview) -> None:
        """`data` was written at byte `at` of `key`."""

    def result(self) -> Any:
        """What the observer found (picklable), once every piece is written."""

    def abandon(self) -> None:
        """The unit failed: stop, nothing more is asked."""


class ObserverFactory(Protocol):
    """Makes a unit's observer in the process that runs it; it pickles (it travels with the unit)."""

    def narrowed(self, keys: Collection[str]) -> ObserverFactory:
        """The factory for a unit that writes the pieces of `keys` only (what it carries to the worker)."""

    def __call__(self, source: Callable[[], Source]) -> Observer:
        """The observer; `source` opens the unit's source (for bytes it must read itself)."""


@dataclass(frozen=True)
class WorkUnit:
    """Pieces of one staged file that one worker writes (`pieces` in file order, at their offsets).

    `source` opens the source again when a piece needs its tensors (computed or held in memory); `threads` is the
    unit's thread pool (None: the worker's share, see ckptx.workers.cores); `sync` fsyncs the file before the
    unit reports (a worker on another machine); `claims` is the file in which the unit records its worker first.
    """

    index: int
    count: int
    path: str
    name: str
    pieces: tuple[Piece, ...]
    source: SourceSpec | None = None
    threads: int | None = None
    sync: bool = False
    claims: str | None = None
    observer: ObserverFactory | None = None

    @property
    def nbytes(self) -> int:
        """The bytes the unit writes."""
        return sum(piece.nbytes for piece in self.pieces)

    def describe(self) -> str:
        """`unit 3 of 8 (model-00002-of-00004.safetensors, bytes 1,024-5,120: 'a.weight' to 'b.bias')`."""
        first, last = self.pieces[0], self.pieces[-1]
        keys = f"'{first.key}'" if first.key == last.key else f"'{first.key}' to '{last.key}'"
        return (
            f"unit {self.index + 1} of {self.count} ({self.name}, bytes {first.offset:,}-"
            f"{last.offset + last.nbytes:,}: {keys})"
        )


class CheckedRange(NamedTuple):
    """The CRC-32 of `nbytes` bytes at byte `at` of checksummed group `group`."""

    group: int
    at: int
    nbytes: int
    crc: int


@dataclass(frozen=True)
class UnitResult:
    """What one unit wrote: its bytes, the CRC-32 of every checksummed range, the observer's records, and where."""

    index: int
    worker: str
    nbytes: int
    crcs: tuple[CheckedRange, ...] = ()
    observed: Any = None
    seconds: float = 0.0
    peak_rss: int = 0
    """The peak resident memory of the worker process so far, in bytes (0 where the platform does not say)."""


def worker_name() -> str:
    """`host:pid` of this process."""
    return f"{socket.gethostname()}:{os.getpid()}"


# --- planning units -------------------------------------------------------------------------------------------


def cost(piece: Piece) -> int:
    """Roughly what a piece costs to write, in copied bytes."""
    fill = piece.fill
    if isinstance(fill, Convert):
        return fill.span.nbytes + piece.nbytes
    if isinstance(fill, Blocks):
        return sum(span.nbytes for span in fill.spans) + piece.nbytes
    if isinstance(fill, Quantize | Compute | Stored):
        return COMPUTE_COST * piece.nbytes
    return 0 if isinstance(fill, Literal) else piece.nbytes


@without_gc
def plan_units(
    layout: OutputLayout, folder: str, parts: int, observer: ObserverFactory | None = None, **options: Any
) -> list[WorkUnit]:
    """The layout's pieces (all but the literal ones, which the coordinator writes) as about `parts` units of equal
    cost: runs of consecutive pieces of one file, big pieces cut in pieces of about that cost. One part gives one
    unit per file. `options` are the WorkUnit fields every unit shares (source, threads, sync, claims); `observer` is
    narrowed to each unit's tensors, and with one no piece is cut (a tensor's SHA-256 is taken in order, by one
    unit)."""
    by_file: list[list[Piece]] = [[] for _ in layout.files]
    for piece in layout.pieces:
        if not isinstance(piece.fill, Literal):
            by_file[piece.file].append(piece)
    total = sum(cost(piece) for pieces in by_file for piece in pieces)
    target = max(MIN_UNIT, -(-total // max(1, parts))) if parts > 1 else max(total, 1)
    runs: list[tuple[int, list[Piece]]] = []
    for index, pieces in enumerate(by_file):
        run: list[Piece] = []
        filled = 0
        for whole in pieces:
            for piece in cut(whole, target) if cost(whole) > target and observer is None else (whole,):
                if run and filled + cost(piece) > target:
                    runs.append((index, run))
                    run, filled = [], 0
                run.append(piece)
                filled += cost(piece)
        if run:
            runs.append((index, run))
    return [
        WorkUnit(
            number,
            len(runs),
            os.path.join(folder, layout.files[index].name),
            layout.files[index].final.name,
            tuple(run),
            observer=observer.narrowed({piece.key for piece in run}) if observer is not None else None,
            **options,
        )
        for number, (index, run) in enumerate(runs)
    ]


def cut(piece: Piece, size: int) -> tuple[Piece, ...]:
    """`piece` in consecutive pieces of about `size` cost each, where it can be cut: a copy at FOLIO boundaries of the
    destination (unless its CRC comes from the source: then whole), a conversion at whole elements (every
    CONVERT_CHUNK of output); anything else whole."""
    fill = piece.fill
    if isinstance(fill, Copy) and fill.known_crc is None:
        step = max(FOLIO, size // FOLIO * FOLIO)
        bounds = range(step - piece.offset % FOLIO, piece.nbytes, step)
        return tuple(_copy_part(piece, start, stop) for start, stop in _ranges(bounds, piece.nbytes))
    if isinstance(fill, Convert):
        inner, outer = fill.sizes
        ratio = (fill.span.nbytes + piece.nbytes) / piece.nbytes
        step = max(spans.CONVERT_CHUNK, int(size / ratio) // spans.CONVERT_CHUNK * spans.CONVERT_CHUNK)
        step -= step % outer
        parts = []
        for start, stop in _ranges(range(step, piece.nbytes, step), piece.nbytes):
            span = RawSpan(fill.span.file, fill.span.offset + start // outer * inner, (stop - start) // outer * inner)
            parts.append(_part(piece, start, stop, Convert(span, fill.expr, fill.sizes)))
        return tuple(parts)
    return (piece,)


def _ranges(bounds: range, end: int) -> Iterator[tuple[int, int]]:
    start = 0
    for bound in bounds:
        if 0 < bound < end:
            yield start, bound
            start = bound
    yield start, end


def _copy_part(piece: Piece, start: int, stop: int) -> Piece:
    """Bytes `start:stop` of a copied piece: the parts of its spans that hold them."""
    assert isinstance(piece.fill, Copy)
    parts, at = [], 0
    for span in piece.fill.spans:
        lo, hi = max(start, at), min(stop, at + span.nbytes)
        if lo < hi:
            parts.append(RawSpan(span.file, span.offset + lo - at, hi - lo))
        at += span.nbytes
    return _part(piece, start, stop, Copy(tuple(parts)))


def _part(piece: Piece, start: int, stop: int, fill: Any) -> Piece:
    return Piece(piece.file, piece.offset + start, stop - start, fill, piece.key, piece.group, piece.at + start)


# --- running a unit -------------------------------------------------------------------------------------------


def run_unit(unit: WorkUnit, source: Source | None = None, progress: Progress | None = None) -> UnitResult:
    """Write `unit` into its staged file (which exists, at its final size); `source` is the open source when the unit
    runs in the process that opened it, else the unit opens it again when a piece needs it. Raises what writing
    raised (CkptxError for bad input, OSError from the file system)."""
    started = time.perf_counter()
    worker = worker_name()
    if unit.claims is not None:
        _claim(unit.claims, unit.index, worker)
    fd = os.open(unit.path, os.O_WRONLY)
    try:
        with _SourceOnDemand(source, unit.source) as sources:
            observer = unit.observer(sources.get) if unit.observer is not None else None
            try:
                with UnitWriter(fd, unit.threads or kernel_threads(), sources.get, progress, observer) as writer:
                    for piece in unit.pieces:
                        writer.check_alive()
                        write_piece(writer, piece)
                observed = observer.result() if observer is not None else None
            except BaseException:
                if observer is not None:
                    observer.abandon()
                raise
        if unit.sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - started
    return UnitResult(unit.index, worker, writer.written, tuple(writer.crcs), observed, seconds, peak_rss())


def peak_rss() -> int:
    """The peak resident memory of this process, in bytes (ru_maxrss is KiB on Linux, bytes on macOS)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not a POSIX system
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _claim(claims: str, index: int, worker: str) -> None:
    """Record in slot `index` of the claims file (made by the coordinator: never created here) who runs the unit."""
    fd = os.open(claims, os.O_WRONLY)
    try:
        write_at(fd, worker.encode()[:CLAIM_SIZE].ljust(CLAIM_SIZE, b"\0"), index * CLAIM_SIZE)
    finally:
        os.close(fd)


class _SourceOnDemand:
    """The source a unit reads tensors from: the one given, or opened again from its spec on first use (and closed
    when the unit ends)."""

    def __init__(self, given: Source | None, spec: SourceSpec | None) -> None:
        self._given = given
        self._spec = spec
        self._opened: Source | None = None

    def get(self) -> Source:
        if self._given is not None:
            return self._given
        if self._opened is None:
            if self._spec is None:
                raise RuntimeError("a work unit needs the source's tensors but was given no way to open it")
            self._opened = self._spec.open()
        return self._opened

    def __enter__(self) -> _SourceOnDemand:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._opened is not None:
            self._opened.close()


class _Done(NamedTuple):
    """One chunk made: its bytes, its checksummed range (crc None: not checksummed), and its data when the unit's own
    thread still has to write it at `position` (or an observer wants to see it). A chunk of a blockwise kernel, whose
    size is known only once made, has a `cursor` instead: it goes where the previous chunk of its piece ended."""

    nbytes: int
    key: str
    group: int
    at: int
    crc: int | None
    data: Any = None
    position: int = -1
    cursor: _Cursor | None = None


class _Cursor:
    """Where the next chunk of a piece written in chunks of unknown size goes (`position` in the file, `at` in its
    tensor or record), and where the piece ends."""

    def __init__(self, piece: Piece, keys: tuple[str, ...]) -> None:
        self.piece = piece
        self.keys = keys
        self.position = piece.offset
        self.at = piece.at
        self.end = piece.offset + piece.nbytes

    def place(self, done: _Done) -> _Done:
        """`done` placed after the chunks before it; TensorOpError when the piece overflows."""
        if self.position + done.nbytes > self.end:
            raise _wrong_size(self.piece, self.keys, self.position - self.piece.offset + done.nbytes)
        placed = done._replace(position=self.position, at=self.at, cursor=None)
        self.position += done.nbytes
        self.at += done.nbytes
        return placed

    def check(self) -> None:
        """Every byte of the piece was written."""
        if self.position != self.end:
            raise _wrong_size(self.piece, self.keys, self.position - self.piece.offset)


def _wrong_size(piece: Piece, keys: tuple[str, ...], written: int) -> TensorOpError:
    return TensorOpError(
        f"tensor '{piece.key}' (from {', '.join(keys)}): wrote {written} bytes, the plan says {piece.nbytes}; the "
        f"source file is inconsistent"
    )


class UnitWriter:
    """Writes pieces into one open file: chunks are made on a thread pool (at most two per thread in flight) and
    written by this thread in the order they were submitted; records bytes, CRCs, progress and what the observer
    sees."""

    def __init__(
        self,
        fd: int,
        threads: int,
        source: Callable[[], Source],
        progress: Progress | None = None,
        observer: Observer | None = None,
    ) -> None:
        self.fd = fd
        self.source = source
        self.progress = progress
        self.observer = observer
        self.written = 0
        self.crcs: list[CheckedRange] = []
        self._threads = max(1, threads)
        self._pool = ThreadPoolExecutor(self._threads, "ckptx-unit") if self._threads > 1 else None
        self._pending: deque[Future[_Done]] = deque()
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        self._run: tuple[RawSpan, int, str, int, int, bool] | None = None
        self.cursors: list[_Cursor] = []

    def submit(self, task: Callable[..., _Done], *args: Any) -> None:
        """Make a chunk with `task(*args)` on the pool (in this thread when the pool has one thread); its data is
        written here, after every chunk submitted before it."""
        if self._pool is None:
            self.finish(task(*args))
            return
        if len(self._pending) % 8 == 0:
            self.check_alive()
        while len(self._pending) >= 2 * self._threads:
            self.finish(self._pending.popleft().result())
        self._pending.append(self._pool.submit(task, *args))

    def write(self, data: Any, position: int) -> None:
        """Write `data` at `position` and hand the range to the kernel's writeback now."""
        write_at(self.fd, data, position)
        self.release(position, len(data))

    def release(self, position: int, nbytes: int) -> None:
        """Start writing `nbytes` at `position` to the disk without waiting (fadvise DONTNEED starts the writeback of
        dirty pages and drops clean ones); the final fsync then waits for what is left."""
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, position, nbytes, os.POSIX_FADV_DONTNEED)

    def queue_copy(self, span: RawSpan, position: int, key: str, group: int, at: int, crc: bool) -> None:
        """Copy `span` to `position`: queued, so that a run of spans adjacent in both files (a rename's tensors one
        after another) is one copy; checksummed copies are never merged (each belongs to its own record)."""
        if self.observer is not None:
            self.observer.copied(key, at, span)
        run = self._run
        if (
            run is not None
            and not crc
            and not run[5]
            and run[0].file == span.file
            and run[0].offset + run[0].nbytes == span.offset
            and run[1] + run[0].nbytes == position
        ):
            self._run = (RawSpan(span.file, run[0].offset, run[0].nbytes + span.nbytes), *run[1:])
            return
        self.flush_copies()
        self._run = (span, position, key, group, at, crc)

    def flush_copies(self) -> None:
        """Copy the queued run now, piece by piece (see spans.copy_pieces), each piece's CRC-32 taken on the pool
        while the kernel copies the next."""
        run, self._run = self._run, None
        if run is None:
            return
        span, position, key, group, at, crc = run
        for part, where in copy_pieces(span, position):
            fd = self.source_fd(part.file)
            if crc:
                self.submit(_crc_chunk, fd, part, key, group, at + where - position)
            copy_span(fd, self.fd, part, where)
            self.release(where, part.nbytes)
            if not crc:
                self.finish(_Done(part.nbytes, key, group, at + where - position, None))

    def finish(self, done: _Done) -> None:
        """Write a chunk made on the pool (when it has data to write) and account for it, in this thread."""
        if done.cursor is not None:
            done = done.cursor.place(done)
        if done.position >= 0:
            self.write(done.data, done.position)
        self.written += done.nbytes
        if done.crc is not None:
            self.crcs.append(CheckedRange(done.group, done.at, done.nbytes, done.crc))
        if self.observer is not None and done.data is not None:
            self.observer.computed(done.key, done.at, memoryview(done.data).cast("B"))
        if self.progress is not None and done.key:  # tensor bytes: what progress counts (not a copied tokenizer)
            self.progress(done.nbytes)

    def source_fd(self, path: str) -> int:
        """A read descriptor of source file `path`, opened once per unit."""
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = self._fds[path] = os.open(path, os.O_RDONLY)
                if hasattr(os, "posix_fadvise"):  # bigger read-ahead, as cp asks for
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            return fd

    def check_alive(self) -> None:
        """Stop when the staged file was removed meanwhile (the conversion failed elsewhere and was cleaned up)."""
        if os.fstat(self.fd).st_nlink == 0:
            raise DestinationError("the staged file was removed while it was written (the conversion stopped)")

    def drain(self) -> None:
        """Copy what is queued, then write every chunk still in flight."""
        self.flush_copies()
        while self._pending:
            self.finish(self._pending.popleft().result())
        for cursor in self.cursors:
            cursor.check()
        self.cursors.clear()

    def __enter__(self) -> UnitWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        try:
            if exc_type is None:
                self.drain()
        finally:
            for future in self._pending:
                future.cancel()
            if self._pool is not None:
                self._pool.shutdown(wait=True)
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


def write_piece(writer: UnitWriter, piece: Piece) -> None:
    """Put one piece's bytes at its offset of the writer's file: literal bytes, copied spans, a byte-kernel
    conversion (chunks made on the pool), or a tensor computed or taken from memory now."""
    fill = piece.fill
    checksum = piece.group >= 0
    if isinstance(fill, Literal):
        _write_data(writer, piece, fill.data, checksum)
    elif isinstance(fill, Copy):
        _copy(writer, piece, fill, checksum)
    elif isinstance(fill, Convert):
        _convert(writer, piece, fill, checksum)
    elif isinstance(fill, Blocks):
        _blocks(writer, piece, fill, checksum)
    elif isinstance(fill, Quantize):
        _quantize(writer, piece, fill, checksum)
    elif isinstance(fill, Compute):
        _write_data(writer, piece, tensor_bytes(materialize(fill.entry, writer.source()), piece.key), checksum)
    else:
        _write_data(writer, piece, _stored_bytes(writer.source(), fill, piece), checksum)


def _copy(writer: UnitWriter, piece: Piece, fill: Copy, checksum: bool) -> None:
    crc = checksum and fill.known_crc is None
    position = piece.offset
    for span in fill.spans:
        writer.queue_copy(span, position, piece.key, piece.group, piece.at + position - piece.offset, crc)
        position += span.nbytes
    if checksum and fill.known_crc is not None:
        writer.crcs.append(CheckedRange(piece.group, piece.at, piece.nbytes, fill.known_crc))


def _crc_chunk(fd: int, span: RawSpan, key: str, group: int, at: int) -> _Done:
    return _Done(span.nbytes, key, group, at, span_crc(span, fd=fd))


def _convert(writer: UnitWriter, piece: Piece, fill: Convert, checksum: bool) -> None:
    converted = byte_converter(fill.expr)
    if converted is None:  # pragma: no cover - the layout chose Convert because the op has a kernel
        raise TensorOpError(f"tensor '{piece.key}': no byte kernel for {fill.expr.op}")
    writer.flush_copies()
    inner, outer = fill.sizes
    step = max(inner, spans.CONVERT_CHUNK // inner * inner)
    span = fill.span
    fd = writer.source_fd(span.file)
    for start in range(0, span.nbytes, step):
        part = RawSpan(span.file, span.offset + start, min(step, span.nbytes - start))
        at = start // inner * outer
        writer.submit(_convert_chunk, fd, part, converted[1], piece, at, part.nbytes // inner * outer, checksum)


def _convert_chunk(
    fd: int, span: RawSpan, convert: Callable[[bytes], Any], piece: Piece, at: int, want: int, checksum: bool
) -> _Done:
    data = convert(read_exact(fd, span))
    if len(data) != want:
        raise TensorOpError(
            f"tensor '{piece.key}': its byte kernel gave {len(data)} bytes for {span.nbytes} bytes of input, the plan "
            f"says {want}; the source file is inconsistent"
        )
    crc = zlib.crc32(data) if checksum else None
    return _Done(len(data), piece.key, piece.group, piece.at + at, crc, data, piece.offset + at)


def _blocks(writer: UnitWriter, piece: Piece, fill: Blocks, checksum: bool, ggml: Quantize | None = None) -> None:
    """A blockwise byte kernel (a dequantization): each of its pieces reads byte ranges of every input span and is
    converted on the pool (then, with `ggml`, its whole rows quantized); the outputs go one after another."""
    converted = block_converter(fill.expr)
    if converted is None:  # pragma: no cover - the layout chose Blocks because the op has a kernel
        raise TensorOpError(f"tensor '{piece.key}': no blockwise kernel for {fill.expr.op}")
    writer.flush_copies()
    keys, parts = converted
    cursor = _Cursor(piece, keys)
    writer.cursors.append(cursor)
    fds = [writer.source_fd(span.file) for span in fill.spans]
    for part in parts:
        writer.submit(_block_chunk, fds, fill.spans, part, piece, keys, cursor, checksum, ggml)


def _block_chunk(
    fds: list[int],
    spans: tuple[RawSpan, ...],
    part: Any,
    piece: Piece,
    keys: tuple[str, ...],
    cursor: _Cursor,
    checksum: bool,
    ggml: Quantize | None = None,
) -> _Done:
    data = []
    for fd, span, (start, stop) in zip(fds, spans, part.ranges):
        if not 0 <= start <= stop <= span.nbytes:
            raise TensorOpError(
                f"{span.file}: a byte kernel asked for bytes {start}-{stop} of a {span.nbytes}-byte tensor"
            )
        data.append(read_exact(fd, RawSpan(span.file, span.offset + start, stop - start)))
    try:
        out = part.convert(data)
    except ValueError as exc:  # a kernel refusing its data (a block of inf to quantize)
        raise TensorOpError(f"tensor '{piece.key}' (from {', '.join(keys)}): {exc}") from None
    if ggml is not None:
        out = _quantize_rows(out, ggml, piece)
    crc = zlib.crc32(out) if checksum else None
    return _Done(len(out), piece.key, piece.group, 0, crc, out, -1, cursor)


def _quantize(writer: UnitWriter, piece: Piece, fill: Quantize, checksum: bool) -> None:
    """A float tensor as a GGUF tensor type, a block of rows at a time on the pool: read from its span, or computed
    with torch first (whole, in this thread)."""
    writer.flush_copies()
    ggml = type_named(fill.ggml)
    row = max(1, fill.row)
    out_row = row // ggml.block_size * ggml.type_size
    rows = piece.nbytes // out_row if out_row else 0
    step = max(1, QUANTIZE_ROWS_BYTES // (row * 4))
    if fill.span is not None:
        span = fill.span
        itemsize = lookup(fill.dtype).itemsize
        fd = writer.source_fd(span.file)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            part = RawSpan(span.file, span.offset + r0 * row * itemsize, (r1 - r0) * row * itemsize)
            writer.submit(_quantize_span, fd, part, fill, piece, r0 * out_row, (r1 - r0) * out_row, checksum)
        return
    if fill.blocks is not None:
        _blocks(writer, piece, fill.blocks, checksum, fill)
        return
    assert fill.entry is not None
    tensor = materialize(fill.entry, writer.source())
    if tensor.numel() != rows * row:
        raise TensorOpError(
            f"tensor '{piece.key}': {tensor.numel()} values were computed, the plan says {rows * row}; the source "
            f"file is inconsistent or changed while it was read; check it (ckptx inspect) and convert again"
        )
    values = tensor.detach().contiguous().float().numpy().reshape(rows, row)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        writer.submit(_quantize_values, values[r0:r1], fill, piece, r0 * out_row, (r1 - r0) * out_row, checksum)


def _quantize_rows(data: bytes, fill: Quantize, piece: Piece) -> bytes:
    """Whole rows of `fill.dtype` values (a blockwise kernel's output) as ggml type `fill.ggml`."""
    row_bytes = max(1, fill.row) * lookup(fill.dtype).itemsize
    if len(data) % row_bytes:
        raise TensorOpError(
            f"tensor '{piece.key}': a byte kernel gave {len(data)} bytes, not whole rows of {row_bytes} bytes, to "
            f"convert to {fill.ggml}"
        )
    return quantize(as_float32(data, fill.dtype), fill.ggml)


def _quantize_span(fd: int, span: RawSpan, fill: Quantize, piece: Piece, at: int, want: int, checksum: bool) -> _Done:
    return _quantize_values(as_float32(read_exact(fd, span), fill.dtype), fill, piece, at, want, checksum)


def _quantize_values(values: Any, fill: Quantize, piece: Piece, at: int, want: int, checksum: bool) -> _Done:
    data = quantize(values, fill.ggml)
    if len(data) != want:
        raise TensorOpError(
            f"tensor '{piece.key}': {len(data)} bytes of {fill.ggml} were made where the plan says {want}; the "
            f"source file is inconsistent"
        )
    crc = zlib.crc32(data) if checksum else None
    return _Done(len(data), piece.key, piece.group, piece.at + at, crc, data, piece.offset + at)


def _write_data(writer: UnitWriter, piece: Piece, data: Any, checksum: bool) -> None:
    """Bytes made in this thread (a computed tensor, a literal), written in CHUNK pieces."""
    view = memoryview(data).cast("B")
    if len(view) != piece.nbytes:
        raise TensorOpError(
            f"tensor '{piece.key}': {len(view)} bytes were made, the plan says {piece.nbytes}; the source file is "
            f"inconsistent or changed while it was read; check it (ckptx inspect) and convert again"
        )
    for start in range(0, len(view), CHUNK):
        chunk = view[start : start + CHUNK]
        crc = zlib.crc32(chunk) if checksum else None
        writer.finish(_Done(len(chunk), piece.key, piece.group, piece.at + start, crc, chunk, piece.offset + start))


def _stored_bytes(source: Source, fill: Stored, piece: Piece) -> Any:
    """The bytes of a tensor the source holds in memory: its storage's `start:start + nbytes`, or its elements."""
    tensor = source.load(fill.key)
    if fill.compact:
        return tensor_bytes(tensor, piece.key)
    storage = tensor.untyped_storage()
    return torch.empty(0, dtype=torch.uint8).set_(storage, fill.start, (piece.nbytes,), (1,)).numpy()


def tensor_bytes(tensor: Any, key: str) -> Any:
    """A tensor's elements in row-major order as a uint8 array (no copy when it is already contiguous); a tensor
    that is not dense is refused by key."""
    if tensor.layout != torch.strided:
        raise DestinationError(
            f"tensor '{key}' is a {tensor.layout} tensor; a file written by ckptx holds dense tensors; make it "
            f"dense in the recipe or leave it out"
        )
    flat = tensor.detach().cpu().resolve_conj().resolve_neg().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy()
