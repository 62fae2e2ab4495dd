"""Align a source layout with a target layout, level by level: run bodies once, then the rest of each level.

Runs are paired by how well their bodies align (recursively, memoised per pair of body layouts), their
names and positions; instances are paired by their numbers. What is left of a level — single tensors,
and the instances of runs nothing matched — goes to `FlatAligner`.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

from ckptx.suggestion.assign import assign
from ckptx.suggestion.flat import FlatAligner, decide
from ckptx.suggestion.match import Match
from ckptx.suggestion.names import key_name, rarity, token_similarity
from ckptx.suggestion.order import position_similarity
from ckptx.suggestion.shapes import loose_shape
from ckptx.suggestion.tree import Leaf, Level, Run

__all__ = ["Alignment", "Match", "RunPair", "align", "expand", "unmatched"]


@dataclass(frozen=True)
class RunPair:
    """A source run aligned with a target run: instance i of `pairs` goes to instance j, bodies per `inner`."""

    source: Run
    target: Run
    inner: Alignment
    pairs: list[tuple[int, int]]
    undecided: bool = False  # only position paired these runs (towers of equal blocks, names that do not tell)


@dataclass
class Alignment:
    """The outcome for one level: single-tensor matches, run pairs, and what stayed unmatched."""

    matches: list[Match] = field(default_factory=list)
    runs: list[RunPair] = field(default_factory=list)
    source_unmatched: list[str] = field(default_factory=list)
    target_unmatched: list[str] = field(default_factory=list)
    matched_tensors: int = 0
    total_tensors: int = 0

    @property
    def quality(self) -> float:
        """Share of all tensors on both sides that were matched."""
        return self.matched_tensors / self.total_tensors if self.total_tensors else 1.0


def align(
    source: Level, target: Level, memo: dict[tuple[int, int], Alignment] | None = None, *, ordered: bool = True
) -> Alignment:
    """Align two levels (recursively through their runs); `memo` shares run-body alignments. `ordered`: both sides
    keep registration order (not sorted by name), so a decided neighbour's order is evidence."""
    memo = {} if memo is None else memo
    key = (source.signature, target.signature)
    if key in memo:
        return memo[key]
    result = _LevelAligner(source, target, memo, ordered).run()
    memo[key] = result
    return result


def expand(alignment: Alignment, source_prefix: str = "", target_prefix: str = "") -> Iterator[Match]:
    """Every match with full keys, run instances expanded."""
    for match in alignment.matches:
        yield match.prefixed(source_prefix, target_prefix) if source_prefix or target_prefix else match
    for pair in alignment.runs:
        for i, j in pair.pairs:
            for match in expand(
                pair.inner, f"{source_prefix}{pair.source.prefixes[i]}.", f"{target_prefix}{pair.target.prefixes[j]}."
            ):
                yield replace(match, undecided=True) if pair.undecided else match


def unmatched(alignment: Alignment, source_prefix: str = "", target_prefix: str = "") -> tuple[list[str], list[str]]:
    """(source keys, target keys) left unmatched, with full keys, run instances expanded."""
    src = [source_prefix + k for k in alignment.source_unmatched]
    dst = [target_prefix + k for k in alignment.target_unmatched]
    for pair in alignment.runs:
        for i, j in pair.pairs:
            s, t = unmatched(
                pair.inner, f"{source_prefix}{pair.source.prefixes[i]}.", f"{target_prefix}{pair.target.prefixes[j]}."
            )
            src += s
            dst += t
    return src, dst


