"""split: one tensor into several keys, equal or given sizes, or unbound along a dimension."""

from __future__ import annotations

import torch

from .helpers import apply, plan_problems, randn


def test_fused_qkv_splits_into_q_k_v_equal_parts(tmp_path) -> None:
    state = {
        "blocks.0.attn.qkv.weight": randn(12, 4),
        "blocks.0.attn.qkv.bias": randn(12, seed=1),
        "blocks.0.norm.weight": randn(4, seed=2),
    }
    out = apply(
        tmp_path,
        r"""
        - split: {match: '^(.*)\.qkv\.(weight|bias)$', into: ['\1.q.\2', '\1.k.\2', '\1.v.\2']}
    """,
        state,
    )
    q, k, v = torch.chunk(state["blocks.0.attn.qkv.weight"], 3, dim=0)
    assert torch.equal(out["blocks.0.attn.q.weight"], q) and torch.equal(out["blocks.0.attn.v.weight"], v)
    assert torch.equal(out["blocks.0.attn.k.bias"], torch.chunk(state["blocks.0.attn.qkv.bias"], 3)[1])
    assert list(out) == [
        "blocks.0.attn.q.weight",
        "blocks.0.attn.k.weight",
        "blocks.0.attn.v.weight",
        "blocks.0.attn.q.bias",
        "blocks.0.attn.k.bias",
        "blocks.0.attn.v.bias",
        "blocks.0.norm.weight",
    ]


def test_given_sizes_along_last_dim(tmp_path) -> None:
    state = {"x": randn(3, 10)}
    out = apply(
        tmp_path,
        r"""
        - split: {match: '^x$', into: [a, b, c], dim: -1, sizes: [2, 5, 3]}
    """,
        state,
    )
    a, b, c = torch.split(state["x"], [2, 5, 3], dim=-1)
    assert torch.equal(out["a"], a) and torch.equal(out["b"], b) and torch.equal(out["c"], c)


def test_indexed_template_with_parts_and_arithmetic(tmp_path) -> None:
    state = {"layer.w": randn(8, 2)}
    out = apply(
        tmp_path,
        r"""
        - split: {match: '^layer\.w$', into: 'experts.{i + 1}.w', parts: 4}
    """,
        state,
    )
    assert list(out) == ["experts.1.w", "experts.2.w", "experts.3.w", "experts.4.w"]
    for i, piece in enumerate(torch.chunk(state["layer.w"], 4)):
        assert torch.equal(out[f"experts.{i + 1}.w"], piece)


def test_unbind_removes_the_dimension(tmp_path) -> None:
    state = {"moe.w1": randn(3, 4, 5)}
    out = apply(
        tmp_path,
        r"""
        - split: {match: '^moe\.(\w+)$', into: 'experts.{i}.\1', unbind: true, dim: 0}
    """,
        state,
    )
    for i, piece in enumerate(torch.unbind(state["moe.w1"], 0)):
        assert torch.equal(out[f"experts.{i}.w1"], piece)


def test_unequal_size_without_sizes_is_a_plan_error(tmp_path) -> None:
    message = plan_problems(tmp_path, "- split: {match: '^x$', into: [a, b, c]}\n", {"x": randn(10)})
    assert (
        "steps.yaml:3:5 steps[0].split: tensor 'x' [10]: size 10 of dim 0 does not split into 3 equal parts; "
        "give sizes" in message
    )


def test_sizes_must_add_up(tmp_path) -> None:
    message = plan_problems(tmp_path, "- split: {match: '^x$', into: [a, b], sizes: [3, 3]}\n", {"x": randn(10)})
    assert "sizes [3, 3] add up to 6, but dim 0 has size 10" in message


def test_split_into_an_existing_key_is_a_collision(tmp_path) -> None:
    message = plan_problems(tmp_path, "- split: {match: '^x$', into: [a, b]}\n", {"x": randn(4), "a": randn(2)})
    assert "would all become 'a'" in message
