"""Order and number evidence: where a tensor is expected on the other side, and how alike two keys' numbers are."""

from __future__ import annotations

import bisect
from collections.abc import Sequence

__all__ = ["Warp", "increasing", "number_similarity", "position_similarity"]


def position_similarity(i: int, n: int, j: int, m: int) -> float:
    """1 for the same relative position, falling off with the distance in items (scaled to the source's count)."""
    if n <= 1 or m <= 1:
        return 1.0
    expected = j * (n - 1) / (m - 1)
    return 1.0 / (1.0 + abs(i - expected) / 2.0)


class Warp:
    """Where a source position is expected on the target side: piecewise linear between anchor pairs that agree
    in order (a longest increasing subsequence of them), so a block moved or inserted elsewhere shifts nothing."""

    def __init__(self, anchors: list[tuple[int, int]], n: int, m: int) -> None:
        chain = increasing(sorted(set(anchors)))
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


def increasing(pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
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


def number_similarity(a: Sequence[int], b: Sequence[int]) -> float:
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
