"""The registry of step kinds: what each step of a rule file is, in one record.

A step kind is defined in one module of `ckptx/ops/` (its arguments, builder, schema fragment, planner, tensor
ops and inverse side by side) and registered here when that module is imported (importing `ckptx` imports all
of them). The rules layer reads the registry and never imports the ops layer: building steps, checking them
against the schema and inverting them need only these records. No torch here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["STEP_KINDS", "StepKind", "StepTrace", "object_schema", "register_step_kind"]

Doc = dict[str, Any]


@dataclass(frozen=True)
class StepTrace:
    """One step planned on a known layout: (key, meta) before it and after it (after=None: it did not run)."""

    before: list[tuple[str, Any]]
    after: list[tuple[str, Any]] | None


@dataclass(frozen=True)
class StepKind:
    """One kind of step (`rename`, `cast`, ...).

    `build(value, collector)` turns the schema-valid YAML value into the step's frozen arguments (problems go to
    the collector); `schema` is the JSON Schema of that value, as it appears in `schemas/ckptx-rules.schema.json`;
    `plan(args, step, entries, ctx)` maps plan entries; `invert(args, step, trace)` gives the rule documents of
    the inverse steps (or raises NotInvertible), and steps without one name why in `not_invertible`;
    `renames_keys` marks steps whose output keys the plan must check for collisions; `dump(args)` writes the
    arguments back as YAML data (`rules show --resolved`) where the generic form does not; `fans_out` marks
    steps after which one source tensor may be read by several outputs (the plan's accounting allows it there).
    """

    name: str
    build: Callable[[Any, Any], Any]
    schema: Mapping[str, Any]
    plan: Callable[..., Any]
    invert: Callable[..., list[Doc]] | None = None
    not_invertible: str = "no inverse is known"
    renames_keys: bool = False
    summary: str = ""
    dump: Callable[[Any], Any] | None = None  # args -> YAML value, where the generic field-by-field form is not it
    fans_out: bool = False  # one source tensor may feed several outputs (copy, split)


STEP_KINDS: dict[str, StepKind] = {}


def object_schema(
    *, properties: Mapping[str, Any], required: list[str] | None = None, description: str | None = None
) -> dict[str, Any]:
    """The JSON Schema of a step's mapping value: these properties and no others (most kinds take one)."""
    schema: dict[str, Any] = {"type": "object", "additionalProperties": False}
    if required is not None:
        schema["required"] = list(required)
    if description is not None:
        schema["description"] = description
    schema["properties"] = dict(properties)
    return schema


def register_step_kind(kind: StepKind) -> StepKind:
    """Add a step kind to the registry (a second kind of the same name is a programming error)."""
    if kind.name in STEP_KINDS and STEP_KINDS[kind.name] is not kind:
        raise ValueError(f"step kind {kind.name!r} is registered twice")
    STEP_KINDS[kind.name] = kind
    return kind
