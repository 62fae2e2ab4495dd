"""Steps that change a tensor's layout: reshape, permute; each kind's arguments, builder, schema fragment, tensor op,
inverse and planner together."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckptx._lazy import lazy_module
from ckptx.dtypes import TensorMeta
from ckptx.errors import OpShapeError, Problem
from ckptx.ops.common import apply_to_matching, same_bytes
from ckptx.ops.registry import step
from ckptx.planning.context import PlanContext, StepOutcome
from ckptx.planning.entry import PlanEntry
from ckptx.planning.expr import Piece, tensor_op
from ckptx.rules.inverse import all_matched_changed, changed_metas, exact_keys
from ckptx.rules.kinds import Doc, StepTrace, object_schema
from ckptx.rules.steps import Collector, Pattern, Step

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch
else:
    np = lazy_module("numpy")
    torch = lazy_module("torch")


# ---- reshape ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reshape:
    """Reshape matching tensors; `shape=None` means the target model's shape for that key."""

    match: Pattern
    shape: tuple[int, ...] | None


def _build_reshape(value: Any, c: Collector) -> Reshape:
    shape = value["shape"]
    if shape != "target" and list(shape).count(-1) > 1:
        c.problems.append(Problem(c.at("shape"), f"at most one -1 is allowed in a shape, got {shape}"))
    return Reshape(c.regex(value["match"], "match"), None if shape == "target" else tuple(shape))


_RESHAPE_SCHEMA = object_schema(
    required=["match", "shape"],
    properties={
        "match": {"$ref": "#/$defs/regex"},
        "shape": {"anyOf": [{"$ref": "#/$defs/shape"}, {"const": "target"}]},
    },
)


def _trailing_ones(changed: list[tuple[str, Any, Any]]) -> int:
    """k when every original shape is its new shape with k trailing 1s (-k: with k trailing 1s removed), else 0."""
    counts = set()
    for _, old, new in changed:
        short, long_ = sorted((tuple(old.shape), tuple(new.shape)), key=len)
        pad = long_[len(short) :]
        if long_[: len(short)] != short or not pad or set(pad) != {1}:
            return 0
        counts.add(len(pad) if len(old.shape) > len(new.shape) else -len(pad))
    return counts.pop() if len(counts) == 1 else 0


def _one_free_dim(shapes: set[tuple[int, ...]]) -> list[int] | None:
    """Shapes of one rank that differ in exactly one dimension -> that shape with -1 there."""
    if len({len(s) for s in shapes}) != 1:
        return None
    columns = list(zip(*shapes))
    free = [i for i, column in enumerate(columns) if len(set(column)) > 1]
    if len(free) != 1:
        return None
    return [-1 if i == free[0] else column[0] for i, column in enumerate(columns)]


def _invert_reshape(args: Reshape, step: Step, trace: StepTrace | None) -> list[Doc]:
    changed = changed_metas(trace, "shapes")
    originals = {tuple(old.shape) for _, old, _ in changed}
    general = list(next(iter(originals))) if len(originals) == 1 else _one_free_dim(originals)
    if all_matched_changed(args.match, trace, changed):
        if general is not None:
            return [{"reshape": {"match": args.match.pattern, "shape": general}}]
        padding = _trailing_ones(changed)
        if padding:
            op = "unsqueeze" if padding > 0 else "squeeze"
            return [{op: {"match": args.match.pattern, "dim": -1}} for _ in range(abs(padding))]
    groups: dict[tuple[int, ...], list[str]] = {}
    for key, old, _ in changed:
        groups.setdefault(tuple(old.shape), []).append(key)
    return [{"reshape": {"match": exact_keys(keys), "shape": list(shape)}} for shape, keys in groups.items()]


