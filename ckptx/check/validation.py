"""Validation: how a plan (or state dict) fits a target, key by key, with a hint for each problem."""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from operator import attrgetter
from typing import TYPE_CHECKING, Any

from ckptx._lazy import lazy_module
from ckptx.dtypes import TensorMeta
from ckptx.targets.resolve import Target, resolve_target, state_metas
from ckptx.text import SHOWN, short_list, shown

if TYPE_CHECKING:  # pragma: no cover
    import torch
else:
    torch = lazy_module("torch")

__all__ = ["KeyProblem", "ValidationReport", "render_validation", "validate"]


@dataclass(frozen=True)
class KeyProblem:
    """One key that does not fit, with what the plan has, what the target wants, and a hint."""

    key: str
    have: TensorMeta | None = None
    want: TensorMeta | None = None
    sources: tuple[str, ...] = ()
    hint: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "key": self.key,
            "have": _meta_dict(self.have),
            "want": _meta_dict(self.want),
            "sources": list(self.sources),
            "hint": self.hint,
        }


@dataclass
class ValidationReport:
    """How a plan (or state dict) fits a target."""

    target: str
    matched: int = 0
    missing: list[KeyProblem] = field(default_factory=list)
    unexpected: list[KeyProblem] = field(default_factory=list)
    shape_mismatches: list[KeyProblem] = field(default_factory=list)
    dtype_differences: list[KeyProblem] = field(default_factory=list)
    allowed_missing: list[str] = field(default_factory=list)
    allowed_unexpected: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every key lands and every shape fits."""
        return not (self.missing or self.unexpected or self.shape_mismatches)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "target": self.target,
            "ok": self.ok,
            "matched": self.matched,
            "missing": [p.to_dict() for p in self.missing],
            "unexpected": [p.to_dict() for p in self.unexpected],
            "shape_mismatches": [p.to_dict() for p in self.shape_mismatches],
            "dtype_differences": [p.to_dict() for p in self.dtype_differences],
            "allowed_missing": self.allowed_missing,
            "allowed_unexpected": self.allowed_unexpected,
            "notes": self.notes,
        }

    def __str__(self) -> str:
        return render_validation(self)


def validate(plan_or_state: Any, target: Any) -> ValidationReport:
    """Compare a Plan (or a state dict, or key -> TensorMeta) with a target spec, module or Target."""
    resolved = target if isinstance(target, Target) else resolve_target(target)
    report = _validate(plan_or_state, resolved)
    if not report.ok and resolved.class_layout is not None:
        # A model folder in the class's own names (transformers' conversion mapping renames them on save) is opened by
        # from_pretrained as well: that layout fits too, and the report says which one it is.
        by_class = _validate(plan_or_state, replace(resolved, tensors=dict(resolved.class_layout), class_layout=None))
        if by_class.ok:
            by_class.notes.append(
                "the keys are the model class's own (its state_dict); save_pretrained would write "
                f"{len(resolved.tensors)} tensors under transformers' on-disk names instead: from_pretrained opens both"
            )
            return by_class
    return report


def _validate(plan_or_state: Any, resolved: Target) -> ValidationReport:
    have, sources = _planned(plan_or_state)
    want = resolved.tensors
    report = ValidationReport(resolved.description, notes=list(resolved.notes))
    missing_keys = [k for k in want if k not in have]
    unexpected_keys = [k for k in have if k not in want]
    report.matched = len(want) - len(missing_keys)
    for key, wanted in want.items():
        got = have.get(key)
        if got is None or got is wanted:
            continue
        if got.shape != wanted.shape:
            report.shape_mismatches.append(KeyProblem(key, got, wanted, sources.get(key, ()), _shape_hint(got, wanted)))
        elif got.dtype != wanted.dtype and not sources.cast(key):
            report.dtype_differences.append(KeyProblem(key, got, wanted, sources.get(key, ())))
    suggest = _Suggester({k: have[k] for k in unexpected_keys}, sources)
    for key in missing_keys:
        if any(p.search(key) for p in resolved.allow_missing):
            report.allowed_missing.append(key)
        else:
            report.missing.append(KeyProblem(key, None, want[key], (), suggest.hint(key, want[key])))
    for key in unexpected_keys:
        if any(p.search(key) for p in resolved.allow_unexpected):
            report.allowed_unexpected.append(key)
        else:
            report.unexpected.append(KeyProblem(key, have[key], None, sources.get(key, ())))
    return report


_META = attrgetter("expr.meta")  # PlanEntry.meta, read in C


class _SourceKeys:
    """The source keys of each planned key, worked out only for the keys a report names."""

    def __init__(self, by_key: Mapping[str, Any] | None = None) -> None:
        self._by_key = by_key or {}

    def get(self, key: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        """Source keys of `key`, or `default` when it is not a planned key."""
        entry = self._by_key.get(key)
        return default if entry is None else entry.sources

    def cast(self, key: str) -> bool:
        """True when the planned key's dtype is what a cast step (of the recipe, or `--dtype`) asked for: a dtype
        asked for is no surprise to warn about."""
        entry = self._by_key.get(key)
        expr = getattr(entry, "expr", None)
        return getattr(expr, "op", None) == "cast"


def _planned(plan_or_state: Any) -> tuple[dict[str, TensorMeta], _SourceKeys]:
    entries = getattr(plan_or_state, "entries", None)
    if entries is not None:
        keys = [e.key for e in entries]
        return dict(zip(keys, map(_META, entries))), _SourceKeys(dict(zip(keys, entries)))
    if isinstance(plan_or_state, Mapping):
        metas = {k: v for k, v in plan_or_state.items() if isinstance(v, TensorMeta)}
        metas.update(state_metas({k: v for k, v in plan_or_state.items() if not isinstance(v, TensorMeta)}))
        return metas, _SourceKeys()
    raise TypeError(f"validate() takes a Plan or a state dict, not {type(plan_or_state).__name__}")


def _shape_hint(have: TensorMeta, want: TensorMeta) -> str:
    if have.numel == want.numel:
        return f"same number of elements: add `reshape: {{match: ..., shape: {list(want.shape)}}}` (or `shape: target`)"
    if sorted(have.shape) == sorted(want.shape):
        return "same dims in another order: a `permute` step may be missing"
    return ""


class _Suggester:
    """Finds, for a missing target key, the closest unexpected key: same shape first, then the most similar
    name — comparing with the candidate's key and with the source key it came from."""

    _LIMIT = 500
    _POOL = 400

    def __init__(self, candidates: dict[str, TensorMeta], sources: _SourceKeys) -> None:
        self.candidates = candidates
        self.sources = sources
        self.by_shape: dict[tuple[int, ...], list[str]] = {}
        for key, meta in candidates.items():
            self.by_shape.setdefault(meta.shape, []).append(key)
        self.calls = 0

    def hint(self, key: str, want: TensorMeta) -> str:
        self.calls += 1
        if not self.candidates or self.calls > self._LIMIT:
            return ""
        best = self._closest(key, self.by_shape.get(want.shape, []), cutoff=0.3)
        if best:
            return f"did you mean '{best}' (same shape)?"
        best = self._closest(key, list(self.candidates), cutoff=0.6)
        if best:
            return f"did you mean '{best}' (shape {list(self.candidates[best].shape)})?"
        return ""

    def _closest(self, key: str, pool: list[str], cutoff: float) -> str | None:
        if len(pool) > self._POOL:
            pool = difflib.get_close_matches(key, pool, n=self._POOL // 10, cutoff=0.0)
        matcher = difflib.SequenceMatcher(b=key)
        best, best_score = None, cutoff
        for candidate in pool:
            score = 0.0
            for name in (candidate, *self.sources.get(candidate, ())):
                matcher.set_seq1(name)
                score = max(score, matcher.ratio())
            if score > best_score:
                best, best_score = candidate, score
        return best


def _meta_dict(meta: TensorMeta | None) -> dict[str, Any] | None:
    return None if meta is None else {"shape": list(meta.shape), "dtype": meta.dtype}


def render_validation(report: ValidationReport) -> str:
    """Validation report: verdict first, then every problem with its hint."""
    total = report.matched + len(report.missing) + len(report.allowed_missing)
    if report.ok:
        verdict = f"OK ({report.matched}/{total} target keys matched)"
    else:
        fit = report.matched - len(report.shape_mismatches)
        verdict = f"FAILED: {_failures(report)} ({fit}/{total} target keys fit)"
    lines = [f"validation against {report.target}: {verdict}"]
    lines += _section(
        "missing in the converted checkpoint", report.missing, lambda p: f"{p.want}" + (f"  {p.hint}" if p.hint else "")
    )
    lines += _section("unexpected (not in the target)", report.unexpected, lambda p: f"{p.have}" + _from(p))
    lines += _section(
        "shape mismatch",
        report.shape_mismatches,
        lambda p: (
            f"have {list(p.have.shape)}, target wants {list(p.want.shape)}"
            + _from(p)
            + (f"; {p.hint}" if p.hint else "")
        ),
    )
    lines += _section(
        "dtype differs (warning; load_state_dict casts)",
        report.dtype_differences,
        lambda p: f"have {p.have.dtype}, target has {p.want.dtype}",
    )
    if report.allowed_missing:
        lines.append(f"  allowed missing: {len(report.allowed_missing)} ({short_list(report.allowed_missing)})")
    if report.allowed_unexpected:
        lines.append(
            f"  allowed unexpected: {len(report.allowed_unexpected)} ({short_list(report.allowed_unexpected)})"
        )
    lines += [f"  note: {n}" for n in report.notes]
    return "\n".join(lines)


def _failures(report: ValidationReport) -> str:
    """What failed: `2 missing keys, 1 shape mismatch`."""
    counts = (
        (len(report.missing), "missing key", "missing keys"),
        (len(report.unexpected), "unexpected key", "unexpected keys"),
        (len(report.shape_mismatches), "shape mismatch", "shape mismatches"),
    )
    return ", ".join(f"{n} {one if n == 1 else many}" for n, one, many in counts if n)


def _from(problem: KeyProblem) -> str:
    sources = ", ".join(problem.sources)
    return f" (from {', '.join(map(shown, problem.sources))})" if sources and sources != problem.key else ""


def _section(title: str, problems: Sequence[KeyProblem], detail) -> list[str]:
    if not problems:
        return []
    lines = [f"  {title}: {len(problems)}"]
    for problem in problems[:SHOWN]:
        lines.append(f"    {shown(problem.key)}: {detail(problem)}")
    if len(problems) > SHOWN:
        lines.append(f"    ... and {len(problems) - SHOWN} more (use --json for all)")
    return lines
