"""The trust rule: nothing runs that the user did not ask for.

Two things a file can ask ckptx to run, and how each is checked (README, *Safety guarantees*):

- A callable a rule or jobs file names (`target.model`, `verify.source_model`) is called only when it is
  a `torch.nn.Module` subclass, a model factory of a known model library, one of ckptx's own factories,
  or a factory an installed rule pack declares (entry point group `ckptx.factories`). A standard library
  name is refused without importing anything; another module is imported to look at the object only
  when it is already imported, installed (site-packages) or declared by a rule pack; never a program
  (`__main__`) or a module found elsewhere on the path (it may have come with the file). A name the
  user typed (`--target`, `--allow-factory`, a string given to the Python API) is the user's own choice.
- A pickle global (`--allow-global NAME`, a jobs file's `allow_globals:`) is allowed only when it is a
  plain data class (argparse.Namespace, a dataclass, an Enum, a named tuple, a container, numpy dtypes
  and scalars); never a function, a builtin other than the data types, anything of a system module.

The verdicts are decided on what the object is (its type, its class hierarchy, identity with a
library's registered factories), after an import the rule allows, never by calling it.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import enum
import functools
import importlib
import importlib.util
import inspect
import site
import sys
import sysconfig
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from ckptx.errors import NeededGlobal, RefusedGlobal, SourceError, TargetError, UntrustedCallable
from ckptx.rules.recipe import Origin
from ckptx.usercode import import_callable

__all__ = ["FACTORY_GROUP", "KNOWN_LIBRARIES", "Declaration", "Verdict", "allow_factories", "approved_factories",
           "check_file_globals", "declarations", "factory_verdict", "global_verdict", "import_refusal",
           "needed_global", "resolve_allow_global", "trusted_factory"]

FACTORY_GROUP = "ckptx.factories"
"""Entry point group where an installed distribution declares the factories its recipes may name."""

KNOWN_LIBRARIES = frozenset({"torch", "torchvision", "timm", "transformers", "mmpretrain", "mmengine", "ckptx"})
"""Model libraries whose model factories the rule knows (their other callables are refused, never recommended)."""

_CKPTX_FACTORY_MODULES = ("ckptx.factories", "ckptx.reference.convnextv2")
_IMPORT_SIDE_EFFECTS = frozenset({"antigravity", "this", "__hello__", "__phello__", "idlelib", "turtledemo",
                                  "turtle", "tkinter"})
_SYSTEM_MODULES: Mapping[str, str] = {
    "os": "runs commands and changes files", "posix": "runs commands and changes files",
    "nt": "runs commands and changes files", "subprocess": "runs commands", "_posixsubprocess": "runs commands",
    "pty": "runs commands", "sys": "controls the interpreter", "shutil": "changes files", "tempfile": "makes files",
    "socket": "opens network connections", "ssl": "opens network connections", "http": "opens network connections",
    "urllib": "opens network connections", "importlib": "imports code", "pkgutil": "imports code",
    "runpy": "runs code", "code": "runs code", "codeop": "compiles code", "pdb": "runs code",
    "builtins": "holds eval, exec and open", "pickle": "loads pickles with full trust",
    "_pickle": "loads pickles with full trust", "marshal": "loads code objects", "ctypes": "calls native code",
    "_ctypes": "calls native code", "multiprocessing": "starts processes", "threading": "starts threads",
    "_thread": "starts threads", "signal": "handles signals", "io": "opens files", "_io": "opens files",
    "webbrowser": "opens a browser", "shelve": "loads pickles with full trust", "copyreg": "reconstructs any object",
}
_BUILTIN_DATA = (frozenset, set, bytearray, bytes, complex, slice, range, int, float, str, bool, tuple, list, dict)
_CONTAINERS = (dict, list, set, frozenset, tuple)
_DATA_TYPES = "a dataclass, an Enum, a named tuple, a container, argparse.Namespace, numpy dtypes and scalars"
_UNPICKLE_HOOKS = ("__setstate__", "__reduce__", "__reduce_ex__", "__new__")

_approved: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar("ckptx_approved_factories",
                                                                           default=frozenset())


@dataclass(frozen=True)
class Verdict:
    """The trust rule's answer for one name: allowed or not, why, and whether the user may still allow it."""

    name: str
    allowed: bool
    reason: str
    may_allow: bool = False


