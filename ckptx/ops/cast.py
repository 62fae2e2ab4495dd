"""The cast step: change the dtype of matching tensors.

Casts among float16, bfloat16, float32 and float64 also have a byte kernel (numpy, no torch) that gives
the bytes torch's `.to()` gives, so the writer streams them in chunks: no torch start-up, and memory
bounded by the chunk rather than the tensor. Like torch, a float64 source is rounded to float32 first
(`c10::Half` and `c10::BFloat16` are built from a float). NaN bit patterns are torch's business (which payload
survives, whether a signaling NaN is quieted, 0xFFFF or 0x7FC0 for bfloat16 differ between its scalar and
vectorized paths and between releases): a chunk that holds a NaN is converted by torch itself, so every output
byte is the byte torch's `.to()` writes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckptx._lazy import lazy_module
from ckptx.dtypes import DTYPES, TensorMeta, lookup, lossless_casts
from ckptx.errors import NotInvertible
from ckptx.ops.common import apply_to_matching
from ckptx.ops.registry import step
from ckptx.planning.context import PlanContext, StepOutcome
from ckptx.planning.entry import PlanEntry
from ckptx.planning.expr import Converter, tensor_op
from ckptx.rules.inverse import all_matched_changed, changed_metas, exact_keys
from ckptx.rules.kinds import Doc, StepTrace, object_schema
from ckptx.rules.steps import Collector, Pattern, Step

if TYPE_CHECKING:  # pragma: no cover
    import torch
else:
    torch = lazy_module("torch")
if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
else:
    np = lazy_module("numpy")


# --- what the steps say: arguments, builders, schema fragments, inverses ---------------------------------


@dataclass(frozen=True)
class Cast:
    """Cast matching tensors to `dtype` (floating-point ones only unless include_integer)."""

    match: Pattern
    dtype: str
    include_integer: bool = False


def _build_cast(value: Any, c: Collector) -> Cast:
    return Cast(c.regex(value.get("match", ".*"), "match"), value["dtype"], bool(value.get("include_integer", False)))


_CAST_SCHEMA = object_schema(
    required=["dtype"],
    properties={
        "match": {"$ref": "#/$defs/regex"},
        "dtype": {"$ref": "#/$defs/dtype"},
        "include_integer": {
            "type": "boolean",
            "description": "Also cast integer and bool tensors (default: floating-point only).",
        },
    },
)


def _invert_cast(args: Cast, step: Step, trace: StepTrace | None) -> list[Doc]:
    changed = changed_metas(trace, "dtypes")
    groups: dict[str, list[str]] = {}
    for key, old, new in changed:
        if new.dtype not in lossless_casts(old.dtype):
            raise NotInvertible(f"casting '{key}' from {old.dtype} to {new.dtype} loses information")
        groups.setdefault(old.dtype, []).append(key)
    if len(groups) == 1 and all_matched_changed(args.match, trace, changed):
        return [{"cast": {"match": args.match.pattern, "dtype": next(iter(groups)), "include_integer": True}}]
    return [
        {"cast": {"match": exact_keys(keys), "dtype": dtype, "include_integer": True}} for dtype, keys in groups.items()
    ]


# --- how they plan and compute --------------------------------------------------------------------------


_FLOAT_CODES = {d.name: d.numpy for d in DTYPES.values() if d.is_floating and d.numpy}  # float16/32/64
_BYTE_CASTS = {*_FLOAT_CODES, "bfloat16"}
# Raw bits of each float type: (unsigned code, the bits without the sign, the bits of infinity); a value is NaN when
# its bits without the sign exceed infinity's.
_BITS = {
    "float16": ("<u2", 0x7FFF, 0x7C00),
    "bfloat16": ("<u2", 0x7FFF, 0x7F80),
    "float32": ("<u4", 0x7FFF_FFFF, 0x7F80_0000),
    "float64": ("<u8", 0x7FFF_FFFF_FFFF_FFFF, 0x7FF0_0000_0000_0000),
}
# Elements converted at a time: the temporaries of one block (128 KiB of float32) stay in the core's cache. The
# float32 -> bfloat16 kernel converted 2.2-2.4 GB/s of input on one core in blocks of 32 Ki elements, 1.0 GB/s in
# blocks of 1 Mi, 0.64 GB/s on whole 8 MiB chunks as plain numpy expressions (2-core machine, 256 MiB in 8 MiB chunks).
_BLOCK = 32 * 1024


def _infer_cast(params: Mapping[str, Any], inputs: Sequence[TensorMeta]) -> TensorMeta:
    (meta,) = inputs
    return TensorMeta(meta.shape, params["dtype"])


def _cast_bytes(params: Mapping[str, Any], meta: TensorMeta) -> Converter | None:
    source, target = meta.dtype, params["dtype"]
    if source not in _BYTE_CASTS or target not in _BYTE_CASTS:
        return None
    return lambda data: _convert_chunk(data, source, target)


def _convert_chunk(data: bytes, source: str, target: str) -> memoryview:
    """One chunk cast by the numpy kernel, block by block; by torch when it holds a NaN (see the module docstring)."""
    bits_code, magnitude, infinity = _BITS[source]
    bits = np.frombuffer(data, dtype=bits_code)
    out = np.empty(bits.size, dtype=_BITS[target][0])
    scratch = np.empty(min(_BLOCK, bits.size), dtype=bits_code)
    wide = np.empty(min(_BLOCK, bits.size), dtype="<u4") if target == "bfloat16" else None
    with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf is the cast's meaning, as in torch
        for start in range(0, bits.size, _BLOCK):
            block = bits[start : start + _BLOCK]
            check = scratch[: block.size]
            np.bitwise_and(block, magnitude, out=check)
            if check.max() > infinity:
                return _torch_chunk(data, source, target)
            _cast_block(block, out[start : start + _BLOCK], source, target, wide)
    return out.view(np.uint8).data


def _torch_chunk(data: bytes, source: str, target: str) -> memoryview:
    tensor = torch.frombuffer(bytearray(data), dtype=DTYPES[source].torch)
    return memoryview(tensor.to(DTYPES[target].torch).view(torch.uint8).numpy().tobytes())


def _cast_block(bits: Any, out: Any, source: str, target: str, wide: Any) -> None:
    """Cast one block of raw `source` bits into `out` (raw `target` bits), rounding to nearest even as torch does."""
    if source == "float32" and target == "bfloat16":
        _round_to_bfloat16(bits, out, wide[: bits.size])
        return
    values = _decode(bits, source)
    if target == "float64":
        out.view("<f8")[...] = values
        return
    single = values.astype("<f4", copy=False)  # like torch, a float64 is rounded to float32 first
    if target == "bfloat16":
        _round_to_bfloat16(single.view("<u4"), out, wide[: bits.size])
    else:
        out.view(_FLOAT_CODES[target])[...] = single


def _round_to_bfloat16(bits: Any, out: Any, wide: Any) -> None:
    """float32 bits rounded to the upper 16 (nearest, ties to even): (bits + 0x7FFF + the kept lowest bit) >> 16,
    in place in `wide`, the last shift written straight into `out`."""
    np.right_shift(bits, 16, out=wide)
    wide &= 1
    wide += bits
    wide += 0x7FFF
    np.right_shift(wide, 16, out=out, casting="unsafe")


def _decode(bits: Any, dtype: str) -> Any:
    """Raw bits of `dtype` as a float32 or float64 numpy array (exact: both hold every value)."""
    if dtype == "bfloat16":
        return (bits.astype("<u4") << 16).view("<f4")
    values = bits.view(_FLOAT_CODES[dtype])
    return values.astype("<f4") if dtype == "float16" else values


@tensor_op("cast", _infer_cast, elementwise=_cast_bytes)
def cast(params: Mapping[str, Any], tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """`tensor.to(dtype)`."""
    return tensors[0].to(getattr(torch, params["dtype"]))


@step("cast", build=_build_cast, schema=_CAST_SCHEMA, invert=_invert_cast)
def plan_cast(args: Cast, step: Step, entries: list[PlanEntry], ctx: PlanContext) -> StepOutcome:
    """Cast matching floating-point tensors (all matching tensors with include_integer)."""

    def build(entry: PlanEntry) -> dict[str, Any] | None:
        if entry.meta.dtype == args.dtype:
            return None
        if not lookup(entry.meta.dtype).is_floating and not args.include_integer:
            return None
        return {"dtype": args.dtype}

    return apply_to_matching(step, entries, ctx, args.match, build)
