"""The coordinator of a write: lays the files out, has the work units written, and completes the files.

Every staged file is created at its final size and its literal pieces (headers, pickles, indexes) written first;
then the units (units.py) write the tensor bytes at their offsets: in this process one after another, or on a
runner's workers (a local process pool, a Dask cluster), as many at a time as it has. The coordinator checks that
every unit finished and wrote what it was given, combines the CRC-32 of each checksummed record from its pieces'
(in order, whatever order they came in), writes what depends on them (a zip's descriptors and central directory),
and fsyncs every file. Publishing is the writer's (writer.py): a failure here leaves the staging folder to be
removed, nothing under a final name.

A unit that fails raises its error in the conversion's process, naming the unit and the worker that ran it (each
unit records `host:pid` in a claims file, a slot per unit, before it starts, so a worker that dies is named too).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ckptx.errors import CkptxError, WorkerFailed, WorkerLost
from ckptx.io.crc import crc32_combine
from ckptx.io.read.open import SourceSpec
from ckptx.io.spans import Progress, write_at
from ckptx.io.write.atomic import write_error
from ckptx.io.write.output_layout import Literal, OutputLayout, Piece
from ckptx.io.write.units import (
    CLAIM_SIZE,
    ObserverFactory,
    UnitResult,
    WorkUnit,
    cost,
    plan_units,
    run_unit,
)
from ckptx.planning.source import Source
from ckptx.workers.executors import Runner

__all__ = ["CLAIMS", "Parallel", "write_layout"]

CLAIMS = ".claims"  # in the staging folder: who runs each unit


@dataclass(frozen=True)
class Parallel:
    """How a write is split across workers: the runner, how many workers it has, how they open the source, and how
    many units per worker to plan (more than one, so a worker that finishes early takes another)."""

    runner: Runner
    workers: int
    source: SourceSpec
    units_per_worker: int = 4


def write_layout(
    folder: Path,
    layout: OutputLayout,
    source: Source,
    progress: Progress | None = None,
    parallel: Parallel | None = None,
    observer: ObserverFactory | None = None,
) -> list[UnitResult]:
    """Write every file of `layout` into `folder`, complete and fsynced; the units' results in unit order.

    Without `parallel` the units run in this process (one per file; each uses the machine's cores through its thread
    pool). Errors of a unit run elsewhere are re-raised here as WorkerFailed naming the unit and its worker."""
    counted = _Counted(progress)
    paths = [folder / laid.name for laid in layout.files]
    _create(paths, layout)
    if parallel is None:
        units = plan_units(layout, str(folder), 1, observer=observer)
        results = [run_unit(unit, source, counted) for unit in units]
    else:
        claims = folder / CLAIMS
        units = plan_units(
            layout,
            str(folder),
            parallel.workers * parallel.units_per_worker,
            source=parallel.source,
            sync=not parallel.runner.same_machine,
            claims=str(claims),
            observer=observer,
        )
        with open(claims, "wb") as out:
            out.truncate(len(units) * CLAIM_SIZE)
        results = _run(parallel.runner, units, claims, layout, counted)
    _check_finished(units, results)
    crcs = combined_crcs(layout.groups, results)
    finish = layout.finish(crcs) if layout.finish is not None else []
    _complete(paths, finish)
    if progress is not None and layout.planned_bytes > counted.done:
        progress(layout.planned_bytes - counted.done)
    return results


class _Counted:
    """Progress passed on, and counted (the end tops it up to the plan's bytes: a tensor shared by two keys is
    written once)."""

    def __init__(self, progress: Progress | None) -> None:
        self._progress = progress
        self.done = 0

    def __call__(self, nbytes: int) -> None:
        self.done += nbytes
        if self._progress is not None:
            self._progress(nbytes)


def _create(paths: Sequence[Path], layout: OutputLayout) -> None:
    """Every staged file at its final size (a sparse file: units fill it), its literal pieces written."""
    literal: list[list[Piece]] = [[] for _ in paths]
    for piece in layout.pieces:
        if isinstance(piece.fill, Literal):
            literal[piece.file].append(piece)
    for path, laid, pieces in zip(paths, layout.files, literal):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, laid.size)
            for piece in pieces:
                assert isinstance(piece.fill, Literal)
                write_at(fd, piece.fill.data, piece.offset)
        finally:
            os.close(fd)


def _run(
    runner: Runner, units: list[WorkUnit], claims: Path, layout: OutputLayout, progress: _Counted
) -> list[UnitResult]:
    """The units on the runner (see submission_order); the first failure raises."""
    ordered = submission_order(units)
    results: dict[int, UnitResult] = {}
    for position, outcome in runner.run(run_unit, ordered):
        unit = ordered[position]
        if not isinstance(outcome, UnitResult):
            raise _failure(unit, outcome, claims, layout)
        results[unit.index] = outcome
        progress(sum(piece.nbytes for piece in unit.pieces if piece.key))
    return [results[unit.index] for unit in units if unit.index in results]


def submission_order(units: Sequence[WorkUnit]) -> list[WorkUnit]:
    """The costliest first (so the last to finish are small), taking the files in turn: units that run at the same
    time then mostly write different files (two processes writing one file take turns at its write lock: 768 MiB
    took 0.6-2.1 s so, 0.3-0.4 s in two files, on ext4)."""
    by_file: dict[str, list[WorkUnit]] = {}
    for unit in sorted(units, key=cost_of, reverse=True):
        by_file.setdefault(unit.path, []).append(unit)
    queues = list(by_file.values())
    ordered: list[WorkUnit] = []
    while queues:
        queues.sort(key=lambda queue: cost_of(queue[0]), reverse=True)
        for queue in queues:
            ordered.append(queue.pop(0))
        queues = [queue for queue in queues if queue]
    return ordered


def cost_of(unit: WorkUnit) -> int:
    """What a unit costs to write (see units.cost)."""
    return sum(cost(piece) for piece in unit.pieces)


def _failure(unit: WorkUnit, outcome: object, claims: Path, layout: OutputLayout) -> BaseException:
    """The error to raise for a unit that did not finish: its own error, or its worker's loss, naming both."""
    worker = claimed_by(claims, unit.index)
    where = f"{unit.describe()} on worker {worker}" if worker else f"{unit.describe()} (no worker had started it)"
    if isinstance(outcome, OSError):
        final = next(laid.final for laid in layout.files if laid.name == Path(unit.path).name)
        outcome = write_error(final, outcome)
    if isinstance(outcome, CkptxError):
        return WorkerFailed(f"{where}: {outcome}", outcome.exit_code, type(outcome).__name__)
    if isinstance(outcome, WorkerLost):
        return WorkerFailed(
            f"{where}: the worker was lost ({outcome}); nothing was published; it may have run out of memory or been "
            "stopped: convert again, with fewer workers per machine or more memory",
            2,
            "WorkerLost",
        )
    if isinstance(outcome, BaseException):
        failed = RuntimeError(f"{where}: {type(outcome).__name__}: {outcome}")
        failed.__cause__ = outcome
        return failed
    return RuntimeError(f"{where}: the worker returned {type(outcome).__name__}, not the unit's result")


