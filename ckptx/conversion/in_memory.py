"""The Python API that writes no file: a recipe planned on a checkpoint, applied to a state dict, or a checkpoint
loaded straight into a live module."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptx._lazy import lazy_module
from ckptx.check.inferred import choose_variant
from ckptx.check.validation import ValidationReport, validate
from ckptx.dtypes import TensorMeta
from ckptx.errors import ValidationFailed
from ckptx.io.read.open import open_source
from ckptx.io.read.state_dict import memory_source
from ckptx.planning.entry import PlanEntry
from ckptx.planning.execute import materialize
from ckptx.planning.planner import Plan, plan_recipe
from ckptx.planning.source import Source
from ckptx.rules.loader import RecipeArg, as_recipe
from ckptx.rules.recipe import Recipe
from ckptx.targets.resolve import Target, resolve_target

if TYPE_CHECKING:  # pragma: no cover
    import torch
else:
    torch = lazy_module("torch")

__all__ = ["apply", "load_into", "plan"]


def plan(
    recipe: Recipe,
    source: Source | str | Path | Mapping[str, Any],
    *,
    target: Mapping[str, TensorMeta] | None = None,
    observe: Callable[[int, list[PlanEntry], list[PlanEntry] | None], None] | None = None,
) -> Plan:
    """Plan `recipe` on a checkpoint (a path, an open Source, or an in-memory state dict) from metadata alone; see
    `ckptx.planning.planner.plan_recipe` for `target` and `observe`. A path is opened with the recipe's `extract`
    and stays open as the plan's source."""
    if isinstance(source, Source):
        opened = source
    elif isinstance(source, Mapping):
        opened = memory_source(source, recipe.extract)
    else:
        opened = open_source(source, recipe.extract)
    return plan_recipe(recipe, opened, target=target, observe=observe)


def apply(
    recipe: RecipeArg, checkpoint: Mapping[str, Any], target: Any = None, *, params: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Apply a recipe to an in-memory checkpoint (a state dict, or a whole `torch.load` result: the recipe's
    `extract` finds the weights as for a file); returns the converted state dict."""
    recipe = as_recipe(recipe, params)
    source = memory_source(checkpoint, recipe.extract)
    resolved = resolve_target(target) if target is not None else None
    if recipe.inferred and resolved is not None:
        recipe = choose_variant(recipe, source, lambda candidate: resolved).recipe
    plan = plan_recipe(recipe, source, target=resolved.tensors if resolved is not None else None)
    return {entry.key: materialize(entry, source) for entry in plan.entries}


def load_into(
    model: torch.nn.Module,
    src: str | Path | Mapping[str, Any],
    recipes: RecipeArg,
    *,
    strict: bool = True,
    params: Mapping[str, Any] | None = None,
    allow_globals: Sequence[str] = (),
    unsafe_pickle: bool = False,
) -> ValidationReport:
    """Convert `src` (a path or an in-memory checkpoint) with the recipes straight into a live model.

    With `strict`, every key must fit first (ValidationFailed otherwise, the model untouched). Without it,
    the matching keys are loaded and the report says what was not; a plan that fits no key at all still
    raises, since loading nothing is never what was meant.
    """
    recipe = as_recipe(recipes, params)
    expected: Target = resolve_target(model)
    source: Source = (
        memory_source(src, recipe.extract)
        if isinstance(src, Mapping)
        else open_source(src, recipe.extract, allow_globals=allow_globals, unsafe_pickle=unsafe_pickle)
    )
    with source:
        if recipe.inferred:
            recipe = choose_variant(recipe, source, lambda candidate: expected).recipe
        plan = plan_recipe(recipe, source, target=expected.tensors)
        report = validate(plan, expected)
        if not report.ok and (strict or report.matched == 0):
            raise ValidationFailed(report)
        state = {entry.key: materialize(entry, source) for entry in plan.entries if entry.key in expected.tensors}
        model.load_state_dict(state, strict=strict)
    return report
