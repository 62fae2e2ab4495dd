"""Building a target model: a `module:callable` factory, allowed by the trust rule, called on the meta device."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ckptx._lazy import lazy_module
from ckptx.errors import CkptxError, FactoryFailed, TargetError
from ckptx.rules.recipe import Origin
from ckptx.trust.callables import trusted_factory

if TYPE_CHECKING:  # pragma: no cover
    import torch
else:
    torch = lazy_module("torch")

__all__ = ["build_model"]


def build_model(
    spec: str, kwargs: Mapping[str, Any], where: str, *, device: str = "meta", origin: Origin | None = None
) -> torch.nn.Module:
    """Call a `module:callable` model factory under `torch.device(device)`; FactoryFailed when it raises.

    `origin` says who named it: a name from a file (the default) is called only if the trust rule allows
    it (UntrustedCallable otherwise, nothing called); pass `Origin.user(...)` for a name the user typed.
    """
    factory = trusted_factory(spec, kwargs, origin or Origin(), where)
    try:
        with torch.device(device):
            model = factory(**kwargs)
    except CkptxError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of user code is reported, not crashed on
        raise FactoryFailed(f"{where}: {spec}(**{dict(kwargs)!r}) failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(model, torch.nn.Module):
        raise TargetError(f"{where}: {spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model
