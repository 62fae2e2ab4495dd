"""The plan's expression tree (a source tensor, or a tensor op applied to expressions) and the registry of tensor
ops: each op's shape function (so plans need no tensor data), its tensor function, and an optional byte kernel."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
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


TENSOR_OPS: dict[str, TensorOp] = {}


def tensor_op(
    name: str,
    infer: Callable[[Mapping[str, Any], Sequence[TensorMeta]], TensorMeta],
    *,
    elementwise: ByteKernel | None = None,
):
    """Register the decorated function as the tensor function of op `name`.

    `elementwise(params, input_meta)` may give a function from whole elements of the input's raw bytes to the
    output's bytes, exactly what `apply` computes, without torch; the writer then streams the op chunk by
    chunk. It returns None for params it cannot do that for.
    """

    def register(apply: Callable[[Mapping[str, Any], Sequence[torch.Tensor]], torch.Tensor]):
        TENSOR_OPS[name] = TensorOp(name, infer, apply, elementwise)
        return apply

    return register


def byte_converter(expr: Expr) -> tuple[str, Converter] | None:
    """For `op(source tensor)` where the op has an elementwise byte kernel for its params: the source key and
    the bytes -> bytes function. None for anything else (it is computed with torch)."""
    if isinstance(expr, SourceRef) or len(expr.inputs) != 1 or not isinstance(expr.inputs[0], SourceRef):
        return None
    kernel = TENSOR_OPS[expr.op].elementwise
    convert = kernel(dict(expr.params), expr.inputs[0].meta) if kernel is not None else None
    return None if convert is None else (expr.inputs[0].key, convert)


def node(op: str, inputs: Sequence[Expr], where: str, **params: Any) -> OpNode:
    """Build an op node, computing its output metadata with the op's shape function."""
    spec = TENSOR_OPS[op]
    meta = spec.infer(params, [e.meta for e in inputs])
    return OpNode(op, tuple(params.items()), tuple(inputs), meta, where)
