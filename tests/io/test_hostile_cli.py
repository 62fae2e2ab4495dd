"""What the CLI prints of hostile files: escaped keys, one error line, warnings as notes, stale partial files."""

from __future__ import annotations

import fcntl
import json
import os
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ckptx.io.write import atomic
from ckptx.text import printable, shown

EVIL = "w\x1b[2J\x1b]0;owned\x07\r\nforged  row\u202e\\"


def _control_free(text: str) -> bool:
    return all(c == "\n" or c.isprintable() for c in text)


def test_shown_escapes_everything_unprintable_and_backslashes() -> None:
    assert shown(EVIL) == "w\\x1b[2J\\x1b]0;owned\\x07\\r\\nforged  row\\u202e\\\\"
    assert shown("conv.weight") == "conv.weight" and shown("ünïcode") == "ünïcode"
    assert shown("\ud800") == "\\ud800"
    assert printable("a\nb\x1b") == "a\nb\\x1b" and printable("a\nb", keep_lines=False) == "a\\nb"


def test_inspect_escapes_keys_and_metadata(tmp_path: Path, run_cli) -> None:
    path = tmp_path / "evil.safetensors"
    save_file({EVIL: torch.ones(1), "ok": torch.ones(1)}, str(path), metadata={"m\x1b": "v\r\n"})
    result = run_cli("inspect", path)
    assert result.code == 0 and _control_free(result.out)
    assert shown(EVIL) in result.out and "m\\x1b=v\\r\\n" in result.out
    assert not any(line.startswith("forged") for line in result.out.splitlines())
    assert json.loads(run_cli("inspect", path, "--json").out)["tensors"][EVIL]  # JSON keeps the key exactly


def test_plan_table_and_diff_escape_keys(tmp_path: Path, run_cli, write_rules) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({EVIL: torch.ones(1)}, str(a))
    save_file({"other": torch.ones(1)}, str(b))
    rules = write_rules("ckptx: 1\nsteps:\n  - rename: {from: '^x', to: 'y'}\n")
    plan = run_cli("convert", a, "-r", rules, "--dry-run")
    diff = run_cli("diff", a, b)
    for result in (plan, diff):
        assert _control_free(result.out + result.err) and shown(EVIL) in result.out


def test_error_about_a_hostile_key_is_one_escaped_line(tmp_path: Path, run_cli) -> None:
    path = tmp_path / "evil.pth"
    torch.save({EVIL: torch.zeros(1).expand(100)}, path)
    result = run_cli("inspect", path)
    assert result.code == 2 and result.out == ""
    assert result.err.count("\n") == 1 and _control_free(result.err)
    assert f"tensor '{shown(EVIL)}' is a view" in result.err


def test_warnings_during_a_read_become_notes_and_errors_stay_one_line(tmp_path: Path, run_cli, monkeypatch) -> None:
    import ckptx.io.read.open as opener

    real = opener.open_source

    def noisy(*args, **kwargs):
        warnings.warn("TypedStorage is deprecated\nsecond line", UserWarning, stacklevel=1)
        return real(*args, **kwargs)

    monkeypatch.setattr(opener, "open_source", noisy)
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.ones(1)}, str(good))
    result = run_cli("inspect", good)
    assert result.code == 0 and result.err == "note: UserWarning: TypedStorage is deprecated\n"
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{]")
    result = run_cli("inspect", bad)
    assert result.code == 2 and result.err.count("\n") == 1 and result.err.startswith("ckptx: error: ")


def test_warnings_filtered_as_errors_still_surface(tmp_path: Path, run_cli, monkeypatch) -> None:
    import ckptx.io.read.open as opener

    def noisy(*args, **kwargs):
        warnings.warn("boom", UserWarning, stacklevel=1)

    monkeypatch.setattr(opener, "open_source", noisy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = run_cli("inspect", tmp_path / "x.pth")
    assert result.code == 3 and "UserWarning: boom" in result.err


def _partial(folder: Path, dst: str, age: float) -> Path:
    path = folder / f".{dst}.abc123{atomic.TEMP_SUFFIX}"
    path.write_bytes(b"half a checkpoint")
    os.utime(path, (time.time() - age, time.time() - age))
    return path


def test_convert_reports_stale_partials_but_not_live_ones(tmp_path: Path, run_cli, safetensors_file: Path) -> None:
    stale = _partial(tmp_path, "out.safetensors", age=3600)
    live = tmp_path / f".out.safetensors.live{atomic.TEMP_SUFFIX}"
    live.write_bytes(b"being written")
    os.utime(live, (time.time() - 3600,) * 2)
    held = os.open(live, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)  # what a running ckptx holds while it writes
    try:
        result = run_cli(
            "convert", safetensors_file, "-o", tmp_path / "out.safetensors", "-r", "common/strip-module-prefix"
        )
    finally:
        os.close(held)
    assert result.code == 0, result.err
    notes = [line for line in result.out.splitlines() if "interrupted ckptx run" in line]
    assert notes == [
        f"note: 1 temporary file(s) left by an interrupted ckptx run beside {tmp_path / 'out.safetensors'} "
        f"(17 bytes); nothing is writing them: remove them with `rm -rf {stale}`"
    ]
    assert stale.exists() and live.exists()  # reported, never deleted


def test_own_partial_file_is_locked_while_writing(tmp_path: Path) -> None:
    dst = tmp_path / "x.safetensors"
    with atomic.atomic_output(dst) as out:
        out.write(b"x")
        mine = next(tmp_path.glob(f".x.safetensors.*{atomic.TEMP_SUFFIX}"))
        os.utime(mine, (0, 0))
        assert atomic.stale_partials(dst) == []


@pytest.mark.parametrize(
    "payload", [b"PK\x03\x04" + bytes(100), b"\x80\x02garbage", b"\x10\x00\x00\x00\x00\x00\x00\x00{}"]
)
def test_malformed_source_writes_nothing(tmp_path: Path, run_cli, payload: bytes) -> None:
    src = tmp_path / "src.pth"
    src.write_bytes(payload)
    result = run_cli("convert", src, "-o", tmp_path / "out.safetensors", "-r", "common/strip-module-prefix")
    assert result.code == 2 and result.err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.pth"] and src.read_bytes() == payload
