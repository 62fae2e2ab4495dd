"""The shipped common recipes on checkpoints in each layout they promise to handle."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import ckptx
from ckptx.errors import PlanError, SourceError
from tests.helpers.models import randomized, tiny_net


def _roundtrip(tmp_path: Path, checkpoint: object, recipe: str) -> nn.Module:
    src = tmp_path / "in.pth"
    torch.save(checkpoint, src)
    model = tiny_net()
    report = ckptx.load_into(model, src, recipe, strict=True)
    assert report.ok
    return model


def _same(model: nn.Module, state: dict) -> bool:
    return all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


@pytest.mark.parametrize("wrapper", ["state_dict", "model", "module", None])
def test_extract_state_dict_finds_the_weights(tmp_path: Path, tiny_state: dict, wrapper: str | None) -> None:
    checkpoint = (
        tiny_state
        if wrapper is None
        else {wrapper: tiny_state, "optimizer": {"state": {}, "param_groups": []}, "epoch": 3, "meta": {"seed": 1}}
    )
    assert _same(_roundtrip(tmp_path, checkpoint, "common/extract-state-dict"), tiny_state)


def test_strip_module_prefix_of_real_data_parallel(tmp_path: Path, tiny_state: dict) -> None:
    wrapped = nn.DataParallel(randomized(tiny_net()))
    state = wrapped.state_dict()
    assert next(iter(state)).startswith("module.")
    model = _roundtrip(tmp_path, state, "common/strip-module-prefix")
    assert _same(model, {k.removeprefix("module."): v for k, v in state.items()})


def test_strip_module_prefix_of_compiled_and_stacked(tmp_path: Path) -> None:
    compiled = torch.compile(nn.DataParallel(randomized(tiny_net())))
    state = compiled.state_dict()
    assert next(iter(state)).startswith("_orig_mod.module.")
    model = _roundtrip(tmp_path, {"model": state}, "common/strip-module-prefix")
    assert _same(model, {k.removeprefix("_orig_mod.module."): v for k, v in state.items()})


def test_strip_module_prefix_leaves_inner_module_names(tmp_path: Path) -> None:
    state = {"module.sa1.mlp_module.layer0.weight": torch.zeros(1)}
    recipe = ckptx.load_rules("common/strip-module-prefix")
    assert list(ckptx.apply(recipe, state)) == ["sa1.mlp_module.layer0.weight"]


@pytest.mark.parametrize("wrapper", ["state_dict_ema", "model_ema", "ema"])
def test_ema_wrappers(tmp_path: Path, tiny_state: dict, wrapper: str) -> None:
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in tiny_state.items()}
    model = _roundtrip(tmp_path, {"state_dict": tiny_state, wrapper: ema, "epoch": 1}, "common/ema")
    assert _same(model, ema)


def test_ema_mmdetection_in_dict_copies(tmp_path: Path, tiny_state: dict) -> None:
    ema = {f"ema_{k.replace('.', '_')}": v * 3 for k, v in tiny_state.items() if v.is_floating_point()}
    model = _roundtrip(tmp_path, {"state_dict": {**tiny_state, **ema}, "meta": {}}, "common/ema")
    expected = {k: v * 3 if v.is_floating_point() else v for k, v in tiny_state.items()}
    assert _same(model, expected)


def test_ema_without_any_ema_weights_is_an_error(tmp_path: Path, tiny_state: dict) -> None:
    src = tmp_path / "raw.pth"
    torch.save({"state_dict": tiny_state}, src)
    with pytest.raises(PlanError, match=r"take_from step matches no key"):
        ckptx.convert(src, None, "common/ema", dry_run=True)


def test_ema_without_state_dict_either_is_an_error(tmp_path: Path, tiny_state: dict) -> None:
    src = tmp_path / "raw.pth"
    torch.save({"model": tiny_state}, src)
    with pytest.raises(SourceError, match=r"no state dict at state_dict_ema, model_ema, ema, state_dict"):
        ckptx.convert(src, None, "common/ema", dry_run=True)


@pytest.mark.parametrize("attribute", ["model", "net"])
def test_lightning_to_plain_finds_the_attribute(tmp_path: Path, tiny_state: dict, attribute: str) -> None:
    checkpoint = {
        "epoch": 4,
        "global_step": 400,
        "pytorch-lightning_version": "2.5.0",
        "state_dict": {f"{attribute}.{k}": v for k, v in tiny_state.items()},
        "loops": {},
        "callbacks": {},
        "optimizer_states": [{"state": {}, "param_groups": []}],
        "lr_schedulers": [],
        "hyper_parameters": {"lr": 0.1},
    }
    assert _same(_roundtrip(tmp_path, checkpoint, "common/lightning-to-plain"), tiny_state)
