"""Code the user names: `package.module:attr` imported and checked before anything calls it."""

from __future__ import annotations

import importlib
from typing import Any

from ckptx.errors import TargetError

__all__ = ["import_callable"]


def import_callable(spec: str, where: str) -> Any:
    """`package.module:attr.attr` -> the object."""
    module_name, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise TargetError(f"{where}: cannot import module '{module_name}' ({exc}); is it installed?") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise TargetError(f"{where}: module '{module_name}' has no attribute '{attr}'") from None
    if not callable(obj):
        raise TargetError(f"{where}: '{spec}' is not callable")
    return obj
