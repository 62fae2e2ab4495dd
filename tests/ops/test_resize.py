"""resize: grow or shrink one dimension (vocabulary resizing) with zeros, the mean row, or seeded noise."""

from __future__ import annotations

import torch

from .helpers import apply, plan_problems, randn


def test_shrink_keeps_the_first_rows(tmp_path) -> None:
    state = {"embed.weight": randn(10, 4)}
    out = apply(tmp_path, "- resize: {match: '^embed\\.', size: 7}\n", state)
    assert torch.equal(out["embed.weight"], state["embed.weight"][:7])


def test_grow_with_zeros_and_mean(tmp_path) -> None:
    state = {"embed.weight": randn(10, 4), "head.weight": randn(10, 4, seed=1)}
    out = apply(
        tmp_path,
        r"""
        - resize: {match: '^embed\.', size: 13, fill: zeros}
        - resize: {match: '^head\.', size: 12, fill: mean}
    """,
        state,
    )
    assert torch.equal(out["embed.weight"], torch.cat([state["embed.weight"], torch.zeros(3, 4)]))
    mean = state["head.weight"].mean(dim=0, keepdim=True)
    assert torch.equal(out["head.weight"], torch.cat([state["head.weight"], mean, mean]))


def test_grow_with_seeded_normal_of_the_source_std(tmp_path) -> None:
    state = {"lm_head.weight": randn(6, 5, dtype=torch.bfloat16)}
    out = apply(tmp_path, "- resize: {match: '^lm_head', dim: 0, size: 9, fill: normal, seed: 3}\n", state)
    source = state["lm_head.weight"]
    noise = torch.randn(3, 5, generator=torch.Generator().manual_seed(3)) * source.float().std()
    assert torch.equal(out["lm_head.weight"], torch.cat([source, noise.to(torch.bfloat16)]))


def test_size_from_the_target_on_dim_1(tmp_path) -> None:
    state = {"w": randn(2, 3)}
    out = apply(tmp_path, "- resize: {match: '^w$', dim: 1, size: target}\n", state, target={"w": torch.zeros(2, 5)})
    assert torch.equal(out["w"], torch.cat([state["w"], torch.zeros(2, 2)], dim=1))


def test_mean_fill_of_an_integer_tensor_is_a_plan_error(tmp_path) -> None:
    message = plan_problems(tmp_path, "- resize: {match: x, size: 4, fill: mean}\n", {"x": torch.arange(2)})
    assert "fill: mean needs a floating-point tensor, got int64" in message
