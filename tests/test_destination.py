"""Output paths: never a file of the source, atomic, `--force` to replace; file-system failures in one line."""

from __future__ import annotations

import hashlib
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import subprocess_env
from tests.io.test_sharded import state, write_hf_shards

IDENTITY = "ckptx: 1\nsteps: []\n"


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_manifest_onto_the_source_is_refused(run_cli, safetensors_file: Path) -> None:
    before = safetensors_file.read_bytes()
    result = run_cli("inspect", safetensors_file, "--manifest", safetensors_file)
    assert result.code == 2 and "is a file of the source checkpoint" in result.err
    assert safetensors_file.read_bytes() == before


def test_manifest_through_a_symlink_to_the_source_is_refused(run_cli, safetensors_file: Path, tmp_path: Path) -> None:
    link = tmp_path / "link.json"
    link.symlink_to(safetensors_file)
    before = safetensors_file.read_bytes()
    result = run_cli("inspect", safetensors_file, "--manifest", link, "--force")
    assert result.code == 2 and safetensors_file.read_bytes() == before


def test_manifest_replaces_an_existing_file_only_with_force(run_cli, safetensors_file: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "m.json"
    manifest.write_text("keep me")
    assert run_cli("inspect", safetensors_file, "--manifest", manifest).code == 2
    assert manifest.read_text() == "keep me"
    assert run_cli("inspect", safetensors_file, "--manifest", manifest, "--force").code == 0
    assert '"ckptx_manifest"' in manifest.read_text()


def test_manifest_onto_a_folder_is_one_line(run_cli, safetensors_file: Path, tmp_path: Path) -> None:
    result = run_cli("inspect", safetensors_file, "--manifest", tmp_path)
    assert result.code == 2 and "is a folder" in result.err and len(result.err.splitlines()) == 1


def test_manifest_under_a_missing_folder_creates_it(run_cli, safetensors_file: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "new" / "deeper" / "m.json"
    assert run_cli("inspect", safetensors_file, "--manifest", manifest).code == 0 and manifest.is_file()


@pytest.mark.parametrize(
    "dst,extra",
    [
        ("model.safetensors", ["--max-shard-size", "16B"]),
        ("model-00001-of-00002.safetensors", []),
        ("model.safetensors.index.json", []),
    ],
)
def test_no_file_of_a_sharded_source_is_overwritten(run_cli, write_rules, tmp_path: Path, dst: str, extra) -> None:
    index = write_hf_shards(tmp_path, state(), per_shard=7)
    before = _digests(tmp_path)
    result = run_cli(
        "convert", index, "-r", write_rules(IDENTITY, "identity.yaml"), "-o", tmp_path / dst, "--force", *extra
    )
    assert result.code == 2 and "is a file of the source checkpoint" in result.err
    assert {k: v for k, v in _digests(tmp_path).items() if k != "identity.yaml"} == {
        k: v for k, v in before.items() if k != "identity.yaml"
    }


def test_convert_creates_a_missing_destination_folder(run_cli, safetensors_file: Path, tmp_path: Path) -> None:
    dst = tmp_path / "a" / "b" / "out.safetensors"
    assert run_cli("convert", safetensors_file, "-o", dst).code == 0 and load_file(str(dst))


def test_dry_run_checks_the_destination_as_a_real_run(run_cli, safetensors_file: Path, tmp_path: Path) -> None:
    existing = tmp_path / "exists.safetensors"
    existing.write_bytes(b"x")
    assert run_cli("convert", safetensors_file, "-o", existing, "--dry-run").code == 2
    assert run_cli("convert", safetensors_file, "-o", safetensors_file, "--dry-run", "--force").code == 2
    assert run_cli("convert", safetensors_file, "-o", tmp_path / "new" / "o.safetensors", "--dry-run").code == 0
    assert not (tmp_path / "new").exists()


def test_convert_without_a_target_says_nothing_was_validated(run_cli, safetensors_file: Path, tmp_path: Path) -> None:
    result = run_cli("convert", safetensors_file, "-o", tmp_path / "o.safetensors")
    assert result.code == 0 and "NOT validated: no target was given" in result.out


def test_a_242_character_name_is_written(run_cli, safetensors_file: Path, tmp_path: Path) -> None:
    dst = tmp_path / ("n" * 230 + ".safetensors")
    assert len(dst.name) == 242
    assert run_cli("convert", safetensors_file, "-o", dst).code == 0 and load_file(str(dst))


@pytest.fixture
def small_mount(tmp_path: Path):
    """A 64 KiB tmpfs (root only); the test says so loudly when it cannot mount."""
    point = tmp_path / "mnt"
    point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(point)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
    yield point
    subprocess.run(["umount", "-l", str(point)], check=False)


def test_disk_full_is_one_line_and_leaves_nothing(run_cli, tmp_path: Path, small_mount: Path) -> None:
    src = tmp_path / "big.pt"
    torch.save({"w": torch.zeros(256, 256)}, src)
    result = run_cli("convert", src, "-o", small_mount / "o.safetensors")
    assert result.code == 2 and "No space left on device" in result.err and len(result.err.splitlines()) == 1
    assert list(small_mount.iterdir()) == []


def test_read_only_folder_is_one_line(run_cli, safetensors_file: Path, small_mount: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(small_mount)], check=True)
    result = run_cli("convert", safetensors_file, "-o", small_mount / "o.safetensors")
    assert result.code == 2 and "read-only" in result.err and len(result.err.splitlines()) == 1


def test_file_too_large_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    src = tmp_path / "big.pt"
    torch.save({"w": torch.zeros(256, 256)}, src)
    dst = tmp_path / "out" / "o.safetensors"
    dst.parent.mkdir()
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))  # noqa: E731
    done = subprocess.run(
        [sys.executable, "-m", "ckptx", "convert", str(src), "-o", str(dst)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        preexec_fn=limit,
    )
    assert done.returncode == 2, done.stderr
    assert "File too large" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert list(dst.parent.iterdir()) == []


def test_a_batch_report_is_never_written_over_a_jobs_source(run_cli, tmp_path: Path, write_rules) -> None:
    src = tmp_path / "m.pt"
    torch.save({"w": torch.zeros(2)}, src)
    before = src.read_bytes()
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text("ckptx: 1\ndefaults: {rules: r.yaml}\njobs:\n  - {src: m.pt, dst: out/m.safetensors}\n")
    (tmp_path / "r.yaml").write_text(IDENTITY)
    result = run_cli("batch", jobs, "--report", src)
    assert result.code == 2 and "the batch report is a file of the source checkpoint" in result.err
    assert src.read_bytes() == before
