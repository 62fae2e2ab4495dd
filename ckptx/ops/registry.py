"""Defining a step kind: the `@step` decorator registers a planner with the rest of its kind (builder, schema
fragment, inverse) in the registry of step kinds (`ckptx/rules/kinds.py`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ckptx.planning.context import StepPlanner
from ckptx.rules.kinds import Doc, StepKind, register_step_kind


def step(
    name: str,
    *,
    build: Callable[[Any, Any], Any],
    schema: Mapping[str, Any],
    invert: Callable[..., list[Doc]] | None = None,
    not_invertible: str = "no inverse is known",
    renames_keys: bool = False,
    dump: Callable[[Any], Any] | None = None,
    fans_out: bool = False,
) -> Callable[[StepPlanner], StepPlanner]:
    """Register the decorated planner as step kind `name`, with the rest of the kind beside it in its module:
    the builder of its arguments, the JSON Schema fragment of its YAML value, and its inverse (or why it has none).
    `renames_keys` marks steps whose output keys the plan checks for collisions; `dump` writes the arguments back
    as YAML data where the generic field-by-field form is not how the step is written; `fans_out` lets one source
    tensor feed several outputs (the plan's accounting refuses that after any other step)."""

    def register(planner: StepPlanner) -> StepPlanner:
        summary = (planner.__doc__ or "").strip().split("\n")[0]
        register_step_kind(
            StepKind(name, build, schema, planner, invert, not_invertible, renames_keys, summary, dump, fans_out)
        )
        return planner

    return register
