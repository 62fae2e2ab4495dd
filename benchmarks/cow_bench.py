"""Copy-on-write benchmark: a rename-only safetensors conversion on a loop-mounted XFS image (reflink) against
`cp` (which clones) and `cp --reflink=never` + `sync`; wall time and bytes not shared with the source.

    sudo .venv/bin/python benchmarks/cow_bench.py --size-gib 2     # root and xfsprogs; skipped otherwise
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]


def shared_bytes(path: Path) -> int:
    """Bytes of `path` in extents marked shared (FIEMAP_EXTENT_SHARED)."""
    out = subprocess.run(["xfs_io", "-c", "fiemap -v", str(path)], capture_output=True, text=True, check=True).stdout
    total = 0
    for line in out.splitlines()[2:]:
        parts = line.split()
        if len(parts) >= 5 and parts[2] != "hole" and int(parts[4], 16) & 0x2000:
            total += int(parts[3]) * 512
    return total


def timed(command: list[str], env: dict[str, str] | None = None) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, capture_output=True)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-gib", type=float, default=2.0)
    args = parser.parse_args()
    if os.geteuid() != 0 or shutil.which("mkfs.xfs") is None:
        print("skipped: the copy-on-write benchmark needs root and xfsprogs (mkfs.xfs, xfs_io)")
        return 0
    work = Path(tempfile.mkdtemp(prefix="ckptx-cow-"))
    image, point = work / "xfs.img", work / "mnt"
    point.mkdir()
    with open(image, "wb") as f:
        f.truncate(int((args.size_gib * 3 + 1) * 2**30))
    subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(point)], check=True)
    try:
        src = point / "src.safetensors"
        count = max(1, int(args.size_gib * 2**30 // (64 << 20)))
        save_file({f"layers.{i}.weight": torch.randn(4096, 4096) for i in range(count)}, str(src))
        rules = work / "rename.yaml"
        rules.write_text("ckptx: 1\nsteps: [{rename: [['^layers\\\\.', 'blocks.']]}]\n")
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONSAFEPATH": "1"}
        os.sync()
        rows = [("cp (clones)", timed(["cp", str(src), str(point / "cp.safetensors")]), point / "cp.safetensors"),
                ("cp --reflink=never + sync", timed(["sh", "-c", f"cp --reflink=never {src} {point}/nocow.safetensors"
                                                                 f" && sync"]), point / "nocow.safetensors"),
                ("ckptx convert (rename)", timed([sys.executable, "-m", "ckptx", "convert", str(src), "-r", str(rules),
                                                  "-o", str(point / "ckptx.safetensors")], env),
                 point / "ckptx.safetensors")]
        print(f"{src.stat().st_size / 2**30:.2f} GiB safetensors on XFS (reflink=1)")
        print(f"{'command':28} {'wall s':>7} {'MiB not shared':>15}")
        for name, seconds, path in rows:
            unshared = (path.stat().st_size - shared_bytes(path)) / 2**20
            print(f"{name:28} {seconds:7.2f} {max(unshared, 0.0):15.1f}")
    finally:
        subprocess.run(["umount", "-l", str(point)], check=False)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
