"""mmpretrain/backbone-only on a checkpoint saved by mmengine from the real MMPretrain classifier."""

from __future__ import annotations

from pathlib import Path

import torch

from .conftest import require_library
from .models import build, seeded_input
from .official_convnextv2 import randomize_


def test_backbone_only_from_mmengine_checkpoint(run_cli, tmp_path: Path) -> None:
    require_library("mmpretrain")
    from mmengine.runner.checkpoint import save_checkpoint, weights_to_cpu

    classifier = randomize_(build("mmpretrain", "atto"), seed=3).eval()
    optimizer = torch.optim.SGD(classifier.parameters(), lr=0.1, momentum=0.9)
    src = tmp_path / "epoch_12.pth"
    save_checkpoint(
        {
            "meta": {"epoch": 12, "iter": 1200, "mmengine_version": "0.10.7"},
            "state_dict": weights_to_cpu(classifier.state_dict()),
            "optimizer": optimizer.state_dict(),
        },
        str(src),
    )
    dst = tmp_path / "backbone.pth"
    result = run_cli("convert", src, "-r", "mmpretrain/backbone-only", "-o", dst)
    assert result.code == 0, result.out + result.err
    assert "OK (" in result.out
    backbone = build("mmpretrain", "atto").backbone
    backbone.eval()  # MMPretrain's ConvNeXt.train() returns None, so no chaining
    backbone.load_state_dict(torch.load(dst, weights_only=True), strict=True)
    x = seeded_input()
    with torch.no_grad():
        for ours, theirs in zip(backbone(x), classifier.backbone(x)):
            assert torch.equal(ours, theirs)
