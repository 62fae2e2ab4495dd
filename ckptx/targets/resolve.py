"""Targets: what converted weights must fit (a model factory built on the meta device, a reference checkpoint, a
manifest)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptx._lazy import lazy_module
from ckptx.dtypes import TensorMeta, dtype_name
from ckptx.errors import FactoryFailed, TargetError
from ckptx.io.manifest import read_manifest
from ckptx.io.read.open import open_source
from ckptx.rules.recipe import Origin, TargetSpec
from ckptx.targets.hf_model import build_from_config, config_path, load_model_config, saved_state
from ckptx.targets.instantiate import build_model

if TYPE_CHECKING:  # pragma: no cover
    import torch
else:
    torch = lazy_module("torch")

__all__ = ["Target", "parse_target_arg", "resolve_target", "state_metas"]

_MODEL_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


@dataclass(frozen=True)
class Target:
    """What a target expects: key -> shape/dtype, and which differences are allowed."""

    description: str
    tensors: dict[str, TensorMeta]
    allow_missing: tuple[re.Pattern[str], ...] = ()
    allow_unexpected: tuple[re.Pattern[str], ...] = ()
    notes: tuple[str, ...] = ()
    ties: tuple[tuple[str, ...], ...] = ()  # keys that share one tensor in a model target (an output head tied to the
    # token embedding): a file may store it once, the model still wants it under every name
    kinds: Mapping[str, str] = field(default_factory=dict)  # key -> the kind of module holding it (`module_kind`), for
    # a model target: what `suggest` knows beyond names and shapes
    rotary_dim: int | None = None  # a model target with rotary position embeddings (an `inv_freq` buffer): the number
    # of rotated dimensions per head
    config: Mapping[str, Any] | None = None  # a transformers target's config (head counts for the rotary step)
    class_layout: Mapping[str, TensorMeta] | None = None  # a saved-layout target whose class names its tensors
    # otherwise (transformers' conversion mappings): from_pretrained loads those names too


def parse_target_arg(spec: str, kwargs: Mapping[str, Any] | None = None) -> TargetSpec:
    """A CLI `--target SPEC`: `module:callable`, a model folder (`DIR/`, `DIR/config.json`, Meta's
    `DIR/params.json`), a manifest (.json/.yaml) or a reference checkpoint."""
    if config_path(spec) is not None:
        return TargetSpec(config=spec, kwargs=dict(kwargs or {}), where="--target", saved_layout=True)
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
    if spec.model or spec.config:
        model, notes = _built(spec)
        own = model.state_dict(keep_vars=True)  # the parameters themselves: tied ones are one object
        state = saved_state(model) if spec.saved_layout or spec.config else own
        to_dict = getattr(getattr(model, "config", None), "to_dict", None)
        document = to_dict() if callable(to_dict) else None
        by_class = state_metas(saved_state(model, file_names=False) if spec.saved_layout or spec.config else own)
        tensors = state_metas(state)
        rotary = [2 * b.numel() for name, b in model.named_buffers() if name.rpartition(".")[2] == "inv_freq"]
        return Target(
            _describe(spec, model),
            tensors,
            spec.allow_missing,
            spec.allow_unexpected,
            notes=notes,
            ties=_ties(state),
            kinds=module_kinds(model, own),
            rotary_dim=max(rotary) if rotary else None,
            config=document,
            class_layout=by_class if set(by_class) != set(tensors) else None,
        )
    if spec.manifest:
        return Target(spec.manifest, read_manifest(Path(spec.manifest)), spec.allow_missing, spec.allow_unexpected)
    if spec.checkpoint:
        with open_source(spec.checkpoint) as source:
            return Target(spec.checkpoint, dict(source.tensors), spec.allow_missing, spec.allow_unexpected)
    raise TargetError(f"{spec.where or 'target'}: give one of model, checkpoint or manifest")


def _built(spec: TargetSpec) -> tuple[Any, tuple[str, ...]]:
    """The target model, built once on the meta device; on the CPU (with a note) when a factory itself fails there
    (some build real tensors, e.g. `torch.arange(...).item()`)."""
    where = spec.where or "target"
    if spec.config:
        return build_from_config(load_model_config(spec.config, spec.kwargs, where=where)), ()
    try:
        return build_model(spec.model or "", spec.kwargs, where, origin=spec.model_origin), ()
    except FactoryFailed as exc:
        model = build_model(spec.model or "", spec.kwargs, where, device="cpu", origin=spec.model_origin)
        return model, (f"built on the CPU: the factory does not run on the meta device ({exc})",)


def _describe(spec: TargetSpec, model: Any) -> str:
    """The target's name; a folder target says which class and that it is the folder layout."""
    if spec.config:
        overrides = ", ".join(f"{k}={v!r}" for k, v in spec.kwargs.items())
        return f"{type(model).__name__} from {spec.config}" + (f" ({overrides})" if overrides else "")
    return spec.describe() + (" as save_pretrained writes it" if spec.saved_layout and _converts(model) else "")


