"""Align a source layout with a target layout, level by level: run bodies once, then the rest of each level.

Within a level: runs are paired first (by how well their bodies align, their names and positions); fused
tensors are split or merged where a sibling set's sizes add up; then whole modules (the tensors sharing a
parent) are assigned as units, so a BatchNorm's five tensors go together; then single tensors. Every
assignment maximises name evidence (synonym-folded tokens, ordinals, numbers) plus order evidence (the
relative position in state-dict order), among pairs whose shapes fit exactly or through one op.
"""

from __future__ import annotations

import bisect
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Sequence

from ckptx.suggest.assign import assign
from ckptx.suggest.names import key_name, rarity, similarity, token_similarity
from ckptx.suggest.shapes import Fit, JoinFit, dtype_kind, fit, join_fit, loose_shape
from ckptx.suggest.tree import Leaf, Level, Run

__all__ = ["Alignment", "Match", "RunPair", "align", "expand"]

_CLASS_LIMIT = 400          # above this many candidates of one shape, pair them in order instead
_DENSE = 2500               # score every pair of a class up to this many pairs; beyond, only near ones
_NEAR = 12                  # ... the candidates nearest the expected place, on each side
# Fused groups in the order their parts are concatenated (q, k, v; gate, up), whatever order the keys come in.
_KNOWN_ORDERS = (("q", "k", "v"), ("k", "v"), ("q", "k"), ("gate", "up"))
_KNOWN_GROUPS = tuple(frozenset(order) for order in _KNOWN_ORDERS)
_GENERIC_PARAMS = frozenset({"weight", "bias", "mean", "var", "num", "batches", "tracked", "scale"})
_CLOSE = 0.12               # a runner-up within this score of the choice is reported as a close call


@dataclass(frozen=True)
class Match:
    """Source tensor(s) -> target tensor(s), keys relative to the level they were aligned in.

    `kind` is `tensor` (1:1, `fit` a Fit), `split` (one source, several targets) or `merge` (several
    sources, one target), `fit` then a JoinFit. `evidence` says what decided it; `alternative` names a
    close runner-up target; `note` explains a decision shapes alone could not make.
    """

    sources: tuple[str, ...]
    targets: tuple[str, ...]
    kind: str
    fit: Fit | JoinFit
    evidence: str
    alternative: str | None = None
    note: str | None = None

    def prefixed(self, source_prefix: str, target_prefix: str) -> "Match":
        """The same match with both sides' keys under prefixes."""
        alt = target_prefix + self.alternative if self.alternative else None
        return Match(tuple([source_prefix + k for k in self.sources]), tuple([target_prefix + k for k in self.targets]),
                     self.kind, self.fit, self.evidence, alt, self.note)


@dataclass
class RunPair:
    """A source run aligned with a target run: instance i of `pairs` goes to instance j, bodies per `inner`."""

    source: Run
    target: Run
    inner: "Alignment"
    pairs: list[tuple[int, int]]


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


def align(source: Level, target: Level, memo: dict[tuple[int, int], Alignment] | None = None) -> Alignment:
    """Align two levels (recursively through their runs); `memo` shares run-body alignments."""
    memo = {} if memo is None else memo
    key = (source.signature, target.signature)
    if key in memo:
        return memo[key]
    result = _LevelAligner(source, target, memo).run()
    memo[key] = result
    return result


def expand(alignment: Alignment, source_prefix: str = "", target_prefix: str = "") -> Iterator[Match]:
    """Every match with full keys, run instances expanded."""
    for match in alignment.matches:
        yield match.prefixed(source_prefix, target_prefix) if source_prefix or target_prefix else match
    for pair in alignment.runs:
        for i, j in pair.pairs:
            yield from expand(pair.inner, f"{source_prefix}{pair.source.prefixes[i]}.",
                              f"{target_prefix}{pair.target.prefixes[j]}.")


