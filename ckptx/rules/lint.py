"""Static checks of a recipe that need no checkpoint: patterns that are probably broader than meant."""

from __future__ import annotations

import re

from ckptx.errors import Problem
from ckptx.rules.recipe import Recipe

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
        problems.append(Problem(where, f"pattern {text!r} is not anchored: it also matches inside keys "
                                       f"(e.g. 'mlp_{text.rstrip('$')}'); write '^{text}' for the start of a key "
                                       f"or '\\.{text}' for a whole name component"))
    if _BARE_DOT.search(text):
        problems.append(Problem(where, f"pattern {text!r} has an unescaped '.', which matches any character; "
                                       f"write '\\.' for a literal dot"))
    return problems
