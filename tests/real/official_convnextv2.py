"""The official ConvNeXt-V2 model and official-format checkpoints, for the tests.

The model (same module tree, parameter names, shapes and eval-mode numerics as
facebookresearch/ConvNeXt-V2 ``models/convnextv2.py`` and ``models/utils.py``)
ships with ckptx as ``ckptx.reference.convnextv2`` — it is the source model of
``ckptx convert --verify`` for the ConvNeXt-V2 recipes — and is re-exported
here under the official names. This module adds what only the tests need:
:func:`randomize_` (non-trivial weights, GRN non-zero) and
:func:`make_official_checkpoint` (the release file ``{'model': state_dict}``,
or the training checkpoint with ``optimizer``, ``epoch``, ``scaler``, ``args``).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "LayerNorm",
    "GRN",
    "DropPath",
    "Block",
    "ConvNeXtV2",
    "OFFICIAL_SIZES",
    "build_official",
    "convnextv2_atto",
    "convnextv2_femto",
    "convnextv2_pico",
    "convnext_pico",
    "convnextv2_nano",
    "convnextv2_tiny",
    "convnextv2_base",
    "convnextv2_large",
    "convnextv2_huge",
    "randomize_",
    "make_official_checkpoint",
    "load_official_checkpoint",
    "optimizer_param_names",
]


# The model itself ships with ckptx (`ckptx.reference.convnextv2`, the source model of `--verify`);
# the tests in test_reference_models.py prove it faithful against timm's own converter.
from ckptx.reference.convnextv2 import GRN, Block, ConvNeXtV2, DropPath, LayerNorm
from ckptx.reference.convnextv2 import SIZES as OFFICIAL_SIZES
from ckptx.reference.convnextv2 import build as _build


def build_official(size: str, **kwargs) -> ConvNeXtV2:
    """The official model of a named size."""
    return _build(size, **kwargs)


def _factory(size: str):
    def make(**kwargs):
        return build_official(size, **kwargs)

    make.__name__ = f"convnextv2_{size}"
    return make


(
    convnextv2_atto,
    convnextv2_femto,
    convnextv2_pico,
    convnextv2_nano,
    convnextv2_tiny,
    convnextv2_base,
    convnextv2_large,
    convnextv2_huge,
) = (_factory(size) for size in OFFICIAL_SIZES)
convnext_pico = convnextv2_pico  # the official file's spelling


# --------------------------------------------------------------------------
# test helpers
# --------------------------------------------------------------------------
@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every parameter with non-trivial, seeded random values (in place).

    Every tensor gets values that differ element-wise (so a transposed,
    permuted, swapped or mis-reshaped tensor changes the output), with scales
    that keep activations O(1) through the network so that float32 logits can
    be compared with an absolute tolerance of 1e-4:

    * LayerNorm weight ``1 + 0.2 N(0,1)``, bias ``0.1 N(0,1)``;
    * GRN gamma ``0.5 N(0,1)``, beta ``0.1 N(0,1)`` — deliberately NON-zero
      (the official init is zero, which makes GRN an identity and would hide
      any GRN naming/reshaping bug);
    * conv / linear weights ``N(0,1) / sqrt(fan_in)``, biases ``0.05 N(0,1)``.

    Works for any module tree (the official model, timm, HF, MMPretrain):
    the role of a tensor is taken from the class name of the module that owns
    it (``*GRN*``/``*ResponseNorm*``, ``*Norm*``, else by ndim).  Parameter
    registration order differs between libraries, so the same seed gives
    different values in different trees: randomize the SOURCE model and
    convert, never randomize both sides.  Returns the model.
    """
    g = torch.Generator().manual_seed(int(seed))

    def randn(shape):
        return torch.randn(shape, generator=g, dtype=torch.float32)

    for _mod_name, mod in model.named_modules():
        kind = type(mod).__name__.lower()
        for leaf, p in mod.named_parameters(recurse=False):
            if "grn" in kind or "responsenorm" in kind:
                # gamma/weight multiplies, beta/bias adds
                scale = 0.5 if leaf in ("gamma", "weight") else 0.1
                val = scale * randn(p.shape)
            elif "norm" in kind and p.ndim == 1:
                val = 1.0 + 0.2 * randn(p.shape) if leaf == "weight" else 0.1 * randn(p.shape)
            elif p.ndim >= 2:
                fan_in = math.prod(p.shape[1:])
                val = randn(p.shape) / math.sqrt(fan_in)
            else:  # biases and anything else 1-D
                val = 0.05 * randn(p.shape)
            p.copy_(val.to(p.dtype))
    return model


