"""Inferred parameters: `params: {size: {infer: [atto, femto, ...]}}` is chosen from the source when not set.

A recipe loaded with an inferred parameter left unset is *pending*: its strings keep the placeholder
(`${size}`), `Recipe.inferred` lists what is still to choose, and `Recipe.resolve({'size': 'tiny'})` loads
it again with a value. Choosing one against a target is `ckptx/variants.py` (it plans and validates, so it
lives above those layers). Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ckptx.errors import Problem

__all__ = ["InferredParam", "choice_problems", "declare_params", "merge_inferred"]

INFER = "infer"


@dataclass(frozen=True)
class InferredParam:
    """A parameter chosen from the source among `choices` when it is not set; `where` is its declaration."""

    name: str
    choices: tuple[Any, ...]
    where: str = ""

    @property
    def placeholder(self) -> str:
        """The text that stands for the parameter until it is chosen: `${name}`."""
        return "${" + self.name + "}"

    def describe(self) -> str:
        """`size (one of atto, femto, ...)`."""
        return f"{self.name} (one of {', '.join(map(str, self.choices))})"


def declare_params(raw: Mapping[str, Any], where: Callable[[tuple[Any, ...]], str]) -> dict[str, Any]:
    """A file's `params:` with each `{infer: [...]}` declaration turned into an InferredParam.

    Other values are returned as they are (the schema reports malformed declarations).
    """
    out: dict[str, Any] = {}
    for name, value in raw.items():
        if isinstance(value, Mapping) and isinstance(value.get(INFER), list) and value[INFER]:
            out[name] = InferredParam(str(name), tuple(value[INFER]), where(("params", name)))
        else:
            out[name] = value
    return out


def choice_problems(declared: Mapping[str, Any], overrides: Mapping[str, Any]) -> list[Problem]:
    """A value set for an inferred parameter must be one of its choices."""
    problems = []
    for name, value in overrides.items():
        param = declared.get(name)
        if isinstance(param, InferredParam) and not isinstance(value, InferredParam) and value not in param.choices:
            problems.append(
                Problem(
                    "--set",
                    f"{name}={value} is not one of the choices declared at {param.where}: "
                    f"{', '.join(map(str, param.choices))}; pick one, or leave {name} unset "
                    f"to have it chosen from the source",
                )
            )
    return problems


def merge_inferred(first: Iterable[InferredParam], second: Iterable[InferredParam]) -> tuple[InferredParam, ...]:
    """Both lists, one entry per name (the later declaration wins)."""
    merged = {p.name: p for p in first}
    merged.update((p.name, p) for p in second)
    return tuple(merged.values())