def unmatched(alignment: Alignment, source_prefix: str = "", target_prefix: str = "") -> tuple[list[str], list[str]]:
    """(source keys, target keys) left unmatched, with full keys, run instances expanded."""
    src = [source_prefix + k for k in alignment.source_unmatched]
    dst = [target_prefix + k for k in alignment.target_unmatched]
    for pair in alignment.runs:
        for i, j in pair.pairs:
            s, t = unmatched(pair.inner, f"{source_prefix}{pair.source.prefixes[i]}.",
                             f"{target_prefix}{pair.target.prefixes[j]}.")
            src += s
            dst += t
    return src, dst


# --------------------------------------------------------------------------------------------------------------
class _LevelAligner:
    def __init__(self, source: Level, target: Level, memo: dict[tuple[int, int], Alignment]) -> None:
        self.source, self.target, self.memo = source, target, memo
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
            anchors += [(a.order, b.order),
                        (a.order + len(a.prefixes) * a.size - 1, b.order + len(b.prefixes) * b.size - 1)]
        flat = _FlatAligner(src_leaves, dst_leaves, anchors, self.source.count, self.target.count)
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
        for i, a in enumerate(src_runs):
            row: list[float | None] = []
            for j, b in enumerate(dst_runs):
                if not _bodies_may_match(a.body, b.body):
                    row.append(None)
                    continue
                al = align(a.body, b.body, self.memo)
                inner[i, j] = al
                if al.quality < 0.5:
                    row.append(None)
                    continue
                count = min(len(a.prefixes), len(b.prefixes)) / max(len(a.prefixes), len(b.prefixes))
                name = token_similarity(key_name(a.template + ".x").path, key_name(b.template + ".x").path)
                position = _position_similarity(i, len(src_runs), j, len(dst_runs))
                row.append(2.0 * al.quality + 1.0 * count + 0.5 * name + 0.8 * position)
            scores.append(row)
        paired = assign(scores)
        left_src = [(r, None) for i, r in enumerate(src_runs) if i not in {p for p, _ in paired}]
        left_dst = [(r, None) for j, r in enumerate(dst_runs) if j not in {q for _, q in paired}]
        for i, j in paired:
            a, b = src_runs[i], dst_runs[j]
            pairs = _instance_pairs(a, b)
            self.result.runs.append(RunPair(a, b, inner[i, j], pairs))
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
        holder = Level(runs=[run])
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


def _position_similarity(i: int, n: int, j: int, m: int) -> float:
    """1 for the same relative position, falling off with the distance in items (scaled to the source's count)."""
    if n <= 1 or m <= 1:
        return 1.0
    expected = j * (n - 1) / (m - 1)
    return 1.0 / (1.0 + abs(i - expected) / 2.0)


class _Warp:
    """Where a source position is expected on the target side: piecewise linear between anchor pairs that agree
    in order (a longest increasing subsequence of them), so a block moved or inserted elsewhere shifts nothing."""

    def __init__(self, anchors: list[tuple[int, int]], n: int, m: int) -> None:
        chain = _increasing(sorted(set(anchors)))
        self.xs = [-1] + [i for i, _ in chain] + [n]
        self.ys = [-1.0] + [float(j) for _, j in chain] + [float(m)]

    def expected(self, i: int) -> float:
        """The target position a source position `i` corresponds to."""
        k = bisect.bisect_right(self.xs, i) - 1
        if self.xs[k] == i or k + 1 >= len(self.xs):
            return self.ys[k]
        x0, x1, y0, y1 = self.xs[k], self.xs[k + 1], self.ys[k], self.ys[k + 1]
        return y0 + (y1 - y0) * (i - x0) / (x1 - x0)

    def similarity(self, i: int, j: int) -> float:
        """1 at the expected position, falling off with the distance in tensors."""
        return 1.0 / (1.0 + abs(self.expected(i) - j) / 3.0)