def resolve_shape(shape: Sequence[int], numel: int, source: Sequence[int]) -> tuple[int, ...]:
    """Fill in a -1 and check the element count, like `torch.reshape`."""
    known = math.prod(d for d in shape if d != -1)
    if -1 in shape:
        if known == 0 or numel % known:
            raise OpShapeError(f"cannot reshape {list(source)} ({numel} elements) to {list(shape)}")
        return tuple(numel // known if d == -1 else d for d in shape)
    if known != numel:
        raise OpShapeError(f"cannot reshape {list(source)} ({numel} elements) to {list(shape)} ({known} elements)")
    return tuple(shape)


def _infer_reshape(params: Mapping[str, Any], inputs: Sequence[TensorMeta]) -> TensorMeta:
    (meta,) = inputs
    return TensorMeta(resolve_shape(params["shape"], meta.numel, meta.shape), meta.dtype)


@tensor_op("reshape", _infer_reshape, elementwise=same_bytes)
def reshape(params: Mapping[str, Any], tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """`tensor.reshape(shape)`."""
    return tensors[0].reshape(params["shape"])


@step("reshape", build=_build_reshape, schema=_RESHAPE_SCHEMA, invert=_invert_reshape)
def plan_reshape(args: Reshape, step: Step, entries: list[PlanEntry], ctx: PlanContext) -> StepOutcome:
    """Reshape matching tensors to a fixed shape or to the target's shape for that key."""

    absent: list[str] = []

    def build(entry: PlanEntry) -> dict[str, Any] | None:
        if args.shape is not None:
            return {"shape": args.shape}
        if ctx.target is None:
            raise OpShapeError("`shape: target` needs a target; give one in the recipe or with --target")
        if entry.key not in ctx.target:
            absent.append(entry.key)
            return None
        return {"shape": ctx.target[entry.key].shape}

    outcome = apply_to_matching(step, entries, ctx, args.match, build)
    if absent:
        ctx.warnings.append(
            Problem(
                step.where,
                f"`shape: target`: {len(absent)} matching key(s) are not in the target "
                f"(e.g. '{absent[0]}'); left unchanged, see the validation report",
            )
        )
    return outcome


# ---- permute ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Permute:
    """Permute the dimensions of matching tensors."""

    match: Pattern
    dims: tuple[int, ...]


def _build_permute(value: Any, c: Collector) -> Permute:
    dims = tuple(value["dims"])
    if sorted(dims) != list(range(len(dims))):
        c.problems.append(Problem(c.at("dims"), f"{list(dims)} is not a permutation of 0..{len(dims) - 1}"))
    return Permute(c.regex(value["match"], "match"), dims)


_PERMUTE_SCHEMA = object_schema(
    required=["match", "dims"],
    properties={
        "match": {"$ref": "#/$defs/regex"},
        "dims": {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
    },
)


def _invert_permute(args: Permute, step: Step, trace: StepTrace | None) -> list[Doc]:
    inverse = [args.dims.index(d) for d in range(len(args.dims))]
    return [{"permute": {"match": args.match.pattern, "dims": inverse}}]


def _infer_permute(params: Mapping[str, Any], inputs: Sequence[TensorMeta]) -> TensorMeta:
    (meta,) = inputs
    dims = params["dims"]
    if len(dims) != len(meta.shape):
        raise OpShapeError(f"permute dims {list(dims)} need a {len(dims)}-d tensor, got shape {list(meta.shape)}")
    return TensorMeta(tuple(meta.shape[d] for d in dims), meta.dtype)


PERMUTE_PIECE_BYTES = 4 << 20  # input bytes a piece of a permutation reads, at least (whole leading slabs)
_UINT = {1: "<u1", 2: "<u2", 4: "<u4", 8: "<u8"}


def permute_pieces(params: Mapping[str, Any], metas: Sequence[TensorMeta]) -> Iterator[Piece] | None:
    """The permutation as a byte kernel, without torch: the leading dimensions it leaves in place are walked in
    slabs of about PERMUTE_PIECE_BYTES, each slab's elements reordered with numpy (moved as whole elements, so
    the bytes are `tensor.permute(dims).contiguous()`'s); a permutation that moves dimension 0 is one piece, the
    whole tensor (what torch holds too)."""
    (meta,) = metas
    dims = tuple(params["dims"])
    if not meta.numel or len(dims) != len(meta.shape):
        return None
    kept = 0
    while kept < len(dims) and dims[kept] == kept:
        kept += 1
    outer = math.prod(meta.shape[:kept])
    inner = tuple(meta.shape[kept:])
    order = tuple(d - kept for d in dims[kept:])
    itemsize = meta.nbytes // meta.numel
    slab = meta.nbytes // outer
    per = max(1, PERMUTE_PIECE_BYTES // max(1, slab))

    swap = _group_swap(order)
    rows, cols = math.prod(inner[:swap]), math.prod(inner[swap:])

    def convert(data: Sequence[bytes]) -> bytes:
        if itemsize not in _UINT:
            block = np.frombuffer(data[0], dtype=np.uint8).reshape(-1, *inner, itemsize)
            return block.transpose(0, *(d + 1 for d in order), len(inner) + 1).tobytes()
        block = np.frombuffer(data[0], dtype=_UINT[itemsize]).reshape(-1, *inner)
        if swap and min(rows, cols) >= _TILE * 2:
            return _tiled_transpose(block.reshape(-1, rows, cols))
        return block.transpose(0, *(d + 1 for d in order)).tobytes()

    return (Piece(((i * slab, min(outer, i + per) * slab),), convert) for i in range(0, outer, per))


_TILE = 128  # elements per side of the tiles a large transpose is copied in (3x faster than numpy's own copy)


def _group_swap(order: Sequence[int]) -> int:
    """k when `order` moves the last axes from k on before the first k (`(k, ..., n-1, 0, ..., k-1)`): the
    permutation is then the transpose of a [prod(first k), prod(rest)] matrix. 0 for any other permutation."""
    n = len(order)
    for k in range(1, n):
        if tuple(order) == (*range(k, n), *range(k)):
            return k
    return 0


def _tiled_transpose(block: Any) -> bytes:
    """The transposes of `block`'s [rows, cols] matrices, copied in _TILE x _TILE tiles (each tile's reads and
    writes stay in the cache, where a whole-matrix copy of the transposed view strides through memory)."""
    count, rows, cols = block.shape
    out = np.empty((count, cols, rows), dtype=block.dtype)
    for n in range(count):
        for i in range(0, rows, _TILE):
            for j in range(0, cols, _TILE):
                out[n, j : j + _TILE, i : i + _TILE] = block[n, i : i + _TILE, j : j + _TILE].T
    return out.tobytes()


@tensor_op("permute", _infer_permute, blockwise=permute_pieces)
def permute(params: Mapping[str, Any], tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """`tensor.permute(dims)` (made contiguous when written)."""
    return tensors[0].permute(params["dims"])


@step("permute", build=_build_permute, schema=_PERMUTE_SCHEMA, invert=_invert_permute)
def plan_permute(args: Permute, step: Step, entries: list[PlanEntry], ctx: PlanContext) -> StepOutcome:
    """Permute the dimensions of matching tensors."""
    return apply_to_matching(step, entries, ctx, args.match, lambda entry: {"dims": args.dims})
