"""Steps that change or create tensor values: resize, scale, set; each kind's arguments, builder, schema fragment,
tensor op, inverse and planner together."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckptx._lazy import lazy_module
from ckptx.dtypes import TensorMeta, lookup
from ckptx.errors import NotInvertible, OpShapeError, Problem
from ckptx.ops.common import apply_to_matching, fill_template, normalize_dim, target_meta
from ckptx.ops.registry import step
from ckptx.planning.context import PlanContext, StepOutcome
from ckptx.planning.entry import PlanEntry
from ckptx.planning.expr import node, tensor_op
from ckptx.rules.inverse import Group, exact_keys, parse_pattern, swap
from ckptx.rules.kinds import Doc, StepTrace, object_schema
from ckptx.rules.steps import Collector, Pattern, Step, dim_arg
from ckptx.rules.templates import Template

if TYPE_CHECKING:  # pragma: no cover
    import torch
else:
    torch = lazy_module("torch")


# ---- resize ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resize:
    """Grow or shrink dimension `dim` to `size` (None: the target's size); new rows are filled by `fill`."""

    match: Pattern
    dim: int
    size: int | None
    fill: str = "zeros"
    seed: int = 0


def _build_resize(value: Any, c: Collector) -> Resize:
    size = value["size"]
    return Resize(
        c.regex(value["match"], "match"),
        dim_arg(value),
        None if size == "target" else int(size),
        value.get("fill", "zeros"),
        int(value.get("seed", 0)),
    )


_RESIZE_SCHEMA = object_schema(
    description="Grow or shrink one dimension (e.g. vocabulary resizing).",
    required=["match", "size"],
    properties={
        "match": {"$ref": "#/$defs/regex"},
        "dim": {"$ref": "#/$defs/dim"},
        "size": {
            "anyOf": [{"$ref": "#/$defs/size"}, {"const": "target"}],
            "description": "The new size of dim, or 'target' for the target's.",
        },
        "fill": {
            "enum": ["zeros", "mean", "normal"],
            "description": (
                "New rows: zeros, the mean of the existing rows, or normal(0, std of the tensor) (default zeros)."
            ),
        },
        "seed": {"type": "integer", "description": "Seed of fill: normal (default 0)."},
    },
)


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


@step("resize", build=_build_resize, schema=_RESIZE_SCHEMA, not_invertible="the rows it cuts or adds are not recorded")
def plan_resize(args: Resize, step: Step, entries: list[PlanEntry], ctx: PlanContext) -> StepOutcome:
    """Resize one dimension of matching tensors to a fixed size or the target's."""

    def build(entry: PlanEntry) -> dict[str, Any] | None:
        dim = normalize_dim(args.dim, len(entry.meta.shape))
        size = args.size if args.size is not None else target_meta(ctx, entry.key, "size").shape[dim]
        if size == entry.meta.shape[dim]:
            return None
        return {"dim": dim, "size": size, "fill": args.fill, "seed": args.seed}

    return apply_to_matching(step, entries, ctx, args.match, build)


# ---- scale -----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scale:
    """Multiply matching floating-point tensors by `by`."""

    match: Pattern
    by: float


def _build_scale(value: Any, c: Collector) -> Scale:
    return Scale(c.regex(value["match"], "match"), float(value["by"]))


_SCALE_SCHEMA = object_schema(
    description="Multiply floating-point tensors by a constant.",
    required=["match", "by"],
    properties={"match": {"$ref": "#/$defs/regex"}, "by": {"type": "number"}},
)


def _infer_scale(params: Mapping[str, Any], inputs: Sequence[TensorMeta]) -> TensorMeta:
    return inputs[0]


@tensor_op("scale", _infer_scale)
def scale(params: Mapping[str, Any], tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """`tensor * by` in the tensor's own dtype."""
    return tensors[0] * params["by"]


@step("scale", build=_build_scale, schema=_SCALE_SCHEMA, not_invertible="rounding makes it lossy")
def plan_scale(args: Scale, step: Step, entries: list[PlanEntry], ctx: PlanContext) -> StepOutcome:
    """Multiply matching floating-point tensors by a constant (integer tensors are left alone)."""
    return apply_to_matching(
        step, entries, ctx, args.match, lambda e: {"by": args.by} if lookup(e.meta.dtype).is_floating else None
    )


# ---- set -------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SetTensor:
    """A new tensor filled with `value`: under `key`, or under `key` filled from each key matching `match`."""

    key: Template
    value: float | int | bool
    dtype: str = "float32"
    shape: tuple[int, ...] | None = ()
    match: Pattern | None = None
    if_exists: str = "error"


def _build_set(value: Any, c: Collector) -> SetTensor:
    match = c.regex(value["match"], "match") if "match" in value else None
    key = c.template(value["key"], match, "invalid key template", "key")
    if match is None and ("\\" in value["key"]):
        c.problems.append(Problem(c.at("key"), "the key refers to groups but there is no `match` to fill them"))
    shape = value.get("shape", [])
    if value.get("dtype", "float32") == "bool" and not isinstance(value["value"], bool):
        c.problems.append(Problem(c.at("value"), "a bool tensor takes true or false"))
    return SetTensor(
        key,
        value["value"],
        value.get("dtype", "float32"),
        None if shape == "target" else tuple(shape),
        match,
        value.get("if_exists", "error"),
    )


_SET_SCHEMA = object_schema(
    description="A new tensor filled with a constant (e.g. a missing num_batches_tracked).",
    required=["key", "value"],
    properties={
        "key": {
            "$ref": "#/$defs/keyTemplate",
            "description": "The new key; a template filled from match's groups when match is given.",
        },
        "match": {"$ref": "#/$defs/regex"},
        "value": {"type": ["number", "boolean"]},
        "dtype": {"$ref": "#/$defs/dtype"},
        "shape": {
            "anyOf": [{"type": "array", "items": {"type": "integer", "minimum": 0}}, {"const": "target"}],
            "description": "Default [] (a scalar), or 'target'.",
        },
        "if_exists": {
            "enum": ["error", "keep", "replace"],
            "description": "When the key already exists (default error).",
        },
    },
)


def _invert_set(args: SetTensor, step: Step, trace: StepTrace | None) -> list[Doc]:
    if args.if_exists == "replace":
        raise NotInvertible("if_exists: replace overwrites tensors")
    if trace is not None and trace.after is not None:
        made = [k for k, _ in trace.after if k not in dict(trace.before)]
        return [{"drop": [exact_keys(made)]}] if made else []
    if args.match is None:
        return [{"drop": [f"^{re.escape(args.key.expand(None))}$"]}]
    if args.if_exists == "keep":
        raise NotInvertible(
            "with if_exists: keep, which keys it made depends on the checkpoint; the source layout is needed",
            needs_layout=True,
        )
    groups = parse_pattern(args.match.pattern)[2]
    return [
        {
            "drop": [
                swap(
                    args.match.pattern,
                    args.key,
                    whole=True,
                    spare=tuple(g.number for g in groups if isinstance(g, Group)),
                ).pattern
            ]
        }
    ]


def _infer_full(params: Mapping[str, Any], inputs: Sequence[TensorMeta]) -> TensorMeta:
    return TensorMeta(tuple(params["shape"]), params["dtype"])


@tensor_op("full", _infer_full)
def full(params: Mapping[str, Any], tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """`torch.full(shape, value, dtype)`: a tensor from a constant, reading nothing."""
    return torch.full(tuple(params["shape"]), params["value"], dtype=getattr(torch, params["dtype"]))


@step("set", build=_build_set, schema=_SET_SCHEMA, invert=_invert_set, renames_keys=True)
def plan_set(args: SetTensor, step: Step, entries: list[PlanEntry], ctx: PlanContext) -> StepOutcome:
    """Add (or, with if_exists: replace, overwrite) constant tensors under `key`."""
    wanted: dict[str, int] = {}
    try:
        pattern = args.match
        if pattern is None:
            wanted[fill_template(args.key, None)] = len(entries) - 1
        for position, entry in enumerate(entries if pattern is not None else ()):
            match = pattern.search(entry.key) if pattern is not None else None
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
                ctx.errors.append(
                    Problem(step.where, f"'{key}' already exists; add if_exists: keep (leave it) or if_exists: replace")
                )
            continue
        try:
            shape = args.shape if args.shape is not None else target_meta(ctx, key, "shape").shape
            expr = node("full", [], step.where, shape=tuple(shape), dtype=args.dtype, value=args.value)
        except OpShapeError as exc:
            ctx.errors.append(Problem(step.where, f"'{key}': {exc}"))
            continue
        made = PlanEntry(key, expr, (step.where,))
        if key in index:
            ctx.drop(out[index[key]], step.where)
            out[index[key]] = made
        else:
            after.setdefault(position, []).append(made)
    result = []
    for i, entry in enumerate(out):
        result.append(entry)
        result.extend(after.get(i, ()))
    result.extend(after.get(-1, ()))
    return StepOutcome(result, len(wanted))
