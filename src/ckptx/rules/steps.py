"""Typed step arguments, built from schema-valid dicts; regexes are compiled here."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Union

from ckptx.errors import Problem

Pattern = re.Pattern[str]


class _Collector:
    """Collects problems while building dataclasses; `where(path)` locates a sub-path."""

    def __init__(self, where: Callable[[tuple[Any, ...]], str], path: tuple[Any, ...]) -> None:
        self._where = where
        self.path = path
        self.problems: list[Problem] = []

    def at(self, *sub: Any) -> str:
        return self._where(self.path + sub)

    def regex(self, text: str, *sub: Any) -> Pattern:
        try:
            return re.compile(text)
        except re.error as exc:
            self.problems.append(Problem(self.at(*sub), f"invalid regex {text!r}: {exc}"))
            return re.compile(re.escape(text))

    def regexes(self, value: str | list[str], *sub: Any) -> tuple[Pattern, ...]:
        if isinstance(value, str):
            return (self.regex(value, *sub),)
        return tuple(self.regex(text, *sub, i) for i, text in enumerate(value))


@dataclass(frozen=True)
class Drop:
    """Remove every key matching any pattern."""

    patterns: tuple[Pattern, ...]


@dataclass(frozen=True)
class Keep:
    """Remove every key matching none of the patterns."""

    patterns: tuple[Pattern, ...]


@dataclass(frozen=True)
class StripPrefix:
    """Remove leading prefixes (literal strings), repeatedly and in any order.

    With `common=True`, remove the first name component when every key shares it (`model.`).
    """

    prefixes: tuple[str, ...]
    common: bool = False


@dataclass(frozen=True)
class TakeFrom:
    """Replace each key's tensor by the one stored under `template` (e.g. `ema_{flat}`), dropping that key."""

    template: str


@dataclass(frozen=True)
class AddPrefix:
    """Prepend a literal prefix to every key (or to those matching `match` and not `skip`)."""

    prefix: str
    match: Pattern | None = None
    skip: Pattern | None = None


@dataclass(frozen=True)
class RenameRule:
    """One row of a rename table: regex and `re.sub` replacement."""

    pattern: Pattern
    replacement: str
    where: str


@dataclass(frozen=True)
class Rename:
    """Per key, the first row whose pattern matches rewrites it (like `re.sub`)."""

    rules: tuple[RenameRule, ...]


@dataclass(frozen=True)
class Reshape:
    """Reshape matching tensors; `shape=None` means the target model's shape for that key."""

    match: Pattern
    shape: tuple[int, ...] | None


@dataclass(frozen=True)
class Permute:
    """Permute the dimensions of matching tensors."""

    match: Pattern
    dims: tuple[int, ...]


@dataclass(frozen=True)
class Cast:
    """Cast matching tensors to `dtype` (floating-point ones only unless include_integer)."""

    match: Pattern
    dtype: str
    include_integer: bool = False


StepArgs = Union[Drop, Keep, StripPrefix, TakeFrom, AddPrefix, Rename, Reshape, Permute, Cast]


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
    args: StepArgs
    where: str
    strict: bool = False
    when: When | None = None
    params: tuple[tuple[str, Any], ...] = field(default=(), compare=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: Callable[[tuple[Any, ...]], str],
                  path: tuple[Any, ...], params: dict[str, Any], problems: list[Problem]) -> "Step | None":
        """Build a step from its schema-valid mapping; problems are appended, not raised."""
        ops = [k for k in data if k in _BUILDERS]
        if len(ops) != 1:
            message = (f"a step takes exactly one op; found {' and '.join(ops)}: write them as separate steps" if ops
                       else "a step needs an op (drop, keep, rename, reshape, ...); found only "
                            + ", ".join(sorted(data)))
            problems.append(Problem(where(path), message))
            return None
        op = ops[0]
        collector = _Collector(where, path + (op,))
        args = _BUILDERS[op](data[op], collector)
        when = _when(data.get("when"), _Collector(where, path + ("when",)), params)
        problems.extend(collector.problems)
        return cls(op=op, args=args, where=where(path + (op,), key=True), strict=bool(data.get("strict", False)),
                   when=when, params=tuple(sorted(params.items())))


