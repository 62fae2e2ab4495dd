"""unsqueeze, squeeze and slice on one dimension."""

from __future__ import annotations

import torch

from .helpers import apply, plan_problems, randn


def test_unsqueeze_and_squeeze(tmp_path) -> None:
    state = {"cls_token": randn(8), "gamma": randn(1, 1, 6, seed=1)}
    out = apply(
        tmp_path,
        r"""
        - unsqueeze: {match: '^cls_token$', dim: 0}
        - unsqueeze: {match: '^cls_token$', dim: -1}
        - squeeze: {match: '^gamma$', dim: 1}
    """,
        state,
    )
    assert torch.equal(out["cls_token"], state["cls_token"].unsqueeze(0).unsqueeze(-1))
    assert torch.equal(out["gamma"], state["gamma"].squeeze(1))


def test_squeeze_of_a_dim_that_is_not_one_is_a_plan_error(tmp_path) -> None:
    message = plan_problems(tmp_path, "- squeeze: {match: '^x$', dim: 0}\n", {"x": randn(2, 1)})
    assert "tensor 'x': cannot squeeze dim 0 of shape [2, 1]: its size is not 1" in message


def test_slice_with_python_semantics(tmp_path) -> None:
    state = {"emb": randn(10, 3), "pos": randn(1, 7, 4, seed=1)}
    out = apply(
        tmp_path,
        r"""
        - slice: {match: '^emb$', dim: 0, start: 2, stop: -1, step: 3}
        - slice: {match: '^pos$', dim: 1, start: 1}
    """,
        state,
    )
    assert torch.equal(out["emb"], state["emb"][2:-1:3])
    assert torch.equal(out["pos"], state["pos"][:, 1:])


def test_an_empty_slice_or_a_bad_dim_is_a_plan_error(tmp_path) -> None:
    assert "is empty" in plan_problems(tmp_path, "- slice: {match: x, dim: 0, start: 5}\n", {"x": randn(3)})
    assert "dim 2 is out of range for a 1-d tensor" in plan_problems(
        tmp_path, "- slice: {match: x, dim: 2}\n", {"x": randn(3)}
    )
