"""Composition: three-level extends with params and overrides, names in extends, cycles, when:, lint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ckptx.conversion.in_memory import apply
from ckptx.errors import RuleError
from ckptx.rules.loader import load_rules


def _write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """base/grand.yaml <- base/parent.yaml <- recipes/child.yaml (relative paths across folders)."""
    _write(
        tmp_path,
        "base/grand.yaml",
        """\
ckptx: 1
name: grand
params: {prefix: backbone., dtype: float32}
extract: [model]
steps:
  - strip_prefix: module.
  - add_prefix: '${prefix}'
target:
  model: tests.helpers.models:tiny_net
  kwargs: {channels: 4, classes: 3}
""",
    )
    _write(
        tmp_path,
        "base/parent.yaml",
        """\
ckptx: 1
name: parent
extends: grand.yaml
params: {prefix: neck.}
extract: [state_dict]
steps:
  - cast: {dtype: '${dtype}'}
""",
    )
    return _write(
        tmp_path,
        "recipes/child.yaml",
        """\
ckptx: 1
name: child
description: the child
extends: [../base/parent.yaml]
params: {with_head: false}
steps:
  - rename: [['^${prefix}fc\\.', 'head.']]
    when: {param: {with_head: true}}
  - drop: ['^${prefix}fc\\.']
    when: {param: {with_head: false}}
target:
  kwargs: {classes: 5}
