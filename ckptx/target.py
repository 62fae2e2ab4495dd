"""Targets: what converted weights must fit (a model factory built on the meta device, a reference checkpoint, a manifest)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ckptx._lazy import lazy_module
from ckptx.dtypes import TensorMeta, dtype_name
from ckptx.errors import CkptxError, TargetError
from ckptx.io.manifest import read_manifest
from ckptx.io.open import open_source
from ckptx.rules.recipe import Origin, TargetSpec
from ckptx.trust import trusted_factory

torch = lazy_module("torch")

__all__ = ["FactoryFailed", "Target", "build_model", "parse_target_arg", "resolve_target", "state_metas"]

_MODEL_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


@dataclass(frozen=True)
class Target:
    """What a target expects: key -> shape/dtype, and which differences are allowed."""

    description: str
    tensors: dict[str, TensorMeta]
    allow_missing: tuple[re.Pattern[str], ...] = ()
    allow_unexpected: tuple[re.Pattern[str], ...] = ()
    notes: tuple[str, ...] = ()


def parse_target_arg(spec: str, kwargs: Mapping[str, Any] | None = None) -> TargetSpec:
    """A CLI `--target SPEC`: `module:callable`, a manifest (.json/.yaml) or a reference checkpoint."""
    if _MODEL_SPEC.match(spec) and not Path(spec).exists():
        return TargetSpec(model=spec, kwargs=dict(kwargs or {}), where="--target", model_origin=Origin.user("--target"))
    if Path(spec).suffix in (".json", ".yaml", ".yml") and not spec.endswith(".index.json"):
        return TargetSpec(manifest=spec, where="--target")
    return TargetSpec(checkpoint=spec, kwargs=dict(kwargs or {}), where="--target")


def resolve_target(spec: TargetSpec | str | Mapping[str, Any] | torch.nn.Module) -> Target:
    """Turn a target spec, a live module or a state dict into the keys and shapes it expects."""
    if isinstance(spec, torch.nn.Module):
        return Target(type(spec).__name__, state_metas(spec.state_dict()))
    if isinstance(spec, str):
        spec = parse_target_arg(spec)
    if isinstance(spec, Mapping):
        return Target("<state_dict>", state_metas(spec))
    common = {"allow_missing": spec.allow_missing, "allow_unexpected": spec.allow_unexpected}
    if spec.model:
        tensors, notes = _model_tensors(spec)
        return Target(spec.describe(), tensors, notes=notes, **common)
    if spec.manifest:
        return Target(spec.manifest, read_manifest(Path(spec.manifest)), **common)
    if spec.checkpoint:
        with open_source(spec.checkpoint) as source:
            return Target(spec.checkpoint, dict(source.tensors), **common)
    raise TargetError(f"{spec.where or 'target'}: give one of model, checkpoint or manifest")


class FactoryFailed(TargetError):
    """A model factory was found and called, and raised (as opposed to: it could not be imported)."""


def build_model(spec: str, kwargs: Mapping[str, Any], where: str, *, device: str = "meta",
                origin: Origin = Origin()) -> torch.nn.Module:
    """Call a `module:callable` model factory under `torch.device(device)`; FactoryFailed when it raises.

    `origin` says who named it: a name from a file (the default) is called only if the trust rule allows
    it (UntrustedCallable otherwise, nothing called); pass `Origin.user(...)` for a name the user typed.
    """
    factory = trusted_factory(spec, kwargs, origin, where)
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


def _model_tensors(spec: TargetSpec) -> tuple[dict[str, TensorMeta], tuple[str, ...]]:
    """The factory's state dict metadata, built on the meta device; on the CPU (with a note) when the factory
    itself fails there (some build real tensors, e.g. `torch.arange(...).item()`)."""
    where = spec.where or "target"
    try:
        model = build_model(spec.model or "", spec.kwargs, where, origin=spec.model_origin)
        return state_metas(model.state_dict()), ()
    except FactoryFailed as exc:
        model = build_model(spec.model or "", spec.kwargs, where, device="cpu", origin=spec.model_origin)
        return state_metas(model.state_dict()), (f"built on the CPU: the factory does not run on the meta device ({exc})",)


def state_metas(state: Mapping[str, Any]) -> dict[str, TensorMeta]:
    """key -> TensorMeta of the tensors of a state dict."""
    return {k: TensorMeta(tuple(v.shape), dtype_name(v.dtype)) for k, v in state.items() if isinstance(v, torch.Tensor)}
