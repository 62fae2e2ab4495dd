"""ckptx: declarative, rule-based checkpoint transformer for PyTorch."""

__version__ = "0.1.0"
