"""`ckptx convert ... -o DIR/` with a transformers target: a folder that `from_pretrained` opens as it is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.real.models import seeded_input
from tests.real.official_convnextv2 import build_official, make_official_checkpoint, randomize_

from .conftest import require_library

TINY_VIT = ["--set", "layers=2", "--set", "image_size=32", "--set", "num_classes=10"]


@pytest.fixture(autouse=True)
def _hf() -> None:
    require_library("hf")


@pytest.fixture(scope="module")
def official_atto(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    model = randomize_(build_official("atto"), seed=4).eval()
    path = tmp_path_factory.mktemp("official") / "convnextv2_atto_1k_224_ema.pt"
    make_official_checkpoint(model, path, training=False)
    return model, path


def _open(folder: Path) -> torch.nn.Module:
    """`AutoModelForImageClassification.from_pretrained(folder)`; every key must load."""
    from transformers import AutoModelForImageClassification

    model, info = AutoModelForImageClassification.from_pretrained(str(folder), output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and info["mismatched_keys"] == set(), info
    return model.eval()


def _convert(run_cli, *argv: object) -> dict:
    result = run_cli("convert", *argv, "--json")
    assert result.code == 0, result.out + result.err
    return result.json


def test_convnextv2_folder_opens_with_from_pretrained_and_gives_the_official_logits(
    run_cli, official_atto, tmp_path: Path
) -> None:
    official, src = official_atto
    folder = tmp_path / "convnextv2-atto"
    _convert(run_cli, src, "-r", "convnextv2/official-to-hf", "-o", f"{folder}/")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    model = _open(folder)
    assert type(model).__name__ == "ConvNextV2ForImageClassification"
    x = seeded_input()
    with torch.no_grad():
        assert (model(pixel_values=x).logits - official(x)).abs().max().item() < 1e-4


def test_vit_folder_from_timm_opens_with_from_pretrained_and_gives_timms_logits(run_cli, tmp_path: Path) -> None:
    require_library("timm")
    import timm

    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=32, num_classes=10)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for tensor in source.state_dict().values():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.2)
    src = tmp_path / "timm_vit.safetensors"
    save_file(source.eval().state_dict(), str(src))
    folder = tmp_path / "vit"
    folder.mkdir()  # an existing (empty) folder needs no trailing slash
    _convert(run_cli, src, "-r", "vit/timm-to-hf", "-o", folder, *TINY_VIT)
    model = _open(folder)
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["ViTForImageClassification"]
    x = seeded_input(shape=(2, 3, 32, 32))
    with torch.no_grad():
        assert (model(pixel_values=x).logits - source(x)).abs().max().item() < 1e-4


def test_max_shard_size_writes_shards_and_an_index_that_from_pretrained_opens(
    run_cli, official_atto, tmp_path: Path
) -> None:
    official, src = official_atto
    folder = tmp_path / "sharded"
    doc = _convert(run_cli, src, "-r", "convnextv2/official-to-hf", "-o", f"{folder}/", "--max-shard-size", "5MB")
    names = sorted(p.name for p in folder.iterdir())
    shards = [n for n in names if n.startswith("model-")]
    assert len(shards) >= 3 and "model.safetensors.index.json" in names and "model.safetensors" not in names
    assert doc["destination"] == str(folder)
    x = seeded_input()
    with torch.no_grad():
        assert (_open(folder)(pixel_values=x).logits - official(x)).abs().max().item() < 1e-4


def test_folder_output_needs_a_transformers_target(run_cli, official_atto, tmp_path: Path) -> None:
    require_library("timm")
    _, src = official_atto
    folder = tmp_path / "timm-folder"
    result = run_cli("convert", src, "-r", "convnextv2/official-to-timm", "-o", f"{folder}/")
    assert result.code == 2
    assert "is not a transformers model; write a .safetensors or .pth file" in result.err
    assert not folder.exists()


def test_a_failed_verification_leaves_no_file_of_the_set(run_cli, official_atto, tmp_path: Path, write_rules) -> None:
    _, src = official_atto
    broken = write_rules(
        "ckptx: 1\nname: broken\nextends: convnextv2/official-to-hf\n"
        "steps: [{permute: {match: 'dwconv\\.weight$', dims: [0, 1, 3, 2]}}]\n"
    )
    folder = tmp_path / "broken"
    result = run_cli("convert", src, "-r", broken, "-o", f"{folder}/", "--verify")
    assert result.code == 1 and any(line.startswith("verification: FAILED") for line in result.out.splitlines())
    assert not folder.exists()


def test_replacing_a_folder_needs_force_and_removes_the_old_single_file(run_cli, official_atto, tmp_path: Path) -> None:
    _, src = official_atto
    folder = tmp_path / "model"
    _convert(run_cli, src, "-r", "convnextv2/official-to-hf", "-o", f"{folder}/")
    again = run_cli("convert", src, "-r", "convnextv2/official-to-hf", "-o", folder, "--max-shard-size", "5MB")
    assert again.code == 2 and "already exists; pass --force" in again.err
    _convert(run_cli, src, "-r", "convnextv2/official-to-hf", "-o", folder, "--max-shard-size", "5MB", "--force")
    assert not (folder / "model.safetensors").exists()  # it would shadow the new index in from_pretrained
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]
    _open(folder)


def test_a_folder_written_by_two_workers_is_byte_identical(run_cli, official_atto, tmp_path: Path) -> None:
    import hashlib

    _, src = official_atto
    folders = [tmp_path / "one", tmp_path / "two"]
    _convert(run_cli, src, "-r", "convnextv2/official-to-hf", "-o", f"{folders[0]}/", "--max-shard-size", "5MB")
    doc = _convert(
        run_cli,
        src,
        "-r",
        "convnextv2/official-to-hf",
        "-o",
        f"{folders[1]}/",
        "--max-shard-size",
        "5MB",
        "--workers",
        "2",
    )
    assert len(doc["units"]) >= 3  # a unit per shard at least
    one, two = ({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in f.iterdir()} for f in folders)
    assert one == two and "config.json" in one and "model.safetensors.index.json" in one
    _open(folders[1])
