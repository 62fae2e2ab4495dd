"""merge: several keys into one by cat or stack, in an order the step gives explicitly."""

from __future__ import annotations

import torch

from .helpers import apply, plan_problems, randn


def test_q_k_v_concatenate_in_the_listed_order(tmp_path) -> None:
    state = {
        "a.q.weight": randn(4, 4),
        "a.k.weight": randn(4, 4, seed=1),
        "a.v.weight": randn(4, 4, seed=2),
        "a.out.weight": randn(4, 4, seed=3),
    }
    out = apply(
        tmp_path,
        r"""
        - merge: {match: '^(.*)\.q\.(weight)$', inputs: ['\1.v.\2', '\1.q.\2', '\1.k.\2'], to: '\1.vqk.\2'}
    """,
        state,
    )
    assert list(out) == ["a.vqk.weight", "a.out.weight"]
    assert torch.equal(out["a.vqk.weight"], torch.cat([state["a.v.weight"], state["a.q.weight"], state["a.k.weight"]]))


def test_experts_stack_by_their_index_not_by_name_order(tmp_path) -> None:
    state = {f"moe.experts.{i}.w1": randn(3, 2, seed=i) for i in (10, 2, 0, 1, 3, 4, 5, 6, 7, 8, 9)}
    out = apply(
        tmp_path,
        r"""
        - merge: {match: '^moe\.experts\.(\d+)\.(w\d)$', index: '\1', to: 'moe.\2', stack: true}
    """,
        state,
    )
    assert list(out) == ["moe.w1"]
    assert torch.equal(out["moe.w1"], torch.stack([state[f"moe.experts.{i}.w1"] for i in range(11)]))


def test_cat_along_a_negative_dim(tmp_path) -> None:
    state = {"x.0": randn(2, 3), "x.1": randn(2, 5, seed=1)}
    out = apply(
        tmp_path,
        r"""
        - merge: {match: '^x\.(\d)$', index: '\1', to: 'x', dim: -1}
    """,
        state,
    )
    assert torch.equal(out["x"], torch.cat([state["x.0"], state["x.1"]], dim=-1))


def test_a_missing_input_is_named(tmp_path) -> None:
    message = plan_problems(
        tmp_path,
        r"""
        - merge: {match: '^(.*)\.q$', inputs: ['\1.q', '\1.k', '\1.v'], to: '\1.qkv'}
    """,
        {"a.q": randn(2), "a.k": randn(2)},
    )
    assert "steps[0].merge: 'a.qkv' needs 'a.v', which the checkpoint does not have at this step" in message


def test_a_gap_in_the_positions_is_an_error(tmp_path) -> None:
    message = plan_problems(
        tmp_path,
        r"""
        - merge: {match: '^e\.(\d)$', index: '\1', to: 'e', stack: true}
    """,
        {"e.0": randn(2), "e.2": randn(2)},
    )
    assert "'e': positions [0, 2] are not 0..1 (missing [1])" in message


def test_shapes_that_do_not_fit_are_a_plan_error(tmp_path) -> None:
    message = plan_problems(
        tmp_path,
        r"""
        - merge: {match: '^e\.(\d)$', index: '\1', to: 'e', stack: true}
    """,
        {"e.0": randn(2), "e.1": randn(3)},
    )
    assert "stack needs equal shapes, got [2], [3]" in message
