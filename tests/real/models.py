"""Shared helpers for tests that use the real model libraries.

Everything a recipe test needs to build the *target* models and to check a
conversion end to end, without ckptx:

* :data:`SIZES` — depths/dims of every ConvNeXt-V2 size;
* ``build_official(size)`` (re-exported), :func:`build_timm`,
  :func:`build_hf`, :func:`build_mmpretrain` — freshly built, eval mode, no
  weights downloaded;
* :func:`logits` — run any of those models on an NCHW batch, return logits;
* :func:`seeded_input` — deterministic input batch;
* :func:`expected_shapes` — the documented key -> shape table of each library
  (see /work/shared/reference/convnextv2-names.md), generated for any size;
* :func:`reference_convert` — a hand-written, ckptx-independent oracle
  official -> {timm, hf, mmpretrain} (timm's uses timm's own
  ``checkpoint_filter_fn``).

Importing this module sets ``HF_HUB_OFFLINE=1`` (and friends) before any
HuggingFace library can be imported.  The heavy libraries are imported lazily
inside the builders.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402

from .official_convnextv2 import OFFICIAL_SIZES, build_official  # noqa: E402

__all__ = [
    "SIZES",
    "LIBRARIES",
    "TIMM_CONV_MLP_SIZES",
    "ATTO_TENSORS",
    "ATTO_PARAMS",
    "build_official",
    "build_timm",
    "build_hf",
    "build_mmpretrain",
    "build",
    "mmpretrain_config_path",
    "logits",
    "seeded_input",
    "expected_shapes",
    "reference_convert",
    "shapes_of",
    "library_available",
]

#: size -> (depths, dims), for the sizes of the official release
SIZES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = dict(OFFICIAL_SIZES)

#: names used throughout: the four layouts a checkpoint can be in
LIBRARIES = ("official", "timm", "hf", "mmpretrain")

#: timm builds these sizes with ``conv_mlp=True`` (mlp.fc1/fc2 are 1x1 Conv2d,
#: weights (4C, C, 1, 1) / (C, 4C, 1, 1)); tiny and larger use nn.Linear,
#: weights (4C, C) / (C, 4C) exactly like the official model.
TIMM_CONV_MLP_SIZES = frozenset({"atto", "femto", "pico", "nano"})

#: atto facts from the reference doc (identical in all four layouts)
ATTO_TENSORS = 140
ATTO_PARAMS = 3_708_400

_IMPORT_NAMES = {"timm": "timm", "hf": "transformers", "mmpretrain": "mmpretrain", "official": "torch"}


def library_available(lib: str) -> bool:
    """True if the library behind ``lib`` ('timm', 'hf', 'mmpretrain') is installed."""
    return importlib.util.find_spec(_IMPORT_NAMES[lib]) is not None


def seeded_input(seed: int = 0, shape: tuple[int, ...] = (2, 3, 64, 64)) -> torch.Tensor:
    """A deterministic float32 NCHW batch (independent of global RNG state)."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(shape, generator=g, dtype=torch.float32)


# --------------------------------------------------------------------------
# builders (all return eval-mode models with library-default init)
# --------------------------------------------------------------------------
def build_timm(size: str, **kwargs: Any) -> torch.nn.Module:
    """``timm.create_model('convnextv2_<size>', pretrained=False, **kwargs)``."""
    import timm

    kwargs.setdefault("pretrained", False)
    if kwargs["pretrained"]:
        raise ValueError("tests must never download weights")
    return timm.create_model(f"convnextv2_{size}", **kwargs).eval()


def hf_config(size: str, num_labels: int = 1000, **kwargs: Any):
    """ConvNextV2Config matching the official model (num_labels / eps fixed)."""
    from transformers import ConvNextV2Config

    depths, dims = SIZES[size]
    kwargs.setdefault("layer_norm_eps", 1e-6)  # default 1e-12 differs from the official 1e-6
    return ConvNextV2Config(depths=list(depths), hidden_sizes=list(dims), num_labels=num_labels, **kwargs)