class _LevelAligner:
    def __init__(self, source: Level, target: Level, memo: dict[tuple[int, int], Alignment], ordered: bool) -> None:
        self.source, self.target, self.memo, self.ordered = source, target, memo, ordered
        self.result = Alignment(total_tensors=source.count + target.count)

    def run(self) -> Alignment:
        src_leaves, dst_leaves = list(self.source.leaves), list(self.target.leaves)
        left_src, left_dst = self._align_runs()
        for run, instances in left_src:
            leaves, runs = self.source.unrolled(run, instances)
            src_leaves += leaves + _flatten(runs)
        for run, instances in left_dst:
            leaves, runs = self.target.unrolled(run, instances)
            dst_leaves += leaves + _flatten(runs)
        src_leaves.sort(key=lambda leaf: leaf.order)
        dst_leaves.sort(key=lambda leaf: leaf.order)
        anchors = []
        for pair in self.result.runs:  # a matched run fixes where the tensors around it belong
            a, b = pair.source, pair.target
            anchors += [
                (a.order, b.order),
                (a.order + len(a.prefixes) * a.size - 1, b.order + len(b.prefixes) * b.size - 1),
            ]
        flat = FlatAligner(src_leaves, dst_leaves, anchors, self.source.count, self.target.count, self.ordered)
        self.result.matches = flat.run()
        self.result.source_unmatched = [src_leaves[i].key for i in sorted(flat.free_src)]
        self.result.target_unmatched = [dst_leaves[j].key for j in sorted(flat.free_dst)]
        self.result.matched_tensors += sum(len(m.sources) + len(m.targets) for m in self.result.matches)
        return self.result

    def _align_runs(self) -> tuple[list[tuple[Run, list[int] | None]], list[tuple[Run, list[int] | None]]]:
        """Pair runs; return the source and target runs (or their instances) left over, to be unrolled."""
        src_runs, dst_runs = self.source.runs, self.target.runs
        if not src_runs or not dst_runs:
            return [(r, None) for r in src_runs], [(r, None) for r in dst_runs]
        inner: dict[tuple[int, int], Alignment] = {}
        scores: list[list[float | None]] = []
        evidence: list[list[float | None]] = []
        weights = rarity([r.template + ".x" for r in src_runs], [r.template + ".x" for r in dst_runs])
        for i, a in enumerate(src_runs):
            row: list[float | None] = []
            erow: list[float | None] = []
            evidence.append(erow)
            for j, b in enumerate(dst_runs):
                if not _bodies_may_match(a.body, b.body):
                    row.append(None)
                    erow.append(None)
                    continue
                al = align(a.body, b.body, self.memo, ordered=self.ordered)
                inner[i, j] = al
                if al.quality < 0.5:
                    row.append(None)
                    erow.append(None)
                    continue
                count = min(len(a.prefixes), len(b.prefixes)) / max(len(a.prefixes), len(b.prefixes))
                name = token_similarity(key_name(a.template + ".x").path, key_name(b.template + ".x").path, weights)
                position = position_similarity(i, len(src_runs), j, len(dst_runs))
                part = 2.0 * al.quality + 1.0 * count + 1.5 * name
                erow.append(part)
                row.append(part + 0.3 * position)
            scores.append(row)
        paired = assign(scores)
        left_src: list[tuple[Run, list[int] | None]] = [
            (r, None) for i, r in enumerate(src_runs) if i not in {p for p, _ in paired}
        ]
        left_dst: list[tuple[Run, list[int] | None]] = [
            (r, None) for j, r in enumerate(dst_runs) if j not in {q for _, q in paired}
        ]
        for i, j in paired:
            a, b = src_runs[i], dst_runs[j]
            pairs = _instance_pairs(a, b)
            _, undecided = decide(scores, evidence, paired, i, j)
            self.result.runs.append(RunPair(a, b, inner[i, j], pairs, undecided))
            self.result.matched_tensors += int(round(inner[i, j].matched_tensors * len(pairs)))
            rest_a = sorted(set(range(len(a.prefixes))) - {p for p, _ in pairs})
            rest_b = sorted(set(range(len(b.prefixes))) - {q for _, q in pairs})
            if rest_a:
                left_src.append((a, rest_a))
            if rest_b:
                left_dst.append((b, rest_b))
        return left_src, left_dst


def _instance_pairs(a: Run, b: Run) -> list[tuple[int, int]]:
    """Instances of two runs paired by their numbers (`layers.3` with `blocks.3`), shifted by one when one side
    counts from 1 (`layer_1` with `layers.0`); instances without a partner are aligned on their own."""
    na, nb = _numbers(a), _numbers(b)
    if na is None or nb is None:
        n = min(len(a.prefixes), len(b.prefixes))
        return [(k, k) for k in range(n)]
    where_b = {v: k for k, v in enumerate(nb)}
    best: list[tuple[int, int]] = []
    for shift in dict.fromkeys((0, nb[0] - na[0], nb[-1] - na[-1], 1, -1)):
        pairs = [(k, where_b[v + shift]) for k, v in enumerate(na) if v + shift in where_b]
        if len(pairs) > len(best):
            best = pairs
    return best


def _numbers(run: Run) -> list[int] | None:
    """The index of each instance of a run (`stages.0.3` of template `stages.0.#` -> 3)."""
    pattern = re.compile("^" + re.escape(run.template).replace("\\#", "#").replace("#", r"(\d+)") + "$")
    out = []
    for prefix in run.prefixes:
        match = pattern.match(prefix)
        if match is None or match.lastindex != 1:
            return None
        out.append(int(match.group(1)))
    return out if len(set(out)) == len(out) else None


def _flatten(runs: list[Run]) -> list[Leaf]:
    """All tensors of runs as leaves (for runs nothing on the other side matched)."""
    out: list[Leaf] = []
    for run in runs:
        holder = Level(runs=(run,))
        leaves, inner = holder.unrolled(run)
        out += leaves + _flatten(inner)
    return out


def _bodies_may_match(a: Level, b: Level) -> bool:
    """A cheap test before aligning two run bodies: enough tensors of compatible shapes."""
    ca, cb = _loose_counter(a), _loose_counter(b)
    common = sum((ca & cb).values())
    return common * 2 >= 0.4 * (sum(ca.values()) + sum(cb.values()))


def _loose_counter(level: Level) -> Counter:
    counter: Counter = Counter(loose_shape(leaf.meta.shape) for leaf in level.leaves)
    for run in level.runs:
        for shape, n in _loose_counter(run.body).items():
            counter[shape] += n * len(run.prefixes)
    return counter
