"""The command line: exit codes, one-line errors, --json documents, and each subcommand."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import TINY_TARGET, subprocess_env
from tests.helpers.models import tiny_net

STRIP = "ckptx: 1\nname: strip\nextract: model\nsteps: [{strip_prefix: module.}]\n"


def test_convert_ok_exit_0(run_cli, tmp_path: Path, ddp_checkpoint: Path, write_rules: Callable[..., Path]) -> None:
    dst = tmp_path / "out.safetensors"
    result = run_cli("convert", ddp_checkpoint, "-r", write_rules(STRIP), "-o", dst, "--target", TINY_TARGET)
    assert result.code == 0, result.err
    assert "validation against tests.helpers.models:tiny_net(): OK (9/9 target keys matched)" in result.out
    assert "ignored top-level entries: optimizer, epoch" in result.out
    assert len(load_file(str(dst))) == 9


def test_target_arg_values_are_yaml_scalars(
    run_cli, tmp_path: Path, ddp_checkpoint: Path, write_rules: Callable[..., Path]
) -> None:
    result = run_cli(
        "convert",
        ddp_checkpoint,
        "-r",
        write_rules(STRIP),
        "--dry-run",
        "--target",
        TINY_TARGET,
        "--target-arg",
        "channels=5",
    )
    assert result.code == 1
    assert "conv.weight: have [4, 3, 3, 3], target wants [5, 3, 3, 3]" in result.out


def test_validation_failure_exit_1_and_nothing_written(
    run_cli, tmp_path: Path, ddp_checkpoint: Path, write_rules: Callable[..., Path]
) -> None:
    dst = tmp_path / "out.safetensors"
    result = run_cli(
        "convert", ddp_checkpoint, "-r", write_rules(STRIP.replace("module.", "x.")), "-o", dst, "--target", TINY_TARGET
    )
    assert result.code == 1
    assert result.out.endswith("nothing was written\n")
    assert not dst.exists()


def test_bad_input_is_one_line_exit_2_without_traceback(
    run_cli, tmp_path: Path, ddp_checkpoint: Path, write_rules: Callable[..., Path]
) -> None:
    dst = tmp_path / "out.safetensors"
    dst.write_bytes(b"x")
    result = run_cli("convert", ddp_checkpoint, "-r", write_rules(STRIP), "-o", dst)
    assert result.code == 2
    assert result.err == f"ckptx: error: {dst}: already exists; pass --force to overwrite it\n"
    assert result.out == ""


def test_debug_shows_traceback(run_cli, tmp_path: Path, ddp_checkpoint: Path, write_rules: Callable[..., Path]) -> None:
    dst = tmp_path / "out.safetensors"
    dst.write_bytes(b"x")
    result = run_cli("convert", ddp_checkpoint, "-r", write_rules(STRIP), "-o", dst, "--debug")
    assert result.code == 2 and "Traceback" in result.err


def test_rule_errors_are_listed_together(run_cli, ddp_checkpoint: Path, write_rules: Callable[..., Path]) -> None:
    rules = write_rules("ckptx: 1\nsteps:\n  - dropp: x\n  - cast: {dtype: int4}\n")
    result = run_cli("convert", ddp_checkpoint, "-r", rules, "--dry-run")
    assert result.code == 2
    lines = result.err.splitlines()
    assert lines[0] == "ckptx: error: 2 problems"
    assert lines[1].endswith("rules.yaml:3:5 steps[0].dropp: unknown key 'dropp'; did you mean 'drop'?")
    assert "Traceback" not in result.err


def test_usage_error_exit_2(run_cli) -> None:
    result = run_cli("convert")
    assert result.code == 2 and "required" in result.err


def test_unsafe_global_error_names_flags(run_cli, args_checkpoint: Path, write_rules: Callable[..., Path]) -> None:
    result = run_cli("convert", args_checkpoint, "-r", write_rules(STRIP), "--dry-run")
    assert result.code == 2 and "--allow-global argparse.Namespace" in result.err
    ok = run_cli(
        "convert", args_checkpoint, "-r", write_rules(STRIP), "--dry-run", "--allow-global", "argparse.Namespace"
    )
    assert ok.code == 0, ok.err


def test_json_error_document(run_cli, tmp_path: Path) -> None:
    result = run_cli("inspect", tmp_path / "missing.pth", "--json")
    assert result.code == 2
    assert result.json["error"]["message"] == f"{tmp_path / 'missing.pth'}: no such file"
    assert result.json["error"]["exit_code"] == 2


def test_json_convert_document(run_cli, tmp_path: Path, ddp_checkpoint: Path, write_rules: Callable[..., Path]) -> None:
    result = run_cli(
        "convert", ddp_checkpoint, "-r", write_rules(STRIP), "-o", tmp_path / "o.pth", "--json", "--target", TINY_TARGET
    )
    doc = result.json
    assert doc["ok"] and doc["written"] and doc["validation"]["matched"] == 9
    assert doc["plan"]["entries"][0] == {
        "key": "conv.weight",
        "sources": ["module.conv.weight"],
        "ops": [],
        "shape": [4, 3, 3, 3],
        "dtype": "float32",
        "steps": [doc["plan"]["entries"][0]["steps"][0]],
    }


def test_dry_run_prints_plan_table(
    run_cli, tmp_path: Path, ddp_checkpoint: Path, write_rules: Callable[..., Path]
) -> None:
    rules = write_rules(STRIP.replace("]", ", {cast: {dtype: float16}}]"))
    result = run_cli("convert", ddp_checkpoint, "-r", rules, "-o", tmp_path / "o.safetensors", "--dry-run")
    assert result.code == 0
    lines = result.out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("target key"))
    assert lines[header].split() == ["target", "key", "shape", "dtype", "from", "ops"]
    assert lines[header + 2].split() == ["conv.weight", "4x3x3x3", "float16", "module.conv.weight", "cast(float16)"]
    assert lines[-1] == "dry run: nothing was written"
    assert not (tmp_path / "o.safetensors").exists()


def test_inspect_shows_structure_and_writes_manifest(run_cli, tmp_path: Path, ddp_checkpoint: Path) -> None:
    manifest = tmp_path / "m.json"
    result = run_cli("inspect", ddp_checkpoint, "--extract", "model", "--manifest", manifest)
    assert result.code == 0
    assert "  optimizer: dict (2 entries, 0 tensors)" in result.out
    assert "weights at 'model': 9 tensors, 144 elements (parameters and buffers)" in result.out
    assert json.loads(manifest.read_text())["tensors"]["module.fc.bias"] == {"shape": [3], "dtype": "float32"}


def test_manifest_as_target(run_cli, tmp_path: Path, ddp_checkpoint: Path, write_rules: Callable[..., Path]) -> None:
    manifest = tmp_path / "m.json"
    run_cli("inspect", ddp_checkpoint, "--extract", "model", "--manifest", manifest)
    result = run_cli(
        "convert", ddp_checkpoint, "-r", write_rules("ckptx: 1\nextract: model\n"), "--dry-run", "--target", manifest
    )
    assert result.code == 0 and "OK (9/9 target keys matched)" in result.out


def test_diff_identical_exit_0(
    run_cli, ddp_checkpoint: Path, safetensors_file: Path, write_rules: Callable[..., Path]
) -> None:
    result = run_cli("diff", ddp_checkpoint, safetensors_file, "-r", write_rules(STRIP))
    assert result.code == 0 and "identical keys, shapes and dtypes" in result.out


def test_diff_reports_differences_exit_1(run_cli, ddp_checkpoint: Path, safetensors_file: Path) -> None:
    result = run_cli("diff", ddp_checkpoint, safetensors_file, "--json")
    assert result.code == 1
    assert len(result.json["unexpected"]) == 9 and len(result.json["missing"]) == 9


def test_lint_ok_and_failed(run_cli, write_rules: Callable[..., Path]) -> None:
    good = write_rules(STRIP, "good.yaml")
    bad = write_rules("ckptx: 1\nsteps: [{drop: ['(']}]\n", "bad.yaml")
    result = run_cli("lint", good, bad)
    assert result.code == 2
    assert f"{good}: ok (1 steps)" in result.out
    assert (
        "bad.yaml:2:17 steps[0].drop[0]: invalid regex '(': missing ), unterminated subpattern at position 0"
        in result.out
    )


def test_lint_warns_about_unanchored_and_unescaped_patterns(run_cli, write_rules: Callable[..., Path]) -> None:
    rules = write_rules("ckptx: 1\nsteps: [{rename: [['module.', '']]}]\n")
    result = run_cli("lint", rules)
    assert result.code == 0
    assert "pattern 'module.' is not anchored" in result.out
    assert "pattern 'module.' has an unescaped '.'" not in result.out  # the dot is at the end: not between words


def test_lint_with_source_reports_dead_steps(run_cli, ddp_checkpoint: Path, write_rules: Callable[..., Path]) -> None:
    rules = write_rules("ckptx: 1\nextract: model\nsteps: [{drop: ['^optimizer\\.']}]\n")
    result = run_cli("lint", rules, "--source", ddp_checkpoint)
    assert "steps[0].drop: drop step matches no key" in result.out


def test_console_script_entry_point_exit_code(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ckptx", "inspect", str(tmp_path / "nope.pth")],
        capture_output=True,
        text=True,
        env=subprocess_env(),
    )
    assert proc.returncode == 2
    assert proc.stderr == f"ckptx: error: {tmp_path / 'nope.pth'}: no such file\n"


def test_pth_output_loads_with_torch(
    run_cli, tmp_path: Path, ddp_checkpoint: Path, tiny_state: dict, write_rules: Callable[..., Path]
) -> None:
    dst = tmp_path / "o.pt"
    assert run_cli("convert", ddp_checkpoint, "-r", write_rules(STRIP), "-o", dst).code == 0
    loaded = torch.load(dst, weights_only=True)
    assert all(torch.equal(loaded[k], v) for k, v in tiny_state.items())


def test_interrupt_exit_130_and_nothing_written(
    run_cli, tmp_path: Path, ddp_checkpoint: Path, write_rules: Callable[..., Path]
) -> None:
    dst = tmp_path / "o.safetensors"
    result = run_cli(
        "convert",
        ddp_checkpoint,
        "-r",
        write_rules(STRIP),
        "-o",
        dst,
        "--target",
        "tests.helpers.models:interrupting_factory",
    )
    assert result.code == 130
    assert result.err == "ckptx: interrupted; nothing was written\n"
    assert not dst.exists()


def test_verify_json_with_nan_source_outputs_is_valid_json_and_blames_the_source(
    tmp_path: Path, tiny_state: dict, write_rules, run_cli
) -> None:
    """NaN weights: the source model itself outputs NaN, which --verify reports in one line as the source's fault;
    the JSON stays strict JSON (no bare NaN)."""
    src = tmp_path / "nan.safetensors"
    save_file(
        {k: (v.float() * float("nan")).to(v.dtype) if v.is_floating_point() else v for k, v in tiny_state.items()},
        str(src),
    )
    rules = write_rules(
        "ckptx: 1\ntarget: {model: 'tests.helpers.models:TinyNet'}\n"
        "verify: {source_model: 'tests.helpers.models:TinyNet', input_shape: [2, 3, 8, 8]}\nsteps: []\n"
    )
    result = run_cli("convert", src, "-r", rules, "-o", tmp_path / "out.safetensors", "--verify", "--json")
    doc = json.loads(result.out, parse_constant=lambda name: pytest.fail(f"bare {name} in JSON"))
    assert (
        result.code == 2 and "itself outputs" in doc["error"]["message"] and not (tmp_path / "out.safetensors").exists()
    )


def test_inspect_counts_tensors_nested_in_an_optimizer_state(tmp_path: Path, tiny_state: dict, run_cli) -> None:
    model = tiny_net()
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    path = tmp_path / "train.pth"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
    moments = sum(torch.is_tensor(v) for s in optimizer.state_dict()["state"].values() for v in s.values())
    result = run_cli("inspect", path)
    assert f"optimizer: dict (2 entries, {moments} tensors)" in result.out and moments > 10
    assert "elements (parameters and buffers)" in result.out


def test_explain_names_the_rule_row_that_made_each_key(run_cli, ddp_checkpoint: Path, write_rules, tmp_path) -> None:
    rules = write_rules(
        "ckptx: 1\nextract: [model]\nsteps:\n  - strip_prefix: module.\n"
        "  - rename: [['^conv\\.', 'stem.'], ['^fc\\.', 'head.']]\n"
    )
    result = run_cli("convert", ddp_checkpoint, "-r", rules, "-o", tmp_path / "o.safetensors", "--explain")
    row = next(line for line in result.out.splitlines() if line.startswith("stem.weight"))
    assert "steps[0].strip_prefix" in row and "rules.yaml:5:14 steps[1].rename[0]" in row
    assert "(unchanged)" not in row and result.code == 0


def test_verify_adapts_the_source_keys_with_source_rules(run_cli, ddp_checkpoint: Path, write_rules, tmp_path) -> None:
    """A DDP-prefixed checkpoint verified against a plain source model: `source_rules` strips the prefix; without
    them the failure is one line that says what to add."""
    body = (
        "ckptx: 1\nextract: [model]\nsteps: [{strip_prefix: module.}]\n"
        "target: {model: 'tests.helpers.models:TinyNet'}\n"
        "verify: {source_model: 'tests.helpers.models:TinyNet', input_shape: [2, 3, 8, 8]%s}\n"
    )
    plain = run_cli(
        "convert",
        ddp_checkpoint,
        "-r",
        write_rules(body % "", "plain.yaml"),
        "-o",
        tmp_path / "a.safetensors",
        "--verify",
    )
    assert plain.code == 2 and len(plain.err.splitlines()) == 1
    assert "missing (e.g. 'conv.weight')" in plain.err and "source_rules: [common/strip-module-prefix]" in plain.err
    adapted = run_cli(
        "convert",
        ddp_checkpoint,
        "-r",
        write_rules(body % ", source_rules: common/strip-module-prefix", "adapted.yaml"),
        "-o",
        tmp_path / "b.safetensors",
        "--verify",
    )
    assert adapted.code == 0, adapted.err
    assert "verification: OK" in adapted.out
