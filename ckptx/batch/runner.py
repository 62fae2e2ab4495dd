"""Run a jobs file: check it whole, skip current outputs (--resume), plan and validate every job, then write.

The phases keep one promise: no job is written before every job has been planned and validated, so
target mismatches are reported for all jobs first. A failing job never stops the others; each job's
outcome is a JobResult. Tasks run through a runner (ckptx.workers.executors): in this process, in spawned
worker processes, or on a Dask cluster. This module never prints.
"""

from __future__ import annotations

import json
import os
import socket
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ckptx._version import __version__
from ckptx.batch.fingerprint import (
    FINGERPRINT_KEY,
    Fingerprint,
    OutputState,
    fingerprint,
    output_state,
    remove_sidecar,
    sidecar_path,
    write_sidecar,
)
from ckptx.batch.jobs import Job, JobsFile, load_jobs
from ckptx.conversion.pipeline import convert
from ckptx.errors import CkptxError, DestinationError, ValidationFailed
from ckptx.io.write.atomic import atomic_output
from ckptx.io.write.destination import InputFiles
from ckptx.rules.recipe import Recipe
from ckptx.text import json_text
from ckptx.trust.callables import allow_factories, approved_factories
from ckptx.trust.pickle_globals import check_file_globals
from ckptx.workers.cores import share_cores
from ckptx.workers.executors import Runner, check_runner_options, open_runner

STATUSES = ("converted", "skipped", "planned", "failed", "interrupted")
Progress = Callable[[str, int, int, int], None]
"""`progress(phase, done, total, failed)`; phase is `plan` or `write`."""


@dataclass(frozen=True)
class JobResult:
    """What happened to one job: its status, the phase it reached, and the error if it failed."""

    job: Job
    status: str
    phase: str = ""
    reason: str = ""
    seconds: float = 0.0
    bytes_written: int = 0
    error: str = ""
    error_type: str = ""
    validation: Mapping[str, Any] | None = None
    notes: tuple[str, ...] = ()
    traceback: str = ""
    worker: str = ""

    @property
    def error_line(self) -> str:
        """The error on one line (for the summary table); the full text is in `error`."""
        if self.validation is not None:
            return _mismatch_summary(self.validation)
        return self.error.strip().splitlines()[0] if self.error.strip() else ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "job": self.job.label,
            "where": self.job.where,
            "src": str(self.job.src),
            "dst": str(self.job.dst),
            "format": self.job.format,
            "status": self.status,
            "phase": self.phase,
            "reason": self.reason,
            "seconds": round(self.seconds, 4),
            "bytes_written": self.bytes_written,
            "error": self.error or None,
            "error_type": self.error_type or None,
            "validation": self.validation,
            "notes": list(self.notes),
            "traceback": self.traceback or None,
            "worker": self.worker or None,
        }


