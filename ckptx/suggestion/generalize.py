"""From decided key pairs to rename rows that generalize, and from key sets to regexes that match exactly them.

A pair `stages.0.1.pwconv1.weight -> stages.0.blocks.1.mlp.fc1.weight` keeps its longest common suffix
(`weight`) as is; its prefixes become a template with number slots (`stages.#.#.pwconv#`). Pairs with the
same source and target templates form one row if every target number is one source number plus a
constant (`{\\1 - 1}`) or a constant; a group that does not fit is split by the number that decides it,
down to literal rows. Rows are then ordered so that a more specific row precedes a general one that would
also match its keys (rename takes the first matching row), and a row that would catch a key it must not
is made more specific, until every key entering the step comes out exactly as decided.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = ["Row", "cover", "rename_rows"]

_DIGITS = re.compile(r"\d+")
_NUMBER_SPLIT = re.compile(r"(\d+)")


@dataclass(frozen=True)
class Row:
    """One rename row and the keys it is meant for (in source order)."""

    pattern: str
    replacement: str
    keys: tuple[str, ...]


@dataclass
class _Pair:
    source: str
    target: str
    order: int
    keep: int  # trailing components left to pass through unchanged
    literal: bool = False
    split: tuple | None = None  # (keep it was computed for, source prefix, target prefix, their numbers)


@dataclass
class _Group:
    pairs: list[_Pair]
    source_chunks: list[str]  # literal text around the number slots of the source prefix
    target_chunks: list[str]
    suffix: bool  # True: the row ends with '\.' (a suffix passes through); False: '$'
    captured: list[bool]  # per source slot
    source_values: list[int | None]  # per source slot: its literal value (None when captured)
    target_exprs: list[tuple]  # per target slot: ('lit', v) or ('slot', i, a, b)
    allowed: dict[int, tuple[int, ...]] = field(default_factory=dict)  # captured slots limited to these values

    def pattern(self) -> str:
        out = ["^"]
        for i, chunk in enumerate(self.source_chunks):
            out.append(re.escape(chunk))
            if i < len(self.captured):
                if not self.captured[i]:
                    out.append(str(self.source_values[i]))
                elif i in self.allowed:
                    out.append("(" + "|".join(str(v) for v in self.allowed[i]) + ")")
                else:
                    out.append(r"(\d+)")
        out.append(r"\." if self.suffix else "$")
        return "".join(out)

    def replacement(self) -> str:
        groups = {}
        n = 0
        for i, captured in enumerate(self.captured):
            if captured:
                n += 1
                groups[i] = n
        out = []
        for i, chunk in enumerate(self.target_chunks):
            out.append(chunk.replace("\\", "\\\\"))
            if i < len(self.target_exprs):
                expr = self.target_exprs[i]
                follow = self.target_chunks[i + 1] if i + 1 < len(self.target_chunks) else ""
                out.append(_expression(expr, groups, follow))
        text = "".join(out)
        return text + "." if self.suffix and text else text


def _expression(expr: tuple, groups: Mapping[int, int], follow: str) -> str:
    if expr[0] == "lit":
        return str(expr[1])
    _, slot, a, b = expr
    ref = f"\\{groups[slot]}"
    if a == 1 and b == 0:
        return f"\\g<{groups[slot]}>" if follow[:1].isdigit() else ref
    inner = ref if a == 1 else f"{ref} * {a}"
    if b:
        inner += f" + {b}" if b > 0 else f" - {-b}"
    return "{" + inner + "}"


def _split_digits(text: str) -> tuple[list[str], list[int]]:
    chunks, values, last = [], [], 0
    for m in _DIGITS.finditer(text):
        chunks.append(text[last : m.start()])
        values.append(int(m.group()))
        last = m.end()
    chunks.append(text[last:])
    return chunks, values


def _common_suffix(a: list[str], b: list[str]) -> int:
    n = 0
    while n < len(a) - 1 and n < len(b) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


def rename_rows(
    pairs: Sequence[tuple[str, str]],
    unchanged: Iterable[str] = (),
    *,
    order: Mapping[str, int] | None = None,
    max_rounds: int = 50,
    literal: bool = False,
) -> list[Row]:
    """Rename rows that turn every `source` into its `target` and leave the `unchanged` keys as they are.

    `pairs` and `unchanged` together are every key entering the rename step. Rows come in a natural
    order (by first source key, a specific row before a general one that also matches its keys). With
    `literal`, one exact row per key (the fallback that is always right).
    """
    if literal:
        return [
            Row(f"^{re.escape(s)}$", t.replace("\\", "\\\\"), (s,))
            for s, t in sorted(((s, t) for s, t in pairs if s != t), key=lambda st: (order or {}).get(st[0], 0))
        ]
    order = order or {}
    items = []
    for index, (s, t) in enumerate(pairs):
        if s == t:
            continue
        sp, tp = s.split("."), t.split(".")
        items.append(_Pair(s, t, order.get(s, index), _common_suffix(sp, tp)))
    if not items:
        return []
    universe = _Buckets([p.source for p in items] + list(unchanged))
    for _ in range(max_rounds):
        groups = _groups(items)
        rows = [(g, re.compile(g.pattern())) for g in groups]
        before, bad = _constraints(rows, universe)
        if not bad:
            ordered = _topological(rows, before)
            if ordered is not None:
                return [
                    Row(g.pattern(), g.replacement(), tuple(p.source for p in sorted(g.pairs, key=lambda p: p.order)))
                    for g in ordered
                ]
            bad = _cycle_member(rows, before)
        for index in bad:
            _specialize(groups[index])
    return rename_rows(pairs, unchanged, order=order, literal=True)  # pragma: no cover - rounds make rows specific


def _specialize(group: _Group) -> None:
    """Make a row more specific: one more component of its keys in the pattern, or literal numbers."""
    for pair in group.pairs:
        if pair.keep > 0:
            pair.keep -= 1
        else:
            pair.literal = True


def _groups(items: list[_Pair]) -> list[_Group]:
    buckets: dict[tuple, list[_Pair]] = defaultdict(list)
    for p in items:
        cached = p.split if p.split is not None and p.split[0] == p.keep else _cache_split(p)
        buckets[(cached[5], cached[6], p.keep > 0, cached[1] if p.literal else None)].append(p)
    groups: list[_Group] = []
    for (_, _, suffix, _), members in buckets.items():
        groups.extend(_fit_group(members, suffix, {}))
    return groups


def _drop_tail(key: str, n: int) -> str:
    """`key` without its last `n` components (empty when it has no more)."""
    if not n:
        return key
    parts = key.rsplit(".", n)
    return parts[0] if len(parts) == n + 1 else ""


def _prefixes(p: _Pair) -> tuple[str, str]:
    source, target, _, _ = _split_pair(p)
    return source, target


def _split_pair(p: _Pair) -> tuple[str, str, list[int], list[int]]:
    """(source prefix, target prefix, their numbers) for the pair's current `keep`."""
    cached = p.split if p.split is not None and p.split[0] == p.keep else _cache_split(p)
    return cached[1], cached[2], cached[3], cached[4]


