"""Static checks of a recipe that need no checkpoint: patterns that are probably broader than meant."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ckptx.errors import Problem
from ckptx.rules.recipe import Origin, Recipe

__all__ = ["NamedCallable", "lint_recipe", "named_callables"]

_BARE_DOT = re.compile(r"(?<![\\\[])\.(?=[A-Za-z0-9_])")


def lint_recipe(recipe: Recipe) -> list[Problem]:
    """Warnings for key patterns that are unanchored or use '.' where '\\.' was meant."""
    warnings = []
    for step in recipe.steps:
        args = step.args  # key patterns: drop/keep list theirs as `patterns`, rename rows as `rules`
        patterns = [(p, step.where) for p in getattr(args, "patterns", ())]
        patterns += [(r.pattern, r.where) for r in getattr(args, "rules", ())]
        for pattern, where in patterns:
            warnings.extend(_check(pattern.pattern, where))
    return warnings


def _check(text: str, where: str) -> list[Problem]:
    problems = []
    if re.match(r"[A-Za-z_]", text) and not text.startswith("^"):
        problems.append(
            Problem(
                where,
                f"pattern {text!r} is not anchored: it also matches inside keys "
                f"(e.g. 'mlp_{text.rstrip('$')}'); write '^{text}' for the start of a key "
                f"or '\\.{text}' for a whole name component",
            )
        )
    if _BARE_DOT.search(text):
        problems.append(
            Problem(
                where,
                f"pattern {text!r} has an unescaped '.', which matches any character; write '\\.' for a literal dot",
            )
        )
    return problems


@dataclass(frozen=True)
class NamedCallable:
    """A callable a recipe would run: its role (`target.model`, `verify.source_model`), name, arguments and origin."""

    role: str
    name: str
    kwargs: Mapping[str, Any]
    origin: Origin


def named_callables(recipe: Recipe) -> list[NamedCallable]:
    """Every `module:callable` the recipe would call (its target model, its verify source model), in that order."""
    found = []
    if recipe.target is not None and recipe.target.model:
        found.append(
            NamedCallable("target.model", recipe.target.model, recipe.target.kwargs, recipe.target.model_origin)
        )
    if recipe.verify is not None:
        found.append(
            NamedCallable(
                "verify.source_model",
                recipe.verify.source_model,
                recipe.verify.source_kwargs,
                recipe.verify.source_origin,
            )
        )
    return found
