"""Shared fixtures: checkpoints written by real torch/safetensors, rule files, and a CLI runner."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from ckptx.cli import main
from tests.helpers.models import randomized, tiny_net


@dataclass
class CliResult:
    """Exit code and captured output of one `ckptx` run."""

    code: int
    out: str
    err: str

    @property
    def json(self) -> Any:
        return json.loads(self.out)


@pytest.fixture
def run_cli() -> Callable[..., CliResult]:
    """Run `ckptx.cli.main` in-process with captured stdout/stderr."""

    def run(*argv: str) -> CliResult:
        out, err = io.StringIO(), io.StringIO()
        code = main([str(a) for a in argv], stdout=out, stderr=err)
        return CliResult(code, out.getvalue(), err.getvalue())

    return run


@pytest.fixture
def write_rules(tmp_path: Path) -> Callable[..., Path]:
    """Write a rule file from (dedented) YAML text; returns its path."""

    def write(text: str, name: str = "rules.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
        return path

    return write


@pytest.fixture
def tiny_state() -> dict[str, torch.Tensor]:
    """A TinyNet state dict with random weights (includes bn.num_batches_tracked, int64)."""
    return dict(randomized(tiny_net()).state_dict())


@pytest.fixture
def ddp_checkpoint(tmp_path: Path, tiny_state: dict[str, torch.Tensor]) -> Path:
    """A training checkpoint as DDP scripts save it: `module.` keys under `model`, next to optimizer/epoch."""
    path = tmp_path / "train.pth"
    torch.save(
        {
            "model": {f"module.{k}": v for k, v in tiny_state.items()},
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]},
            "epoch": 7,
        },
        path,
    )
    return path


@pytest.fixture
def args_checkpoint(tmp_path: Path, tiny_state: dict[str, torch.Tensor]) -> Path:
    """Like the official ConvNeXt-V2 training checkpoints: also stores an argparse.Namespace."""
    path = tmp_path / "with_args.pth"
    torch.save({"model": tiny_state, "epoch": 1, "args": argparse.Namespace(lr=0.1, model="tiny")}, path)
    return path


@pytest.fixture
def safetensors_file(tmp_path: Path, tiny_state: dict[str, torch.Tensor]) -> Path:
    """The TinyNet weights as a safetensors file."""
    path = tmp_path / "tiny.safetensors"
    save_file(tiny_state, str(path))
    return path


TINY_TARGET = "tests.helpers.models:tiny_net"
REPO = Path(__file__).resolve().parents[1]


def _tests_only_path() -> str:
    """A folder holding only a link to this repo's `tests/`: on a child's PYTHONPATH it makes `tests.helpers`
    importable without putting the checkout's `ckptx/` ahead of the installed wheel."""
    folder = (
        Path(tempfile.gettempdir())
        / f"ckptx-tests-path-{os.getuid()}-{hashlib.sha1(str(REPO).encode()).hexdigest()[:8]}"
    )
    link = folder / "tests"
    if not link.exists():
        folder.mkdir(exist_ok=True)
        try:
            link.symlink_to(REPO / "tests", target_is_directory=True)
        except FileExistsError:
            pass
    return str(folder)


def subprocess_env() -> dict[str, str]:
    """The environment for a child Python: `tests.helpers` importable, ckptx still the installed one, the rest
    unchanged (the working folder stays off sys.path, as for the tests themselves)."""
    paths = [_tests_only_path()] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PYTHONSAFEPATH": "1"}


def cli_without_torch(*argv: object) -> None:
    """Run `ckptx ARGV` in a fresh interpreter and check that it succeeded without importing torch (650 MiB of RSS
    and seconds of start-up with the pinned wheel)."""
    args = [str(a) for a in argv]
    code = (
        "import sys\nfrom ckptx.cli import main\n"
        f"assert main({args!r}) == 0\n"
        "print('torch loaded:', 'torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("torch loaded: False"), done.stdout[-2000:]


def shared_bytes(path: Path) -> int:
    """Bytes of `path` in extents the file system marks shared (FIEMAP_EXTENT_SHARED, 0x2000)."""
    listing = subprocess.run(["xfs_io", "-c", "fiemap -v", str(path)], capture_output=True, text=True, check=True)
    shared = 0
    for line in listing.stdout.splitlines()[2:]:
        parts = line.split()
        if len(parts) >= 5 and parts[2] != "hole" and int(parts[4], 16) & 0x2000:
            shared += int(parts[3]) * 512
    return shared


_MKFS = {"xfs": ["mkfs.xfs", "-q", "-m", "reflink=1"], "btrfs": ["mkfs.btrfs", "-q"]}


@pytest.fixture(params=sorted(_MKFS))
def cow_mount(request: pytest.FixtureRequest, tmp_path: Path):
    """A loop-mounted copy-on-write file system (XFS with reflink, btrfs) in an image file (root, xfsprogs or
    btrfs-progs, and xfs_io for FIEMAP); the test says so loudly when it cannot make one."""
    kind = request.param
    mkfs = _MKFS[kind]
    if os.geteuid() != 0 or shutil.which(mkfs[0]) is None or shutil.which("xfs_io") is None:
        pytest.skip(f"copy-on-write test on {kind} needs root, {mkfs[0]} and xfs_io (xfsprogs)")
    image, point = tmp_path / f"{kind}.img", tmp_path / "mnt"
    point.mkdir()
    with open(image, "wb") as f:
        f.truncate(400 << 20)
    made = subprocess.run([*mkfs, str(image)], capture_output=True, text=True)
    mounted = (
        made.returncode == 0
        and subprocess.run(["mount", "-o", "loop", str(image), str(point)], capture_output=True).returncode == 0
    )
    if not mounted:
        pytest.skip(f"cannot make or loop-mount a {kind} image here: {made.stderr.strip() or 'mount failed'}")
    yield point
    subprocess.run(["umount", "-l", str(point)], check=False)
