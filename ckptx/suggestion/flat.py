"""Matching the single tensors of one level (what is left once runs are paired).

Fused tensors first (split/merge where a sibling set's sizes add up), then whole modules as units (the
tensors sharing a parent: a BatchNorm's five go together), then single tensors. Each assignment maximises
name evidence (synonym-folded tokens weighted by rarity, ordinals, numbers) plus order evidence (distance
from the expected place), among pairs whose shapes fit exactly or through one op.
"""

from __future__ import annotations

import bisect
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from ckptx.suggestion.assign import assign
from ckptx.suggestion.match import Match
from ckptx.suggestion.module_kinds import agreement, kind_of
from ckptx.suggestion.names import key_name, rarity, similarity, token_similarity
from ckptx.suggestion.order import Warp, number_similarity
from ckptx.suggestion.shapes import Fit, JoinFit, dtype_kind, fit, join_fit, loose_shape
from ckptx.suggestion.structure import ContainerMap, head_ranks, rank_agreement, role_agreement, sibling_ranks
from ckptx.suggestion.tree import Leaf

__all__ = ["FlatAligner", "decide"]

_CLASS_LIMIT = 400  # above this many candidates of one shape, pair them in order instead
_DENSE = 2500  # score every pair of a class up to this many pairs; beyond, only near ones
_NEAR = 12  # ... the candidates nearest the expected place, on each side
# Fused groups in the order their parts are concatenated (q, k, v; gate, up), whatever order the keys come in.
_KNOWN_ORDERS = (("q", "k", "v"), ("k", "v"), ("q", "k"), ("gate", "up"))
_KNOWN_GROUPS = tuple(frozenset(order) for order in _KNOWN_ORDERS)
_GENERIC_PARAMS = frozenset({"weight", "bias", "mean", "var", "num", "batches", "tracked", "scale"})
_CLOSE = 0.12  # a runner-up within this score of the choice is reported as a close call
_DECIDED = 0.2  # the evidence other than position must prefer the choice over every rival by this much


def _parent(key: str) -> str:
    return key.rsplit(".", 1)[0] if "." in key else ""


