"""ckptx: declarative, rule-based checkpoint transformer for PyTorch."""

from __future__ import annotations

__version__ = "0.1.0"

from ckptx.convert import ConvertResult, convert, load_into  # noqa: E402
from ckptx.errors import CkptxError, ValidationFailed  # noqa: E402
from ckptx.rules import Recipe, load_rules  # noqa: E402
from ckptx.suggest import suggest  # noqa: E402  (binds ckptx.suggest to the function; the package stays importable)
from ckptx.target import ValidationReport, validate  # noqa: E402

__all__ = ["CkptxError", "ConvertResult", "Recipe", "ValidationFailed", "ValidationReport", "__version__", "convert",
           "load_into", "load_rules", "suggest", "validate"]
