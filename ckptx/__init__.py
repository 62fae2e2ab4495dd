"""ckptx: declarative, rule-based checkpoint transformer for PyTorch."""

from __future__ import annotations

from ckptx._version import __version__
from ckptx.convert import ConvertResult, convert
from ckptx.errors import CkptxError, ValidationFailed
from ckptx.memory import apply, load_into
from ckptx.plan import Plan
from ckptx.plan import plan_recipe as plan
from ckptx.rules import Recipe, load_rules
from ckptx.validate import ValidationReport, validate

from ckptx.suggest import suggest  # noqa: E402 (binds ckptx.suggest to the function; the package stays importable)

__all__ = ["CkptxError", "ConvertResult", "Plan", "Recipe", "ValidationFailed", "ValidationReport", "__version__",
           "apply", "convert", "load_into", "load_rules", "plan", "suggest", "validate"]
