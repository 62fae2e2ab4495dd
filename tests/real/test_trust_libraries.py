"""The trust rule with the real model libraries: their factories are allowed by what they are, their
other callables are refused, and every shipped recipe still resolves its target and verify model."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckptx._data import shipped_rules_dir
from ckptx.errors import TargetError, UntrustedCallable
from ckptx.rules.loader import load_rules
from ckptx.rules.recipe import TargetSpec
from ckptx.targets.resolve import resolve_target
from ckptx.trust.callables import factory_verdict

from .conftest import require_library

SHIPPED = sorted(shipped_rules_dir().rglob("*.yaml"))


def _libraries(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    return [
        lib
        for lib, words in (("timm", ("timm",)), ("hf", ("_hf", "transformers_model")), ("mmpretrain", ("mmpretrain",)))
        if any(w in text for w in words)
    ]


@pytest.mark.parametrize("path", SHIPPED, ids=[p.relative_to(shipped_rules_dir()).as_posix() for p in SHIPPED])
def test_every_shipped_recipe_resolves_its_target_and_verify_model(path: Path) -> None:
    for lib in _libraries(path):
        require_library(lib)
    recipe = load_rules(path)
    if recipe.inferred:  # a parameter chosen from the source: every choice's target must resolve; the first here
        recipe = recipe.resolve({p.name: p.choices[0] for p in recipe.inferred})
    if recipe.target is not None and recipe.target.model:
        assert resolve_target(recipe.target).tensors
    if recipe.verify is not None:
        verify = recipe.verify  # as `invert` traces it: on meta, else on the CPU
        assert resolve_target(
            TargetSpec(model=verify.source_model, kwargs=verify.source_kwargs, model_origin=verify.source_origin)
        ).tensors


@pytest.mark.parametrize(
    "name, allowed",
    [
        ("timm:create_model", True),
        ("timm.models:create_model", True),
        ("timm.models.convnext:convnextv2_atto", True),
        ("timm.models.convnext:ConvNeXt", True),
        ("timm.models:load_checkpoint", False),
        ("timm.models:_create_convnext", False),
    ],
)
def test_timm(name: str, allowed: bool) -> None:
    require_library("timm")
    assert factory_verdict(name).allowed is allowed


@pytest.mark.parametrize(
    "name, allowed",
    [
        ("torchvision.models:resnet18", True),
        ("torchvision.models:get_model", True),
        ("torchvision.models:ResNet", True),
        ("torchvision.models:get_weight", False),
        ("torchvision.io:read_file", False),
    ],
)
def test_torchvision(name: str, allowed: bool) -> None:
    require_library("timm")  # torchvision comes with timm
    assert factory_verdict(name).allowed is allowed


@pytest.mark.parametrize(
    "name, allowed",
    [
        ("transformers:AutoModel.from_config", True),
        ("transformers:AutoModelForImageClassification.from_config", True),
        ("transformers:AutoModel.from_pretrained", False),
        ("transformers:ViTModel.from_pretrained", False),
        ("transformers:pipeline", False),
        ("transformers:AutoConfig.from_pretrained", False),
        ("ckptx.factories:transformers_model", True),
    ],
)
def test_transformers(name: str, allowed: bool) -> None:
    require_library("hf")
    verdict = factory_verdict(name)
    assert verdict.allowed is allowed, verdict
    if not allowed:
        assert not verdict.may_allow  # a known library: its other callables are never recommended


def test_transformers_from_config_with_remote_code_is_refused() -> None:
    require_library("hf")
    spec = TargetSpec(model="transformers:AutoModel.from_config", kwargs={"config": {}, "trust_remote_code": True})
    with pytest.raises(UntrustedCallable, match="trust_remote_code"):
        resolve_target(spec)


def test_ckptx_transformers_factory_builds_only_model_classes() -> None:
    require_library("hf")
    from ckptx.factories import transformers_model

    with pytest.raises(TargetError, match="transformers has no model class 'pipeline'"):
        transformers_model("pipeline")


def test_mmengine_models_build_parts_by_name_and_are_refused(tmp_path: Path) -> None:
    require_library("mmpretrain")
    verdict = factory_verdict("mmpretrain.models:ImageClassifier")
    assert not verdict.allowed and "`type:` names" in verdict.reason
    assert factory_verdict("ckptx.factories:mmpretrain_model").allowed


def test_mmpretrain_factory_reads_only_the_shipped_configs(tmp_path: Path) -> None:
    require_library("mmpretrain")
    from ckptx.factories import mmpretrain_model

    evil = tmp_path / "evil.py"
    evil.write_text(f"open({str(tmp_path / 'pwned')!r}, 'w').close()\nmodel = dict(type='ImageClassifier')\n")
    with pytest.raises(TargetError, match="mmpretrain ships no config"):
        mmpretrain_model(f"../../../../../../../../../../..{evil}")
    assert not (tmp_path / "pwned").exists()
