"""What several step kinds share: applying an op to matching entries, filling key templates, dimensions and target
shapes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ckptx._lazy import lazy_module
from ckptx.dtypes import TensorMeta
from ckptx.errors import KeyTemplateError, OpShapeError, Problem
from ckptx.planning.context import PlanContext, StepOutcome
from ckptx.planning.entry import PlanEntry
from ckptx.planning.expr import Converter, node, unchanged
from ckptx.rules.steps import Step

if TYPE_CHECKING:  # pragma: no cover
    import torch
else:
    torch = lazy_module("torch")


def apply_to_matching(step: Step, entries: list[PlanEntry], ctx: PlanContext, pattern, build) -> StepOutcome:
    """Run `build(entry) -> params` for each entry whose key matches, wrapping its expression in the op."""
    out, hits = [], 0
    for entry in entries:
        if not pattern.search(entry.key):
            out.append(entry)
            continue
        hits += 1
        try:
            params = build(entry)
            if params is None:
                out.append(entry)
                continue
            out.append(entry.transformed(node(step.op, [entry.expr], step.where, **params), step.where))
        except OpShapeError as exc:
            ctx.errors.append(Problem(step.where, f"tensor '{entry.key}': {exc}"))
            out.append(entry)
    return StepOutcome(out, hits)


def fill_template(template: Any, match: Any, **extra: int) -> str:
    """A key template filled for one match; a bad index becomes an OpShapeError for the plan's report."""
    try:
        return template.expand(match, **extra)
    except KeyTemplateError as exc:
        raise OpShapeError(str(exc)) from None


def normalize_dim(dim: int, ndim: int, *, extra: int = 0) -> int:
    """A dimension index in 0..ndim-1+extra (negative counts from the end), like torch's checks."""
    size = ndim + extra
    if not -size <= dim < size:
        raise OpShapeError(f"dim {dim} is out of range for a {ndim}-d tensor")
    return dim % size if size else 0


def with_size(shape: Sequence[int], dim: int, size: int | None) -> tuple[int, ...]:
    """`shape` with dimension `dim` set to `size` (removed when None)."""
    head, tail = tuple(shape[:dim]), tuple(shape[dim + 1 :])
    return head + tail if size is None else head + (size,) + tail


def dim_size(shape: Sequence[int], dim: int) -> int:
    return shape[dim if dim >= 0 else len(shape) + dim]


def target_meta(ctx: PlanContext, key: str, what: str) -> TensorMeta:
    """The target's metadata for `key`, or an OpShapeError saying what is missing."""
    if ctx.target is None:
        raise OpShapeError(f"`{what}: target` needs a target; give one in the recipe or with --target")
    if key not in ctx.target:
        raise OpShapeError(f"`{what}: target` but the target has no such key; rename it first")
    return ctx.target[key]


def same_bytes(params: Mapping[str, Any], meta: TensorMeta) -> Converter:
    """The byte kernel of an op that only changes a tensor's shape (reshape, squeeze, unsqueeze): a contiguous
    tensor's bytes are the same in any shape, so the writer copies them without torch."""
    return unchanged
