"""A file conversion as one request (what to convert, with what, to where, how) and its result."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptx.check.validation import ValidationReport
from ckptx.planning.planner import Plan
from ckptx.rules.loader import RecipeArg
from ckptx.rules.recipe import TargetSpec

__all__ = ["ConvertRequest", "ConvertResult", "Progress"]

Progress = Callable[[int, int], None]
"""`progress(done, total)` in bytes of tensor data, called as the output is written."""


@dataclass(frozen=True)
class ConvertRequest:
    """Everything `ckptx.convert` is asked to do (its keyword arguments, documented there)."""

    src: Path
    dst: str | Path | None  # as given: a trailing separator names a model folder
    recipes: RecipeArg
    target: TargetSpec | str | None = None
    target_args: Mapping[str, Any] = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)
    dry_run: bool = False
    force: bool = False
    allow_globals: Sequence[str] = ()
    unsafe_pickle: bool = False
    verify: bool = False
    progress: Progress | None = field(default=None, compare=False)
    metadata: Mapping[str, str] = field(default_factory=dict)
    max_shard_size: int | None = None
    reverse: bool = False
    audit: str | Path | None = (
        None  # write a provenance card there ("": the default place, see conversion/card_document.py)
    )
    dtype: str | None = None  # --dtype: every floating-point tensor cast to it (a cast step after the recipes); a .gguf
    # output's file type (float32, float16, bfloat16, q8_0) instead
    workers: int | str = 1  # worker processes writing the output (`auto`: the cores); 1: this process alone
    executor: str = "local"  # `local` processes or `dask`
    scheduler: str | None = None  # a Dask scheduler's address (dask without one: a LocalCluster of `workers`)


@dataclass
class ConvertResult:
    """What a conversion did: the plan, the validation report, and what was written."""

    plan: Plan
    report: ValidationReport | None
    destination: str | None
    format: str | None
    bytes_written: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    verification: Any = None
    inferred: dict[str, Any] = field(default_factory=dict)  # parameters chosen from the source (check/inferred.py)
    card: str | None = None  # where the provenance card was written
    units: list[dict[str, Any]] = field(default_factory=list)  # the work units written: index, worker, bytes, seconds

    @property
    def written(self) -> bool:
        """True when a file was written."""
        return self.bytes_written > 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "ok": self.report is None or self.report.ok,
            "destination": self.destination,
            "format": self.format,
            "written": self.written,
            "bytes_written": self.bytes_written,
            "seconds": round(self.seconds, 4),
            "notes": self.notes,
            "plan": self.plan.to_dict(),
            "validation": self.report.to_dict() if self.report else None,
            "verification": self.verification.to_dict() if self.verification is not None else None,
            "inferred": self.inferred,
            "card": self.card,
            "units": self.units,
        }
