"""The cast step: change the dtype of matching tensors.

Casts among float16, bfloat16, float32 and float64 also have a byte kernel (numpy, no torch) that gives
the bytes torch's `.to()` gives, so the writer streams them in chunks: no torch start-up, and memory
bounded by the chunk rather than the tensor. Like torch, a float64 source is rounded to float32 first
(`c10::Half` and `c10::BFloat16` are built from a float). A NaN cast to bfloat16 becomes 0x7FC0, the NaN of
torch's scalar conversion (its vectorized one writes 0xFFFF; both are NaN).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from ckptx._lazy import lazy_module
from ckptx.ops.layout import apply_to_matching
from ckptx.dtypes import DTYPES, lookup
from ckptx.ops.registry import PlanContext, PlanEntry, StepOutcome, TensorMeta, step_planner, tensor_op
from ckptx.rules.steps import Cast, Step

torch = lazy_module("torch")
np = lazy_module("numpy")

_FLOAT_CODES = {d.name: d.numpy for d in DTYPES.values() if d.is_floating and d.numpy}  # float16/32/64
_BYTE_CASTS = {*_FLOAT_CODES, "bfloat16"}


def _infer_cast(params: Mapping[str, Any], inputs: Sequence[TensorMeta]) -> TensorMeta:
    (meta,) = inputs
    return TensorMeta(meta.shape, params["dtype"])


def _cast_bytes(params: Mapping[str, Any], meta: TensorMeta) -> Callable[[bytes], bytes] | None:
    source, target = meta.dtype, params["dtype"]
    if source not in _BYTE_CASTS or target not in _BYTE_CASTS:
        return None
    return lambda data: _encode(_decode(data, source), target)


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
        rounded[np.isnan(single)] = 0x7FC0
        return rounded.tobytes()


@tensor_op("cast", _infer_cast, elementwise=_cast_bytes)
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
        if not lookup(entry.meta.dtype).is_floating and not args.include_integer:
            return None
        return {"dtype": args.dtype}

    return apply_to_matching(step, entries, ctx, args.match, build)
