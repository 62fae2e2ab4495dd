"""Inferred parameters (`params: {name: {infer: [...]}}`): chosen from the source by the target that validates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import ckptx
from ckptx import plan as plan_recipe
from ckptx.errors import AmbiguousVariant, NoVariantFits, ParamsUnresolved
from ckptx.rules.loader import load_rules, load_rules_text
from tests.helpers.models import tiny_net

RECIPE = """ckptx: 1
name: tiny-by-width
params:
  channels: {infer: [2, 4, 8]}
steps:
  - strip_prefix: module.
target:
  model: tests.helpers.models:TinyNet
  kwargs: {channels: '${channels}'}
"""


def _source(tmp_path: Path, channels: int) -> Path:
    path = tmp_path / f"tiny{channels}.safetensors"
    save_file({f"module.{k}": v for k, v in tiny_net(channels).state_dict().items()}, str(path))
    return path


def test_unset_inferred_param_is_the_choice_whose_target_validates(run_cli, write_rules, tmp_path: Path) -> None:
    result = run_cli("convert", _source(tmp_path, 4), "-r", write_rules(RECIPE), "--dry-run", "--json")
    assert result.code == 0, result.out
    doc = result.json
    assert (
        doc["inferred"] == {"channels": 4} and doc["validation"]["target"] == "tests.helpers.models:TinyNet(channels=4)"
    )
    assert any(n.startswith("channels=4 chosen from the source (channels among 2, 4, 8)") for n in doc["notes"])


def test_a_set_value_is_used_without_searching(run_cli, write_rules, tmp_path: Path) -> None:
    result = run_cli(
        "convert", _source(tmp_path, 4), "-r", write_rules(RECIPE), "--set", "channels=4", "--dry-run", "--json"
    )
    assert result.code == 0 and result.json["inferred"] == {} and result.json["notes"] == []


def test_a_set_value_outside_the_choices_is_refused(run_cli, write_rules, tmp_path: Path) -> None:
    result = run_cli("convert", _source(tmp_path, 4), "-r", write_rules(RECIPE), "--set", "channels=5", "--dry-run")
    assert result.code == 2
    assert "--set: channels=5 is not one of the choices declared at " in result.err
    assert result.err.rstrip().endswith("pick one, or leave channels unset to have it chosen from the source")


def test_a_source_that_fits_no_choice_lists_every_try_closest_first(run_cli, write_rules, tmp_path: Path) -> None:
    result = run_cli("convert", _source(tmp_path, 6), "-r", write_rules(RECIPE), "-o", tmp_path / "out.safetensors")
    assert result.code == 1 and not (tmp_path / "out.safetensors").exists()
    lines = result.out.splitlines()
    assert lines[0] == "choosing channels for tiny-by-width: no choice fits the source; tried 3, closest first:"
    assert lines[1:4] == [
        f"  channels={c}: 2/9 target keys fit (7 with another shape, 0 missing), 0 unexpected" for c in (2, 4, 8)
    ]
    assert lines[-1] == "nothing was written"


def test_the_json_report_of_a_failed_search_has_every_attempt(run_cli, write_rules, tmp_path: Path) -> None:
    result = run_cli("convert", _source(tmp_path, 6), "-r", write_rules(RECIPE), "--dry-run", "--json")
    doc = result.json
    assert result.code == 1 and doc["ok"] is False
    assert [a["values"] for a in doc["variants"]["attempts"]] == [{"channels": c} for c in (2, 4, 8)]
    assert all(a["mismatched"] == 7 and a["fitting"] == 2 and not a["ok"] for a in doc["variants"]["attempts"])


def test_two_choices_that_fit_but_convert_differently_are_ambiguous(tmp_path: Path) -> None:
    recipe = load_rules_text(
        """ckptx: 1
name: tiny-halved
params: {scale: {infer: [half, full]}}
steps:
  - strip_prefix: module.
  - {scale: {match: '^conv', by: 0.5}, when: {param: {scale: half}}}
target: {model: 'tests.helpers.models:TinyNet'}
""",
        "r.yaml",
    )
    with pytest.raises(AmbiguousVariant) as failed:
        ckptx.convert(_source(tmp_path, 4), None, recipe, dry_run=True)
    assert str(failed.value).startswith(
        "choosing scale for tiny-halved: 2 choices fit the source (scale=half; scale=full); pass --set to pick one"
    )


def test_choices_that_convert_alike_for_a_live_model_need_no_choosing(tmp_path: Path) -> None:
    """Against a fixed model the width only names the recipe's own target: every choice plans the same."""
    model = tiny_net(4)
    recipe = load_rules_text(RECIPE.replace("[2, 4, 8]", "[4, 40]"), "r.yaml")
    report = ckptx.load_into(model, _source(tmp_path, 4), recipe)
    assert report.ok and report.matched == len(model.state_dict())


