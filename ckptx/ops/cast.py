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

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckptx._lazy import lazy_module
from ckptx.dtypes import DTYPES, TensorMeta, lookup, lossless_casts
from ckptx.errors import NotInvertible
from ckptx.ops.common import apply_to_matching
from ckptx.ops.registry import step
from ckptx.planning.context import PlanContext, StepOutcome
from ckptx.planning.entry import PlanEntry
from ckptx.planning.expr import tensor_op
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


def _infer_cast(params: Mapping[str, Any], inputs: Sequence[TensorMeta]) -> TensorMeta:
    (meta,) = inputs
    return TensorMeta(meta.shape, params["dtype"])


def _cast_bytes(params: Mapping[str, Any], meta: TensorMeta) -> Callable[[bytes], bytes] | None:
    source, target = meta.dtype, params["dtype"]
    if source not in _BYTE_CASTS or target not in _BYTE_CASTS:
        return None
    return lambda data: _convert_chunk(data, source, target)


def _convert_chunk(data: bytes, source: str, target: str) -> bytes:
    """One chunk cast by the numpy kernel; by torch when it holds a NaN (see the module docstring)."""
    values = _decode(data, source)
    if np.isnan(values).any():
        tensor = torch.frombuffer(bytearray(data), dtype=DTYPES[source].torch)
        return tensor.to(DTYPES[target].torch).view(torch.uint8).numpy().tobytes()
    return _encode(values, target)


def _decode(data: bytes, dtype: str) -> Any:
    """Little-endian bytes of `dtype` as a float32 or float64 numpy array (exact: both hold every value)."""
    if dtype == "bfloat16":
        return (np.frombuffer(data, dtype="<u2").astype("<u4") << 16).view("<f4")
    values = np.frombuffer(data, dtype=_FLOAT_CODES[dtype])
    return values.astype("<f4") if dtype == "float16" else values


def _encode(values: Any, dtype: str) -> bytes:
    """`values` rounded to `dtype` (round to nearest even, as torch), as little-endian bytes."""
    with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf is the cast's meaning, as in torch
        if dtype == "float64":
            return values.astype("<f8").tobytes()
        single = values.astype("<f4", copy=False)
        if dtype != "bfloat16":
            return single.astype(_FLOAT_CODES[dtype], copy=False).tobytes()
        bits = single.view("<u4")
        rounded = ((bits + ((bits >> 16) & 1) + 0x7FFF) >> 16).astype("<u2")
        return rounded.tobytes()


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