def _when(data: dict[str, Any] | None, c: _Collector, params: dict[str, Any]) -> When | None:
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


def _rename(value: Any, c: _Collector) -> Rename:
    rows = value if isinstance(value, list) else [value]
    rules = []
    for i, row in enumerate(rows):
        sub = (i,) if isinstance(value, list) else ()
        source, replacement = (row["from"], row["to"]) if isinstance(row, dict) else (row[0], row[1])
        pattern = c.regex(source, *sub, *(("from",) if isinstance(row, dict) else (0,)))
        _check_replacement(pattern, replacement, c, *sub)
        rules.append(RenameRule(pattern, replacement, c.at(*sub)))
    return Rename(tuple(rules))


def _check_replacement(pattern: Pattern, replacement: str, c: _Collector, *sub: Any) -> None:
    """Reject back-references to groups the pattern does not have."""
    try:
        compile_template = getattr(re, "_compile_template", None)
        if compile_template is not None:  # Python >= 3.12
            compile_template(pattern, replacement)
        else:  # Python 3.11
            re._parser.parse_template(replacement, pattern)  # type: ignore[attr-defined]
    except (re.error, IndexError) as exc:
        c.problems.append(Problem(c.at(*sub), f"invalid replacement {replacement!r}: {exc}"))


def _add_prefix(value: Any, c: _Collector) -> AddPrefix:
    if isinstance(value, str):
        return AddPrefix(value)
    return AddPrefix(
        prefix=value["prefix"],
        match=c.regex(value["match"], "match") if "match" in value else None,
        skip=c.regex(value["skip"], "skip") if "skip" in value else None,
    )


def _reshape(value: Any, c: _Collector) -> Reshape:
    shape = value["shape"]
    if shape != "target" and list(shape).count(-1) > 1:
        c.problems.append(Problem(c.at("shape"), f"at most one -1 is allowed in a shape, got {shape}"))
    return Reshape(c.regex(value["match"], "match"), None if shape == "target" else tuple(shape))


def _permute(value: Any, c: _Collector) -> Permute:
    dims = tuple(value["dims"])
    if sorted(dims) != list(range(len(dims))):
        c.problems.append(Problem(c.at("dims"), f"{list(dims)} is not a permutation of 0..{len(dims) - 1}"))
    return Permute(c.regex(value["match"], "match"), dims)


def _cast(value: Any, c: _Collector) -> Cast:
    return Cast(c.regex(value.get("match", ".*"), "match"), value["dtype"], bool(value.get("include_integer", False)))


def _strings(value: Any) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


def _strip_prefix(value: Any, c: _Collector) -> StripPrefix:
    if isinstance(value, dict):
        return StripPrefix(_strings(value.get("prefixes", [])), bool(value.get("common", False)))
    return StripPrefix(_strings(value))


def _take_from(value: Any, c: _Collector) -> TakeFrom:
    template = value["template"]
    try:
        template.format(key="k", flat="k")
    except (KeyError, IndexError, ValueError) as exc:
        c.problems.append(Problem(c.at("template"), f"invalid template {template!r}: use {{key}} and {{flat}} only ({exc})"))
    return TakeFrom(template)


_BUILDERS: dict[str, Callable[[Any, _Collector], Any]] = {
    "drop": lambda v, c: Drop(c.regexes(v)),
    "keep": lambda v, c: Keep(c.regexes(v)),
    "strip_prefix": _strip_prefix,
    "take_from": _take_from,
    "add_prefix": _add_prefix,
    "rename": _rename,
    "reshape": _reshape,
    "permute": _permute,
    "cast": _cast,
}
