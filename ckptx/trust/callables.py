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
import inspect
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from ckptx.errors import TargetError, UntrustedCallable
from ckptx.rules.recipe import Origin
from ckptx.trust.imports import SYSTEM_MODULES, Verdict, builds_by_type, declarations, describe_object, import_refusal
from ckptx.trust.usercode import import_callable

__all__ = ["KNOWN_LIBRARIES", "allow_factories", "approved_factories", "factory_verdict", "trusted_factory"]

KNOWN_LIBRARIES = frozenset({"torch", "torchvision", "timm", "transformers", "mmpretrain", "mmengine", "ckptx"})
"""Model libraries whose model factories the rule knows (their other callables are refused, never recommended)."""

_CKPTX_FACTORY_MODULES = ("ckptx.factories", "ckptx.reference.convnextv2")

_approved: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar(
    "ckptx_approved_factories", default=frozenset()
)


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
        why = f"{top} {SYSTEM_MODULES[top]}" if top in SYSTEM_MODULES else f"{top} is part of Python"
        return Verdict(name, False, f"the standard library has no model factories ({why})"), None
    refusal = import_refusal(module)
    if refusal is not None:
        return Verdict(name, False, refusal, may_allow=True), None
    obj = import_callable(name, where)
    home = (getattr(obj, "__module__", None) or "").split(".")[0]
    if home in sys.stdlib_module_names or not home and inspect.isbuiltin(obj):
        return Verdict(
            name,
            False,
            f"it is {describe_object(obj)} of the standard library ({home or 'builtin'}), which has no model factories",
        ), obj
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
    if torch is None or not isinstance(obj, type) or not issubclass(obj, torch.nn.Module) or builds_by_type(obj):
        return None
    return "a torch.nn.Module subclass"


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
    what = describe_object(obj)
    if isinstance(obj, type) and builds_by_type(obj):
        return (
            f"{what}: it builds its parts from `type:` names in its arguments, which may name any callable "
            f"(use ckptx.factories:mmpretrain_model, which reads only mmpretrain's shipped configs)"
        )
    return (
        f"{what}, not a torch.nn.Module subclass, a model factory of timm, torchvision, transformers or ckptx, "
        f"or a factory declared by an installed rule pack"
    )


def _may_allow(obj: Any) -> bool:
    """A refused callable the user may still allow: not builtin, not of the standard library, not of a known
    library (whose model factories the rule already knows)."""
    module = getattr(obj, "__module__", None) or ""
    top = module.split(".")[0]
    return not inspect.isbuiltin(obj) and top not in sys.stdlib_module_names and top not in KNOWN_LIBRARIES
