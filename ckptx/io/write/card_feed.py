"""The provenance card of an output, fed by the work units that write it (io/card.py digests the bytes).

A card records each output tensor's own bytes (row-major, its elements only): a tensor copied unchanged by the
digest of its source spans (read again while the kernel copies them, so the pages are in the cache), a tensor from
memory that is a view of a bigger storage by its own elements, any other by the bytes written. Which tensors a
piece's bytes are, and how each is to be digested, is worked out once from the layout (`card_watches`), in the
converting process; each unit carries the watches of its own pieces, digests its tensors on its own threads and
sends back their summaries; `card_records` joins them, in plan order, with each tensor's source keys, spans and
ops. The records do not depend on how many units or workers wrote the output: no piece is cut when a card is fed
(a SHA-256 is taken in order, so one unit sees each tensor whole) and each digest is of the tensor's own bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from ckptx.errors import CkptxError
from ckptx.io.card import CardObserver, TensorRecord, tensor_records
from ckptx.io.digest import TensorSummary
from ckptx.io.spans import CHUNK
from ckptx.io.write.output_layout import Copy, Literal, OutputLayout, Stored, absolute
from ckptx.io.write.units import UnitResult, tensor_bytes
from ckptx.planning.entry import PlanEntry
from ckptx.planning.source import RawSpan, Source
from ckptx.workers.cores import kernel_threads

__all__ = ["CardWatches", "Watch", "card_records", "card_watches"]


class Watch(NamedTuple):
    """How the card digests one tensor whose bytes a piece holds: `spans`, the source spans of its own bytes when
    the piece copies them; `memory`, its own elements read from the source tensor (a view of a stored record);
    neither, the bytes the piece writes."""

    entry: PlanEntry
    spans: tuple[RawSpan, ...] | None = None
    memory: bool = False


@dataclass(frozen=True)
class CardWatches:
    """The watches of every piece, by the piece's key: a work unit's observer factory (see units.ObserverFactory)."""

    watches: Mapping[str, tuple[Watch, ...]]
    threads: int | None = None

    def narrowed(self, keys: Collection[str]) -> CardWatches:
        """The watches of the pieces of `keys` only."""
        return CardWatches({key: self.watches[key] for key in keys if key in self.watches}, self.threads)

    def __call__(self, source: Callable[[], Source]) -> UnitCard:
        """The observer of one unit."""
        return UnitCard(self.watches, source, self.threads or kernel_threads())


def card_watches(layout: OutputLayout, entries: Sequence[PlanEntry], source: Source) -> CardWatches:
    """The watches of every piece of `layout` that holds tensor bytes (a piece holds its key's tensor, or the
    tensors `layout.holders` names for it: a torch storage record viewed by several)."""
    by_key = {entry.key: entry for entry in entries}
    watches: dict[str, tuple[Watch, ...]] = {}
    for piece in layout.pieces:
        fill = piece.fill
        if isinstance(fill, Literal) or piece.key not in by_key or piece.key in watches:
            continue
        held = [by_key[key] for key in layout.holders.get(piece.key, (piece.key,))]
        if isinstance(fill, Copy):
            watches[piece.key] = tuple(Watch(entry, _own_spans(entry, source)) for entry in held)
        elif isinstance(fill, Stored) and not fill.compact:
            watches[piece.key] = tuple(Watch(entry, memory=True) for entry in held)
        else:
            watches[piece.key] = tuple(Watch(entry) for entry in held)
    return CardWatches(watches)


def _own_spans(entry: PlanEntry, source: Source) -> tuple[RawSpan, ...]:
    """The source spans that hold exactly the bytes of a copied entry."""
    spans = source.raw_spans(entry.sources[0]) if entry.is_copy else None
    if spans is None or sum(span.nbytes for span in spans) != entry.meta.nbytes:
        raise CkptxError(f"tensor '{entry.key}': it is copied, but not from spans of its own bytes; no card can say")
    return tuple(absolute(span) for span in spans)


class UnitCard:
    """One unit's observer (units.Observer): digests the tensors of the pieces it sees on a CardObserver's threads;
    its result is their summaries."""

    def __init__(self, watches: Mapping[str, tuple[Watch, ...]], source: Callable[[], Source], threads: int) -> None:
        self._watches = watches
        self._source = source
        self._card = CardObserver(threads)
        self._seen: dict[str, PlanEntry] = {}

    def copied(self, key: str, at: int, span: RawSpan) -> None:
        """A copied piece: each tensor it holds digested from its own source spans (once)."""
        for watch in self._watches.get(key, ()):
            entry = watch.entry
            if entry.key in self._seen:
                continue
            self._seen[entry.key] = entry
            if watch.spans is None:  # pragma: no cover - card_watches gives every copied piece's tensors spans
                raise CkptxError(f"tensor '{entry.key}': copied without its own spans; no card can say")
            self._card.observe_copy(entry, watch.spans)

    def computed(self, key: str, at: int, data: memoryview) -> None:
        """Written bytes: the next bytes of each tensor the piece holds, or, for a view of a stored record, the
        tensor's own elements (once)."""
        for watch in self._watches.get(key, ()):
            entry = watch.entry
            if watch.memory:
                if entry.key not in self._seen:
                    own = memoryview(tensor_bytes(self._source().load(entry.sources[0]), entry.key)).cast("B")
                    for start in range(0, len(own), CHUNK):
                        self._card.observe_bytes(entry, own[start : start + CHUNK])
            elif watch.spans is None:
                self._card.observe_bytes(entry, data)
            self._seen[entry.key] = entry

    def result(self) -> dict[str, TensorSummary]:
        """The summary of every tensor seen (waits for the digests)."""
        try:
            for entry in self._seen.values():
                self._card.finish(entry)
            return self._card.summaries()
        finally:
            self._card.close()

    def abandon(self) -> None:
        """Stop the digests (the unit failed)."""
        self._card.close(failed=True)


def card_records(
    entries: Sequence[PlanEntry], results: Sequence[UnitResult], source: Source
) -> dict[str, TensorRecord]:
    """The card's record of every entry, in plan order, from the summaries the units sent back."""
    summaries: dict[str, TensorSummary] = {}
    for result in results:
        observed: Mapping[str, Any] = result.observed or {}
        for key, summary in observed.items():
            if key in summaries and summaries[key] != summary:
                raise CkptxError(f"tensor '{key}' was digested twice with different results: the card cannot say")
            summaries[key] = summary
    return tensor_records(entries, summaries, source)
