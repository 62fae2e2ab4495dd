"""A recipe's steps: the typed `Step` (its kind's arguments, where it was written, `when:`), built from schema-valid
dicts through the registry of step kinds (`ckptx/rules/kinds.py`); the `Collector` every builder reports into."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Protocol

from ckptx.errors import Problem, TemplateError
from ckptx.rules.kinds import STEP_KINDS
from ckptx.rules.templates import Template, compile_template

Pattern = re.Pattern[str]


class Where(Protocol):
    """`file:line:col path` of a node of the YAML document (with key=True, of the key naming it)."""

    def __call__(self, path: tuple[Any, ...], *, key: bool = False) -> str: ...


class Collector:
    """Collects problems while building dataclasses; `where(path)` locates a sub-path."""

    def __init__(self, where: Where, path: tuple[Any, ...]) -> None:
        self._where = where
        self.path = path
        self.problems: list[Problem] = []

    def at(self, *sub: Any) -> str:
        """The place of a sub-path of the step (`rules/x.yaml:14:9 steps[2].rename[0]`)."""
        return self._where(self.path + sub)

    def regex(self, text: str, *sub: Any) -> Pattern:
        """Compile a regex; a problem names its place (and an escaped stand-in keeps building going)."""
        try:
            return re.compile(text)
        except re.error as exc:
            self.problems.append(Problem(self.at(*sub), f"invalid regex {text!r}: {exc}"))
            return re.compile(re.escape(text))

    def template(
        self, text: str, pattern: Pattern | None, what: str, *sub: Any, names: tuple[str, ...] = ()
    ) -> Template:
        """Compile a key template against `pattern`; a problem names the template's place."""
        try:
            return compile_template(text, pattern, names=names)
        except TemplateError as exc:
            self.problems.append(Problem(self.at(*sub), f"{what} {text!r}: {exc}"))
            return Template(text, (text,))

    def regexes(self, value: str | list[str], *sub: Any) -> tuple[Pattern, ...]:
        """One regex or a list of them."""
        if isinstance(value, str):
            return (self.regex(value, *sub),)
        return tuple(self.regex(text, *sub, i) for i, text in enumerate(value))


@dataclass(frozen=True)
class When:
    """Condition for running a step."""

    has_key: Pattern | None = None
    no_key: Pattern | None = None
    params: tuple[tuple[str, Any], ...] = ()
    extracted_from: Pattern | None = None


@dataclass(frozen=True)
class Step:
    """One step of a recipe: its op name, typed arguments and where it was written."""

    op: str
    args: Any
    where: str
    strict: bool = False
    when: When | None = None
    params: tuple[tuple[str, Any], ...] = field(default=(), compare=False)

    @classmethod
    def from_dict(
        cls,
        data: dict[str, Any],
        *,
        where: Where,
        path: tuple[Any, ...],
        params: dict[str, Any],
        problems: list[Problem],
    ) -> Step | None:
        """Build a step from its schema-valid mapping; problems are appended, not raised."""
        ops = [k for k in data if k in STEP_KINDS]
        if len(ops) != 1:
            message = (
                f"a step takes exactly one op; found {' and '.join(ops)}: write them as separate steps"
                if ops
                else "a step needs an op (drop, keep, rename, reshape, ...); found only " + ", ".join(sorted(data))
            )
            problems.append(Problem(where(path), message))
            return None
        op = ops[0]
        collector = Collector(where, path + (op,))
        args = STEP_KINDS[op].build(data[op], collector)
        when = _when(data.get("when"), Collector(where, path + ("when",)), params)
        problems.extend(collector.problems)
        return cls(
            op=op,
            args=args,
            where=where(path + (op,), key=True),
            strict=bool(data.get("strict", False)),
            when=when,
            params=tuple(sorted(params.items())),
        )


def _when(data: dict[str, Any] | None, c: Collector, params: dict[str, Any]) -> When | None:
    if data is None:
        return None
    wanted = data.get("param", {})
    for name in wanted:
        if name not in params:
            c.problems.append(Problem(c.at("param", name), f"unknown parameter '{name}'; declare it under params:"))
    return When(
        has_key=c.regex(data["has_key"], "has_key") if "has_key" in data else None,
        no_key=c.regex(data["no_key"], "no_key") if "no_key" in data else None,
        params=tuple(sorted(wanted.items())),
        extracted_from=c.regex(data["extracted_from"], "extracted_from") if "extracted_from" in data else None,
    )


def dim_arg(value: Any) -> int:
    """A step's `dim:` (0 when absent)."""
    return int(value.get("dim", 0))
