"""Steps that act on key names only: drop, keep, strip_prefix, add_prefix, rename."""

from __future__ import annotations

from ckptx.errors import Problem
from ckptx.ops.keymatch import KeyedEntries, first_matches, key_text
from ckptx.ops.registry import PlanContext, PlanEntry, StepOutcome, step_planner
from ckptx.rules.steps import AddPrefix, Drop, Keep, Pattern, Rename, Step, StripPrefix, TakeFrom
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
    row_hits = [0] * len(args.rules)
    text = key_text(entries)
    found, seen = text.first_matches([rule.pattern for rule in args.rules]), set()
    changed = sorted(found)
    out, new_keys = KeyedEntries(entries), {}  # the one copy of the entry list this step makes
    may_warn = [may_match_mid_name(rule.pattern) for rule in args.rules]
    for index in changed:
        entry, row = entries[index], found[index]
        rule = args.rules[row]
        row_hits[row] += 1
        if may_warn[row]:
            warn_if_mid_name(rule.pattern, entry.key, rule.where, ctx, seen)
        try:
            new_keys[index] = rule.apply(entry.key)
        except KeyTemplateError as exc:
            ctx.errors.append(Problem(rule.where, f"key '{entry.key}': {exc}"))
            continue
        out[index] = entry.renamed(new_keys[index], rule.where)
    if len(args.rules) > 1 and any(row_hits):
        for rule, hits in zip(args.rules, row_hits):
            if not hits:
                problem = Problem(rule.where, f"rename pattern {rule.pattern.pattern!r} matches no key")
                (ctx.errors if step.strict else ctx.warnings).append(problem)
    out.carry(text.renamed(new_keys))
    return StepOutcome(out, sum(row_hits), changed)
