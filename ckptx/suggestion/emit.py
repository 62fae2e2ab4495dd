"""Write a suggested recipe as YAML a person wants to keep: header comment, one step per block, a comment on
every row that was a close call, and the unmatched target keys listed at the end."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from ckptx.suggestion.build import StepText

__all__ = ["render_recipe", "scalar"]

_PLAIN = re.compile(r"^[A-Za-z_][A-Za-z0-9_./:-]*$")
_RESERVED = {"true", "false", "yes", "no", "on", "off", "null", "none", "~"}


def scalar(value: Any) -> str:
    """A YAML scalar: strings single-quoted unless plainly safe, numbers and booleans as they are."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return repr(value)
    if isinstance(value, float):
        if value != value:
            return ".nan"
        if value in (float("inf"), float("-inf")):
            return ".inf" if value > 0 else "-.inf"
        text = repr(value)
        mantissa, e, exponent = text.partition("e")
        if e and "." not in mantissa:  # YAML 1.1 (PyYAML) reads 1e-06 as a string, 1.0e-06 as a float
            text = f"{mantissa}.0e{exponent}"
        return text
    if isinstance(value, str):
        if _PLAIN.match(value) and value.lower() not in _RESERVED:
            return value
        return "'" + value.replace("'", "''") + "'"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{scalar(str(k))}: {scalar(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(scalar(v) for v in value) + "]"
    return json.dumps(str(value))


def _quoted(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _comment_lines(text: str, indent: str, width: int = 112) -> list[str]:
    words = text.split()
    lines, current = [], ""
    for word in words:
        if current and len(indent) + 2 + len(current) + 1 + len(word) > width:
            lines.append(f"{indent}# {current}")
            current = word
        else:
            current = f"{current} {word}" if current else word
    if current:
        lines.append(f"{indent}# {current}")
    return lines


def _step(step: StepText) -> list[str]:
    out: list[str] = []
    if step.comment:
        out += _comment_lines(step.comment, "  ")
    if step.op == "rename":
        out.append("  - rename:")
        for index, (pattern, replacement) in enumerate(step.value):
            for text in step.row_comments.get(index, ()):
                out += _comment_lines(text, "      ")
            out.append(f"      - [{_quoted(pattern)}, {_quoted(replacement)}]")
        return out
    value = step.value
    if isinstance(value, Mapping):
        inline = "{" + ", ".join(f"{k}: {_value(v)}" for k, v in value.items()) + "}"
        if len(inline) + 6 + len(step.op) <= 118:
            out.append(f"  - {step.op}: {inline}")
        else:
            out.append(f"  - {step.op}:")
            out += [f"      {k}: {_value(v)}" for k, v in value.items()]
        return out
    if isinstance(value, list):
        out.append(f"  - {step.op}: [{', '.join(_quoted(v) for v in value)}]")
        return out
    out.append(f"  - {step.op}: {_quoted(value)}")
    return out


def _value(value: Any) -> str:
    if isinstance(value, str) and value != "target":
        return _quoted(value)
    if isinstance(value, list):
        return "[" + ", ".join(_quoted(v) if isinstance(v, str) else scalar(v) for v in value) + "]"
    return scalar(value)


def render_recipe(
    *,
    header: Sequence[str],
    name: str,
    description: str,
    extract: str | None,
    steps: Sequence[StepText],
    target: Mapping[str, Any],
    verify: Mapping[str, Any] | None,
    trailer: Sequence[str],
) -> str:
    """The whole recipe text."""
    lines = [f"# {line}" if line else "#" for line in header]
    lines += ["ckptx: 1", f"name: {scalar(name)}", f"description: {scalar(description)}"]
    if extract is not None:
        lines.append(f"extract: {scalar(extract)}")
    if steps:
        lines.append("steps:")
        for step in steps:
            lines += _step(step)
    else:
        lines.append("steps: []")
    lines.append("target:")
    for key, value in target.items():
        if key in ("allow_missing", "allow_unexpected"):
            lines.append(f"  {key}: [{', '.join(_quoted(v) for v in value)}]")
        elif isinstance(value, Mapping) and len(f"  {key}: {scalar(value)}") > 100:
            lines.append(f"  {key}:")
            lines += [f"    {scalar(str(k))}: {scalar(v)}" for k, v in value.items()]
        else:
            lines.append(f"  {key}: {scalar(value)}")
    if verify:
        lines.append("verify:")
        lines += [f"  {key}: {scalar(value)}" for key, value in verify.items()]
    lines += [f"# {line}" if line else "#" for line in trailer]
    return "\n".join(lines) + "\n"
