"""Steps that change which tensors exist and their dimensions: split, merge, unsqueeze, squeeze, slice, copy."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckptx._lazy import lazy_module
from ckptx.dtypes import TensorMeta
from ckptx.errors import KeyTemplateError, NotInvertible, OpShapeError, Problem
from ckptx.ops.layout import apply_to_matching
from ckptx.ops.registry import step
from ckptx.planning.context import PlanContext, StepOutcome, StepPlanner
from ckptx.planning.entry import PlanEntry
from ckptx.planning.expr import node, tensor_op
from ckptx.rules.flatten import dump_args
from ckptx.rules.inverse import Group, Ref, parse_pattern, shifted, spare_placeholder, swap, template_parts, tidy
from ckptx.rules.kinds import Doc, StepTrace, object_schema
from ckptx.rules.steps import Collector, Pattern, Step, dim_arg
from ckptx.rules.templates import Template

if TYPE_CHECKING:  # pragma: no cover
    import torch
else:
    torch = lazy_module("torch")


# --- what the steps say: arguments, builders, schema fragments, inverses ---------------------------------


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


@dataclass(frozen=True)
class Unsqueeze:
    """Insert a dimension of size 1 at `dim`."""

    match: Pattern
    dim: int


@dataclass(frozen=True)
class Squeeze(Unsqueeze):
    """Remove dimension `dim`, which must have size 1."""


@dataclass(frozen=True)
class Slice:
    """Keep `start:stop:step` of dimension `dim` (Python slice semantics)."""

    match: Pattern
    dim: int
    start: int | None = None
    stop: int | None = None
    step: int = 1


@dataclass(frozen=True)
class Copy:
    """Also store each matching tensor under the key `to` (a whole-key template)."""

    match: Pattern
    to: Template


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


def _build_copy(value: Any, c: Collector) -> Copy:
    match = c.regex(value["match"], "match")
    return Copy(match, c.template(value["to"], match, "invalid key template", "to"))


def _build_unsqueeze(value: Any, c: Collector) -> Unsqueeze:
    return Unsqueeze(c.regex(value["match"], "match"), int(value["dim"]))


def _build_squeeze(value: Any, c: Collector) -> Squeeze:
    return Squeeze(c.regex(value["match"], "match"), int(value["dim"]))


def _build_slice(value: Any, c: Collector) -> Slice:
    return Slice(
        c.regex(value["match"], "match"),
        int(value["dim"]),
        value.get("start"),
        value.get("stop"),
        int(value.get("step", 1)),
    )


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

_UNSQUEEZE_SCHEMA = object_schema(
    description="Insert a dimension of size 1.",
    required=["match", "dim"],
    properties={"match": {"$ref": "#/$defs/regex"}, "dim": {"$ref": "#/$defs/dim"}},
)

_SQUEEZE_SCHEMA = object_schema(
    description="Remove a dimension of size 1.",
    required=["match", "dim"],
    properties={"match": {"$ref": "#/$defs/regex"}, "dim": {"$ref": "#/$defs/dim"}},
)

_SLICE_SCHEMA = object_schema(
    description="Keep start:stop:step of one dimension (Python slice semantics).",
    required=["match", "dim"],
    properties={
        "match": {"$ref": "#/$defs/regex"},
        "dim": {"$ref": "#/$defs/dim"},
        "start": {"type": "integer"},
        "stop": {"type": "integer"},
        "step": {"type": "integer", "minimum": 1},
    },
)

_COPY_SCHEMA = object_schema(
    description="Also store each matching tensor under a second key.",
    required=["match", "to"],
    properties={"match": {"$ref": "#/$defs/regex"}, "to": {"$ref": "#/$defs/keyTemplate"}},
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
            pieces.setdefault(to, {})[int(args.index.expand(match))] = _dim_size(meta.shape, args.dim)
        else:
            names = [t.expand(match) for t in args.inputs]
            pieces[to] = {i: _dim_size(before[n].shape, args.dim) for i, n in enumerate(names) if n in before}
    found = {tuple(sizes[i] for i in sorted(sizes)) for sizes in pieces.values()}
    if len(found) != 1:
        raise NotInvertible("the merged keys concatenate pieces of different sizes; no single split undoes them")
    return list(found.pop())


def _dim_size(shape: Sequence[int], dim: int) -> int:
    return shape[dim if dim >= 0 else len(shape) + dim]


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


def _invert_unsqueeze(args: Unsqueeze, step: Step, trace: StepTrace | None) -> list[Doc]:
    inverse = "unsqueeze" if isinstance(args, Squeeze) else "squeeze"
    return [{inverse: {"match": args.match.pattern, "dim": args.dim}}]


def _invert_copy(args: Copy, step: Step, trace: StepTrace | None) -> list[Doc]:
    return [{"drop": [swap(args.match.pattern, args.to, whole=True).pattern]}]


def _dump_split(args: Split) -> Any:
    value = dump_args(args)
    if args.indexed:
        value["into"] = args.into[0].text
    return value


# --- how they plan and compute --------------------------------------------------------------------------


def normalize_dim(dim: int, ndim: int, *, extra: int = 0) -> int:
    """A dimension index in 0..ndim-1+extra (negative counts from the end), like torch's checks."""
    size = ndim + extra
    if not -size <= dim < size:
        raise OpShapeError(f"dim {dim} is out of range for a {ndim}-d tensor")
    return dim % size if size else 0


