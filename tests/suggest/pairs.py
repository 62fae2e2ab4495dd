"""Real cross-library model pairs for `ckptx suggest`: each a source model (random weights, real class), the file it is
saved as, a target factory (`tests.suggest.pairs:...`), an input, and how to read each side's output.

Many mirror the hand-written conversion scripts transformers ships (convert_*_to_hf / convert_*_original_*):
ResNet, ViT, BEiT, Swin, PVT-v2, ConvNeXt, CLIP (OpenCLIP), SAM, Whisper, wav2vec 2.0, Llama (Meta's reference
layout, rotary q/k interleaved); others move weights between timm, torchvision and MMPretrain. Small configs,
nothing downloaded. `benchmarks/suggest_pairs.py` runs them all and reports the hit rate; tests/suggest uses them.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ.setdefault(_var, "1")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from . import models  # noqa: E402

HERE = "tests.suggest.pairs"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def image(size: int = 32, batch: int = 2) -> torch.Tensor:
    """A seeded image batch."""
    return torch.randn((batch, 3, size, size), generator=_gen(1))


def tokens(vocab: int, length: int = 8) -> torch.Tensor:
    """Seeded token ids."""
    return torch.randint(0, vocab, (2, length), generator=_gen(2))


@dataclass(frozen=True)
class Pair:
    """One source -> target case."""

    name: str
    source: Callable[[], nn.Module]  # the source model (random weights are put in by the harness)
    target: str  # module:callable, built with `target_kwargs`
    inputs: Callable[[], Any]
    source_out: Callable[[nn.Module, Any], torch.Tensor]
    target_out: Callable[[nn.Module, Any], torch.Tensor]
    fmt: str = "pth"  # or "safetensors" (keys sorted by name)
    target_kwargs: Mapping[str, Any] = field(default_factory=dict)
    state: Callable[[nn.Module], dict[str, torch.Tensor]] | None = None  # the file's tensors (default: state_dict)
    allow_missing: tuple[str, ...] = ()
    library: tuple[str, ...] = ()  # import names the pair needs
    verify_with: str | None = None  # module:callable building the source model (for --verify-with)
    classes: tuple[str, ...] = ()  # the failure classes it covers

    def build_target(self) -> nn.Module:
        from ckptx.trust.usercode import import_callable

        return import_callable(self.target, "pair")(**dict(self.target_kwargs))


def logits(model: nn.Module, x: Any) -> torch.Tensor:
    """`model(x)`'s logits, tensor or first item."""
    return models.run(model, x)


def hidden(model: nn.Module, x: Any) -> torch.Tensor:
    """`last_hidden_state` of a transformers model called on pixel values or token ids."""
    out = model(x)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


# ----------------------------------------------------------------------------------------------------- ResNet
def hf_resnet18(num_labels: int = 1000) -> nn.Module:
    """transformers ResNetForImageClassification with basic blocks (resnet18's layout)."""
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(
        depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512], layer_type="basic", num_labels=num_labels
    )
    return ResNetForImageClassification(config)


def tv_resnet18() -> nn.Module:
    import torchvision

    return torchvision.models.resnet18()


def timm_model(name: str, **kwargs: Any) -> nn.Module:
    """`timm.create_model(name, pretrained=False, **kwargs)`."""
    import timm

    return timm.create_model(name, pretrained=False, **kwargs)


def tv_model(name: str, **kwargs: Any) -> nn.Module:
    import torchvision

    return getattr(torchvision.models, name)(**kwargs)


def hf_regnet() -> nn.Module:
    """transformers RegNetForImageClassification (Y, SE) shaped like timm's regnety_002 with bottleneck ratio 1."""
    from transformers import RegNetConfig, RegNetForImageClassification

    return RegNetForImageClassification(
        RegNetConfig(
            embedding_size=32,
            hidden_sizes=[24, 56, 152, 368],
            depths=[1, 1, 4, 7],
            groups_width=8,
            layer_type="y",
            num_labels=10,
        )
    )


def timm_regnety_002() -> nn.Module:
    return timm_model("regnety_002", num_classes=10)


# ----------------------------------------------------------------------------------------------------- ViT family
BEIT = dict(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=5)


