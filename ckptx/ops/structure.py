"""Steps that change which tensors exist and their dimensions: split, merge, unsqueeze, squeeze, slice, copy."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from ckptx._lazy import lazy_module
from ckptx.errors import Problem
from ckptx.ops.layout import apply_to_matching
from ckptx.ops.registry import OpShapeError, PlanContext, PlanEntry, StepOutcome, TensorMeta, node, step_planner, tensor_op
from ckptx.rules.steps import Copy, Merge, Slice, Split, Squeeze, Step, Unsqueeze
from ckptx.rules.templates import KeyTemplateError

torch = lazy_module("torch")


def normalize_dim(dim: int, ndim: int, *, extra: int = 0) -> int:
    """A dimension index in 0..ndim-1+extra (negative counts from the end), like torch's checks."""
    size = ndim + extra
    if not -size <= dim < size:
        raise OpShapeError(f"dim {dim} is out of range for a {ndim}-d tensor")
    return dim % size if size else 0


def _with_size(shape: Sequence[int], dim: int, size: int | None) -> tuple[int, ...]:
    """`shape` with dimension `dim` set to `size` (removed when None)."""
    head, tail = tuple(shape[:dim]), tuple(shape[dim + 1:])
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
        raise OpShapeError(f"cat along dim {dim} needs equal other dims, got "
                           f"{', '.join(str(list(m.shape)) for m in inputs)}")
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
        raise OpShapeError(f"slice {params['start']}:{params['stop']}:{params['step']} of dim {dim} "
                           f"(size {meta.shape[dim]}) is empty")
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


@step_planner("split", renames_keys=True)
def plan_split(step: Step, entries: list[PlanEntry], ctx: PlanContext) -> StepOutcome:
    """Each matching tensor becomes one entry per piece, each a narrow (or select, with unbind) of it."""
    args: Split = step.args  # type: ignore[assignment]
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
        return [PlanEntry(k, node("select", [entry.expr], where, dim=dim, index=i), entry.steps + (where,))
                for i, k in enumerate(keys)]
    count = len(args.sizes) if args.sizes is not None else args.parts or len(args.into)
    sizes = list(args.sizes) if args.sizes is not None else [size // count] * count
    if args.sizes is None and size % count:
        raise OpShapeError(f"size {size} of dim {dim} does not split into {count} equal parts; give sizes")
    if sum(sizes) != size:
        raise OpShapeError(f"sizes {sizes} add up to {sum(sizes)}, but dim {dim} has size {size}")
    keys = _piece_keys(args, match, count)
    pieces, start = [], 0
    for key, length in zip(keys, sizes):
        pieces.append(PlanEntry(key, node("narrow", [entry.expr], where, dim=dim, start=start, length=length),
                                entry.steps + (where,)))
        start += length
    return pieces


def _piece_keys(args: Split, match: Any, count: int) -> list[str]:
    if args.indexed:
        return [fill_template(args.into[0], match, i=i) for i in range(count)]
    if count != len(args.into):
        raise OpShapeError(f"{count} pieces but `into` names {len(args.into)} keys")
    return [fill_template(t, match) for t in args.into]


@step_planner("merge", renames_keys=True)
def plan_merge(step: Step, entries: list[PlanEntry], ctx: PlanContext) -> StepOutcome:
    """Groups of keys become one concatenated or stacked tensor, in the order the step gives."""
    args: Merge = step.args  # type: ignore[assignment]
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
            ctx.errors.append(Problem(step.where, f"'{to}': positions {sorted(found)} are not 0..{len(found) - 1} "
                                                  f"(missing {missing})"))
            continue
        groups[to] = [found[i] for i in range(len(found))]
    return _merged(step, args, entries, by_key, groups, ctx)


def _merged(step: Step, args: Merge, entries: list[PlanEntry], by_key: Mapping[str, PlanEntry],
            groups: Mapping[str, list[str]], ctx: PlanContext) -> StepOutcome:
    made: dict[str, PlanEntry] = {}
    for to, inputs in groups.items():
        absent = [k for k in inputs if k not in by_key]
        if absent:
            ctx.errors.append(Problem(step.where, f"'{to}' needs {', '.join(repr(k) for k in absent)}, "
                                                  f"which the checkpoint does not have at this step"))
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


def _dim_op(op: str) -> Callable[[Step, list[PlanEntry], PlanContext], StepOutcome]:
    extra = 1 if op == "unsqueeze" else 0

    def plan(step: Step, entries: list[PlanEntry], ctx: PlanContext) -> StepOutcome:
        args: Unsqueeze | Squeeze = step.args  # type: ignore[assignment]
        return apply_to_matching(step, entries, ctx, args.match,
                                 lambda e: {"dim": normalize_dim(args.dim, len(e.meta.shape), extra=extra)})

    plan.__doc__ = f"`{op}` matching tensors at a dimension."
    return plan


step_planner("unsqueeze")(_dim_op("unsqueeze"))
step_planner("squeeze")(_dim_op("squeeze"))


@step_planner("slice")
def plan_slice(step: Step, entries: list[PlanEntry], ctx: PlanContext) -> StepOutcome:
    """Keep a slice of one dimension of matching tensors."""
    args: Slice = step.args  # type: ignore[assignment]
    return apply_to_matching(step, entries, ctx, args.match, lambda e: {
        "dim": normalize_dim(args.dim, len(e.meta.shape)), "start": args.start, "stop": args.stop, "step": args.step})


@step_planner("copy", renames_keys=True)
def plan_copy(step: Step, entries: list[PlanEntry], ctx: PlanContext) -> StepOutcome:
    """Each matching tensor also appears under a second key, right after the original."""
    args: Copy = step.args  # type: ignore[assignment]
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
