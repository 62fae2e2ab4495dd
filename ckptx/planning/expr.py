"""The plan's expression tree (a source tensor, or a tensor op applied to expressions) and the registry of tensor
ops: each op's shape function (so plans need no tensor data), its tensor function, and an optional byte kernel."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from ckptx.dtypes import TensorMeta

if TYPE_CHECKING:  # pragma: no cover
    import torch


class SourceRef(NamedTuple):
    """A tensor read as-is from the source.

    SourceRef and PlanEntry are named tuples, not frozen dataclasses: a plan of 100,000 keys makes two per key
    and one more per rename, and a tuple is built in C (a third of the cost of a dataclass's `__init__`).
    """

    key: str
    meta: TensorMeta


@dataclass(frozen=True)
class OpNode:
    """A tensor op applied to one or more input expressions."""

    op: str
    params: tuple[tuple[str, Any], ...]
    inputs: tuple[Expr, ...]
    meta: TensorMeta
    where: str = field(default="", compare=False)

    def param(self, name: str, default: Any = None) -> Any:
        """One parameter of the op."""
        return dict(self.params).get(name, default)


Expr = SourceRef | OpNode
Converter = Callable[[bytes], bytes | memoryview]
"""Whole elements of an op's input, as raw bytes, to the op's output bytes (a bytes-like object)."""
ByteKernel = Callable[[Mapping[str, Any], TensorMeta], Converter | None]


def unchanged(data: bytes) -> bytes:
    """The byte kernel of an op that leaves a contiguous tensor's bytes as they are (a reshape): the writer copies
    such a tensor's span (in the kernel, sharing blocks on a copy-on-write file system)."""
    return data


@dataclass(frozen=True)
class TakeInput:
    """The convert function of a blockwise piece that only takes the byte range it read of input `which` (a
    region of dimension 0, one input of a concatenation): the writer copies those ranges instead."""

    which: int

    def __call__(self, data: Sequence[bytes]) -> bytes:
        return data[self.which]


class Piece(NamedTuple):
    """One piece of a blockwise byte kernel: the byte range `[start, stop)` it reads of each input's raw bytes,
    and the function from those bytes (in input order) to the next bytes of the output."""

    ranges: tuple[tuple[int, int], ...]
    convert: Callable[[Sequence[bytes]], bytes]


BlockKernel = Callable[[Mapping[str, Any], Sequence[TensorMeta]], Iterable[Piece] | None]
"""`blockwise(params, input_metas)`: the pieces, in output order, that compute the op from its inputs' raw bytes
without torch (a dequantization reads a block of rows of the weight and the row of scales beside it); None for
params it cannot do that for. Pieces are made lazily, so an iterable may be a generator."""


def sources_of(expr: Expr) -> tuple[str, ...]:
    """Source keys an expression reads, in order."""
    if isinstance(expr, SourceRef):
        return (expr.key,)
    return tuple(k for child in expr.inputs for k in sources_of(child))


def ops_of(expr: Expr) -> tuple[str, ...]:
    """Op chain of an expression, innermost first, e.g. `('reshape[-1]', 'cast[bfloat16]')`."""
    if isinstance(expr, SourceRef):
        return ()
    inner = tuple(o for child in expr.inputs for o in ops_of(child))
    args = ",".join(_short(v) for _, v in expr.params)
    return inner + (f"{expr.op}({args})",)


def _short(value: Any) -> str:
    if isinstance(value, tuple):
        return "[" + ",".join(str(v) for v in value) + "]"
    return str(value)


@dataclass(frozen=True)
class TensorOp:
    """A pure tensor function with a shape/dtype function, so plans need no tensor data."""

    name: str
    infer: Callable[[Mapping[str, Any], Sequence[TensorMeta]], TensorMeta]
    apply: Callable[[Mapping[str, Any], Sequence[torch.Tensor]], torch.Tensor]
    elementwise: ByteKernel | None = None
    blockwise: BlockKernel | None = None


TENSOR_OPS: dict[str, TensorOp] = {}


def tensor_op(
    name: str,
    infer: Callable[[Mapping[str, Any], Sequence[TensorMeta]], TensorMeta],
    *,
    elementwise: ByteKernel | None = None,
    blockwise: BlockKernel | None = None,
):
    """Register the decorated function as the tensor function of op `name`.

    `elementwise(params, input_meta)` may give a function from whole elements of the input's raw bytes to the
    output's bytes, exactly what `apply` computes, without torch; the writer then streams the op chunk by
    chunk. It returns None for params it cannot do that for. `blockwise(params, input_metas)` does the same for
    ops of one or more inputs whose output is computed piece by piece from byte ranges of each (see Piece).
    """

    def register(apply: Callable[[Mapping[str, Any], Sequence[torch.Tensor]], torch.Tensor]):
        TENSOR_OPS[name] = TensorOp(name, infer, apply, elementwise, blockwise)
        return apply

    return register


def byte_converter(expr: Expr) -> tuple[str, Converter] | None:
    """For `op(source tensor)`, or a chain of such ops (`cast(reshape(x))`), where every op has an elementwise
    byte kernel for its params: the source key and the bytes -> bytes function (the kernels composed). None for
    anything else (it is computed with torch)."""
    if isinstance(expr, SourceRef) or len(expr.inputs) != 1:
        return None
    (child,) = expr.inputs
    convert = _elementwise(expr)
    if convert is None:
        return None
    if isinstance(child, SourceRef):
        return child.key, convert
    inner = byte_converter(child)
    if inner is None:
        return None
    return inner[0], _composed(inner[1], convert)


def block_converter(expr: Expr) -> tuple[tuple[str, ...], Iterable[Piece]] | None:
    """For `op(source tensors...)` where the op has a blockwise byte kernel for its params: the source keys, in
    input order, and the pieces; also for elementwise ops on top of such an op (`cast(rotary_permute(x))`, the
    cast `--dtype` adds after a recipe), each piece's output converted by them in turn (a piece gives whole
    elements). None for anything else (it is computed with torch)."""
    if isinstance(expr, SourceRef):
        return None
    if len(expr.inputs) == 1 and isinstance(expr.inputs[0], OpNode):
        convert = _elementwise(expr)
        inner = block_converter(expr.inputs[0]) if convert is not None else None
        if inner is None or convert is None:
            return None
        then = convert
        return inner[0], (Piece(p.ranges, _after(p.convert, then)) for p in inner[1])
    if not all(isinstance(child, SourceRef) for child in expr.inputs):
        return None
    kernel = TENSOR_OPS[expr.op].blockwise
    pieces = kernel(dict(expr.params), [child.meta for child in expr.inputs]) if kernel is not None else None
    if pieces is None:
        return None
    return tuple(child.key for child in expr.inputs if isinstance(child, SourceRef)), pieces


def _elementwise(expr: OpNode) -> Converter | None:
    """The op's elementwise byte kernel for its params and its one input, if it has one."""
    kernel = TENSOR_OPS[expr.op].elementwise
    return kernel(dict(expr.params), expr.inputs[0].meta) if kernel is not None and len(expr.inputs) == 1 else None


def _composed(first: Converter, then: Converter) -> Converter:
    """`then(first(data))`; the unchanged kernel drops out, so a chain of reshapes is still a copy."""
    if first is unchanged:
        return then
    if then is unchanged:
        return first
    return lambda data: then(bytes(first(data)))


def _after(piece: Callable[[Sequence[bytes]], bytes], then: Converter) -> Callable[[Sequence[bytes]], bytes]:
    """A piece's convert function followed by an elementwise kernel."""
    if then is unchanged:
        return piece
    return lambda data: bytes(then(piece(data)))


def node(op: str, inputs: Sequence[Expr], where: str, **params: Any) -> OpNode:
    """Build an op node, computing its output metadata with the op's shape function."""
    spec = TENSOR_OPS[op]
    meta = spec.infer(params, [e.meta for e in inputs])
    return OpNode(op, tuple(params.items()), tuple(inputs), meta, where)
