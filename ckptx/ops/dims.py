"""Steps that add or remove dimensions: unsqueeze, squeeze, slice; each kind's arguments, builder, schema fragment,
tensor op, inverse and planner together."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckptx._lazy import lazy_module
from ckptx.dtypes import TensorMeta
from ckptx.errors import OpShapeError
from ckptx.ops.common import apply_to_matching, normalize_dim, same_bytes, with_size
from ckptx.ops.regions import region_pieces
from ckptx.ops.registry import step
from ckptx.planning.context import PlanContext, StepOutcome, StepPlanner
from ckptx.planning.entry import PlanEntry
from ckptx.planning.expr import Piece, tensor_op
from ckptx.rules.kinds import Doc, StepTrace, object_schema
from ckptx.rules.steps import Collector, Pattern, Step

if TYPE_CHECKING:  # pragma: no cover
    import torch
else:
    torch = lazy_module("torch")


def _dim_planner(extra: int) -> StepPlanner:
    def plan(args: Unsqueeze, step: Step, entries: list[PlanEntry], ctx: PlanContext) -> StepOutcome:
        return apply_to_matching(
            step, entries, ctx, args.match, lambda e: {"dim": normalize_dim(args.dim, len(e.meta.shape), extra=extra)}
        )

    return plan


# ---- unsqueeze -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unsqueeze:
    """Insert a dimension of size 1 at `dim`."""

    match: Pattern
    dim: int


def _build_unsqueeze(value: Any, c: Collector) -> Unsqueeze:
    return Unsqueeze(c.regex(value["match"], "match"), int(value["dim"]))


_UNSQUEEZE_SCHEMA = object_schema(
    description="Insert a dimension of size 1.",
    required=["match", "dim"],
    properties={"match": {"$ref": "#/$defs/regex"}, "dim": {"$ref": "#/$defs/dim"}},
)


def _invert_unsqueeze(args: Unsqueeze, step: Step, trace: StepTrace | None) -> list[Doc]:
    inverse = "unsqueeze" if isinstance(args, Squeeze) else "squeeze"
    return [{inverse: {"match": args.match.pattern, "dim": args.dim}}]


def _infer_unsqueeze(params: Mapping[str, Any], inputs: Sequence[TensorMeta]) -> TensorMeta:
    (meta,) = inputs
    dim = params["dim"]
    return TensorMeta(meta.shape[:dim] + (1,) + meta.shape[dim:], meta.dtype)


@tensor_op("unsqueeze", _infer_unsqueeze, elementwise=same_bytes)
def unsqueeze(params: Mapping[str, Any], tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """`tensor.unsqueeze(dim)`."""
    return tensors[0].unsqueeze(params["dim"])


plan_unsqueeze = step("unsqueeze", build=_build_unsqueeze, schema=_UNSQUEEZE_SCHEMA, invert=_invert_unsqueeze)(
    _dim_planner(extra=1)
)


# ---- squeeze ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Squeeze(Unsqueeze):
    """Remove dimension `dim`, which must have size 1."""


def _build_squeeze(value: Any, c: Collector) -> Squeeze:
    return Squeeze(c.regex(value["match"], "match"), int(value["dim"]))


_SQUEEZE_SCHEMA = object_schema(
    description="Remove a dimension of size 1.",
    required=["match", "dim"],
    properties={"match": {"$ref": "#/$defs/regex"}, "dim": {"$ref": "#/$defs/dim"}},
)


def _infer_squeeze(params: Mapping[str, Any], inputs: Sequence[TensorMeta]) -> TensorMeta:
    (meta,) = inputs
    dim = params["dim"]
    if meta.shape[dim] != 1:
        raise OpShapeError(f"cannot squeeze dim {dim} of shape {list(meta.shape)}: its size is not 1")
    return TensorMeta(with_size(meta.shape, dim, None), meta.dtype)


@tensor_op("squeeze", _infer_squeeze, elementwise=same_bytes)
def squeeze(params: Mapping[str, Any], tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """`tensor.squeeze(dim)`."""
    return tensors[0].squeeze(params["dim"])


plan_squeeze = step("squeeze", build=_build_squeeze, schema=_SQUEEZE_SCHEMA, invert=_invert_unsqueeze)(
    _dim_planner(extra=0)
)


# ---- slice -----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Slice:
    """Keep `start:stop:step` of dimension `dim` (Python slice semantics)."""

    match: Pattern
    dim: int
    start: int | None = None
    stop: int | None = None
    step: int = 1


def _build_slice(value: Any, c: Collector) -> Slice:
    return Slice(
        c.regex(value["match"], "match"),
        int(value["dim"]),
        value.get("start"),
        value.get("stop"),
        int(value.get("step", 1)),
    )


_SLICE_SCHEMA = object_schema(
    description="Keep start:stop:step of one dimension (Python slice semantics).",
    required=["match", "dim"],
    properties={
        "match": {"$ref": "#/$defs/regex"},
        "dim": {"$ref": "#/$defs/dim"},
        "start": {"type": "integer"},
        "stop": {"type": "integer"},
        "step": {"type": "integer", "minimum": 1},
    },
)


def _infer_slice(params: Mapping[str, Any], inputs: Sequence[TensorMeta]) -> TensorMeta:
    (meta,) = inputs
    dim = params["dim"]
    length = len(range(meta.shape[dim])[slice(params["start"], params["stop"], params["step"])])
    if length == 0:
        raise OpShapeError(
            f"slice {params['start']}:{params['stop']}:{params['step']} of dim {dim} (size {meta.shape[dim]}) is empty"
        )
    return TensorMeta(with_size(meta.shape, dim, length), meta.dtype)


def _slice_pieces(params: Mapping[str, Any], metas: Sequence[TensorMeta]) -> Iterator[Piece] | None:
    return region_pieces(metas[0], params["dim"], slice(params["start"], params["stop"], params["step"]))


@tensor_op("slice", _infer_slice, blockwise=_slice_pieces)
def slice_(params: Mapping[str, Any], tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """`tensor[..., start:stop:step, ...]` on dimension `dim`."""
    index = [slice(None)] * tensors[0].dim()
    index[params["dim"]] = slice(params["start"], params["stop"], params["step"])
    return tensors[0][tuple(index)]


@step("slice", build=_build_slice, schema=_SLICE_SCHEMA, not_invertible="the sliced-off part is gone")
def plan_slice(args: Slice, step: Step, entries: list[PlanEntry], ctx: PlanContext) -> StepOutcome:
    """Keep a slice of one dimension of matching tensors."""
    return apply_to_matching(
        step,
        entries,
        ctx,
        args.match,
        lambda e: {
            "dim": normalize_dim(args.dim, len(e.meta.shape)),
            "start": args.start,
            "stop": args.stop,
            "step": args.step,
        },
    )
