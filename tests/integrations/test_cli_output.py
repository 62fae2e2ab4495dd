"""The command line next to the real frameworks, run as a user runs it (its own process): `--json` stays JSON while
mmengine logs, and a model folder goes into a folder that does not exist yet, as a file does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.conftest import subprocess_env

from .conftest import require_library


def _ckptx(*args: object, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ckptx", *map(str, args)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=cwd,
        timeout=600,
    )


def test_json_stays_json_when_the_target_is_an_mmpretrain_model(tmp_path: Path) -> None:
    require_library("mmpretrain")
    from ckptx.factories import convnextv2_mmpretrain

    backbone = convnextv2_mmpretrain(size="atto", part="backbone")
    src = tmp_path / "classifier.pth"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in backbone.state_dict().items()}, "meta": {}}, src)
    done = _ckptx("convert", src, "-r", "mmpretrain/backbone-only", "--dry-run", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    document = json.loads(done.stdout)
    assert document["ok"] is True and document["validation"]["ok"] is True
    assert "mmengine" in done.stderr  # its log lines went to stderr


def test_a_model_folder_goes_into_a_folder_that_does_not_exist_yet(tmp_path: Path) -> None:
    require_library("hf")
    require_library("timm")
    import timm

    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=32, num_classes=10)
    src = tmp_path / "timm_vit.safetensors"
    save_file(source.state_dict(), str(src))
    folder = tmp_path / "new" / "nested" / "vit"
    args = ["-r", "vit/timm-to-hf", "--set", "layers=2", "--set", "image_size=32", "--set", "num_classes=10"]
    done = _ckptx("convert", src, "-o", f"{folder}/", *args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    file_out = tmp_path / "other" / "nested" / "vit.safetensors"
    assert _ckptx("convert", src, "-o", file_out, *args, cwd=tmp_path).returncode == 0
    assert file_out.is_file()  # the same rule for a file output