@dataclass(frozen=True)
class Declaration:
    """A `ckptx.factories` entry point: `module:attr` (one factory) or `module` (every callable in it)."""

    module: str
    attr: str | None
    distribution: str

    def covers(self, module: str, attr: str | None = None) -> bool:
        """True when this declaration names `module:attr` (attr None: when it covers the module)."""
        if self.attr is None:
            return module == self.module or module.startswith(self.module + ".")
        return module == self.module and attr in (None, self.attr)

    def allows(self, module: str, attr: str, obj: Any) -> bool:
        """True when this declaration lets files call `obj`, found as `module:attr`: the factory it names, or
        a callable *defined* in the module it names (not one that module merely imports)."""
        if self.attr is not None:
            return self.covers(module, attr)
        return self.covers(module) and self.covers(getattr(obj, "__module__", None) or "")


# ---- factories -------------------------------------------------------------------------------------


@contextlib.contextmanager
def allow_factories(names: Iterable[str]) -> Iterator[None]:
    """Within the block, files may name these `module:callable` factories: the user approved them
    (`--allow-factory`). Adds to the names already approved by an enclosing block."""
    token = _approved.set(_approved.get() | frozenset(names))
    try:
        yield
    finally:
        _approved.reset(token)


def approved_factories() -> frozenset[str]:
    """The factories approved by the enclosing `allow_factories` blocks."""
    return _approved.get()


def trusted_factory(name: str, kwargs: Mapping[str, Any], origin: Origin, where: str) -> Callable[..., Any]:
    """The callable `name` (`module:attr`) once the trust rule allows calling it with `kwargs`.

    A name the user typed, or approved with `allow_factories`, is imported as given. A name read from a
    file is checked first (see `factory_verdict`); UntrustedCallable (nothing called, and nothing
    imported unless the import rule allows it) when refused.
    """
    if origin.by_user or name in approved_factories():
        return import_callable(name, where)
    place = origin.where or where
    verdict, obj = _factory_check(name, kwargs, place)
    if not verdict.allowed:
        raise UntrustedCallable(place, name, verdict.reason, may_allow=verdict.may_allow)
    return obj


def factory_verdict(name: str, kwargs: Mapping[str, Any] | None = None, *, where: str = "") -> Verdict:
    """What the trust rule says about calling `name`, named in a file, with `kwargs`; calls nothing.

    The module is imported to look at the object only when `import_refusal` allows it; a name that
    cannot be imported is refused with the reason.
    """
    if name in approved_factories():
        return Verdict(name, True, "you allowed it (--allow-factory)")
    try:
        return _factory_check(name, kwargs or {}, where)[0]
    except TargetError as exc:
        return Verdict(name, False, str(exc).removeprefix(f"{where}: ") if where else str(exc), may_allow=True)


def _factory_check(name: str, kwargs: Mapping[str, Any], where: str) -> tuple[Verdict, Any]:
    module, _, attr = name.partition(":")
    top = module.split(".")[0]
    if top in sys.stdlib_module_names:
        why = f"{top} {_SYSTEM_MODULES[top]}" if top in _SYSTEM_MODULES else f"{top} is part of Python"
        return Verdict(name, False, f"the standard library has no model factories ({why})"), None
    refusal = import_refusal(module)
    if refusal is not None:
        return Verdict(name, False, refusal, may_allow=True), None
    obj = import_callable(name, where)
    home = (getattr(obj, "__module__", None) or "").split(".")[0]
    if home in sys.stdlib_module_names or not home and inspect.isbuiltin(obj):
        return Verdict(name, False, f"it is {_what(obj)} of the standard library ({home or 'builtin'}), which has "
                                    f"no model factories"), obj
    declared = next((d for d in declarations() if d.allows(module, attr, obj)), None)
    kind = f"declared by the rule pack {declared.distribution}" if declared else _factory_kind(obj)
    if kind is None:
        return Verdict(name, False, _not_a_factory(obj), may_allow=_may_allow(obj)), obj
    if _remote_code(kwargs):
        return Verdict(name, False, "trust_remote_code runs code downloaded from the hub"), obj
    return Verdict(name, True, kind), obj


def _factory_kind(obj: Any) -> str | None:
    """What makes `obj` a factory the rule allows, or None."""
    for check in (_module_class, _ckptx_factory, _timm_factory, _torchvision_builder, _transformers_from_config):
        kind = check(obj)
        if kind is not None:
            return kind
    return None


def _module_class(obj: Any) -> str | None:
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(obj, type) or not issubclass(obj, torch.nn.Module) or _builds_by_type(obj):
        return None
    return "a torch.nn.Module subclass"