def claimed_by(claims: Path, index: int) -> str:
    """The `host:pid` recorded for unit `index`, or '' when no worker had claimed it."""
    try:
        with open(claims, "rb") as f:
            f.seek(index * CLAIM_SIZE)
            return f.read(CLAIM_SIZE).rstrip(b"\0").decode(errors="replace")
    except OSError:
        return ""


def _check_finished(units: Sequence[WorkUnit], results: Sequence[UnitResult]) -> None:
    """Every unit reported, and wrote every byte it was given."""
    by_index = {result.index: result for result in results}
    for unit in units:
        result = by_index.get(unit.index)
        if result is None or result.nbytes != unit.nbytes:
            done = "did not report" if result is None else f"wrote {result.nbytes:,} bytes of {unit.nbytes:,}"
            raise RuntimeError(f"{unit.describe()} {done}")


def combined_crcs(groups: Sequence[int], results: Sequence[UnitResult]) -> list[int]:
    """The CRC-32 of every checksummed group, combined from its ranges (which must cover it exactly, in order)."""
    ranges: list[list[tuple[int, int, int]]] = [[] for _ in groups]
    for result in results:
        for checked in result.crcs:
            ranges[checked.group].append((checked.at, checked.nbytes, checked.crc))
    crcs = []
    for group, (size, parts) in enumerate(zip(groups, ranges)):
        parts.sort()
        crc, at = 0, 0
        for start, nbytes, part in parts:
            if start != at:
                break
            crc = crc32_combine(crc, part, nbytes) if at else part
            at += nbytes
        if at != size:
            raise RuntimeError(f"checksummed record {group}: its written ranges cover {at:,} of {size:,} bytes")
        crcs.append(crc)
    return crcs


def _complete(paths: Sequence[Path], finish: Sequence[Piece]) -> None:
    """Write the pieces that depend on the CRCs, then fsync every file."""
    for index, path in enumerate(paths):
        fd = os.open(path, os.O_WRONLY)
        try:
            for piece in finish:
                if piece.file == index:
                    assert isinstance(piece.fill, Literal)
                    write_at(fd, piece.fill.data, piece.offset)
            os.fsync(fd)
        finally:
            os.close(fd)