def _cache_split(p: _Pair) -> tuple:
    """Cache on the pair: (keep, source prefix, target prefix, their numbers, their templates)."""
    s_prefix, t_prefix = _drop_tail(p.source, p.keep), _drop_tail(p.target, p.keep)
    s_parts, t_parts = _NUMBER_SPLIT.split(s_prefix), _NUMBER_SPLIT.split(t_prefix)
    p.split = (
        p.keep,
        s_prefix,
        t_prefix,
        [int(d) for d in s_parts[1::2]],
        [int(d) for d in t_parts[1::2]],
        "#".join(s_parts[0::2]),
        "#".join(t_parts[0::2]),
    )
    return p.split


def _fit_group(members: list[_Pair], suffix: bool, allowed: dict[int, tuple[int, ...]]) -> list[_Group]:
    """One group with number expressions for `members`, or several when one row cannot explain them all."""
    s0, t0 = _prefixes(members[0])
    s_chunks, _ = _split_digits(s0)
    t_chunks, _ = _split_digits(t0)
    split = [_split_pair(p) for p in members]
    values_s = [v[2] for v in split]
    values_t = [v[3] for v in split]
    ks, kt = len(s_chunks) - 1, len(t_chunks) - 1
    varying = [i for i in range(ks) if len({v[i] for v in values_s}) > 1]
    exprs: list[tuple] = []
    used: set[int] = set()
    for j in range(kt):
        column = [v[j] for v in values_t]
        if len(set(column)) == 1:
            exprs.append(("lit", column[0]))
            continue
        if not varying:  # the numbers are decided by the part passed through: put more of it in the pattern
            for p in members:
                if p.keep > 0:
                    p.keep -= 1
                else:
                    p.literal = True
            return _groups(members)
        found = _affine(values_s, column, varying, j, kt, ks)
        if found is None:
            return _split(members, suffix, values_s, values_t, varying, j, allowed)
        exprs.append(("slot", *found))
        used.add(found[0])
    unused = [i for i in varying if i not in used]
    if unused:
        return _split_by(members, suffix, values_s, unused[0], allowed)
    captured = [i in used for i in range(ks)]
    literal = [None if captured[i] else values_s[0][i] for i in range(ks)]
    limits = {i: v for i, v in allowed.items() if captured[i]}
    return [_Group(members, s_chunks, t_chunks, suffix, captured, literal, exprs, limits)]


