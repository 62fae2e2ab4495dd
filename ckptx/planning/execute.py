"""Executing a plan entry: evaluate its expression on the source's tensors and check the result against the plan."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ckptx.dtypes import dtype_name
from ckptx.errors import TensorOpError
from ckptx.planning.entry import PlanEntry
from ckptx.planning.expr import TENSOR_OPS, Expr, SourceRef
from ckptx.planning.source import Source

if TYPE_CHECKING:  # pragma: no cover
    import torch


def evaluate(expr: Expr, load: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """Compute an expression's tensor, loading source tensors with `load`."""
    if isinstance(expr, SourceRef):
        return load(expr.key)
    spec = TENSOR_OPS[expr.op]
    return spec.apply(dict(expr.params), [evaluate(child, load) for child in expr.inputs])


def materialize(entry: PlanEntry, source: Source) -> torch.Tensor:
    """Compute one entry's tensor and check it against the plan's shape and dtype."""
    try:
        tensor = evaluate(entry.expr, source.load)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise TensorOpError(f"tensor '{entry.key}' (from {', '.join(entry.sources)}): {exc}") from None
    if tuple(tensor.shape) != entry.meta.shape or dtype_name(tensor.dtype) != entry.meta.dtype:
        raise TensorOpError(
            f"tensor '{entry.key}': the data is {dtype_name(tensor.dtype)}{list(tensor.shape)} "
            f"but the file's header says {entry.meta}; the source file is inconsistent"
        )
    return tensor
