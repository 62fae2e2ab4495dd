"""The in-memory API: `ckptx.apply` and `ckptx.load_into` find the weights as for a file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import ckptx
from ckptx.errors import ValidationFailed
from tests.helpers.models import tiny_net

EXTRACT_MODEL = "ckptx: 1\nextract: [model]\nsteps: [{strip_prefix: module.}]\n"


def test_apply_uses_extract_on_a_whole_loaded_checkpoint(
    ddp_checkpoint: Path, write_rules: Callable[..., Path], tiny_state: dict
) -> None:
    recipe = ckptx.load_rules(write_rules(EXTRACT_MODEL))
    out = ckptx.apply(recipe, torch.load(ddp_checkpoint, weights_only=True))
    assert list(out) == list(tiny_state)
    assert all(torch.equal(out[k], v) for k, v in tiny_state.items())


def test_load_into_uses_extract_on_a_whole_loaded_checkpoint(
    ddp_checkpoint: Path, write_rules: Callable[..., Path], tiny_state: dict
) -> None:
    model = tiny_net()
    report = ckptx.load_into(model, torch.load(ddp_checkpoint, weights_only=True), write_rules(EXTRACT_MODEL))
    assert report.ok
    assert torch.equal(model.state_dict()["conv.weight"], tiny_state["conv.weight"])


def test_load_into_not_strict_still_raises_when_nothing_matches(
    tiny_state: dict, write_rules: Callable[..., Path]
) -> None:
    renamed = {f"other.{k}": v for k, v in tiny_state.items()}
    with pytest.raises(ValidationFailed, match=r"0/\d+ target keys fit"):
        ckptx.load_into(tiny_net(), renamed, write_rules("ckptx: 1\nsteps: []\n"), strict=False)


def test_plan_and_apply_are_functions_not_recipe_methods(tiny_state: dict, write_rules: Callable[..., Path]) -> None:
    recipe = ckptx.load_rules(write_rules("ckptx: 1\nsteps: [{add_prefix: backbone.}]\n"))
    assert not hasattr(recipe, "plan") and not hasattr(recipe, "apply")
    assert [e.key for e in ckptx.plan(recipe, tiny_state).entries] == [f"backbone.{k}" for k in tiny_state]
