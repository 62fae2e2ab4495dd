"""Copy-on-write placement: a rename-only safetensors conversion puts every copied byte at an offset congruent to
its source offset, so on XFS with reflink the output shares the source's data blocks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import ckptx

RENAME = "ckptx: 1\nsteps: [{add_prefix: model.}]\n"


def _data_start(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {f"layer{i}.weight": torch.randn(512, 1024 + 8 * i, generator=generator) for i in range(8)}


def test_the_data_section_is_placed_congruent_to_the_sources(tmp_path: Path, write_rules) -> None:
    src, dst = tmp_path / "src.safetensors", tmp_path / "dst.safetensors"
    save_file(_state(), str(src))
    ckptx.convert(src, dst, write_rules(RENAME))
    assert (_data_start(dst) - _data_start(src)) % 4096 == 0
    out, original = load_file(str(dst)), _state()
    assert all(torch.equal(out[f"model.{k}"], v) for k, v in original.items())


def _shared_bytes(path: Path) -> int:
    """Bytes of `path` in extents the file system marks shared (FIEMAP_EXTENT_SHARED, 0x2000)."""
    listing = subprocess.run(["xfs_io", "-c", "fiemap -v", str(path)], capture_output=True, text=True, check=True)
    shared = 0
    for line in listing.stdout.splitlines()[2:]:
        parts = line.split()
        if len(parts) >= 5 and parts[2] != "hole" and int(parts[4], 16) & 0x2000:
            shared += int(parts[3]) * 512
    return shared


@pytest.fixture
def xfs(tmp_path: Path):
    """A loop-mounted XFS image with reflink (root and xfsprogs); the test says so loudly when it cannot."""
    if os.geteuid() != 0 or shutil.which("mkfs.xfs") is None or shutil.which("xfs_io") is None:
        pytest.skip("copy-on-write test needs root and xfsprogs (mkfs.xfs, xfs_io)")
    image, point = tmp_path / "xfs.img", tmp_path / "mnt"
    point.mkdir()
    with open(image, "wb") as f:
        f.truncate(400 << 20)
    made = subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(image)], capture_output=True, text=True)
    mounted = made.returncode == 0 and subprocess.run(["mount", "-o", "loop", str(image), str(point)],
                                                      capture_output=True).returncode == 0
    if not mounted:
        pytest.skip(f"cannot make or loop-mount an XFS image here: {made.stderr.strip() or 'mount failed'}")
    yield point
    subprocess.run(["umount", "-l", str(point)], check=False)


def test_a_rename_on_xfs_shares_the_sources_blocks(xfs: Path, write_rules) -> None:
    src, dst = xfs / "src.safetensors", xfs / "dst.safetensors"
    save_file(_state(), str(src))
    os.sync()
    ckptx.convert(src, dst, write_rules(RENAME))
    data = dst.stat().st_size - _data_start(dst)
    assert _shared_bytes(dst) >= 0.95 * data  # all but the unaligned ends of the run
    out = load_file(str(dst))
    assert all(torch.equal(out[f"model.{k}"], v) for k, v in _state().items())
    assert json.loads(dst.read_bytes()[8:_data_start(dst)])["__metadata__"]["ckptx.recipe"]
