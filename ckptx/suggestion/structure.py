"""Structural evidence: the module tree (which numbered container a tensor lives in), role words (q/k/v/o,
gate/up) and sibling rank (`conv1` before `conv2`, `layer.0` before `layer.1`).

Containers are the numbered prefixes above a tensor's module (`layer2`, `layer2.0` for `layer2.0.conv1.weight`).
Pairs sure enough to lean on (same names, shapes only one tensor on each side has) map source containers to target
containers (`layer2.0` -> `stages.1.layers.0`); a container no such pair reaches takes its sibling's mapping shifted
by the difference of their numbers. A candidate pair then agrees with the tree (its source container maps to a
container holding the target tensor) or contradicts it: blocks are not mixed up.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from functools import lru_cache

from ckptx.suggestion.names import key_name, words_of

__all__ = ["ContainerMap", "containers", "head_ranks", "rank_agreement", "role_agreement", "sibling_ranks"]

_NUMBER = re.compile(r"\d+")
_ROLE_GROUPS = (frozenset({"q", "k", "v", "o"}), frozenset({"gate", "up"}))


@lru_cache(maxsize=262144)
def containers(key: str) -> tuple[str, ...]:
    """The numbered prefixes above a key's module, outermost first: `layer2.0.conv1.weight` -> (`layer2`,
    `layer2.0`)."""
    parts = key.split(".")[:-2]
    return tuple(".".join(parts[: i + 1]) for i, p in enumerate(parts) if _NUMBER.search(p))


class ContainerMap:
    """Source container -> target container, from sure pairs, extended to siblings by index arithmetic."""

    def __init__(self, pairs: Iterable[tuple[str, str]], target_keys: Sequence[str]) -> None:
        found: dict[str, set[str] | None] = {}
        for s, t in pairs:
            targets = set(containers(t))
            for cs in containers(s):
                have = found.get(cs, None) if cs in found else targets
                found[cs] = (have & targets) if have is not None else None
        self.map: dict[str, str] = {}
        for cs, common in found.items():
            if common:
                self.map[cs] = max(common, key=len)
        target_containers = {c for t in target_keys for c in containers(t)}
        self._extend(target_containers)

    def _extend(self, target_containers: set[str]) -> None:
        """Containers no sure pair reached take a sibling's mapping shifted by their numbers' difference."""
        by_template: dict[tuple[str, str], list[tuple[int, str]]] = {}
        for cs in self.map:
            head, _, last = cs.rpartition(".")
            numbers = _NUMBER.findall(last)
            if len(numbers) == 1:
                by_template.setdefault((head, _NUMBER.sub("#", last)), []).append((int(numbers[0]), cs))
        self._siblings = by_template
        self._targets = target_containers

    def lookup(self, cs: str) -> str | None:
        """The target container of source container `cs`, if known or inferable from a sibling."""
        if cs in self.map:
            return self.map[cs]
        head, _, last = cs.rpartition(".")
        numbers = _NUMBER.findall(last)
        if len(numbers) != 1:
            return None
        known = self._siblings.get((head, _NUMBER.sub("#", last)))
        if not known:
            return None
        n = int(numbers[0])
        for m, sibling in sorted(known, key=lambda x: abs(x[0] - n)):
            target = self.map[sibling]
            t_head, _, t_last = target.rpartition(".")
            t_numbers = _NUMBER.findall(t_last)
            if len(t_numbers) != 1:
                continue
            shifted = int(t_numbers[0]) + n - m
            if shifted < 0:
                continue
            candidate = (t_head + "." if t_head else "") + _NUMBER.sub(str(shifted), t_last, count=1)
            if candidate in self._targets:
                self.map[cs] = candidate
                return candidate
            return None
        return None

    def agreement(self, s: str, t: str) -> float:
        """+1 when the innermost mapped container of `s` holds `t`, -1 when it does not, 0 when none is mapped."""
        if not self.map:
            return 0.0
        held = containers(t)
        for cs in reversed(containers(s)):
            target = self.lookup(cs)
            if target is not None:
                return 1.0 if target in held else -1.0
        return 0.0


def _roles(key: str) -> tuple[frozenset[str], ...]:
    name = key_name(key)
    words = set(name.leaf) | set(name.param) | set(name.path)
    return tuple(group & words for group in _ROLE_GROUPS)


def role_agreement(s: str, t: str) -> float:
    """-1 when the two keys name different roles of one group (`q_bias` and `value.bias`), +1 when the same one,
    0 when either names none."""
    score = 0.0
    for a, b in zip(_roles(s), _roles(t)):
        if not a or not b:
            continue
        if not a & b:
            return -1.0
        if a == b:
            score = 1.0
    return score


def sibling_ranks(items: Iterable[tuple[str, str]]) -> dict[str, tuple[int, int]]:
    """key -> (rank, count) among its siblings: tensors of the same kind and parameter name whose module names differ
    only in their last number (`conv1`, `conv2`; `layer.0`, `layer.1`). `items` are (key, kind)."""
    groups: dict[tuple[str, tuple[str, ...], str, str], list[tuple[int, str]]] = {}
    for key, kind in items:
        module, _, param = key.rpartition(".")
        numbers = _NUMBER.findall(module)
        if numbers:
            group = (_NUMBER.sub("#", module), tuple(numbers[:-1]), param, kind)
            groups.setdefault(group, []).append((int(numbers[-1]), key))
    out: dict[str, tuple[int, int]] = {}
    for members in groups.values():
        if len(members) >= 2:
            for rank, (_, key) in enumerate(sorted(members)):
                out[key] = (rank, len(members))
    return out


_FIRST = frozenset({"in", "input", "first"})
_LAST = frozenset({"out", "output", "last", "final"})


def head_ranks(items: Iterable[tuple[str, str]]) -> dict[str, tuple[int, int]]:
    """key -> (rank, count) among the layers of one head written as `proj_in`, `layers.0`, ..., `proj_out` (or
    `layers.0`, `layers.1`, `layers.2` on the other side): the modules of one kind and parameter name directly under
    one parent (a numbered list counts as directly under it), ranked first-words first (`in`, `input`, `first`),
    then by their numbers, last-words last (`out`, `output`, `last`, `final`). Only groups whose every member is
    numbered or says first/last, and one at least says it (a plain numbered list is `sibling_ranks`' business)."""
    groups: dict[tuple[str, str, str], list[tuple[int, tuple[int, ...], str]]] = {}
    for key, kind in items:
        parts = key.split(".")
        param, module = parts[-1], parts[:-1]
        if not module:
            continue
        if module[-1].isdigit() and len(module) >= 2:
            parent, tail = module[:-2], module[-2:]
        else:
            parent, tail = module[:-1], module[-1:]
        words = set(words_of(tail[-1])) if not tail[-1].isdigit() else set()
        numbers = tuple(int(n) for n in _NUMBER.findall(".".join(tail)))
        if words & _FIRST:
            place = 0
        elif words & _LAST:
            place = 2
        elif numbers:
            place = 1
        else:
            place = -1
        groups.setdefault((".".join(parent), param, kind), []).append((place, numbers, key))
    out: dict[str, tuple[int, int]] = {}
    for members in groups.values():
        places = [p for p, _, _ in members]
        if len(members) < 2 or -1 in places or not {0, 2} & set(places):
            continue
        for rank, (_, _, key) in enumerate(sorted(members)):
            out[key] = (rank, len(members))
    return out


def rank_agreement(a: tuple[int, int] | None, b: tuple[int, int] | None) -> float:
    """+1 when two keys hold the same rank among equally many siblings (`conv1` of two and `layer.0` of two), -1 for
    different ranks, 0 when either has no numbered siblings or their counts differ."""
    if a is None or b is None or a[1] != b[1]:
        return 0.0
    return 1.0 if a[0] == b[0] else -1.0
