"""Typed step arguments, built from schema-valid dicts; regexes are compiled here."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Union

from ckptx.errors import Problem
from ckptx.rules.templates import Template, TemplateError, compile_template

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

    def template(self, text: str, pattern: Pattern | None, what: str, *sub: Any, names: tuple[str, ...] = ()) -> Template:
        """Compile a key template against `pattern`; a problem names the template's place."""
        try:
            return compile_template(text, pattern, names=names)
        except TemplateError as exc:
            self.problems.append(Problem(self.at(*sub), f"{what} {text!r}: {exc}"))
            return Template(text, (text,))

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
    """One row of a rename table: regex and `re.sub` replacement (with `{\\1 - 1}` index arithmetic)."""

    pattern: Pattern
    replacement: str
    where: str
    template: Template | None = field(default=None, compare=False)

    @cached_property
    def repl(self) -> str | Callable[[re.Match[str]], str]:
        """What `self.pattern.sub`/`subn` takes to make this row's replacement."""
        return self.replacement if self.template is None else self.template.repl

    def apply(self, key: str) -> str:
        """The key rewritten by this row (every match replaced, like `re.sub`)."""
        return self.pattern.sub(self.repl, key)


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


@dataclass(frozen=True)
class Split:
    """Split matching tensors along `dim` into several keys (`into`: one whole-key template per piece,
    or one template using `{i}`); `sizes` or `parts` for unequal/equal chunks, `unbind` drops the dim."""

    match: Pattern
    into: tuple[Template, ...]
    dim: int = 0
    sizes: tuple[int, ...] | None = None
    parts: int | None = None
    unbind: bool = False

    @property
    def indexed(self) -> bool:
        """True when `into` is one template numbered by `{i}`."""
        return len(self.into) == 1 and self.into[0].uses("i")


@dataclass(frozen=True)
class Merge:
    """Merge several keys into one (`to`) by concatenation or, with `stack`, stacking along `dim`.

    The order is explicit: `inputs` lists whole-key templates filled from `match`'s groups, or
    `index` is a template whose value (0..n-1) is each matching key's position.
    """

    match: Pattern
    to: Template
    inputs: tuple[Template, ...] = ()
    index: Template | None = None
    dim: int = 0
    stack: bool = False


@dataclass(frozen=True)
class Unsqueeze:
    """Insert a dimension of size 1 at `dim`."""

    match: Pattern
    dim: int


@dataclass(frozen=True)
class Squeeze(Unsqueeze):
    """Remove dimension `dim`, which must have size 1."""


@dataclass(frozen=True)
class Slice:
    """Keep `start:stop:step` of dimension `dim` (Python slice semantics)."""

    match: Pattern
    dim: int
    start: int | None = None
    stop: int | None = None
    step: int = 1


@dataclass(frozen=True)
class Resize:
    """Grow or shrink dimension `dim` to `size` (None: the target's size); new rows are filled by `fill`."""

    match: Pattern
    dim: int
    size: int | None
    fill: str = "zeros"
    seed: int = 0


@dataclass(frozen=True)
class ResamplePosEmbed:
    """Interpolate a ViT position embedding (1, prefix + H*W, C) to a new grid (None: the target's)."""

    match: Pattern
    prefix_tokens: int
    grid: tuple[int, int] | None = None
    source_grid: tuple[int, int] | None = None
    antialias: bool = False


@dataclass(frozen=True)
class AdaptInChannels:
    """Adapt a conv stem weight (O, I, kH, kW) to `channels` inputs like timm's adapt_input_conv."""

    match: Pattern
    channels: int | None
    base_channels: int = 3


@dataclass(frozen=True)
class Scale:
    """Multiply matching floating-point tensors by `by`."""

    match: Pattern
    by: float


@dataclass(frozen=True)
class Copy:
    """Also store each matching tensor under the key `to` (a whole-key template)."""

    match: Pattern
    to: Template


@dataclass(frozen=True)
class SetTensor:
    """A new tensor filled with `value`: under `key`, or under `key` filled from each key matching `match`."""

    key: Template
    value: float | int | bool
    dtype: str = "float32"
    shape: tuple[int, ...] | None = ()
    match: Pattern | None = None
    if_exists: str = "error"


StepArgs = Union[Drop, Keep, StripPrefix, TakeFrom, AddPrefix, Rename, Reshape, Permute, Cast, Split, Merge,
                 Unsqueeze, Squeeze, Slice, Resize, ResamplePosEmbed, AdaptInChannels, Scale, Copy, SetTensor]


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
        template = c.template(replacement, pattern, "invalid replacement", *sub)
        rules.append(RenameRule(pattern, replacement, c.at(*sub), template))
    return Rename(tuple(rules))


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


def _dim(value: Any) -> int:
    return int(value.get("dim", 0))


