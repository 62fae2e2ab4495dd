"""The cast step: change the dtype of matching tensors."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from ckptx._lazy import lazy_module
from ckptx.ops.layout import apply_to_matching
from ckptx.ops.registry import FLOATING, PlanContext, PlanEntry, StepOutcome, TensorMeta, step_planner, tensor_op
from ckptx.rules.steps import Cast, Step

torch = lazy_module("torch")


def _infer_cast(params: Mapping[str, Any], inputs: Sequence[TensorMeta]) -> TensorMeta:
    (meta,) = inputs
    return TensorMeta(meta.shape, params["dtype"])


@tensor_op("cast", _infer_cast)
def cast(params: Mapping[str, Any], tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """`tensor.to(dtype)`."""
    return tensors[0].to(getattr(torch, params["dtype"]))


@step_planner("cast")
def plan_cast(step: Step, entries: list[PlanEntry], ctx: PlanContext) -> StepOutcome:
    """Cast matching floating-point tensors (all matching tensors with include_integer)."""
    args: Cast = step.args  # type: ignore[assignment]

    def build(entry: PlanEntry) -> dict[str, Any] | None:
        if entry.meta.dtype == args.dtype:
            return None
        if entry.meta.dtype not in FLOATING and not args.include_integer:
            return None
        return {"dtype": args.dtype}

    return apply_to_matching(step, entries, ctx, args.match, build)
