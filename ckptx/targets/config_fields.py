"""The fields of a transformers config class: which exist (a did-you-mean for the ones that do not), their defaults,
and `K=V` values typed like the field they set. No torch, no transformers import here: the class is given."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping
from typing import Any

from ckptx.errors import TargetError

__all__ = ["check_overrides", "coerce_like", "config_defaults", "known_fields"]


def check_overrides(
    config_class: type, document: Mapping[str, Any], overrides: Mapping[str, Any], where: str
) -> dict[str, Any]:
    """`overrides` checked against the fields of `config_class` (and of `document`), each value given the type of
    the field it replaces where it was typed as text (`1e-5` is text to YAML); an unknown field is an error."""
    known = known_fields(config_class) | set(document)
    defaults = config_defaults(config_class)
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else f"; see {config_class.__name__}'s fields"
            raise TargetError(f"{where}: {key}={value!r}: {config_class.__name__} has no field '{key}'{hint}")
        out[key] = coerce_like(value, document.get(key, defaults.get(key)), f"{where}: {key}")
    return out


def known_fields(config_class: type) -> set[str]:
    """The fields a config class knows: its serialised fields, aliases and constructor arguments."""
    fields = set(config_defaults(config_class))
    fields |= set(getattr(config_class, "attribute_map", {}) or {})
    try:
        fields |= {
            name
            for name, p in inspect.signature(config_class).parameters.items()
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
        }
    except (TypeError, ValueError):
        pass  # a constructor without a signature: the serialised fields are what there is
    fields |= {name for name in dir(config_class) if isinstance(getattr(config_class, name, None), property)}
    return fields | {"architectures", "dtype", "torch_dtype"}


def coerce_like(value: Any, like: Any, where: str) -> Any:
    """`value` as the type of `like` when it was given as text for a number or a boolean."""
    if not isinstance(value, str) or like is None or isinstance(like, str):
        return value
    try:
        if isinstance(like, bool):
            if value.lower() in ("true", "false"):
                return value.lower() == "true"
        elif isinstance(like, int):
            return int(value)
        elif isinstance(like, float):
            return float(value)
    except ValueError:
        raise TargetError(f"{where}={value!r}: not a {type(like).__name__} (the field holds {like!r})") from None
    return value


def config_defaults(config_class: type) -> dict[str, Any]:
    """A config class's fields with their defaults (empty when it cannot be built without arguments)."""
    try:
        defaults: dict[str, Any] = config_class().to_dict()
    except Exception:  # noqa: BLE001 - a config class that needs arguments has no defaults to offer
        return {}
    return defaults
