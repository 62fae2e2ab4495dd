"""The step kinds, one module per family (each kind's arguments, builder, schema fragment, planner, tensor op and
inverse together; what several share is in `common`); importing this package registers every kind in
`ckptx.rules.kinds.STEP_KINDS` and every tensor op in `ckptx.planning.expr.TENSOR_OPS` (`import ckptx` does)."""

from ckptx.ops import cast, copies, dims, fp8, keys, layout, merge, mxfp4, rotary, split, values, vision

__all__ = [
    "cast",
    "copies",
    "dims",
    "fp8",
    "keys",
    "layout",
    "merge",
    "mxfp4",
    "rotary",
    "split",
    "values",
    "vision",
]