def _builds_by_type(cls: type) -> bool:
    """An mmengine/mmcv module builds its parts from `type:` names in its arguments, and those may name
    any importable callable."""
    bases = [getattr(sys.modules.get(m), "BaseModule", None) for m in ("mmengine.model", "mmcv.runner")]
    return any(isinstance(base, type) and issubclass(cls, base) for base in bases)


def _ckptx_factory(obj: Any) -> str | None:
    for module_name in _CKPTX_FACTORY_MODULES:
        module = sys.modules.get(module_name)
        if module is not None and any(getattr(module, n, None) is obj for n in getattr(module, "__all__", ())):
            return "a ckptx model factory"
    return None


def _timm_factory(obj: Any) -> str | None:
    timm = sys.modules.get("timm")
    if timm is None:
        return None
    if obj is timm.create_model:
        return "timm's create_model"
    name = getattr(obj, "__name__", None)
    if isinstance(name, str) and timm.is_model(name) and timm.models.model_entrypoint(name) is obj:
        return "a registered timm model"
    return None


def _torchvision_builder(obj: Any) -> str | None:
    models = sys.modules.get("torchvision.models")
    if models is None:
        return None
    if obj is models.get_model:
        return "torchvision's get_model"
    name = getattr(obj, "__name__", None)
    if isinstance(name, str) and name in models.list_models() and models.get_model_builder(name) is obj:
        return "a registered torchvision model builder"
    return None


def _transformers_from_config(obj: Any) -> str | None:
    transformers = sys.modules.get("transformers")
    if transformers is None or not inspect.ismethod(obj) or obj.__func__.__name__ != "from_config":
        return None
    owner = obj.__self__
    if not isinstance(owner, type):
        return None
    if issubclass(owner, transformers.PreTrainedModel):
        return "from_config of a transformers model class"
    if owner.__name__.startswith("AutoModel") and getattr(transformers, owner.__name__, None) is owner:
        return "from_config of a transformers AutoModel class"
    return None


