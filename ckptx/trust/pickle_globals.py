"""The trust rule for pickle globals: `--allow-global NAME` (or a jobs file's `allow_globals:`) may allow only plain
data classes (argparse.Namespace, a dataclass, an Enum, a named tuple, a container, numpy dtypes and scalars);
never a function, a builtin other than the data types, anything of a system module. Decided on what the object
is, after an import the rule allows, never by calling it."""

from __future__ import annotations

import dataclasses
import enum
import importlib
import inspect
import sys
import types
from collections.abc import Iterable
from typing import Any

from ckptx.errors import NeededGlobal, RefusedGlobal, SourceError
from ckptx.trust.imports import SYSTEM_MODULES, Verdict, describe_object, findable, import_refusal

__all__ = ["check_file_globals", "global_verdict", "needed_global", "resolve_allow_global"]

_BUILTIN_DATA = (frozenset, set, bytearray, bytes, complex, slice, range, int, float, str, bool, tuple, list, dict)
_CONTAINERS = (dict, list, set, frozenset, tuple)
_DATA_TYPES = "a dataclass, an Enum, a named tuple, a container, argparse.Namespace, numpy dtypes and scalars"
_UNPICKLE_HOOKS = ("__setstate__", "__reduce__", "__reduce_ex__", "__new__")


def global_verdict(obj: Any, name: str) -> Verdict:
    """May `--allow-global name` allow `obj` (what `name` imports to)? Only plain data classes may."""
    module = name.rpartition(".")[0]
    for place in (module, getattr(obj, "__module__", None) or ""):
        top = place.split(".")[0]
        if top == "builtins" and not _data_builtin(obj):
            return Verdict(
                name,
                False,
                f"it is {describe_object(obj)}, and of builtins only the data types may be allowed "
                f"(frozenset, set, bytearray, complex, slice, range...)",
            )
        if top in SYSTEM_MODULES and not _data_builtin(obj):
            return Verdict(name, False, f"it is {describe_object(obj)} of {top}, which {SYSTEM_MODULES[top]}")
    if not isinstance(obj, type):
        if _numpy_reconstructor(obj):
            return Verdict(name, True, "numpy's array and scalar reconstructor")
        return Verdict(
            name,
            False,
            f"it is {describe_object(obj)}, not a class: the loader would call it with the file's arguments",
        )
    kind = _data_kind(obj)
    if kind is None:
        return Verdict(name, False, f"{_class_what(obj)}, not a plain data type ({_DATA_TYPES})")
    hook = _own_unpickle_hook(obj)
    if hook is not None:
        return Verdict(
            name, False, f"{obj.__qualname__} defines {hook} in Python: its own code runs on the file's data"
        )
    return Verdict(name, True, kind)


def _class_what(cls: type) -> str:
    torch = sys.modules.get("torch")
    if torch is not None and issubclass(cls, torch.nn.Module):
        return "it is a torch.nn.Module class (the file pickles a whole model)"
    if issubclass(cls, type):
        return "it is a metaclass (it makes classes)"
    return "it is a class"


def _data_builtin(obj: Any) -> bool:
    return any(obj is t for t in _BUILTIN_DATA)


def _data_kind(cls: type) -> str | None:
    """What makes `cls` a plain data type, or None."""
    if _data_builtin(cls):
        return "a builtin data type"
    if issubclass(cls, type) or issubclass(cls, BaseException):
        return None
    stdlib = _stdlib_data(cls)
    if stdlib is not None:
        return stdlib
    if (getattr(cls, "__module__", "") or "").split(".")[0] in sys.stdlib_module_names:
        return None  # the standard library's other classes open files, sockets, processes...
    if dataclasses.is_dataclass(cls):
        return "a dataclass"
    if issubclass(cls, tuple) and hasattr(cls, "_fields"):
        return "a named tuple"
    if issubclass(cls, _CONTAINERS):
        return "a container"
    return _numpy_data(cls)


def _stdlib_data(cls: type) -> str | None:
    import argparse
    import collections
    import datetime
    import decimal
    import fractions
    import pathlib
    import uuid

    exact = (
        collections.OrderedDict,
        collections.defaultdict,
        collections.deque,
        collections.Counter,
        datetime.date,
        datetime.datetime,
        datetime.time,
        datetime.timedelta,
        datetime.timezone,
        decimal.Decimal,
        fractions.Fraction,
        uuid.UUID,
        types.SimpleNamespace,
    )
    if any(cls is t for t in exact):
        return "a standard library data type"
    if issubclass(cls, argparse.Namespace):
        return "an argparse.Namespace"
    if issubclass(cls, pathlib.PurePath):
        return "a path"
    if issubclass(cls, enum.Enum):
        return "an Enum"
    return None