@dataclass(frozen=True)
class BatchResult:
    """Every job's result in jobs-file order, and how the batch ran."""

    jobs_file: Path
    results: tuple[JobResult, ...]
    seconds: float
    dry_run: bool = False
    resume: bool = False
    executor: str = "local"
    workers: int = 1
    interrupted: bool = False

    @property
    def counts(self) -> dict[str, int]:
        """Number of jobs per status."""
        return {status: sum(r.status == status for r in self.results) for status in STATUSES}

    @property
    def failed(self) -> list[JobResult]:
        """The failed jobs."""
        return [r for r in self.results if r.status == "failed"]

    @property
    def ok(self) -> bool:
        """True when no job failed and the batch was not interrupted."""
        return not self.failed and not self.interrupted

    @property
    def bytes_written(self) -> int:
        """Bytes written over all jobs."""
        return sum(r.bytes_written for r in self.results)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (the report file's content)."""
        return {
            "ok": self.ok,
            "ckptx": __version__,
            "jobs_file": str(self.jobs_file),
            "dry_run": self.dry_run,
            "resume": self.resume,
            "executor": self.executor,
            "workers": self.workers,
            "interrupted": self.interrupted,
            "seconds": round(self.seconds, 3),
            "counts": self.counts,
            "bytes_written": self.bytes_written,
            "jobs": [r.to_dict() for r in self.results],
        }


@dataclass(frozen=True)
class _Task:
    """What a worker gets: the job, whether --resume may replace outdated ckptx outputs, and the factories
    the user allowed files to name (`--allow-factory`; a worker process does not share the caller's context)."""

    job: Job
    resume: bool
    approved: frozenset[str] = frozenset()


@dataclass
class _Tracker:
    """Results by job index, with the progress callback fed as they arrive."""

    progress: Progress | None
    results: dict[int, JobResult] = field(default_factory=dict)

    def record(self, phase: str, done: int, total: int, index: int, result: JobResult) -> None:
        self.results[index] = result
        if self.progress:
            self.progress(phase, done, total, sum(r.status == "failed" for r in self.results.values()))


def run_batch(
    jobs_file: str | Path | JobsFile,
    *,
    workers: int = 1,
    dry_run: bool = False,
    resume: bool = False,
    executor: str = "local",
    scheduler: str | None = None,
    progress: Progress | None = None,
) -> BatchResult:
    """Run every job of a jobs file; returns each job's result (a failed job does not stop the others).

    Raises RuleError (every problem at once) for an invalid jobs file or recipe, before anything runs.
    With `resume`, jobs whose output is complete and current are skipped and outdated ckptx outputs
    are replaced. With `dry_run`, every job is planned and validated and nothing is written.
    `executor` is `local` (`workers` spawned processes; in this process for 1) or `dask` (the cluster
    at `scheduler`, or a LocalCluster of `workers` processes). Ctrl-C stops the batch: finished jobs
    keep their outputs, the others are `interrupted` (outputs are written atomically, never half).
    """
    started = time.perf_counter()
    check_runner_options(executor, workers, scheduler)
    loaded = jobs_file if isinstance(jobs_file, JobsFile) else load_jobs(jobs_file)
    jobs = loaded.jobs
    tracker = _Tracker(progress)
    if resume:
        recipes: dict[str, Recipe] = {}
        for index, job in enumerate(jobs):
            skipped = _skip_if_current(job, recipes)
            if skipped is not None:
                tracker.results[index] = skipped
    interrupted = False
    try:
        with open_runner(executor, workers, scheduler, preload=(__name__,), initializer=_share_cores) as runner:
            for phase, task_fn in (("plan", _plan_job), ("write", _write_job)):
                if phase == "write" and dry_run:
                    break
                todo = [
                    i
                    for i in range(len(jobs))
                    if tracker.results.get(i) is None or tracker.results[i].status == "planned"
                ]
                tasks = [_Task(jobs[i], resume, approved_factories()) for i in todo]
                _run_phase(runner, phase, task_fn, tasks, todo, tracker)
    except KeyboardInterrupt:
        interrupted = True
    results = []
    for index, job in enumerate(jobs):
        result = tracker.results.get(index)
        if result is None or interrupted and result.status == "planned" and not dry_run:
            result = JobResult(job, "interrupted", reason="the batch was interrupted before this job finished")
        results.append(result)
    return BatchResult(
        loaded.path,
        tuple(results),
        time.perf_counter() - started,
        dry_run=dry_run,
        resume=resume,
        executor=executor,
        workers=workers,
        interrupted=interrupted,
    )


def _run_phase(
    runner: Runner,
    phase: str,
    task_fn: Callable[[_Task], JobResult],
    tasks: list[_Task],
    indices: list[int],
    tracker: _Tracker,
) -> None:
    """Run one phase's tasks; a task lost with its worker (killed, out of memory) is retried once, alone.

    Alone, so that a job that kills its worker again takes no other job down with it.
    """
    lost: list[int] = []
    done = 0
    for k, outcome in runner.run(task_fn, tasks):
        if not isinstance(outcome, JobResult):
            lost.append(k)
            continue
        done += 1
        tracker.record(phase, done, len(tasks), indices[k], outcome)
    for k in lost:
        for _, outcome in runner.run(task_fn, [tasks[k]]):
            done += 1
            tracker.record(phase, done, len(tasks), indices[k], _as_result(tasks[k].job, phase, outcome))


def default_report_path(jobs_file: str | Path) -> Path:
    """`sweep/jobs.yaml` -> `sweep/jobs.report.json`."""
    path = Path(jobs_file)
    return path.with_name(f"{path.stem}.report.json")


def write_report(result: BatchResult, path: str | Path) -> Path:
    """Write the batch report (JSON) atomically, never over a file of any job's source; returns its path."""
    target = Path(path)
    check_report(result.jobs_file, [r.job for r in result.results], target)
    with atomic_output(target) as out:
        out.write((json_text(result.to_dict()) + "\n").encode("utf-8"))
    return target


def check_report(jobs_file: Path, jobs: Sequence[Job], path: Path) -> None:
    """The report may not replace the jobs file, a file of any job's source, or any job's output (or sidecar);
    DestinationError when it would. Checked before the batch runs, and again when the report is written."""
    what = "the batch report"
    InputFiles.of([jobs_file, *(job.src for job in jobs)]).check(path, force=True, what=what)
    if InputFiles.of(p for job in jobs for p in (job.dst, sidecar_path(job.dst))).holds(path):
        raise DestinationError(f"{path}: {what} would replace a job's output; give --report another file")


def _share_cores(workers: int) -> None:
    """Worker start-up: split the CPUs between the workers, so N workers do not each run CPU-count threads.

    Most jobs never import torch (copies, renames, float casts); torch reads OMP_NUM_THREADS when a job
    first does, so the worker does not pay torch's start-up here (see ckptx.workers.cores).
    """
    share_cores(workers)


def _skip_if_current(job: Job, recipes: dict[str, Recipe]) -> JobResult | None:
    """A `skipped` result when the job's output is complete and current; None when it must run.

    `recipes` caches the loaded recipes of this run (many jobs share one).
    """
    started = time.perf_counter()
    key = json.dumps([str(job.base_dir), job.rules, job.params], sort_keys=True, default=str)
    try:
        if key not in recipes:
            recipes[key] = job.recipe()
        state = output_state(job.dst, _fingerprint(job, recipes[key]))
    except (CkptxError, OSError):
        return None  # the plan phase reports it
    if state.status != "current":
        return None
    return JobResult(job, "skipped", "check", "up to date", time.perf_counter() - started)


def _plan_job(task: _Task) -> JobResult:
    """Worker task: check the destination, plan and validate against the target; writes nothing."""
    with allow_factories(task.approved):
        return replace(_plan(task), worker=_here())


def _write_job(task: _Task) -> JobResult:
    """Worker task: fingerprint the source, convert atomically, record the fingerprint."""
    with allow_factories(task.approved):
        return replace(_write(task), worker=_here())


def _here() -> str:
    """`host:pid` of the process running a task (shown in the report)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _plan(task: _Task) -> JobResult:
    started = time.perf_counter()
    job = task.job
    try:
        recipe = job.recipe()
        reason = _overwrite_reason(job, output_state(job.dst, _fingerprint(job, recipe)), task.resume)
        check_file_globals(job.allow_globals, f"{job.entry} allow_globals")
        result = convert(job.src, None, recipe, target=job.target_spec(), dry_run=True, allow_globals=job.allow_globals)
        if result.report is not None and not result.report.ok:
            raise ValidationFailed(result.report)
        return JobResult(job, "planned", "plan", reason, time.perf_counter() - started, notes=tuple(result.notes))
    except Exception as exc:  # noqa: BLE001 - any failure is this job's, never the batch's
        return _failure(job, "plan", exc, started)


def _write(task: _Task) -> JobResult:
    started = time.perf_counter()
    job = task.job
    try:
        recipe = job.recipe()
        current = _fingerprint(job, recipe)  # before the source is read: a later change is seen as one
        state = output_state(job.dst, current)
        reason = _overwrite_reason(job, state, task.resume)
        check_file_globals(job.allow_globals, f"{job.entry} allow_globals")
        job.dst.parent.mkdir(parents=True, exist_ok=True)
        if job.format != "safetensors":
            remove_sidecar(job.dst)
        result = convert(
            job.src,
            job.dst,
            recipe,
            target=job.target_spec(),
            force=state.status != "missing",
            allow_globals=job.allow_globals,
            metadata={FINGERPRINT_KEY: current.to_json()},
        )
        if job.format != "safetensors":
            InputFiles.of([job.src]).check(sidecar_path(job.dst), force=True, what="the output's sidecar")
            write_sidecar(job.dst, current)
        return JobResult(
            job,
            "converted",
            "write",
            reason,
            time.perf_counter() - started,
            result.bytes_written,
            notes=tuple(result.notes),
        )
    except Exception as exc:  # noqa: BLE001 - any failure is this job's, never the batch's
        return _failure(job, "write", exc, started)


def _fingerprint(job: Job, recipe: Recipe) -> Fingerprint:
    return fingerprint(job.src, recipe, src_label=job.src_label, target=job.target, fmt=job.format)


def _overwrite_reason(job: Job, state: OutputState, resume: bool) -> str:
    """Why the job may write its destination; DestinationError when it may not."""
    if state.status == "missing":
        return "new output"
    if job.dst.is_dir():
        raise DestinationError(f"{job.dst}: is a folder; give the job a file name as dst")
    if resume and state.made_by_ckptx:
        return f"changed: {', '.join(state.changes)}" if state.changes else "redone"
    if job.force:
        return "overwritten (force: true)"
    if state.made_by_ckptx:
        raise DestinationError(
            f"{job.dst}: already exists (written by ckptx); pass --resume to redo only "
            "outdated outputs, or set `force: true` on the job to redo it"
        )
    raise DestinationError(
        f"{job.dst}: already exists and was not written by ckptx batch ({state.detail}); "
        "set `force: true` on the job to overwrite it, or write elsewhere"
    )


def _failure(job: Job, phase: str, exc: BaseException, started: float) -> JobResult:
    seconds = time.perf_counter() - started
    if isinstance(exc, ValidationFailed):
        report = exc.report
        return JobResult(
            job,
            "failed",
            phase,
            seconds=seconds,
            error=str(report),
            error_type="ValidationFailed",
            validation=report.to_dict() if hasattr(report, "to_dict") else None,
        )
    if isinstance(exc, CkptxError):
        return JobResult(job, "failed", phase, seconds=seconds, error=str(exc), error_type=type(exc).__name__)
    return JobResult(
        job,
        "failed",
        phase,
        seconds=seconds,
        error_type="internal",
        error=f"internal error: {type(exc).__name__}: {exc}; this is a bug in ckptx, please report "
        "it with the traceback in the report file",
        traceback="".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
    )


def _as_result(job: Job, phase: str, outcome: Any) -> JobResult:
    """A task's outcome as a JobResult: what it returned, or why its worker lost it."""
    if isinstance(outcome, JobResult):
        return outcome
    return JobResult(
        job,
        "failed",
        phase,
        error_type="worker-lost",
        error=f"the worker running this job died twice ({type(outcome).__name__}: {outcome}); it may run "
        "out of memory or crash the reader: try it alone, or with a smaller -j",
    )


def _mismatch_summary(validation: Mapping[str, Any]) -> str:
    counts = [
        (len(validation.get(key) or []), label)
        for key, label in (
            ("missing", "missing"),
            ("unexpected", "unexpected"),
            ("shape_mismatches", "shape mismatches"),
        )
    ]
    parts = ", ".join(f"{n} {label}" for n, label in counts if n)
    return f"does not fit {validation.get('target')}: {parts or 'mismatch'}"


def render_batch(result: BatchResult, report_path: str | Path | None = None) -> str:
    """The summary: one line per job (job, status, time, bytes, error), each failure in full, then totals."""
    from ckptx.text import human_bytes, table

    rows = [
        [
            r.job.label,
            r.status,
            f"{r.seconds:.2f} s",
            human_bytes(r.bytes_written) if r.bytes_written else "-",
            _clip(r.error_line),
        ]
        for r in result.results
    ]
    lines = [table(rows, ["job", "status", "time", "bytes", "error"])]
    if result.failed:
        lines.append("failed jobs:")
        for r in result.failed:
            lines.append(f"  {r.job.where} -> {r.job.label} ({r.phase}):")
            lines += [f"    {line}" for line in r.error.strip().splitlines()]
    counts = result.counts
    shown = [f"{n} {status}" for status, n in counts.items() if n or status in ("converted", "failed")]
    verb = "planned (dry run, nothing written)" if result.dry_run else f"{human_bytes(result.bytes_written)} written"
    lines.append(
        f"{len(result.results)} jobs: {', '.join(shown)} in {result.seconds:.2f} s; {verb}"
        + (f"; report: {report_path}" if report_path else "")
    )
    if result.interrupted:
        lines.append("interrupted: finished outputs are complete; rerun with --resume to do the rest")
    return "\n".join(lines)


def _clip(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