def timm_beit() -> nn.Module:
    """timm Beit: fused qkv weight, separate `q_bias` and `v_bias` (k has none), relative position tables."""
    return timm_model("beit_base_patch16_224", **BEIT)


def hf_beit() -> nn.Module:
    from transformers import BeitConfig, BeitForImageClassification

    config = BeitConfig(
        image_size=32,
        patch_size=16,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        use_relative_position_bias=True,
        use_mean_pooling=True,
        layer_scale_init_value=0.1,
        num_labels=5,
        layer_norm_eps=1e-6,
    )
    return BeitForImageClassification(config)


SWIN = dict(img_size=32, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4, num_classes=5)


def timm_swin() -> nn.Module:
    return timm_model("swin_tiny_patch4_window7_224", **SWIN)


def hf_swin() -> nn.Module:
    from transformers import SwinConfig, SwinForImageClassification

    config = SwinConfig(
        image_size=32,
        patch_size=4,
        embed_dim=16,
        depths=[2, 2],
        num_heads=[1, 2],
        window_size=4,
        num_labels=5,
        layer_norm_eps=1e-5,
    )
    return SwinForImageClassification(config)


PVT = dict(embed_dims=(16, 32, 40, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 5, 8), num_classes=5)


def timm_pvt() -> nn.Module:
    return timm_model("pvt_v2_b0", **PVT)


def hf_pvt() -> nn.Module:
    from transformers import PvtV2Config, PvtV2ForImageClassification

    config = PvtV2Config(
        image_size=64,
        hidden_sizes=[16, 32, 40, 64],
        depths=[1, 1, 1, 1],
        num_attention_heads=[1, 2, 5, 8],
        sr_ratios=[8, 4, 2, 1],
        mlp_ratios=[8, 8, 4, 4],
        num_labels=5,
        layer_norm_eps=1e-6,
    )
    return PvtV2ForImageClassification(config)


def mm_vit() -> nn.Module:
    """MMPretrain VisionTransformer backbone (`layers.N.ln1`, `ffn.layers.0.0`), the small `VIT` config."""
    from mmpretrain.models.backbones import VisionTransformer

    v = models.VIT
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return VisionTransformer(
            arch={
                "embed_dims": v["width"],
                "num_layers": v["layers"],
                "num_heads": v["heads"],
                "feedforward_channels": v["mlp"],
            },
            img_size=v["image"],
            patch_size=v["patch"],
            out_type="cls_token",
            final_norm=True,
        )


def timm_vit_headless() -> nn.Module:
    return models.timm_vit(num_classes=0)


def mm_vit_out(model: nn.Module, x: Any) -> torch.Tensor:
    return model(x)[-1]


def timm_convnext() -> nn.Module:
    return timm_model("convnext_atto", num_classes=5)


def hf_convnext() -> nn.Module:
    from transformers import ConvNextConfig, ConvNextForImageClassification

    return ConvNextForImageClassification(
        ConvNextConfig(hidden_sizes=[40, 80, 160, 320], depths=[2, 2, 6, 2], num_labels=5, layer_scale_init_value=0.1)
    )


def tv_convnext() -> nn.Module:
    """torchvision convnext_tiny shape-reduced: its CNBlockConfig list."""
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    settings = [
        CNBlockConfig(16, 32, 1),
        CNBlockConfig(32, 48, 1),
        CNBlockConfig(48, 64, 1),
        CNBlockConfig(64, None, 1),
    ]
    return ConvNeXt(settings, num_classes=5)


def timm_convnext_small() -> nn.Module:
    from timm.models.convnext import ConvNeXt

    return ConvNeXt(depths=(1, 1, 1, 1), dims=(16, 32, 48, 64), num_classes=5, ls_init_value=1e-6)


def tv_swin() -> nn.Module:
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[1, 2], window_size=[4, 4], num_classes=5
    )


# ----------------------------------------------------------------------------------------------------- CLIP
CLIP_WIDTH = 64


