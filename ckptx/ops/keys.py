"""Steps that act on key names only: drop, keep, strip_prefix, take_from, add_prefix, rename; each kind's arguments,
builder, schema fragment, inverse and planner together."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from ckptx._lazy import lazy_module
from ckptx.errors import KeyTemplateError, NotInvertible, Problem
from ckptx.ops.registry import step
from ckptx.planning.context import PlanContext, StepOutcome
from ckptx.planning.entry import PlanEntry
from ckptx.planning.keymatch import KeyText, first_matches, required_literals
from ckptx.rules.flatten import dump_args
from ckptx.rules.inverse import exact_table, swap
from ckptx.rules.kinds import Doc, StepTrace, object_schema
from ckptx.rules.steps import Collector, Pattern, Step
from ckptx.rules.templates import Template

if TYPE_CHECKING:  # pragma: no cover
    import torch
else:
    torch = lazy_module("torch")


def _strings(value: Any) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


def may_match_mid_name(pattern: Pattern) -> bool:
    """False for patterns that start at a name boundary by construction (no over-broad warning possible)."""
    return not pattern.pattern.startswith(("^", ".", "\\.", "(", "["))


def warn_if_mid_name(pattern: Pattern, key: str, where: str, ctx: PlanContext, seen: set[str]) -> None:
    """Warn once per pattern when an unanchored pattern matches inside a name component (over-broad)."""
    if pattern.pattern in seen or not may_match_mid_name(pattern):
        return
    match = next((m for m in pattern.finditer(key) if m.start() > 0 and key[m.start() - 1] != "."), None)
    if match:
        seen.add(pattern.pattern)
        ctx.warnings.append(
            Problem(
                where,
                f"pattern {pattern.pattern!r} also matches inside a name: "
                f"'{key}' (position {match.start()}); anchor it with '^' or '\\.' "
                f"if that is not intended",
            )
        )


# ---- drop ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Drop:
    """Remove every key matching any pattern."""

    patterns: tuple[Pattern, ...]


def _build_drop(value: Any, c: Collector) -> Drop:
    return Drop(c.regexes(value))


_DROP_SCHEMA: dict[str, Any] = {"$ref": "#/$defs/regexList"}


@step("drop", build=_build_drop, schema=_DROP_SCHEMA, not_invertible="the dropped tensors are gone")
def plan_drop(args: Drop, step: Step, entries: list[PlanEntry], ctx: PlanContext) -> StepOutcome:
    """Remove entries whose key matches any pattern."""
    found = first_matches(args.patterns, [e.key for e in entries])
    seen: set[str] = set()
    for i in sorted(found):
        warn_if_mid_name(args.patterns[found[i]], entries[i].key, step.where, ctx, seen)
        ctx.drop(entries[i], step.where)
    kept = [entry for i, entry in enumerate(entries) if i not in found]
    return StepOutcome(kept, len(entries) - len(kept))


# ---- keep ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Keep:
    """Remove every key matching none of the patterns."""

    patterns: tuple[Pattern, ...]


def _build_keep(value: Any, c: Collector) -> Keep:
    return Keep(c.regexes(value))


_KEEP_SCHEMA: dict[str, Any] = {"$ref": "#/$defs/regexList"}


@step("keep", build=_build_keep, schema=_KEEP_SCHEMA, not_invertible="the tensors it leaves out are gone")
def plan_keep(args: Keep, step: Step, entries: list[PlanEntry], ctx: PlanContext) -> StepOutcome:
    """Remove entries whose key matches none of the patterns."""
    found = first_matches(args.patterns, [e.key for e in entries])
    for i, entry in enumerate(entries):
        if i not in found:
            ctx.drop(entry, step.where)
    kept = [entry for i, entry in enumerate(entries) if i in found]
    return StepOutcome(kept, len(kept))


# ---- strip_prefix ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StripPrefix:
    """Remove leading prefixes (literal strings), repeatedly and in any order.

    With `common=True`, remove the first name component when every key shares it (`model.`).
    """

    prefixes: tuple[str, ...]
    common: bool = False


def _build_strip_prefix(value: Any, c: Collector) -> StripPrefix:
    if isinstance(value, dict):
        return StripPrefix(_strings(value.get("prefixes", [])), bool(value.get("common", False)))
    return StripPrefix(_strings(value))


_STRIP_PREFIX_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"$ref": "#/$defs/stringOrList"},
        {
            "type": "object",
            "additionalProperties": False,
            "minProperties": 1,
            "properties": {
                "prefixes": {"$ref": "#/$defs/stringOrList"},
                "common": {
                    "type": "boolean",
                    "description": (
                        "Also strip the first name component when every key shares it (e.g. a "
                        "LightningModule attribute such as model.)."
                    ),
                },
            },
        },
    ],
}


def _literal_prefix(regex: str) -> int:
    match = re.match(r"\^?((?:\\.|[^\\()\[.*+?{|$])*)", regex)
    return len(match.group(1)) if match else 0


def _invert_strip_prefix(args: StripPrefix, step: Step, trace: StepTrace | None) -> list[Doc]:
    if trace is not None and trace.after is not None:
        stripped = {old[: len(old) - len(new)] for (old, _), (new, _) in zip(trace.before, trace.after)}
        if len(stripped) == 1 and "" not in stripped:
            return [{"add_prefix": stripped.pop()}]
        return exact_table(trace, "not every key lost the same prefix")
    if len(args.prefixes) == 1 and not args.common:
        return [{"add_prefix": args.prefixes[0]}]
    raise NotInvertible(
        "which prefix each key lost depends on the checkpoint; the source layout is needed", needs_layout=True
    )


def _dump_strip_prefix(args: StripPrefix) -> Any:
    return dump_args(args) if args.common else list(args.prefixes)


def strip(key: str, prefixes: tuple[str, ...]) -> str:
    """Remove any of `prefixes` from the start of `key`, repeatedly, in any order."""
    changed = True
    while changed:
        changed = False
        for prefix in prefixes:
            if key.startswith(prefix) and len(key) > len(prefix):
                key, changed = key[len(prefix) :], True
    return key


def common_component(keys: list[str]) -> str | None:
    """The first name component shared by every key (with its dot), if there is one and keys go deeper."""
    firsts = {k.split(".", 1)[0] + "." for k in keys if "." in k}
    if len(firsts) != 1 or any("." not in k for k in keys):
        return None
    return firsts.pop()


@step(
    "strip_prefix",
    build=_build_strip_prefix,
    schema=_STRIP_PREFIX_SCHEMA,
    invert=_invert_strip_prefix,
    renames_keys=True,
    dump=_dump_strip_prefix,
)
def plan_strip_prefix(args: StripPrefix, step: Step, entries: list[PlanEntry], ctx: PlanContext) -> StepOutcome:
    """Strip literal prefixes at the start of keys (and, with `common`, a first component all keys share)."""
    prefixes = args.prefixes
    if args.common:
        shared = common_component([strip(e.key, prefixes) for e in entries])
        prefixes = prefixes + ((shared,) if shared else ())
    out, hits = [], 0
    for entry in entries:
        new = strip(entry.key, prefixes)
        hits += new != entry.key
        out.append(entry.renamed(new, step.where) if new != entry.key else entry)
    return StepOutcome(out, hits)


# ---- take_from -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TakeFrom:
    """Replace each key's tensor by the one stored under `template` (e.g. `ema_{flat}`), dropping that key."""

    template: str


