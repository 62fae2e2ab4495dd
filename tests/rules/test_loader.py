"""Loading rule files: names, composition of several files, parameters, provenance."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest

from ckptx.errors import RuleError
from ckptx.rules.loader import load_rules


def test_several_files_compose_in_order(write_rules: Callable[..., Path]) -> None:
    first = write_rules("ckptx: 1\nname: a\nextract: model\nsteps: [{strip_prefix: module.}]\n", "a.yaml")
    second = write_rules("ckptx: 1\nname: b\nextract: state_dict\nsteps: [{add_prefix: backbone.}]\n", "b.yaml")
    recipe = load_rules([first, second])
    assert [s.op for s in recipe.steps] == ["strip_prefix", "add_prefix"]
    assert recipe.extract == ("model", "state_dict")
    assert recipe.name == "a+b"


def test_problems_of_every_file_are_reported(write_rules: Callable[..., Path]) -> None:
    first = write_rules("ckptx: 2\n", "a.yaml")
    second = write_rules("ckptx: 1\nstepz: []\n", "b.yaml")
    with pytest.raises(RuleError) as caught:
        load_rules([first, second])
    assert len(caught.value.problems) == 2


def test_rule_file_hash_is_recorded(write_rules: Callable[..., Path]) -> None:
    path = write_rules("ckptx: 1\nname: hashed\n")
    recipe = load_rules(path)
    assert recipe.files[0].sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_param_default_is_substituted(write_rules: Callable[..., Path]) -> None:
    path = write_rules("ckptx: 1\nparams: {prefix: backbone.}\nsteps: [{add_prefix: '${prefix}'}]\n")
    assert load_rules(path).steps[0].args.prefix == "backbone."


def test_set_overrides_param(write_rules: Callable[..., Path]) -> None:
    path = write_rules("ckptx: 1\nparams: {prefix: backbone.}\nsteps: [{add_prefix: '${prefix}'}]\n")
    assert load_rules(path, params={"prefix": "neck."}).steps[0].args.prefix == "neck."


def test_set_of_undeclared_param_is_an_error(write_rules: Callable[..., Path]) -> None:
    path = write_rules("ckptx: 1\nparams: {prefix: backbone.}\n")
    with pytest.raises(RuleError, match=r"--set: unknown parameter\(s\) prefx; the recipe declares: prefix"):
        load_rules(path, params={"prefx": "x"})


def test_param_without_value_is_an_error(write_rules: Callable[..., Path]) -> None:
    path = write_rules("ckptx: 1\nparams: {dtype: null}\nsteps: [{cast: {dtype: '${dtype}'}}]\n")
    with pytest.raises(RuleError, match=r"parameter 'dtype' has no value; pass --set dtype=\.\.\."):
        load_rules(path)


def test_missing_rule_file_is_named() -> None:
    with pytest.raises(RuleError, match="^nowhere/x.yaml: no such rule file$"):
        load_rules("nowhere/x.yaml")


@pytest.mark.parametrize(
    "typed,meant",
    [
        ("convnextv2/oficial-to-timm", "convnextv2/official-to-timm"),
        ("strip-module-prefix", "common/strip-module-prefix"),
    ],
)
def test_a_mistyped_recipe_name_gets_did_you_mean(typed: str, meant: str) -> None:
    with pytest.raises(RuleError, match=f"did you mean '{meant}'"):
        load_rules(typed)


def test_an_unrelated_name_gets_no_guess() -> None:
    with pytest.raises(RuleError) as caught:
        load_rules("nothing-like-it")
    assert "did you mean" not in str(caught.value)