def open_clip_model() -> nn.Module:
    """OpenCLIP `CLIP` (the OpenAI layout): `visual.proj` and `text_projection` are bare (in, out) parameters used as
    `x @ proj`; here square (width = embed_dim), so shapes cannot tell a transpose."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    return CLIP(
        embed_dim=CLIP_WIDTH,
        vision_cfg=CLIPVisionCfg(layers=2, width=CLIP_WIDTH, patch_size=16, image_size=32, head_width=32),
        text_cfg=CLIPTextCfg(context_length=16, vocab_size=100, width=CLIP_WIDTH, heads=2, layers=2),
    )


def hf_clip() -> nn.Module:
    from transformers import CLIPConfig, CLIPModel

    text = dict(
        vocab_size=100,
        hidden_size=CLIP_WIDTH,
        intermediate_size=4 * CLIP_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        eos_token_id=99,
        bos_token_id=98,
        pad_token_id=0,
    )
    vision = dict(
        hidden_size=CLIP_WIDTH,
        intermediate_size=4 * CLIP_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=16,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
    )
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=CLIP_WIDTH))


def clip_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    text = torch.randint(1, 90, (2, 16), generator=_gen(3))
    text[:, -1] = 99  # the end-of-text token, the highest id: both take the features there
    return image(32), text


def open_clip_out(model: nn.Module, x: Any) -> torch.Tensor:
    img, text = x
    return torch.cat([model.encode_image(img), model.encode_text(text)], dim=1)


def hf_clip_out(model: nn.Module, x: Any) -> torch.Tensor:
    img, text = x
    a = model.get_image_features(pixel_values=img)
    b = model.get_text_features(input_ids=text)
    a = a.pooler_output if hasattr(a, "pooler_output") else a
    b = b.pooler_output if hasattr(b, "pooler_output") else b
    return torch.cat([a, b], dim=1)


# ----------------------------------------------------------------------------------------------------- Whisper
WHISPER = dict(mels=16, ctx=8, width=32, heads=2, layers=2, vocab=64)


def whisper_model() -> nn.Module:
    from whisper.model import ModelDimensions, Whisper

    w = WHISPER
    dims = ModelDimensions(
        n_mels=w["mels"],
        n_audio_ctx=w["ctx"],
        n_audio_state=w["width"],
        n_audio_head=w["heads"],
        n_audio_layer=w["layers"],
        n_vocab=w["vocab"],
        n_text_ctx=w["ctx"],
        n_text_state=w["width"],
        n_text_head=w["heads"],
        n_text_layer=w["layers"],
    )
    return Whisper(dims)


def hf_whisper() -> nn.Module:
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    w = WHISPER
    config = WhisperConfig(
        vocab_size=w["vocab"],
        num_mel_bins=w["mels"],
        d_model=w["width"],
        encoder_layers=w["layers"],
        decoder_layers=w["layers"],
        encoder_attention_heads=w["heads"],
        decoder_attention_heads=w["heads"],
        encoder_ffn_dim=4 * w["width"],
        decoder_ffn_dim=4 * w["width"],
        max_source_positions=w["ctx"],
        max_target_positions=w["ctx"],
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        activation_function="gelu",
        tie_word_embeddings=True,
    )
    return WhisperForConditionalGeneration(config)


def whisper_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    mel = torch.randn((2, WHISPER["mels"], 2 * WHISPER["ctx"]), generator=_gen(4))
    return mel, tokens(WHISPER["vocab"], 6)


def whisper_out(model: nn.Module, x: Any) -> torch.Tensor:
    mel, text = x
    return model(mel, text)


def hf_whisper_out(model: nn.Module, x: Any) -> torch.Tensor:
    mel, text = x
    return model(input_features=mel, decoder_input_ids=text).logits


# ----------------------------------------------------------------------------------------------------- wav2vec 2.0
W2V = dict(width=32, layers=2, heads=2, ffn=64, convs=[(16, 10, 5), (16, 3, 2), (16, 2, 2)])


def torchaudio_wav2vec2() -> nn.Module:
    from torchaudio.models import wav2vec2_model

    w = W2V
    return wav2vec2_model(
        extractor_mode="group_norm",
        extractor_conv_layer_config=w["convs"],
        extractor_conv_bias=False,
        encoder_embed_dim=w["width"],
        encoder_projection_dropout=0.0,
        encoder_pos_conv_kernel=16,
        encoder_pos_conv_groups=4,
        encoder_num_layers=w["layers"],
        encoder_num_heads=w["heads"],
        encoder_attention_dropout=0.0,
        encoder_ff_interm_features=w["ffn"],
        encoder_ff_interm_dropout=0.0,
        encoder_dropout=0.0,
        encoder_layer_norm_first=False,
        encoder_layer_drop=0.0,
        aux_num_out=None,
    )


def hf_wav2vec2() -> nn.Module:
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    w = W2V
    config = Wav2Vec2Config(
        hidden_size=w["width"],
        num_hidden_layers=w["layers"],
        num_attention_heads=w["heads"],
        intermediate_size=w["ffn"],
        conv_dim=[c[0] for c in w["convs"]],
        conv_kernel=[c[1] for c in w["convs"]],
        conv_stride=[c[2] for c in w["convs"]],
        conv_bias=False,
        feat_extract_norm="group",
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        do_stable_layer_norm=False,
        mask_time_prob=0.0,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
    )
    return Wav2Vec2Model(config)


def audio() -> torch.Tensor:
    return torch.randn((2, 400), generator=_gen(5))


def torchaudio_out(model: nn.Module, x: Any) -> torch.Tensor:
    return model(x)[0]


def w2v_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """torchaudio's state dict with the weight-norm parametrization as `weight_g`/`weight_v` either way."""
    return dict(model.state_dict())


