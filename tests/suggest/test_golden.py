"""Golden suggested recipes, committed so that their readability is reviewed in the diff.

Regenerate after an intended change with `CKPTX_UPDATE_GOLDEN=1 pytest tests/suggest/test_golden.py`,
then read the diff: rows in a natural order, one generalizing row per kind of layer, comments where a
choice was close.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from . import models
from .conftest import require

GOLDEN = Path(__file__).parent / "golden"


def _check(run_cli, src: Path, target: str, golden: str, *extra: str) -> None:
    out = src.parent / golden
    result = run_cli("suggest", src, "--target", target, "-o", out, *extra)
    assert result.code == 0, result.out + result.err
    text = out.read_text(encoding="utf-8")
    path = GOLDEN / golden
    if os.environ.get("CKPTX_UPDATE_GOLDEN") == "1":
        path.write_text(text, encoding="utf-8")
    assert text == path.read_text(encoding="utf-8"), f"{golden} changed; see the module docstring to update it"


def test_golden_torchvision_resnet50_to_transformers(run_cli, tmp_path: Path) -> None:
    require("torchvision", "transformers")
    import torchvision

    model = models.randomize(torchvision.models.resnet50(), 0)
    src = tmp_path / "resnet50_ddp.pth"
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 90}, src)
    _check(run_cli, src, "tests.suggest.models:hf_resnet50", "resnet50-torchvision-to-transformers.yaml")


def test_golden_official_convnextv2_to_timm(run_cli, tmp_path: Path) -> None:
    require("timm")
    from tests.real.official_convnextv2 import build_official, make_official_checkpoint, randomize_

    src = tmp_path / "convnextv2_atto_train.pth"
    make_official_checkpoint(
        randomize_(build_official("atto"), 0).eval(), src, training=True, seed=0, model_name="convnextv2_atto"
    )
    _check(
        run_cli,
        src,
        "ckptx.factories:convnextv2_timm",
        "convnextv2-official-to-timm.yaml",
        "--target-arg",
        "size=atto",
        "--allow-global",
        "argparse.Namespace",
        "--verify-with",
        "ckptx.reference.convnextv2:build",
        "--verify-arg",
        "size=atto",
    )
