"""Steps that act on key names only: drop, keep, strip_prefix, add_prefix, rename."""

from __future__ import annotations

from collections import Counter
from typing import Sequence

from ckptx.errors import Problem
from ckptx.ops.keymatch import KeyText, first_matches, required_literals
from ckptx.ops.registry import PlanContext, PlanEntry, StepOutcome, step_planner
from ckptx.rules.steps import AddPrefix, Drop, Keep, Pattern, Rename, RenameRule, Step, StripPrefix, TakeFrom
from ckptx.rules.templates import KeyTemplateError


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
        ctx.warnings.append(Problem(where, f"pattern {pattern.pattern!r} also matches inside a name: "
                                           f"'{key}' (position {match.start()}); anchor it with '^' or '\\.' "
                                           f"if that is not intended"))


@step_planner("drop")
def plan_drop(step: Step, entries: list[PlanEntry], ctx: PlanContext) -> StepOutcome:
    """Remove entries whose key matches any pattern."""
    args: Drop = step.args  # type: ignore[assignment]
    found, seen = first_matches(args.patterns, [e.key for e in entries]), set()
    for i in sorted(found):
        warn_if_mid_name(args.patterns[found[i]], entries[i].key, step.where, ctx, seen)
        ctx.dropped.append((entries[i].key, step.where))
    kept = [entry for i, entry in enumerate(entries) if i not in found]
    return StepOutcome(kept, len(entries) - len(kept))


@step_planner("keep")
def plan_keep(step: Step, entries: list[PlanEntry], ctx: PlanContext) -> StepOutcome:
    """Remove entries whose key matches none of the patterns."""
    args: Keep = step.args  # type: ignore[assignment]
    found = first_matches(args.patterns, [e.key for e in entries])
    ctx.dropped.extend((entry.key, step.where) for i, entry in enumerate(entries) if i not in found)
    kept = [entry for i, entry in enumerate(entries) if i in found]
    return StepOutcome(kept, len(kept))


def strip(key: str, prefixes: tuple[str, ...]) -> str:
    """Remove any of `prefixes` from the start of `key`, repeatedly, in any order."""
    changed = True
    while changed:
        changed = False
        for prefix in prefixes:
            if key.startswith(prefix) and len(key) > len(prefix):
                key, changed = key[len(prefix):], True
    return key


def common_component(keys: list[str]) -> str | None:
    """The first name component shared by every key (with its dot), if there is one and keys go deeper."""
    firsts = {k.split(".", 1)[0] + "." for k in keys if "." in k}
    if len(firsts) != 1 or any("." not in k for k in keys):
        return None
    return firsts.pop()


@step_planner("strip_prefix", renames_keys=True)
def plan_strip_prefix(step: Step, entries: list[PlanEntry], ctx: PlanContext) -> StepOutcome:
    """Strip literal prefixes at the start of keys (and, with `common`, a first component all keys share)."""
    args: StripPrefix = step.args  # type: ignore[assignment]
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


@step_planner("take_from", renames_keys=True)
def plan_take_from(step: Step, entries: list[PlanEntry], ctx: PlanContext) -> StepOutcome:
    """Each key whose donor (`template` filled with the key) exists takes the donor's tensor; donors vanish."""
    args: TakeFrom = step.args  # type: ignore[assignment]
    by_key = {e.key: e for e in entries}
    donors: dict[str, PlanEntry] = {}
    for entry in entries:
        donor = by_key.get(args.template.format(key=entry.key, flat=entry.key.replace(".", "_")))
        if donor is None or donor.key == entry.key:
            continue
        if donor.meta.shape != entry.meta.shape:
            ctx.errors.append(Problem(step.where, f"'{donor.key}' has shape {list(donor.meta.shape)} but "
                                                  f"'{entry.key}' has {list(entry.meta.shape)}; they cannot replace each other"))
            continue
        donors[entry.key] = donor
    used = {d.key for d in donors.values()}
    out = []
    for entry in entries:
        if entry.key in used:
            continue
        donor = donors.get(entry.key)
        if donor is not None:
            ctx.dropped.append((entry.key, step.where))
            out.append(PlanEntry(entry.key, donor.expr, donor.steps + (step.where,)))
        else:
            out.append(entry)
    return StepOutcome(out, len(donors))


@step_planner("add_prefix", renames_keys=True)
def plan_add_prefix(step: Step, entries: list[PlanEntry], ctx: PlanContext) -> StepOutcome:
    """Prepend a prefix to (matching) keys."""
    args: AddPrefix = step.args  # type: ignore[assignment]
    out, hits = [], 0
    for entry in entries:
        wanted = (args.match is None or args.match.search(entry.key)) and not (args.skip and args.skip.search(entry.key))
        hits += bool(wanted)
        out.append(entry.renamed(args.prefix + entry.key, step.where) if wanted else entry)
    return StepOutcome(out, hits)


@step_planner("rename", renames_keys=True)
def plan_rename(step: Step, entries: list[PlanEntry], ctx: PlanContext) -> StepOutcome:
    """Per key, the first matching row rewrites it like `re.sub`; rows that match nothing are reported."""
    args: Rename = step.args  # type: ignore[assignment]
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


def _report_rows(rules: Sequence[RenameRule], rows: dict[int, int], changed: list[int],
                 failed: dict[int, KeyTemplateError], entries: list[PlanEntry], ctx: PlanContext) -> None:
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


def _first_rewrites(rules: Sequence[RenameRule], text: KeyText
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
