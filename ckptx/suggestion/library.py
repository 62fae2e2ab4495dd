"""The library first: before inferring anything, every shipped recipe and every installed rule pack's recipe is tried on
the source; one whose plan validates against the target (its inferred parameters chosen from the source, as
`ckptx convert` would) is proposed as it is, flattened, with the user's target.

A recipe is planned only when one of its key patterns matches some of the source's keys (a cheap test on a sample),
so a library of recipes costs little on a source they have nothing to do with.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from itertools import islice
from typing import Any

from ckptx.check.inferred import combinations
from ckptx.check.validation import ValidationReport, validate
from ckptx.errors import CkptxError
from ckptx.planning.planner import plan_recipe
from ckptx.rules.flatten import flatten
from ckptx.rules.loader import load_rules
from ckptx.rules.packs import list_recipes
from ckptx.rules.recipe import Recipe
from ckptx.suggestion.sources import manifest_source
from ckptx.targets.resolve import Target

__all__ = ["LibraryFit", "library_fit"]

_SAMPLE = 2000  # source keys a recipe's patterns are tried on before it is planned
_NUMBERS = re.compile(r"\d+")


@dataclass(frozen=True)
class LibraryFit:
    """A library recipe that validates against the target as it is."""

    name: str
    pack: str
    recipe: Recipe  # resolved (inferred parameters chosen)
    values: Mapping[str, Any]  # the inferred parameters' chosen values
    report: ValidationReport
    document: dict[str, Any]  # the flattened rule document


def library_fit(source: Any, target: Target) -> LibraryFit | None:
    """The first library recipe (shipped pack first, then installed packs, by name) whose plan on `source` validates
    against `target`, or None. Recipes that only strip a prefix or pick weights out (`common/...`) are left to
    inference, which does the same and says so."""
    sample = list(islice(iter(source.tensors), _SAMPLE))
    probe = _probe(source) if len(source.tensors) > _SAMPLE else None
    for ref in list_recipes():
        if ref.name.startswith("common/"):
            continue
        try:
            recipe = load_rules(ref.path)
        except CkptxError:
            continue  # a broken third-party recipe is not this source's business
        if recipe.extract and getattr(source, "extracted_from", ".") not in recipe.extract:
            continue  # the weights it looks for are elsewhere
        if not _may_apply(recipe, sample):
            continue
        fits = []
        for values in combinations(recipe.inferred) if recipe.inferred else [{}]:
            try:
                candidate = recipe.resolve(values) if values else recipe
                if probe is not None and not _sample_fits(candidate, probe, target):
                    continue  # what it makes of a sample of the keys is not in the target: no need to plan them all
                plan = plan_recipe(candidate, source, target=target.tensors)
            except CkptxError:
                continue
            if _changes(plan) and _fits(plan, target):  # cheap exact tests first: validate() explains failures
                fits.append((candidate, values, validate(plan, target)))
        fits = [f for f in fits if f[2].ok and not f[2].allowed_missing]
        if len(fits) == 1:
            resolved, values, report = fits[0]
            return LibraryFit(ref.name, ref.pack.name, resolved, values, report, flatten(resolved))
    return None


def _probe(source: Any) -> Any:
    """A small model of the source for a first try: the keys whose numbers are all 0 or 1 (the first two blocks of
    every stack, and every key outside them), or None when even that is large."""
    keys = [k for k in source.tensors if all(int(n) <= 1 for n in _NUMBERS.findall(k))]
    if len(keys) > 5 * _SAMPLE:
        return None
    return manifest_source("<sample>", {k: source.tensors[k] for k in keys})


def _sample_fits(recipe: Recipe, probe: Any, target: Target) -> bool:
    """Every key the recipe makes of the probe's keys is a target key (True when the probe cannot be planned on its
    own: then the whole source decides)."""
    try:
        plan = plan_recipe(recipe, probe)
    except CkptxError:
        return True
    return all(entry.key in target.tensors for entry in plan.entries)


def _changes(plan: Any) -> bool:
    """The recipe does something to this source: a step touched an entry or dropped one. A recipe that leaves every
    tensor as it is (a dequantize step on weights that are not quantized) fits only because the source already does:
    it is no proposal."""
    return bool(plan.dropped) or any(entry.steps for entry in plan.entries)


def _fits(plan: Any, target: Target) -> bool:
    """The plan gives exactly the target's keys, with its shapes."""
    if len(plan.entries) != len(target.tensors):
        return False
    for entry in plan.entries:
        want = target.tensors.get(entry.key)
        if want is None or tuple(want.shape) != tuple(entry.meta.shape):
            return False
    return True


def _may_apply(recipe: Recipe, sample: list[str]) -> bool:
    """True when some key pattern of the recipe matches a sampled source key (or it has none to test)."""
    patterns = list(_patterns(flatten(recipe).get("steps", [])))
    if not patterns:
        return False
    for text in patterns:
        try:
            regex = re.compile(text)
        except re.error:
            continue
        if any(regex.search(key) for key in sample):
            return True
    return False


def _patterns(steps: Any) -> Iterator[str]:
    """Regexes of rename rows and of `match:` arguments, wherever they are in a step document."""
    if isinstance(steps, Mapping):
        for key, value in steps.items():
            if key == "match" and isinstance(value, str) and "${" not in value:
                yield value
            elif key == "rename" and isinstance(value, list):
                yield from (row[0] for row in value if isinstance(row, list) and row and isinstance(row[0], str))
            else:
                yield from _patterns(value)
    elif isinstance(steps, list):
        for item in steps:
            yield from _patterns(item)
