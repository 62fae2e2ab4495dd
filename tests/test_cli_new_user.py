"""What a new user meets first, run as they would run it: a plain state dict, `--json` next to chatty libraries,
stopping a conversion (SIGTERM, SIGKILL), and a conversion that does not fit its target."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tests.conftest import TINY_TARGET, subprocess_env
from tests.helpers.models import tiny_net
from tests.helpers.noisy import LINE

PARTIAL = ".ckptx-partial"


def _ckptx(*args: object) -> list[str]:
    return [sys.executable, "-m", "ckptx", *map(str, args)]


def test_a_plain_state_dict_has_no_ignored_top_level_entries(run_cli, tmp_path: Path) -> None:
    src = tmp_path / "plain.pth"
    torch.save({"a": torch.ones(2), "b": torch.zeros(3)}, src)
    result = run_cli("convert", src, "-o", tmp_path / "out.safetensors")
    assert result.code == 0, result.err
    assert "ignored" not in result.out
    assert "weights at '.': 2 tensors" in result.out
    assert sorted(load_file(str(tmp_path / "out.safetensors"))) == ["a", "b"]


def test_wrapped_weights_still_name_the_entries_left_out(run_cli, ddp_checkpoint: Path, tmp_path: Path) -> None:
    result = run_cli("convert", ddp_checkpoint, "-o", tmp_path / "out.safetensors", "-r", "common/extract-state-dict")
    assert result.code == 0, result.err
    assert "ignored top-level entries: optimizer, epoch" in result.out


def test_json_is_all_stdout_holds_when_the_target_factory_logs(tmp_path: Path, safetensors_file: Path) -> None:
    """A factory logging to stdout, printing and writing to fd 1 (as mmengine and DeepSpeed do) leaves stdout JSON."""
    done = subprocess.run(
        _ckptx("convert", safetensors_file, "--dry-run", "--json", "--target", "tests.helpers.noisy:noisy_tiny_net"),
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert document["ok"] is True and document["validation"]["ok"] is True
    for how in ("logging", "print", "fd 1"):
        assert f"{LINE} ({how})" in done.stderr


def test_text_output_keeps_library_lines_off_stdout(tmp_path: Path, safetensors_file: Path) -> None:
    done = subprocess.run(
        _ckptx("convert", safetensors_file, "--dry-run", "--target", "tests.helpers.noisy:noisy_tiny_net"),
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert LINE not in done.stdout and done.stdout.startswith("source: ")


def _big_source(tmp_path: Path) -> Path:
    """~200 MB of float32: long enough to convert that it can be stopped halfway."""
    src = tmp_path / "big.safetensors"
    generator = torch.Generator().manual_seed(0)
    save_file({f"w{i}": torch.randn(1024, 1024, generator=generator) for i in range(48)}, str(src))
    return src


def _wait_for(condition, timeout: float = 120) -> None:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, "the condition never held"
        time.sleep(0.01)


def _partials(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.endswith(PARTIAL)]


def _written_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for p in _partials(folder) for f in ([p] if p.is_file() else p.rglob("*")))


def test_sigterm_cleans_up_and_says_so_as_ctrl_c_does(tmp_path: Path, write_rules) -> None:
    src = _big_source(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    rules = write_rules("ckptx: 1\nsteps:\n  - cast: {dtype: float64}\n")
    proc = subprocess.Popen(
        _ckptx("convert", src, "-r", rules, "-o", out / "model.pth"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
        cwd=tmp_path,
    )
    try:
        _wait_for(lambda: _written_bytes(out) > 0 or proc.poll() is not None)
        assert proc.poll() is None, "the conversion ended before it could be stopped"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert err == "ckptx: interrupted; nothing was written\n"
    assert list(out.iterdir()) == []


def test_a_killed_sharded_write_is_noted_with_its_bytes_in_a_dry_run_too(tmp_path: Path) -> None:
    src = _big_source(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    args = ("convert", src, "-o", out / "model.safetensors", "--max-shard-size", "40MB")
    proc = subprocess.Popen(
        _ckptx(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=subprocess_env(), cwd=tmp_path
    )
    try:
        _wait_for(lambda: _written_bytes(out) > 0 or proc.poll() is not None)
        assert proc.poll() is None, "the conversion ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    (staging,) = _partials(out)
    assert staging.is_dir()
    left = _written_bytes(out)
    assert left > 0
    note = (
        f"note: 1 temporary file(s) left by an interrupted ckptx run beside {out / 'model.safetensors.index.json'} "
        f"({left:,} bytes); nothing is writing them: remove them with `rm -rf {staging}`"
    )
    for extra in (["--dry-run"], []):
        done = subprocess.run(
            _ckptx(*args, *extra), capture_output=True, text=True, env=subprocess_env(), cwd=tmp_path, timeout=300
        )
        assert done.returncode == 0, done.stderr
        assert note in done.stdout.splitlines(), done.stdout
    assert staging.exists()  # reported, never removed


def test_a_validation_failure_prints_what_a_success_prints_and_what_failed(run_cli, tmp_path: Path) -> None:
    src = tmp_path / "extra.safetensors"
    state = dict(tiny_net().state_dict())
    save_file({**state, "extra.weight": torch.ones(2)}, str(src))
    dst = tmp_path / "out.safetensors"
    result = run_cli("convert", src, "-o", dst, "--target", TINY_TARGET)
    assert result.code == 1 and not dst.exists()
    lines = result.out.splitlines()
    assert lines[0].startswith(f"source: {src} (safetensors), weights at '.': {len(state) + 1} tensors")
    assert lines[1] == "recipe: (no recipe: tensors as they are)"
    assert lines[2] == f"plan: {len(state) + 1} tensors out, 0 dropped"
    assert lines[3] == (
        f"validation against {TINY_TARGET}(): FAILED: 1 unexpected key ({len(state)}/{len(state)} target keys fit)"
    )
    assert lines[-1] == "nothing was written"
    document = run_cli("convert", src, "-o", dst, "--target", TINY_TARGET, "--json").json
    assert document["ok"] is False and document["written"] is False
    assert document["validation"]["unexpected"][0]["key"] == "extra.weight"
    assert len(document["plan"]["entries"]) == len(state) + 1
