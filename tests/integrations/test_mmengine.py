"""`init_cfg=dict(type='Ckptx', ...)`: real MMPretrain models built from their shipped configs, random weights."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptx.errors import ValidationFailed
from tests.real.models import mmpretrain_config_path, reference_convert, seeded_input
from tests.real.official_convnextv2 import build_official, make_official_checkpoint, randomize_

from .conftest import require_library

RECIPE = "convnextv2/official-to-mmpretrain"


@pytest.fixture(autouse=True)
def _mmpretrain() -> None:
    require_library("mmpretrain")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    from mmpretrain.utils import register_all_modules

    register_all_modules(init_default_scope=True)


def _config(tmp_path: Path, base: str, model: dict[str, Any]) -> Path:
    """A user's config: the shipped one as `_base_`, ckptx through `custom_imports`, `model` overrides."""
    path = tmp_path / "config.py"
    path.write_text(
        f"_base_ = [{base!r}]\n"
        "custom_imports = dict(imports=['ckptx.integrations.mmengine'], allow_failed_imports=False)\n"
        f"model = {model!r}\n",
        encoding="utf-8",
    )
    return path


def _build(config: Path) -> torch.nn.Module:
    from mmengine.config import Config
    from mmpretrain.registry import MODELS

    return MODELS.build(Config.fromfile(str(config)).model)


def _ckptx_backbone(checkpoint: Path, **extra: Any) -> dict[str, Any]:
    init = dict(
        type="Ckptx",
        checkpoint=str(checkpoint),
        recipe=RECIPE,
        prefix="backbone.",
        allow_globals=["argparse.Namespace"],
        **extra,
    )
    return dict(backbone=dict(init_cfg=init))


def _official(tmp_path: Path, size: str, seed: int = 1) -> tuple[torch.nn.Module, Path]:
    model = randomize_(build_official(size), seed).eval()  # GRN non-zero: a missing reshape cannot hide
    path = tmp_path / f"convnextv2_{size}_train.pth"
    make_official_checkpoint(model, path, training=True, model_name=f"convnextv2_{size}")
    return model, path


def _backbone_of(official: torch.nn.Module) -> dict[str, torch.Tensor]:
    converted = reference_convert({"model": official.state_dict()}, "mmpretrain")  # ckptx-independent oracle
    return {k[len("backbone.") :]: v for k, v in converted.items() if k.startswith("backbone.")}


