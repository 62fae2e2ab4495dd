"""Inferred parameters: `params: {size: {infer: [atto, femto, ...]}}` is chosen from the source when not set.

A recipe loaded with an inferred parameter left unset is *pending*: its strings keep the placeholder
(`${size}`), `Recipe.inferred` lists what is still to choose, and `Recipe.resolve({'size': 'tiny'})` loads
it again with a value. `choose_variant` tries every choice against a target (models are built on the
meta device, so trying a few is cheap) and keeps the one whose plan validates; when none or several
do, it raises with what it tried and how close each came. Nothing here imports torch.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

from ckptx.errors import CkptxError, Problem, Rejected, RuleError

if TYPE_CHECKING:  # pragma: no cover
    from ckptx.plan import Plan
    from ckptx.rules.recipe import Recipe
    from ckptx.target import Target, ValidationReport

__all__ = ["AmbiguousVariant", "Attempt", "Chosen", "InferredParam", "NoVariantFits", "ParamsUnresolved",
           "VariantRejected", "VariantSearch", "choose_variant", "compose_resolvers", "declare_params",
           "require_resolved"]

INFER = "infer"
Resolver = Callable[[Mapping[str, Any]], "Recipe"]


@dataclass(frozen=True)
class InferredParam:
    """A parameter chosen from the source among `choices` when it is not set; `where` is its declaration."""

    name: str
    choices: tuple[Any, ...]
    where: str = ""

    @property
    def placeholder(self) -> str:
        """The text that stands for the parameter until it is chosen: `${name}`."""
        return "${" + self.name + "}"

    def describe(self) -> str:
        """`size (one of atto, femto, ...)`."""
        return f"{self.name} (one of {', '.join(map(str, self.choices))})"


def declare_params(raw: Mapping[str, Any], where: Callable[[tuple[Any, ...]], str]) -> dict[str, Any]:
    """A file's `params:` with each `{infer: [...]}` declaration turned into an InferredParam.

    Other values are returned as they are (the schema reports malformed declarations).
    """
    out: dict[str, Any] = {}
    for name, value in raw.items():
        if isinstance(value, Mapping) and isinstance(value.get(INFER), list) and value[INFER]:
            out[name] = InferredParam(str(name), tuple(value[INFER]), where(("params", name)))
        else:
            out[name] = value
    return out


def choice_problems(declared: Mapping[str, Any], overrides: Mapping[str, Any]) -> list[Problem]:
    """A value set for an inferred parameter must be one of its choices."""
    problems = []
    for name, value in overrides.items():
        param = declared.get(name)
        if isinstance(param, InferredParam) and not isinstance(value, InferredParam) and value not in param.choices:
            problems.append(Problem("--set", f"{name}={value} is not one of the choices declared at {param.where}: "
                                             f"{', '.join(map(str, param.choices))}; pick one, or leave {name} unset "
                                             f"to have it chosen from the source"))
    return problems


class ParamsUnresolved(RuleError):
    """An operation needs a concrete value for a parameter that is still to be chosen from the source."""


def require_resolved(recipe: "Recipe", doing: str) -> None:
    """Raise ParamsUnresolved when `recipe` still has inferred parameters that `doing` cannot choose."""
    if not recipe.inferred:
        return
    raise ParamsUnresolved([Problem(p.where, f"parameter '{p.name}' is chosen from the source (one of "
                                             f"{', '.join(map(str, p.choices))}) and {doing} cannot choose it; "
                                             f"pass --set {p.name}=... (params={{'{p.name}': ...}} from Python)")
                            for p in recipe.inferred])


def merge_inferred(first: Iterable[InferredParam], second: Iterable[InferredParam]) -> tuple[InferredParam, ...]:
    """Both lists, one entry per name (the later declaration wins)."""
    merged = {p.name: p for p in first}
    merged.update((p.name, p) for p in second)
    return tuple(merged.values())


def compose_resolvers(first: "Recipe", second: "Recipe") -> Resolver | None:
    """The resolver of `first.then(second)`: each side resolved with its own parameters, then composed."""
    sides = (first, second)
    if not any(r.inferred for r in sides) or any(r.inferred and r.resolver is None for r in sides):
        return None

    def resolve(values: Mapping[str, Any]) -> "Recipe":
        done = []
        for recipe in sides:
            names = {p.name for p in recipe.inferred}
            done.append(recipe.resolve({k: v for k, v in values.items() if k in names}) if names else recipe)
        return done[0].then(done[1])

    return resolve


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
        counts = (f"{self.label}: {self.fitting}/{self.target_keys} target keys fit ({self.mismatched} with another "
                  f"shape, {self.missing} missing), {self.unexpected} unexpected")
        return f"{counts}; {self.plan_error}" if self.plan_error else counts

    @property
    def fitting(self) -> int:
        """Target keys that the plan provides with the right shape."""
        return self.matched - self.mismatched

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"values": dict(self.values), "ok": self.ok, "target": self.target, "matched": self.matched,
                "fitting": self.fitting, "target_keys": self.target_keys, "mismatched": self.mismatched, "missing": self.missing,
                "unexpected": self.unexpected, "error": self.error, "plan_error": self.plan_error}


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
            head = (f"choosing {names} for {self.recipe}: {len(fitting)} choices fit the source "
                    f"({'; '.join(a.label for a in fitting)}); pass --set to pick one")
        else:
            head = (f"choosing {names} for {self.recipe}: no choice fits the source; tried "
                    f"{len(self.attempts)}, closest first:")
        ranked = sorted(self.attempts, key=lambda a: (not a.ok, bool(a.error), -a.fitting, a.missing + a.unexpected))
        lines = [head] + [f"  {a.describe()}" for a in ranked]
        if not fitting:
            lines.append("check that the source is what the recipe expects (`ckptx inspect`), or pass --set "
                         + " ".join(f"{p.name}=..." for p in self.params) + " to see the full validation report")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"recipe": self.recipe, "params": {p.name: list(p.choices) for p in self.params},
                "attempts": [a.to_dict() for a in self.attempts],
                "chosen": [dict(a.values) for a in self.fitting]}


class VariantRejected(Rejected):
    """No single choice of the inferred parameters fits the source; nothing was written (exit 1)."""

    kind = "variants"

    @property
    def search(self) -> VariantSearch:
        """What was tried."""
        return self.outcome  # type: ignore[return-value]


class NoVariantFits(VariantRejected):
    """Every choice was tried and none validates against its target."""


class AmbiguousVariant(VariantRejected):
    """More than one choice validates: the source does not tell them apart."""


@dataclass(frozen=True)
class Chosen:
    """The recipe resolved with the one fitting choice, its plan and validation report, and what was tried."""

    recipe: "Recipe"
    values: Mapping[str, Any]
    target: "Target"
    plan: "Plan"
    report: "ValidationReport"
    search: VariantSearch = field(repr=False)
    alike: bool = False  # every fitting choice plans the same conversion: the value does not matter here

    @property
    def note(self) -> str:
        """`size=tiny chosen from the source: the only one of atto, ... whose target validates (...)`."""
        if self.alike:
            names = ", ".join(p.name for p in self.search.params)
            return (f"{names}: every choice that fits gives the same conversion for {self.report.target}, "
                    f"so none had to be chosen")
        tried = "; ".join(f"{p.name} among {', '.join(map(str, p.choices))}" for p in self.search.params)
        label = ", ".join(f"{k}={v}" for k, v in self.values.items())
        return (f"{label} chosen from the source ({tried}): the only choice whose target validates "
                f"({self.report.matched} target keys matched); --set it to skip the search")


def combinations(params: Sequence[InferredParam]) -> list[dict[str, Any]]:
    """Every assignment of the inferred parameters, in declaration order."""
    names = [p.name for p in params]
    return [dict(zip(names, values)) for values in itertools.product(*(p.choices for p in params))]


def choose_variant(recipe: "Recipe", source: Any, target_of: Callable[["Recipe"], "Target | None"]) -> Chosen:
    """Resolve `recipe`'s inferred parameters: the one combination whose plan on `source` validates.

    `target_of(candidate)` gives the target a resolved candidate must fit (e.g. its own `target:`, or a
    live module). Raises NoVariantFits or AmbiguousVariant (both Rejected, exit 1) with every attempt.
    """
    from ckptx.errors import PlanError  # noqa: PLC0415
    from ckptx.plan import plan_recipe  # noqa: PLC0415
    from ckptx.target import validate  # noqa: PLC0415

    attempts: list[Attempt] = []
    found: list[tuple[dict[str, Any], Recipe, Target, Plan, ValidationReport]] = []
    extract = tuple(recipe.extract)
    for values in combinations(recipe.inferred):
        try:
            candidate = recipe.resolve(values)
            if tuple(candidate.extract) != extract:
                raise CkptxError(f"changes `extract:` ({', '.join(candidate.extract)}), which a parameter chosen "
                                 "from the source cannot do")
            target = target_of(candidate)
            if target is None:
                raise CkptxError("the recipe has no target to validate against; give --target or set the parameter")
            plan_error = ""
            try:
                plan = plan_recipe(candidate, source, target=target.tensors)
            except PlanError as exc:  # e.g. `reshape: {shape: target}` that cannot fit: count without those shapes
                plan_error = f"planning fails: {exc.problems[0].message}" if exc.problems else _first_line(exc)
                plan = plan_recipe(candidate, source, target={})
            report = validate(plan, target)
        except Rejected:
            raise
        except CkptxError as exc:
            attempts.append(Attempt(values, error=_first_line(exc)))
            continue
        attempts.append(Attempt(values, report.target, report.matched,
                                report.matched + len(report.missing) + len(report.allowed_missing),
                                len(report.missing), len(report.unexpected), len(report.shape_mismatches),
                                plan_error=plan_error))
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


def _conversion(plan: "Plan") -> str:
    """What a plan does, key by key, as one comparable text (for a fixed target: do two choices differ?)."""
    from ckptx.ops.registry import ops_of  # noqa: PLC0415

    return repr([(e.key, e.sources, tuple(ops_of(e.expr)), e.meta) for e in plan.entries])
