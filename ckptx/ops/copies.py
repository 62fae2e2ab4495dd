"""The copy step: one tensor under a second key as well (a tied weight stored once); its arguments, builder, schema
fragment, inverse and planner."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckptx._lazy import lazy_module
from ckptx.errors import OpShapeError, Problem
from ckptx.ops.common import fill_template
from ckptx.ops.registry import step
from ckptx.planning.context import PlanContext, StepOutcome
from ckptx.planning.entry import PlanEntry
from ckptx.rules.inverse import swap
from ckptx.rules.kinds import Doc, StepTrace, object_schema
from ckptx.rules.steps import Collector, Pattern, Step
from ckptx.rules.templates import Template

if TYPE_CHECKING:  # pragma: no cover
    import torch
else:
    torch = lazy_module("torch")


@dataclass(frozen=True)
class Copy:
    """Also store each matching tensor under the key `to` (a whole-key template)."""

    match: Pattern
    to: Template


def _build_copy(value: Any, c: Collector) -> Copy:
    match = c.regex(value["match"], "match")
    return Copy(match, c.template(value["to"], match, "invalid key template", "to"))


_COPY_SCHEMA = object_schema(
    description="Also store each matching tensor under a second key.",
    required=["match", "to"],
    properties={"match": {"$ref": "#/$defs/regex"}, "to": {"$ref": "#/$defs/keyTemplate"}},
)


def _invert_copy(args: Copy, step: Step, trace: StepTrace | None) -> list[Doc]:
    return [{"drop": [swap(args.match.pattern, args.to, whole=True).pattern]}]


@step("copy", build=_build_copy, schema=_COPY_SCHEMA, invert=_invert_copy, renames_keys=True, fans_out=True)
def plan_copy(args: Copy, step: Step, entries: list[PlanEntry], ctx: PlanContext) -> StepOutcome:
    """Each matching tensor also appears under a second key, right after the original."""
    out, hits = [], 0
    for entry in entries:
        out.append(entry)
        match = args.match.search(entry.key)
        if match is None:
            continue
        hits += 1
        try:
            out.append(PlanEntry(fill_template(args.to, match), entry.expr, entry.steps + (step.where,)))
        except OpShapeError as exc:
            ctx.errors.append(Problem(step.where, f"tensor '{entry.key}': {exc}"))
    return StepOutcome(out, hits)