def _increasing(pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """A longest chain of pairs increasing in both coordinates (pairs sorted by the first)."""
    tails: list[int] = []
    tail_index: list[int] = []
    back: list[int] = []
    for index, (_, j) in enumerate(pairs):
        k = bisect.bisect_left(tails, j)
        if k == len(tails):
            tails.append(j)
            tail_index.append(index)
        else:
            tails[k] = j
            tail_index[k] = index
        back.append(tail_index[k - 1] if k else -1)
    out = []
    index = tail_index[-1] if tail_index else -1
    while index >= 0:
        out.append(pairs[index])
        index = back[index]
    out.reverse()
    # equal first coordinates cannot both be in a chain
    chain: list[tuple[int, int]] = []
    for pair in out:
        if not chain or (pair[0] > chain[-1][0] and pair[1] > chain[-1][1]):
            chain.append(pair)
    return chain


def _number_similarity(a: Sequence[int], b: Sequence[int]) -> float:
    """Longest common subsequence of two number sequences, relative to the longer one; numbering from 0 and
    from 1 (`layer1` against `stages.0`) count alike, so only numbers that disagree in both readings count."""
    if not a and not b:
        return 1.0
    if not a or not b:
        return 0.0
    return max(_lcs(a, b), _lcs(a, [y + 1 for y in b]), _lcs([x + 1 for x in a], b))


def _lcs(a: Sequence[int], b: Sequence[int]) -> float:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1] / max(len(a), len(b))


def _parent(key: str) -> str:
    return key.rsplit(".", 1)[0] if "." in key else ""


