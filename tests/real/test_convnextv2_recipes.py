"""The shipped ConvNeXt-V2 recipes, proven on the real target classes by strict loading and logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from .conftest import require_library
from .models import build, logits, reference_convert, seeded_input
from .official_convnextv2 import build_official, make_official_checkpoint, randomize_

SIZES = ["atto", "femto"]
TARGETS = {
    "timm": "convnextv2/official-to-timm",
    "hf": "convnextv2/official-to-hf",
    "mmpretrain": "convnextv2/official-to-mmpretrain",
}


@pytest.fixture(scope="module")
def official(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[torch.nn.Module, Path]]:
    """An official-format training checkpoint (model, optimizer, epoch, scaler, args) per size."""
    folder = tmp_path_factory.mktemp("official")
    out = {}
    for seed, size in enumerate(SIZES):
        model = randomize_(build_official(size), seed=seed + 1).eval()
        path = folder / f"convnextv2_{size}_train.pth"
        make_official_checkpoint(model, path, training=True, model_name=f"convnextv2_{size}")
        out[size] = (model, path)
    return out


def _convert(run_cli, src: Path, recipe: str, dst: Path, size: str, *extra: str):
    result = run_cli(
        "convert",
        src,
        "-r",
        recipe,
        "-o",
        dst,
        "--set",
        f"size={size}",
        "--allow-global",
        "argparse.Namespace",
        "--json",
        *extra,
    )
    assert result.code == 0, result.out + result.err
    return result.json


def _load(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("lib", list(TARGETS))
def test_official_recipe_loads_strictly_and_matches_logits(
    run_cli, official, tmp_path: Path, lib: str, size: str
) -> None:
    require_library(lib)
    source_model, src = official[size]
    dst = tmp_path / f"{lib}-{size}.safetensors"
    doc = _convert(run_cli, src, TARGETS[lib], dst, size, "--verify")
    assert doc["validation"]["ok"] and doc["validation"]["matched"] == len(source_model.state_dict())
    assert doc["verification"]["ok"] and doc["verification"]["max_abs_diff"] < 1e-4
    target = build(lib, size)
    target.load_state_dict(_load(dst), strict=True)
    x = seeded_input()
    with torch.no_grad():
        diff = (logits(target.eval(), x, lib) - source_model(x)).abs().max().item()
    assert diff < 1e-4


@pytest.mark.parametrize("size", SIZES)
def test_official_to_timm_equals_timms_own_filter(run_cli, official, tmp_path: Path, size: str) -> None:
    require_library("timm")
    _, src = official[size]
    dst = tmp_path / "timm.safetensors"
    _convert(run_cli, src, TARGETS["timm"], dst, size)
    ours = load_file(str(dst))
    ckpt = torch.load(src, weights_only=False)
    theirs = reference_convert(ckpt, "timm", build("timm", size))
    assert list(ours) == list(theirs)
    for key, value in theirs.items():
        assert ours[key].shape == value.shape and torch.equal(ours[key], value), key


def test_release_file_layout_converts_too(run_cli, official, tmp_path: Path) -> None:
    """The published release files hold only {'model': state_dict} and need no allowed global."""
    require_library("timm")
    model, _ = official["atto"]
    src = tmp_path / "convnextv2_atto_1k_224_ema.pt"
    make_official_checkpoint(model, src, training=False)
    result = run_cli("convert", src, "-r", TARGETS["timm"], "-o", tmp_path / "o.safetensors")
    assert result.code == 0, result.err


@pytest.mark.parametrize("size", SIZES)
def test_official_to_mmpretrain_loads_through_mmengine(run_cli, official, tmp_path: Path, size: str) -> None:
    """What MMPretrain users do: init_cfg=Pretrained with or without prefix='backbone.' (.pth, torch.load)."""
    require_library("mmpretrain")
    from mmengine.runner.checkpoint import _load_checkpoint_with_prefix, load_checkpoint

    source_model, src = official[size]
    dst = tmp_path / "mm.pth"
    _convert(run_cli, src, TARGETS["mmpretrain"], dst, size)
    classifier = build("mmpretrain", size)
    load_checkpoint(classifier, str(dst), map_location="cpu", strict=True)
    backbone_only = build("mmpretrain", size).backbone
    backbone_only.load_state_dict(_load_checkpoint_with_prefix("backbone.", str(dst), map_location="cpu"), strict=True)
    x = seeded_input()
    with torch.no_grad():
        assert (logits(classifier, x, "mmpretrain") - source_model(x)).abs().max().item() < 1e-4
        for ours, full in zip(backbone_only(x), classifier.backbone(x)):
            assert torch.equal(ours, full)


def test_verification_failure_writes_nothing(run_cli, official, tmp_path: Path, write_rules) -> None:
    """A shape-preserving mistake (transposed 7x7 kernels) passes validation but fails --verify: exit 1."""
    require_library("timm")
    _, src = official["atto"]
    broken = write_rules(
        "ckptx: 1\nname: broken\nextends: convnextv2/official-to-timm\n"
        "steps: [{permute: {match: 'conv_dw\\.weight$', dims: [0, 1, 3, 2]}}]\n"
    )
    dst = tmp_path / "broken.safetensors"
    result = run_cli("convert", src, "-r", broken, "-o", dst, "--allow-global", "argparse.Namespace", "--verify")
    assert result.code == 1
    assert result.out.startswith("source: ")  # the lines a success prints, then what rejected the output
    assert any(
        line.startswith("verification: FAILED: ckptx.factories:convnextv2_timm vs ckptx.reference.convnextv2:build")
        for line in result.out.splitlines()
    )
    assert result.out.endswith("nothing was written\n")
    assert not dst.exists() and not list(tmp_path.glob(".broken*"))


@pytest.mark.parametrize("size", ["atto", "tiny"])
def test_timm_hf_round_trip_is_bit_exact(run_cli, tmp_path: Path, size: str) -> None:
    require_library("timm")
    require_library("hf")
    timm_model = randomize_(build("timm", size), seed=7).eval()
    src = tmp_path / "timm.safetensors"
    save_file(timm_model.state_dict(), str(src))
    hf_file, back = tmp_path / "hf.safetensors", tmp_path / "back.safetensors"
    _convert(run_cli, src, "timm/convnextv2-to-hf", hf_file, size, "--verify")
    _convert(run_cli, hf_file, "hf/convnextv2-to-timm", back, size, "--verify")
    original, returned = timm_model.state_dict(), load_file(str(back))
    assert sorted(returned) == sorted(original)
    for key, value in original.items():
        assert torch.equal(returned[key], value), key
    hf_model = build("hf", size)
    hf_model.load_state_dict(load_file(str(hf_file)), strict=True)
    x = seeded_input()
    with torch.no_grad():
        assert (logits(hf_model.eval(), x, "hf") - timm_model(x)).abs().max().item() < 1e-4