def _affine(
    values_s: list[list[int]], column: list[int], varying: list[int], j: int, kt: int, ks: int
) -> tuple[int, int, int] | None:
    """(source slot, a, b) with target = a * source + b on every pair, the simplest first."""
    options = []
    for i in varying:
        xs = [v[i] for v in values_s]
        b = column[0] - xs[0]
        if all(y - x == b for x, y in zip(xs, column)):
            options.append((0 if b == 0 else 1, abs(i / max(ks, 1) - j / max(kt, 1)), i, 1, b))
            continue
        x0, y0 = xs[0], column[0]
        other = next(((x, y) for x, y in zip(xs, column) if x != x0), None)
        if other is None or (other[1] - y0) % (other[0] - x0):
            continue
        a = (other[1] - y0) // (other[0] - x0)
        b = y0 - a * x0
        if a > 1 and all(a * x + b == y for x, y in zip(xs, column)):
            options.append((2, abs(i / max(ks, 1) - j / max(kt, 1)), i, a, b))
    if not options:
        return None
    _, _, i, a, b = min(options)
    return i, a, b


def _split(
    members: list[_Pair],
    suffix: bool,
    values_s: list[list[int]],
    values_t: list[list[int]],
    varying: list[int],
    j: int,
    allowed: dict[int, tuple[int, ...]],
) -> list[_Group]:
    """Split a group whose target number `j` no single source number explains.

    First choice: runs of consecutive values of one source number over which every target number is that
    number plus a constant, or a constant (`features.4..6` -> `blocks.2.{\\1 - 4}`): one row per run, the
    source number limited to the run's values. Else split by the source number that decides `j`.
    """
    best: list[list[int]] | None = None
    best_slot = -1
    for i in varying:
        runs = _runs(values_s, values_t, i)
        if runs is not None and len(runs) < len({v[i] for v in values_s}) and (best is None or len(runs) < len(best)):
            best, best_slot = runs, i
    if best is not None:
        out: list[_Group] = []
        for values in best:
            chosen = set(values)
            sub = [p for p, v in zip(members, values_s) if v[best_slot] in chosen]
            out.extend(_fit_group(sub, suffix, {**allowed, best_slot: tuple(values)}))
        return out
    column = [v[j] for v in values_t]
    for i in sorted(varying, key=lambda i: len({v[i] for v in values_s})):
        decided: dict[int, set[int]] = defaultdict(set)
        for v, y in zip(values_s, column):
            decided[v[i]].add(y)
        if all(len(ys) == 1 for ys in decided.values()):
            return _split_by(members, suffix, values_s, i, allowed)
    for i in sorted(varying, key=lambda i: len({v[i] for v in values_s})):
        return _split_by(members, suffix, values_s, i, allowed)
    raise AssertionError("a varying target number needs a varying source number")  # injective mapping


