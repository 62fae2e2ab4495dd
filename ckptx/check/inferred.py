"""Choosing inferred parameters against a target: every combination of choices is planned on the source and
validated (models are built on the meta device, so trying a few is cheap); the one that fits is kept, and when
none or several do, the error says what was tried and how close each came. The declarations themselves are
`ckptx/rules/variants.py`."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ckptx.check.validation import ValidationReport, validate
from ckptx.errors import AmbiguousVariant, CkptxError, NoVariantFits, PlanError, Rejected
from ckptx.planning.expr import ops_of
from ckptx.planning.planner import Plan, plan_recipe
from ckptx.rules.params import InferredParam
from ckptx.rules.recipe import Recipe
from ckptx.targets.resolve import Target

__all__ = ["Attempt", "Chosen", "VariantSearch", "choose_variant"]


@dataclass(frozen=True)
class Attempt:
    """How one combination of choices fared against its target."""

    values: Mapping[str, Any]
    target: str = ""
    matched: int = 0
    target_keys: int = 0
    missing: int = 0
    unexpected: int = 0
    mismatched: int = 0
    error: str = ""  # nothing could be planned or resolved: no counts
    plan_error: str = ""  # the plan failed on the target's shapes; the counts are of the plan without them

    @property
    def ok(self) -> bool:
        """True when the plan planned and validated."""
        return not self.error and not self.plan_error and not (self.missing or self.unexpected or self.mismatched)

    @property
    def label(self) -> str:
        """`size=tiny`."""
        return ", ".join(f"{k}={v}" for k, v in self.values.items())

    def describe(self) -> str:
        """One line: the values and how close they came."""
        if self.error:
            return f"{self.label}: {self.error}"
        counts = (
            f"{self.label}: {self.fitting}/{self.target_keys} target keys fit ({self.mismatched} with another "
            f"shape, {self.missing} missing), {self.unexpected} unexpected"
        )
        return f"{counts}; {self.plan_error}" if self.plan_error else counts

    @property
    def fitting(self) -> int:
        """Target keys that the plan provides with the right shape."""
        return self.matched - self.mismatched

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "values": dict(self.values),
            "ok": self.ok,
            "target": self.target,
            "matched": self.matched,
            "fitting": self.fitting,
            "target_keys": self.target_keys,
            "mismatched": self.mismatched,
            "missing": self.missing,
            "unexpected": self.unexpected,
            "error": self.error,
            "plan_error": self.plan_error,
        }


@dataclass(frozen=True)
class VariantSearch:
    """Every combination tried for a recipe's inferred parameters, and the one kept (if exactly one fits)."""

    recipe: str
    params: tuple[InferredParam, ...]
    attempts: tuple[Attempt, ...]

    @property
    def fitting(self) -> tuple[Attempt, ...]:
        """The attempts that validated."""
        return tuple(a for a in self.attempts if a.ok)

    def __str__(self) -> str:
        names = ", ".join(p.name for p in self.params)
        fitting = self.fitting
        if len(fitting) > 1:
            head = (
                f"choosing {names} for {self.recipe}: {len(fitting)} choices fit the source "
                f"({'; '.join(a.label for a in fitting)}); pass --set to pick one"
            )
        else:
            head = (
                f"choosing {names} for {self.recipe}: no choice fits the source; tried "
                f"{len(self.attempts)}, closest first:"
            )
        ranked = sorted(self.attempts, key=lambda a: (not a.ok, bool(a.error), -a.fitting, a.missing + a.unexpected))
        lines = [head] + [f"  {a.describe()}" for a in ranked]
        if not fitting:
            lines.append(
                "check that the source is what the recipe expects (`ckptx inspect`), or pass --set "
                + " ".join(f"{p.name}=..." for p in self.params)
                + " to see the full validation report"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "recipe": self.recipe,
            "params": {p.name: list(p.choices) for p in self.params},
            "attempts": [a.to_dict() for a in self.attempts],
            "chosen": [dict(a.values) for a in self.fitting],
        }


