"""`tiles_exactly` (the DCP chunk-cover check, linear in the chunks) agrees with counting every element."""

from __future__ import annotations

import itertools
import random

import pytest

from ckptx.io.read.dcp_metadata import DcpChunk, StorageItem, tiles_exactly

ITEM = StorageItem("__0_0.distcp", 0, 4)


def _by_counting(shape: tuple[int, ...], chunks: list[DcpChunk]) -> bool:
    """Every element of `shape` covered exactly once, counted element by element."""
    covered: dict[tuple[int, ...], int] = {}
    for chunk in chunks:
        for index in itertools.product(*(range(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes))):
            covered[index] = covered.get(index, 0) + 1
    return all(covered.get(index, 0) == 1 for index in itertools.product(*map(range, shape))) and all(
        n == 1 for n in covered.values()
    )


def _random_chunks(rng: random.Random, shape: tuple[int, ...]) -> list[DcpChunk]:
    """A grid split of `shape`, then maybe one chunk moved, grown, dropped or repeated."""
    cuts = [sorted({0, dim, *rng.sample(range(1, dim), min(dim - 1, rng.randint(0, 2)))}) for dim in shape]
    chunks = [
        DcpChunk(tuple(lo for lo, _ in cell), tuple(hi - lo for lo, hi in cell), ITEM)
        for cell in itertools.product(*(list(zip(c, c[1:])) for c in cuts))
    ]
    change = rng.randrange(5)
    victim = rng.randrange(len(chunks))
    if change == 1:
        chunks.pop(victim)
    elif change == 2:
        chunks.append(chunks[victim])
    elif change == 3:
        c = chunks[victim]
        d = rng.randrange(len(shape))
        offsets = list(c.offsets)
        offsets[d] = max(0, offsets[d] - 1)
        chunks[victim] = DcpChunk(tuple(offsets), c.sizes, ITEM)
    elif change == 4:
        c = chunks[victim]
        d = rng.randrange(len(shape))
        sizes = list(c.sizes)
        sizes[d] = min(shape[d] - c.offsets[d], sizes[d] + 1)
        chunks[victim] = DcpChunk(c.offsets, tuple(sizes), ITEM)
    return chunks


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_tiles_exactly_agrees_with_counting_elements(rank: int) -> None:
    rng = random.Random(rank)
    for _ in range(300):
        shape = tuple(rng.randint(1, 5) for _ in range(rank))
        chunks = _random_chunks(rng, shape)
        assert tiles_exactly(shape, chunks) == _by_counting(shape, chunks), (shape, chunks)


def test_a_grid_of_160000_chunks_is_checked_in_linear_time() -> None:
    chunks = [DcpChunk((i, j), (1, 1), ITEM) for i in range(400) for j in range(400)]
    assert tiles_exactly((400, 400), chunks)
    assert not tiles_exactly((400, 400), [*chunks[:-1], DcpChunk((399, 398), (1, 2), ITEM)])
