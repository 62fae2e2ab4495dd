"""The merge step: several tensors into one along a dimension (concatenated or stacked); its arguments, builder, schema
fragment, tensor op, inverse (a split) and planner."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckptx._lazy import lazy_module
from ckptx.dtypes import TensorMeta
from ckptx.errors import NotInvertible, OpShapeError, Problem
from ckptx.ops.common import dim_size, fill_template, normalize_dim, with_size
from ckptx.ops.regions import join_pieces
from ckptx.ops.registry import step
from ckptx.planning.context import PlanContext, StepOutcome
from ckptx.planning.entry import PlanEntry
from ckptx.planning.expr import Piece, node, tensor_op
from ckptx.rules.inverse import Group, Ref, parse_pattern, spare_placeholder, swap, template_parts
from ckptx.rules.kinds import Doc, StepTrace, object_schema
from ckptx.rules.steps import Collector, Pattern, Step, dim_arg
from ckptx.rules.templates import Template

if TYPE_CHECKING:  # pragma: no cover
    import torch
else:
    torch = lazy_module("torch")


@dataclass(frozen=True)
class Merge:
    """Merge several keys into one (`to`) by concatenation or, with `stack`, stacking along `dim`.

    The order is explicit: `inputs` lists whole-key templates filled from `match`'s groups, or
    `index` is a template whose value (0..n-1) is each matching key's position.
    """

    match: Pattern
    to: Template
    inputs: tuple[Template, ...] = ()
    index: Template | None = None
    dim: int = 0
    stack: bool = False


def _build_merge(value: Any, c: Collector) -> Merge:
    match = c.regex(value["match"], "match")
    inputs = tuple(
        c.template(t, match, "invalid key template", "inputs", k) for k, t in enumerate(value.get("inputs", ()))
    )
    index = c.template(value["index"], match, "invalid index template", "index") if "index" in value else None
    if ("inputs" in value) == ("index" in value):
        c.problems.append(
            Problem(
                c.at(),
                "give the order either as `inputs` (a list of key templates) or as "
                "`index` (the position of each matching key, e.g. '\\2')",
            )
        )
    to = c.template(value["to"], match, "invalid key template", "to")
    return Merge(match, to, inputs, index, dim_arg(value), bool(value.get("stack", False)))


_MERGE_SCHEMA = object_schema(
    description="Merge several keys into one by concatenation or stacking, in an explicit order.",
    required=["match", "to"],
    properties={
        "match": {"$ref": "#/$defs/regex"},
        "inputs": {
            "type": "array",
            "items": {"$ref": "#/$defs/keyTemplate"},
            "minItems": 2,
            "description": "The keys to merge, in order: whole-key templates filled from match's groups.",
        },
        "index": {
            "$ref": "#/$defs/keyTemplate",
            "description": "Instead of inputs: the position (0..n-1) of each matching key, e.g. '\\2'.",
        },
        "to": {"$ref": "#/$defs/keyTemplate", "description": "The merged key, a whole-key template."},
        "dim": {"$ref": "#/$defs/dim"},
        "stack": {"type": "boolean", "description": "torch.stack (a new dimension) instead of torch.cat."},
    },
)


def _merged_sizes(args: Merge, trace: StepTrace | None) -> list[int]:
    """The sizes along dim of the pieces each merge concatenated (the same for every merged key)."""
    if trace is None or trace.after is None:
        raise NotInvertible(
            "the sizes of the concatenated pieces are not in the rule; the source layout is needed", needs_layout=True
        )
    before = dict(trace.before)
    pieces: dict[str, dict[int, int]] = {}
    for key, meta in trace.before:
        match = args.match.search(key)
        if match is None:
            continue
        to = args.to.expand(match)
        if args.index is not None:
            pieces.setdefault(to, {})[int(args.index.expand(match))] = dim_size(meta.shape, args.dim)
        else:
            names = [t.expand(match) for t in args.inputs]
            pieces[to] = {i: dim_size(before[n].shape, args.dim) for i, n in enumerate(names) if n in before}
    found = {tuple(sizes[i] for i in sorted(sizes)) for sizes in pieces.values()}
    if len(found) != 1:
        raise NotInvertible("the merged keys concatenate pieces of different sizes; no single split undoes them")
    return list(found.pop())


def _invert_merge(args: Merge, step: Step, trace: StepTrace | None) -> list[Doc]:
    groups = tuple(p for p in parse_pattern(args.match.pattern)[2] if isinstance(p, Group))
    index_ref = None
    if args.index is not None:
        parts = template_parts(args.index, groups)
        if len(parts) != 1 or not isinstance(parts[0], Ref):
            raise NotInvertible(f"index {args.index.text!r} must be one group reference")
        index_ref = parts[0]
    swapped = swap(args.match.pattern, args.to, whole=True, spare=(index_ref.group,) if index_ref else ())
    split: Doc = {"match": swapped.pattern, "dim": args.dim}
    if index_ref is not None:
        piece = (
            "{i}" if not index_ref.offset else f"{{i {'-' if index_ref.offset > 0 else '+'} {abs(index_ref.offset)}}}"
        )
        split["into"] = swapped.template.replace(spare_placeholder(index_ref.group), piece)
    else:
        split["into"] = [swapped.rewrite(t, what="merge input") for t in args.inputs]
    if args.stack:
        return [{"split": {**split, "unbind": True}}]
    sizes = _merged_sizes(args, trace)
    if len(set(sizes)) > 1:
        split["sizes"] = sizes
    elif index_ref is not None:
        split["parts"] = len(sizes)
    return [{"split": split}]


def _infer_join(params: Mapping[str, Any], inputs: Sequence[TensorMeta]) -> TensorMeta:
    dim, stack = params["dim"], params["stack"]
    first = inputs[0]
    dtypes = {m.dtype for m in inputs}
    if len(dtypes) > 1:
        raise OpShapeError(f"inputs have different dtypes ({', '.join(sorted(dtypes))}); cast them first")
    if stack:
        if any(m.shape != first.shape for m in inputs):
            raise OpShapeError(f"stack needs equal shapes, got {', '.join(str(list(m.shape)) for m in inputs)}")
        return TensorMeta(first.shape[:dim] + (len(inputs),) + first.shape[dim:], first.dtype)
    rest = [with_size(m.shape, dim, None) for m in inputs]
    if any(r != rest[0] for r in rest) or any(len(m.shape) != len(first.shape) for m in inputs):
        raise OpShapeError(
            f"cat along dim {dim} needs equal other dims, got {', '.join(str(list(m.shape)) for m in inputs)}"
        )
    return TensorMeta(with_size(first.shape, dim, sum(m.shape[dim] for m in inputs)), first.dtype)


def _join_pieces(params: Mapping[str, Any], metas: Sequence[TensorMeta]) -> Iterator[Piece] | None:
    return join_pieces(metas, params["dim"], params["stack"])


@tensor_op("join", _infer_join, blockwise=_join_pieces)
def join(params: Mapping[str, Any], tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """`torch.stack` or `torch.cat` of the inputs along `dim`."""
    return (torch.stack if params["stack"] else torch.cat)(list(tensors), dim=params["dim"])


@step("merge", build=_build_merge, schema=_MERGE_SCHEMA, invert=_invert_merge, renames_keys=True)
def plan_merge(args: Merge, step: Step, entries: list[PlanEntry], ctx: PlanContext) -> StepOutcome:
    """Groups of keys become one concatenated or stacked tensor, in the order the step gives."""
    by_key = {e.key: e for e in entries}
    groups: dict[str, list[str]] = {}
    positions: dict[str, dict[int, str]] = {}
    for entry in entries:
        match = args.match.search(entry.key)
        if match is None:
            continue
        try:
            to = fill_template(args.to, match)
            if args.index is not None:
                index = int(fill_template(args.index, match))
                previous = positions.setdefault(to, {}).setdefault(index, entry.key)
                if previous != entry.key:
                    raise OpShapeError(f"'{previous}' and '{entry.key}' both have position {index} in '{to}'")
            else:
                inputs = [fill_template(t, match) for t in args.inputs]
                if groups.setdefault(to, inputs) != inputs:
                    raise OpShapeError(f"'{to}' is made from {groups[to]} and from {inputs}; make `to` distinct")
        except (OpShapeError, ValueError) as exc:
            ctx.errors.append(Problem(step.where, f"tensor '{entry.key}': {exc}"))
    for to, found in positions.items():
        missing = sorted(set(range(len(found))) - set(found))
        if missing:
            ctx.errors.append(
                Problem(
                    step.where, f"'{to}': positions {sorted(found)} are not 0..{len(found) - 1} (missing {missing})"
                )
            )
            continue
        groups[to] = [found[i] for i in range(len(found))]
    return _merged(step, args, entries, by_key, groups, ctx)


def _merged(
    step: Step,
    args: Merge,
    entries: list[PlanEntry],
    by_key: Mapping[str, PlanEntry],
    groups: Mapping[str, list[str]],
    ctx: PlanContext,
) -> StepOutcome:
    made: dict[str, PlanEntry] = {}
    claimed: dict[str, str] = {}
    for to, inputs in groups.items():
        shared = [k for k in inputs if claimed.setdefault(k, to) != to]
        if shared:
            ctx.errors.append(
                Problem(
                    step.where,
                    f"'{shared[0]}' would be merged into both '{claimed[shared[0]]}' "
                    f"and '{to}'; a tensor can go into one merged key only: `copy` it "
                    f"under a second name first",
                )
            )
            continue
        absent = [k for k in inputs if k not in by_key]
        if absent:
            ctx.errors.append(
                Problem(
                    step.where,
                    f"'{to}' needs {', '.join(repr(k) for k in absent)}, "
                    f"which the checkpoint does not have at this step",
                )
            )
            continue
        parts = [by_key[k] for k in inputs]
        try:
            ndim = len(parts[0].meta.shape)
            dim = normalize_dim(args.dim, ndim, extra=1 if args.stack else 0)
            expr = node("join", [p.expr for p in parts], step.where, dim=dim, stack=args.stack)
        except OpShapeError as exc:
            ctx.errors.append(Problem(step.where, f"'{to}' from {', '.join(inputs)}: {exc}"))
            continue
        made[inputs[0]] = PlanEntry(to, expr, tuple(dict.fromkeys(s for p in parts for s in p.steps)) + (step.where,))
    used = {k for to, inputs in groups.items() if inputs[0] in made for k in inputs}
    out = [made[e.key] if e.key in made else e for e in entries if e.key in made or e.key not in used]
    return StepOutcome(out, len(used))
