"""Index arithmetic in rename replacements: `{\\1 - 1}`, validated by the schema and at load time."""

from __future__ import annotations

import pytest
import torch

from ckptx.errors import RuleError

from .helpers import apply, plan_problems, randn, recipe


def test_layer1_to_4_become_stages_0_to_3(tmp_path) -> None:
    state = {f"layer{i}.{j}.conv.weight": randn(1, seed=i * 10 + j) for i in range(1, 5) for j in range(2)}
    out = apply(
        tmp_path,
        r"""
        - rename: [['^layer(\d+)\.(\d+)\.', 'stages.{\1 - 1}.blocks.\2.']]
    """,
        state,
    )
    assert sorted(out) == sorted(f"stages.{i - 1}.blocks.{j}.conv.weight" for i in range(1, 5) for j in range(2))
    assert torch.equal(out["stages.3.blocks.1.conv.weight"], state["layer4.1.conv.weight"])


def test_blocks_shifted_by_one_with_named_groups_and_products(tmp_path) -> None:
    state = {"blocks.0.w": randn(1), "blocks.1.w": randn(1, seed=1)}
    out = apply(
        tmp_path,
        r"""
        - rename: {from: '^blocks\.(?P<n>\d+)\.', to: 'layers.{\g<n> + 1}.{2 * (\g<n> + 1)}.'}
    """,
        state,
    )
    assert list(out) == ["layers.1.2.w", "layers.2.4.w"]


def test_braces_without_a_group_stay_literal(tmp_path) -> None:
    out = apply(tmp_path, "- rename: [['^a$', 'b{x}']]\n", {"a": randn(1)})
    assert list(out) == ["b{x}"]


def test_a_malformed_expression_is_a_schema_error_with_its_place(tmp_path) -> None:
    with pytest.raises(RuleError) as caught:
        recipe(tmp_path, r"- rename: [['^layer(\d)', 'stage{x\1}']]" + "\n")
    assert str(caught.value) == (
        f"{tmp_path}/steps.yaml:3:29 steps[0].rename[0][1]: 'stage{{x\\\\1}}' has a malformed "
        "index expression: inside {...} use group references, integers and + - * // % "
        "(e.g. 'stages.{\\1 - 1}.')"
    )


def test_a_group_the_pattern_lacks_is_a_load_error_with_its_place(tmp_path) -> None:
    with pytest.raises(RuleError) as caught:
        recipe(tmp_path, r"- rename: [['^layer(\d)', 'stage{\2 - 1}']]" + "\n")
    assert str(caught.value) == (
        f"{tmp_path}/steps.yaml:3:14 steps[0].rename[0]: invalid replacement "
        "'stage{\\\\2 - 1}': '{\\2 - 1}' refers to group 2 but the pattern has 1 group(s)"
    )


def test_a_group_that_is_not_a_number_or_a_negative_index_is_a_plan_error(tmp_path) -> None:
    message = plan_problems(tmp_path, r"- rename: [['^(\w+)\.', '{\1 + 1}.']]" + "\n", {"a.w": randn(1)})
    assert "key 'a.w': '{\\1 + 1}': group 1 is 'a', not an integer" in message
    message = plan_problems(tmp_path, r"- rename: [['^l(\d)\.', 's{\1 - 1}.']]" + "\n", {"l0.w": randn(1)})
    assert "'{\\1 - 1}' gives -1; a key index cannot be negative" in message
