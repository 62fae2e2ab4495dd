"""Steps that change or create tensor values: resize, scale, set."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from ckptx._lazy import lazy_module
from ckptx.errors import Problem
from ckptx.ops.layout import apply_to_matching
from ckptx.dtypes import lookup
from ckptx.ops.registry import (OpShapeError, PlanContext, PlanEntry, StepOutcome, TensorMeta, node,
                                step_planner, tensor_op)
from ckptx.ops.structure import fill_template, normalize_dim
from ckptx.rules.steps import Resize, Scale, SetTensor, Step

torch = lazy_module("torch")


def target_meta(ctx: PlanContext, key: str, what: str) -> TensorMeta:
    """The target's metadata for `key`, or an OpShapeError saying what is missing."""
    if ctx.target is None:
        raise OpShapeError(f"`{what}: target` needs a target; give one in the recipe or with --target")
    if key not in ctx.target:
        raise OpShapeError(f"`{what}: target` but the target has no such key; rename it first")
    return ctx.target[key]


def _infer_resize(params: Mapping[str, Any], inputs: Sequence[TensorMeta]) -> TensorMeta:
    (meta,) = inputs
    if params["fill"] != "zeros" and not lookup(meta.dtype).is_floating and params["size"] > meta.shape[params["dim"]]:
        raise OpShapeError(f"fill: {params['fill']} needs a floating-point tensor, got {meta.dtype}")
    shape = list(meta.shape)
    shape[params["dim"]] = params["size"]
    return TensorMeta(tuple(shape), meta.dtype)


@tensor_op("resize", _infer_resize)
def resize(params: Mapping[str, Any], tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Shrink `dim` to its first `size` rows, or grow it with zeros, the mean row, or normal(0, std) noise."""
    tensor = tensors[0]
    dim, size, fill = params["dim"], params["size"], params["fill"]
    old = tensor.shape[dim]
    if size <= old:
        return tensor.narrow(dim, 0, size)
    shape = list(tensor.shape)
    shape[dim] = size - old
    if fill == "zeros":
        new = torch.zeros(shape, dtype=tensor.dtype)
    elif fill == "mean":
        new = _wide(tensor).mean(dim=dim, keepdim=True).expand(shape).to(tensor.dtype)
    else:
        generator = torch.Generator().manual_seed(params["seed"])
        std = _wide(tensor).std()
        new = (torch.randn(shape, generator=generator, dtype=torch.float32) * std).to(tensor.dtype)
    return torch.cat([tensor, new], dim=dim)


def _wide(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor in float32 (float64 stays float64) for statistics."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


@step_planner("resize")
def plan_resize(step: Step, entries: list[PlanEntry], ctx: PlanContext) -> StepOutcome:
    """Resize one dimension of matching tensors to a fixed size or the target's."""
    args: Resize = step.args  # type: ignore[assignment]

    def build(entry: PlanEntry) -> dict[str, Any] | None:
        dim = normalize_dim(args.dim, len(entry.meta.shape))
        size = args.size if args.size is not None else target_meta(ctx, entry.key, "size").shape[dim]
        if size == entry.meta.shape[dim]:
            return None
        return {"dim": dim, "size": size, "fill": args.fill, "seed": args.seed}

    return apply_to_matching(step, entries, ctx, args.match, build)


def _infer_scale(params: Mapping[str, Any], inputs: Sequence[TensorMeta]) -> TensorMeta:
    return inputs[0]


@tensor_op("scale", _infer_scale)
def scale(params: Mapping[str, Any], tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """`tensor * by` in the tensor's own dtype."""
    return tensors[0] * params["by"]


@step_planner("scale")
def plan_scale(step: Step, entries: list[PlanEntry], ctx: PlanContext) -> StepOutcome:
    """Multiply matching floating-point tensors by a constant (integer tensors are left alone)."""
    args: Scale = step.args  # type: ignore[assignment]
    return apply_to_matching(step, entries, ctx, args.match,
                             lambda e: {"by": args.by} if lookup(e.meta.dtype).is_floating else None)


def _infer_full(params: Mapping[str, Any], inputs: Sequence[TensorMeta]) -> TensorMeta:
    return TensorMeta(tuple(params["shape"]), params["dtype"])


@tensor_op("full", _infer_full)
def full(params: Mapping[str, Any], tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """`torch.full(shape, value, dtype)`: a tensor from a constant, reading nothing."""
    return torch.full(tuple(params["shape"]), params["value"], dtype=getattr(torch, params["dtype"]))


@step_planner("set", renames_keys=True)
def plan_set(step: Step, entries: list[PlanEntry], ctx: PlanContext) -> StepOutcome:
    """Add (or, with if_exists: replace, overwrite) constant tensors under `key`."""
    args: SetTensor = step.args  # type: ignore[assignment]
    wanted: dict[str, int] = {}
    try:
        if args.match is None:
            wanted[fill_template(args.key, None)] = len(entries) - 1
        for position, entry in enumerate(entries if args.match is not None else ()):
            match = args.match.search(entry.key)  # type: ignore[union-attr]
            if match is not None:
                wanted.setdefault(fill_template(args.key, match), position)
    except OpShapeError as exc:
        ctx.errors.append(Problem(step.where, str(exc)))
        return StepOutcome(entries, 1)
    out = list(entries)
    index = {e.key: i for i, e in enumerate(entries)}
    after: dict[int, list[PlanEntry]] = {}
    for key, position in wanted.items():
        if key in index and args.if_exists != "replace":
            if args.if_exists == "error":
                ctx.errors.append(Problem(step.where, f"'{key}' already exists; add if_exists: keep (leave it) "
                                                      f"or if_exists: replace"))
            continue
        try:
            shape = args.shape if args.shape is not None else target_meta(ctx, key, "shape").shape
            expr = node("full", [], step.where, shape=tuple(shape), dtype=args.dtype, value=args.value)
        except OpShapeError as exc:
            ctx.errors.append(Problem(step.where, f"'{key}': {exc}"))
            continue
        made = PlanEntry(key, expr, (step.where,))
        if key in index:
            out[index[key]] = made
        else:
            after.setdefault(position, []).append(made)
    result = []
    for i, entry in enumerate(out):
        result.append(entry)
        result.extend(after.get(i, ()))
    result.extend(after.get(-1, ()))
    return StepOutcome(result, len(wanted))