# ----------------------------------------------------------------------------------------------------- SAM
def sam_model() -> nn.Module:
    """segment-anything `Sam` (image encoder, prompt encoder, mask decoder with 3-layer MLP heads), small."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    dim = 32
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=64,
            patch_size=16,
            embed_dim=32,
            depth=2,
            num_heads=2,
            out_chans=dim,
            use_rel_pos=True,
            window_size=2,
            global_attn_indexes=(1,),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim, image_embedding_size=(4, 4), input_image_size=(64, 64), mask_in_chans=16
        ),
        mask_decoder=MaskDecoder(
            transformer_dim=dim,
            transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=64, num_heads=2),
            iou_head_depth=3,
            iou_head_hidden_dim=dim,
        ),
    )


def hf_sam() -> nn.Module:
    from transformers import SamConfig, SamMaskDecoderConfig, SamModel, SamPromptEncoderConfig, SamVisionConfig

    dim = 32
    config = SamConfig(
        vision_config=SamVisionConfig(
            hidden_size=32,
            output_channels=dim,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=64,
            patch_size=16,
            window_size=2,
            global_attn_indexes=[1],
            num_pos_feats=dim // 2,
            mlp_dim=128,
        ),
        prompt_encoder_config=SamPromptEncoderConfig(
            hidden_size=dim, image_size=64, patch_size=16, mask_input_channels=16
        ),
        mask_decoder_config=SamMaskDecoderConfig(
            hidden_size=dim, mlp_dim=64, num_hidden_layers=2, num_attention_heads=2, iou_head_hidden_dim=dim
        ),
    )
    return SamModel(config)


def sam_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    points = torch.rand((1, 1, 2), generator=_gen(6)) * 64
    return image(64, batch=1), points


def sam_out(model: nn.Module, x: Any) -> torch.Tensor:
    img, points = x
    emb = model.image_encoder(img)
    sparse, dense = model.prompt_encoder(points=(points, torch.ones((1, 1))), boxes=None, masks=None)
    masks, iou = model.mask_decoder(
        image_embeddings=emb,
        image_pe=model.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=True,
    )
    return torch.cat([masks.flatten(), iou.flatten()])


def hf_sam_out(model: nn.Module, x: Any) -> torch.Tensor:
    img, points = x
    out = model(pixel_values=img, input_points=points[:, None], input_labels=torch.ones((1, 1, 1), dtype=torch.long))
    return torch.cat([out.pred_masks.flatten(), out.iou_scores.flatten()])


# ----------------------------------------------------------------------------------------------------- Llama
LLAMA = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    max_position_embeddings=64,
    tie_word_embeddings=False,
    pad_token_id=None,
)


def hf_llama() -> nn.Module:
    from ckptx.factories import transformers_model

    return transformers_model("LlamaForCausalLM", **LLAMA)


def meta_llama() -> nn.Module:
    """Meta's reference Llama layout (tests/suggest/meta_llama.py): `layers.N.attention.wq`, interleaved rotary."""
    from .meta_llama import Transformer

    return Transformer(
        dim=LLAMA["hidden_size"],
        n_layers=LLAMA["num_hidden_layers"],
        n_heads=LLAMA["num_attention_heads"],
        n_kv_heads=LLAMA["num_key_value_heads"],
        vocab_size=LLAMA["vocab_size"],
        hidden_dim=LLAMA["intermediate_size"],
        norm_eps=LLAMA["rms_norm_eps"],
        max_seq_len=LLAMA["max_position_embeddings"],
    )