@dataclass(frozen=True)
class Chosen:
    """The recipe resolved with the one fitting choice, its plan and validation report, and what was tried."""

    recipe: Recipe
    values: Mapping[str, Any]
    target: Target
    plan: Plan
    report: ValidationReport
    search: VariantSearch = field(repr=False)
    alike: bool = False  # every fitting choice plans the same conversion: the value does not matter here

    @property
    def note(self) -> str:
        """`size=tiny chosen from the source: the only one of atto, ... whose target validates (...)`."""
        if self.alike:
            names = ", ".join(p.name for p in self.search.params)
            return (
                f"{names}: every choice that fits gives the same conversion for {self.report.target}, "
                f"so none had to be chosen"
            )
        tried = "; ".join(f"{p.name} among {', '.join(map(str, p.choices))}" for p in self.search.params)
        label = ", ".join(f"{k}={v}" for k, v in self.values.items())
        return (
            f"{label} chosen from the source ({tried}): the only choice whose target validates "
            f"({self.report.matched} target keys matched); --set it to skip the search"
        )


def combinations(params: Sequence[InferredParam]) -> list[dict[str, Any]]:
    """Every assignment of the inferred parameters, in declaration order."""
    names = [p.name for p in params]
    return [dict(zip(names, values)) for values in itertools.product(*(p.choices for p in params))]


def choose_variant(recipe: Recipe, source: Any, target_of: Callable[[Recipe], Target | None]) -> Chosen:
    """Resolve `recipe`'s inferred parameters: the one combination whose plan on `source` validates.

    `target_of(candidate)` gives the target a resolved candidate must fit (e.g. its own `target:`, or a
    live module). Raises NoVariantFits or AmbiguousVariant (both Rejected, exit 1) with every attempt.
    """
    attempts: list[Attempt] = []
    found: list[tuple[dict[str, Any], Recipe, Target, Plan, ValidationReport]] = []
    extract = tuple(recipe.extract)
    for values in combinations(recipe.inferred):
        try:
            candidate = recipe.resolve(values)
            if tuple(candidate.extract) != extract:
                raise CkptxError(
                    f"changes `extract:` ({', '.join(candidate.extract)}), which a parameter chosen "
                    "from the source cannot do"
                )
            target = target_of(candidate)
            if target is None:
                raise CkptxError("the recipe has no target to validate against; give --target or set the parameter")
            plan_error = ""
            configs = [(f"the config of {target.description}", target.config)] if target.config else []
            try:
                plan = plan_recipe(candidate, source, target=target.tensors, configs=configs)
            except PlanError as exc:  # e.g. `reshape: {shape: target}` that cannot fit: count without those shapes
                plan_error = f"planning fails: {exc.problems[0].message}" if exc.problems else _first_line(exc)
                plan = plan_recipe(candidate, source, target={}, configs=configs)
            report = validate(plan, target)
        except Rejected:
            raise
        except CkptxError as exc:
            attempts.append(Attempt(values, error=_first_line(exc)))
            continue
        attempts.append(
            Attempt(
                values,
                report.target,
                report.matched,
                report.matched + len(report.missing) + len(report.allowed_missing),
                len(report.missing),
                len(report.unexpected),
                len(report.shape_mismatches),
                plan_error=plan_error,
            )
        )
        if report.ok and not plan_error:
            found.append((values, candidate, target, plan, report))
    search = VariantSearch(recipe.name, tuple(recipe.inferred), tuple(attempts))
    alike = len(found) > 1 and len({_conversion(f[3]) for f in found}) == 1
    if len(found) != 1 and not alike:
        raise (AmbiguousVariant if found else NoVariantFits)(search)
    values, candidate, target, plan, report = found[0]
    return Chosen(candidate, values, target, plan, report, search, alike)


def _first_line(exc: Exception) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


def _conversion(plan: Plan) -> str:
    """What a plan does, key by key, as one comparable text (for a fixed target: do two choices differ?)."""
    return repr([(e.key, e.sources, tuple(ops_of(e.expr)), e.meta) for e in plan.entries])
