"""A small, faithful re-implementation of the OFFICIAL ConvNeXt-V2 model.

Mirrors facebookresearch/ConvNeXt-V2 ``models/convnextv2.py`` and the
``LayerNorm`` / ``GRN`` classes of ``models/utils.py``: same module tree, same
parameter names and shapes, same forward semantics (eval mode).  Used by the
tests as the *source* side of every conversion: a checkpoint written by
:func:`make_official_checkpoint` has exactly the layout of an official release
file (``{'model': state_dict}``) or of an official training checkpoint
(``model``, ``optimizer``, ``epoch``, ``scaler``, ``args``).

Differences from the official file, none of which touch names, shapes or
eval-mode numerics:

* no dependency on timm (``DropPath`` is re-implemented; ``trunc_normal_`` init
  is not used because the official code has ``self.apply(self._init_weights)``
  commented out as well);
* no MinkowskiEngine sparse variants (those only exist for FCMAE pre-training);
* ``convnextv2_pico`` is provided under its intended name (the official file
  spells it ``convnext_pico``; that alias exists here too).
"""
from __future__ import annotations

import argparse
import copy
import math
import os
from typing import Any, Mapping, Sequence

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


# --------------------------------------------------------------------------
# models/utils.py
# --------------------------------------------------------------------------
class LayerNorm(nn.Module):
    """LayerNorm for channels_last (N, H, W, C) or channels_first (N, C, H, W)."""

    def __init__(self, normalized_shape, eps=1e-6, data_format="channels_last"):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(normalized_shape))
        self.bias = nn.Parameter(torch.zeros(normalized_shape))
        self.eps = eps
        self.data_format = data_format
        if self.data_format not in ["channels_last", "channels_first"]:
            raise NotImplementedError
        self.normalized_shape = (normalized_shape,)

    def forward(self, x):
        if self.data_format == "channels_last":
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        # channels_first
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        x = self.weight[:, None, None] * x + self.bias[:, None, None]
        return x


class GRN(nn.Module):
    """Global Response Normalization on NHWC input; gamma/beta are (1, 1, 1, dim)."""

    def __init__(self, dim):
        super().__init__()
        # Zero-initialised exactly like the official code (GRN starts as identity).
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x):
        Gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
        Nx = Gx / (Gx.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * Nx) + self.beta + x


class DropPath(nn.Module):
    """Stochastic depth (per sample); identity in eval mode. Has no parameters."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = x.new_empty(shape).bernoulli_(keep_prob)
        if keep_prob > 0.0 and self.scale_by_keep:
            mask.div_(keep_prob)
        return x * mask


# --------------------------------------------------------------------------
# models/convnextv2.py
# --------------------------------------------------------------------------
class Block(nn.Module):
    """ConvNeXtV2 block: dwconv -> LN -> Linear -> GELU -> GRN -> Linear, residual."""

    def __init__(self, dim, drop_path=0.0):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)  # depthwise conv
        self.norm = LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)  # pointwise/1x1 convs, implemented with linear layers
        self.act = nn.GELU()
        self.grn = GRN(4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x):
        input = x
        x = self.dwconv(x)
        x = x.permute(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)
        x = self.norm(x)
        x = self.pwconv1(x)
        x = self.act(x)
        x = self.grn(x)
        x = self.pwconv2(x)
        x = x.permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
        x = input + self.drop_path(x)
        return x


class ConvNeXtV2(nn.Module):
    """ConvNeXt V2 (official layout)."""

    def __init__(
        self,
        in_chans=3,
        num_classes=1000,
        depths=(3, 3, 9, 3),
        dims=(96, 192, 384, 768),
        drop_path_rate=0.0,
        head_init_scale=1.0,
    ):
        super().__init__()
        depths = list(depths)
        dims = list(dims)
        self.depths = depths
        self.downsample_layers = nn.ModuleList()  # stem and 3 intermediate downsampling conv layers
        stem = nn.Sequential(
            nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4),
            LayerNorm(dims[0], eps=1e-6, data_format="channels_first"),
        )
        self.downsample_layers.append(stem)
        for i in range(3):
            downsample_layer = nn.Sequential(
                LayerNorm(dims[i], eps=1e-6, data_format="channels_first"),
                nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2),
            )
            self.downsample_layers.append(downsample_layer)

        self.stages = nn.ModuleList()  # 4 feature resolution stages
        dp_rates = [x.item() for x in torch.linspace(0, drop_path_rate, sum(depths))]
        cur = 0
        for i in range(4):
            stage = nn.Sequential(*[Block(dim=dims[i], drop_path=dp_rates[cur + j]) for j in range(depths[i])])
            self.stages.append(stage)
            cur += depths[i]

        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)  # final norm layer
        self.head = nn.Linear(dims[-1], num_classes)

        self.head.weight.data.mul_(head_init_scale)
        self.head.bias.data.mul_(head_init_scale)

    def forward_features(self, x):
        for i in range(4):
            x = self.downsample_layers[i](x)
            x = self.stages[i](x)
        return self.norm(x.mean([-2, -1]))  # global average pooling, (N, C, H, W) -> (N, C)

    def forward(self, x):
        x = self.forward_features(x)
        x = self.head(x)
        return x


# depths, dims of every official variant
OFFICIAL_SIZES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "atto": ((2, 2, 6, 2), (40, 80, 160, 320)),
    "femto": ((2, 2, 6, 2), (48, 96, 192, 384)),
    "pico": ((2, 2, 6, 2), (64, 128, 256, 512)),
    "nano": ((2, 2, 8, 2), (80, 160, 320, 640)),
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
    "huge": ((3, 3, 27, 3), (352, 704, 1408, 2816)),
}


def build_official(size: str, **kwargs) -> ConvNeXtV2:
    depths, dims = OFFICIAL_SIZES[size]
    return ConvNeXtV2(depths=list(depths), dims=list(dims), **kwargs)


def convnextv2_atto(**kwargs):
    return build_official("atto", **kwargs)


def convnextv2_femto(**kwargs):
    return build_official("femto", **kwargs)


def convnextv2_pico(**kwargs):
    return build_official("pico", **kwargs)


convnext_pico = convnextv2_pico  # the official file's spelling


def convnextv2_nano(**kwargs):
    return build_official("nano", **kwargs)


def convnextv2_tiny(**kwargs):
    return build_official("tiny", **kwargs)


def convnextv2_base(**kwargs):
    return build_official("base", **kwargs)


def convnextv2_large(**kwargs):
    return build_official("large", **kwargs)


def convnextv2_huge(**kwargs):
    return build_official("huge", **kwargs)


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
