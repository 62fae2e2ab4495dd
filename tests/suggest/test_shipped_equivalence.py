"""`ckptx suggest` reproduces the shipped ConvNeXt-V2 and ViT recipes: planned on the same source, the
suggested recipe gives every output key from the same source key(s), with the same ops and final shape."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import ckptx
from ckptx.rules.recipe import Origin, TargetSpec
from ckptx.targets.resolve import resolve_target

from . import models
from .conftest import require


def _plan_table(recipe: ckptx.Recipe, src: Path, target: str, kwargs: dict) -> dict[str, tuple]:
    """key -> (source keys, op names, final shape) of `recipe` planned on `src` against the target."""

    tensors = resolve_target(TargetSpec(model=target, kwargs=kwargs, model_origin=Origin.user("the test"))).tensors
    plan = ckptx.plan(recipe, str(src), target=tensors)
    return {
        e["key"]: (tuple(e["sources"]), tuple(op.split("(")[0] for op in e["ops"]), tuple(e["shape"]))
        for e in plan.to_dict()["entries"]
    }


@pytest.fixture(scope="module")
def official_release(tmp_path_factory) -> Path:
    from tests.real.official_convnextv2 import build_official, make_official_checkpoint, randomize_

    path = tmp_path_factory.mktemp("release") / "convnextv2_atto_1k_224_ema.pt"
    make_official_checkpoint(
        randomize_(build_official("atto"), 0).eval(), path, training=False, seed=0, model_name="convnextv2_atto"
    )
    return path


@pytest.mark.parametrize(
    "shipped,target,library",
    [
        ("convnextv2/official-to-timm", "ckptx.factories:convnextv2_timm", "timm"),
        ("convnextv2/official-to-hf", "ckptx.factories:convnextv2_hf", "transformers"),
        ("convnextv2/official-to-mmpretrain", "ckptx.factories:convnextv2_mmpretrain", "mmpretrain"),
    ],
)
def test_convnextv2_recipes_are_reproduced(official_release: Path, shipped: str, target: str, library: str) -> None:
    require(library)
    suggestion = ckptx.suggest(official_release, target, target_args={"size": "atto"})
    assert suggestion.report.ok
    expected = _plan_table(
        ckptx.load_rules(shipped, params={"size": "atto"}), official_release, target, {"size": "atto"}
    )
    got = _plan_table(suggestion.recipe, official_release, target, {"size": "atto"})
    assert got == expected


def test_vit_timm_to_hf_is_reproduced(tmp_path: Path) -> None:
    require("timm", "transformers")
    src = tmp_path / "timm_vit.safetensors"
    save_file(models.randomize(models.timm_vit(), 0).state_dict(), str(src))
    target = "tests.suggest.models:hf_vit"
    suggestion = ckptx.suggest(src, target)
    assert suggestion.report.ok
    expected = _plan_table(ckptx.load_rules("vit/timm-to-hf"), src, target, {})
    assert _plan_table(suggestion.recipe, src, target, {}) == expected


def test_vit_hf_to_timm_is_reproduced(tmp_path: Path) -> None:
    require("timm", "transformers")
    src = tmp_path / "hf_vit.pth"
    torch.save(models.randomize(models.hf_vit(), 0).state_dict(), src)
    target = "tests.suggest.models:timm_vit"
    suggestion = ckptx.suggest(src, target)
    assert suggestion.report.ok
    expected = _plan_table(ckptx.load_rules("vit/hf-to-timm"), src, target, {})
    assert _plan_table(suggestion.recipe, src, target, {}) == expected