def _build_take_from(value: Any, c: Collector) -> TakeFrom:
    template = value["template"]
    try:
        template.format(key="k", flat="k")
    except (KeyError, IndexError, ValueError) as exc:
        c.problems.append(
            Problem(c.at("template"), f"invalid template {template!r}: use {{key}} and {{flat}} only ({exc})")
        )
    return TakeFrom(template)


_TAKE_FROM_SCHEMA = object_schema(
    description="Use, for each key, the tensor stored under another key (e.g. EMA copies), and drop that key.",
    required=["template"],
    properties={
        "template": {
            "type": "string",
            "minLength": 1,
            "description": (
                "The other key; {key} is the key, {flat} the key with '.' replaced by '_' (e.g. ema_{flat})."
            ),
        },
    },
)


@step(
    "take_from",
    build=_build_take_from,
    schema=_TAKE_FROM_SCHEMA,
    not_invertible="the replaced tensors are gone",
    renames_keys=True,
)
def plan_take_from(args: TakeFrom, step: Step, entries: list[PlanEntry], ctx: PlanContext) -> StepOutcome:
    """Each key whose donor (`template` filled with the key) exists takes the donor's tensor; donors vanish."""
    by_key = {e.key: e for e in entries}
    donors: dict[str, PlanEntry] = {}
    for entry in entries:
        donor = by_key.get(args.template.format(key=entry.key, flat=entry.key.replace(".", "_")))
        if donor is None or donor.key == entry.key:
            continue
        if donor.meta.shape != entry.meta.shape:
            ctx.errors.append(
                Problem(
                    step.where,
                    f"'{donor.key}' has shape {list(donor.meta.shape)} but "
                    f"'{entry.key}' has {list(entry.meta.shape)}; they cannot replace each other",
                )
            )
            continue
        donors[entry.key] = donor
    used = {d.key for d in donors.values()}
    out = []
    for entry in entries:
        if entry.key in used:
            continue
        donor = donors.get(entry.key)
        if donor is not None:
            ctx.drop(entry, step.where)
            out.append(PlanEntry(entry.key, donor.expr, donor.steps + (step.where,)))
        else:
            out.append(entry)
    return StepOutcome(out, len(donors))