class FlatAligner:
    """Matches single tensors of one level: fused splits/merges, then modules, then tensors."""

    def __init__(
        self,
        src: list[Leaf],
        dst: list[Leaf],
        anchors: Sequence[tuple[int, int]] = (),
        n: int | None = None,
        m: int | None = None,
        ordered: bool = True,
    ) -> None:
        self.src, self.dst = src, dst
        self.ordered = ordered  # both sides in registration order: a decided neighbour's order is evidence
        self.run_anchors = list(anchors)
        self.n = n if n is not None else (max((leaf.order for leaf in src), default=-1) + 1)
        self.m = m if m is not None else (max((leaf.order for leaf in dst), default=-1) + 1)
        self.free_src = set(range(len(src)))
        self.free_dst = set(range(len(dst)))
        self.matches: list[Match] = []
        self.parent_votes: Counter = Counter()
        self.weights = rarity([leaf.key for leaf in src], [leaf.key for leaf in dst])
        self.warp = Warp(self.run_anchors, self.n, self.m)
        self._layouts: dict[tuple, list[tuple[int, int, Fit]] | None] = {}
        self.containers = ContainerMap((), ())
        self.ranks = (_ranks(src), _ranks(dst))

    def position(self, i: int, j: int) -> float:
        """How well source leaf `i` and target leaf `j` sit at corresponding places of their levels."""
        return self.warp.similarity(self.src[i].order, self.dst[j].order)

    def run(self) -> list[Match]:
        self._fused("split")
        self._fused("merge")
        self.warp = Warp(self._anchors() + self.run_anchors, self.n, self.m)
        self.containers = ContainerMap(self._sure_pairs(), [leaf.key for leaf in self.dst])
        self._modules()
        self._tensors()
        self._square_transposes()
        self._neighbours_decide()
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
            anchors.append(
                (self.src[self._src_index[match.sources[0]]].order, self.dst[self._dst_index[match.targets[0]]].order)
            )
        return anchors

    def _sure_pairs(self) -> list[tuple[str, str]]:
        """Key pairs sure enough to map containers with: same names, shapes only one free tensor on each side has, and
        fused splits and merges."""
        pairs = [(m.sources[0], m.targets[0]) for m in self.matches]
        by_key = {leaf.key: j for j, leaf in enumerate(self.dst) if j in self.free_dst}
        pairs += [(self.src[i].key, self.src[i].key) for i in self.free_src if self.src[i].key in by_key]
        classes: dict[tuple, tuple[list[int], list[int]]] = {}
        for i in self.free_src:
            meta = self.src[i].meta
            classes.setdefault((meta.shape, dtype_kind(meta.dtype)), ([], []))[0].append(i)
        for j in self.free_dst:
            meta = self.dst[j].meta
            key = (meta.shape, dtype_kind(meta.dtype))
            if key in classes:
                classes[key][1].append(j)
        for rows, cols in classes.values():
            if len(rows) == 1 and len(cols) == 1 and len(self.src[rows[0]].meta.shape) >= 2:
                pairs.append((self.src[rows[0]].key, self.dst[cols[0]].key))
        return pairs

    def _structure(self, s: str, t: str, ks: str, kt: str) -> float:
        """Evidence beyond name tokens: module kinds, the container tree, role words (q/k/v/o, gate/up) and the rank
        among numbered siblings (`conv1` of two is `layer.0` of two)."""
        return (
            0.8 * agreement(ks, kt)
            + 1.5 * self.containers.agreement(s, t)
            + 1.0 * role_agreement(s, t)
            + 0.8 * rank_agreement(self.ranks[0].get(s), self.ranks[1].get(t))
        )

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
                rank = evidence + (0.5 if known else 0.0) + (0.3 if _canonical(distinct) else 0.0)
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
        for rows, cols in classes.values():
            if not rows or not cols:
                continue
            if len(rows) > _CLASS_LIMIT or len(cols) > _CLASS_LIMIT:
                pairs = [(r, c, self._param_pairs(src_mods[r][1], dst_mods[c][1])) for r, c in zip(rows, cols)]
                self._accept_modules(src_mods, dst_mods, [(r, c, p, False, None) for r, c, p in pairs if p])
                continue
            scores: list[list[float | None]] = []
            evidence: list[list[float | None]] = []
            bijections: dict[tuple[int, int], list[tuple[int, int, Fit]]] = {}
            near = self._neighbours([src_mods[r][1][0] for r in rows], [dst_mods[c][1][0] for c in cols])
            for x, r in enumerate(rows):
                row: list[float | None] = []
                erow: list[float | None] = []
                evidence.append(erow)
                for y, c in enumerate(cols):
                    if near is not None and y not in near[x]:
                        row.append(None)
                        erow.append(None)
                        continue
                    pairs_ = self._param_pairs(src_mods[r][1], dst_mods[c][1])
                    unique = len(rows) == 1 and len(cols) == 1
                    lead = max(src_mods[r][1], key=lambda k: len(loose_shape(self.src[k].meta.shape)))
                    if pairs_ is None or not self._plausible(lead, dst_mods[c][1][0], unique):
                        row.append(None)
                        erow.append(None)
                        continue
                    bijections[r, c] = pairs_
                    total, part = self._module_score(src_mods[r], dst_mods[c], pairs_)
                    row.append(total)
                    erow.append(part)
                scores.append(row)
            chosen = assign(scores)
            accepted = []
            for ri, ci in chosen:
                r, c = rows[ri], cols[ci]
                alt, undecided = decide(scores, evidence, chosen, ri, ci)
                accepted.append(
                    (r, c, bijections[r, c], undecided, dst_mods[cols[alt]][0] if alt is not None else None)
                )
            self._accept_modules(src_mods, dst_mods, accepted)

    def _accept_modules(self, src_mods: list, dst_mods: list, accepted: list) -> None:
        for r, c, pairs, undecided, alternative in accepted:
            for si, ti, f in pairs:
                s, t = self.src[si].key, self.dst[ti].key
                alt = None
                if alternative is not None:
                    alt = f"{alternative}.{t.rsplit('.', 1)[-1]}" if alternative else t.rsplit(".", 1)[-1]
                f, note = _bare_matmul(f, kind_of(self.src[si].meta), kind_of(self.dst[ti].meta))
                match = Match(
                    (s,), (t,), "tensor", f, self._evidence(s, t), alternative=alt, note=note, undecided=bool(undecided)
                )
                self.matches.append(match)
                self.free_src.discard(si)
                self.free_dst.discard(ti)
            self.parent_votes[src_mods[r][0], dst_mods[c][0]] += 1

    def _param_pairs(self, a: list[int], b: list[int]) -> list[tuple[int, int, Fit]] | None:
        """A bijection between two modules' tensors in which every pair fits, preferring equal parameter names
        (worked out once per pair of module layouts: every BatchNorm of a level has the same one)."""
        if len(a) != len(b):
            return None
        layout = (
            tuple((self.src[i].key.rsplit(".", 1)[-1], self.src[i].meta) for i in a),
            tuple((self.dst[j].key.rsplit(".", 1)[-1], self.dst[j].meta) for j in b),
        )
        if layout not in self._layouts:
            self._layouts[layout] = _bijection(*layout)
        found = self._layouts[layout]
        if found is None:
            return None
        return [(a[x], b[y], f) for x, y, f in found]

    def _module_score(
        self, sm: tuple[str, list[int]], dm: tuple[str, list[int]], pairs: list[tuple[int, int, Fit]]
    ) -> tuple[float, float]:
        """(the score of pairing two modules, its part that is not position)."""
        na, nb = key_name(sm[0] + ".x"), key_name(dm[0] + ".x")
        name = token_similarity(na.path, nb.path, self.weights) + 0.3 * (
            token_similarity(na.leaf, nb.leaf) if (na.leaf or nb.leaf) else 1.0
        )
        ordinal = 0.0
        if na.leaf_ordinal is not None and nb.leaf_ordinal is not None:
            ordinal = 0.5 if na.leaf_ordinal == nb.leaf_ordinal else -0.5
        numbers = number_similarity(na.numbers, nb.numbers)
        position = self.position(sm[1][0], dm[1][0])
        params = sum(
            token_similarity(key_name(self.src[i].key).param, key_name(self.dst[j].key).param) for i, j, _ in pairs
        ) / len(pairs)
        quality = sum(f.quality for _, _, f in pairs) / len(pairs)
        same = 1.0 if sm[0] == dm[0] else 0.0
        i, j = pairs[0][0], pairs[0][1]
        structure = self._structure(
            self.src[i].key, self.dst[j].key, kind_of(self.src[i].meta), kind_of(self.dst[j].meta)
        )
        evidence = 1.0 * name + ordinal + 0.5 * numbers + 0.3 * params + same + structure
        return 1.0 + evidence + 0.8 * position + 1.0 * quality, evidence

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
            fits = {
                (i, j): fit(self.src[i].meta, self.dst[j].meta)
                if (near is None or y in near[x]) and self._plausible(i, j, len(rows) == len(cols) == 1)
                else None
                for x, i in enumerate(rows)
                for y, j in enumerate(cols)
            }
            pairs = [[self._scored(i, j, fits[i, j]) for j in cols] for i in rows]
            scores = [[p[0] if p is not None else None for p in row] for row in pairs]
            evidence = [[p[1] if p is not None else None for p in row] for row in pairs]
            chosen = assign(scores)
            for ri, ci in chosen:
                alt, undecided = decide(scores, evidence, chosen, ri, ci)
                self._accept_tensor(
                    rows[ri],
                    cols[ci],
                    fits[rows[ri], cols[ci]],  # type: ignore[arg-type]  # assign() pairs scored cells: a fit
                    self.dst[cols[alt]].key if alt is not None else None,
                    undecided,
                )

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
            chosen = {y for _, y in orders[max(0, at - _NEAR) : at + _NEAR]}
            name = self.src[i].key.rsplit(".", 2)[-2] if "." in self.src[i].key else self.src[i].key
            chosen.update(by_name.get(name, ())[:_NEAR])
            out.append(chosen)
        return out

    def _plausible(self, i: int, j: int, unique: bool = False) -> bool:
        """A lone tensor pair needs some evidence beyond its shape: a similar name, about the expected place, or
        a distinctive shape (two or more sizes other than 1) that only these two tensors have at this level
        (a new layer of the target is not filled with a leftover norm of the same width from elsewhere), or the same
        kind of module (a norm for a norm: whether it is the right one is then for the rival check to say)."""
        if unique and len(loose_shape(self.src[i].meta.shape)) >= 2:
            return True
        a, b = key_name(self.src[i].key), key_name(self.dst[j].key)
        named = (
            token_similarity(a.path, b.path, self.weights) >= 0.15
            or bool((_name_concepts(self.src[i].key) & _name_concepts(self.dst[j].key)) - _GENERIC_PARAMS)
            or bool(set(a.leaf) & set(b.leaf))
            or bool((set(a.param) & set(b.param)) - _GENERIC_PARAMS)
        )
        kinds = agreement(kind_of(self.src[i].meta), kind_of(self.dst[j].meta)) >= 1.0
        return named or kinds or self.position(i, j) >= 0.25

    def _scored(self, i: int, j: int, f: Fit | None) -> tuple[float, float] | None:
        """`_tensor_score` of a pair that fits, None for one that does not."""
        return self._tensor_score(i, j, f) if f is not None else None

    def _tensor_score(self, i: int, j: int, f: Fit) -> tuple[float, float]:
        """(the score of pairing two tensors, its part that is not position)."""
        s, t = self.src[i].key, self.dst[j].key
        na, nb = key_name(s), key_name(t)
        vote = 0.6 if self.parent_votes.get((_parent(s), _parent(t))) else 0.0
        evidence = (
            1.2 * similarity(s, t, self.weights)
            + 0.3 * number_similarity(na.numbers, nb.numbers)
            + vote
            + (1.0 if s == t else 0.0)
            + self._structure(s, t, kind_of(self.src[i].meta), kind_of(self.dst[j].meta))
        )
        return 1.0 + evidence + 0.8 * self.position(i, j) + 1.0 * f.quality, evidence

    def _accept_tensor(self, i: int, j: int, f: Fit, alternative: str | None, undecided: bool = False) -> None:
        s, t = self.src[i].key, self.dst[j].key
        f, note = _bare_matmul(f, kind_of(self.src[i].meta), kind_of(self.dst[j].meta))
        self.matches.append(
            Match(
                (s,), (t,), "tensor", f, self._evidence(s, t), alternative=alternative, note=note, undecided=undecided
            )
        )
        self.free_src.discard(i)
        self.free_dst.discard(j)

    # ---- order next to decided neighbours
    def _neighbours_decide(self) -> None:
        """An undecided pair whose module follows (or precedes) a module decided to follow (precede) the target's,
        while its rival's does not, is decided by that order: a BatchNorm after the convolution it normalizes. Only
        when both sides are in registration order (a name-sorted file has no such order)."""
        if not self.ordered or not any(m.undecided for m in self.matches):
            return
        steps = []
        for leaves in (self.src, self.dst):
            modules = list(dict.fromkeys(_parent(leaf.key) for leaf in sorted(leaves, key=lambda x: x.order)))
            steps.append(
                (dict(zip(modules[1:], modules[:-1])), dict(zip(modules[:-1], modules[1:])))  # previous, next
            )
        for _ in range(3):
            decided = {
                _parent(m.sources[0]): _parent(m.targets[0])
                for m in self.matches
                if m.kind == "tensor" and not m.undecided
            }
            changed = False
            for index, m in enumerate(self.matches):
                if not m.undecided or m.kind != "tensor" or not m.alternative:
                    continue
                ps, pt, pa = _parent(m.sources[0]), _parent(m.targets[0]), _parent(m.alternative)
                for src_step, dst_step in zip(steps[0], steps[1]):
                    ns, nt, na = src_step.get(ps), dst_step.get(pt), dst_step.get(pa)
                    if ns is not None and nt is not None and decided.get(ns) == nt and na != nt:
                        self.matches[index] = replace(m, undecided=False, evidence="order beside a decided module")
                        changed = True
                        break
            if not changed:
                return

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
                    match,
                    fit=Fit("permute", match.fit.shape, dims=(1, 0)),
                    note=f"square weight transposed like the {transposed} non-square 2-d weights of this level "
                    f"(shapes cannot tell; verify the outputs)",
                )