# --------------------------------------------------------------------------------------------------------------
class _FlatAligner:
    """Matches single tensors of one level: fused splits/merges, then modules, then tensors."""

    def __init__(self, src: list[Leaf], dst: list[Leaf], anchors: Sequence[tuple[int, int]] = (),
                 n: int | None = None, m: int | None = None) -> None:
        self.src, self.dst = src, dst
        self.run_anchors = list(anchors)
        self.n = n if n is not None else (max((leaf.order for leaf in src), default=-1) + 1)
        self.m = m if m is not None else (max((leaf.order for leaf in dst), default=-1) + 1)
        self.free_src = set(range(len(src)))
        self.free_dst = set(range(len(dst)))
        self.matches: list[Match] = []
        self.parent_votes: Counter = Counter()
        self.weights = rarity([leaf.key for leaf in src], [leaf.key for leaf in dst])
        self.warp = _Warp(self.run_anchors, self.n, self.m)
        self._layouts: dict[tuple, list[tuple[int, int, Fit]] | None] = {}

    def position(self, i: int, j: int) -> float:
        """How well source leaf `i` and target leaf `j` sit at corresponding places of their levels."""
        return self.warp.similarity(self.src[i].order, self.dst[j].order)

    def run(self) -> list[Match]:
        self._fused("split")
        self._fused("merge")
        self.warp = _Warp(self._anchors() + self.run_anchors, self.n, self.m)
        self._modules()
        self._tensors()
        self._square_transposes()
        self.matches.sort(key=lambda m: min(self._src_order[k] for k in m.sources))
        return self.matches

    # ---- helpers
    @property
    def _src_order(self) -> dict[str, int]:
        if not hasattr(self, "_order_cache"):
            self._order_cache = {leaf.key: leaf.order for leaf in self.src}
        return self._order_cache

    def _evidence(self, s: str, t: str) -> str:
        if s == t:
            return "the same name"
        return "similar names" if similarity(s, t, self.weights) >= 0.6 else "shape and position"

    def _anchors(self) -> list[tuple[int, int]]:
        """Pairs sure enough to measure order against: same names, and tensors whose shape is unique on both sides."""
        anchors = []
        by_key = {leaf.key: j for j, leaf in enumerate(self.dst) if j in self.free_dst}
        for i in self.free_src:
            j = by_key.get(self.src[i].key)
            if j is not None:
                anchors.append((self.src[i].order, self.dst[j].order))
        classes: dict[tuple, tuple[list[int], list[int]]] = {}
        for i in self.free_src:
            meta = self.src[i].meta
            classes.setdefault((loose_shape(meta.shape), dtype_kind(meta.dtype)), ([], []))[0].append(i)
        for j in self.free_dst:
            meta = self.dst[j].meta
            key = (loose_shape(meta.shape), dtype_kind(meta.dtype))
            if key in classes:
                classes[key][1].append(j)
        for rows, cols in classes.values():
            if len(rows) == 1 and len(cols) == 1 and fit(self.src[rows[0]].meta, self.dst[cols[0]].meta):
                anchors.append((self.src[rows[0]].order, self.dst[cols[0]].order))
        for match in self.matches:
            anchors.append((self.src[self._src_index[match.sources[0]]].order,
                            self.dst[self._dst_index[match.targets[0]]].order))
        return anchors

    @property
    def _src_index(self) -> dict[str, int]:
        if not hasattr(self, "_src_index_cache"):
            self._src_index_cache = {leaf.key: i for i, leaf in enumerate(self.src)}
        return self._src_index_cache

    @property
    def _dst_index(self) -> dict[str, int]:
        if not hasattr(self, "_dst_index_cache"):
            self._dst_index_cache = {leaf.key: j for j, leaf in enumerate(self.dst)}
        return self._dst_index_cache

    # ---- fused tensors
    def _fused(self, kind: str) -> None:
        """Split one source tensor into sibling targets (or merge sibling sources into one target)."""
        wholes, parts = (self.src, self.dst) if kind == "split" else (self.dst, self.src)
        free_whole, free_part = (self.free_src, self.free_dst) if kind == "split" else (self.free_dst, self.free_src)
        if len(parts) < 2:
            return
        windows = _sibling_windows(parts)
        if not windows:
            return
        by_shape: dict[tuple[int, ...], list[tuple[int, tuple[int, ...], list[set[str]], bool]]] = defaultdict(list)
        for start, window in windows:  # what each window would concatenate to (so each whole looks up its own)
            names = _window_names([parts[p].key for p in window])
            if names is None:
                continue
            for shape in _joined_shapes([parts[p].meta.shape for p in window]):
                by_shape[shape].append((start, window, *names))
        loose_parts = Counter(loose_shape(parts[p].meta.shape) for p in free_part)
        for w in sorted(free_whole):
            whole = wholes[w]
            candidates = by_shape.get(whole.meta.shape)
            if not candidates:
                continue
            best: tuple[float, int, tuple[int, ...], JoinFit] | None = None
            has_partner = loose_parts.get(loose_shape(whole.meta.shape), 0) > 0
            mine = _name_concepts(whole.key)
            for start, window, distinct, known in candidates:
                evidence = sum(1 for d in distinct if d & mine) / len(distinct)
                if evidence < 0.99 and not (known and not has_partner):
                    continue
                if any(p not in free_part for p in window):
                    continue
                jf = join_fit(whole.meta, [parts[p].meta for p in window])
                if jf is None:
                    continue
                rank = evidence + (0.5 if known else 0.0)
                if best is None or rank > best[0] or (rank == best[0] and start < best[1]):
                    best = (rank, start, window, jf)
            if best is None:
                continue
            _, _, window, jf = best
            keys = tuple(parts[p].key for p in window)
            why = "a fused name" if best[0] >= 0.99 else "sizes that add up (no name evidence)"
            note = None if best[0] >= 0.99 else f"no name says '{whole.key}' fuses {', '.join(keys)}; sizes add up"
            if kind == "split":
                self.matches.append(Match((whole.key,), keys, "split", jf, why, note=note))
            else:
                self.matches.append(Match(keys, (whole.key,), "merge", jf, why, note=note))
            free_whole.discard(w)
            free_part.difference_update(window)
            for p in window:
                loose_parts[loose_shape(parts[p].meta.shape)] -= 1

    # ---- modules
    def _modules(self) -> None:
        src_mods = _modules_of(self.src, self.free_src)
        dst_mods = _modules_of(self.dst, self.free_dst)
        if not src_mods or not dst_mods:
            return
        classes: dict[tuple, tuple[list[int], list[int]]] = {}
        for i, (_, members) in enumerate(src_mods):
            classes.setdefault(_module_class(self.src, members), ([], []))[0].append(i)
        for j, (_, members) in enumerate(dst_mods):
            key = _module_class(self.dst, members)
            if key in classes:
                classes[key][1].append(j)
        n, m = len(src_mods), len(dst_mods)
        for rows, cols in classes.values():
            if not rows or not cols:
                continue
            if len(rows) > _CLASS_LIMIT or len(cols) > _CLASS_LIMIT:
                pairs = [(r, c, self._param_pairs(src_mods[r][1], dst_mods[c][1])) for r, c in zip(rows, cols)]
                self._accept_modules(src_mods, dst_mods, [(r, c, p, 0.0, None) for r, c, p in pairs if p])
                continue
            scores: list[list[float | None]] = []
            bijections: dict[tuple[int, int], list[tuple[int, int, Fit]]] = {}
            near = self._neighbours([src_mods[r][1][0] for r in rows], [dst_mods[c][1][0] for c in cols])
            for x, r in enumerate(rows):
                row: list[float | None] = []
                for y, c in enumerate(cols):
                    if near is not None and y not in near[x]:
                        row.append(None)
                        continue
                    pairs_ = self._param_pairs(src_mods[r][1], dst_mods[c][1])
                    if pairs_ is None or not self._plausible(src_mods[r][1][0], dst_mods[c][1][0]):
                        row.append(None)
                        continue
                    bijections[r, c] = pairs_
                    row.append(self._module_score(src_mods[r], r, n, dst_mods[c], c, m, pairs_))
                scores.append(row)
            chosen = assign(scores)
            accepted = []
            for ri, ci in chosen:
                r, c = rows[ri], cols[ci]
                alt = _runner_up(scores, chosen, ri, ci)
                accepted.append((r, c, bijections[r, c], scores[ri][ci] or 0.0,
                                 dst_mods[cols[alt]][0] if alt is not None else None))
            self._accept_modules(src_mods, dst_mods, accepted)

    def _accept_modules(self, src_mods: list, dst_mods: list, accepted: list) -> None:
        for r, c, pairs, _score, alternative in accepted:
            for si, ti, f in pairs:
                s, t = self.src[si].key, self.dst[ti].key
                alt = None
                if alternative is not None:
                    alt = f"{alternative}.{t.rsplit('.', 1)[-1]}" if alternative else t.rsplit(".", 1)[-1]
                self.matches.append(Match((s,), (t,), "tensor", f, self._evidence(s, t), alternative=alt))
                self.free_src.discard(si)
                self.free_dst.discard(ti)
            self.parent_votes[src_mods[r][0], dst_mods[c][0]] += 1

    def _param_pairs(self, a: list[int], b: list[int]) -> list[tuple[int, int, Fit]] | None:
        """A bijection between two modules' tensors in which every pair fits, preferring equal parameter names
        (worked out once per pair of module layouts: every BatchNorm of a level has the same one)."""
        if len(a) != len(b):
            return None
        layout = (tuple((self.src[i].key.rsplit(".", 1)[-1], self.src[i].meta) for i in a),
                  tuple((self.dst[j].key.rsplit(".", 1)[-1], self.dst[j].meta) for j in b))
        found = self._layouts.get(layout, False)
        if found is False:
            found = self._layouts[layout] = _bijection(*layout)
        if found is None:
            return None
        return [(a[x], b[y], f) for x, y, f in found]



    def _module_score(self, sm: tuple[str, list[int]], r: int, n: int, dm: tuple[str, list[int]], c: int, m: int,
                      pairs: list[tuple[int, int, Fit]]) -> float:
        na, nb = key_name(sm[0] + ".x"), key_name(dm[0] + ".x")
        name = token_similarity(na.path, nb.path, self.weights) + \
            0.3 * (token_similarity(na.leaf, nb.leaf) if (na.leaf or nb.leaf) else 1.0)
        ordinal = 0.0
        if na.leaf_ordinal is not None and nb.leaf_ordinal is not None:
            ordinal = 0.5 if na.leaf_ordinal == nb.leaf_ordinal else -0.5
        numbers = _number_similarity(na.numbers, nb.numbers)
        position = self.position(sm[1][0], dm[1][0])
        params = sum(token_similarity(key_name(self.src[i].key).param, key_name(self.dst[j].key).param)
                     for i, j, _ in pairs) / len(pairs)
        quality = sum(f.quality for _, _, f in pairs) / len(pairs)
        same = 1.0 if sm[0] == dm[0] else 0.0
        return 1.0 + 1.0 * name + ordinal + 0.5 * numbers + 0.8 * position + 0.3 * params + 1.0 * quality + same

    # ---- single tensors
    def _tensors(self) -> None:
        if not self.free_src or not self.free_dst:
            return
        classes: dict[tuple, tuple[list[int], list[int]]] = {}
        for i in sorted(self.free_src):
            meta = self.src[i].meta
            classes.setdefault((loose_shape(meta.shape), dtype_kind(meta.dtype)), ([], []))[0].append(i)
        for j in sorted(self.free_dst):
            meta = self.dst[j].meta
            key = (loose_shape(meta.shape), dtype_kind(meta.dtype))
            if key in classes:
                classes[key][1].append(j)
        n, m = len(self.src), len(self.dst)
        rank_src = {leaf_index: r for r, leaf_index in enumerate(range(n))}
        for rows, cols in classes.values():
            if not rows or not cols:
                continue
            if len(rows) > _CLASS_LIMIT or len(cols) > _CLASS_LIMIT:
                for i, j in zip(rows, cols):
                    f = fit(self.src[i].meta, self.dst[j].meta)
                    if f is not None:
                        self._accept_tensor(i, j, f, None)
                continue
            near = self._neighbours(rows, cols)
            fits = {(i, j): fit(self.src[i].meta, self.dst[j].meta)
                    if (near is None or y in near[x]) and self._plausible(i, j) else None
                    for x, i in enumerate(rows) for y, j in enumerate(cols)}
            scores = [[self._tensor_score(i, rank_src[i], n, j, m, fits[i, j]) if fits[i, j] is not None else None
                       for j in cols] for i in rows]
            chosen = assign(scores)
            for ri, ci in chosen:
                alt = _runner_up(scores, chosen, ri, ci)
                self._accept_tensor(rows[ri], cols[ci], fits[rows[ri], cols[ci]],  # type: ignore[arg-type]
                                    self.dst[cols[alt]].key if alt is not None else None)

    def _neighbours(self, rows: list[int], cols: list[int]) -> list[set[int]] | None:
        """For a large shape class, the columns worth scoring for each row: the `_NEAR` nearest the expected
        place and those with the same last name (None for a small class: score every pair). Keeps a class of
        thousands of identical shapes (a flat model) from costing the square of its size."""
        if len(rows) * len(cols) <= _DENSE:
            return None
        orders = sorted((self.dst[j].order, y) for y, j in enumerate(cols))
        keys = [o for o, _ in orders]
        by_name: dict[str, list[int]] = defaultdict(list)
        for y, j in enumerate(cols):
            by_name[self.dst[j].key.rsplit(".", 2)[-2] if "." in self.dst[j].key else self.dst[j].key].append(y)
        out = []
        for i in rows:
            at = bisect.bisect_left(keys, self.warp.expected(self.src[i].order))
            chosen = {y for _, y in orders[max(0, at - _NEAR):at + _NEAR]}
            name = self.src[i].key.rsplit(".", 2)[-2] if "." in self.src[i].key else self.src[i].key
            chosen.update(by_name.get(name, ())[:_NEAR])
            out.append(chosen)
        return out

    def _plausible(self, i: int, j: int) -> bool:
        """A lone tensor pair needs some evidence beyond its shape: a similar name or about the expected place
        (a new layer of the target is not filled with a leftover of the same shape from elsewhere)."""
        a, b = key_name(self.src[i].key), key_name(self.dst[j].key)
        named = (token_similarity(a.path, b.path, self.weights) >= 0.15 or bool(set(a.leaf) & set(b.leaf))
                 or bool((set(a.param) & set(b.param)) - _GENERIC_PARAMS))
        return named or self.position(i, j) >= 0.25

    def _tensor_score(self, i: int, r: int, n: int, j: int, m: int, f: Fit) -> float:
        s, t = self.src[i].key, self.dst[j].key
        na, nb = key_name(s), key_name(t)
        vote = 0.6 if self.parent_votes.get((_parent(s), _parent(t))) else 0.0
        return (1.0 + 1.2 * similarity(s, t, self.weights) + 0.3 * _number_similarity(na.numbers, nb.numbers)
                + 0.8 * self.position(i, j) + 1.0 * f.quality + vote + (1.0 if s == t else 0.0))

    def _accept_tensor(self, i: int, j: int, f: Fit, alternative: str | None) -> None:
        s, t = self.src[i].key, self.dst[j].key
        self.matches.append(Match((s,), (t,), "tensor", f, self._evidence(s, t), alternative=alternative))
        self.free_src.discard(i)
        self.free_dst.discard(j)

    # ---- Conv1D versus Linear
    def _square_transposes(self) -> None:
        """Square 2-d weights follow their level's non-square ones: transposed if those mostly are."""
        transposed = exact = 0
        for match in self.matches:
            if match.kind != "tensor" or not isinstance(match.fit, Fit):
                continue
            f = match.fit
            if f.kind == "permute" and f.dims == (1, 0):
                transposed += 1
            elif f.kind == "exact" and len(f.shape) == 2 and not f.square and min(f.shape) > 1:
                exact += 1
        if transposed <= exact:
            return
        for index, match in enumerate(self.matches):
            if match.kind == "tensor" and isinstance(match.fit, Fit) and match.fit.square:
                self.matches[index] = replace(
                    match, fit=Fit("permute", match.fit.shape, dims=(1, 0)),
                    note=f"square weight transposed like the {transposed} non-square 2-d weights of this level "
                         f"(shapes cannot tell; verify the outputs)")


