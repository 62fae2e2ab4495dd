"""scale, copy and set."""

from __future__ import annotations

import torch

from .helpers import apply, plan_problems, randn


def test_scale_multiplies_floating_tensors_only(tmp_path) -> None:
    state = {"a.weight": randn(3, dtype=torch.float16), "a.count": torch.tensor(4)}
    out = apply(tmp_path, "- scale: {match: '^a\\.', by: 0.125}\n", state)
    assert torch.equal(out["a.weight"], state["a.weight"] * 0.125) and out["a.weight"].dtype == torch.float16
    assert torch.equal(out["a.count"], torch.tensor(4))


def test_copy_keeps_the_original_and_adds_a_second_name(tmp_path) -> None:
    state = {"embed.weight": randn(5, 2), "x": randn(1)}
    out = apply(tmp_path, "- copy: {match: '^embed\\.(weight)$', to: 'lm_head.\\1'}\n", state)
    assert list(out) == ["embed.weight", "lm_head.weight", "x"]
    assert torch.equal(out["lm_head.weight"], state["embed.weight"])


def test_set_adds_missing_num_batches_tracked_per_batch_norm(tmp_path) -> None:
    state = {
        "bn1.running_mean": randn(2),
        "bn1.running_var": randn(2),
        "bn2.running_var": randn(2),
        "bn2.num_batches_tracked": torch.tensor(7),
    }
    out = apply(
        tmp_path,
        r"""
        - set: {match: '^(.*)\.running_var$', key: '\1.num_batches_tracked', value: 0, dtype: int64, if_exists: keep}
    """,
        state,
    )
    assert list(out) == [
        "bn1.running_mean",
        "bn1.running_var",
        "bn1.num_batches_tracked",
        "bn2.running_var",
        "bn2.num_batches_tracked",
    ]
    assert (
        torch.equal(out["bn1.num_batches_tracked"], torch.tensor(0))
        and out["bn1.num_batches_tracked"].dtype == torch.int64
    )
    assert torch.equal(out["bn2.num_batches_tracked"], torch.tensor(7))


def test_set_a_literal_key_with_a_shape_and_replace(tmp_path) -> None:
    state = {"logit_scale": torch.tensor(1.0), "w": randn(2)}
    out = apply(
        tmp_path,
        r"""
        - set: {key: logit_scale, value: 4.6052, if_exists: replace}
        - set: {key: mask, value: true, dtype: bool, shape: [2, 3]}
    """,
        state,
    )
    assert torch.equal(out["logit_scale"], torch.tensor(4.6052))
    assert torch.equal(out["mask"], torch.ones(2, 3, dtype=torch.bool)) and list(out)[-1] == "mask"


def test_set_of_an_existing_key_is_an_error_by_default(tmp_path) -> None:
    message = plan_problems(tmp_path, "- set: {key: w, value: 0}\n", {"w": randn(2)})
    assert "'w' already exists; add if_exists: keep (leave it) or if_exists: replace" in message


def test_set_with_the_targets_shape(tmp_path) -> None:
    out = apply(
        tmp_path,
        "- set: {key: pos, value: 0.5, shape: target}\n",
        {"w": randn(2)},
        target={"w": torch.zeros(2), "pos": torch.zeros(1, 3)},
    )
    assert torch.equal(out["pos"], torch.full((1, 3), 0.5))
