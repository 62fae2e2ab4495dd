"""The split step: one tensor into several along a dimension (fused q/k/v into q, k, v); its arguments, builder, schema
fragment, tensor ops, inverse (a merge) and planner."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckptx._lazy import lazy_module
from ckptx.dtypes import TensorMeta
from ckptx.errors import OpShapeError, Problem
from ckptx.ops.common import fill_template, normalize_dim, with_size
from ckptx.ops.regions import region_pieces
from ckptx.ops.registry import step
from ckptx.planning.context import PlanContext, StepOutcome
from ckptx.planning.entry import PlanEntry
from ckptx.planning.expr import Piece, node, tensor_op
from ckptx.rules.flatten import dump_args
from ckptx.rules.inverse import Ref, shifted, swap, template_parts, tidy
from ckptx.rules.kinds import Doc, StepTrace, object_schema
from ckptx.rules.steps import Collector, Pattern, Step, dim_arg
from ckptx.rules.templates import Template

if TYPE_CHECKING:  # pragma: no cover
    import torch
else:
    torch = lazy_module("torch")


@dataclass(frozen=True)
class Split:
    """Split matching tensors along `dim` into several keys (`into`: one whole-key template per piece,
    or one template using `{i}`); `sizes` or `parts` for unequal/equal chunks, `unbind` drops the dim."""

    match: Pattern
    into: tuple[Template, ...]
    dim: int = 0
    sizes: tuple[int, ...] | None = None
    parts: int | None = None
    unbind: bool = False

    @property
    def indexed(self) -> bool:
        """True when `into` is one template numbered by `{i}`."""
        return len(self.into) == 1 and self.into[0].uses("i")


def _build_split(value: Any, c: Collector) -> Split:
    match = c.regex(value["match"], "match")
    into_raw = value["into"]
    names = ("i",)
    into: tuple[Template, ...]
    if isinstance(into_raw, str):
        into = (c.template(into_raw, match, "invalid key template", "into", names=names),)
    else:
        into = tuple(c.template(t, match, "invalid key template", "into", k) for k, t in enumerate(into_raw))
    sizes = tuple(value["sizes"]) if "sizes" in value else None
    parts = value.get("parts")
    unbind = bool(value.get("unbind", False))
    chosen = [k for k in ("sizes", "parts", "unbind") if k in value and value[k] is not False]
    if len(chosen) > 1:
        c.problems.append(
            Problem(c.at(chosen[1]), f"give only one of sizes, parts and unbind (found {', '.join(chosen)})")
        )
    args = Split(match, into, dim_arg(value), sizes, parts, unbind)
    if isinstance(into_raw, str) and not args.indexed:
        c.problems.append(
            Problem(
                c.at("into"),
                "one key template must number the pieces with {i} "
                "(e.g. '\\1.{i}.weight'); or list one template per piece",
            )
        )
    elif isinstance(into_raw, str) and not chosen:
        c.problems.append(Problem(c.at(), "with a {i} template, say how many pieces: parts, sizes or unbind: true"))
    elif not isinstance(into_raw, str):
        if sizes is not None and len(sizes) != len(into):
            c.problems.append(
                Problem(c.at("sizes"), f"{len(sizes)} sizes for {len(into)} keys in `into`; give one size per key")
            )
        if parts is not None and parts != len(into):
            c.problems.append(Problem(c.at("parts"), f"parts: {parts} but `into` names {len(into)} keys"))
    return args


_SPLIT_SCHEMA = object_schema(
    description="Split one tensor into several keys along a dimension.",
    required=["match", "into"],
    properties={
        "match": {"$ref": "#/$defs/regex"},
        "into": {
            "anyOf": [
                {"$ref": "#/$defs/keyTemplate"},
                {"type": "array", "items": {"$ref": "#/$defs/keyTemplate"}, "minItems": 2},
            ],
            "description": (
                "One whole-key template per piece (e.g. ['\\1.q.\\2', '\\1.k.\\2', '\\1.v.\\2']), or "
                "one template numbering the pieces with {i}."
            ),
        },
        "dim": {"$ref": "#/$defs/dim"},
        "sizes": {
            "type": "array",
            "items": {"type": "integer", "minimum": 1},
            "minItems": 1,
            "description": "Size of each piece along dim (default: equal parts).",
        },
        "parts": {"type": "integer", "minimum": 1, "description": "Number of equal pieces (for an {i} template)."},
        "unbind": {
            "type": "boolean",
            "description": "Pieces of size 1 with dim removed (the inverse of merge with stack: true).",
        },
    },
)


def _invert_split(args: Split, step: Step, trace: StepTrace | None) -> list[Doc]:
    swapped = swap(args.match.pattern, args.into[0], whole=True)
    merge: Doc = {"match": swapped.pattern, "to": swapped.template, "dim": args.dim, "stack": args.unbind}
    if args.indexed:
        offset = next(
            p.offset for p in template_parts(args.into[0], swapped.groups) if isinstance(p, Ref) and p.group == "i"
        )
        merge["index"] = tidy(shifted(swapped.renumber["i"], -offset))
    else:
        merge["inputs"] = [swapped.rewrite(t, what="split key") for t in args.into]
    return [{"merge": merge}]


def _dump_split(args: Split) -> Any:
    value = dump_args(args)
    if args.indexed:
        value["into"] = args.into[0].text
    return value


def _infer_narrow(params: Mapping[str, Any], inputs: Sequence[TensorMeta]) -> TensorMeta:
    (meta,) = inputs
    dim, start, length = params["dim"], params["start"], params["length"]
    if start + length > meta.shape[dim]:
        raise OpShapeError(f"piece {start}:{start + length} exceeds size {meta.shape[dim]} of dim {dim}")
    return TensorMeta(with_size(meta.shape, dim, length), meta.dtype)


def _narrow_pieces(params: Mapping[str, Any], metas: Sequence[TensorMeta]) -> Iterator[Piece] | None:
    start = params["start"]
    return region_pieces(metas[0], params["dim"], slice(start, start + params["length"]))


@tensor_op("narrow", _infer_narrow, blockwise=_narrow_pieces)
def narrow(params: Mapping[str, Any], tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """`tensor.narrow(dim, start, length)`: one piece of a split."""
    return tensors[0].narrow(params["dim"], params["start"], params["length"])


def _infer_select(params: Mapping[str, Any], inputs: Sequence[TensorMeta]) -> TensorMeta:
    (meta,) = inputs
    return TensorMeta(with_size(meta.shape, params["dim"], None), meta.dtype)


def _select_pieces(params: Mapping[str, Any], metas: Sequence[TensorMeta]) -> Iterator[Piece] | None:
    (meta,) = metas
    if not meta.shape:
        return None
    dim = params["dim"] % len(meta.shape)
    index = params["index"] % meta.shape[dim] if meta.shape[dim] else 0
    return region_pieces(meta, dim, slice(index, index + 1))


@tensor_op("select", _infer_select, blockwise=_select_pieces)
def select(params: Mapping[str, Any], tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """`tensor.select(dim, index)`: one piece of an unbind."""
    return tensors[0].select(params["dim"], params["index"])


@step(
    "split",
    build=_build_split,
    schema=_SPLIT_SCHEMA,
    invert=_invert_split,
    renames_keys=True,
    dump=_dump_split,
    fans_out=True,
)
def plan_split(args: Split, step: Step, entries: list[PlanEntry], ctx: PlanContext) -> StepOutcome:
    """Each matching tensor becomes one entry per piece, each a narrow (or select, with unbind) of it."""
    out, hits = [], 0
    for entry in entries:
        match = args.match.search(entry.key)
        if match is None:
            out.append(entry)
            continue
        hits += 1
        try:
            out.extend(_split_entry(args, entry, match, step.where))
        except OpShapeError as exc:
            ctx.errors.append(Problem(step.where, f"tensor '{entry.key}' {list(entry.meta.shape)}: {exc}"))
            out.append(entry)
    return StepOutcome(out, hits)


def _split_entry(args: Split, entry: PlanEntry, match: Any, where: str) -> list[PlanEntry]:
    shape = entry.meta.shape
    dim = normalize_dim(args.dim, len(shape))
    size = shape[dim]
    if args.unbind:
        keys = _piece_keys(args, match, size)
        return [
            PlanEntry(k, node("select", [entry.expr], where, dim=dim, index=i), entry.steps + (where,))
            for i, k in enumerate(keys)
        ]
    count = len(args.sizes) if args.sizes is not None else args.parts or len(args.into)
    sizes = list(args.sizes) if args.sizes is not None else [size // count] * count
    if args.sizes is None and size % count:
        raise OpShapeError(f"size {size} of dim {dim} does not split into {count} equal parts; give sizes")
    if sum(sizes) != size:
        raise OpShapeError(f"sizes {sizes} add up to {sum(sizes)}, but dim {dim} has size {size}")
    keys = _piece_keys(args, match, count)
    pieces, start = [], 0
    for key, length in zip(keys, sizes):
        pieces.append(
            PlanEntry(
                key, node("narrow", [entry.expr], where, dim=dim, start=start, length=length), entry.steps + (where,)
            )
        )
        start += length
    return pieces


def _piece_keys(args: Split, match: Any, count: int) -> list[str]:
    if args.indexed:
        return [fill_template(args.into[0], match, i=i) for i in range(count)]
    if count != len(args.into):
        raise OpShapeError(f"{count} pieces but `into` names {len(args.into)} keys")
    return [fill_template(t, match) for t in args.into]
