"""The rotary permutation step: the row order of query/key projections between the two ways models pair the
dimensions that rotary position embedding rotates together.

Meta's reference Llama (and torchtitan's `ComplexRoPE`, llama.cpp's GGUF files) rotate *adjacent* rows of each
head as one pair (interleaved: 0-1, 2-3, ...); HuggingFace's Llama rotates the two *halves* of each head
(half-split: i and i + head_dim/2). transformers' `convert_llama_weights_to_hf.py` and torchtitan's state-dict
adapters reorder the rows of every q and k weight accordingly:

    interleaved -> half-split:  w.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)
    half-split -> interleaved:  w.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)

with `heads` the query heads for q and the key/value heads for k (grouped-query attention). Each is the other's
inverse. The head count of a tensor is its rows divided by the head size, which the step gives (`heads:` or
`head_dim:`) or which is read from the model's config: the target's (a model folder's `config.json`, a
transformers target) or the source's (`config.json` or Meta's `params.json` beside it). `permute_rotary` is the
tensor function, for other steps and formats (GGUF's Llama layout) to call.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckptx._lazy import lazy_module
from ckptx.dtypes import TensorMeta
from ckptx.errors import OpShapeError, Problem
from ckptx.ops.common import apply_to_matching
from ckptx.ops.registry import step
from ckptx.planning.context import PlanContext, StepOutcome
from ckptx.planning.entry import PlanEntry
from ckptx.planning.expr import Piece, tensor_op
from ckptx.rules.kinds import Doc, StepTrace, object_schema
from ckptx.rules.steps import Collector, Pattern, Step

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch
else:
    np = lazy_module("numpy")
    torch = lazy_module("torch")

__all__ = [
    "HALF_SPLIT",
    "INTERLEAVED",
    "RotaryPermute",
    "head_dim_from_configs",
    "permute_rotary",
    "rotary_heads",
    "rotary_pieces",
]

HALF_SPLIT = "half_split"
INTERLEAVED = "interleaved"
AUTO = "auto"
_ORDERS = (HALF_SPLIT, INTERLEAVED)


# --- what the step says: arguments, builder, schema fragment, inverse --------------------------------------


@dataclass(frozen=True)
class RotaryPermute:
    """Reorder the rows of matching q/k projections to the rotary pairing `to` (from the other one); `heads` or
    `head_dim` fix the head count, else the head size is read from the model's config."""

    match: Pattern
    to: str
    heads: int | None = None
    head_dim: int | None = None


def _build(value: Any, c: Collector) -> RotaryPermute:
    heads = value.get("heads")
    head_dim = value.get("head_dim", AUTO)
    if heads is not None and head_dim != AUTO:
        c.problems.append(Problem(c.at("heads"), "give heads or head_dim, not both"))
    for name, number in (("heads", heads), ("head_dim", head_dim)):
        if isinstance(number, str) and number != AUTO or isinstance(number, bool):
            c.problems.append(Problem(c.at(name), f"must be a positive integer{' or auto' * (name == 'head_dim')}"))
    return RotaryPermute(
        c.regex(value["match"], "match"),
        value["to"],
        heads if isinstance(heads, int) and not isinstance(heads, bool) else None,
        head_dim if isinstance(head_dim, int) and not isinstance(head_dim, bool) else None,
    )


_SCHEMA = object_schema(
    description="Reorder the rows of q/k projections between interleaved and half-split rotary pairing.",
    required=["match", "to"],
    properties={
        "match": {"$ref": "#/$defs/regex"},
        "to": {
            "enum": list(_ORDERS),
            "description": (
                "half_split: from Meta's interleaved pairs to HuggingFace's halves; interleaved: the other way."
            ),
        },
        "heads": {
            "anyOf": [{"type": "integer", "minimum": 1}, {"type": "string"}],
            "description": "Heads of every matching tensor (rows = heads x head size).",
        },
        "head_dim": {
            "anyOf": [{"type": "integer", "minimum": 2}, {"type": "string"}],
            "description": (
                "The head size: each tensor's heads are its rows / head_dim (q and k of grouped-query attention "
                "alike). auto (the default): read from the target's or the source's config."
            ),
        },
    },
)


def _invert(args: RotaryPermute, step: Step, trace: StepTrace | None) -> list[Doc]:
    inverse: Doc = {"match": args.match.pattern, "to": INTERLEAVED if args.to == HALF_SPLIT else HALF_SPLIT}
    if args.heads is not None:
        inverse["heads"] = args.heads
    if args.head_dim is not None:
        inverse["head_dim"] = args.head_dim
    return [{"rotary_permute": inverse}]


# --- how it plans and computes ---------------------------------------------------------------------------


