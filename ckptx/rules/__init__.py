"""Rule files: YAML with line marks, schema validation, extends/params, typed Recipe. No torch here."""

from ckptx.rules.loader import load_rules
from ckptx.rules.recipe import Origin, Recipe, RuleFile, TargetSpec, VerifySpec
from ckptx.rules.steps import Step

__all__ = ["Origin", "Recipe", "RuleFile", "Step", "TargetSpec", "VerifySpec", "load_rules"]
