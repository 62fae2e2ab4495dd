"""MXFP4 (gpt-oss MoE experts): `dequantize_mxfp4` turns `P_blocks` (uint8 [..., G, B], two E2M1 values a byte, low
nibble first) and `P_scales` (uint8 [..., G], one E8M0 exponent per block: 2^(byte - 127)) into `P`, bit for bit
what transformers' `convert_moe_packed_tensors` returns: each value is the E2M1 value times 2^exponent (exact, inf
past the dtype's range), rounded to the dtype, and with `transpose` (the default) dimensions 1 and 2 of the
[..., G * 2B] result swapped, the layout `GptOssExperts` holds ([experts, in, out]). Its arguments, builder,
schema fragment, tensor op (torch, and a numpy byte kernel streamed one expert at a time) and planner."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckptx._lazy import lazy_module
from ckptx.dtypes import TensorMeta
from ckptx.errors import OpShapeError, Problem
from ckptx.ops.floatbits import OUTPUT_FLOATS, encode_float
from ckptx.ops.registry import step
from ckptx.planning.context import PlanContext, StepOutcome
from ckptx.planning.entry import PlanEntry
from ckptx.planning.expr import Piece, node, tensor_op
from ckptx.rules.kinds import object_schema
from ckptx.rules.steps import Collector, Pattern, Step

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch
else:
    np = lazy_module("numpy")
    torch = lazy_module("torch")

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
PIECE_BYTES = 4 * 1024 * 1024  # packed bytes one piece reads when rows need no transposing
ROW_CHUNK = 1024  # rows of one expert decoded at a time when transposing (its numpy temporaries stay small)


@dataclass(frozen=True)
class DequantizeMxfp4:
    """Dequantize each matching `P<blocks_suffix>` with `P<scales_suffix>` into `P`."""

    match: Pattern
    blocks_suffix: str = "_blocks"
    scales_suffix: str = "_scales"
    dtype: str = "bfloat16"
    transpose: bool = True


def _build(value: Any, c: Collector) -> DequantizeMxfp4:
    value = value or {}
    blocks, scales = str(value.get("blocks_suffix", "_blocks")), str(value.get("scales_suffix", "_scales"))
    if not blocks or not scales or blocks == scales:
        c.problems.append(Problem(c.at(), "blocks_suffix and scales_suffix must be two different, non-empty suffixes"))
    return DequantizeMxfp4(
        c.regex(value.get("match", ".*"), "match"),
        blocks,
        scales,
        value.get("dtype", "bfloat16"),
        bool(value.get("transpose", True)),
    )


_SCHEMA = {
    "anyOf": [
        {"type": "null"},
        object_schema(
            properties={
                "match": {"$ref": "#/$defs/regex"},
                "blocks_suffix": {"type": "string", "description": "Suffix of the packed values (default _blocks)."},
                "scales_suffix": {"type": "string", "description": "Suffix of the exponents (default _scales)."},
                "dtype": {"enum": list(OUTPUT_FLOATS), "description": "The dequantized dtype (default bfloat16)."},
                "transpose": {
                    "type": "boolean",
                    "description": "Swap dimensions 1 and 2 as transformers does for GptOssExperts (default true).",
                },
            }
        ),
    ]
}


def _infer(params: Mapping[str, Any], inputs: Sequence[TensorMeta]) -> TensorMeta:
    blocks, scales = inputs
    if blocks.dtype != "uint8" or scales.dtype != "uint8":
        raise OpShapeError(f"blocks are {blocks.dtype} and scales {scales.dtype}; MXFP4 stores both as uint8")
    if len(blocks.shape) < 2 or blocks.shape[:-1] != scales.shape:
        raise OpShapeError(f"blocks {blocks} need scales of shape {list(blocks.shape[:-1])}, got {scales}")
    *prefix, groups, packed = blocks.shape
    shape = (*prefix, groups * packed * 2)
    if params["transpose"]:
        if len(shape) < 3:
            raise OpShapeError(
                f"blocks {blocks} dequantize to {list(shape)}, which has no dimensions 1 and 2 to swap; "
                f"set `transpose: false`"
            )
        shape = (shape[0], shape[2], shape[1], *shape[3:])
    return TensorMeta(shape, params["dtype"])


@tensor_op("mxfp4_dequantize", _infer, blockwise=lambda params, metas: _pieces(params, metas))
def mxfp4_dequantize(params: Mapping[str, Any], tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """transformers' `convert_moe_packed_tensors`: E2M1 values times 2^(scale - 127), rows of 2B values."""
    blocks, scales = tensors[0].to(torch.uint8), tensors[1].to(torch.int32) - 127
    dtype = getattr(torch, params["dtype"])
    lut = torch.tensor(E2M1_VALUES, dtype=dtype)
    *prefix, groups, packed = blocks.shape
    out = torch.empty(*prefix, groups, packed * 2, dtype=dtype)
    out[..., 0::2] = lut[(blocks & 0x0F).long()]
    out[..., 1::2] = lut[(blocks >> 4).long()]
    torch.ldexp(out, scales.unsqueeze(-1), out=out)
    out = out.reshape(*prefix, groups * packed * 2)
    return out.transpose(1, 2).contiguous() if params["transpose"] else out


