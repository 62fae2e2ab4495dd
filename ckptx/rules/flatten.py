"""Turn a resolved Recipe back into a plain rule document (what `ckptx rules show --resolved` prints)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import yaml

from ckptx.rules.kinds import STEP_KINDS
from ckptx.rules.recipe import Recipe, TargetSpec
from ckptx.rules.steps import Step
from ckptx.rules.templates import Template


class _Dumper(yaml.SafeDumper):
    """Mappings as blocks, lists of plain values inline (`dims: [0, 2, 3, 1]`, rename rows), no anchors."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


_Dumper.add_representer(
    list,
    lambda dumper, data: dumper.represent_sequence(
        "tag:yaml.org,2002:seq", data, flow_style=all(not isinstance(v, (dict, list)) for v in data)
    ),
)


def dump(document: dict[str, Any]) -> str:
    """A rule document as YAML: keys in order, mappings as blocks, short lists inline."""
    return yaml.dump(document, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=120)


def flatten(recipe: Recipe) -> dict[str, Any]:
    """A version-1 rule document equivalent to `recipe`, with extends and params already applied."""
    doc: dict[str, Any] = {"ckptx": 1, "name": recipe.name}
    if recipe.description:
        doc["description"] = recipe.description
    if recipe.inferred:  # still to be chosen from the source: their `${name}` placeholders stay
        doc["params"] = {p.name: {"infer": list(p.choices)} for p in recipe.inferred}
    if recipe.extract:
        doc["extract"] = list(recipe.extract)
    pending = {p.name for p in recipe.inferred}
    doc["steps"] = [out for out in (_step(s, recipe.params, pending) for s in recipe.steps) if out is not None]
    if recipe.target is not None:
        doc["target"] = _target(recipe.target)
    if recipe.verify is not None:
        doc["verify"] = {
            k: _plain(v)
            for k, v in dataclasses.asdict(recipe.verify).items()
            if k not in ("where", "given", "source_origin") and v not in (None, ())
        }
    return doc


def _step(
    step: Step, params: Mapping[str, Any], pending: frozenset[str] | set[str] = frozenset()
) -> dict[str, Any] | None:
    """One step as YAML data; None when its `when: param` condition is false for these params.

    Conditions on `pending` (inferred, not yet chosen) parameters stay in the step."""
    kind = STEP_KINDS[step.op]
    out: dict[str, Any] = {step.op: kind.dump(step.args) if kind.dump is not None else dump_args(step.args)}
    if step.strict:
        out["strict"] = True
    if step.when is not None:
        if any(params.get(name) != wanted for name, wanted in step.when.params if name not in pending):
            return None
        when = {
            k: _plain(getattr(step.when, k))
            for k in ("has_key", "no_key", "extracted_from")
            if getattr(step.when, k) is not None
        }
        kept = {name: wanted for name, wanted in step.when.params if name in pending}
        if kept:
            when["param"] = kept
        if when:
            out["when"] = when
    out["comment"] = f"from {step.where}"
    return out


def dump_args(args: Any) -> Any:
    """A step's arguments as YAML data, field by field (a lone `patterns` field as its list)."""
    value = {
        f.name: _arg(f.name, getattr(args, f.name))
        for f in dataclasses.fields(args)
        if _arg(f.name, getattr(args, f.name)) is not None
    }
    if len(value) == 1 and "patterns" in value:
        return value["patterns"]
    return value


# Fields where None means "take it from the target".
_FROM_TARGET = {"shape", "size", "grid", "channels"}


def _arg(name: str, value: Any) -> Any:
    """A step argument as YAML data; None to leave it out."""
    if value is None:
        return "target" if name in _FROM_TARGET else None
    if isinstance(value, tuple) and not value and name != "shape":
        return None
    return _plain(value)


def _target(spec: TargetSpec) -> dict[str, Any]:
    out = {
        k: _plain(getattr(spec, k))
        for k in ("model", "kwargs", "checkpoint", "manifest", "allow_missing", "allow_unexpected")
        if getattr(spec, k)
    }
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, re.Pattern):
        return value.pattern
    if isinstance(value, Template):
        return value.text
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return value