def llama_tokens() -> torch.Tensor:
    return tokens(LLAMA["vocab_size"], 12)


# ----------------------------------------------------------------------------------------------------- the pairs
def _tv(name: str, **kw: Any) -> Callable[[], nn.Module]:
    return lambda: tv_model(name, **kw)


def _timm(name: str, **kw: Any) -> Callable[[], nn.Module]:
    return lambda: timm_model(name, **kw)


PAIRS: tuple[Pair, ...] = (
    Pair(
        "torchvision resnet18 -> transformers ResNet (basic)",
        tv_resnet18,
        f"{HERE}:hf_resnet18",
        lambda: image(64),
        logits,
        logits,
        library=("torchvision", "transformers"),
        verify_with=f"{HERE}:tv_resnet18",
    ),
    Pair(
        "timm resnet18 -> transformers ResNet (basic), safetensors",
        _timm("resnet18"),
        f"{HERE}:hf_resnet18",
        lambda: image(64),
        logits,
        logits,
        fmt="safetensors",
        library=("timm", "transformers"),
    ),
    Pair(
        "torchvision resnet50 -> timm resnet50",
        _tv("resnet50"),
        f"{HERE}:timm_model",
        lambda: image(64),
        logits,
        logits,
        target_kwargs={"name": "resnet50"},
        library=("torchvision", "timm"),
    ),
    Pair(
        "torchvision resnet50 -> transformers ResNet (bottleneck), safetensors",
        _tv("resnet50"),
        "tests.suggest.models:hf_resnet50",
        lambda: image(64),
        logits,
        logits,
        fmt="safetensors",
        library=("torchvision", "transformers"),
        classes=("shortcut vs first conv",),
    ),
    Pair(
        "timm regnety_002 -> transformers RegNet",
        timm_regnety_002,
        f"{HERE}:hf_regnet",
        lambda: image(64),
        logits,
        logits,
        library=("timm", "transformers"),
        classes=("shortcut vs first conv",),
    ),
    Pair(
        "timm regnety_002 -> transformers RegNet, safetensors",
        timm_regnety_002,
        f"{HERE}:hf_regnet",
        lambda: image(64),
        logits,
        logits,
        fmt="safetensors",
        library=("timm", "transformers"),
        classes=("shortcut vs first conv",),
    ),
    Pair(
        "MMPretrain resnet50 -> torchvision resnet50",
        models.mm_resnet50,
        f"{HERE}:tv_model",
        lambda: image(64),
        logits,
        logits,
        target_kwargs={"name": "resnet50"},
        library=("mmpretrain", "torchvision"),
    ),
    Pair(
        "timm ViT -> transformers ViT, safetensors",
        models.timm_vit,
        "tests.suggest.models:hf_vit",
        lambda: image(32),
        logits,
        logits,
        fmt="safetensors",
        library=("timm", "transformers"),
    ),
    Pair(
        "transformers ViT -> timm ViT",
        models.hf_vit,
        "tests.suggest.models:timm_vit",
        lambda: image(32),
        logits,
        logits,
        library=("timm", "transformers"),
    ),
    Pair(
        "torchvision ViT -> timm ViT",
        models.tv_vit,
        "tests.suggest.models:timm_vit",
        lambda: image(32),
        logits,
        logits,
        library=("timm", "torchvision"),
    ),
    Pair(
        "MMPretrain ViT -> timm ViT",
        mm_vit,
        f"{HERE}:timm_vit_headless",
        lambda: image(32),
        mm_vit_out,
        logits,
        library=("timm", "mmpretrain"),
    ),
    Pair(
        "timm BEiT -> transformers BEiT",
        timm_beit,
        f"{HERE}:hf_beit",
        lambda: image(32),
        logits,
        logits,
        library=("timm", "transformers"),
        classes=("q_bias/v_bias",),
    ),
    Pair(
        "timm BEiT -> transformers BEiT, safetensors",
        timm_beit,
        f"{HERE}:hf_beit",
        lambda: image(32),
        logits,
        logits,
        fmt="safetensors",
        library=("timm", "transformers"),
        classes=("q_bias/v_bias",),
    ),
    Pair(
        "timm Swin -> transformers Swin, safetensors",
        timm_swin,
        f"{HERE}:hf_swin",
        lambda: image(32),
        logits,
        logits,
        fmt="safetensors",
        library=("timm", "transformers"),
    ),
    Pair(
        "torchvision Swin -> timm Swin",
        tv_swin,
        f"{HERE}:timm_swin",
        lambda: image(32),
        logits,
        logits,
        library=("timm", "torchvision"),
    ),
    Pair(
        "timm PVT-v2 -> transformers PVT-v2, safetensors",
        timm_pvt,
        f"{HERE}:hf_pvt",
        lambda: image(64),
        logits,
        logits,
        fmt="safetensors",
        library=("timm", "transformers"),
        classes=("patch-embed norm vs stage-end norm",),
    ),
    Pair(
        "timm ConvNeXt -> transformers ConvNeXt, safetensors",
        timm_convnext,
        f"{HERE}:hf_convnext",
        lambda: image(64),
        logits,
        logits,
        fmt="safetensors",
        library=("timm", "transformers"),
    ),
    Pair(
        "torchvision ConvNeXt -> timm ConvNeXt",
        tv_convnext,
        f"{HERE}:timm_convnext_small",
        lambda: image(64),
        logits,
        logits,
        library=("timm", "torchvision"),
    ),
    Pair(
        "torchvision EfficientNet-B0 -> timm",
        _tv("efficientnet_b0"),
        f"{HERE}:timm_model",
        lambda: image(64),
        logits,
        logits,
        target_kwargs={"name": "efficientnet_b0"},
        library=("timm", "torchvision"),
    ),
    Pair(
        "torchvision MobileNetV3 -> timm",
        _tv("mobilenet_v3_large"),
        f"{HERE}:timm_model",
        lambda: image(64),
        logits,
        logits,
        target_kwargs={"name": "mobilenetv3_large_100", "bn_eps": 0.001},
        library=("timm", "torchvision"),
    ),
    Pair(
        "OpenCLIP -> transformers CLIP",
        open_clip_model,
        f"{HERE}:hf_clip",
        clip_inputs,
        open_clip_out,
        hf_clip_out,
        library=("open_clip", "transformers"),
        verify_with=f"{HERE}:open_clip_model",
        classes=("bare [in, out] projection",),
    ),
    Pair(
        "OpenAI Whisper -> transformers Whisper",
        whisper_model,
        f"{HERE}:hf_whisper",
        whisper_inputs,
        whisper_out,
        hf_whisper_out,
        library=("whisper", "transformers"),
    ),
    Pair(
        "torchaudio wav2vec2 -> transformers Wav2Vec2",
        torchaudio_wav2vec2,
        f"{HERE}:hf_wav2vec2",
        audio,
        torchaudio_out,
        hidden,
        library=("torchaudio", "transformers"),
    ),
    Pair(
        "segment-anything SAM -> transformers SAM",
        sam_model,
        f"{HERE}:hf_sam",
        sam_inputs,
        sam_out,
        hf_sam_out,
        library=("segment_anything", "transformers"),
        classes=("multi-layer heads order",),
    ),
    Pair(
        "Meta Llama reference -> transformers Llama",
        meta_llama,
        f"{HERE}:hf_llama",
        llama_tokens,
        logits,
        logits,
        library=("transformers",),
        verify_with=f"{HERE}:meta_llama",
        classes=("rotary q/k permutation",),
    ),
    Pair(
        "transformers Llama -> Phi3 (fused), safetensors",
        hf_llama,
        "ckptx.factories:transformers_model",
        llama_tokens,
        logits,
        logits,
        fmt="safetensors",
        target_kwargs={"architecture": "Phi3ForCausalLM", **LLAMA},
        library=("transformers",),
    ),
    Pair(
        "transformers GPT-2 -> nanoGPT (Linear)",
        models.hf_gpt2,
        "tests.suggest.models:nano_gpt",
        lambda: tokens(models.GPT_CONFIG["vocab_size"]),
        logits,
        logits,
        library=("transformers",),
    ),
    Pair(
        "timm DINOv2 -> transformers DINOv2",
        models.timm_dinov2,
        "tests.suggest.models:hf_dinov2",
        lambda: image(28),
        logits,
        lambda m, x: m(pixel_values=x).pooler_output,
        allow_missing=(r"\.mask_token$",),
        library=("timm", "transformers"),
    ),
)