def _split(value: Any, c: _Collector) -> Split:
    match = c.regex(value["match"], "match")
    into_raw = value["into"]
    names = ("i",)
    if isinstance(into_raw, str):
        into = (c.template(into_raw, match, "invalid key template", "into", names=names),)
    else:
        into = tuple(c.template(t, match, "invalid key template", "into", k) for k, t in enumerate(into_raw))
    sizes = tuple(value["sizes"]) if "sizes" in value else None
    parts = value.get("parts")
    unbind = bool(value.get("unbind", False))
    chosen = [k for k in ("sizes", "parts", "unbind") if k in value and value[k] is not False]
    if len(chosen) > 1:
        c.problems.append(Problem(c.at(chosen[1]), f"give only one of sizes, parts and unbind (found {', '.join(chosen)})"))
    args = Split(match, into, _dim(value), sizes, parts, unbind)
    if isinstance(into_raw, str) and not args.indexed:
        c.problems.append(Problem(c.at("into"), "one key template must number the pieces with {i} "
                                                "(e.g. '\\1.{i}.weight'); or list one template per piece"))
    elif isinstance(into_raw, str) and not chosen:
        c.problems.append(Problem(c.at(), "with a {i} template, say how many pieces: parts, sizes or unbind: true"))
    elif not isinstance(into_raw, str):
        if sizes is not None and len(sizes) != len(into):
            c.problems.append(Problem(c.at("sizes"), f"{len(sizes)} sizes for {len(into)} keys in `into`; give one size per key"))
        if parts is not None and parts != len(into):
            c.problems.append(Problem(c.at("parts"), f"parts: {parts} but `into` names {len(into)} keys"))
    return args


def _merge(value: Any, c: _Collector) -> Merge:
    match = c.regex(value["match"], "match")
    inputs = tuple(c.template(t, match, "invalid key template", "inputs", k)
                   for k, t in enumerate(value.get("inputs", ())))
    index = c.template(value["index"], match, "invalid index template", "index") if "index" in value else None
    if ("inputs" in value) == ("index" in value):
        c.problems.append(Problem(c.at(), "give the order either as `inputs` (a list of key templates) or as "
                                          "`index` (the position of each matching key, e.g. '\\2')"))
    to = c.template(value["to"], match, "invalid key template", "to")
    return Merge(match, to, inputs, index, _dim(value), bool(value.get("stack", False)))


def _resize(value: Any, c: _Collector) -> Resize:
    size = value["size"]
    return Resize(c.regex(value["match"], "match"), _dim(value), None if size == "target" else int(size),
                  value.get("fill", "zeros"), int(value.get("seed", 0)))


def _resample(value: Any, c: _Collector) -> ResamplePosEmbed:
    grid = value.get("grid", "target")
    source_grid = value.get("source_grid")
    return ResamplePosEmbed(c.regex(value["match"], "match"), int(value["prefix_tokens"]),
                            None if grid == "target" else (int(grid[0]), int(grid[1])),
                            None if source_grid is None else (int(source_grid[0]), int(source_grid[1])),
                            bool(value.get("antialias", False)))


def _adapt(value: Any, c: _Collector) -> AdaptInChannels:
    channels = value["channels"]
    return AdaptInChannels(c.regex(value["match"], "match"), None if channels == "target" else int(channels),
                           int(value.get("base_channels", 3)))


def _copy(value: Any, c: _Collector) -> Copy:
    match = c.regex(value["match"], "match")
    return Copy(match, c.template(value["to"], match, "invalid key template", "to"))


def _set(value: Any, c: _Collector) -> SetTensor:
    match = c.regex(value["match"], "match") if "match" in value else None
    key = c.template(value["key"], match, "invalid key template", "key")
    if match is None and ("\\" in value["key"]):
        c.problems.append(Problem(c.at("key"), "the key refers to groups but there is no `match` to fill them"))
    shape = value.get("shape", [])
    if value.get("dtype", "float32") == "bool" and not isinstance(value["value"], bool):
        c.problems.append(Problem(c.at("value"), "a bool tensor takes true or false"))
    return SetTensor(key, value["value"], value.get("dtype", "float32"), None if shape == "target" else tuple(shape),
                     match, value.get("if_exists", "error"))


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
    "split": _split,
    "merge": _merge,
    "unsqueeze": lambda v, c: Unsqueeze(c.regex(v["match"], "match"), int(v["dim"])),
    "squeeze": lambda v, c: Squeeze(c.regex(v["match"], "match"), int(v["dim"])),
    "slice": lambda v, c: Slice(c.regex(v["match"], "match"), int(v["dim"]), v.get("start"), v.get("stop"),
                                int(v.get("step", 1))),
    "resize": _resize,
    "resample_pos_embed": _resample,
    "adapt_in_channels": _adapt,
    "scale": lambda v, c: Scale(c.regex(v["match"], "match"), float(v["by"])),
    "copy": _copy,
    "set": _set,
}