def _args_namespace(model_name: str, output_dir: str) -> argparse.Namespace:
    """An ``args`` object like the one main_finetune.py stores in checkpoints."""
    return argparse.Namespace(
        batch_size=32,
        epochs=600,
        update_freq=1,
        model=model_name,
        input_size=224,
        drop_path=0.1,
        layer_decay_type="single",
        model_ema=False,
        clip_grad=None,
        weight_decay=0.05,
        lr=2e-4,
        blr=2e-4,
        layer_decay=1.0,
        min_lr=1e-6,
        warmup_epochs=40,
        warmup_steps=-1,
        opt="adamw",
        opt_eps=1e-8,
        opt_betas=None,
        momentum=0.9,
        weight_decay_end=None,
        smoothing=0.2,
        mixup=0.8,
        cutmix=1.0,
        finetune="",
        head_init_scale=0.001,
        model_key="model|module",
        model_prefix="",
        data_path="/datasets01/imagenet_full_size/061417/",
        nb_classes=1000,
        output_dir=output_dir,
        log_dir=None,
        device="cuda",
        seed=0,
        resume="",
        auto_resume=True,
        save_ckpt=True,
        save_ckpt_freq=1,
        save_ckpt_num=3,
        start_epoch=0,
        eval=False,
        dist_eval=True,
        num_workers=10,
        pin_mem=True,
        world_size=1,
        local_rank=-1,
        dist_on_itp=False,
        dist_url="env://",
        use_amp=True,
        distributed=False,
    )


def _is_no_decay(name: str, p: torch.Tensor) -> bool:
    return p.ndim == 1 or name.endswith(".bias") or name.endswith(".gamma") or name.endswith(".beta")


def optimizer_param_names(model: nn.Module) -> list[str]:
    """Parameter names in the index order of the saved optimizer state.

    The optimizer's integer parameter ids follow the param GROUPS
    (all decayed tensors first, then the no-decay ones), NOT
    ``model.parameters()`` order — as in the official training code.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, p in named if not _is_no_decay(n, p)] + [n for n, p in named if _is_no_decay(n, p)]


def _optimizer_state(model: nn.Module, seed: int) -> dict[str, Any]:
    """AdamW state dict after one real step, with the official param grouping.

    The step is taken on a deep copy, so ``model`` itself is left untouched.
    Parameter groups follow ConvNeXt-V2's optim_factory: no weight decay for
    1-D tensors / biases and for ``*.gamma``/``*.beta`` (GRN), each group with
    an ``lr_scale``.  See :func:`optimizer_param_names` for the id order.
    """
    work = copy.deepcopy(model)
    work.train()
    params = dict(work.named_parameters())
    order = optimizer_param_names(work)
    decay = [params[n] for n in order if not _is_no_decay(n, params[n])]
    no_decay = [params[n] for n in order if _is_no_decay(n, params[n])]
    groups = [
        {"params": decay, "weight_decay": 0.05, "lr_scale": 1.0},
        {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0},
    ]
    opt = torch.optim.AdamW(groups, lr=2e-4, betas=(0.9, 0.999), eps=1e-8)
    g = torch.Generator().manual_seed(int(seed) + 1)
    in_chans = work.downsample_layers[0][0].in_channels if hasattr(work, "downsample_layers") else 3
    x = torch.randn(2, in_chans, 32, 32, generator=g)
    out = work(x)
    target = torch.randint(0, out.shape[-1], (2,), generator=g)
    loss = F.cross_entropy(out, target)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return opt.state_dict()


def make_official_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    training: bool = True,
    *,
    seed: int = 0,
    epoch: int = 3,
    model_name: str = "convnextv2_atto",
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Save ``model`` in the official ConvNeXt-V2 checkpoint format; return the dict.

    ``training=False``: ``{'model': state_dict}`` (the published release files).
    ``training=True``: what ``utils.save_model`` writes during training::

        {'model': state_dict, 'optimizer': AdamW state (stepped once),
         'epoch': 3, 'scaler': GradScaler state, 'args': argparse.Namespace}

    The training form cannot be read with ``torch.load(weights_only=True)``
    (``argparse.Namespace`` is not an allowed global); use
    :func:`load_official_checkpoint`.  ``model`` is not modified.
    """
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ckpt: dict[str, Any] = {"model": sd}
    if training:
        ckpt["optimizer"] = _optimizer_state(model, seed)
        ckpt["epoch"] = epoch
        ckpt["scaler"] = {
            "scale": 65536.0,
            "growth_factor": 2.0,
            "backoff_factor": 0.5,
            "growth_interval": 2000,
            "_growth_tracker": 0,
        }
        ckpt["args"] = _args_namespace(model_name, os.fspath(os.path.dirname(os.fspath(path)) or "."))
    if extra:
        ckpt.update(extra)
    torch.save(ckpt, os.fspath(path))
    return ckpt


def load_official_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load either checkpoint form on CPU (weights_only=False: needs the Namespace)."""
    return torch.load(os.fspath(path), map_location="cpu", weights_only=False)