def _converts(model: Any) -> bool:
    """True when the model's files differ from its state dict (a transformers conversion mapping)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
    except ImportError:
        return False
    try:
        return bool(get_model_conversion_mapping(model, add_legacy=False))
    except Exception:  # noqa: BLE001 - only for the description
        return False


def _ties(state: Mapping[str, Any]) -> tuple[tuple[str, ...], ...]:
    """Groups of keys of a state dict (kept as variables) that are one tensor."""
    groups: dict[int, list[str]] = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            groups.setdefault(id(value), []).append(key)
    return tuple(tuple(keys) for keys in groups.values() if len(keys) > 1)


#: module classes by kind; a subclass counts as its base (timm's LayerNorm2d is a LayerNorm)
_KINDS = (
    ("linear", ("Linear", "LazyLinear", "Bilinear")),
    ("conv", ("Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d")),
    ("batchnorm", ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm")),
    (
        "norm",
        (
            "LayerNorm",
            "GroupNorm",
            "RMSNorm",
            "InstanceNorm1d",
            "InstanceNorm2d",
            "InstanceNorm3d",
            "LocalResponseNorm",
        ),
    ),
    ("embedding", ("Embedding", "EmbeddingBag")),
)
_WEIGHTS = frozenset({"weight", "bias", "running_mean", "running_var", "num_batches_tracked"})


def module_kind(module: Any, param: str) -> str:
    """What holds a parameter: `linear`, `conv`, `batchnorm`, `norm`, `embedding`, `linear_t` (a Linear storing its
    weight (in, out), transformers' Conv1D), `attention` (nn.MultiheadAttention's fused in_proj), `parameter` (a
    bare nn.Parameter or buffer of a module of its own making) or `other`."""
    names = {cls.__name__ for cls in type(module).__mro__ if cls.__module__.startswith("torch.nn")}
    for kind, classes in _KINDS:
        if names & set(classes):
            return kind if param in _WEIGHTS else "parameter"
    own = type(module).__name__
    if own == "Conv1D" and param in ("weight", "bias"):
        return "linear_t"
    if "MultiheadAttention" in names:
        return "attention" if param.startswith("in_proj") else "parameter"
    if param in ("weight", "bias") and (own.endswith(("Norm", "Norm2d", "LayerNorm", "RMSNorm")) or "Norm" in own):
        return "norm"
    return "other" if param in _WEIGHTS else "parameter"


def module_kinds(model: Any, state: Mapping[str, Any]) -> dict[str, str]:
    """key -> `module_kind` of the module that holds it, for every key of a model's state dict."""
    modules = dict(model.named_modules())
    out = {}
    for key in state:
        owner, _, param = key.rpartition(".")
        module = modules.get(owner)
        if module is not None:
            out[key] = module_kind(module, param)
    return out


def state_metas(state: Mapping[str, Any]) -> dict[str, TensorMeta]:
    """key -> TensorMeta of the tensors of a state dict."""
    return {k: TensorMeta(tuple(v.shape), dtype_name(v.dtype)) for k, v in state.items() if isinstance(v, torch.Tensor)}