def _bare_matmul(f: Fit, source_kind: str, target_kind: str) -> tuple[Fit, str | None]:
    """A bare 2-d parameter used in a matmul (`x @ proj`: CLIP's `text_projection`, `visual.proj`) is stored
    (in, out); a Linear's weight is (out, in). Between the two, a square weight is transposed by that convention
    (shapes cannot tell), with a note; a non-square one already fits only transposed."""
    if not f.square or {source_kind, target_kind} != {"parameter", "linear"}:
        return f, None
    return Fit("permute", f.shape, dims=(1, 0)), (
        "a bare (in, out) parameter used as `x @ W` and a Linear weight (out, in): transposed by that convention "
        "(square, so shapes cannot tell)"
    )


def _ranks(leaves: list[Leaf]) -> dict[str, tuple[int, int]]:
    """Each key's rank among its numbered siblings, or among the layers of its head (`proj_in`, `layers.0`, ...,
    `proj_out`) where it has one."""
    items = [(leaf.key, kind_of(leaf.meta)) for leaf in leaves]
    return {**sibling_ranks(items), **head_ranks(items)}


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


def decide(
    scores: list[list[float | None]],
    evidence: list[list[float | None]],
    chosen: list[tuple[int, int]],
    ri: int,
    ci: int,
) -> tuple[int | None, bool]:
    """(the rival column to name, whether the choice is undecided) for the chosen pair (ri, ci).

    Every rival is tried: another column for this row (swapped with its owner when it has one), or another row left
    without a column for this column. The choice is decided when the evidence other than position prefers it over
    every rival by `_DECIDED`; otherwise the rival it prefers least is named and the pair is undecided. Without
    rivals the shapes decided it. A decided choice still names a rival whose total score came within `_CLOSE`.
    """
    owner = {c: r for r, c in chosen}
    assigned = set(owner.values())
    mine, mine_e = scores[ri][ci], evidence[ri][ci]
    if mine is None or mine_e is None:
        return None, False
    worst, worst_loss = None, float("inf")
    for c, value in enumerate(scores[ri]):
        if c == ci or value is None:
            continue
        other = owner.get(c)
        if other is None:
            loss = mine_e - (evidence[ri][c] or 0.0)
        else:
            back = evidence[other][ci]
            if back is None or scores[other][ci] is None:
                continue
            loss = (mine_e + (evidence[other][c] or 0.0)) - ((evidence[ri][c] or 0.0) + back)
        if loss < worst_loss:
            worst, worst_loss = c, loss
    for r in range(len(scores)):
        if r == ri or r in assigned or evidence[r][ci] is None:
            continue
        loss = mine_e - (evidence[r][ci] or 0.0)
        if loss < worst_loss:
            worst, worst_loss = ci, loss
    if worst is not None and worst_loss < _DECIDED:
        return (worst if worst != ci else None), True
    return _runner_up(scores, chosen, ri, ci), False