def _decode(blocks: bytes, scales: bytes, packed: int) -> Any:
    """Rows of packed bytes and their exponents as float32 rows of 2 * packed values (exact)."""
    raw = np.frombuffer(blocks, dtype="<u1").reshape(-1, packed)
    lut = np.asarray(E2M1_VALUES, dtype="<f4")
    values = np.empty((raw.shape[0], packed * 2), dtype="<f4")
    values[:, 0::2] = lut[raw & 0x0F]
    values[:, 1::2] = lut[raw >> 4]
    exponents = np.frombuffer(scales, dtype="<u1").astype("<i4") - 127
    with np.errstate(over="ignore"):  # past float32's range is inf, as torch.ldexp gives
        return np.ldexp(values, exponents[:, None])


def _pieces(params: Mapping[str, Any], metas: Sequence[TensorMeta]) -> Iterator[Piece] | None:
    blocks, _ = metas
    if not blocks.numel:
        return None
    *prefix, groups, packed = blocks.shape
    dtype = params["dtype"]
    if not params["transpose"]:
        rows = math.prod(prefix) * groups
        step_ = max(1, PIECE_BYTES // packed)

        def flat() -> Iterator[Piece]:
            for r0 in range(0, rows, step_):
                r1 = min(rows, r0 + step_)
                yield Piece(
                    ((r0 * packed, r1 * packed), (r0, r1)), lambda d: encode_float(_decode(d[0], d[1], packed), dtype)
                )

        return flat()
    slab = math.prod(prefix[1:]) * groups  # blocks of one index of dimension 0

    def transposed() -> Iterator[Piece]:
        for index in range(prefix[0]):
            ranges = ((index * slab * packed, (index + 1) * slab * packed), (index * slab, (index + 1) * slab))
            yield Piece(ranges, _slab_converter(prefix[1:], groups, packed, dtype))

    return transposed()


def _slab_converter(rest: Sequence[int], groups: int, packed: int, dtype: str) -> Callable[[Sequence[bytes]], bytes]:
    """One index of dimension 0: its rows decoded a chunk at a time into the swapped layout."""
    width = groups * packed * 2

    def convert(data: Sequence[bytes]) -> bytes:
        if len(rest) != 1:  # more than one dimension between the first and the blocks: the whole slab at once
            values = _decode(data[0], data[1], packed).reshape(*rest, width)
            return encode_float(np.ascontiguousarray(np.swapaxes(values, 0, 1)), dtype)
        (rows,) = rest
        out = np.empty((width, rows), dtype="<f4" if dtype == "float32" else "<u2")
        for r0 in range(0, rows, ROW_CHUNK):
            r1 = min(rows, r0 + ROW_CHUNK)
            chunk = _decode(
                data[0][r0 * groups * packed : r1 * groups * packed], data[1][r0 * groups : r1 * groups], packed
            )
            encoded = np.frombuffer(encode_float(chunk.reshape(r1 - r0, width), dtype), dtype=out.dtype)
            out[:, r0:r1] = encoded.reshape(r1 - r0, width).T
        return out.tobytes()

    return convert


@step(
    "dequantize_mxfp4",
    build=_build,
    schema=_SCHEMA,
    renames_keys=True,
    not_invertible="MXFP4 quantization (E2M1 values with a shared power-of-two scale) is not implemented",
)
def plan_dequantize_mxfp4(args: DequantizeMxfp4, step: Step, entries: list[PlanEntry], ctx: PlanContext) -> StepOutcome:
    """MXFP4 `P_blocks` and `P_scales` become `P` (bfloat16 by default), as transformers dequantizes gpt-oss
    experts; the scales are consumed."""
    by_key = {e.key: e for e in entries}
    made: dict[str, PlanEntry] = {}
    consumed: set[str] = set()
    for entry in entries:
        if not entry.key.endswith(args.blocks_suffix) or not args.match.search(entry.key):
            continue
        base = entry.key[: -len(args.blocks_suffix)]
        scales = by_key.get(base + args.scales_suffix)
        if scales is None:
            ctx.errors.append(
                Problem(
                    step.where,
                    f"tensor '{entry.key}' has no '{base + args.scales_suffix}' at this step; MXFP4 blocks need "
                    f"their scales (set `scales_suffix`, or leave them out of `match`)",
                )
            )
            continue
        try:
            expr = node(
                "mxfp4_dequantize", [entry.expr, scales.expr], step.where, dtype=args.dtype, transpose=args.transpose
            )
        except OpShapeError as exc:
            ctx.errors.append(Problem(step.where, f"tensor '{entry.key}': {exc}"))
            continue
        made[entry.key] = PlanEntry(base, expr, tuple(dict.fromkeys(entry.steps + scales.steps)) + (step.where,))
        consumed.add(scales.key)
    out = [made.get(e.key, e) for e in entries if e.key not in consumed]
    return StepOutcome(out, len(made))
