"""FP8 block quantization (DeepSeek-V3/R1, Qwen3-FP8): `dequantize_fp8` turns a float8 weight and its
`<key>_scale_inv` (one float32 scale per block of 128x128 values) into one bf16/fp16/fp32 tensor; `quantize_fp8`
is its inverse. Each kind's arguments, builder, schema fragment, tensor ops (torch, and a numpy byte kernel the
writer streams in blocks of rows without importing torch), inverse and planner together.

Dequantization: y = fp32(x) * scale of the block, rounded to the output dtype (DeepSeek's `weight_dequant`;
transformers' `Fp8Dequantize` computes the same). Quantization follows DeepSeek-V3's `weight_quant`, computed in
IEEE float32: per block s = amax / 448, y = x / s clamped to +-448 and rounded to float8_e4m3fn (nearest even);
transformers' quantizer multiplies by 448 / amax instead and stores 1 / (448 / amax), which can differ in the last
bit of the scale and of a value. A block of zeros gets the scale 1 (DeepSeek's formula would divide 0 by 0);
a block holding inf or NaN is refused. Shapes need not be multiples of the block: edge blocks are partial, and
the scale grid is [ceil(rows / b0), ceil(cols / b1)] (after any leading dimensions the weight has).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckptx._lazy import lazy_module
from ckptx.dtypes import TensorMeta, lookup
from ckptx.errors import NotInvertible, OpShapeError, Problem
from ckptx.ops.floatbits import E4M3_MAX, FLOAT8, OUTPUT_FLOATS, decode_float8, encode_e4m3fn, encode_float
from ckptx.ops.registry import step
from ckptx.planning.context import PlanContext, StepOutcome
from ckptx.planning.entry import PlanEntry
from ckptx.planning.expr import Piece, node, tensor_op
from ckptx.rules.inverse import changed_metas, exact_keys
from ckptx.rules.kinds import Doc, StepTrace, object_schema
from ckptx.rules.steps import Collector, Pattern, Step

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch
else:
    np = lazy_module("numpy")
    torch = lazy_module("torch")

PIECE_BYTES = 4 * 1024 * 1024  # weight bytes one piece of a byte kernel reads; its numpy temporaries are ~10x this
SCALE_DTYPES = ("float32", "bfloat16", "float16")  # what a scale tensor may hold (decoded to float32 exactly)
_QUANTIZABLE = ("float32", "bfloat16", "float16", "float64")


# --- what the steps say: arguments, builders, schema fragments, inverses ---------------------------------


@dataclass(frozen=True)
class DequantizeFp8:
    """Dequantize each matching float8 tensor `X` with its scales `X<scale_suffix>` into one `dtype` tensor."""

    match: Pattern
    scale_suffix: str = "_scale_inv"
    block: tuple[int, int] = (128, 128)
    dtype: str = "bfloat16"


@dataclass(frozen=True)
class QuantizeFp8:
    """Quantize each matching 2-D floating-point tensor `X` to float8_e4m3fn `X` plus float32 `X<scale_suffix>`."""

    match: Pattern
    scale_suffix: str = "_scale_inv"
    block: tuple[int, int] = (128, 128)


def _block_arg(value: Any, c: Collector) -> tuple[int, int]:
    block = value.get("block", 128)
    rows, cols = (block, block) if isinstance(block, int) else tuple(block)
    return int(rows), int(cols)


def _suffix_arg(value: Any, c: Collector) -> str:
    suffix = str(value.get("scale_suffix", "_scale_inv"))
    if not suffix:
        c.problems.append(Problem(c.at("scale_suffix"), "scale_suffix must not be empty"))
    return suffix


def _build_dequantize(value: Any, c: Collector) -> DequantizeFp8:
    value = value or {}
    return DequantizeFp8(
        c.regex(value.get("match", ".*"), "match"),
        _suffix_arg(value, c),
        _block_arg(value, c),
        value.get("dtype", "bfloat16"),
    )


def _build_quantize(value: Any, c: Collector) -> QuantizeFp8:
    value = value or {}
    return QuantizeFp8(c.regex(value.get("match", ".*"), "match"), _suffix_arg(value, c), _block_arg(value, c))


_BLOCK = {
    "anyOf": [
        {"type": "integer", "minimum": 1},
        {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 2, "maxItems": 2},
    ],
    "description": "Values per scale: [rows, cols] of a block, or one number for square blocks (default 128).",
}
_SUFFIX = {"type": "string", "description": "The scale tensor of X is X + this suffix (default _scale_inv)."}
_DEQUANTIZE_SCHEMA = {
    "anyOf": [
        {"type": "null"},
        object_schema(
            properties={
                "match": {"$ref": "#/$defs/regex"},
                "scale_suffix": _SUFFIX,
                "block": _BLOCK,
                "dtype": {"enum": list(OUTPUT_FLOATS), "description": "The dequantized dtype (default bfloat16)."},
            }
        ),
    ]
}
_QUANTIZE_SCHEMA = {
    "anyOf": [
        {"type": "null"},
        object_schema(properties={"match": {"$ref": "#/$defs/regex"}, "scale_suffix": _SUFFIX, "block": _BLOCK}),
    ]
}


def _invert_dequantize(args: DequantizeFp8, step: Step, trace: StepTrace | None) -> list[Doc]:
    changed = changed_metas(trace, "float8 weights")
    for key, old, _ in changed:
        if old.dtype != "float8_e4m3fn":
            raise NotInvertible(f"'{key}' was {old.dtype}; quantize_fp8 writes float8_e4m3fn only")
        if len(old.shape) != 2:
            raise NotInvertible(f"'{key}' is {len(old.shape)}-d; quantize_fp8 quantizes 2-d weights only")
    if not changed:
        return []
    return [
        {
            "quantize_fp8": {
                "match": exact_keys([key for key, _, _ in changed]),
                "scale_suffix": args.scale_suffix,
                "block": list(args.block),
            }
        }
    ]


def _invert_quantize(args: QuantizeFp8, step: Step, trace: StepTrace | None) -> list[Doc]:
    changed = changed_metas(trace, "dtypes")
    dtypes = {old.dtype for _, old, _ in changed}
    if len(dtypes) > 1:
        raise NotInvertible(f"the quantized tensors had several dtypes ({', '.join(sorted(dtypes))})")
    dtype = dtypes.pop() if dtypes else "bfloat16"
    if dtype not in OUTPUT_FLOATS:
        raise NotInvertible(f"the quantized tensors were {dtype}; dequantize_fp8 writes {', '.join(OUTPUT_FLOATS)}")
    keys = [key for key, _, _ in changed]
    return [
        {
            "dequantize_fp8": {
                "match": exact_keys(keys) if keys else args.match.pattern,
                "scale_suffix": args.scale_suffix,
                "block": list(args.block),
                "dtype": dtype,
            }
        }
    ]


# --- shapes --------------------------------------------------------------------------------------------------


def scale_grid(shape: Sequence[int], block: Sequence[int]) -> tuple[int, ...]:
    """The shape of the scales of a weight of `shape`: its leading dims, then ceil(rows/b0), ceil(cols/b1)."""
    *lead, rows, cols = shape
    return (*lead, -(-rows // block[0]), -(-cols // block[1]))


def _infer_dequantize(params: Mapping[str, Any], inputs: Sequence[TensorMeta]) -> TensorMeta:
    weight, scales = inputs
    if weight.dtype not in FLOAT8:
        raise OpShapeError(f"is {weight.dtype}, not a float8 weight ({', '.join(FLOAT8)})")
    if len(weight.shape) < 2:
        raise OpShapeError(f"is {len(weight.shape)}-d; a block-quantized weight has at least 2 dimensions")
    if scales.dtype not in SCALE_DTYPES:
        raise OpShapeError(f"its scales are {scales.dtype}; scales are {', '.join(SCALE_DTYPES)}")
    want = scale_grid(weight.shape, params["block"])
    if scales.shape != want:
        rows, cols = params["block"]
        raise OpShapeError(
            f"{weight} needs scales of shape {list(want)} for blocks of {rows}x{cols}, got {scales}; "
            f"set `block` to the checkpoint's block size (config.json: weight_block_size)"
        )
    return TensorMeta(weight.shape, params["dtype"])


def _infer_quantize(params: Mapping[str, Any], inputs: Sequence[TensorMeta]) -> TensorMeta:
    (meta,) = inputs
    if len(meta.shape) != 2 or meta.dtype not in _QUANTIZABLE:
        raise OpShapeError(f"is {meta}; quantize_fp8 quantizes 2-d {', '.join(_QUANTIZABLE)} tensors")
    if params["part"] == "scales":
        return TensorMeta(scale_grid(meta.shape, params["block"]), "float32")
    return TensorMeta(meta.shape, "float8_e4m3fn")


# --- torch ---------------------------------------------------------------------------------------------------


def _expand(scales: torch.Tensor, shape: Sequence[int], block: Sequence[int]) -> torch.Tensor:
    rows, cols = shape[-2:]
    full = scales.repeat_interleave(block[0], dim=-2)[..., :rows, :]
    return full.repeat_interleave(block[1], dim=-1)[..., :cols]


@tensor_op("fp8_dequantize", _infer_dequantize, blockwise=lambda params, metas: _dequantize_pieces(params, metas))
def fp8_dequantize(params: Mapping[str, Any], tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """`(x.float() * scale of its block).to(dtype)`."""
    weight, scales = tensors
    full = _expand(scales.to(torch.float32), weight.shape, params["block"])
    return (weight.to(torch.float32) * full).to(getattr(torch, params["dtype"]))


def _block_amax(values: torch.Tensor, block: Sequence[int]) -> torch.Tensor:
    rows, cols = values.shape
    grid = scale_grid(values.shape, block)
    padded = torch.zeros(grid[0] * block[0], grid[1] * block[1], dtype=torch.float32)
    padded[:rows, :cols] = values.abs()
    return padded.reshape(grid[0], block[0], grid[1], block[1]).amax(dim=(1, 3))


@tensor_op("fp8_quantize", _infer_quantize, blockwise=lambda params, metas: _quantize_pieces(params, metas))
def fp8_quantize(params: Mapping[str, Any], tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The float8_e4m3fn values (`part: values`) or the float32 scales (`part: scales`) of DeepSeek's block
    quantization: s = amax / 448 per block (1 for a block of zeros), x / s clamped to +-448."""
    values = tensors[0].to(torch.float32)
    amax = _block_amax(values, params["block"])
    if not bool(torch.isfinite(amax).all()):
        raise ValueError(_NOT_FINITE)
    scales = torch.where(amax > 0, amax / torch.tensor(E4M3_MAX, dtype=torch.float32), torch.ones_like(amax))
    if params["part"] == "scales":
        return scales
    quantized = (values / _expand(scales, values.shape, params["block"])).clamp(-E4M3_MAX, E4M3_MAX)
    return quantized.to(torch.float8_e4m3fn)


