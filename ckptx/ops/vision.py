"""Vision-model steps: resample ViT position embeddings, adapt a conv stem's input channels (timm's numerics); each
kind's arguments, builder, schema fragment, tensor op and planner together."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckptx._lazy import lazy_module
from ckptx.dtypes import TensorMeta
from ckptx.errors import OpShapeError
from ckptx.ops.common import apply_to_matching, target_meta
from ckptx.ops.registry import step
from ckptx.planning.context import PlanContext, StepOutcome
from ckptx.planning.entry import PlanEntry
from ckptx.planning.expr import tensor_op
from ckptx.rules.kinds import object_schema
from ckptx.rules.steps import Collector, Pattern, Step

if TYPE_CHECKING:  # pragma: no cover
    import torch
    import torch.nn.functional as F
else:
    torch = lazy_module("torch")
    F = lazy_module("torch.nn.functional")


# ---- resample_pos_embed ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResamplePosEmbed:
    """Interpolate a ViT position embedding (1, prefix + H*W, C) to a new grid (None: the target's)."""

    match: Pattern
    prefix_tokens: int
    grid: tuple[int, int] | None = None
    source_grid: tuple[int, int] | None = None
    antialias: bool = False


def _build_resample_pos_embed(value: Any, c: Collector) -> ResamplePosEmbed:
    grid = value.get("grid", "target")
    source_grid = value.get("source_grid")
    return ResamplePosEmbed(
        c.regex(value["match"], "match"),
        int(value["prefix_tokens"]),
        None if grid == "target" else (int(grid[0]), int(grid[1])),
        None if source_grid is None else (int(source_grid[0]), int(source_grid[1])),
        bool(value.get("antialias", False)),
    )


_RESAMPLE_POS_EMBED_SCHEMA = object_schema(
    description="Bicubic interpolation of a ViT position embedding to a new grid (timm's resample_abs_pos_embed).",
    required=["match", "prefix_tokens"],
    properties={
        "match": {"$ref": "#/$defs/regex"},
        "prefix_tokens": {
            "type": "integer",
            "minimum": 0,
            "description": "Class, distillation and register tokens before the grid; never guessed.",
        },
        "grid": {
            "anyOf": [{"$ref": "#/$defs/grid"}, {"const": "target"}],
            "description": "The new [height, width] (default: from the target).",
        },
        "source_grid": {
            "$ref": "#/$defs/grid",
            "description": "The source's [height, width] when its grid is not square.",
        },
        "antialias": {
            "type": "boolean",
            "description": "Antialiased interpolation (default false, like timm's checkpoint filters).",
        },
    },
)


def _infer_resample(params: Mapping[str, Any], inputs: Sequence[TensorMeta]) -> TensorMeta:
    (meta,) = inputs
    (oh, ow), (nh, nw), prefix = params["source_grid"], params["grid"], params["prefix_tokens"]
    if meta.shape[-2] != prefix + oh * ow:
        raise OpShapeError(f"{meta.shape[-2]} tokens are not {prefix} prefix tokens + a {oh}x{ow} grid")
    return TensorMeta(meta.shape[:-2] + (prefix + nh * nw, meta.shape[-1]), meta.dtype)


@tensor_op("resample_pos_embed", _infer_resample)
def resample_pos_embed(params: Mapping[str, Any], tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """timm's `resample_abs_pos_embed`: bicubic in float32, align_corners=False, prefix tokens kept as they are."""
    posemb = tensors[0]
    batched = posemb.dim() == 3
    if not batched:
        posemb = posemb.unsqueeze(0)
    prefix = params["prefix_tokens"]
    posemb_prefix, posemb = posemb[:, :prefix], posemb[:, prefix:]
    embed_dim, orig_dtype = posemb.shape[-1], posemb.dtype
    old, new = params["source_grid"], params["grid"]
    posemb = posemb.float().reshape(1, old[0], old[1], -1).permute(0, 3, 1, 2)
    posemb = F.interpolate(posemb, size=tuple(new), mode="bicubic", align_corners=False, antialias=params["antialias"])
    posemb = posemb.permute(0, 2, 3, 1).reshape(1, -1, embed_dim).to(orig_dtype)
    out = torch.cat([posemb_prefix, posemb], dim=1)
    return out if batched else out.squeeze(0)


def _square(tokens: int, what: str, hint: str) -> tuple[int, int]:
    side = math.isqrt(max(tokens, 0))
    if side * side != tokens or tokens <= 0:
        raise OpShapeError(f"{what} has {tokens} grid tokens, not a square grid; {hint}")
    return side, side


@step(
    "resample_pos_embed",
    build=_build_resample_pos_embed,
    schema=_RESAMPLE_POS_EMBED_SCHEMA,
    not_invertible="interpolation loses information",
)
def plan_resample_pos_embed(
    args: ResamplePosEmbed, step: Step, entries: list[PlanEntry], ctx: PlanContext
) -> StepOutcome:
    """Resample matching (1, prefix + H*W, C) or (prefix + H*W, C) embeddings to the new grid."""

    def build(entry: PlanEntry) -> dict[str, Any] | None:
        shape = entry.meta.shape
        if len(shape) not in (2, 3) or (len(shape) == 3 and shape[0] != 1):
            raise OpShapeError(f"a position embedding is (1, tokens, dim) or (tokens, dim), got {list(shape)}")
        source_grid = args.source_grid or _square(
            shape[-2] - args.prefix_tokens, "the source", "give source_grid: [height, width]"
        )
        grid = args.grid
        if grid is None:
            wanted = target_meta(ctx, entry.key, "grid").shape
            grid = _square(wanted[-2] - args.prefix_tokens, "the target", "give grid: [height, width]")
        if tuple(grid) == tuple(source_grid):
            return None
        return {
            "prefix_tokens": args.prefix_tokens,
            "source_grid": tuple(source_grid),
            "grid": tuple(grid),
            "antialias": args.antialias,
        }

    return apply_to_matching(step, entries, ctx, args.match, build)


# ---- adapt_in_channels -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdaptInChannels:
    """Adapt a conv stem weight (O, I, kH, kW) to `channels` inputs like timm's adapt_input_conv."""

    match: Pattern
    channels: int | None
    base_channels: int = 3


def _build_adapt_in_channels(value: Any, c: Collector) -> AdaptInChannels:
    channels = value["channels"]
    return AdaptInChannels(
        c.regex(value["match"], "match"),
        None if channels == "target" else int(channels),
        int(value.get("base_channels", 3)),
    )


_ADAPT_IN_CHANNELS_SCHEMA = object_schema(
    description="Adapt a conv stem to another number of input channels (timm's adapt_input_conv).",
    required=["match", "channels"],
    properties={
        "match": {"$ref": "#/$defs/regex"},
        "channels": {"anyOf": [{"$ref": "#/$defs/size"}, {"const": "target"}]},
        "base_channels": {
            "$ref": "#/$defs/size",
            "description": "Input channels the weights were trained with (default 3).",
        },
    },
)


def _infer_adapt(params: Mapping[str, Any], inputs: Sequence[TensorMeta]) -> TensorMeta:
    (meta,) = inputs
    channels, base = params["channels"], params["base_channels"]
    if len(meta.shape) != 4:
        raise OpShapeError(f"adapt_in_channels needs a 4-d conv weight (O, I, kH, kW), got {list(meta.shape)}")
    out_c, in_c, kh, kw = meta.shape
    if channels == 1 and in_c > base:
        if in_c % base:
            raise OpShapeError(f"{in_c} input channels are not a multiple of base_channels {base}")
        return TensorMeta((out_c, in_c // base, kh, kw), meta.dtype)
    if channels != 1 and in_c != base:
        raise OpShapeError(f"the weight has {in_c} input channels, not base_channels {base}; set base_channels")
    return TensorMeta((out_c, channels, kh, kw), meta.dtype)


@tensor_op("adapt_in_channels", _infer_adapt)
def adapt_in_channels(params: Mapping[str, Any], tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """timm's `adapt_input_conv`: sum to 1 channel, or repeat the base channels and rescale by base/N."""
    weight = tensors[0]
    channels, base = params["channels"], params["base_channels"]
    conv_type = weight.dtype
    weight = weight.float()
    out_c, in_c, kh, kw = weight.shape
    if channels == 1:
        if in_c > base:
            weight = weight.reshape(out_c, in_c // base, base, kh, kw).sum(dim=2, keepdim=False)
        else:
            weight = weight.sum(dim=1, keepdim=True)
    else:
        repeat = int(math.ceil(channels / base))
        weight = weight.repeat(1, repeat, 1, 1)[:, :channels, :, :]
        weight *= base / float(channels)
    return weight.to(conv_type)


@step(
    "adapt_in_channels",
    build=_build_adapt_in_channels,
    schema=_ADAPT_IN_CHANNELS_SCHEMA,
    not_invertible="the original channels are mixed",
)
def plan_adapt_in_channels(
    args: AdaptInChannels, step: Step, entries: list[PlanEntry], ctx: PlanContext
) -> StepOutcome:
    """Adapt matching conv weights to a fixed number of input channels or the target's."""

    def build(entry: PlanEntry) -> dict[str, Any] | None:
        channels = args.channels if args.channels is not None else target_meta(ctx, entry.key, "channels").shape[1]
        if channels == args.base_channels and len(entry.meta.shape) == 4 and entry.meta.shape[1] == channels:
            return None
        return {"channels": channels, "base_channels": args.base_channels}

    return apply_to_matching(step, entries, ctx, args.match, build)
