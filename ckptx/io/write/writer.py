"""One interface for every output format.

A `Writer` is laid out from the plan alone (which files, which entries in each) when it is made, checked against
the destination rule before a byte is written, then written into a staging folder beside the destination (every
file fsynced), handed to `verify` there when asked, and published in one step: renamed into place in order, the
file that completes the set (the single file, the index, `config.json`) last. A failure at any point leaves no
file of the new output under its final name. Each format is one subclass in its own module; `writer_for` chooses
it from the destination.

Writing is header-first: a format's `layout(source)` fixes every file, its size and every byte range in it (each
tensor's offset, the headers) before any data moves (io/write/output_layout.py); the coordinator (coordinator.py) then
has the ranges written, in this process or split into work units across worker processes or a Dask cluster
(`Parallel`), and completes the files. The bytes never depend on how many workers wrote them. With `card`, the units
also digest every tensor they write for a provenance card (card_feed.py): the same records whoever wrote what.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ckptx.io.card import TensorRecord
from ckptx.io.spans import Progress
from ckptx.io.write.atomic import publish, staging_folder, write_error
from ckptx.io.write.card_feed import card_records, card_watches
from ckptx.io.write.coordinator import Parallel, write_layout
from ckptx.io.write.destination import InputFiles, prepare_folder
from ckptx.io.write.output_layout import OutputLayout
from ckptx.io.write.units import UnitResult
from ckptx.planning.entry import PlanEntry
from ckptx.planning.source import Source

__all__ = ["Move", "OutputOptions", "Parallel", "Verify", "Writer"]

Move = tuple[Path, Path]
"""(staged path, final path) of one written file."""

Verify = Callable[[Path], None]
"""Called with the staged weights (the single file or the index) before anything is published; raises to publish
nothing."""


@dataclass(frozen=True)
class OutputOptions:
    """What a conversion asks of its output besides the plan's entries.

    `metadata`: string entries for a safetensors header (provenance first); `documents`: JSON documents written
    beside the weights of a model folder (`config.json`, ...) and `copies`: files copied into it as they are
    (tokenizer files, ...); `state_metadata`: the `_metadata` of a torch state dict; `max_shard_size`: bytes
    of tensor data per safetensors shard; `gguf_metadata` and `tensor_type`: what a GGUF file carries.
    """

    force: bool = False
    max_shard_size: int | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    documents: Mapping[str, bytes] = field(default_factory=dict)
    copies: Mapping[str, Path] = field(default_factory=dict)
    state_metadata: Any = None
    gguf_metadata: Sequence[tuple[str, int, Any]] = ()  # (key, GGUF value type, value) of a .gguf output, in order
    tensor_type: str | None = None  # a .gguf output's file type: float32, float16, bfloat16, q8_0 or auto


class Writer(ABC):
    """One output of a conversion, in one format: its files are decided when it is made."""

    format: ClassVar[str]
    """The format's name, as results and reports give it (`safetensors`, `torch`, ...)."""

    def __init__(self, destination: Path, entries: Sequence[PlanEntry], options: OutputOptions) -> None:
        self.destination = destination
        self.entries = tuple(entries)
        self.options = options
        self.results: list[UnitResult] = []
        """The work units' results of the last write (bytes, CRCs, card digests), in unit order."""
        self.records: dict[str, TensorRecord] = {}
        """The provenance card's record of every tensor, in plan order, after a write with `card`."""

    @property
    def primary(self) -> Path:
        """The path that names the output: the single file, the shard index, or the model folder."""
        return self.destination

    @property
    def weights(self) -> Path:
        """The file a loader opens for the weights (what `verify` is given, staged): by default the primary."""
        return self.primary

    @abstractmethod
    def files(self) -> list[Path]:
        """Every final path this output writes."""

    def replaces(self) -> list[Path]:
        """Paths removed before any rename, so that no index or config ever names a half-replaced set."""
        return []

    def check(self, inputs: InputFiles) -> list[str]:
        """Refuse, before anything is written, to write over an input file, a folder, or (without `force`) an
        existing file; returns notes (e.g. older shards left in place)."""
        inputs.check_all(self.files() + self.replaces(), force=self.options.force, what=self.what)
        return []

    what: ClassVar[str] = "the destination"
    """How messages name one of the output's files."""

    def non_tensor_note(self, source: Source) -> str | None:
        """What became of the source's non-tensor entries, when it has any."""
        if not source.non_tensors:
            return None
        return f"non-tensor entries dropped ({self.format} holds tensors only): {', '.join(sorted(source.non_tensors))}"

    def check_card(self) -> None:
        """Raise DestinationError, before anything is written, when a card cannot record this output's tensors (a
        card records each tensor's own elements as stored: a format storing some in another type cannot have one)."""
        return

    @abstractmethod
    def layout(self, source: Source) -> OutputLayout:
        """Every file of the output (in publishing order, the primary file last), its size, and every byte range in
        it with what fills it; raises (DestinationError...) before anything is written for what the format cannot
        hold."""

    def stage(
        self,
        folder: Path,
        source: Source,
        progress: Progress | None,
        parallel: Parallel | None = None,
        card: bool = False,
    ) -> list[Move]:
        """Write every file of the output into `folder`, each fsynced; the moves in publishing order, the primary
        file last. With `card`, `records` holds every tensor's card record afterwards."""
        layout = self.layout(source)
        observer = card_watches(layout, self.entries, source) if card else None
        self.results = write_layout(folder, layout, source, progress, parallel, observer)
        if card:
            self.records = card_records(self.entries, self.results, source)
        return [(folder / laid.name, laid.final) for laid in layout.files]

    def write(
        self,
        source: Source,
        progress: Progress | None = None,
        verify: Verify | None = None,
        *,
        parallel: Parallel | None = None,
        card: bool = False,
    ) -> int:
        """Stage, verify, publish; returns the bytes written. With `parallel`, the tensor bytes are written by work
        units on its runner's workers (byte for byte what one process writes). With `card`, the units digest every
        tensor for a provenance card (`records`). File system failures become one DestinationError naming the
        destination; a failure leaves no file of the output under its final name."""
        if card:
            self.check_card()
        created = self._prepare()
        try:
            with staging_folder(self.staging_anchor) as folder:
                try:
                    moves = self.stage(folder, source, progress, parallel, card)
                except OSError as exc:
                    raise write_error(self.primary, exc) from None
                if verify is not None:
                    verify(next(staged for staged, final in moves if final == self.weights))
                written = sum(os.stat(staged).st_size for staged, _ in moves)
                publish(moves, remove_first=[p for p in self.replaces() if p.exists() or p.is_symlink()])
            return written
        except BaseException:
            if created is not None:
                _remove_empty(created)
            raise

    @property
    def staging_anchor(self) -> Path:
        """A path in the folder the output is written to; the staging folder is made beside it, named after it."""
        return self.primary

    def _prepare(self) -> Path | None:
        """Create the folder the output goes to (and its parents) when missing; the topmost folder created, so a
        failed write can remove it again."""
        folder = self.staging_anchor.parent
        missing = None
        probe = folder
        while not probe.exists():
            missing, probe = probe, probe.parent
        prepare_folder(self.staging_anchor)
        return missing


def _remove_empty(folder: Path) -> None:
    """Remove `folder` and the empty folders under it (what a failed write created); anything else stays."""
    for path in sorted(folder.rglob("*"), reverse=True):
        if path.is_dir():
            try:
                path.rmdir()
            except OSError:
                return
    try:
        folder.rmdir()
    except OSError:
        return