# ----------------------------------------------------------------------------------------------------- running a pair
ATOL = 1e-4


def save_source(pair: Any, folder: Path) -> tuple[Path, Any]:
    """The pair's source model, randomized, saved as its file; (path, model)."""
    from safetensors.torch import save_file

    model = pair.source()
    models.randomize(model, seed=sum(map(ord, pair.name)) % 1000)
    model.eval()
    state = pair.state(model) if pair.state is not None else dict(model.state_dict())
    if pair.fmt == "safetensors":
        path = folder / "source.safetensors"
        save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, str(path))
    else:
        path = folder / "source.pth"
        torch.save(state, path)
    return path, model


def outputs_agree(pair: Any, model: Any, converted: dict[str, Any]) -> tuple[bool, str]:
    """(True, '') when the target loads `converted` strictly (allowed missing keys aside) and matches the source."""

    target = pair.build_target()
    missing, unexpected = target.load_state_dict(converted, strict=False)
    missing = [k for k in missing if not any(re.search(p, k) for p in pair.allow_missing)]
    if missing or unexpected:
        return False, f"does not load strictly: missing {missing[:3]}, unexpected {unexpected[:3]}"
    target.eval()
    x = pair.inputs()
    with torch.no_grad():
        a = pair.source_out(model, x).double()
        b = pair.target_out(target, x).double()
    if a.shape != b.shape:
        return False, f"output shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"
    diff = (a - b).abs().max().item()
    scale = max(1.0, a.abs().max().item())
    return diff <= ATOL * scale, f"max abs diff {diff:.3g}"