_NOT_FINITE = "a block holds inf or NaN, which FP8 block quantization cannot represent; fix the weights first"


# --- numpy byte kernels: blocks of rows, streamed ------------------------------------------------------------


@dataclass(frozen=True)
class _RowBlocks:
    """A (leading..., rows, cols) tensor as consecutive blocks of rows: block k holds rows [start(k), stop(k)) of
    the tensor seen as (prod(leading) * rows, cols)."""

    rows: int
    cols: int
    count_per_matrix: int
    matrices: int
    block_rows: int

    @classmethod
    def of(cls, shape: Sequence[int], block: Sequence[int]) -> _RowBlocks:
        *lead, rows, cols = shape
        return cls(rows, cols, -(-rows // block[0]), math.prod(lead), block[0])

    @property
    def count(self) -> int:
        return self.count_per_matrix * self.matrices

    def start(self, k: int) -> int:
        matrix, within = divmod(k, self.count_per_matrix)
        return matrix * self.rows + within * self.block_rows

    def stop(self, k: int) -> int:
        matrix, within = divmod(k, self.count_per_matrix)
        return matrix * self.rows + min(self.rows, (within + 1) * self.block_rows)

    def groups(self, itemsize: int) -> Iterator[tuple[int, int]]:
        """Runs [k0, k1) of blocks of about PIECE_BYTES of the tensor each (one block at least)."""
        per_block = max(1, self.block_rows * self.cols * itemsize)
        step_ = max(1, PIECE_BYTES // per_block)
        for k0 in range(0, self.count, step_):
            yield k0, min(self.count, k0 + step_)

    def row_owner(self, k0: int, k1: int) -> Any:
        """For each row of blocks k0..k1-1, its block's position in the run."""
        sizes = [self.stop(k) - self.start(k) for k in range(k0, k1)]
        return np.repeat(np.arange(k1 - k0), sizes)


def _decode_floats(data: bytes, dtype: str) -> Any:
    """Little-endian float bytes as float32 (exact for float16/bfloat16/float32; float64 rounded as torch does)."""
    if dtype == "bfloat16":
        return (np.frombuffer(data, dtype="<u2").astype("<u4") << 16).view("<f4")
    if dtype in FLOAT8:
        return decode_float8(data, dtype)
    return np.frombuffer(data, dtype=lookup(dtype).numpy).astype("<f4")


def _dequantize_pieces(params: Mapping[str, Any], metas: Sequence[TensorMeta]) -> Iterator[Piece] | None:
    weight, scales = metas
    blocks = _RowBlocks.of(weight.shape, params["block"])
    grid_cols = scale_grid(weight.shape, params["block"])[-1]
    scale_size = lookup(scales.dtype).itemsize
    columns = np.arange(blocks.cols) // params["block"][1] if blocks.cols else np.zeros(0, dtype=int)

    def pieces() -> Iterator[Piece]:
        for k0, k1 in blocks.groups(1):
            ranges = (
                (blocks.start(k0) * blocks.cols, blocks.stop(k1 - 1) * blocks.cols),
                (k0 * grid_cols * scale_size, k1 * grid_cols * scale_size),
            )
            yield Piece(ranges, _dequantizer(weight, scales, blocks, k0, k1, columns, params["dtype"]))

    return pieces() if weight.numel else None


def _dequantizer(
    weight: TensorMeta, scales: TensorMeta, blocks: _RowBlocks, k0: int, k1: int, columns: Any, dtype: str
) -> Callable[[Sequence[bytes]], bytes]:
    def convert(data: Sequence[bytes]) -> bytes:
        values = decode_float8(data[0], weight.dtype).reshape(-1, blocks.cols)
        grid = _decode_floats(data[1], scales.dtype).reshape(k1 - k0, -1)
        values *= grid[blocks.row_owner(k0, k1)][:, columns]
        if np.isnan(values).any():  # NaN bits are torch's business (see ckptx/ops/cast.py): let torch write them
            return _torch_dequantize(data, weight.dtype, scales.dtype, grid.shape, columns, blocks, k0, k1, dtype)
        return encode_float(values, dtype)

    return convert


def _torch_dequantize(
    data: Sequence[bytes],
    fp8: str,
    scale_dtype: str,
    grid: Any,
    columns: Any,
    blocks: _RowBlocks,
    k0: int,
    k1: int,
    dtype: str,
) -> bytes:
    """One piece computed by torch (it holds a NaN)."""
    values = torch.frombuffer(bytearray(data[0]), dtype=getattr(torch, fp8)).reshape(-1, blocks.cols)
    grid_t = torch.frombuffer(bytearray(data[1]), dtype=getattr(torch, scale_dtype)).reshape(grid).float()
    full = grid_t[torch.from_numpy(blocks.row_owner(k0, k1))][:, torch.from_numpy(columns)]
    out = (values.float() * full).to(getattr(torch, dtype))
    return out.view(torch.uint8).numpy().tobytes()


def _quantize_pieces(params: Mapping[str, Any], metas: Sequence[TensorMeta]) -> Iterator[Piece] | None:
    (meta,) = metas
    if not meta.numel:
        return None
    blocks = _RowBlocks.of(meta.shape, params["block"])
    itemsize = lookup(meta.dtype).itemsize
    block_cols = params["block"][1]
    starts = np.arange(0, blocks.cols, block_cols)
    columns = np.arange(blocks.cols) // block_cols
    scales_only = params["part"] == "scales"

    def convert_for(k0: int, k1: int) -> Callable[[Sequence[bytes]], bytes]:
        def convert(data: Sequence[bytes]) -> bytes:
            values = _decode_floats(data[0], meta.dtype).reshape(-1, blocks.cols)
            owner = blocks.row_owner(k0, k1)
            first_rows = np.searchsorted(owner, np.arange(k1 - k0))
            amax = np.maximum.reduceat(np.maximum.reduceat(np.abs(values), starts, axis=1), first_rows, axis=0)
            if not np.isfinite(amax).all():
                raise ValueError(_NOT_FINITE)
            scales = np.where(amax > 0, amax / np.float32(E4M3_MAX), np.float32(1)).astype("<f4")
            if scales_only:
                return scales.tobytes()
            quantized = np.clip(values / scales[owner][:, columns], -E4M3_MAX, E4M3_MAX)
            return encode_e4m3fn(quantized).tobytes()

        return convert

    def pieces() -> Iterator[Piece]:
        for k0, k1 in blocks.groups(itemsize):
            span = (blocks.start(k0) * blocks.cols * itemsize, blocks.stop(k1 - 1) * blocks.cols * itemsize)
            yield Piece((span,), convert_for(k0, k1))

    return pieces()


# --- planners ------------------------------------------------------------------------------------------------


@step("dequantize_fp8", build=_build_dequantize, schema=_DEQUANTIZE_SCHEMA, invert=_invert_dequantize)
def plan_dequantize_fp8(args: DequantizeFp8, step: Step, entries: list[PlanEntry], ctx: PlanContext) -> StepOutcome:
    """Float8 weights and their block scales (`X_scale_inv`) become one bf16/fp16/fp32 tensor; the scales are
    consumed."""
    by_key = {e.key: e for e in entries}
    made: dict[str, PlanEntry] = {}
    consumed: set[str] = set()
    for entry in entries:
        if entry.meta.dtype not in FLOAT8 or not args.match.search(entry.key):
            continue
        scale_key = entry.key + args.scale_suffix
        scales = by_key.get(scale_key)
        if scales is None:
            ctx.errors.append(
                Problem(
                    step.where,
                    f"tensor '{entry.key}' is {entry.meta.dtype} but the checkpoint has no '{scale_key}' at this "
                    f"step; without its scales it cannot be dequantized (set `scale_suffix`, or leave it out of "
                    f"`match`)",
                )
            )
            continue
        try:
            expr = node(
                "fp8_dequantize",
                [entry.expr, scales.expr],
                step.where,
                block=tuple(args.block),
                dtype=args.dtype,
            )
        except OpShapeError as exc:
            ctx.errors.append(Problem(step.where, f"tensor '{entry.key}': {exc}"))
            continue
        steps = tuple(dict.fromkeys(entry.steps + scales.steps)) + (step.where,)
        made[entry.key] = PlanEntry(entry.key, expr, steps)
        consumed.add(scale_key)
    out = [made.get(e.key, e) for e in entries if e.key not in consumed]
    return StepOutcome(out, len(made))


@step(
    "quantize_fp8",
    build=_build_quantize,
    schema=_QUANTIZE_SCHEMA,
    invert=_invert_quantize,
    renames_keys=True,
    fans_out=True,
)
def plan_quantize_fp8(args: QuantizeFp8, step: Step, entries: list[PlanEntry], ctx: PlanContext) -> StepOutcome:
    """2-D floating-point weights become float8_e4m3fn values and float32 block scales (`X_scale_inv`), as
    DeepSeek-V3 quantizes them."""
    out: list[PlanEntry] = []
    hits = 0
    for entry in entries:
        meta = entry.meta
        if not args.match.search(entry.key) or len(meta.shape) != 2 or meta.dtype not in _QUANTIZABLE:
            out.append(entry)
            continue
        hits += 1
        try:
            values = node("fp8_quantize", [entry.expr], step.where, block=tuple(args.block), part="values")
            scales = node("fp8_quantize", [entry.expr], step.where, block=tuple(args.block), part="scales")
        except OpShapeError as exc:
            ctx.errors.append(Problem(step.where, f"tensor '{entry.key}': {exc}"))
            out.append(entry)
            continue
        out.append(entry.transformed(values, step.where))
        out.append(PlanEntry(entry.key + args.scale_suffix, scales, entry.steps + (step.where,)))
    return StepOutcome(out, hits)