def rotary_heads(rows: int, heads: int) -> int:
    """Rows per half head; OpShapeError when `rows` is not `heads` heads of an even size."""
    if heads <= 0 or rows % heads or (rows // heads) % 2:
        raise OpShapeError(f"{rows} rows are not {heads} heads of an even size")
    return rows // heads // 2


def permute_rotary(tensor: torch.Tensor, heads: int, to: str) -> torch.Tensor:
    """`tensor`'s rows (dim 0: a weight [rows, cols] or a bias [rows]) reordered to the rotary pairing `to`."""
    rows, rest = tensor.shape[0], tuple(tensor.shape[1:])
    half = rotary_heads(rows, heads)
    split = (heads, half, 2) if to == HALF_SPLIT else (heads, 2, half)
    return tensor.reshape(*split, *rest).transpose(1, 2).reshape(rows, *rest)


def _infer(params: Mapping[str, Any], inputs: Sequence[TensorMeta]) -> TensorMeta:
    (meta,) = inputs
    if not meta.shape:
        raise OpShapeError("a scalar has no rows to reorder")
    rotary_heads(meta.shape[0], params["heads"])
    return meta


def rotary_pieces(params: Mapping[str, Any], metas: Sequence[TensorMeta]) -> Iterator[Piece] | None:
    """The reordering as a byte kernel, without torch: one piece per head (its rows are contiguous in the input and
    in the output), the rows moved as whole byte strings. Same bytes as `permute_rotary`."""
    (meta,) = metas
    if not meta.shape or not meta.numel:
        return None
    rows, heads = meta.shape[0], params["heads"]
    half = rotary_heads(rows, heads)
    row_bytes = meta.nbytes // rows
    split = (half, 2) if params["to"] == HALF_SPLIT else (2, half)
    head_bytes = 2 * half * row_bytes

    def convert(data: Sequence[bytes]) -> bytes:
        head = np.frombuffer(data[0], dtype=np.uint8).reshape(*split, row_bytes)
        return head.transpose(1, 0, 2).tobytes()

    return (Piece(((h * head_bytes, (h + 1) * head_bytes),), convert) for h in range(heads))


@tensor_op("rotary_permute", _infer, blockwise=rotary_pieces)
def rotary_permute(params: Mapping[str, Any], tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The rows reordered between interleaved and half-split rotary pairs (`permute_rotary`)."""
    return permute_rotary(tensors[0], params["heads"], params["to"])


_HEAD_DIM_FIELDS = (
    # (what a config calls the head size) or (its width, its query heads): HuggingFace, Meta/torchtitan
    ("head_dim", None),
    ("hidden_size", "num_attention_heads"),
    ("dim", "n_heads"),
)


def head_dim_from_configs(configs: Sequence[tuple[str, Mapping[str, Any]]]) -> tuple[int, str] | None:
    """The head size the configs state, with where it was read; OpShapeError when two of them disagree (a q/k
    reordered with the wrong head size loads and computes something else)."""
    found: list[tuple[int, str]] = []
    for name, doc in configs:
        for size, heads in _HEAD_DIM_FIELDS:
            value = _positive(doc.get(size))
            if value is None:
                continue
            if heads is None:
                found.append((value, f"{name} ({size}={value})"))
                break
            count = _positive(doc.get(heads))
            if count is not None and value % count == 0:
                found.append((value // count, f"{name} ({size}={value} / {heads}={count})"))
                break
    if not found:
        return None
    sizes = {size for size, _ in found}
    if len(sizes) > 1:
        raise OpShapeError(
            f"the configs disagree on the head size: {' vs '.join(where for _, where in found)}; "
            f"give head_dim in the step (or --set head_dim=N)"
        )
    return found[0]


def _positive(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


@step("rotary_permute", build=_build, schema=_SCHEMA, invert=_invert)
def plan_rotary_permute(args: RotaryPermute, step: Step, entries: list[PlanEntry], ctx: PlanContext) -> StepOutcome:
    """Reorder the rows of matching q/k projections between interleaved and half-split rotary pairs."""
    known: list[tuple[int, str] | None] = []

    def head_dim() -> int:
        if args.head_dim is not None:
            return args.head_dim
        if not known:
            known.append(head_dim_from_configs(ctx.configs))
        if known[0] is None:
            raise OpShapeError(
                "its heads are not known: give heads or head_dim in the step (--set head_dim=N where the recipe "
                "declares it), or a config that states them: --target DIR/ with a config.json, or a config.json "
                "(params.json) beside the source"
            )
        return known[0][0]

    def build(entry: PlanEntry) -> dict[str, Any] | None:
        rows = entry.meta.shape[0] if entry.meta.shape else 0
        heads = args.heads if args.heads is not None else rows // head_dim() if rows % head_dim() == 0 else 0
        if heads == 0:
            raise OpShapeError(f"{rows} rows are not a whole number of heads of size {head_dim()}")
        return {"heads": heads, "to": args.to}

    return apply_to_matching(step, entries, ctx, args.match, build)