def build_hf(size: str, num_labels: int = 1000, **kwargs: Any) -> torch.nn.Module:
    """``ConvNextV2ForImageClassification(ConvNextV2Config(...))`` for ``size``."""
    from transformers import ConvNextV2ForImageClassification

    return ConvNextV2ForImageClassification(hf_config(size, num_labels, **kwargs)).eval()


def mmpretrain_config_path(size: str, suffix: str = "_32xb32_in1k.py") -> str:
    """Path of MMPretrain's shipped config ``.mim/configs/convnext_v2/convnext-v2-<size>...``."""
    spec = importlib.util.find_spec("mmpretrain")
    if spec is None or spec.origin is None:
        raise ImportError("mmpretrain is not installed")
    root = os.path.dirname(spec.origin)
    path = os.path.join(root, ".mim", "configs", "convnext_v2", f"convnext-v2-{size}{suffix}")
    if not os.path.isfile(path):
        raise FileNotFoundError(path)
    return path


_MM_REGISTERED = False


def build_mmpretrain(size: str, num_classes: int | None = None) -> torch.nn.Module:
    """MMPretrain ``ImageClassifier`` built from the shipped ConvNeXt-V2 config.

    ``ConvNeXt(arch=size, use_grn=True, layer_scale_init_value=0.)`` +
    ``LinearClsHead``.  Built with ``MODELS.build(cfg.model)`` (no Runner, no
    init_weights call).  Run with ``model(x, mode='tensor')`` -> logits; that
    path skips the data preprocessor (no mean/std normalisation).
    """
    global _MM_REGISTERED
    with warnings.catch_warnings():
        # mmcv-lite has no compiled ops; mmcv warns about that on import.
        warnings.filterwarnings("ignore", message=".*MultiScaleDeformableAttention.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        from mmengine.config import Config
        from mmpretrain.registry import MODELS
        from mmpretrain.utils import register_all_modules

        if not _MM_REGISTERED:
            register_all_modules(init_default_scope=True)
            _MM_REGISTERED = True
        cfg = Config.fromfile(mmpretrain_config_path(size))
        model_cfg = cfg.model
        if num_classes is not None:
            model_cfg.head.num_classes = num_classes
        model = MODELS.build(model_cfg)
    return model.eval()


_BUILDERS: dict[str, Callable[..., torch.nn.Module]] = {
    "official": lambda size, **kw: build_official(size, **kw).eval(),
    "timm": build_timm,
    "hf": build_hf,
    "mmpretrain": build_mmpretrain,
}


def build(lib: str, size: str, **kwargs: Any) -> torch.nn.Module:
    """Build ``size`` in layout ``lib`` (one of :data:`LIBRARIES`), eval mode."""
    return _BUILDERS[lib](size, **kwargs)


@torch.no_grad()
def logits(model: torch.nn.Module, x: torch.Tensor, lib: str | None = None) -> torch.Tensor:
    """Forward ``x`` through any of the four model kinds, return (N, classes) logits."""
    if lib is None:
        name = type(model).__module__
        lib = "hf" if name.startswith("transformers") else "mmpretrain" if name.startswith("mmpretrain") else "timm"
    if lib == "hf":
        return model(pixel_values=x).logits
    if lib == "mmpretrain":
        return model(x, mode="tensor")
    return model(x)


def shapes_of(sd: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


# --------------------------------------------------------------------------
# documented key/shape tables
# --------------------------------------------------------------------------
def expected_shapes(lib: str, size: str, num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the state_dict of ``size`` in layout ``lib``, per the reference doc.

    Compare as dicts: the insertion order here is not the libraries' state_dict
    order (e.g. MMPretrain registers ``pointwise_conv2`` before ``grn``, timm
    and HF interleave each stage's downsample with its blocks).
    """
    depths, dims = SIZES[size]
    out: dict[str, tuple[int, ...]] = {}

    def block(prefix: str, C: int, names: dict[str, str], pw_conv: bool, grn_shape: tuple[int, ...]):
        pw1 = (4 * C, C, 1, 1) if pw_conv else (4 * C, C)
        pw2 = (C, 4 * C, 1, 1) if pw_conv else (C, 4 * C)
        out[f"{prefix}{names['dw']}.weight"] = (C, 1, 7, 7)
        out[f"{prefix}{names['dw']}.bias"] = (C,)
        out[f"{prefix}{names['norm']}.weight"] = (C,)
        out[f"{prefix}{names['norm']}.bias"] = (C,)
        out[f"{prefix}{names['pw1']}.weight"] = pw1
        out[f"{prefix}{names['pw1']}.bias"] = (4 * C,)
        out[f"{prefix}{names['grn_w']}"] = grn_shape
        out[f"{prefix}{names['grn_b']}"] = grn_shape
        out[f"{prefix}{names['pw2']}.weight"] = pw2
        out[f"{prefix}{names['pw2']}.bias"] = (C,)

    def pair(key: str, shape_w: tuple[int, ...], shape_b: tuple[int, ...]):
        out[f"{key}.weight"] = shape_w
        out[f"{key}.bias"] = shape_b

    d0 = dims[0]
    if lib in ("official", "mmpretrain"):
        p = "backbone." if lib == "mmpretrain" else ""
        pair(f"{p}downsample_layers.0.0", (d0, 3, 4, 4), (d0,))
        pair(f"{p}downsample_layers.0.1", (d0,), (d0,))
        for i in range(1, 4):
            pair(f"{p}downsample_layers.{i}.0", (dims[i - 1],), (dims[i - 1],))
            pair(f"{p}downsample_layers.{i}.1", (dims[i], dims[i - 1], 2, 2), (dims[i],))
        if lib == "official":
            names = dict(dw="dwconv", norm="norm", pw1="pwconv1", pw2="pwconv2", grn_w="grn.gamma", grn_b="grn.beta")
        else:
            names = dict(
                dw="depthwise_conv",
                norm="norm",
                pw1="pointwise_conv1",
                pw2="pointwise_conv2",
                grn_w="grn.gamma",
                grn_b="grn.beta",
            )
        for i, (n, C) in enumerate(zip(depths, dims)):
            for j in range(n):
                grn = (1, 1, 1, 4 * C) if lib == "official" else (4 * C,)
                block(f"{p}stages.{i}.{j}.", C, names, False, grn)
        if lib == "official":
            pair("norm", (dims[-1],), (dims[-1],))
            pair("head", (num_classes, dims[-1]), (num_classes,))
        else:
            pair("backbone.norm3", (dims[-1],), (dims[-1],))
            pair("head.fc", (num_classes, dims[-1]), (num_classes,))
    elif lib == "timm":
        pair("stem.0", (d0, 3, 4, 4), (d0,))
        pair("stem.1", (d0,), (d0,))
        names = dict(
            dw="conv_dw", norm="norm", pw1="mlp.fc1", pw2="mlp.fc2", grn_w="mlp.grn.weight", grn_b="mlp.grn.bias"
        )
        conv_mlp = size in TIMM_CONV_MLP_SIZES
        for i, (n, C) in enumerate(zip(depths, dims)):
            if i > 0:
                pair(f"stages.{i}.downsample.0", (dims[i - 1],), (dims[i - 1],))
                pair(f"stages.{i}.downsample.1", (C, dims[i - 1], 2, 2), (C,))
            for j in range(n):
                block(f"stages.{i}.blocks.{j}.", C, names, conv_mlp, (4 * C,))
        pair("head.norm", (dims[-1],), (dims[-1],))
        pair("head.fc", (num_classes, dims[-1]), (num_classes,))
    elif lib == "hf":
        pair("convnextv2.embeddings.patch_embeddings", (d0, 3, 4, 4), (d0,))
        pair("convnextv2.embeddings.layernorm", (d0,), (d0,))
        names = dict(dw="dwconv", norm="layernorm", pw1="pwconv1", pw2="pwconv2", grn_w="grn.weight", grn_b="grn.bias")
        for i, (n, C) in enumerate(zip(depths, dims)):
            if i > 0:
                pair(f"convnextv2.encoder.stages.{i}.downsampling_layer.0", (dims[i - 1],), (dims[i - 1],))
                pair(f"convnextv2.encoder.stages.{i}.downsampling_layer.1", (C, dims[i - 1], 2, 2), (C,))
            for j in range(n):
                block(f"convnextv2.encoder.stages.{i}.layers.{j}.", C, names, False, (1, 1, 1, 4 * C))
        pair("convnextv2.layernorm", (dims[-1],), (dims[-1],))
        pair("classifier", (num_classes, dims[-1]), (num_classes,))
    else:
        raise ValueError(f"unknown layout {lib!r}; expected one of {LIBRARIES}")
    return out


# --------------------------------------------------------------------------
# ckptx-independent reference conversion (the test oracle)
# --------------------------------------------------------------------------
def _unwrap(ckpt: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    sd = ckpt["model"] if "model" in ckpt and isinstance(ckpt["model"], Mapping) else ckpt
    return dict(sd)


_HF_RULES = [
    (r"^downsample_layers\.0\.0\.", "convnextv2.embeddings.patch_embeddings."),
    (r"^downsample_layers\.0\.1\.", "convnextv2.embeddings.layernorm."),
    (r"^downsample_layers\.(\d+)\.(\d+)\.", r"convnextv2.encoder.stages.\1.downsampling_layer.\2."),
    (r"^stages\.(\d+)\.(\d+)\.norm\.", r"convnextv2.encoder.stages.\1.layers.\2.layernorm."),
    (r"^stages\.(\d+)\.(\d+)\.grn\.gamma$", r"convnextv2.encoder.stages.\1.layers.\2.grn.weight"),
    (r"^stages\.(\d+)\.(\d+)\.grn\.beta$", r"convnextv2.encoder.stages.\1.layers.\2.grn.bias"),
    (r"^stages\.(\d+)\.(\d+)\.", r"convnextv2.encoder.stages.\1.layers.\2."),
    (r"^norm\.", "convnextv2.layernorm."),
    (r"^head\.", "classifier."),
]

_MM_RULES = [
    (r"^downsample_layers\.", "backbone.downsample_layers."),
    (r"^stages\.(\d+)\.(\d+)\.dwconv\.", r"backbone.stages.\1.\2.depthwise_conv."),
    (r"^stages\.(\d+)\.(\d+)\.pwconv(\d)\.", r"backbone.stages.\1.\2.pointwise_conv\3."),
    (r"^stages\.", "backbone.stages."),
    (r"^norm\.", "backbone.norm3."),
    (r"^head\.", "head.fc."),
]


def _apply_rules(key: str, rules) -> str:
    for pat, rep in rules:
        new, n = re.subn(pat, rep, key)
        if n:
            return new
    raise KeyError(f"no rule for {key!r}")


def reference_convert(
    ckpt: Mapping[str, Any], lib: str, model: torch.nn.Module | None = None
) -> dict[str, torch.Tensor]:
    """Convert an official checkpoint/state_dict to ``lib`` layout, without ckptx.

    * ``timm``: timm's own ``checkpoint_filter_fn`` (needs ``model`` for the
      target shapes);
    * ``hf``: renames only (GRN stays (1,1,1,4C), pointwise convs stay Linear);
    * ``mmpretrain``: renames; GRN gamma/beta reshaped (1,1,1,4C) -> (4C,).
    """
    if lib == "timm":
        from timm.models.convnext import checkpoint_filter_fn

        if model is None:
            raise ValueError("timm conversion needs the target model")
        return checkpoint_filter_fn(dict(ckpt), model)
    sd = _unwrap(ckpt)
    if lib == "official":
        return sd
    if lib == "hf":
        return {_apply_rules(k, _HF_RULES): v for k, v in sd.items()}
    if lib == "mmpretrain":
        out = {}
        for k, v in sd.items():
            nk = _apply_rules(k, _MM_RULES)
            if ".grn." in nk:
                v = v.reshape(v.shape[-1])
            out[nk] = v
        return out
    raise ValueError(f"unknown layout {lib!r}")
