"""Planning: every step type on metadata only, collisions, dead and over-broad steps, op composition."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import ckptx
from ckptx.dtypes import TensorMeta
from ckptx.errors import PlanError
from ckptx.rules.loader import load_rules

STATE = {
    "module.stem.weight": torch.zeros(8, 3, 4, 4),
    "module.stages.0.0.grn.gamma": torch.zeros(1, 1, 1, 16),
    "module.stages.0.0.pwconv1.weight": torch.zeros(16, 4),
    "module.sa1.mlp_module.layer0.weight": torch.zeros(2, 2),
    "module.bn.num_batches_tracked": torch.zeros((), dtype=torch.int64),
    "module.head.weight": torch.zeros(10, 8),
}


@pytest.fixture
def plan_with(write_rules: Callable[..., Path]):
    def plan(steps: str, state=None, target=None):
        return ckptx.plan(load_rules(write_rules(f"ckptx: 1\nsteps:\n{steps}")), state or STATE, target=target)

    return plan


def keys(plan) -> list[str]:
    return [e.key for e in plan.entries]


def test_key_untouched_by_any_step_passes_through(plan_with) -> None:
    plan = plan_with("  - drop: ['^nothing']\n")
    assert keys(plan) == list(STATE)


def test_drop_removes_matching_keys(plan_with) -> None:
    plan = plan_with("  - drop: ['num_batches_tracked$', '^module\\.head\\.']\n")
    assert "module.head.weight" not in keys(plan) and "module.bn.num_batches_tracked" not in keys(plan)
    assert [k for k, _ in plan.dropped] == ["module.bn.num_batches_tracked", "module.head.weight"]


def test_keep_drops_everything_else(plan_with) -> None:
    plan = plan_with("  - keep: ['^module\\.stages\\.']\n")
    assert keys(plan) == ["module.stages.0.0.grn.gamma", "module.stages.0.0.pwconv1.weight"]


def test_strip_prefix_only_at_start(plan_with) -> None:
    plan = plan_with("  - strip_prefix: module.\n")
    assert "sa1.mlp_module.layer0.weight" in keys(plan)


def test_strip_prefix_stacked_in_any_order(plan_with) -> None:
    state = {"_orig_mod.module.a": torch.zeros(1), "module._orig_mod.b": torch.zeros(1)}
    plan = plan_with("  - strip_prefix: [module., _orig_mod.]\n", state)
    assert keys(plan) == ["a", "b"]


def test_add_prefix_with_skip(plan_with) -> None:
    plan = plan_with("  - strip_prefix: module.\n  - add_prefix: {prefix: backbone., skip: '^head\\.'}\n")
    assert keys(plan)[0] == "backbone.stem.weight" and keys(plan)[-1] == "head.weight"


def test_rename_first_matching_row_wins_with_backreferences(plan_with) -> None:
    plan = plan_with(
        "  - strip_prefix: module.\n"
        "  - rename:\n"
        "      - ['^stages\\.(\\d+)\\.(\\d+)\\.', 'stages.\\1.blocks.\\2.']\n"
        "      - ['^stages\\.', 'never.']\n"
        "      - ['^(?P<name>head)\\.', '\\g<name>.fc.']\n"
    )
    assert "stages.0.blocks.0.grn.gamma" in keys(plan) and "head.fc.weight" in keys(plan)


def test_rename_of_one_pair_is_one_row(plan_with) -> None:
    plan = plan_with("  - rename: ['^module\\.head\\.', 'classifier.']\n")
    assert "classifier.weight" in keys(plan) and "module.stem.weight" in keys(plan)
    assert plan.entries[0].steps == ()


def test_rename_records_provenance(plan_with) -> None:
    plan = plan_with("  - rename: {from: '^module\\.head\\.', to: 'classifier.'}\n")
    entry = next(e for e in plan.entries if e.key == "classifier.weight")
    assert entry.sources == ("module.head.weight",)
    assert entry.steps[0].endswith("steps[0].rename")


def test_two_keys_renamed_onto_one_name_is_an_error_naming_both(plan_with) -> None:
    with pytest.raises(PlanError) as caught:
        plan_with("  - rename: [['^module\\.(stem|head)\\.weight$', 'x.weight']]\n")
    assert str(caught.value).endswith(
        "steps[0].rename: keys 'module.stem.weight' and 'module.head.weight' would all become 'x.weight'; "
        "make the renames distinct or drop one of them first"
    )


def test_step_matching_nothing_is_a_warning(plan_with) -> None:
    plan = plan_with("  - drop: ['^optimizer\\.']\n")
    assert [w.message for w in plan.warnings] == ["drop step matches no key"]


def test_strict_step_matching_nothing_is_an_error(plan_with) -> None:
    with pytest.raises(PlanError, match="drop step matches no key"):
        plan_with("  - {drop: ['^optimizer\\.'], strict: true}\n")


def test_dead_rename_row_is_reported(plan_with) -> None:
    plan = plan_with("  - rename: [['^module\\.', ''], ['^optimizer', 'x']]\n")
    assert any("rename pattern '^optimizer' matches no key" in w.message for w in plan.warnings)


def test_unanchored_pattern_hitting_mid_name_warns(plan_with) -> None:
    plan = plan_with("  - rename: [['module\\.', '']]\n")
    assert any("also matches inside a name: 'module.sa1.mlp_module.layer0.weight'" in w.message for w in plan.warnings)


def test_reshape_to_fixed_shape(plan_with) -> None:
    plan = plan_with("  - reshape: {match: 'grn\\.gamma$', shape: [-1]}\n")
    assert plan.expected["module.stages.0.0.grn.gamma"] == TensorMeta((16,), "float32")


def test_reshape_to_target_shape(plan_with) -> None:
    target = {"module.stages.0.0.pwconv1.weight": TensorMeta((16, 4, 1, 1), "float32")}
    plan = plan_with("  - reshape: {match: 'pwconv1\\.weight$', shape: target}\n", target=target)
    assert plan.expected["module.stages.0.0.pwconv1.weight"].shape == (16, 4, 1, 1)


def test_reshape_target_without_target_is_an_error(plan_with) -> None:
    with pytest.raises(PlanError, match="`shape: target` needs a target"):
        plan_with("  - reshape: {match: 'pwconv1\\.weight$', shape: target}\n")


def test_impossible_reshape_names_the_tensor(plan_with) -> None:
    with pytest.raises(
        PlanError, match=r"tensor 'module.head.weight': cannot reshape \[10, 8\] \(80 elements\) to \[3, -1\]"
    ):
        plan_with("  - reshape: {match: 'head', shape: [3, -1]}\n")


def test_permute_wrong_rank_names_the_tensor(plan_with) -> None:
    with pytest.raises(PlanError, match=r"tensor 'module.head.weight': permute dims \[0, 2, 1\] need a 3-d tensor"):
        plan_with("  - permute: {match: 'head', dims: [0, 2, 1]}\n")


def test_reshape_permute_reshape_compose(plan_with) -> None:
    # A flattened dense layer re-ordered from (C,H,W) to (H,W,C) input order.
    state = {"dense.weight": torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 12)}
    steps = (
        "  - reshape: {match: dense, shape: [2, 3, 2, 2]}\n"
        "  - permute: {match: dense, dims: [0, 2, 3, 1]}\n"
        "  - reshape: {match: dense, shape: [2, 12]}\n"
    )
    plan = plan_with(steps, state)
    assert plan.expected["dense.weight"].shape == (2, 12)
    assert [op.split("(")[0] for op in plan.to_dict()["entries"][0]["ops"]] == ["reshape", "permute", "reshape"]


def test_cast_leaves_integer_buffers(plan_with) -> None:
    plan = plan_with("  - cast: {dtype: bfloat16}\n")
    assert plan.expected["module.bn.num_batches_tracked"].dtype == "int64"
    assert plan.expected["module.head.weight"].dtype == "bfloat16"


def test_cast_include_integer(plan_with) -> None:
    plan = plan_with("  - cast: {dtype: float32, include_integer: true}\n")
    assert plan.expected["module.bn.num_batches_tracked"].dtype == "float32"


def test_when_has_key_skips_step(plan_with) -> None:
    plan = plan_with("  - {drop: ['^module\\.'], when: {has_key: '^optimizer'}}\n")
    assert keys(plan) == list(STATE)


def test_plan_reports_renames(plan_with) -> None:
    assert plan_with("  - strip_prefix: module.\n").renames_keys
    assert not plan_with("  - drop: ['head']\n").renames_keys
