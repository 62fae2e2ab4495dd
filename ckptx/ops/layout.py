"""Steps that change a tensor's layout: reshape, permute."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from ckptx._lazy import lazy_module
from ckptx.errors import Problem
from ckptx.ops.registry import (OpShapeError, PlanContext, PlanEntry, StepOutcome, TensorMeta, node, step_planner,
                                tensor_op)
from ckptx.rules.steps import Permute, Reshape, Step

torch = lazy_module("torch")


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


@tensor_op("reshape", _infer_reshape)
def reshape(params: Mapping[str, Any], tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """`tensor.reshape(shape)`."""
    return tensors[0].reshape(params["shape"])


def _infer_permute(params: Mapping[str, Any], inputs: Sequence[TensorMeta]) -> TensorMeta:
    (meta,) = inputs
    dims = params["dims"]
    if len(dims) != len(meta.shape):
        raise OpShapeError(f"permute dims {list(dims)} need a {len(dims)}-d tensor, got shape {list(meta.shape)}")
    return TensorMeta(tuple(meta.shape[d] for d in dims), meta.dtype)


@tensor_op("permute", _infer_permute)
def permute(params: Mapping[str, Any], tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """`tensor.permute(dims)` (made contiguous when written)."""
    return tensors[0].permute(params["dims"])


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


@step_planner("reshape")
def plan_reshape(step: Step, entries: list[PlanEntry], ctx: PlanContext) -> StepOutcome:
    """Reshape matching tensors to a fixed shape or to the target's shape for that key."""
    args: Reshape = step.args  # type: ignore[assignment]

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
        ctx.warnings.append(Problem(step.where, f"`shape: target`: {len(absent)} matching key(s) are not in the target "
                                                f"(e.g. '{absent[0]}'); left unchanged, see the validation report"))
    return outcome


@step_planner("permute")
def plan_permute(step: Step, entries: list[PlanEntry], ctx: PlanContext) -> StepOutcome:
    """Permute the dimensions of matching tensors."""
    args: Permute = step.args  # type: ignore[assignment]
    return apply_to_matching(step, entries, ctx, args.match, lambda entry: {"dims": args.dims})
