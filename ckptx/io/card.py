"""The per-tensor half of a provenance card: each output tensor's SHA-256 and statistics, computed while a writer
produces its bytes, with the source keys, byte spans and op chain it was made from.

A writer's work unit given a `CardObserver` (see io/write/card_feed.py) tells it, where it writes an entry's bytes,
either which source file spans it copies (`observe_copy`: the spans are read again through pread on background
threads while the kernel copies them, the pages being in the cache) or the bytes it computed (`observe_bytes`:
queued, in bounded memory, to a background thread), then `finish(entry)`. `summaries()` waits for every tensor and
gives its `TensorSummary` (picklable: units on other workers send theirs back); `tensor_records` makes them
`TensorRecord`s, frozen and picklable, so cards made by several workers merge (`merge_records`). Without an
observer a writer does no extra work.

A big copied tensor is split: one thread hashes it from end to end (SHA-256 is sequential) while others summarise
its pieces, whose moments merge. `SpanDigests` is the same machinery for any spans (ckptx audit uses it).
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ckptx.dtypes import DTYPES, TensorMeta
from ckptx.errors import CkptxError, SourceError
from ckptx.io.digest import Moments, TensorDigest, TensorStats, TensorSummary
from ckptx.planning.entry import PlanEntry
from ckptx.planning.expr import ops_of
from ckptx.planning.source import RawSpan, Source

__all__ = [
    "CardObserver",
    "EntryObserver",
    "SourceRead",
    "SpanDigests",
    "TensorRecord",
    "merge_records",
    "read_pieces",
    "read_range",
    "tensor_records",
]

READ = 8 * 1024 * 1024  # bytes read at once per thread: what digesting adds to resident memory, per thread
PIECE = 64 * 1024 * 1024  # a copied tensor of at least two pieces is summarised piecewise on several threads
QUEUED = 128 * 1024 * 1024  # computed bytes waiting to be digested before `observe_bytes` waits for the threads


@dataclass(frozen=True)
class SourceRead:
    """A source tensor an output tensor was made from, and where its bytes were read (empty: from memory)."""

    key: str
    spans: tuple[RawSpan, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "key": self.key,
            "spans": [{"file": s.file, "offset": s.offset, "length": s.nbytes} for s in self.spans],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SourceRead:
        """The inverse of `to_dict`."""
        spans = tuple(RawSpan(str(s["file"]), int(s["offset"]), int(s["length"])) for s in data.get("spans", ()))
        return cls(str(data["key"]), spans)


@dataclass(frozen=True)
class TensorRecord:
    """One output tensor as a card records it."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    sha256: str
    stats: TensorStats | None
    sources: tuple[SourceRead, ...] = ()
    ops: tuple[str, ...] = ()

    @property
    def meta(self) -> TensorMeta:
        """Shape and dtype."""
        return TensorMeta(self.shape, self.dtype)

    def to_dict(self) -> dict[str, Any]:
        """The card's entry for the tensor (its key is the card's key for it)."""
        return {
            "sha256": self.sha256,
            "sources": [s.to_dict() for s in self.sources],
            "ops": list(self.ops),
            "dtype": self.dtype,
            "shape": list(self.shape),
            "stats": self.stats.to_dict() if self.stats is not None else None,
        }

    @classmethod
    def from_dict(cls, key: str, data: Mapping[str, Any]) -> TensorRecord:
        """The inverse of `to_dict`."""
        stats = data.get("stats")
        return cls(
            key,
            str(data["dtype"]),
            tuple(int(n) for n in data["shape"]),
            str(data["sha256"]),
            TensorStats.from_dict(stats) if stats is not None else None,
            tuple(SourceRead.from_dict(s) for s in data.get("sources", ())),
            tuple(str(o) for o in data.get("ops", ())),
        )


def merge_records(*parts: Mapping[str, TensorRecord]) -> dict[str, TensorRecord]:
    """The records of several partial cards (each worker's tensors) as one; a key recorded twice must agree."""
    merged: dict[str, TensorRecord] = {}
    for part in parts:
        for key, record in part.items():
            if key in merged and merged[key] != record:
                raise CkptxError(f"tensor '{key}' is recorded twice with different contents: partial cards disagree")
            merged[key] = record
    return merged


def read_pieces(spans: Sequence[RawSpan], buffer: bytearray | None = None) -> Iterator[memoryview]:
    """The bytes of `spans` in order, read with pread READ bytes at a time into one buffer (each view is valid
    until the next is taken). SourceError when a file ends early."""
    buffer = buffer if buffer is not None else bytearray(min(READ, max((s.nbytes for s in spans), default=0)) or 1)
    view = memoryview(buffer)
    fds: dict[str, int] = {}
    try:
        for span in spans:
            fd = fds.get(span.file)
            if fd is None:
                fd = fds[span.file] = os.open(span.file, os.O_RDONLY)
            done = 0
            while done < span.nbytes:
                want = min(len(view), span.nbytes - done)
                got = os.preadv(fd, [view[:want]], span.offset + done)
                if got <= 0:
                    raise SourceError(
                        f"{span.file}: ended at byte {span.offset + done} while reading a tensor of "
                        f"{span.nbytes} bytes at {span.offset}; the file is truncated or changed"
                    )
                yield view[:got]
                done += got
    finally:
        for fd in fds.values():
            os.close(fd)