# ---- add_prefix ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AddPrefix:
    """Prepend a literal prefix to every key (or to those matching `match` and not `skip`)."""

    prefix: str
    match: Pattern | None = None
    skip: Pattern | None = None


def _build_add_prefix(value: Any, c: Collector) -> AddPrefix:
    if isinstance(value, str):
        return AddPrefix(value)
    return AddPrefix(
        prefix=value["prefix"],
        match=c.regex(value["match"], "match") if "match" in value else None,
        skip=c.regex(value["skip"], "skip") if "skip" in value else None,
    )


_ADD_PREFIX_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "string", "minLength": 1},
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["prefix"],
            "properties": {
                "prefix": {"type": "string", "minLength": 1},
                "match": {"$ref": "#/$defs/regex"},
                "skip": {"$ref": "#/$defs/regex"},
            },
        },
    ],
}


def _invert_add_prefix(args: AddPrefix, step: Step, trace: StepTrace | None) -> list[Doc]:
    if args.match is None and args.skip is None:
        return [{"rename": [[f"^{re.escape(args.prefix)}", ""]]}]
    return exact_table(trace, "with match/skip, which keys got the prefix depends on the checkpoint")


def _dump_add_prefix(args: AddPrefix) -> Any:
    return args.prefix if args.match is None and args.skip is None else dump_args(args)


@step(
    "add_prefix",
    build=_build_add_prefix,
    schema=_ADD_PREFIX_SCHEMA,
    invert=_invert_add_prefix,
    renames_keys=True,
    dump=_dump_add_prefix,
)
def plan_add_prefix(args: AddPrefix, step: Step, entries: list[PlanEntry], ctx: PlanContext) -> StepOutcome:
    """Prepend a prefix to (matching) keys."""
    out, hits = [], 0
    for entry in entries:
        wanted = (args.match is None or args.match.search(entry.key)) and not (
            args.skip and args.skip.search(entry.key)
        )
        hits += bool(wanted)
        out.append(entry.renamed(args.prefix + entry.key, step.where) if wanted else entry)
    return StepOutcome(out, hits)


# ---- rename ----------------------------------------------------------------------------------------------------------


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


def _build_rename(value: Any, c: Collector) -> Rename:
    one_row = isinstance(value, dict) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
    rows = [value] if one_row else value  # `[pattern, replacement]` is one row, not two rows of characters
    rules = []
    for i, row in enumerate(rows):
        sub = () if one_row else (i,)
        source, replacement = (row["from"], row["to"]) if isinstance(row, dict) else (row[0], row[1])
        pattern = c.regex(source, *sub, *(("from",) if isinstance(row, dict) else (0,)))
        template = c.template(replacement, pattern, "invalid replacement", *sub)
        rules.append(RenameRule(pattern, replacement, c.at(*sub), template))
    return Rename(tuple(rules))