def _sibling_windows(leaves: list[Leaf]) -> list[tuple[int, tuple[int, ...]]]:
    """Runs of 2..4 consecutive sibling tensors that differ in one named module component (q/k/v, gate/up)."""
    families: dict[tuple, list[int]] = {}
    for index, leaf in enumerate(leaves):
        parts = leaf.key.split(".")
        for pos in range(len(parts) - 1):
            if parts[pos].isdigit():
                continue
            families.setdefault((pos, tuple(parts[:pos]), tuple(parts[pos + 1 :])), []).append(index)
    windows: list[tuple[int, tuple[int, ...]]] = []
    for (pos, _, _), members in families.items():
        if len(members) < 2:
            continue
        for size in range(2, min(4, len(members)) + 1):
            for start in range(len(members) - size + 1):
                windows.append((leaves[members[start]].order, tuple(members[start : start + size])))
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
            rest = {s[:dim] + s[dim + 1 :] for s in pieces}
            if len(rest) == 1:
                first = pieces[0]
                out.add(first[:dim] + (sum(s[dim] for s in pieces),) + first[dim + 1 :])
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


def _canonical(distinct: list[set[str]]) -> bool:
    """The parts come in their concatenation order (q, k, v; gate, up): CLIP registers k, v, q."""
    return any(len(order) == len(distinct) and all(c in d for c, d in zip(order, distinct)) for order in _KNOWN_ORDERS)


