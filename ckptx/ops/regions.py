"""Byte kernels of the ops that take or join regions of one dimension (narrow, select and slice of `split` and
`slice`; cat and stack of `merge`): without torch, from byte ranges of the inputs' raw bytes.

A tensor of shape `(*outer, size, *inner)` along dimension `dim` is `prod(outer)` slabs of `size * prod(inner)`
elements, each slab contiguous. Taking a region of `dim` takes the same part of every slab; joining along `dim`
puts one slab of each input after another. So the pieces read whole slabs (grouped to about PIECE_BYTES) and numpy
slices or concatenates them; when there is one slab (dimension 0, or leading dimensions of size 1) a contiguous
region is read as it is, nothing more.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from ckptx._lazy import lazy_module
from ckptx.dtypes import TensorMeta
from ckptx.planning.expr import Piece, TakeInput

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
else:
    np = lazy_module("numpy")

__all__ = ["PIECE_BYTES", "join_pieces", "region_pieces"]

PIECE_BYTES = 4 << 20  # bytes a piece reads, at least one whole slab


def region_pieces(meta: TensorMeta, dim: int, region: slice) -> Iterator[Piece] | None:
    """The pieces of `tensor[..., region, ...]` on dimension `dim` (a narrow or select is a region of step 1):
    the bytes `tensor.narrow/select/slice(...).contiguous()` holds."""
    if not meta.numel or not meta.shape:
        return None
    dim %= len(meta.shape)
    shape = meta.shape
    itemsize = meta.nbytes // meta.numel
    size, row = shape[dim], math.prod(shape[dim + 1 :]) * itemsize  # row: the bytes of one index of `dim`
    outer = math.prod(shape[:dim])
    start, stop, step = region.indices(size)
    if outer == 1 and step == 1:  # one slab: the region is one contiguous run of bytes
        return _chunks(0, start * row, max(start, stop) * row)
    slab = size * row
    per = max(1, PIECE_BYTES // max(1, slab))

    def convert(data: Sequence[bytes]) -> bytes:
        block = np.frombuffer(data[0], dtype=np.uint8).reshape(-1, size, row)
        return np.ascontiguousarray(block[:, start:stop:step]).tobytes()

    return (Piece(((i * slab, min(outer, i + per) * slab),), convert) for i in range(0, outer, per))


def join_pieces(metas: Sequence[TensorMeta], dim: int, stack: bool) -> Iterator[Piece] | None:
    """The pieces of `torch.cat(inputs, dim)` (or `torch.stack`): for each slab index, each input's slab in
    turn."""
    if not metas or any(not m.numel for m in metas):
        return None
    ndim = len(metas[0].shape)
    dim %= ndim + 1 if stack else max(1, ndim)
    outer = math.prod(metas[0].shape[:dim])
    slabs = [m.nbytes // outer for m in metas]  # each input's bytes per slab index
    if outer == 1:
        return (piece for i, m in enumerate(metas) for piece in _chunks(i, 0, m.nbytes, len(metas)))
    per = max(1, PIECE_BYTES // max(1, sum(slabs)))

    def convert(data: Sequence[bytes]) -> bytes:
        parts = [np.frombuffer(d, dtype=np.uint8).reshape(-1, s) for d, s in zip(data, slabs)]
        return np.concatenate(parts, axis=1).tobytes()

    def ranges(i: int) -> tuple[tuple[int, int], ...]:
        return tuple((i * s, min(outer, i + per) * s) for s in slabs)

    return (Piece(ranges(i), convert) for i in range(0, outer, per))


def _chunks(which: int, start: int, stop: int, inputs: int = 1) -> Iterator[Piece]:
    """Bytes `start:stop` of input `which` as they are, PIECE_BYTES at a time (the other inputs read nothing)."""
    take = TakeInput(which)
    for at in range(start, stop, PIECE_BYTES):
        end = min(stop, at + PIECE_BYTES)
        yield Piece(tuple((at, end) if i == which else (0, 0) for i in range(inputs)), take)
