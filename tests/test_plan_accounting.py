"""The plan's accounting: every source tensor ends in an output, or a step drops it by name; nothing is lost."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import ckptx
from ckptx.errors import PlanError, PlannerBug
from ckptx.planning.context import StepOutcome
from ckptx.rules.kinds import STEP_KINDS

QKV = {"a.q": torch.zeros(2), "a.k": torch.ones(2), "a.v": torch.full((2,), 2.0)}


def _plan(write_rules: Callable[..., Path], steps: str, state: dict) -> ckptx.Plan:
    return ckptx.plan(ckptx.load_rules(write_rules(f"ckptx: 1\nsteps:\n{steps}")), state)


def test_a_tensor_merged_into_two_keys_is_an_error_not_a_loss(write_rules: Callable[..., Path]) -> None:
    steps = "  - merge: {match: '^(a)\\.(k|v)$', inputs: ['\\1.q', '\\1.\\2'], to: '\\1.q\\2'}\n"
    with pytest.raises(PlanError, match=r"'a.q' would be merged into both 'a.qk' and 'a.qv'"):
        _plan(write_rules, steps, QKV)


def test_merged_inputs_are_read_by_the_merged_key(write_rules: Callable[..., Path]) -> None:
    plan = _plan(write_rules, "  - merge: {match: '^a\\.(q|k|v)$', inputs: [a.q, a.k, a.v], to: a.qkv}\n", QKV)
    assert [(e.key, e.sources) for e in plan.entries] == [("a.qkv", ("a.q", "a.k", "a.v"))]


def test_a_replaced_tensor_is_listed_as_dropped_by_the_set_step(write_rules: Callable[..., Path]) -> None:
    plan = _plan(write_rules, "  - set: {key: a.q, value: 1, shape: [2], if_exists: replace}\n", QKV)
    assert [k for k, _ in plan.dropped] == ["a.q"] and plan.dropped[0][1].endswith("steps[0].set")


def test_dropped_tensors_name_the_step_after_renames(write_rules: Callable[..., Path]) -> None:
    plan = _plan(write_rules, "  - rename: [['^a\\.', 'b.']]\n  - drop: '^b\\.k$'\n", QKV)
    assert plan.dropped == [("b.k", plan.dropped[0][1])] and plan.dropped[0][1].endswith("steps[1].drop")


def test_copy_and_split_may_feed_one_source_to_several_outputs(write_rules: Callable[..., Path]) -> None:
    plan = _plan(
        write_rules, "  - copy: {match: '^a\\.q$', to: a.q2}\n  - split: {match: '^a\\.k$', into: [a.k0, a.k1]}\n", QKV
    )
    assert [e.key for e in plan.entries] == ["a.q", "a.q2", "a.k0", "a.k1", "a.v"]


def _losing_planner(args, step, entries, ctx):
    return StepOutcome(entries[1:], len(entries))


def _sharing_planner(args, step, entries, ctx):
    return StepOutcome([entries[0], entries[0]._replace(key="dup")] + entries[1:], 1)


@pytest.mark.parametrize(
    "planner,message",
    [
        (_losing_planner, r"source tensor 'a.q' \(1 in all\) is in no output"),
        (_sharing_planner, r"source tensor 'a.q' feeds 'a.q', 'dup'"),
    ],
)
def test_a_planner_that_breaks_the_accounting_is_a_bug_exit_3(
    write_rules, monkeypatch, run_cli, tmp_path, planner, message
) -> None:
    """A step kind whose planner loses or duplicates a tensor (a planner bug) never writes a file."""
    monkeypatch.setitem(
        STEP_KINDS,
        "drop",
        STEP_KINDS["drop"].__class__(**{**STEP_KINDS["drop"].__dict__, "plan": planner, "renames_keys": False}),
    )
    with pytest.raises(PlannerBug, match=message):
        _plan(write_rules, "  - drop: nothing\n", QKV)
    src = tmp_path / "src.pt"
    torch.save(QKV, src)
    result = run_cli(
        "convert", src, "-o", tmp_path / "out.safetensors", "-r", write_rules("ckptx: 1\nsteps: [{drop: x}]\n")
    )
    assert result.code == 3 and "planner bug" in result.err and not (tmp_path / "out.safetensors").exists()