def _name_concepts(key: str) -> set[str]:
    name = key_name(key)
    return set(name.path) | set(name.leaf) | set(name.param)


def _bijection(a: tuple[tuple[str, Any], ...], b: tuple[tuple[str, Any], ...]) -> list[tuple[int, int, Fit]] | None:
    """Positions (x, y, fit) pairing the tensors `(name, meta)` of two modules, or None when no bijection fits."""
    fits = [[fit(ma, mb) for _, mb in b] for _, ma in a]
    if len(a) == 1:
        return [(0, 0, fits[0][0])] if fits[0][0] is not None else None
    scores = [
        [
            (
                1.0 + token_similarity(key_name(na).param, key_name(nb).param) + 0.1 * (1.0 - abs(x - y) / len(a))
                if fits[x][y] is not None
                else None
            )
            for y, (nb, _) in enumerate(b)
        ]
        for x, (na, _) in enumerate(a)
    ]
    chosen = assign(scores)
    if len(chosen) != len(a):
        return None
    return [(x, y, fits[x][y]) for x, y in chosen]  # type: ignore[misc]  # assign() pairs scored cells: fits


def _score_or_none(score: Callable[[int, int, Fit], float], i: int, j: int, f: Fit | None) -> float | None:
    """`score(i, j, f)` for a pair that fits; None (not a candidate) for one that does not."""
    return None if f is None else score(i, j, f)