def _remote_code(value: Any) -> bool:
    """True when `trust_remote_code` is set anywhere in the arguments."""
    if isinstance(value, Mapping):
        return bool(value.get("trust_remote_code")) or any(_remote_code(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_remote_code(v) for v in value)
    return False


def _not_a_factory(obj: Any) -> str:
    what = _what(obj)
    if isinstance(obj, type) and _builds_by_type(obj):
        return (f"{what}: it builds its parts from `type:` names in its arguments, which may name any callable "
                f"(use ckptx.factories:mmpretrain_model, which reads only mmpretrain's shipped configs)")
    return (f"{what}, not a torch.nn.Module subclass, a model factory of timm, torchvision, transformers or ckptx, "
            f"or a factory declared by an installed rule pack")


def _may_allow(obj: Any) -> bool:
    """A refused callable the user may still allow: not builtin, not of the standard library, not of a known
    library (whose model factories the rule already knows)."""
    module = getattr(obj, "__module__", None) or ""
    top = module.split(".")[0]
    return not inspect.isbuiltin(obj) and top not in sys.stdlib_module_names and top not in KNOWN_LIBRARIES


def _what(obj: Any) -> str:
    if isinstance(obj, types.ModuleType):
        return "a module"
    if inspect.isbuiltin(obj):
        return "a builtin function"
    if inspect.ismethod(obj):
        return "a method"
    if inspect.isfunction(obj):
        return "a function"
    if isinstance(obj, type):
        torch = sys.modules.get("torch")
        if torch is not None and issubclass(obj, torch.nn.Module) and _builds_by_type(obj):
            return "an mmengine model class"
        return "a class that is not a torch.nn.Module subclass"
    return f"a {type(obj).__name__} object"


# ---- what may be imported to look ------------------------------------------------------------------


def import_refusal(module: str) -> str | None:
    """Why ckptx does not import `module` to look at a name a file gives; None when it may.

    It may when its top-level package is already imported, or is found (without running it) in the
    standard library or a site-packages folder, or is a module an installed rule pack declares; never a
    program (`__main__`, `antigravity`...) or a module found elsewhere on the path (beside the file, in
    the working folder), which may have come with the file.
    """
    parts = module.split(".")
    top = parts[0]
    if "__main__" in parts:
        return f"'{module}' is a program: importing it runs it"
    if top in _IMPORT_SIDE_EFFECTS:
        return f"importing '{top}' does things (it is a program, not a library)"
    if top in sys.modules or _installed(top) or any(d.covers(module) for d in declarations()):
        return None
    return (f"'{top}' is not an installed package, and ckptx imports only installed packages to look at a name "
            f"a file gives (importing runs the module, which may have come with the file)")


def _findable(top: str) -> bool:
    """True when the top-level module `top` exists (found without running it)."""
    try:
        return importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        return False


def _installed(top: str) -> bool:
    """True when the top-level module `top` is found, without running it, built into Python or inside the
    standard library's or a site-packages folder."""
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return False
    if spec is None:
        return False
    if not spec.has_location and spec.origin in ("built-in", "frozen"):
        return True
    locations = [spec.origin] if spec.has_location and spec.origin else list(spec.submodule_search_locations or [])
    folders = _library_dirs()
    return bool(locations) and all(any(Path(p).resolve().is_relative_to(f) for f in folders) for p in locations)


@functools.lru_cache(maxsize=1)
def _library_dirs() -> tuple[Path, ...]:
    """The standard library's folders and the site-packages folders."""
    paths = sysconfig.get_paths()
    found = {*site.getsitepackages(), site.getusersitepackages(),
             *(paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths)}
    return tuple(Path(p).resolve() for p in found if p)


def declarations() -> tuple[Declaration, ...]:
    """Every `ckptx.factories` entry point of the installed distributions (read from metadata; imports nothing)."""
    return _declarations(tuple(sys.path))


@functools.lru_cache(maxsize=4)
def _declarations(path: tuple[str, ...]) -> tuple[Declaration, ...]:
    from importlib import metadata  # noqa: PLC0415 - 40-80 ms, only when a file names a callable

    found = []
    for entry in metadata.entry_points(group=FACTORY_GROUP):
        distribution = entry.dist.metadata["Name"] if entry.dist else "?"
        found.append(Declaration(entry.module, entry.attr or None, distribution))
    return tuple(found)


# ---- pickle globals --------------------------------------------------------------------------------


def global_verdict(obj: Any, name: str) -> Verdict:
    """May `--allow-global name` allow `obj` (what `name` imports to)? Only plain data classes may."""
    module = name.rpartition(".")[0]
    for place in (module, getattr(obj, "__module__", None) or ""):
        top = place.split(".")[0]
        if top == "builtins" and not _data_builtin(obj):
            return Verdict(name, False, f"it is {_what(obj)}, and of builtins only the data types may be allowed "
                                        f"(frozenset, set, bytearray, complex, slice, range...)")
        if top in _SYSTEM_MODULES and not _data_builtin(obj):
            return Verdict(name, False, f"it is {_what(obj)} of {top}, which {_SYSTEM_MODULES[top]}")
    if not isinstance(obj, type):
        if _numpy_reconstructor(obj):
            return Verdict(name, True, "numpy's array and scalar reconstructor")
        return Verdict(name, False, f"it is {_what(obj)}, not a class: the loader would call it with the file's "
                                    f"arguments")
    kind = _data_kind(obj)
    if kind is None:
        return Verdict(name, False, f"{_class_what(obj)}, not a plain data type ({_DATA_TYPES})")
    hook = _own_unpickle_hook(obj)
    if hook is not None:
        return Verdict(name, False, f"{obj.__qualname__} defines {hook} in Python: its own code runs on the file's data")
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
    import argparse  # noqa: PLC0415
    import collections  # noqa: PLC0415
    import datetime  # noqa: PLC0415
    import decimal  # noqa: PLC0415
    import fractions  # noqa: PLC0415
    import pathlib  # noqa: PLC0415
    import uuid  # noqa: PLC0415

    exact = (collections.OrderedDict, collections.defaultdict, collections.deque, collections.Counter,
             datetime.date, datetime.datetime, datetime.time, datetime.timedelta, datetime.timezone,
             decimal.Decimal, fractions.Fraction, uuid.UUID, types.SimpleNamespace)
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
    if top in _SYSTEM_MODULES and top != "builtins":
        raise RefusedGlobal(flag, name, f"{top} {_SYSTEM_MODULES[top]}")
    refusal = import_refusal(module) if from_file else None
    if refusal is not None:
        raise SourceError(f"{flag} {name}: {refusal}; install its package, or convert with --allow-global {name} "
                          f"(named by you, it is imported) if you trust it")
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
    if top in _SYSTEM_MODULES and top != "builtins":
        return NeededGlobal(name, False, f"{top} {_SYSTEM_MODULES[top]}")
    if not _findable(top):
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