def _with_size(shape: Sequence[int], dim: int, size: int | None) -> tuple[int, ...]:
    """`shape` with dimension `dim` set to `size` (removed when None)."""
    head, tail = tuple(shape[:dim]), tuple(shape[dim + 1 :])
    return head + tail if size is None else head + (size,) + tail


def _infer_narrow(params: Mapping[str, Any], inputs: Sequence[TensorMeta]) -> TensorMeta:
    (meta,) = inputs
    dim, start, length = params["dim"], params["start"], params["length"]
    if start + length > meta.shape[dim]:
        raise OpShapeError(f"piece {start}:{start + length} exceeds size {meta.shape[dim]} of dim {dim}")
    return TensorMeta(_with_size(meta.shape, dim, length), meta.dtype)


@tensor_op("narrow", _infer_narrow)
def narrow(params: Mapping[str, Any], tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """`tensor.narrow(dim, start, length)`: one piece of a split."""
    return tensors[0].narrow(params["dim"], params["start"], params["length"])


def _infer_select(params: Mapping[str, Any], inputs: Sequence[TensorMeta]) -> TensorMeta:
    (meta,) = inputs
    return TensorMeta(_with_size(meta.shape, params["dim"], None), meta.dtype)


@tensor_op("select", _infer_select)
def select(params: Mapping[str, Any], tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """`tensor.select(dim, index)`: one piece of an unbind."""
    return tensors[0].select(params["dim"], params["index"])


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
    rest = [_with_size(m.shape, dim, None) for m in inputs]
    if any(r != rest[0] for r in rest) or any(len(m.shape) != len(first.shape) for m in inputs):
        raise OpShapeError(
            f"cat along dim {dim} needs equal other dims, got {', '.join(str(list(m.shape)) for m in inputs)}"
        )
    return TensorMeta(_with_size(first.shape, dim, sum(m.shape[dim] for m in inputs)), first.dtype)


@tensor_op("join", _infer_join)
def join(params: Mapping[str, Any], tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """`torch.stack` or `torch.cat` of the inputs along `dim`."""
    return (torch.stack if params["stack"] else torch.cat)(list(tensors), dim=params["dim"])


def _infer_unsqueeze(params: Mapping[str, Any], inputs: Sequence[TensorMeta]) -> TensorMeta:
    (meta,) = inputs
    dim = params["dim"]
    return TensorMeta(meta.shape[:dim] + (1,) + meta.shape[dim:], meta.dtype)


@tensor_op("unsqueeze", _infer_unsqueeze)
def unsqueeze(params: Mapping[str, Any], tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """`tensor.unsqueeze(dim)`."""
    return tensors[0].unsqueeze(params["dim"])


def _infer_squeeze(params: Mapping[str, Any], inputs: Sequence[TensorMeta]) -> TensorMeta:
    (meta,) = inputs
    dim = params["dim"]
    if meta.shape[dim] != 1:
        raise OpShapeError(f"cannot squeeze dim {dim} of shape {list(meta.shape)}: its size is not 1")
    return TensorMeta(_with_size(meta.shape, dim, None), meta.dtype)


@tensor_op("squeeze", _infer_squeeze)
def squeeze(params: Mapping[str, Any], tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """`tensor.squeeze(dim)`."""
    return tensors[0].squeeze(params["dim"])


def _infer_slice(params: Mapping[str, Any], inputs: Sequence[TensorMeta]) -> TensorMeta:
    (meta,) = inputs
    dim = params["dim"]
    length = len(range(meta.shape[dim])[slice(params["start"], params["stop"], params["step"])])
    if length == 0:
        raise OpShapeError(
            f"slice {params['start']}:{params['stop']}:{params['step']} of dim {dim} (size {meta.shape[dim]}) is empty"
        )
    return TensorMeta(_with_size(meta.shape, dim, length), meta.dtype)


@tensor_op("slice", _infer_slice)
def slice_(params: Mapping[str, Any], tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """`tensor[..., start:stop:step, ...]` on dimension `dim`."""
    index = [slice(None)] * tensors[0].dim()
    index[params["dim"]] = slice(params["start"], params["stop"], params["step"])
    return tensors[0][tuple(index)]


def fill_template(template: Any, match: Any, **extra: int) -> str:
    """A key template filled for one match; a bad index becomes an OpShapeError for the plan's report."""
    try:
        return template.expand(match, **extra)
    except KeyTemplateError as exc:
        raise OpShapeError(str(exc)) from None


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


def _dim_planner(extra: int) -> StepPlanner:
    def plan(args: Unsqueeze, step: Step, entries: list[PlanEntry], ctx: PlanContext) -> StepOutcome:
        return apply_to_matching(
            step, entries, ctx, args.match, lambda e: {"dim": normalize_dim(args.dim, len(e.meta.shape), extra=extra)}
        )

    return plan


plan_unsqueeze = step("unsqueeze", build=_build_unsqueeze, schema=_UNSQUEEZE_SCHEMA, invert=_invert_unsqueeze)(
    _dim_planner(extra=1)
)
plan_squeeze = step("squeeze", build=_build_squeeze, schema=_SQUEEZE_SCHEMA, invert=_invert_unsqueeze)(
    _dim_planner(extra=0)
)


@step("slice", build=_build_slice, schema=_SLICE_SCHEMA, not_invertible="the sliced-off part is gone")
def plan_slice(args: Slice, step: Step, entries: list[PlanEntry], ctx: PlanContext) -> StepOutcome:
    """Keep a slice of one dimension of matching tensors."""
    return apply_to_matching(
        step,
        entries,
        ctx,
        args.match,
        lambda e: {
            "dim": normalize_dim(args.dim, len(e.meta.shape)),
            "start": args.start,
            "stop": args.stop,
            "step": args.step,
        },
    )


@step("copy", build=_build_copy, schema=_COPY_SCHEMA, invert=_invert_copy, renames_keys=True, fans_out=True)
def plan_copy(args: Copy, step: Step, entries: list[PlanEntry], ctx: PlanContext) -> StepOutcome:
    """Each matching tensor also appears under a second key, right after the original."""
    out, hits = [], 0
    for entry in entries:
        out.append(entry)
        match = args.match.search(entry.key)
        if match is None:
            continue
        hits += 1
        try:
            out.append(PlanEntry(fill_template(args.to, match), entry.expr, entry.steps + (step.where,)))
        except OpShapeError as exc:
            ctx.errors.append(Problem(step.where, f"tensor '{entry.key}': {exc}"))
    return StepOutcome(out, hits)
