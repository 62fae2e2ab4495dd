"""Negative and positive rule files as case folders: each invalid case has the exact expected error text."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckptx.errors import RuleError
from ckptx.rules.loader import load_rules

CASES = Path(__file__).resolve().parents[1] / "cases" / "rules"
INVALID = sorted(p for p in (CASES / "invalid").iterdir() if p.is_dir())
VALID = sorted(p for p in (CASES / "valid").iterdir() if p.is_dir())


@pytest.mark.parametrize("case", INVALID, ids=[p.name for p in INVALID])
def test_invalid_rule_file_reports_exact_error(case: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(case)
    with pytest.raises(RuleError) as caught:
        load_rules("rule.yaml")
    assert str(caught.value) + "\n" == (case / "expected.txt").read_text(encoding="utf-8")


@pytest.mark.parametrize("case", VALID, ids=[p.name for p in VALID])
def test_valid_rule_file_loads(case: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(case)
    recipe = load_rules("rule.yaml")
    assert recipe.files[0].path == "rule.yaml"


def test_every_problem_is_reported_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(CASES / "invalid" / "several-problems")
    with pytest.raises(RuleError) as caught:
        load_rules("rule.yaml")
    assert len(caught.value.problems) == 5


def test_issue_example_builds_typed_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(CASES / "valid" / "issue-example")
    recipe = load_rules("rule.yaml")
    assert [s.op for s in recipe.steps] == [
        "drop",
        "keep",
        "strip_prefix",
        "add_prefix",
        "rename",
        "reshape",
        "permute",
        "cast",
    ]
    assert recipe.extract == ("model", "state_dict")
    assert recipe.target is not None and recipe.target.kwargs == {"model_name": "convnextv2_atto"}
    assert recipe.steps[4].where == "rule.yaml:10:5 steps[4].rename"
