"""Copy-on-write benchmark: rename-only conversions on loop-mounted XFS (reflink) and btrfs images against `cp`
(which clones) and `cp --reflink=never` + `sync`: wall time (Python start-up included) and bytes of the output
not shared with the source (`xfs_io -c "fiemap -v"`), for safetensors and `.pth` sources and outputs.

Then the same rename on the machine's own disk (`--disk-dir`, ext4 here), paired against `cp` + `sync FILE` of
the same file: rounds alternate which command goes first, and before every command the outputs are removed,
`sync` runs and (as root) the page cache is dropped; "warm" then reads the source once (it is in memory, the
disk only writes), "cold" leaves it on the disk (the disk reads and writes: a slower disk).

    sudo .venv/bin/python benchmarks/cow_bench.py --size-gib 2   # root, xfsprogs, btrfs-progs; skipped otherwise
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
RULES = "ckptx: 1\nsteps: [{rename: [['^layers\\.', 'blocks.']]}]\n"


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
    """Wall seconds of `command`, which must succeed."""
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, capture_output=True)
    return time.perf_counter() - started


def child_env() -> dict[str, str]:
    """The environment of the ckptx children: this tree's ckptx, compiled modules kept (as a wheel has them)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONSAFEPATH": "1"}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def sources(point: Path, size_gib: float) -> tuple[Path, Path]:
    """A safetensors and a `.pth` file of the same float32 tensors (64 MiB each, `size_gib` in all)."""
    count = max(1, int(size_gib * 2**30 // (64 << 20)))
    generator = torch.Generator().manual_seed(0)
    state = OrderedDict((f"layers.{i}.weight", torch.randn(4096, 4096, generator=generator)) for i in range(count))
    save_file(state, str(point / "src.safetensors"))
    torch.save(state, point / "src.pth")
    os.sync()
    return point / "src.safetensors", point / "src.pth"


def rows(point: Path, work: Path, st: Path, pth: Path) -> list[tuple[str, float, Path]]:
    """(name, wall seconds, output) for the copies and each conversion."""
    rules = work / "rename.yaml"
    rules.write_text(RULES)
    env = child_env()
    timed([sys.executable, "-m", "ckptx", "--version"], env)  # compiles the modules once
    found = [
        ("cp (clones)", timed(["cp", str(st), str(point / "cp.safetensors")]), point / "cp.safetensors"),
        (
            "cp --reflink=never + sync",
            timed(["sh", "-c", f"cp --reflink=never {st} {point}/nocow && sync"]),
            point / "nocow",
        ),
    ]
    for src, dst in ((st, "out.safetensors"), (st, "out.pth"), (pth, "out2.pth"), (pth, "out2.safetensors")):
        command = [sys.executable, "-m", "ckptx", "convert", str(src), "-r", str(rules), "-o", str(point / dst)]
        os.sync()
        found.append((f"ckptx {src.suffix[1:]} -> {Path(dst).suffix[1:]}", timed(command, env), point / dst))
        renamed(point / dst)
    return found


def renamed(path: Path) -> None:
    """The conversion did rename every key (a benchmark of a no-op would flatter nobody)."""
    if path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
    else:
        keys = list(torch.load(path, weights_only=True, mmap=True))
    if not keys or not all(key.startswith("blocks.") for key in keys):
        raise SystemExit(f"{path}: keys were not renamed: {keys[:3]}")


def settle(outputs: list[Path], warm: Path | None) -> None:
    """Remove `outputs`, flush dirty pages, drop the page cache (as root); read `warm` back into it if given."""
    for path in outputs:
        path.unlink(missing_ok=True)
    os.sync()
    if os.geteuid() == 0:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    if warm is not None:
        with open(warm, "rb") as f:
            while f.read(64 << 20):
                pass


def paired_on_disk(folder: Path, size_gib: float, rounds: int) -> dict[str, object]:
    """ckptx rename against cp + sync FILE on `folder`'s file system, warm and cold, paired round by round."""
    folder.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ckptx-disk-", dir=folder))
    try:
        st, _ = sources(work, size_gib)
        rules = work / "rename.yaml"
        rules.write_text(RULES)
        env = child_env()
        out, copied = work / "out.safetensors", work / "cp.safetensors"
        ckptx_cmd = [sys.executable, "-m", "ckptx", "convert", str(st), "-r", str(rules), "-o", str(out)]
        cp_cmd = ["sh", "-c", f"cp --reflink=never {st} {copied} && sync {copied}"]
        timed(ckptx_cmd, env)  # compiles the modules once
        renamed(out)
        fstype = (
            subprocess.run(
                ["findmnt", "-n", "-o", "FSTYPE", "--target", str(work)], capture_output=True, text=True
            ).stdout.strip()
            or "?"
        )
        print(
            f"\n{st.stat().st_size / 2**30:.2f} GiB safetensors on {fstype} ({folder}), rename only, "
            f"{rounds} paired rounds; median (min-max)"
        )
        print(f"| {'cache':5} | {'ckptx s':>17} | {'cp + sync s':>17} | {'ckptx / cp':>17} |")
        found: dict[str, object] = {"fstype": fstype, "bytes": st.stat().st_size, "rounds": rounds}
        for cache in ("warm", "cold"):
            ours, theirs = [], []
            for round_ in range(rounds):
                pair = {}
                for name in ("ckptx", "cp") if round_ % 2 == 0 else ("cp", "ckptx"):
                    settle([out, copied], st if cache == "warm" else None)
                    pair[name] = timed(ckptx_cmd, env) if name == "ckptx" else timed(cp_cmd)
                ours.append(pair["ckptx"])
                theirs.append(pair["cp"])
            ratios = [a / b for a, b in zip(ours, theirs)]
            print(f"| {cache:5} | {_spread(ours):>17} | {_spread(theirs):>17} | {_spread(ratios):>17} |")
            found[cache] = {"ckptx": ours, "cp_sync": theirs}
        return found
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> int:
    """Make the XFS image, run every row, print the tables; then the paired runs on the machine's disk."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-gib", type=float, default=2.0)
    parser.add_argument("--disk-dir", type=Path, default=REPO / "bench-out", help="a folder on the disk to compare")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--fs", default="xfs,btrfs", help="copy-on-write file systems to try (xfs, btrfs)")
    parser.add_argument("--json", metavar="FILE", help="also write the tables as JSON (benchmarks/record.py)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "benchmarks"))
    import record

    recorder = record.Recorder("cow_bench")
    found = {"size_gib": args.size_gib, "cow": {kind: cow(args.size_gib, kind) for kind in args.fs.split(",")}}
    found["disk"] = paired_on_disk(args.disk_dir, args.size_gib, args.rounds)
    recorder.write(args.json, found)
    return 0


MKFS = {"xfs": ["mkfs.xfs", "-q", "-m", "reflink=1"], "btrfs": ["mkfs.btrfs", "-q"]}


def cow(size_gib: float, kind: str = "xfs") -> dict[str, object]:
    """The table for one copy-on-write file system (skipped, with a message, without root or its mkfs)."""
    mkfs = MKFS[kind]
    if os.geteuid() != 0 or shutil.which(mkfs[0]) is None or shutil.which("xfs_io") is None:
        print(f"skipped: the {kind} benchmark needs root, {mkfs[0]} and xfs_io (xfsprogs)")
        return {"skipped": f"needs root, {mkfs[0]} and xfs_io (xfsprogs)"}
    work = Path(tempfile.mkdtemp(prefix="ckptx-cow-"))
    image, point = work / f"{kind}.img", work / "mnt"
    point.mkdir()
    with open(image, "wb") as f:
        f.truncate(int((size_gib * 5 + 1) * 2**30))
    subprocess.run([*mkfs, str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(point)], check=True)
    try:
        st, pth = sources(point, size_gib)
        table = rows(point, work, st, pth)
        print(f"{st.stat().st_size / 2**30:.2f} GiB of float32 tensors on {kind} (loop-mounted image), rename only")
        print(f"| {'command':28} | {'wall s':>7} | {'MiB not shared':>15} |")
        found = []
        for name, seconds, path in table:
            unshared = (path.stat().st_size - shared_bytes(path)) / 2**20
            print(f"| {name:28} | {seconds:7.2f} | {max(unshared, 0.0):15.1f} |")
            found.append({"name": name, "wall": seconds, "unshared_mib": max(unshared, 0.0)})
        return {"bytes": st.stat().st_size, "rows": found}
    finally:
        subprocess.run(["umount", "-l", str(point)], check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