def test_load_into_chooses_against_the_live_model(tmp_path: Path) -> None:
    model = tiny_net(8)
    with pytest.raises(NoVariantFits):
        ckptx.load_into(model, _source(tmp_path, 4), load_rules_text(RECIPE.replace("[2, 4, 8]", "[2, 8]"), "r.yaml"))


def test_planning_a_recipe_still_to_choose_names_the_parameter(tmp_path: Path) -> None:
    with pytest.raises(ParamsUnresolved) as failed:
        plan_recipe(load_rules_text(RECIPE, "r.yaml"), _source(tmp_path, 4))
    assert "r.yaml:4:13 params.channels: parameter 'channels' is chosen from the source (one of 2, 4, 8)" in str(
        failed.value
    )
    assert "pass --set channels=..." in str(failed.value)


def test_a_pending_recipe_keeps_the_placeholder_and_lists_what_is_inferred() -> None:
    recipe = load_rules_text(RECIPE, "r.yaml")
    assert [(p.name, p.choices) for p in recipe.inferred] == [("channels", (2, 4, 8))]
    assert recipe.target is not None and recipe.target.kwargs == {"channels": "${channels}"}
    assert (
        recipe.resolve({"channels": 8}).target.kwargs == {"channels": 8}
        and not recipe.resolve({"channels": 8}).inferred
    )


def test_rules_show_resolved_keeps_the_declaration_and_loads_back_pending(run_cli, write_rules, tmp_path: Path) -> None:
    result = run_cli("rules", "show", write_rules(RECIPE), "--resolved", "--json")
    assert result.code == 0, result.err
    flat = result.json["resolved"]
    assert flat["params"] == {"channels": {"infer": [2, 4, 8]}} and flat["target"]["kwargs"] == {
        "channels": "${channels}"
    }
    shown = run_cli("rules", "show", write_rules(RECIPE), "--resolved").out.split("\n", 1)[1]
    again = run_cli("convert", _source(tmp_path, 8), "-r", write_rules(shown, name="flat.yaml"), "--dry-run", "--json")
    assert again.json["inferred"] == {"channels": 8}


def test_rules_show_resolved_with_a_value_substitutes_it(run_cli, write_rules) -> None:
    flat = run_cli("rules", "show", write_rules(RECIPE), "--resolved", "--set", "channels=2", "--json").json["resolved"]
    assert "params" not in flat and flat["target"]["kwargs"] == {"channels": 2}


def test_a_child_recipe_can_fix_an_inferred_parent_parameter(write_rules) -> None:
    parent = write_rules(RECIPE, name="parent.yaml")
    child = write_rules(f"ckptx: 1\nname: child\nextends: {parent.name}\nparams: {{channels: 8}}\n", name="child.yaml")
    recipe = load_rules(child)
    assert not recipe.inferred and recipe.target is not None and recipe.target.kwargs == {"channels": 8}


@pytest.mark.parametrize(
    "declaration, message",
    [
        ("{infer: []}", "params.channels"),
        ("{infer: [2, 4], default: 2}", "params.channels"),
        ("{choices: [2, 4]}", "params.channels"),
    ],
)
def test_a_malformed_declaration_is_a_schema_error_at_its_line(write_rules, declaration: str, message: str) -> None:
    from ckptx.errors import RuleError

    with pytest.raises(RuleError) as failed:
        load_rules(write_rules(RECIPE.replace("{infer: [2, 4, 8]}", declaration)))
    assert any("rules.yaml:4:" in p.where and message in p.where for p in failed.value.problems), failed.value


def test_reversing_a_recipe_still_to_choose_names_the_parameter() -> None:
    from ckptx.conversion.reverse import reverse_recipe

    with pytest.raises(
        ParamsUnresolved, match="parameter 'channels' is chosen from the source .* and reversing cannot"
    ):
        reverse_recipe(load_rules_text(RECIPE, "r.yaml"))


def test_apply_in_memory_chooses_against_the_given_target() -> None:
    from ckptx.conversion.in_memory import apply as apply_in_memory

    state = {f"module.{k}": v for k, v in tiny_net(2).state_dict().items()}
    out = apply_in_memory(load_rules_text(RECIPE, "r.yaml"), state, tiny_net(2))
    assert sorted(out) == sorted(tiny_net(2).state_dict()) and torch.equal(out["fc.weight"], state["module.fc.weight"])


def test_diff_chooses_against_b(run_cli, write_rules, tmp_path: Path) -> None:
    result = run_cli(
        "diff",
        _source(tmp_path, 8),
        "tests.helpers.models:TinyNet",
        "--target-arg",
        "channels=8",
        "-r",
        write_rules(RECIPE),
        "--json",
    )
    assert result.code == 0 and result.json["ok"], result.out
