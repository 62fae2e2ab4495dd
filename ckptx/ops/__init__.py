"""Step and tensor ops, registered by name; importing this package registers all of them."""

from ckptx.ops import dtype, keys, layout, structure, values, vision  # noqa: F401  (registration)
from ckptx.ops.registry import STEP_PLANNERS, TENSOR_OPS, PlanEntry, TensorMeta, evaluate

__all__ = ["STEP_PLANNERS", "TENSOR_OPS", "PlanEntry", "TensorMeta", "evaluate"]