def evaluate(pair: Any, verify: bool = False) -> dict[str, Any]:
    from safetensors.torch import load_file

    import ckptx

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        src, model = save_source(pair, Path(tmp))
        options: dict[str, Any] = {"target_args": dict(pair.target_kwargs), "allow_missing": list(pair.allow_missing)}
        if verify and pair.verify_with:
            options["verify_with"] = pair.verify_with
        try:
            suggestion = ckptx.suggest(src, pair.target, **options)
        except Exception as exc:  # noqa: BLE001 - reported per pair
            return {"pair": pair.name, "outcome": "error", "detail": f"suggest: {type(exc).__name__}: {exc}"[:300]}
        report = suggestion.report
        undecided = list(getattr(report, "undecided", ()))
        try:
            if src.suffix == ".pth":
                state = torch.load(src, weights_only=True)
            else:
                state = load_file(str(src))
            converted = ckptx.apply(suggestion.recipe, state, pair.build_target())
            good, detail = outputs_agree(pair, model, converted)
        except Exception as exc:  # noqa: BLE001
            good, detail = False, f"convert: {type(exc).__name__}: {str(exc)[:200]}"
            if os.environ.get("PAIRS_TRACE"):
                traceback.print_exc()
    if report.ok:
        outcome = "right" if good else "WRONG-SILENT"
    else:
        outcome = "flagged-right" if good else "flagged"
    return {
        "pair": pair.name,
        "outcome": outcome,
        "detail": detail,
        "undecided": undecided[:5],
        "missing": list(report.missing)[:5],
        "notes": list(report.notes)[:3],
        "seconds": round(time.perf_counter() - started, 2),
    }