def _numpy_data(cls: type) -> str | None:
    numpy = sys.modules.get("numpy")
    if numpy is None:
        return None
    if issubclass(cls, numpy.dtype):
        return "a numpy dtype"
    if issubclass(cls, numpy.generic):
        return "a numpy scalar type"
    if cls is numpy.ndarray:
        return "numpy.ndarray"
    return None


def _numpy_reconstructor(obj: Any) -> bool:
    for module_name in ("numpy._core.multiarray", "numpy.core.multiarray"):
        module = sys.modules.get(module_name)
        if module is not None and any(getattr(module, n, None) is obj for n in ("scalar", "_reconstruct")):
            return True
    return False


def _own_unpickle_hook(cls: type) -> str | None:
    """The unpickling hook (`__setstate__`, `__reduce__`...) that `cls` or a base outside the standard
    library defines in Python, or None."""
    for base in cls.__mro__:
        for hook in _UNPICKLE_HOOKS:
            value = vars(base).get(hook)
            func = getattr(value, "__func__", value)
            if inspect.isfunction(func) and (func.__module__ or "").split(".")[0] not in sys.stdlib_module_names:
                return hook
    return None


def resolve_allow_global(name: str, *, flag: str = "--allow-global", from_file: bool = False) -> list[Any]:
    """What to pass to `torch.serialization.safe_globals` when the rule allows `name` (`module.Name`).

    RefusedGlobal when it may never be allowed (nothing of a system module is imported to look);
    SourceError when it is not importable. A name read from a file (a jobs file's `allow_globals:`) is
    imported only when `import_refusal` allows it. Gives `(obj, name)` when `name` is an alias of the
    object's own `module.qualname`, so the pickle's GLOBAL matches what was allowed; `numpy.dtype` brings
    numpy's concrete dtype classes (a pickled dtype is built as one, never named in the pickle).
    """
    module = name.rpartition(".")[0]
    top = module.split(".")[0]
    if top in SYSTEM_MODULES and top != "builtins":
        raise RefusedGlobal(flag, name, f"{top} {SYSTEM_MODULES[top]}")
    refusal = import_refusal(module) if from_file else None
    if refusal is not None:
        raise SourceError(
            f"{flag} {name}: {refusal}; install its package, or convert with --allow-global {name} "
            f"(named by you, it is imported) if you trust it"
        )
    obj = _import_global(name, flag)
    verdict = global_verdict(obj, name)
    if not verdict.allowed:
        raise RefusedGlobal(flag, name, verdict.reason)
    own = f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}"
    return [obj if own == name else (obj, name), *_concrete_dtypes(obj)]


def _concrete_dtypes(obj: Any) -> list[type]:
    numpy = sys.modules.get("numpy")
    if numpy is None or obj is not numpy.dtype:
        return []
    dtypes = sys.modules.get("numpy.dtypes") or importlib.import_module("numpy.dtypes")
    found = (getattr(dtypes, n) for n in dir(dtypes) if not n.startswith("_"))
    return [c for c in found if isinstance(c, type) and issubclass(c, numpy.dtype) and c is not numpy.dtype]


def _import_global(name: str, flag: str) -> Any:
    """`module.Name` (or `module.Outer.Inner`) -> the object; the longest importable module prefix is used."""
    parts = name.split(".")
    for split in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:split])
        try:
            obj: Any = importlib.import_module(module_name)
        except ImportError:
            continue
        try:
            for part in parts[split:]:
                obj = getattr(obj, part)
        except AttributeError:
            break
        return obj
    raise SourceError(f"{flag} {name}: no such importable global; give it as module.Name") from None


def check_file_globals(names: Iterable[str], where: str) -> None:
    """Check the globals a file allows (a jobs file's `allow_globals:`) as the trust rule says."""
    for name in names:
        resolve_allow_global(name, flag=f"{where}:", from_file=True)


def needed_global(name: str) -> NeededGlobal:
    """What the rule says about a global a pickle needs (`module.Name`): importing its module only when
    `import_refusal` allows it (the name comes from the file)."""
    module = name.rpartition(".")[0]
    top = module.split(".")[0]
    if not module:
        return NeededGlobal(name, False, "not a module.Name global")
    if top in SYSTEM_MODULES and top != "builtins":
        return NeededGlobal(name, False, f"{top} {SYSTEM_MODULES[top]}")
    if not findable(top):
        return NeededGlobal(name, False, f"there is no module '{top}' here")
    refusal = import_refusal(module)
    if refusal is not None:
        return NeededGlobal(name, None, refusal)
    try:
        obj = _import_global(name, "--allow-global")
    except SourceError:
        return NeededGlobal(name, False, "there is no such global here, so --allow-global cannot allow it")
    verdict = global_verdict(obj, name)
    return NeededGlobal(name, verdict.allowed, verdict.reason)