""",
    )


def test_three_levels_compose_in_order_with_inherited_target(tree: Path) -> None:
    recipe = load_rules(tree)
    assert [s.op for s in recipe.steps] == ["strip_prefix", "add_prefix", "cast", "rename", "drop"]
    assert recipe.extract == ("model", "state_dict")
    assert recipe.name == "child" and recipe.description == "the child"
    assert recipe.params == {"prefix": "neck.", "dtype": "float32", "with_head": False}
    assert recipe.steps[1].args.prefix == "neck."  # the parent's default overrides the grandparent's
    assert recipe.target.model == "tests.helpers.models:tiny_net"
    assert dict(recipe.target.kwargs) == {"channels": 4, "classes": 5}
    assert [f.name for f in recipe.files] == ["grand", "parent", "child"]
    assert recipe.steps[0].where.endswith("base/grand.yaml:6:5 steps[0].strip_prefix")


def test_set_overrides_every_level(tree: Path) -> None:
    recipe = load_rules(tree, params={"prefix": "head.", "dtype": "bfloat16", "with_head": True})
    assert recipe.steps[1].args.prefix == "head." and recipe.steps[2].args.dtype == "bfloat16"
    assert recipe.steps[3].args.rules[0].pattern.pattern == r"^head.fc\."
    state = {"module.fc.weight": torch.ones(2), "module.bn.weight": torch.ones(2, dtype=torch.float64)}
    out = apply(recipe, state)
    assert {k: v.dtype for k, v in out.items()} == {"head.weight": torch.bfloat16, "head.bn.weight": torch.bfloat16}


def test_when_param_picks_the_step(tree: Path) -> None:
    state = {"module.fc.weight": torch.ones(2), "module.conv.weight": torch.ones(2)}
    assert sorted(apply(load_rules(tree), state)) == ["neck.conv.weight"]
    assert sorted(apply(load_rules(tree, params={"with_head": True}), state)) == ["head.weight", "neck.conv.weight"]


def test_when_has_key_and_no_key(write_rules) -> None:
    path = write_rules(r"""
        ckptx: 1
        steps:
          - add_prefix: backbone.
            when: {no_key: '^backbone\.'}
          - rename: [['^backbone\.head\.', 'head.']]
            when: {has_key: '^backbone\.head\.'}
    """)
    recipe = load_rules(path)
    assert sorted(apply(recipe, {"head.w": torch.ones(1), "x": torch.ones(1)})) == ["backbone.x", "head.w"]
    assert sorted(apply(recipe, {"backbone.x": torch.ones(1)})) == ["backbone.x"]


def test_an_unknown_set_parameter_names_what_the_tree_declares(tree: Path) -> None:
    with pytest.raises(
        RuleError,
        match=r"^--set: unknown parameter\(s\) prefx; the recipe declares: dtype, prefix, "
        r"with_head$",
    ):
        load_rules(tree, params={"prefx": "x"})


def test_an_unset_parameter_in_a_parent_is_reported_at_its_place(tmp_path: Path, run_cli) -> None:
    _write(tmp_path, "parent.yaml", "ckptx: 1\nparams: {dtype: null}\nsteps:\n  - cast: {dtype: '${dtype}'}\n")
    child = _write(tmp_path, "child.yaml", "ckptx: 1\nextends: parent.yaml\n")
    result = run_cli("lint", child)
    assert result.code == 2
    assert "parent.yaml:4:19 steps[0].cast.dtype: parameter 'dtype' has no value; pass --set dtype=..." in result.out
    assert run_cli("lint", child, "--set", "dtype=float16").code == 0


def test_extends_by_shipped_name(tmp_path: Path) -> None:
    child = _write(tmp_path, "child.yaml", "ckptx: 1\nextends: common/strip-module-prefix\nsteps: [{add_prefix: x.}]\n")
    recipe = load_rules(child)
    assert [s.op for s in recipe.steps] == ["strip_prefix", "add_prefix"]
    assert recipe.extract == ("state_dict", "model", ".")


@pytest.mark.parametrize(
    "files, expected",
    [
        (
            {"a.yaml": "extends: a.yaml"},
            "a.yaml:2:10 extends: extends cycle: a.yaml -> a.yaml; remove one of these extends",
        ),
        (
            {"a.yaml": "extends: b.yaml", "b.yaml": "extends: [c.yaml]", "c.yaml": "extends: a.yaml"},
            "c.yaml:2:10 extends: extends cycle: a.yaml -> b.yaml -> c.yaml -> a.yaml; remove one of these extends",
        ),
    ],
)
def test_cycles_are_named_with_the_whole_chain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, files, expected
) -> None:
    monkeypatch.chdir(tmp_path)
    for name, text in files.items():
        _write(tmp_path, name, f"ckptx: 1\n{text}\n")
    with pytest.raises(RuleError) as caught:
        load_rules("a.yaml")
    assert str(caught.value) == expected


def test_a_diamond_is_not_a_cycle(tmp_path: Path) -> None:
    _write(tmp_path, "root.yaml", "ckptx: 1\nsteps: [{strip_prefix: module.}]\n")
    _write(tmp_path, "left.yaml", "ckptx: 1\nextends: root.yaml\nsteps: [{add_prefix: l.}]\n")
    _write(tmp_path, "right.yaml", "ckptx: 1\nextends: root.yaml\nsteps: [{add_prefix: r.}]\n")
    top = _write(tmp_path, "top.yaml", "ckptx: 1\nextends: [left.yaml, right.yaml]\n")
    assert [s.op for s in load_rules(top).steps] == ["strip_prefix", "add_prefix", "strip_prefix", "add_prefix"]


def test_problems_in_parents_and_child_are_reported_together(tmp_path: Path) -> None:
    _write(tmp_path, "parent.yaml", "ckptx: 1\nsteps: [{drop: '['}]\n")
    child = _write(tmp_path, "child.yaml", "ckptx: 1\nextends: [parent.yaml, missing.yaml]\nsteps: [{keep: '('}]\n")
    with pytest.raises(RuleError) as caught:
        load_rules(child)
    text = str(caught.value)
    assert "parent.yaml:2:16 steps[0].drop: invalid regex '['" in text
    assert "child.yaml:2:24 extends[1]: no such rule file" in text
    assert "child.yaml:3:16 steps[0].keep: invalid regex '('" in text


def test_a_child_verify_overrides_only_what_it_writes(tmp_path: Path) -> None:
    """A parent's `atol: 0.01` survives a child `verify:` that sets other fields (it used to reset to 1e-4)."""
    _write(
        tmp_path,
        "parent.yaml",
        "ckptx: 1\nsteps: []\nverify: {source_model: 'a:b', input_shape: [1, 3], atol: 0.01, output: logits}\n",
    )
    _write(
        tmp_path,
        "child.yaml",
        "ckptx: 1\nextends: parent.yaml\nsteps: []\nverify: {source_model: 'c:d', input_shape: [2, 3], seed: 5}\n",
    )
    verify = load_rules(tmp_path / "child.yaml").verify
    assert (verify.atol, verify.output, verify.seed, verify.source_model, verify.input_shape) == (
        0.01,
        "logits",
        5,
        "c:d",
        (2, 3),
    )
    assert verify.rtol == 1e-4  # neither wrote it: the default
