"""Shape evidence: whether a source tensor fits a target tensor as is, or through one op (reshape, permute, split,
merge)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ckptx.dtypes import TensorMeta

__all__ = ["Fit", "JoinFit", "dtype_kind", "fit", "join_fit", "loose_shape"]


def dtype_kind(dtype: str) -> str:
    """`float`, `int`, `bool` or `complex`: tensors of different kinds never correspond."""
    if dtype == "bool":
        return "bool"
    if dtype.startswith("complex"):
        return "complex"
    if dtype.startswith(("int", "uint")):
        return "int"
    return "float"


def loose_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """The sizes other than 1, sorted: equal for shapes that a reshape of 1-dims or a permute can turn into each
    other."""
    return tuple(sorted(d for d in shape if d != 1))


@dataclass(frozen=True)
class Fit:
    """How a source tensor becomes a target tensor: `exact`, `reshape` (to `shape`) or `permute` (by `dims`).

    `square` marks a 2-d square exact fit that a transpose would fit too (a Conv1D-versus-Linear question
    that shapes cannot answer).
    """

    kind: str
    shape: tuple[int, ...] = ()
    dims: tuple[int, ...] = ()
    square: bool = False

    @property
    def quality(self) -> float:
        """1.0 for an exact fit, less for a reshape, nothing for a permute (a layout change is the last resort)."""
        return {"exact": 1.0, "reshape": 0.6}.get(self.kind, 0.0)


def fit(src: TensorMeta, dst: TensorMeta) -> Fit | None:
    """The simplest op turning `src` into `dst`'s shape, or None when no single op does."""
    if dtype_kind(src.dtype) != dtype_kind(dst.dtype):
        return None
    a, b = src.shape, dst.shape
    if a == b:
        return Fit("exact", b, square=len(a) == 2 and a[0] == a[1] and a[0] > 1)
    if math.prod(a) != math.prod(b):
        return None
    if tuple(d for d in a if d != 1) == tuple(d for d in b if d != 1):
        return Fit("reshape", b)
    if len(a) == len(b) and sorted(a) == sorted(b):
        return Fit("permute", b, dims=_permutation(a, b))
    return None


def _permutation(a: Sequence[int], b: Sequence[int]) -> tuple[int, ...]:
    """dims with `b[i] == a[dims[i]]`, equal sizes kept in their order (HWIO -> OIHW gives (3, 2, 0, 1))."""
    used: set[int] = set()
    dims = []
    for size in b:
        j = next(j for j, s in enumerate(a) if s == size and j not in used)
        used.add(j)
        dims.append(j)
    return tuple(dims)


@dataclass(frozen=True)
class JoinFit:
    """One tensor split into (or merged from) pieces along `dim`, each piece transposed when `transpose`."""

    dim: int
    sizes: tuple[int, ...]
    transpose: bool = False


def join_fit(whole: TensorMeta, pieces: Sequence[TensorMeta]) -> JoinFit | None:
    """How `whole` is the concatenation of `pieces` (each possibly transposed, 2-d only), or None.

    For a split, `whole` is the source and the pieces the targets; for a merge the other way round. With a
    transpose, `dim` and `sizes` describe the whole tensor's layout (the pieces are transposed after a split,
    the merged tensor after a merge).
    """
    if len(pieces) < 2 or any(dtype_kind(p.dtype) != dtype_kind(whole.dtype) for p in pieces):
        return None
    for transpose in (False, True):
        if transpose and (len(whole.shape) != 2 or any(len(p.shape) != 2 for p in pieces)):
            continue
        shapes = [tuple(reversed(p.shape)) if transpose else p.shape for p in pieces]
        if any(len(s) != len(whole.shape) for s in shapes):
            continue
        for dim in range(len(whole.shape)):
            rest = [s[:dim] + s[dim + 1 :] for s in shapes]
            if any(r != whole.shape[:dim] + whole.shape[dim + 1 :] for r in rest):
                continue
            if sum(s[dim] for s in shapes) == whole.shape[dim]:
                return JoinFit(dim, tuple(s[dim] for s in shapes), transpose)
    return None
