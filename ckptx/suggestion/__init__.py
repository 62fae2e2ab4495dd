"""`ckptx suggest` (the package `ckptx.suggestion`; the function is `ckptx.suggest`): infer a recipe from a source
checkpoint and a target, from metadata only.

`ckptx.suggest(src, target, ...)` returns a `Suggestion` (the Recipe, its YAML text and a report). The
modules, one job each: `sources` (where the weights are, wrapper prefixes), `tree` (layouts as levels with
repeated blocks folded), `names`, `shapes` and `order` (the evidence), `assign` (bipartite assignment),
`align` (runs, level by level), `flat` (the single tensors of a level), `match` (what is decided),
`generalize` (rename rows and exact-cover regexes), `build` (the steps), `emit` (the YAML text),
`verify_with` (`--verify-with`), `engine` (the whole, re-planned and validated); the subcommand is
`ckptx/cli/suggest_command.py`.

Importing this package is cheap: the engine (and numpy) load on the first call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from ckptx.suggestion.engine import Suggestion, SuggestReport

__all__ = ["SuggestReport", "Suggestion", "suggest"]


def suggest(src: Any, target: Any, **options: Any) -> Suggestion:
    """Infer a recipe converting checkpoint `src` to `target`; see `ckptx.suggestion.engine.suggest` for options."""
    from ckptx.suggestion.engine import suggest as run

    return run(src, target, **options)


def __getattr__(name: str) -> Any:
    if name in ("Suggestion", "SuggestReport"):
        from ckptx.suggestion import engine

        return getattr(engine, name)
    raise AttributeError(name)
