"""A plan entry: one output tensor, its key, the expression that computes it and the steps that touched it."""

from __future__ import annotations

from typing import NamedTuple

from ckptx.dtypes import TensorMeta
from ckptx.planning.expr import Expr, SourceRef, sources_of


class PlanEntry(NamedTuple):
    """One output tensor: its key, how it is computed from source tensors, and which steps touched it."""

    key: str
    expr: Expr
    steps: tuple[str, ...] = ()

    @property
    def meta(self) -> TensorMeta:
        """Final shape and dtype."""
        return self.expr.meta

    @property
    def sources(self) -> tuple[str, ...]:
        """Source keys read."""
        return sources_of(self.expr)

    @property
    def is_copy(self) -> bool:
        """True when the tensor is the source tensor unchanged (its bytes can be copied)."""
        return isinstance(self.expr, SourceRef)

    def renamed(self, key: str, where: str) -> PlanEntry:
        """The same tensor under a new key."""
        return PlanEntry(key, self.expr, self.steps + (where,))

    def transformed(self, expr: Expr, where: str) -> PlanEntry:
        """The same key with a new expression."""
        return PlanEntry(self.key, expr, self.steps + (where,))