def read_range(spans: Sequence[RawSpan], start: int, length: int) -> bytes:
    """Bytes `start:start + length` of the concatenation of `spans` (read with pread)."""
    pieces = []
    at = 0
    for span in spans:
        lo, hi = max(start, at), min(start + length, at + span.nbytes)
        if lo < hi:
            pieces.append(RawSpan(span.file, span.offset + lo - at, hi - lo))
        at += span.nbytes
        if at >= start + length:
            break
    return b"".join(bytes(piece) for piece in read_pieces(pieces))


def _split(spans: Sequence[RawSpan], size: int) -> list[tuple[RawSpan, ...]]:
    """`spans` cut into consecutive groups of about `size` bytes (every cut between whole bytes)."""
    groups: list[tuple[RawSpan, ...]] = []
    current: list[RawSpan] = []
    filled = 0
    for span in spans:
        at = 0
        while at < span.nbytes:
            take = min(size - filled, span.nbytes - at)
            current.append(RawSpan(span.file, span.offset + at, take))
            filled += take
            at += take
            if filled == size:
                groups.append(tuple(current))
                current, filled = [], 0
    if current:
        groups.append(tuple(current))
    return groups


class SpanDigests:
    """Digests of spans of files on a pool of threads: `submit(dtype, spans)` gives a future TensorSummary.

    hashlib and numpy release the GIL on big buffers and pread does in the kernel, so the threads use every core.
    A span set of at least two PIECEs is hashed on one thread and summarised piecewise on the others. Use as a
    context manager; leaving it after an error cancels what has not started.
    """

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads or os.cpu_count() or 1
        self.pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="ckptx-digest")
        self._buffers = threading.local()

    def buffer(self) -> bytearray:
        """This thread's read buffer."""
        found = getattr(self._buffers, "data", None)
        if found is None:
            found = self._buffers.data = bytearray(READ)
        return found

    def submit(self, dtype: str, spans: Sequence[RawSpan], *, stats: bool = True) -> Future[TensorSummary]:
        """Start the digest of the bytes of `spans`, one after another, as a tensor of `dtype` (without `stats`:
        the hash alone)."""
        spans = tuple(spans)
        total = sum(s.nbytes for s in spans)
        if not stats:
            return self.pool.submit(self._hash, dtype, spans)
        if total < 2 * PIECE:  # not on the thread count: the statistics' last digits follow how they are split
            return self.pool.submit(self._whole, dtype, spans)
        hashed = self.pool.submit(self._part, dtype, spans, True)
        parts = [self.pool.submit(self._part, dtype, group, False) for group in _split(spans, PIECE)]
        return _joined(hashed, parts)

    def _whole(self, dtype: str, spans: tuple[RawSpan, ...]) -> TensorSummary:
        digest = TensorDigest(dtype)
        for piece in read_pieces(spans, self.buffer()):
            digest.update(piece)
        return digest.summary()

    def _hash(self, dtype: str, spans: tuple[RawSpan, ...]) -> TensorSummary:
        return self._part(dtype, spans, True).summary()

    def _part(self, dtype: str, spans: tuple[RawSpan, ...], hash_only: bool) -> TensorDigest:
        digest = TensorDigest(dtype, hash_only=hash_only, stats_only=not hash_only)
        for piece in read_pieces(spans, self.buffer()):
            digest.update(piece)
        return digest

    def close(self, failed: bool = False) -> None:
        """Wait for the threads (or cancel what has not started, after a failure)."""
        self.pool.shutdown(wait=True, cancel_futures=failed)

    def __enter__(self) -> SpanDigests:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.close(failed=exc_type is not None)


def _joined(hashed: Future[TensorDigest], parts: list[Future[TensorDigest]]) -> Future[TensorSummary]:
    """A future of the summary of a whole tensor from the future of its hash and those of its pieces' moments."""
    whole: Future[TensorSummary] = Future()
    every = [hashed, *parts]
    remaining = [len(every)]
    lock = threading.Lock()

    def one_done(_: Future[TensorDigest]) -> None:
        with lock:
            remaining[0] -= 1
            if remaining[0]:
                return
        if any(f.cancelled() for f in every):
            whole.cancel()
            return
        failed = next((f.exception() for f in every if f.exception() is not None), None)
        if failed is not None:
            whole.set_exception(failed)
            return
        moments: Moments | None = Moments()
        stats_dtype = ""
        for part in parts:
            digest = part.result()
            stats_dtype = digest.dtype
            moments = None if digest.moments is None or moments is None else moments.merge(digest.moments)
        head = hashed.result().summary()
        stats = None
        if moments is not None:
            stats = moments.stats(integral=_integral(stats_dtype))
        whole.set_result(TensorSummary(head.sha256, head.nbytes, stats))

    for future in every:
        future.add_done_callback(one_done)
    return whole


def _integral(dtype: str) -> bool:
    return dtype in DTYPES and DTYPES[dtype].kind in ("int", "bool")


