"""Reverse conversion: invert a recipe, tracing it on its source layout when a step's inverse needs shapes.

The source layout (`original`) is a checkpoint, a manifest, a `module:callable` model or a state dict in
the forward recipe's *source* layout; without one, the forward recipe's `verify.source_model` is used
when a step needs it. With a layout, the reverse recipe is also checked: planned on what the forward
recipe makes of that layout, it must give back exactly its keys, shapes and dtypes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ckptx.dtypes import TensorMeta
from ckptx.errors import Problem, RuleError, StepNotInvertible
from ckptx.planning.entry import PlanEntry
from ckptx.planning.planner import plan_recipe
from ckptx.planning.source import Source
from ckptx.rules.flatten import dump
from ckptx.rules.inverse import invert_recipe
from ckptx.rules.kinds import StepTrace
from ckptx.rules.loader import load_rules_text
from ckptx.rules.recipe import Recipe, TargetSpec, require_resolved
from ckptx.targets.resolve import parse_target_arg, resolve_target

Original = TargetSpec | str | Mapping[str, Any] | Any


@dataclass(frozen=True)
class Reversed:
    """A reverse recipe: its rule document, YAML text, and the loaded Recipe."""

    document: dict[str, Any]
    text: str
    recipe: Recipe
    traced_on: str | None


def reverse_recipe(
    recipe: Recipe, original: Original | None = None, *, configs: Sequence[tuple[str, Mapping[str, Any]]] = ()
) -> Reversed:
    """The reverse of `recipe`; RuleError naming the first step that cannot be undone.

    `original` (see the module doc) is traced when given; otherwise only if a step needs shapes. `configs` are the
    model's config documents for steps that read sizes from them (the reverse conversion's source's).
    """
    require_resolved(recipe, "reversing")
    layout = _layout(original) if original is not None else None
    if layout is None:
        try:
            return _finish(recipe, invert_recipe(recipe), None)
        except StepNotInvertible as exc:
            fallback = _verify_source(recipe)
            if fallback is None or not exc.needs_layout:
                raise
            layout = _layout(fallback)
    name, metas = layout
    traces, final = trace_recipe(recipe, metas, configs)
    reversed_ = _finish(recipe, invert_recipe(recipe, traces), name)
    _check_round_trip(reversed_.recipe, final, metas, name, configs)
    return reversed_


def trace_recipe(
    recipe: Recipe, metas: Mapping[str, TensorMeta], configs: Sequence[tuple[str, Mapping[str, Any]]] = ()
) -> tuple[list[StepTrace | None], dict[str, TensorMeta]]:
    """Plan `recipe` on metadata alone; each step's keys and metadata before and after, and the result.

    The recipe's own target (if any) is resolved for steps that take shapes from it (`shape: target`).
    """
    traces: list[StepTrace | None] = [None] * len(recipe.steps)

    def observe(index: int, before: list[PlanEntry], after: list[PlanEntry] | None) -> None:
        traces[index] = StepTrace(
            [(e.key, e.meta) for e in before], None if after is None else [(e.key, e.meta) for e in after]
        )

    target = resolve_target(recipe.target).tensors if recipe.target is not None else None
    plan = plan_recipe(recipe, _MetadataSource(metas), target=target, observe=observe, configs=configs)
    return traces, plan.expected


class _MetadataSource(Source):
    """A source that has metadata and no data: enough to plan."""

    def __init__(self, metas: Mapping[str, TensorMeta]) -> None:
        super().__init__(path="<layout>", format="metadata", tensors=dict(metas))


def _layout(original: Original) -> tuple[str, dict[str, TensorMeta]]:
    spec = parse_target_arg(original) if isinstance(original, str) else original
    target = resolve_target(spec)
    return target.description, dict(target.tensors)


def _verify_source(recipe: Recipe) -> TargetSpec | None:
    verify = recipe.verify
    if verify is None:
        return None
    return TargetSpec(
        model=verify.source_model,
        kwargs=dict(verify.source_kwargs),
        where=verify.where,
        model_origin=verify.source_origin,
    )


def _finish(recipe: Recipe, document: dict[str, Any], traced_on: str | None) -> Reversed:
    sources = ", ".join(f.path for f in recipe.files) or recipe.name
    header = (
        f"# Reverse of {recipe.name} ({sources}), made by `ckptx invert`"
        + (f"; shapes and dtypes from {traced_on}" if traced_on else "")
        + ".\n"
    )
    text = header + dump(document)
    loaded = load_rules_text(text, f"<reverse of {recipe.name}>")
    return Reversed(document, text, loaded, traced_on)


def _check_round_trip(
    reverse: Recipe,
    made: Mapping[str, TensorMeta],
    original: Mapping[str, TensorMeta],
    name: str,
    configs: Sequence[tuple[str, Mapping[str, Any]]] = (),
) -> None:
    back = plan_recipe(reverse, _MetadataSource(made), configs=configs).expected
    if back == dict(original):
        return
    missing = sorted(set(original) - set(back))
    extra = sorted(set(back) - set(original))
    differ = sorted(k for k in set(back) & set(original) if back[k] != original[k])
    details = "; ".join(
        part
        for part in (
            f"missing {', '.join(missing[:5])}" if missing else "",
            f"extra {', '.join(extra[:5])}" if extra else "",
            ", ".join(f"{k} is {back[k]} instead of {original[k]}" for k in differ[:5]),
        )
        if part
    )
    raise RuleError(
        [
            Problem(
                reverse.name,
                f"the reverse recipe does not give back {name}: {details}; "
                f"the forward recipe is not one-to-one on this layout",
            )
        ]
    )
