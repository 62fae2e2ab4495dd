"""Every shipped ConvNeXt-V2 recipe converts every size with no `--set`: the size is chosen from the checkpoint.

Sources are built on the meta device and written as sparse safetensors files (a real header, a data
section of holes): planning and validation read the header only, so a `tiny` costs nothing to make.
One conversion writes real weights and is checked by logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ckptx.targets.instantiate import build_model
from tests.real.models import build, logits, seeded_input
from tests.real.official_convnextv2 import build_official, make_official_checkpoint, randomize_

from .conftest import require_library

SIZES = ["atto", "nano", "tiny"]  # depths 2-2-6-2, 2-2-8-2, 3-3-9-3
OFFICIAL = ("ckptx.reference.convnextv2:build", {})
RECIPES = {  # recipe -> (source model factory, its kwargs, the libraries it needs)
    "convnextv2/official-to-timm": (*OFFICIAL, ("timm",)),
    "convnextv2/official-to-hf": (*OFFICIAL, ("hf",)),
    "convnextv2/official-to-mmpretrain": (*OFFICIAL, ("mmpretrain",)),
    "timm/convnextv2-to-hf": ("ckptx.factories:convnextv2_timm", {}, ("timm", "hf")),
    "hf/convnextv2-to-timm": ("ckptx.factories:convnextv2_hf", {}, ("timm", "hf")),
    "mmpretrain/backbone-only": ("ckptx.factories:convnextv2_mmpretrain", {}, ("mmpretrain",)),
}
_DTYPES = {torch.float32: "F32", torch.int64: "I64"}


def sparse_safetensors(path: Path, state: dict[str, torch.Tensor]) -> Path:
    """A safetensors file with `state`'s keys, shapes and dtypes and an all-hole data section."""
    header, offset = {}, 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        header[key] = {
            "dtype": _DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as out:
        out.write(len(text).to_bytes(8, "little") + text)
        out.truncate(8 + len(text) + offset)
    return path


def _source(tmp_path: Path, factory: str, kwargs: dict) -> Path:
    model = build_model(factory, kwargs, "test", device="meta")
    return sparse_safetensors(tmp_path / "source.safetensors", model.state_dict())


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_shipped_recipe_chooses_the_size_of_the_checkpoint(run_cli, tmp_path: Path, recipe: str, size: str) -> None:
    factory, kwargs, libs = RECIPES[recipe]
    for lib in libs:
        require_library(lib)
    result = run_cli(
        "convert", _source(tmp_path, factory, {**kwargs, "size": size}), "-r", recipe, "--dry-run", "--json"
    )
    assert result.code == 0, result.out + result.err
    doc = result.json
    assert doc["inferred"] == {"size": size} and doc["validation"]["ok"]
    assert f"(size={size!r}" in doc["validation"]["target"]


def test_a_checkpoint_of_no_declared_size_lists_every_size_tried(run_cli, tmp_path: Path) -> None:
    require_library("timm")
    atto_but_shallower = {"depths": [2, 2, 4, 2], "dims": [40, 80, 160, 320]}  # two blocks fewer than atto
    src = _source(tmp_path, "ckptx.reference.convnextv2:ConvNeXtV2", atto_but_shallower)
    result = run_cli("convert", src, "-r", "convnextv2/official-to-timm", "-o", tmp_path / "out.safetensors")
    assert result.code == 1 and not (tmp_path / "out.safetensors").exists()
    lines = result.out.splitlines()
    assert lines[0] == (
        "choosing size for convnextv2/official-to-timm: no choice fits the source; tried 8, closest first:"
    )
    assert lines[1].startswith("  size=atto: 120/140 target keys fit (0 with another shape, 20 missing), 0 unexpected")
    assert sorted(line.split(":")[0].strip() for line in lines[1:9]) == sorted(
        f"size={s}" for s in ["atto", "femto", "pico", "nano", "tiny", "base", "large", "huge"]
    )
    assert all("target keys fit" in line for line in lines[1:9])  # counted even where planning fails (femto...)
    assert "pass --set size=..." in lines[9]


def test_a_nano_release_checkpoint_converts_without_set_and_gives_the_official_logits(run_cli, tmp_path: Path) -> None:
    require_library("timm")
    official = randomize_(build_official("nano"), seed=6).eval()
    src = tmp_path / "convnextv2_nano_1k_224_ema.pt"
    make_official_checkpoint(official, src, training=False)
    dst = tmp_path / "nano.safetensors"
    result = run_cli("convert", src, "-r", "convnextv2/official-to-timm", "-o", dst)
    assert result.code == 0, result.out + result.err
    assert "note: size=nano chosen from the source" in result.out
    model = build("timm", "nano")
    model.load_state_dict(load_file(str(dst)), strict=True)
    x = seeded_input()
    with torch.no_grad():
        assert (logits(model.eval(), x, "timm") - official(x)).abs().max().item() < 1e-4
