"""What the trust rule lets ckptx import to look at a name a file gives, and the records its verdicts share.

A module is imported to look at an object only when its top-level package is already imported, or is found
(without running it) in the standard library or a site-packages folder, or is declared by an installed rule pack.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import site
import sys
import sysconfig
import types
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "FACTORY_GROUP",
    "IMPORT_SIDE_EFFECTS",
    "SYSTEM_MODULES",
    "Declaration",
    "Verdict",
    "declarations",
    "builds_by_type",
    "describe_object",
    "findable",
    "import_refusal",
]

FACTORY_GROUP = "ckptx.factories"
"""Entry point group where an installed distribution declares the factories its recipes may name."""

IMPORT_SIDE_EFFECTS = frozenset(
    {"antigravity", "this", "__hello__", "__phello__", "idlelib", "turtledemo", "turtle", "tkinter"}
)
SYSTEM_MODULES: Mapping[str, str] = {
    "os": "runs commands and changes files",
    "posix": "runs commands and changes files",
    "nt": "runs commands and changes files",
    "subprocess": "runs commands",
    "_posixsubprocess": "runs commands",
    "pty": "runs commands",
    "sys": "controls the interpreter",
    "shutil": "changes files",
    "tempfile": "makes files",
    "socket": "opens network connections",
    "ssl": "opens network connections",
    "http": "opens network connections",
    "urllib": "opens network connections",
    "importlib": "imports code",
    "pkgutil": "imports code",
    "runpy": "runs code",
    "code": "runs code",
    "codeop": "compiles code",
    "pdb": "runs code",
    "builtins": "holds eval, exec and open",
    "pickle": "loads pickles with full trust",
    "_pickle": "loads pickles with full trust",
    "marshal": "loads code objects",
    "ctypes": "calls native code",
    "_ctypes": "calls native code",
    "multiprocessing": "starts processes",
    "threading": "starts threads",
    "_thread": "starts threads",
    "signal": "handles signals",
    "io": "opens files",
    "_io": "opens files",
    "webbrowser": "opens a browser",
    "shelve": "loads pickles with full trust",
    "copyreg": "reconstructs any object",
}


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
    if top in IMPORT_SIDE_EFFECTS:
        return f"importing '{top}' does things (it is a program, not a library)"
    if top in sys.modules or _installed(top) or any(d.covers(module) for d in declarations()):
        return None
    return (
        f"'{top}' is not an installed package, and ckptx imports only installed packages to look at a name "
        f"a file gives (importing runs the module, which may have come with the file)"
    )


def findable(top: str) -> bool:
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
    found = {
        *site.getsitepackages(),
        site.getusersitepackages(),
        *(paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths),
    }
    return tuple(Path(p).resolve() for p in found if p)


def declarations() -> tuple[Declaration, ...]:
    """Every `ckptx.factories` entry point of the installed distributions (read from metadata; imports nothing)."""
    return _declarations(tuple(sys.path))


@functools.lru_cache(maxsize=4)
def _declarations(path: tuple[str, ...]) -> tuple[Declaration, ...]:
    from importlib import metadata

    found = []
    for entry in metadata.entry_points(group=FACTORY_GROUP):
        distribution = entry.dist.metadata["Name"] if entry.dist else "?"
        found.append(Declaration(entry.module, entry.attr or None, distribution))
    return tuple(found)


def describe_object(obj: Any) -> str:
    """What kind of object `obj` is, for a verdict's reason: `a function`, `a module`, ..."""
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
        if torch is not None and issubclass(obj, torch.nn.Module) and builds_by_type(obj):
            return "an mmengine model class"
        return "a class that is not a torch.nn.Module subclass"
    return f"a {type(obj).__name__} object"


def builds_by_type(cls: type) -> bool:
    """An mmengine/mmcv module builds its parts from `type:` names in its arguments, and those may name
    any importable callable."""
    bases = [getattr(sys.modules.get(m), "BaseModule", None) for m in ("mmengine.model", "mmcv.runner")]
    return any(isinstance(base, type) and issubclass(cls, base) for base in bases)
