"""`ckptx batch`: run many conversions from a jobs file (locally, in worker processes, or on Dask)."""

from __future__ import annotations

import argparse
from typing import Any, TextIO

from ckptx.cli.options import EXIT_BUG, EXIT_INTERRUPTED, EXIT_INVALID, EXIT_OK, Parents
from ckptx.cli.present import emit
from ckptx.errors import CkptxError

__all__ = ["add_parser", "run"]


def add_parser(sub: Any, parents: Parents) -> None:
    """Register `batch` on the CLI's subparsers."""
    p = sub.add_parser("batch", parents=[parents.common, parents.trust], help="run many conversions from a jobs file")
    p.add_argument("jobs_file", metavar="JOBS.yaml")
    p.add_argument(
        "-j",
        "--jobs",
        type=int,
        default=1,
        dest="workers",
        metavar="N",
        help="worker processes (1: in this process); with dask and no --scheduler, LocalCluster workers",
    )
    p.add_argument("--dry-run", action="store_true", help="plan and validate every job; write nothing")
    p.add_argument(
        "--resume", action="store_true", help="skip jobs whose output is complete and current; redo the rest"
    )
    p.add_argument("--executor", choices=["local", "dask"], default="local", help="where jobs run (default: local)")
    p.add_argument(
        "--scheduler", metavar="ADDRESS", help="Dask scheduler, e.g. tcp://host:8786 (default: a LocalCluster)"
    )
    p.add_argument("--report", metavar="FILE", help="JSON report (default: JOBS.report.json beside the jobs file)")


def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from pathlib import Path

    from ckptx.batch.jobs import load_jobs
    from ckptx.batch.runner import check_report, default_report_path, render_batch, run_batch, write_report

    def show(phase: str, done: int, total: int, failed: int) -> None:
        width = 24
        bar = "#" * (width * done // max(total, 1))
        err.write(
            f"\r  {phase:5} [{bar:<{width}}] {done}/{total} jobs" + (f", {failed} failed" if failed else "") + " "
        )
        err.write("\n" if done >= total else "")
        err.flush()

    show_progress = not args.json and hasattr(err, "isatty") and err.isatty()
    jobs = load_jobs(args.jobs_file)
    report = args.report or (None if args.dry_run else default_report_path(args.jobs_file))
    if report is not None:
        check_report(jobs.path, jobs.jobs, Path(report))
    result = run_batch(
        jobs,
        workers=args.workers,
        dry_run=args.dry_run,
        resume=args.resume,
        executor=args.executor,
        scheduler=args.scheduler,
        progress=show if show_progress else None,
    )
    if report is not None:
        try:
            write_report(result, report)
        except OSError as exc:
            raise CkptxError(f"{report}: cannot write the report ({exc.strerror or exc}); give --report FILE") from None
    emit(out, args.json, {**result.to_dict(), "report": str(report) if report else None}, render_batch(result, report))
    if result.interrupted:
        return EXIT_INTERRUPTED
    if any(r.error_type == "internal" for r in result.failed):
        return EXIT_BUG
    return EXIT_OK if result.ok else EXIT_INVALID
