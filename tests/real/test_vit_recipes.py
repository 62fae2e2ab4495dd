"""The shipped ViT recipes (timm <-> HuggingFace) and the vision ops, proven on the real libraries."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckptx.conversion.in_memory import apply
from ckptx.rules.loader import load_rules

from .conftest import require_library
from .models import seeded_input

# A tiny ViT: 2 blocks, 32x32 images (a 2x2 grid of 16x16 patches), 10 classes.
TINY = ["--set", "layers=2", "--set", "image_size=32", "--set", "num_classes=10"]


def _randomized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.2)
    return model.eval()


def _timm_vit(img_size: int = 32, seed: int = 0, **kwargs) -> torch.nn.Module:
    import timm

    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, depth=2, img_size=img_size, num_classes=10, **kwargs
    )
    return _randomized(model, seed)


def _hf_vit(image_size: int = 32, seed: int = 0) -> torch.nn.Module:
    from ckptx.factories import transformers_model

    model = transformers_model(
        "ViTForImageClassification",
        hidden_size=192,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=768,
        patch_size=16,
        image_size=image_size,
        num_labels=10,
        layer_norm_eps=1e-6,
    )
    return _randomized(model, seed)


@pytest.fixture
def libs() -> None:
    require_library("timm")
    require_library("hf")


@pytest.fixture
def timm_file(tmp_path: Path, libs) -> tuple[torch.nn.Module, Path]:
    model = _timm_vit()
    path = tmp_path / "timm_vit.safetensors"
    save_file(model.state_dict(), str(path))
    return model, path


def _bit_exact(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return sorted(a) == sorted(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_timm_to_hf_loads_strictly_and_matches_logits(run_cli, timm_file, tmp_path: Path) -> None:
    source, src = timm_file
    dst = tmp_path / "hf.safetensors"
    result = run_cli("convert", src, "-r", "vit/timm-to-hf", "-o", dst, *TINY, "--verify", "--json")
    assert result.code == 0, result.out + result.err
    doc = result.json
    assert doc["validation"]["ok"] and doc["verification"]["ok"] and doc["verification"]["max_abs_diff"] < 1e-4
    target = _hf_vit(seed=99)
    target.load_state_dict(load_file(str(dst)), strict=True)
    x = seeded_input(shape=(2, 3, 32, 32))
    with torch.no_grad():
        assert (target(pixel_values=x).logits - source(x)).abs().max().item() < 1e-4


def test_hf_to_timm_round_trip_is_bit_exact_three_ways(run_cli, timm_file, tmp_path: Path) -> None:
    source, src = timm_file
    hf = tmp_path / "hf.safetensors"
    assert run_cli("convert", src, "-r", "vit/timm-to-hf", "-o", hf, *TINY).code == 0
    original = load_file(str(src))
    back = tmp_path / "back.safetensors"
    result = run_cli("convert", hf, "-r", "vit/hf-to-timm", "-o", back, *TINY, "--verify", "--json")
    assert result.code == 0 and result.json["verification"]["ok"], result.out + result.err
    assert _bit_exact(load_file(str(back)), original)
    reverse = tmp_path / "reverse.safetensors"
    result = run_cli("convert", hf, "-r", "vit/timm-to-hf", "--reverse", "-o", reverse, *TINY, "--json")
    assert result.code == 0, result.out + result.err
    assert _bit_exact(load_file(str(reverse)), original)
    inverted = tmp_path / "inverted.yaml"
    assert run_cli("invert", "vit/timm-to-hf", "-o", inverted, *TINY).code == 0
    mid = load_file(str(hf))
    assert _bit_exact(apply(load_rules(inverted), mid), apply(load_rules("vit/hf-to-timm"), mid))
    _timm_vit(seed=5).load_state_dict(load_file(str(reverse)), strict=True)


def test_hf_model_converts_to_timm_with_the_same_logits(run_cli, tmp_path: Path, libs) -> None:
    source = _hf_vit(seed=3)
    src = tmp_path / "hf.safetensors"
    save_file(source.state_dict(), str(src))
    dst = tmp_path / "timm.pth"
    result = run_cli("convert", src, "-r", "vit/hf-to-timm", "-o", dst, *TINY, "--verify", "--json")
    assert result.code == 0 and result.json["verification"]["max_abs_diff"] < 1e-4, result.out + result.err
    target = _timm_vit(seed=4)
    target.load_state_dict(torch.load(dst, weights_only=True), strict=True)
    x = seeded_input(shape=(2, 3, 32, 32))
    with torch.no_grad():
        assert (target(x) - source(pixel_values=x).logits).abs().max().item() < 1e-4


def test_resized_position_embedding_matches_timms_resample(run_cli, timm_file, tmp_path: Path) -> None:
    from timm.layers import resample_abs_pos_embed

    source, src = timm_file
    dst = tmp_path / "hf64.safetensors"
    result = run_cli(
        "convert",
        src,
        "-r",
        "vit/timm-to-hf",
        "-o",
        dst,
        "--set",
        "layers=2",
        "--set",
        "num_classes=10",
        "--set",
        "image_size=64",
        "--set",
        "resize_pos_embed=true",
        "--json",
    )
    assert result.code == 0, result.out + result.err
    converted = load_file(str(dst))
    expected = resample_abs_pos_embed(source.pos_embed.detach(), new_size=[4, 4], num_prefix_tokens=1, antialias=False)
    assert torch.equal(converted["vit.embeddings.position_embeddings"], expected)
    # timm's own model at 64x64 with timm's resampled weights computes what the converted HF model computes
    timm64 = _timm_vit(img_size=64, seed=7)
    timm64.load_state_dict({**source.state_dict(), "pos_embed": expected}, strict=True)
    hf64 = _hf_vit(image_size=64, seed=8)
    hf64.load_state_dict(converted, strict=True)
    x = seeded_input(shape=(2, 3, 64, 64))
    with torch.no_grad():
        assert (hf64(pixel_values=x).logits - timm64(x)).abs().max().item() < 1e-4


@pytest.mark.parametrize("channels", [1, 4])
def test_adapt_in_channels_equals_timms_adapt_input_conv(timm_file, tmp_path: Path, channels: int) -> None:
    from timm.models._manipulate import adapt_input_conv

    source, _ = timm_file
    rules = tmp_path / "adapt.yaml"
    rules.write_text(
        "ckptx: 1\nsteps:\n  - adapt_in_channels: {match: '^patch_embed\\.proj\\.weight$', channels: target}\n",
        encoding="utf-8",
    )
    target = _timm_vit(seed=11, in_chans=channels)
    out = apply(load_rules(rules), source.state_dict(), target)
    expected = adapt_input_conv(channels, source.state_dict()["patch_embed.proj.weight"])
    assert torch.equal(out["patch_embed.proj.weight"], expected)
    target.load_state_dict(out, strict=True)
