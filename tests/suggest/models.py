"""Real models for the `ckptx suggest` tests: small configs, random weights, nothing downloaded.

Every builder returns an eval-mode model. `randomize` fills every floating tensor (BatchNorm running
statistics included, variances positive) so that a wrong mapping changes the outputs. The factories here
are `module:callable` targets for `ckptx suggest --target` and `ckptx convert` (the recipe's `target:`).
"""

from __future__ import annotations

import math
import os
import warnings

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ.setdefault(_var, "1")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

__all__ = [
    "GPT_CONFIG",
    "VIT",
    "hf_gpt2",
    "hf_resnet50",
    "hf_vit",
    "mm_resnet50",
    "nano_gpt",
    "randomize",
    "run",
    "timm_vit",
    "tv_vit",
]

#: one small ViT for every library: 2 blocks, 32x32 images (a 2x2 grid of 16x16 patches), width 64, 10 classes
VIT = dict(layers=2, width=64, heads=2, mlp=128, patch=16, image=32, classes=10)
#: a small GPT-2
GPT_CONFIG = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=16)


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random non-trivial values in every floating tensor (running variances in [0.5, 1.5])."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif tensor.dim() <= 1 or name.endswith(("gamma", "beta", "grn.weight", "grn.bias")):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.2 + (1.0 if "weight" in name else 0.0))
            else:
                fan_in = max(1, tensor[0].numel())
                tensor.copy_(torch.randn(tensor.shape, generator=generator) / math.sqrt(fan_in))
    return model.eval()


@torch.no_grad()
def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's main output on `x`: logits, a tensor, or the first item."""
    name = type(model).__module__
    if name.startswith("mmpretrain"):
        out = model(x, mode="tensor")
    else:
        out = model(x)
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


# --------------------------------------------------------------------------- factories (module:callable targets)
def hf_resnet50(num_labels: int = 1000) -> nn.Module:
    """transformers `ResNetForImageClassification` with the ResNet-50 layout."""
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(
        depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048], layer_type="bottleneck", num_labels=num_labels
    )
    return ResNetForImageClassification(config)


def mm_resnet50() -> nn.Module:
    """MMPretrain `ImageClassifier` built from its shipped ResNet-50 config."""
    from ckptx.factories import mmpretrain_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mmpretrain_model("resnet/resnet50_8xb32_in1k.py")


def timm_vit(num_classes: int = VIT["classes"]) -> nn.Module:
    """timm `VisionTransformer` (class token, token pooling) in the small `VIT` config."""
    import timm

    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        depth=VIT["layers"],
        embed_dim=VIT["width"],
        num_heads=VIT["heads"],
        mlp_ratio=VIT["mlp"] / VIT["width"],
        img_size=VIT["image"],
        num_classes=num_classes,
    )


def hf_vit(num_labels: int = VIT["classes"]) -> nn.Module:
    """transformers `ViTForImageClassification` in the small `VIT` config (layer_norm_eps 1e-6 like timm)."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        hidden_size=VIT["width"],
        num_hidden_layers=VIT["layers"],
        num_attention_heads=VIT["heads"],
        intermediate_size=VIT["mlp"],
        patch_size=VIT["patch"],
        image_size=VIT["image"],
        num_labels=num_labels,
        layer_norm_eps=1e-6,
    )
    return ViTForImageClassification(config)


def tv_vit(num_classes: int = VIT["classes"]) -> nn.Module:
    """torchvision `VisionTransformer` (the class behind vit_b_16) in the small `VIT` config."""
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        image_size=VIT["image"],
        patch_size=VIT["patch"],
        num_layers=VIT["layers"],
        num_heads=VIT["heads"],
        hidden_dim=VIT["width"],
        mlp_dim=VIT["mlp"],
        num_classes=num_classes,
    )


def hf_gpt2() -> nn.Module:
    """transformers `GPT2LMHeadModel` in the small `GPT_CONFIG` (Conv1D layers: weights stored (in, out))."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(**GPT_CONFIG, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


# --------------------------------------------------------------------------- a GPT-2 built on nn.Linear
class _Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(width, 3 * width)
        self.c_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, c))


class _MLP(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class _Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = _Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = _MLP(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """GPT-2 written with nn.Linear (the nanoGPT layout): every projection weight is (out, in), where
    transformers' Conv1D stores (in, out); the output head is tied to the token embedding."""

    def __init__(self, n_layer: int, n_embd: int, n_head: int, vocab_size: int, n_positions: int) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(vocab_size, n_embd),
                wpe=nn.Embedding(n_positions, n_embd),
                h=nn.ModuleList(_Block(n_embd, n_head) for _ in range(n_layer)),
                ln_f=nn.LayerNorm(n_embd),
            )
        )
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


def nano_gpt() -> nn.Module:
    """`NanoGPT` in the small `GPT_CONFIG`."""
    return NanoGPT(**GPT_CONFIG)


class _Wrapped(nn.Module):
    """TinyNet under one attribute (every key starts with `backbone.`)."""

    def __init__(self) -> None:
        super().__init__()
        from tests.helpers.models import tiny_net

        self.backbone = tiny_net()


def wrapped_tiny_net() -> nn.Module:
    """Factory used as `tests.suggest.models:wrapped_tiny_net`."""
    return _Wrapped()


def hf_clip_vision() -> nn.Module:
    """transformers `CLIPVisionModel` (registers k_proj, v_proj, q_proj in that order) in the small `VIT` config."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    return CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=VIT["width"],
            intermediate_size=VIT["mlp"],
            num_hidden_layers=VIT["layers"],
            num_attention_heads=VIT["heads"],
            image_size=VIT["image"],
            patch_size=VIT["patch"],
            layer_norm_eps=1e-5,
            hidden_act="gelu",
        )
    )


def timm_clip_vit() -> nn.Module:
    """timm's CLIP ViT (`norm_pre`, class-token pooling, no head) in the small `VIT` config."""
    import timm

    return timm.create_model(
        "vit_base_patch16_clip_224",
        pretrained=False,
        img_size=VIT["image"],
        depth=VIT["layers"],
        embed_dim=VIT["width"],
        num_heads=VIT["heads"],
        mlp_ratio=VIT["mlp"] / VIT["width"],
        num_classes=0,
        act_layer="gelu",
    )


def hf_dinov2() -> nn.Module:
    """transformers `Dinov2Model` (LayerScale `lambda1`, a `mask_token` timm does not have), 28x28 images."""
    from transformers import Dinov2Config, Dinov2Model

    return Dinov2Model(
        Dinov2Config(
            hidden_size=VIT["width"],
            num_hidden_layers=VIT["layers"],
            num_attention_heads=VIT["heads"],
            mlp_ratio=VIT["mlp"] // VIT["width"],
            image_size=28,
            patch_size=14,
            layer_norm_eps=1e-6,
        )
    )


def timm_dinov2() -> nn.Module:
    """timm's DINOv2 ViT (LayerScale `ls1.gamma`, patch 14) without a head, 28x28 images."""
    import timm

    return timm.create_model(
        "vit_small_patch14_dinov2",
        pretrained=False,
        img_size=28,
        depth=VIT["layers"],
        embed_dim=VIT["width"],
        num_heads=VIT["heads"],
        mlp_ratio=VIT["mlp"] / VIT["width"],
        num_classes=0,
    )