_RENAME_SCHEMA: dict[str, Any] = {
    "anyOf": [{"type": "array", "items": {"$ref": "#/$defs/renamePair"}, "minItems": 1}, {"$ref": "#/$defs/renamePair"}]
}


def _invert_rename(args: Rename, step: Step, trace: StepTrace | None) -> list[Doc]:
    try:
        rows = []
        for rule in args.rules:
            assert rule.template is not None
            swapped = swap(rule.pattern.pattern, rule.template, whole=False)
            rows.append([swapped.pattern, swapped.template])
    except NotInvertible as exc:
        return exact_table(trace, str(exc))
    rows.sort(key=lambda row: -_literal_prefix(row[0]))
    return [{"rename": rows}]


def _dump_rename(args: Rename) -> list[list[str]]:
    return [[r.pattern.pattern, r.replacement] for r in args.rules]


@step("rename", build=_build_rename, schema=_RENAME_SCHEMA, invert=_invert_rename, renames_keys=True, dump=_dump_rename)
def plan_rename(args: Rename, step: Step, entries: list[PlanEntry], ctx: PlanContext) -> StepOutcome:
    """Per key, the first matching row rewrites it like `re.sub`; rows that match nothing are reported."""
    text = ctx.key_text(entries)
    rows, new_keys, failed = _first_rewrites(args.rules, text)
    changed = sorted(rows)
    _report_rows(args.rules, rows, changed, failed, entries, ctx)
    out = list(entries)
    where = [rule.where for rule in args.rules]
    for index, key in new_keys.items():
        out[index] = entries[index].renamed(key, where[rows[index]])
    row_hits = Counter(rows.values())
    if len(args.rules) > 1 and row_hits:
        for number, rule in enumerate(args.rules):
            if not row_hits[number]:
                problem = Problem(rule.where, f"rename pattern {rule.pattern.pattern!r} matches no key")
                (ctx.errors if step.strict else ctx.warnings).append(problem)
    ctx.carry(out, text.renamed(new_keys))
    return StepOutcome(out, len(rows), changed)


def _report_rows(
    rules: Sequence[RenameRule],
    rows: dict[int, int],
    changed: list[int],
    failed: dict[int, KeyTemplateError],
    entries: list[PlanEntry],
    ctx: PlanContext,
) -> None:
    """Errors for the keys whose template failed and over-broad warnings, in key order."""
    may_warn = [may_match_mid_name(rule.pattern) for rule in rules]
    if not failed and not any(may_warn):
        return
    seen: set[str] = set()
    for index in changed:
        rule = rules[rows[index]]
        if may_warn[rows[index]]:
            warn_if_mid_name(rule.pattern, entries[index].key, rule.where, ctx, seen)
        if index in failed:
            ctx.errors.append(Problem(rule.where, f"key '{entries[index].key}': {failed[index]}"))


def _first_rewrites(
    rules: Sequence[RenameRule], text: KeyText
) -> tuple[dict[int, int], dict[int, str], dict[int, KeyTemplateError]]:
    """Per key the first row that matches (key index -> row), the new keys, and the keys whose template failed.

    One `subn` per key and row tried: it both tells whether the row matches and makes the new key.
    """
    keys = text.keys
    rows: dict[int, int] = {}
    new_keys: dict[int, str] = {}
    failed: dict[int, KeyTemplateError] = {}
    for number, rule in enumerate(rules):
        subn, repl = rule.pattern.subn, rule.repl
        for i in text.candidates(required_literals(rule.pattern)):
            if i in rows:
                continue
            try:
                new, count = subn(repl, keys[i])
            except KeyTemplateError as exc:
                rows[i], failed[i] = number, exc
                continue
            if count:
                rows[i], new_keys[i] = number, new
    return rows, new_keys, failed