@pytest.fixture(scope="module")
def atto(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(official atto, MMPretrain classifier from the shipped config initialized through Ckptx)."""
    require_library("mmpretrain")
    from mmpretrain.utils import register_all_modules

    register_all_modules(init_default_scope=True)
    tmp_path = tmp_path_factory.mktemp("atto")
    official, src = _official(tmp_path, "atto")
    classifier = _build(
        _config(tmp_path, mmpretrain_config_path("atto"), _ckptx_backbone(src, params=dict(size="atto")))
    )
    classifier.init_weights()
    return official, classifier.eval()


def test_init_weights_loads_exactly_the_official_weights_with_grn_reshaped(atto) -> None:
    official, classifier = atto
    want, got = _backbone_of(official), classifier.backbone.state_dict()
    assert sorted(got) == sorted(want)
    assert got["stages.0.0.grn.gamma"].shape == (160,)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_backbone_features_match_the_official_model(atto) -> None:
    official, classifier = atto
    x = seeded_input()
    with torch.no_grad():
        ours = classifier.backbone(x)[-1]  # gap_before_final_norm: norm3 of the pooled last stage
        theirs = official.forward_features(x)
    assert ours.shape == theirs.shape and (ours - theirs).abs().max().item() < 1e-4


V1_CONVERTER = """
        ckptx: 1
        name: v1-converter
        extract: model
        steps:
          - rename:
              - ['^downsample_layers\\.', 'backbone.downsample_layers.']
              - ['^stages\\.(\\d+)\\.(\\d+)\\.dwconv\\.', 'backbone.stages.\\1.\\2.depthwise_conv.']
              - ['^stages\\.(\\d+)\\.(\\d+)\\.pwconv(\\d)\\.', 'backbone.stages.\\1.\\2.pointwise_conv\\3.']
              - ['^stages\\.', 'backbone.stages.']
              - ['^norm\\.', 'backbone.norm3.']
              - ['^head\\.', 'head.fc.']
        """


def test_wrong_recipe_raises_at_init_weights_and_loads_nothing(tmp_path: Path, write_rules) -> None:
    """MMPretrain's own V1 converter's mistake: the renames without the GRN reshape."""
    _, src = _official(tmp_path, "atto")
    v1 = write_rules(V1_CONVERTER, name="v1.yaml")
    model = dict(
        backbone=dict(
            init_cfg=dict(
                type="Ckptx",
                checkpoint=str(src),
                recipe=str(v1),
                prefix="backbone.",
                allow_globals=["argparse.Namespace"],
            )
        )
    )
    classifier = _build(_config(tmp_path, mmpretrain_config_path("atto"), model))
    before = classifier.backbone.stages[0][0].grn.gamma.detach().clone()
    with pytest.raises(ValidationFailed) as failed:
        classifier.init_weights()
    report = failed.value.report
    assert {p.key for p in report.shape_mismatches} >= {"backbone.stages.0.0.grn.gamma", "backbone.stages.0.0.grn.beta"}
    assert not report.missing and not report.unexpected
    assert "same number of elements" in str(report)
    assert torch.equal(classifier.backbone.stages[0][0].grn.gamma, before)


def test_size_left_out_of_params_is_chosen_against_the_module(tmp_path: Path) -> None:
    official, src = _official(tmp_path, "femto", seed=2)
    classifier = _build(_config(tmp_path, mmpretrain_config_path("femto"), _ckptx_backbone(src)))
    classifier.init_weights()
    got = classifier.backbone.state_dict()
    assert all(torch.equal(got[k], v) for k, v in _backbone_of(official).items())


def test_strict_false_loads_what_fits_and_leaves_the_rest(tmp_path: Path, write_rules) -> None:
    """The V1 converter's GRN shapes do not fit: with strict=False everything else loads, GRN stays as it was."""
    official, src = _official(tmp_path, "atto")
    from ckptx.integrations.mmengine import CkptxInit

    classifier = _build(_config(tmp_path, mmpretrain_config_path("atto"), {}))
    init = CkptxInit(
        checkpoint=str(src),
        recipe=str(write_rules(V1_CONVERTER, name="v1.yaml")),
        prefix="backbone.",
        allow_globals=["argparse.Namespace"],
        strict=False,
    )
    before = {k: v.clone() for k, v in classifier.backbone.state_dict().items()}
    init(classifier.backbone)
    result = init.result
    assert result is not None and set(result.skipped) == {p.key for p in result.report.shape_mismatches}
    assert result.skipped and all(".grn." in k for k in result.skipped)
    after, want = classifier.backbone.state_dict(), _backbone_of(official)
    assert all(torch.equal(after[k], before[k] if ".grn." in k else want[k]) for k in want)


def test_an_initializer_after_ckptx_in_the_same_init_cfg_is_refused(tmp_path: Path) -> None:
    from ckptx.errors import InitConfigError

    _, src = _official(tmp_path, "atto")
    init = _ckptx_backbone(src, params=dict(size="atto"))["backbone"]["init_cfg"]
    later = dict(type="Constant", layer=["LayerNorm"], val=1.0, bias=0.0)
    classifier = _build(_config(tmp_path, mmpretrain_config_path("atto"), dict(backbone=dict(init_cfg=[init, later]))))
    with pytest.raises(InitConfigError, match="Constant would run after Ckptx"):
        classifier.init_weights()


def test_resnet_zero_init_residual_does_not_undo_what_ckptx_loaded(tmp_path: Path) -> None:
    """MMPretrain's ResNet zeroes every block's last norm after init unless init_cfg says 'Pretrained'."""
    from mmpretrain.registry import MODELS

    source = randomize_(MODELS.build(dict(type="ResNet", depth=18)), seed=5)
    src = tmp_path / "ddp.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, src)
    config = dict(
        type="ResNet", depth=18, init_cfg=dict(type="Ckptx", checkpoint=str(src), recipe="common/strip-module-prefix")
    )
    import ckptx.integrations.mmengine  # noqa: F401  (what custom_imports does)

    backbone = MODELS.build(config)
    backbone.init_weights()
    got = backbone.state_dict()
    assert got["layer1.0.bn2.weight"].abs().sum() > 0  # BasicBlock.norm2
    assert all(torch.equal(got[k], v) for k, v in source.state_dict().items())


def test_ckptx_loads_after_the_submodules_own_init_weights(tmp_path: Path) -> None:
    """mmengine runs a child's init_cfg after its parent's; Ckptx (like Pretrained) must still win."""
    from mmengine.model import BaseModule

    import ckptx.integrations.mmengine  # noqa: F401

    class Child(BaseModule):
        def __init__(self) -> None:
            super().__init__(init_cfg=dict(type="Constant", layer="Linear", val=0.0, bias=0.0))
            self.fc = torch.nn.Linear(3, 2)

    source = {"child.fc.weight": torch.randn(2, 3), "child.fc.bias": torch.randn(2)}
    src = tmp_path / "plain.pth"
    torch.save(source, src)

    class Parent(BaseModule):
        def __init__(self) -> None:
            super().__init__(init_cfg=dict(type="Ckptx", checkpoint=str(src), recipe="common/extract-state-dict"))
            self.child = Child()

    parent = Parent()
    parent.init_weights()
    assert torch.equal(parent.child.fc.weight, source["child.fc.weight"])
