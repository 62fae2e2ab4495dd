"""resample_pos_embed and adapt_in_channels against hand-written torch references of timm's numerics."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .helpers import apply, plan_problems, randn


def _reference_resample(posemb: torch.Tensor, old: tuple[int, int], new: tuple[int, int], prefix: int) -> torch.Tensor:
    head, grid = posemb[:, :prefix], posemb[:, prefix:]
    grid = grid.float().reshape(1, *old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new, mode="bicubic", align_corners=False, antialias=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], -1).to(posemb.dtype)
    return torch.cat([head, grid], dim=1)


def test_class_token_and_a_square_grid_to_an_explicit_grid(tmp_path) -> None:
    state = {"pos_embed": randn(1, 1 + 14 * 14, 8)}
    out = apply(tmp_path, "- resample_pos_embed: {match: '^pos_embed$', prefix_tokens: 1, grid: [16, 16]}\n", state)
    assert torch.equal(out["pos_embed"], _reference_resample(state["pos_embed"], (14, 14), (16, 16), 1))


def test_registers_and_class_token_with_a_grid_from_the_target(tmp_path) -> None:
    state = {"pos_embed": randn(1, 5 + 4 * 4, 6)}
    out = apply(
        tmp_path,
        "- resample_pos_embed: {match: '^pos_embed$', prefix_tokens: 5}\n",
        state,
        target={"pos_embed": torch.zeros(1, 5 + 7 * 7, 6)},
    )
    assert torch.equal(out["pos_embed"], _reference_resample(state["pos_embed"], (4, 4), (7, 7), 5))


def test_non_square_source_grid_and_2d_embedding_in_bfloat16(tmp_path) -> None:
    state = {"pos": randn(2 + 3 * 5, 4, dtype=torch.bfloat16)}
    out = apply(
        tmp_path, "- resample_pos_embed: {match: pos, prefix_tokens: 2, source_grid: [3, 5], grid: [6, 4]}\n", state
    )
    expected = _reference_resample(state["pos"].unsqueeze(0), (3, 5), (6, 4), 2).squeeze(0)
    assert out["pos"].dtype == torch.bfloat16 and torch.equal(out["pos"], expected)


def test_same_grid_is_left_untouched(tmp_path) -> None:
    state = {"pos": randn(1, 10, 4)}
    out = apply(tmp_path, "- resample_pos_embed: {match: pos, prefix_tokens: 1, grid: [3, 3]}\n", state)
    assert torch.equal(out["pos"], state["pos"])


def test_prefix_tokens_are_never_guessed(tmp_path) -> None:
    message = plan_problems(
        tmp_path, "- resample_pos_embed: {match: pos, prefix_tokens: 0, grid: [4, 4]}\n", {"pos": randn(1, 1 + 9, 4)}
    )
    assert "the source has 10 grid tokens, not a square grid; give source_grid: [height, width]" in message


def _reference_adapt(weight: torch.Tensor, channels: int) -> torch.Tensor:
    w = weight.float()
    if channels == 1:
        return w.sum(dim=1, keepdim=True).to(weight.dtype)
    repeat = math.ceil(channels / 3)
    return (torch.cat([w] * repeat, dim=1)[:, :channels] * (3 / channels)).to(weight.dtype)


def test_adapt_rgb_stem_to_one_four_and_seven_channels(tmp_path) -> None:
    for channels in (1, 4, 7):
        state = {"stem.conv.weight": randn(8, 3, 3, 3, seed=channels, dtype=torch.float16)}
        out = apply(
            tmp_path, f"- adapt_in_channels: {{match: '^stem\\.conv\\.weight$', channels: {channels}}}\n", state
        )
        assert torch.equal(out["stem.conv.weight"], _reference_adapt(state["stem.conv.weight"], channels)), channels


def test_adapt_space_to_depth_stem_to_one_channel_and_from_the_target(tmp_path) -> None:
    weight = randn(4, 12, 2, 2)
    out = apply(tmp_path, "- adapt_in_channels: {match: w, channels: 1}\n", {"w": weight})
    assert torch.equal(out["w"], weight.reshape(4, 4, 3, 2, 2).sum(dim=2))
    out = apply(
        tmp_path,
        "- adapt_in_channels: {match: w, channels: target}\n",
        {"w": randn(2, 3, 1, 1)},
        target={"w": torch.zeros(2, 5, 1, 1)},
    )
    assert out["w"].shape == (2, 5, 1, 1)


def test_adapt_of_a_non_conv_weight_is_a_plan_error(tmp_path) -> None:
    message = plan_problems(tmp_path, "- adapt_in_channels: {match: w, channels: 4}\n", {"w": randn(3, 3)})
    assert "adapt_in_channels needs a 4-d conv weight (O, I, kH, kW), got [3, 3]" in message