def _runs(values_s: list[list[int]], values_t: list[list[int]], i: int) -> list[list[int]] | None:
    """The fewest runs of consecutive values of source number `i` over each of which every target number is
    `i` + a constant, or a constant (ties: runs that vary the innermost target number); None when some value
    of `i` does not decide the target numbers."""
    by_value: dict[int, tuple[int, ...]] = {}
    for v, t in zip(values_s, values_t):
        if by_value.setdefault(v[i], tuple(t)) != tuple(t):
            return None
    values = sorted(by_value)
    n = len(values)
    best: list[tuple[float, int]] = [(0.0, -1)] + [(float("inf"), -1)] * n  # best[k]: cost of values[:k], cut
    for end in range(1, n + 1):
        for start in range(end - 1, -1, -1):
            cost = _run_cost(values[start:end], by_value)
            if cost is None:
                break
            if best[start][0] + cost < best[end][0]:
                best[end] = (best[start][0] + cost, start)
    runs: list[list[int]] = []
    end = n
    while end > 0:
        start = best[end][1]
        runs.append(values[start:end])
        end = start
    return runs[::-1]


def _run_cost(run: list[int], by_value: Mapping[int, tuple[int, ...]]) -> float | None:
    """1 for a valid run (plus a little for each varying target number that is not the last), None if invalid."""
    first = by_value[run[0]]
    if len(run) == 1:
        return 1.0
    varying = []
    for k in range(len(first)):
        column = [by_value[v][k] for v in run]
        if len(set(column)) == 1:
            continue
        if any(c - column[0] != v - run[0] for c, v in zip(column, run)):
            return None
        varying.append(k)
    return 1.0 + 0.1 * sum(1 for k in varying if k != len(first) - 1)


def _split_by(
    members: list[_Pair], suffix: bool, values_s: list[list[int]], slot: int, allowed: dict[int, tuple[int, ...]]
) -> list[_Group]:
    parts: dict[int, list[_Pair]] = defaultdict(list)
    for p, v in zip(members, values_s):
        parts[v[slot]].append(p)
    out: list[_Group] = []
    narrowed = {k: v for k, v in allowed.items() if k != slot}
    for sub in parts.values():
        out.extend(_fit_group(sub, suffix, narrowed))
    return out


class _Buckets:
    """Keys bucketed by template (numbers abstracted): a pattern's matches are found from one key per bucket."""

    def __init__(self, keys: Iterable[str]) -> None:
        self.buckets: dict[str, list[str]] = defaultdict(list)
        for key in dict.fromkeys(keys):
            self.buckets[_DIGITS.sub("#", key)].append(key)

    def matching(self, pattern: re.Pattern[str]) -> Iterable[str]:
        """Keys that `pattern` matches (`search`, as rename does)."""
        literal_digits = bool(_DIGITS.search(pattern.pattern))
        loose = re.compile(_DIGITS.sub(r"\\d+", pattern.pattern)) if literal_digits else pattern
        for bucket in self.buckets.values():
            if not loose.search(bucket[0]):
                continue
            if literal_digits:
                yield from (k for k in bucket if pattern.search(k))
            else:
                yield from bucket

    def any_match(self, pattern: re.Pattern[str]) -> bool:
        """True when `pattern` matches some key."""
        return next(iter(self.matching(pattern)), None) is not None


def _constraints(
    rows: list[tuple[_Group, re.Pattern[str]]], universe: _Buckets
) -> tuple[set[tuple[int, int]], set[int]]:
    """(pairs (a, b): row a must precede row b, rows that catch a key no other row can take first)."""
    owner: dict[str, int] = {}
    for index, (group, _) in enumerate(rows):
        for p in group.pairs:
            owner[p.source] = index
    before: set[tuple[int, int]] = set()
    bad: set[int] = set()
    for index, (_group, pattern) in enumerate(rows):
        for key in universe.matching(pattern):
            mine = owner.get(key)
            if mine == index:
                continue
            if mine is None:
                bad.add(index)
                break
            before.add((mine, index))
    return before, bad


def _topological(rows: list[tuple[_Group, re.Pattern[str]]], before: set[tuple[int, int]]) -> list[_Group] | None:
    first = [min(p.order for p in g.pairs) for g, _ in rows]
    indegree = [0] * len(rows)
    after: dict[int, list[int]] = defaultdict(list)
    for a, b in before:
        after[a].append(b)
        indegree[b] += 1
    ready = sorted((first[i], i) for i in range(len(rows)) if indegree[i] == 0)
    out: list[int] = []
    while ready:
        _, i = ready.pop(0)
        out.append(i)
        for b in after[i]:
            indegree[b] -= 1
            if indegree[b] == 0:
                ready.append((first[b], b))
                ready.sort()
    if len(out) != len(rows):
        return None
    return [rows[i][0] for i in out]


