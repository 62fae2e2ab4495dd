"""The step kinds, one module per family (each step's arguments, builder, schema fragment, planner, tensor ops and
inverse side by side), and the tensor ops they use; importing this package registers every kind in
`ckptx.rules.kinds.STEP_KINDS` and every op in `TENSOR_OPS`."""

from ckptx.ops import dtype, keys, layout, structure, values, vision  # noqa: F401  (registration)
from ckptx.ops.registry import TENSOR_OPS, PlanEntry, TensorMeta, evaluate

__all__ = ["TENSOR_OPS", "PlanEntry", "TensorMeta", "evaluate"]
