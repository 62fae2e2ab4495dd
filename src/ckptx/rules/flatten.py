"""Turn a resolved Recipe back into a plain rule document (what `ckptx rules show --resolved` prints)."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from ckptx.rules.recipe import Recipe, TargetSpec
from ckptx.rules.steps import AddPrefix, Rename, Step, StripPrefix


def flatten(recipe: Recipe) -> dict[str, Any]:
    """A version-1 rule document equivalent to `recipe`, with extends and params already applied."""
    doc: dict[str, Any] = {"ckptx": 1, "name": recipe.name}
    if recipe.description:
        doc["description"] = recipe.description
    if recipe.extract:
        doc["extract"] = list(recipe.extract)
    doc["steps"] = [_step(s) for s in recipe.steps]
    if recipe.target is not None:
        doc["target"] = _target(recipe.target)
    if recipe.verify is not None:
        doc["verify"] = {k: _plain(v) for k, v in dataclasses.asdict(recipe.verify).items() if k != "where"}
    return doc


def _step(step: Step) -> dict[str, Any]:
    args = step.args
    if isinstance(args, Rename):
        value: Any = [[r.pattern.pattern, r.replacement] for r in args.rules]
    elif isinstance(args, StripPrefix):
        value = list(args.prefixes)
    elif isinstance(args, AddPrefix) and args.match is None and args.skip is None:
        value = args.prefix
    else:
        value = {f.name: _plain(getattr(args, f.name)) for f in dataclasses.fields(args)
                 if getattr(args, f.name) is not None}
        if len(value) == 1 and "patterns" in value:
            value = value["patterns"]
    out: dict[str, Any] = {step.op: value}
    if step.strict:
        out["strict"] = True
    out["comment"] = f"from {step.where}"
    return out


def _target(spec: TargetSpec) -> dict[str, Any]:
    out = {k: _plain(getattr(spec, k)) for k in ("model", "kwargs", "checkpoint", "manifest",
                                                 "allow_missing", "allow_unexpected") if getattr(spec, k)}
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, re.Pattern):
        return value.pattern
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return value