def _modules_of(leaves: list[Leaf], free: set[int]) -> list[tuple[str, list[int]]]:
    """Free leaves grouped by parent module, in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for i in sorted(free):
        groups.setdefault(_parent(leaves[i].key), []).append(i)
    return list(groups.items())


def _module_class(leaves: list[Leaf], members: list[int]) -> tuple:
    return tuple(sorted((loose_shape(leaves[i].meta.shape), dtype_kind(leaves[i].meta.dtype)) for i in members))


def _runner_up(scores: list[list[float | None]], chosen: list[tuple[int, int]], ri: int, ci: int) -> int | None:
    """The column whose swap with the chosen one costs less than `_CLOSE` (a close call), if any."""
    owner = {c: r for r, c in chosen}
    mine = scores[ri][ci]
    if mine is None:
        return None
    best, best_loss = None, _CLOSE
    for c, value in enumerate(scores[ri]):
        if c == ci or value is None:
            continue
        other = owner.get(c)
        if other is None:
            loss = mine - value
        else:
            back = scores[other][ci]
            if back is None:
                continue
            loss = (mine + (scores[other][c] or 0.0)) - (value + back)
        if loss < best_loss:
            best, best_loss = c, loss
    return best


def _sibling_windows(leaves: list[Leaf]) -> list[tuple[int, tuple[int, ...]]]:
    """Runs of 2..4 consecutive sibling tensors that differ in one named module component (q/k/v, gate/up)."""
    families: dict[tuple, list[int]] = {}
    for index, leaf in enumerate(leaves):
        parts = leaf.key.split(".")
        for pos in range(len(parts) - 1):
            if parts[pos].isdigit():
                continue
            families.setdefault((pos, tuple(parts[:pos]), tuple(parts[pos + 1:])), []).append(index)
    windows: list[tuple[int, tuple[int, ...]]] = []
    for (pos, _, _), members in families.items():
        if len(members) < 2:
            continue
        for size in range(2, min(4, len(members)) + 1):
            for start in range(len(members) - size + 1):
                windows.append((leaves[members[start]].order, tuple(members[start:start + size])))
        by_concept: dict[str, int] = {}
        for index in members:
            concepts = set(key_name(".".join(leaves[index].key.split(".")[: pos + 1]) + ".x").leaf)
            for concept in concepts & {c for order in _KNOWN_ORDERS for c in order}:
                by_concept.setdefault(concept, index)
        for order in _KNOWN_ORDERS:  # known groups in concatenation order, even when the keys are sorted by name
            if all(c in by_concept for c in order) and len({by_concept[c] for c in order}) == len(order):
                window = tuple(by_concept[c] for c in order)
                windows.append((min(leaves[i].order for i in window), window))
    return list(dict.fromkeys(windows))


def _joined_shapes(shapes: list[tuple[int, ...]]) -> set[tuple[int, ...]]:
    """Every shape the pieces concatenate to along one dimension, as they are or each transposed (2-d)."""
    out: set[tuple[int, ...]] = set()
    for transpose in (False, True):
        pieces = [tuple(reversed(s)) for s in shapes] if transpose else shapes
        if transpose and any(len(s) != 2 for s in pieces):
            continue
        if len({len(s) for s in pieces}) != 1:
            continue
        for dim in range(len(pieces[0])):
            rest = {s[:dim] + s[dim + 1:] for s in pieces}
            if len(rest) == 1:
                first = pieces[0]
                out.add(first[:dim] + (sum(s[dim] for s in pieces),) + first[dim + 1:])
    return out


def _window_names(parts: list[str]) -> tuple[list[set[str]], bool] | None:
    """The distinguishing concepts of each part of a sibling window (`q`, `k`, `v` of `q_proj`...), and whether
    they form a known group; None when some part has none (`fc1`/`fc2` differ by a number only)."""
    names = [p.split(".") for p in parts]
    position = next(i for i in range(len(names[0])) if len({n[i] for n in names}) > 1)
    concepts = [set(key_name(".".join(n[: position + 1]) + ".x").leaf) for n in names]
    common = set.intersection(*concepts)
    distinct = [c - common for c in concepts]
    if any(not d for d in distinct):
        return None
    union = frozenset().union(*distinct)
    known = any(union <= group and len(union) == len(distinct) for group in _KNOWN_GROUPS)
    return distinct, known


def _name_concepts(key: str) -> set[str]:
    name = key_name(key)
    return set(name.path) | set(name.leaf) | set(name.param)


def _bijection(a: tuple[tuple[str, Any], ...], b: tuple[tuple[str, Any], ...]) -> list[tuple[int, int, Fit]] | None:
    """Positions (x, y, fit) pairing the tensors `(name, meta)` of two modules, or None when no bijection fits."""
    fits = [[fit(ma, mb) for _, mb in b] for _, ma in a]
    if len(a) == 1:
        return [(0, 0, fits[0][0])] if fits[0][0] is not None else None
    scores = [[(1.0 + token_similarity(key_name(na).param, key_name(nb).param) + 0.1 * (1.0 - abs(x - y) / len(a))
                if fits[x][y] is not None else None) for y, (nb, _) in enumerate(b)] for x, (na, _) in enumerate(a)]
    chosen = assign(scores)
    if len(chosen) != len(a):
        return None
    return [(x, y, fits[x][y]) for x, y in chosen]  # type: ignore[misc]