class _Serial:
    """The computed bytes of one entry, digested in order by whichever pool thread drains its queue."""

    def __init__(self, dtype: str) -> None:
        self.digest = TensorDigest(dtype)
        self.queue: deque[bytes] = deque()
        self.running = False
        self.closed = False
        self.failed: BaseException | None = None
        self.done: Future[TensorSummary] = Future()


def _settle(serial: _Serial) -> None:
    """Give a closed, drained entry's future its summary (or the failure of its digest), once."""
    if serial.done.done():
        return
    if serial.failed is not None:
        serial.done.set_exception(serial.failed)
    else:
        serial.done.set_result(serial.digest.summary())


class EntryObserver:
    """What a writer calls as it writes each entry's bytes (the protocol; `CardObserver` implements it)."""

    def observe_copy(self, entry: PlanEntry, spans: Sequence[RawSpan]) -> None:
        """`entry`'s bytes are exactly the bytes of `spans` of source files, in order."""

    def observe_bytes(self, entry: PlanEntry, chunk: Any) -> None:
        """The next bytes of `entry` (the caller may reuse the buffer once this returns)."""

    def finish(self, entry: PlanEntry) -> None:
        """Every byte of `entry` has been observed."""


class CardObserver(EntryObserver):
    """Hashes and summarises every entry a writer writes, on background threads; `summaries()` gives the results.

    Use as a context manager around the write: leaving it after a failure stops the threads."""

    def __init__(self, threads: int | None = None) -> None:
        self._digests = SpanDigests(threads)
        self._summaries: dict[str, Future[TensorSummary]] = {}
        self._serial: dict[str, _Serial] = {}
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._queued = 0

    def observe_copy(self, entry: PlanEntry, spans: Sequence[RawSpan]) -> None:
        """Digest the spans in the background (they are being copied now, so their pages are in the cache)."""
        self._summaries[entry.key] = self._digests.submit(entry.meta.dtype, spans)

    def observe_bytes(self, entry: PlanEntry, chunk: Any) -> None:
        """Queue a copy of `chunk` for the entry's digest; waits while QUEUED bytes are already waiting."""
        data = bytes(memoryview(chunk).cast("B"))
        with self._room:
            serial = self._serial.get(entry.key)
            if serial is None:
                serial = self._serial[entry.key] = _Serial(entry.meta.dtype)
                self._summaries[entry.key] = serial.done
            while self._queued > QUEUED and self._queued > 0:
                self._room.wait()
            self._queued += len(data)
            serial.queue.append(data)
            start = not serial.running
            serial.running = True
        if start:
            self._digests.pool.submit(self._drain, serial)

    def _drain(self, serial: _Serial) -> None:
        while True:
            with self._room:
                if not serial.queue:
                    serial.running = False
                    if serial.closed:
                        _settle(serial)
                    return
                data = serial.queue.popleft()
            if serial.failed is None:
                try:
                    serial.digest.update(data)
                except Exception as exc:  # noqa: BLE001 - handed to whoever waits on the entry's record
                    serial.failed = exc
            with self._room:
                self._queued -= len(data)
                self._room.notify_all()

    def finish(self, entry: PlanEntry) -> None:
        """Close the entry: its record is complete once its digest is."""
        if entry.key not in self._summaries:  # an empty tensor: nothing was observed
            empty: Future[TensorSummary] = Future()
            empty.set_result(TensorDigest(entry.meta.dtype).summary())
            self._summaries[entry.key] = empty
            return
        with self._room:
            serial = self._serial.get(entry.key)
            if serial is None:
                return
            serial.closed = True
            if not serial.running:
                _settle(serial)

    def summaries(self) -> dict[str, TensorSummary]:
        """Every finished entry's hash and statistics, in the order the entries were first observed (waits for the
        threads)."""
        return {key: future.result() for key, future in self._summaries.items()}

    def close(self, failed: bool = False) -> None:
        """Stop the threads (after every queued digest, unless `failed`)."""
        self._digests.close(failed)

    def __enter__(self) -> CardObserver:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.close(failed=exc_type is not None)


def tensor_records(
    entries: Sequence[PlanEntry], summaries: Mapping[str, TensorSummary], source: Source
) -> dict[str, TensorRecord]:
    """The record of every entry, in entry order, from its summary (an empty entry, which nothing wrote, has the
    summary of no bytes), the source keys and spans it was read from and the ops that made it. CkptxError when a
    non-empty entry has no summary: a card never leaves a tensor out silently."""
    records = {}
    for entry in entries:
        summary = summaries.get(entry.key)
        if summary is None:
            if entry.meta.nbytes:
                raise CkptxError(f"tensor '{entry.key}': no digest was made of its bytes; the card is incomplete")
            summary = TensorDigest(entry.meta.dtype).summary()
        records[entry.key] = TensorRecord(
            entry.key,
            entry.meta.dtype,
            entry.meta.shape,
            summary.sha256,
            summary.stats,
            tuple(SourceRead(k, tuple(source.raw_spans(k) or ())) for k in entry.sources),
            ops_of(entry.expr),
        )
    return records
