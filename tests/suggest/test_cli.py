"""`ckptx suggest` on the command line: exit codes, what the recipe says, where the weights and prefixes are."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from tests.helpers.models import randomized, tiny_net

from . import models
from .conftest import require

TINY = "tests.helpers.models:tiny_net"


@pytest.fixture
def tiny_state() -> dict[str, torch.Tensor]:
    return dict(randomized(tiny_net(), 0).state_dict())


def test_a_new_head_is_unmatched_exit_1_then_allowed_exit_0(run_cli, tmp_path: Path) -> None:
    require("timm", "transformers")
    src = tmp_path / "vit10.safetensors"
    save_file(models.randomize(models.timm_vit(num_classes=10), 0).state_dict(), str(src))
    rules = tmp_path / "rules.yaml"
    result = run_cli(
        "suggest", src, "--target", "tests.suggest.models:hf_vit", "--target-arg", "num_labels=5", "-o", rules
    )
    assert result.code == 1, result.out + result.err
    text = rules.read_text()
    assert "NOT MAPPED: 2 target key(s)" in text and "#   classifier.weight: float32[5, 64]" in text
    assert "2 target key(s) unmatched" in result.out

    result = run_cli(
        "suggest",
        src,
        "--target",
        "tests.suggest.models:hf_vit",
        "--target-arg",
        "num_labels=5",
        "--allow-missing",
        r"^classifier\.",
        "-o",
        rules,
        "--force",
        "--json",
    )
    assert result.code == 0, result.out + result.err
    doc = json.loads(result.out)
    assert doc["ok"] and doc["allowed_missing"] == ["classifier.weight", "classifier.bias"]
    assert sorted(doc["dropped"]) == ["head.bias", "head.weight"]  # the old 10-class head has no counterpart
    recipe = yaml.safe_load(rules.read_text())
    assert recipe["target"]["allow_missing"] == [r"^classifier\."]
    assert recipe["steps"][0]["drop"]
    out = tmp_path / "hf.safetensors"
    converted = run_cli("convert", src, "-r", rules, "-o", out, "--allow-factory", "tests.suggest.models:hf_vit")
    assert converted.code == 0, converted.out
    missing, unexpected = models.hf_vit(num_labels=5).load_state_dict(load_file(str(out)), strict=False)
    assert sorted(missing) == ["classifier.bias", "classifier.weight"] and not unexpected


@pytest.mark.parametrize(
    "args,needle",
    [
        (["nowhere.pth", "--target", TINY], "nowhere.pth: no such file"),
        (["{src}", "--target", "no_such_module_xyz:build"], "cannot import module 'no_such_module_xyz'"),
        (["{src}", "--target", TINY, "--allow-missing", "("], "invalid regex '('"),
        (["{src}", "--target", TINY, "--verify-with", TINY, "--verify-input", "2,a"], "--verify-input 2,a"),
        (["{src}", "--target", TINY, "--verify-input", "2,3"], "need --verify-with"),
    ],
)
def test_bad_input_is_one_line_exit_2(run_cli, tmp_path: Path, tiny_state, args: list[str], needle: str) -> None:
    src = tmp_path / "tiny.pth"
    torch.save(tiny_state, src)
    result = run_cli("suggest", *[a.replace("{src}", str(src)) for a in args])
    assert result.code == 2, result.out + result.err
    assert needle in result.err and "Traceback" not in result.err and len(result.err.strip().splitlines()) == 1


def test_an_existing_recipe_needs_force(run_cli, tmp_path: Path, tiny_state) -> None:
    src, rules = tmp_path / "tiny.pth", tmp_path / "rules.yaml"
    torch.save(tiny_state, src)
    rules.write_text("keep me\n")
    result = run_cli("suggest", src, "--target", TINY, "-o", rules)
    assert result.code == 2 and "already exists; pass --force" in result.err
    assert rules.read_text() == "keep me\n"


def test_lightning_checkpoint_prefix_found_and_stripped(run_cli, tmp_path: Path, tiny_state) -> None:
    src = tmp_path / "epoch=3.ckpt"
    torch.save(
        {
            "epoch": 3,
            "global_step": 120,
            "state_dict": {f"model.{k}": v for k, v in tiny_state.items()},
            "optimizer_states": [{"state": {}}],
            "lr_schedulers": [],
            "callbacks": {},
        },
        src,
    )
    result = run_cli("suggest", src, "--target", TINY, "--json")
    assert result.code == 0, result.out + result.err
    doc = json.loads(result.out)
    assert doc["extracted_from"] == "state_dict" and doc["strip_prefix"] == "model."
    assert "strip_prefix: 'model.'" in doc["recipe"] and "rename" not in doc["recipe"]


def test_prefix_added_when_every_target_key_has_it(run_cli, tmp_path: Path, tiny_state) -> None:
    src = tmp_path / "tiny.safetensors"
    save_file(tiny_state, str(src))
    result = run_cli("suggest", src, "--target", "tests.suggest.models:wrapped_tiny_net", "--json")
    assert result.code == 0, result.out + result.err
    doc = json.loads(result.out)
    assert doc["add_prefix"] == "backbone." and "add_prefix: 'backbone.'" in doc["recipe"]


def test_ema_weights_are_a_reported_alternative(run_cli, tmp_path: Path, tiny_state) -> None:
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in tiny_state.items()}
    src = tmp_path / "train.pth"
    torch.save({"state_dict": tiny_state, "state_dict_ema": ema, "optimizer": {"state": {}}}, src)
    result = run_cli("suggest", src, "--target", TINY, "--json")
    doc = json.loads(result.out)
    assert result.code == 0 and doc["extracted_from"] == "state_dict" and doc["extract_rivals"] == ["state_dict_ema"]
    assert "also fits the target as well: 'state_dict_ema'" in doc["recipe"]


def test_nested_state_dict_is_found(run_cli, tmp_path: Path, tiny_state) -> None:
    src = tmp_path / "nested.pth"
    torch.save({"checkpoint": {"weights": {"model": tiny_state}}, "meta": {"note": "x"}}, src)
    result = run_cli("suggest", src, "--target", TINY, "--json")
    assert result.code == 0 and json.loads(result.out)["extracted_from"] == "checkpoint.weights.model"


def test_verify_with_reports_the_difference(run_cli, tmp_path: Path) -> None:
    require("timm")
    from tests.real.official_convnextv2 import build_official, make_official_checkpoint, randomize_

    src = tmp_path / "atto.pt"
    make_official_checkpoint(
        randomize_(build_official("atto"), 0).eval(), src, training=False, seed=0, model_name="convnextv2_atto"
    )
    result = run_cli(
        "suggest",
        src,
        "--target",
        "ckptx.factories:convnextv2_timm",
        "--target-arg",
        "size=atto",
        "--verify-with",
        "ckptx.reference.convnextv2:build",
        "--verify-arg",
        "size=atto",
        "--json",
    )
    assert result.code == 0, result.out + result.err
    doc = json.loads(result.out)
    assert doc["verification"]["ok"] and doc["verification"]["max_abs_diff"] < 1e-4
    assert doc["verification"]["input_shape"] == [2, 3, 64, 64]
    text = run_cli(
        "suggest",
        src,
        "--target",
        "ckptx.factories:convnextv2_timm",
        "--target-arg",
        "size=atto",
        "--verify-with",
        "ckptx.reference.convnextv2:build",
        "--verify-arg",
        "size=atto",
    ).out
    assert "verification: OK" in text and "max abs diff" in text


def test_without_verification_numerics_are_not_claimed(run_cli, tmp_path: Path, tiny_state) -> None:
    src = tmp_path / "tiny.pth"
    torch.save(tiny_state, src)
    result = run_cli("suggest", src, "--target", TINY)
    assert result.code == 0
    assert "does not prove the outputs" in result.out and "outputs not compared" in result.out


def test_printed_recipe_is_valid_yaml_with_the_summary_as_comments(run_cli, tmp_path: Path, tiny_state) -> None:
    src = tmp_path / "tiny.pth"
    torch.save({"model": {f"module.{k}": v for k, v in tiny_state.items()}}, src)
    result = run_cli("suggest", src, "--target", TINY)
    assert result.code == 0
    recipe = yaml.safe_load(result.out)
    assert recipe["extract"] == "model" and recipe["steps"] == [{"strip_prefix": "module."}]
    assert "# validation against" in result.out


def test_verify_with_holds_the_source_model_under_the_checkpoint_prefix(run_cli, tmp_path: Path, tiny_state) -> None:
    """A DDP checkpoint's keys carry `module.`: the verification's source model is held under that prefix."""
    src, rules = tmp_path / "ddp.pth", tmp_path / "rules.yaml"
    torch.save({"model": {f"module.{k}": v for k, v in tiny_state.items()}, "epoch": 1}, src)
    result = run_cli("suggest", src, "--target", TINY, "--verify-with", TINY, "-o", rules, "--json")
    assert result.code == 0, result.out + result.err
    doc = json.loads(result.out)
    assert doc["verification"]["ok"] and doc["verification"]["max_abs_diff"] == 0.0
    verify = yaml.safe_load(rules.read_text())["verify"]
    assert verify["source_kwargs"] == {"factory": TINY, "prefix": "module."}
    converted = run_cli(
        "convert",
        src,
        "-r",
        rules,
        "-o",
        tmp_path / "out.safetensors",
        "--verify",
        "--allow-factory",
        TINY,
        "--allow-factory",
        "ckptx.suggestion.verify_with:prefixed_model",
    )
    assert converted.code == 0, converted.out + converted.err


def test_manifest_and_reference_checkpoint_targets(run_cli, tmp_path: Path, tiny_state) -> None:
    """Targets given as files: the recipe names them relative to itself, and `convert` finds them."""
    src = tmp_path / "tiny.pth"
    torch.save({"model": tiny_state}, src)
    reference = tmp_path / "ref" / "wrapped.safetensors"
    reference.parent.mkdir()
    save_file({f"backbone.{k}": v for k, v in tiny_state.items()}, str(reference))
    manifest = tmp_path / "ref" / "wrapped.json"
    assert run_cli("inspect", reference, "--manifest", manifest).code == 0
    (tmp_path / "rules").mkdir()
    for target, key in ((manifest, "manifest"), (reference, "checkpoint")):
        rules = tmp_path / "rules" / f"{key}.yaml"
        result = run_cli("suggest", src, "--target", target, "-o", rules)
        assert result.code == 0, result.out + result.err
        recipe = yaml.safe_load(rules.read_text())
        assert recipe["target"] == {key: f"../ref/{target.name}"}
        assert recipe["steps"] == [{"add_prefix": "backbone."}]
        converted = run_cli("convert", src, "-r", rules, "-o", tmp_path / f"{key}.safetensors")
        assert converted.code == 0 and "OK (9/9 target keys matched)" in converted.out, converted.out


def test_rows_that_do_not_reproduce_the_mapping_fall_back_to_exact_rows(
    monkeypatch, tmp_path: Path, tiny_state
) -> None:
    """The re-planning check catches a wrong row; the recipe is then written with one exact row per key."""
    import ckptx
    from ckptx.suggestion import build, generalize

    def broken(pairs, unchanged=(), *, order=None, literal=False):
        rows = generalize.rename_rows(pairs, unchanged, order=order, literal=literal)
        return rows if literal else rows[:-1]  # forget a row

    monkeypatch.setattr(build, "rename_rows", broken)
    src = tmp_path / "tiny.pth"
    torch.save(tiny_state, src)
    suggestion = ckptx.suggest(src, "tests.helpers.models:backbone_net")
    assert suggestion.report.ok
    assert any("one exact row per key" in note for note in suggestion.report.notes)
    assert r"['^fc\.weight$', 'head.fc.weight']" in suggestion.text
