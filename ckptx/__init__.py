"""ckptx: declarative, rule-based checkpoint transformer for PyTorch.

The public API. Importing the package registers every step kind (`ckptx.ops`), so a recipe can be loaded and
planned through any of these functions.
"""

from __future__ import annotations

import ckptx.ops  # noqa: F401 - registers the step kinds before any recipe is built
from ckptx._version import __version__
from ckptx.check.findings import AuditReport, Finding
from ckptx.check.validation import ValidationReport, validate
from ckptx.conversion.audit import audit
from ckptx.conversion.in_memory import apply, load_into, plan
from ckptx.conversion.pipeline import ConvertResult, convert
from ckptx.errors import CkptxError, ValidationFailed
from ckptx.planning.planner import Plan
from ckptx.rules.loader import load_rules
from ckptx.rules.recipe import Recipe
from ckptx.suggestion import suggest

__all__ = [
    "AuditReport",
    "CkptxError",
    "ConvertResult",
    "Finding",
    "Plan",
    "Recipe",
    "ValidationFailed",
    "ValidationReport",
    "__version__",
    "apply",
    "audit",
    "convert",
    "load_into",
    "load_rules",
    "plan",
    "suggest",
    "validate",
]
