"""The step kinds, one module per family (each step's arguments, builder, schema fragment, planner, tensor ops and
inverse side by side); importing this package registers every kind in `ckptx.rules.kinds.STEP_KINDS` and every
tensor op in `ckptx.planning.expr.TENSOR_OPS` (`import ckptx` does)."""

from ckptx.ops import cast, keys, layout, rotary, structure, values, vision

__all__ = ["cast", "keys", "layout", "rotary", "structure", "values", "vision"]
