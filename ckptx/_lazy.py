"""Modules imported on first attribute access.

`import torch` costs 0.3-3 s before any work starts. A rename-only safetensors conversion copies bytes and never
needs a tensor, so the modules on that path reach torch through `lazy_module("torch")` and only pay for it when
an op, a `.pth` file, a target model or a verification actually touches it.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class _LazyModule(ModuleType):
    """Stands in for a module until an attribute is read, then imports it and caches what was read."""

    def __getattr__(self, attr: str) -> Any:
        value = getattr(importlib.import_module(self.__name__), attr)
        self.__dict__[attr] = value
        return value


def lazy_module(name: str) -> Any:
    """A stand-in for module `name` that imports it the first time one of its attributes is used."""
    return _LazyModule(name)