def _cycle_member(rows: list[tuple[_Group, re.Pattern[str]]], before: set[tuple[int, int]]) -> set[int]:
    """The most general row on a precedence cycle (the one with the shortest pattern)."""
    involved = {a for a, _ in before} & {b for _, b in before}
    return {min(involved, key=lambda i: len(rows[i][0].pattern()))} if involved else set()


# --------------------------------------------------------------------------------------------------------------
def cover(keys: Iterable[str], universe: Iterable[str]) -> list[str]:
    """Regexes (for `re.search`) that together match exactly `keys` among `universe`: short suffix patterns
    (`\\.mlp\\.grn\\.(weight|bias)$`) where they are exact, longer ones where they are not."""
    wanted = list(dict.fromkeys(keys))
    if not wanted:
        return []
    wanted_set = set(wanted)
    others = _Buckets(k for k in universe if k not in wanted_set)
    by_template: dict[str, list[str]] = defaultdict(list)
    for key in wanted:
        by_template[_DIGITS.sub("#", key)].append(key)
    shortest = [_cover_template(members, others) for members in by_template.values()]
    best = _combine(list(dict.fromkeys(p for ps in shortest for p in ps)))
    # Written at one common length, suffixes that differ in one name can share one pattern (grn.(weight|bias)).
    length = max(p.count(r"\.") + (1 if p.startswith("^") else 0) for ps in shortest for p in ps)
    uniform = [_cover_template(members, others, at_least=length) for members in by_template.values()]
    combined = _combine(list(dict.fromkeys(p for ps in uniform for p in ps)))
    return combined if len(combined) < len(best) else best


def _cover_template(members: list[str], others: _Buckets, at_least: int = 1) -> list[str]:
    parts = members[0].split(".")
    for length in range(min(at_least, len(parts)), len(parts) + 1):
        for literal in (False, True):
            tail = parts[-length:]
            if literal and any(m.split(".")[-length:] != tail for m in members):
                continue
            body = r"\.".join(re.escape(t) if literal else _DIGITS.sub(r"\\d+", re.escape(t)) for t in tail)
            anchor = "^" if length == len(parts) else r"\."
            pattern = f"{anchor}{body}$"
            compiled = re.compile(pattern)
            if all(compiled.search(m) for m in members) and not others.any_match(compiled):
                return [pattern]
    return [f"^{re.escape(m)}$" for m in members]


def _combine(patterns: list[str]) -> list[str]:
    """Suffix patterns that differ in one name only become one: `\\.grn\\.weight$` and `\\.grn\\.bias$` ->
    `\\.grn\\.(weight|bias)$`; `\\.c_fc\\.weight$` and `\\.c_proj\\.weight$` -> `\\.(c_fc|c_proj)\\.weight$`."""
    changed = True
    while changed:
        changed = False
        split = [p.split(r"\.") for p in patterns]
        for index in range(max((len(s) for s in split), default=0)):
            groups: dict[tuple, list[int]] = defaultdict(list)
            for k, parts in enumerate(split):
                if index < len(parts) and _plain_name(parts[index], index == len(parts) - 1):
                    groups[(len(parts), tuple(parts[:index]), tuple(parts[index + 1 :]))].append(k)
            for (_, head, tail), members in groups.items():
                if len(members) < 2:
                    continue
                last = index == len(split[members[0]]) - 1
                names = [split[k][index][:-1] if last else split[k][index] for k in members]
                merged = "(" + "|".join(dict.fromkeys(names)) + ")" + ("$" if last else "")
                combined = r"\.".join([*head, merged, *tail])
                keep = [p for k, p in enumerate(patterns) if k not in set(members)]
                patterns = keep[: min(members)] + [combined] + keep[min(members) :]
                changed = True
                break
            if changed:
                break
    return patterns


def _plain_name(part: str, last: bool) -> bool:
    """A literal name component (the last one ending in `$`), safe to put in an alternation."""
    if last:
        if not part.endswith("$"):
            return False
        part = part[:-1]
    return bool(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", part))
