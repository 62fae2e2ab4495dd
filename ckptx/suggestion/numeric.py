"""Numerical evidence (`--verify-with`): what metadata left undecided is decided by running the source model and the
converted target on one seeded probe input.

The recipe as suggested is converted and verified first: when the outputs agree, every undecided row is proven. When
they differ, each undecided row is tried with its rival (the two targets of equal shape swapped, for every block of
that row at once), one row after the other; a swap is kept when it lowers the outputs' difference, and the search
stops when they agree. Rows are decided only when the outputs finally agree; otherwise they stay undecided.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ckptx.suggestion.match import Match

__all__ = ["Decision", "decide_numerically"]

_DIGITS = re.compile(r"\d+")
_EVIDENCE = "the outputs of the source model (--verify-with)"


@dataclass(frozen=True)
class Decision:
    """The matches after the numerical search (the same list when nothing changed), the last verification, a note."""

    matches: list[Match]
    verification: Any
    note: str


def decide_numerically(matches: list[Match], verification: Any, attempt: Callable[[list[Match]], Any]) -> Decision:
    """Decide the undecided rows of `matches` by the outputs; `verification` is the suggested recipe's (with `ok` and
    `max_abs_diff`), `attempt(candidate_matches)` converts and verifies another choice (None when it cannot run)."""
    undecided = [i for i, m in enumerate(matches) if m.undecided]
    if verification.ok:
        return Decision(
            _settled(matches),
            verification,
            f"{len(undecided)} undecided pair(s) proven by --verify-with: the outputs agree "
            f"(max abs diff {verification.max_abs_diff:.3g})",
        )
    best, current, swapped = verification, list(matches), []
    for pattern, pairs in _swap_groups(matches, undecided).items():
        candidate = _swap(current, pairs)
        result = attempt(candidate)
        if result is None:
            continue
        if result.ok or result.max_abs_diff < best.max_abs_diff * 0.999:
            current, best = candidate, result
            swapped.append(pattern)
            if result.ok:
                break
    if best.ok:
        return Decision(
            _settled(current),
            best,
            f"{len(undecided)} undecided pair(s) decided by --verify-with: {len(swapped)} row(s) swapped with their "
            f"rival ({'; '.join(swapped[:3])}), then the outputs agree (max abs diff {best.max_abs_diff:.3g})",
        )
    return Decision(
        matches,
        verification,
        f"--verify-with could not decide the undecided rows: the outputs differ (max abs diff "
        f"{verification.max_abs_diff:.3g}) with every choice tried",
    )


def _settled(matches: Sequence[Match]) -> list[Match]:
    return [replace(m, undecided=False, evidence=_EVIDENCE) if m.undecided else m for m in matches]


def _swap_groups(matches: Sequence[Match], undecided: Sequence[int]) -> dict[str, list[tuple[int, int]]]:
    """Undecided pairs and the match holding their rival target, grouped by row (numbers abstracted)."""
    by_target = {m.targets[0]: i for i, m in enumerate(matches) if m.kind == "tensor"}
    groups: dict[str, list[tuple[int, int]]] = {}
    used: set[int] = set()
    for i in undecided:
        m = matches[i]
        j = by_target.get(m.alternative or "")
        if j is None or i in used or j in used:
            continue
        used.update((i, j))
        pattern = _DIGITS.sub("#", f"{m.sources[0]} -> {m.alternative}")
        groups.setdefault(pattern, []).append((i, j))
    return groups


def _swap(matches: Sequence[Match], pairs: Sequence[tuple[int, int]]) -> list[Match]:
    out = list(matches)
    for i, j in pairs:
        a, b = out[i], out[j]
        out[i] = replace(a, targets=b.targets, alternative=a.targets[0])
        out[j] = replace(b, targets=a.targets, alternative=b.targets[0])
    return out
