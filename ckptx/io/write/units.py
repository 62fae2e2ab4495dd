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
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from ckptx._lazy import lazy_module
from ckptx.errors import DestinationError, TensorOpError
from ckptx.gcpause import without_gc
from ckptx.io import spans
from ckptx.io.crc import span_crc
from ckptx.io.read.open import SourceSpec
from ckptx.io.spans import CHUNK, FOLIO, Progress, copy_pieces, copy_span, read_exact, write_at
from ckptx.io.write.layout import Compute, Convert, Copy, Literal, OutputLayout, Piece, Stored
from ckptx.planning.execute import materialize
from ckptx.planning.expr import byte_converter
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


class Observer(Protocol):
    """Sees each output tensor's bytes as a unit writes them (an audit, a digest), in the unit's own thread: copied
    bytes as the source span they come from, computed bytes as they are; `at` is where in tensor (or zip record)
    `key` they start. `result()` must pickle: it travels back in the unit's result."""

    def copied(self, key: str, at: int, span: RawSpan) -> None:
        """`span`'s bytes were copied to byte `at` of `key`."""

    def computed(self, key: str, at: int, data: memoryview) -> None:
        """`data` was written at byte `at` of `key`."""

    def result(self) -> Any:
        """What the observer found (picklable)."""


ObserverFactory = Callable[[], Observer]
"""Makes a unit's observer in the process that runs it (a class or a module-level function, so that it pickles)."""


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
    if isinstance(fill, Compute | Stored):
        return COMPUTE_COST * piece.nbytes
    return 0 if isinstance(fill, Literal) else piece.nbytes


@without_gc
def plan_units(layout: OutputLayout, folder: str, parts: int, **options: Any) -> list[WorkUnit]:
    """The layout's pieces (all but the literal ones, which the coordinator writes) as about `parts` units of equal
    cost: runs of consecutive pieces of one file, big pieces cut in pieces of about that cost. One part gives one
    unit per file. `options` are the WorkUnit fields every unit shares (source, threads, sync, claims, observer)."""
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
            for piece in cut(whole, target) if cost(whole) > target else (whole,):
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
    observer = unit.observer() if unit.observer is not None else None
    fd = os.open(unit.path, os.O_WRONLY)
    try:
        with (
            _SourceOnDemand(source, unit.source) as sources,
            UnitWriter(fd, unit.threads or kernel_threads(), sources.get, progress, observer) as writer,
        ):
            for piece in unit.pieces:
                writer.check_alive()
                write_piece(writer, piece)
        if unit.sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    observed = observer.result() if observer is not None else None
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
    thread still has to write it at `position` (or an observer wants to see it)."""

    nbytes: int
    key: str
    group: int
    at: int
    crc: int | None
    data: Any = None
    position: int = -1


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
