"""Model factories usable as `module:callable` targets and verify sources, for libraries whose
constructors do not take plain keyword arguments (HuggingFace configs, MMPretrain config files)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from ckptx.errors import TargetError
from ckptx.targets.config_fields import check_overrides
from ckptx.targets.metadevice import schedules_on_cpu

__all__ = [
    "CONVNEXTV2_SIZES",
    "convnextv2_hf",
    "convnextv2_mmpretrain",
    "convnextv2_timm",
    "mmpretrain_model",
    "timm_model",
    "transformers_model",
]

CONVNEXTV2_SIZES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "atto": ((2, 2, 6, 2), (40, 80, 160, 320)),
    "femto": ((2, 2, 6, 2), (48, 96, 192, 384)),
    "pico": ((2, 2, 6, 2), (64, 128, 256, 512)),
    "nano": ((2, 2, 8, 2), (80, 160, 320, 640)),
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
    "huge": ((3, 3, 27, 3), (352, 704, 1408, 2816)),
}


def transformers_model(
    architecture: str, config: Mapping[str, Any] | None = None, **config_kwargs: Any
) -> torch.nn.Module:
    """`transformers.<architecture>(<architecture's config class>(**config))`, randomly initialised, no download."""
    transformers = importlib.import_module("transformers")
    model_class = getattr(transformers, architecture, None)
    if not isinstance(model_class, type) or not issubclass(model_class, transformers.PreTrainedModel):
        raise TargetError(f"transformers has no model class '{architecture}'")
    config_class = getattr(model_class, "config_class", None)
    if config_class is None:
        raise TargetError(f"transformers' {architecture} names no config class")
    fields = {**dict(config or {}), **config_kwargs}
    return model_class(config_class(**{**fields, **check_overrides(config_class, {}, fields, architecture)}))


def convnextv2_hf(size: str = "atto", num_labels: int = 1000, **config: Any) -> torch.nn.Module:
    """HuggingFace `ConvNextV2ForImageClassification` configured like the official model of `size`."""
    depths, dims = _size(size)
    config.setdefault("layer_norm_eps", 1e-6)  # transformers' default 1e-12 differs from the official model
    return transformers_model(
        "ConvNextV2ForImageClassification",
        depths=list(depths),
        hidden_sizes=list(dims),
        num_labels=num_labels,
        **config,
    )


def convnextv2_timm(size: str = "atto", **kwargs: Any) -> torch.nn.Module:
    """`timm.create_model('convnextv2_<size>', pretrained=False)`."""
    return timm_model(f"convnextv2_{size}", **kwargs)


def timm_model(name: str, **kwargs: Any) -> torch.nn.Module:
    """`timm.create_model(name, pretrained=False, **kwargs)`, randomly initialised, no download."""
    timm = importlib.import_module("timm")
    return timm.create_model(name, pretrained=False, **kwargs)


def mmpretrain_model(config: str, part: str | None = None, num_classes: int | None = None) -> torch.nn.Module:
    """Build an MMPretrain model from one of its shipped configs (path relative to `.mim/configs`).

    `part='backbone'` returns only the backbone (what `init_cfg=dict(type='Pretrained')` loads into).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from mmengine.config import Config
        from mmpretrain.registry import MODELS
        from mmpretrain.utils import register_all_modules

        register_all_modules(init_default_scope=True)
        cfg = Config.fromfile(_mmpretrain_config(config))
        model_cfg = cfg.model
        if num_classes is not None:
            model_cfg.head.num_classes = num_classes
        model_cfg.pop("data_preprocessor", None)
        with schedules_on_cpu():  # drop-path schedules are read with .item(): buildable on the meta device
            model = MODELS.build(model_cfg)
    return getattr(model, part) if part else model


def convnextv2_mmpretrain(
    size: str = "atto", part: str | None = None, num_classes: int | None = None
) -> torch.nn.Module:
    """MMPretrain `ImageClassifier` (or its backbone) for ConvNeXt-V2 of `size`, from the shipped config."""
    _size(size)
    return mmpretrain_model(f"convnext_v2/convnext-v2-{size}_32xb32_in1k.py", part=part, num_classes=num_classes)


def _mmpretrain_config(relative: str) -> str:
    spec = importlib.util.find_spec("mmpretrain")
    if spec is None or spec.origin is None:
        raise TargetError("mmpretrain is not installed; pip install mmpretrain (see the README for CPU set-up)")
    configs = os.path.realpath(os.path.join(os.path.dirname(spec.origin), ".mim", "configs"))
    path = os.path.realpath(os.path.join(configs, relative))
    if os.path.commonpath([configs, path]) != configs or not os.path.isfile(path):
        # an mmengine config file is Python, run when read: only mmpretrain's own configs are read
        raise TargetError(f"mmpretrain ships no config {relative} (give a path under its .mim/configs)")
    return path


def _size(size: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    try:
        return CONVNEXTV2_SIZES[size]
    except KeyError:
        raise TargetError(f"unknown ConvNeXt-V2 size '{size}'; one of {', '.join(CONVNEXTV2_SIZES)}") from None
