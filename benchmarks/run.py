"""ckptx benchmark (not part of the test suite): copy speed and memory on a synthetic multi-GB checkpoint.

    .venv/bin/python benchmarks/run.py --size-gib 2 [--scaling 1,4] [--cache cold|warm] [--workdir DIR]

Generates a transformer-like float32 checkpoint (benchmarks/synth.py) as safetensors and as a torch zip
`.pth`, then runs on the same files, in rounds (every command once per round, in a new order each round
after the first, so a slow spell of the disk or a slow predecessor hits them alike), each under benchmarks/measure.py
(wall time and peak RSS): `cp` (plain and followed by
`sync FILE`), the naive scripts of benchmarks/naive.py, and `ckptx convert` as a subprocess for (a) safetensors ->
safetensors rename-only, (b) .pth -> safetensors,
(c) 10% of the tensors cast to bf16, plus .pth output and sharded output for reference. Every output is
deleted (and `sync` run) before the next command. `--scaling` repeats the ckptx rows on other sizes to show
that memory does not grow with the file. A planning benchmark (100,000 keys, 50 regex steps) runs last.
Prints Markdown tables; the generated files live in a temporary folder that is removed at the end.

The children import the ckptx of this source tree (the repo root is put first on PYTHONPATH).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import record  # noqa: E402  (benchmarks/record.py)

MIB = 1024 * 1024
CAST_REGEX = r"(^embed_tokens\.weight|\.mlp\.up\.weight|\.input_layernorm\.weight)$"


@dataclass
class Row:
    """One measured command."""

    case: str
    name: str
    wall: float
    rss_mib: float
    size_gib: float
    command: str
    target: str = ""
    met: str = ""
    extra: dict[str, object] = field(default_factory=dict)


class Runner:
    """Runs commands under measure.py with the chosen page-cache policy."""

    def __init__(self, work: Path, cache: str, env: dict[str, str], repeat: int) -> None:
        self.work = work
        self.env = env
        self.repeat = repeat
        self.cache = cache if cache == "warm" or _drop_caches() else "warm"

    def run_once(self, argv: list[str], inputs: list[Path], outputs: list[Path]) -> dict[str, float]:
        """Measure `argv` once; inputs are cold (dropped) or warm (read just before) as the policy says."""
        if self.cache == "cold":
            _drop_caches()
            subprocess.run(
                [sys.executable, "-c", "import torch, safetensors, numpy, ckptx.cli"], env=self.env, check=True
            )
        else:
            for path in inputs:
                subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)
        done = subprocess.run(
            [sys.executable, str(HERE / "measure.py"), *argv], env=self.env, capture_output=True, text=True, check=True
        )
        result = json.loads(done.stdout)
        for path in outputs:
            if path.is_dir():
                shutil.rmtree(path)
                path.mkdir()
            else:
                path.unlink(missing_ok=True)
        subprocess.run(["sync"], check=True)
        if result["returncode"] != 0:
            raise SystemExit(f"benchmark command failed ({result['returncode']}): {' '.join(argv)}\n{result['stderr']}")
        return result


def _drop_caches() -> bool:
    """Write back dirty pages and drop the page cache (needs root); False when not allowed."""
    subprocess.run(["sync"], check=True)
    try:
        with open("/proc/sys/vm/drop_caches", "w", encoding="ascii") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def ckptx(*args: str) -> list[str]:
    """`ckptx ARGS` as this interpreter runs it."""
    return [sys.executable, "-m", "ckptx", *args]


def prepare(work: Path, size_gib: float, with_pth: bool = True) -> tuple[Path, Path | None, dict[str, float]]:
    """Write the synthetic checkpoint (and its .pth twin); returns paths and facts about it."""
    sys.path.insert(0, str(HERE))
    import synth

    shapes = synth.checkpoint_shapes(int(size_gib * 1024**3))
    src = work / f"synthetic-{size_gib:g}g.safetensors"
    synth.write_safetensors(src, shapes)
    pth = None
    if with_pth:
        pth = work / f"synthetic-{size_gib:g}g.pth"
        synth.write_torch_zip(src, pth)
    sizes = [4 * _numel(s) for s in shapes.values()]
    cast = [n for k, n in zip(shapes, sizes) if _cast_matches(k)]
    facts = {
        "tensors": len(sizes),
        "bytes": sum(sizes),
        "largest": max(sizes),
        "cast_tensors": len(cast),
        "cast_bytes": sum(cast),
    }
    return src, pth, facts


def _cast_matches(key: str) -> bool:
    import re

    sys.path.insert(0, str(HERE))
    import naive

    return re.search(CAST_REGEX, naive.rename(key)) is not None


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n


def main_run(runner: Runner, work: Path, size: float, facts_out: dict[str, dict[str, float]], full: bool) -> list[Row]:
    """All rows for one size (`full`: baselines and naive scripts too, else the ckptx rows only)."""
    src, pth, facts = prepare(work, size)
    facts_out[f"{size:g}"] = facts
    assert pth is not None
    out, out_pth, shards = work / "out.safetensors", work / "out.pth", work / "sharded"
    rename, cast = str(HERE / "rules" / "rename.yaml"), str(HERE / "rules" / "cast.yaml")
    naive = str(HERE / "naive.py")
    py = sys.executable
    shards.mkdir(exist_ok=True)
    plan: list[tuple[str, str, list[str], list[Path], list[Path]]] = []
    if full:
        plan += [
            ("floor", "python -c 'import torch'", [py, "-c", "import torch"], [], []),
            ("floor", "ckptx --version", ckptx("--version"), [], []),
            ("baseline", "cp", ["cp", str(src), str(out)], [src], [out]),
        ]
    plan.append(("baseline", "cp + sync", ["sh", "-c", 'cp "$0" "$1" && sync "$1"', str(src), str(out)], [src], [out]))
    if full:
        plan += [
            (
                "baseline",
                "cp + sync (.pth)",
                ["sh", "-c", 'cp "$0" "$1" && sync "$1"', str(pth), str(out_pth)],
                [pth],
                [out_pth],
            ),
            (
                "a",
                "naive: load_file + renames + save_file",
                [py, naive, "safetensors", str(src), str(out)],
                [src],
                [out],
            ),
        ]
    plan.append(
        ("a", "ckptx convert (rename only)", ckptx("convert", str(src), "-r", rename, "-o", str(out)), [src], [out])
    )
    if full:
        plan.append(
            (
                "b",
                "naive: torch.load + renames + torch.save",
                [py, naive, "torch", str(pth), str(out_pth)],
                [pth],
                [out_pth],
            )
        )
    plan.append(
        (
            "b",
            "ckptx convert .pth -> .safetensors",
            ckptx("convert", str(pth), "-r", rename, "-o", str(out)),
            [pth],
            [out],
        )
    )
    if full:
        plan.append(
            (
                "c",
                "naive: load_file + renames + cast + save_file",
                [py, naive, "safetensors", str(src), str(out), "--cast", CAST_REGEX],
                [src],
                [out],
            )
        )
    plan.append(
        ("c", "ckptx convert (10% cast to bf16)", ckptx("convert", str(src), "-r", cast, "-o", str(out)), [src], [out])
    )
    if full:
        plan += [
            (
                "d",
                "ckptx convert -> .pth (streaming writer)",
                ckptx("convert", str(src), "-r", rename, "-o", str(out_pth)),
                [src],
                [out_pth],
            ),
            (
                "e",
                "ckptx convert --max-shard-size 500MB",
                ckptx(
                    "convert",
                    str(src),
                    "-r",
                    rename,
                    "-o",
                    str(shards / "model.safetensors"),
                    "--max-shard-size",
                    "500MB",
                ),
                [src],
                [shards],
            ),
        ]
    walls: list[list[dict[str, float]]] = [[] for _ in plan]
    order = list(range(len(plan)))
    shuffle = random.Random(size).shuffle
    for round_number in range(runner.repeat):
        # Rounds, so a slow spell of the disk hits every command alike, each in a new order: on this VM a command
        # that follows one using GBs of memory (the naive scripts) runs up to 1.5x slower, whatever it is.
        if round_number:
            shuffle(order)
        for index in order:
            results, (case, name, argv, inputs, outputs) = walls[index], plan[index]
            print(
                f"  [{size:g} GiB, round {round_number + 1}/{runner.repeat}] {case}: {name} ...",
                file=sys.stderr,
                flush=True,
            )
            results.append(runner.run_once(argv, inputs, outputs))
    rows = []
    for results, (case, name, argv, _, _) in zip(walls, plan):
        best = min(results, key=lambda r: r["wall"])
        rows.append(
            Row(
                case,
                name,
                best["wall"],
                max(r["maxrss_kib"] for r in results) / 1024,
                size,
                " ".join(_short(a, work) for a in argv),
                extra={"user": best["user"], "sys": best["sys"], "walls": [r["wall"] for r in results]},
            )
        )
    _pair_with_baselines(rows)
    src.unlink()
    pth.unlink()
    return rows


def _pair_with_baselines(rows: list[Row]) -> None:
    """For each ckptx row, the median over rounds of its wall time / its baseline's (`cp + sync`) in the same round."""
    walls = {r.name: r.extra["walls"] for r in rows if r.case == "baseline"}
    for row in rows:
        base = walls.get("cp + sync (.pth)" if row.case == "b" and "cp + sync (.pth)" in walls else "cp + sync")
        if row.name.startswith("ckptx convert") and base:
            row.extra["paired"] = statistics.median(w / b for w, b in zip(row.extra["walls"], base))


def _short(arg: str, work: Path) -> str:
    text = arg.replace(str(work) + "/", "").replace(str(REPO) + "/", "").replace(sys.executable, "python")
    return f"'{text}'" if any(c in text for c in " |()$\\") else text


def judge(rows: list[Row], facts: dict[str, float]) -> None:
    """Fill `target` and `met` of the ckptx rows."""
    by = {(r.case, r.name): r for r in rows}
    cp = by[("baseline", "cp")].wall
    cp_sync = by[("baseline", "cp + sync")].wall
    cp_pth = by[("baseline", "cp + sync (.pth)")].wall
    largest = facts["largest"] / MIB
    for row in rows:
        if not row.name.startswith("ckptx"):
            continue
        if row.case == "a":
            row.target = "wall <= 1.3x cp, RSS <= 300 MiB"
            row.met = _verdict(row.wall <= 1.3 * cp_sync, row.rss_mib <= 300, row.wall <= 1.3 * cp)
        elif row.case == "b":
            row.target = f"wall <= 2x cp, RSS <= {largest + 300:.0f} MiB"
            row.met = _verdict(row.wall <= 2 * cp_pth, row.rss_mib <= largest + 300, row.wall <= 2 * cp)
        elif row.case == "c":
            row.target = f"RSS <= {2 * largest + 300:.0f} MiB"
            row.met = "yes" if row.rss_mib <= 2 * largest + 300 else "no"


def _verdict(wall_ok: bool, rss_ok: bool, wall_ok_plain: bool) -> str:
    parts = [
        f"wall {'yes' if wall_ok else 'no'} (vs cp+sync)",
        f"{'yes' if wall_ok_plain else 'no'} (vs cp)",
        f"RSS {'yes' if rss_ok else 'no'}",
    ]
    return ", ".join(parts)


def markdown(
    rows: list[Row],
    scaling: list[Row],
    facts: dict[str, dict[str, float]],
    plan: dict[str, float],
    meta: dict[str, str],
) -> str:
    """The result tables."""
    lines = []
    for key, info in facts.items():
        lines.append(
            f"- {key} GiB input: {info['tensors']:.0f} float32 tensors, {info['bytes'] / 1024**3:.2f} GiB, "
            f"largest {info['largest'] / MIB:.0f} MiB; case (c) casts {info['cast_tensors']:.0f} tensors "
            f"({100 * info['cast_tensors'] / info['tensors']:.0f}% of them, {info['cast_bytes'] / MIB:.0f} MiB)"
        )
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    floor = next((r.rss_mib for r in rows if r.name == "ckptx --version"), 0.0)  # python + ckptx, no torch
    startup = next((r.wall for r in rows if r.name == "ckptx --version"), 0.0)
    base = {r.name: r.wall for r in rows if r.case == "baseline"}
    lines += [
        "",
        "| case | command | wall (s) | x cp | x cp+sync | x cp+sync without ckptx startup "
        "| median of per-round x cp+sync | peak RSS (MiB) | RSS above `ckptx --version` | target | met |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        cp = base.get("cp + sync (.pth)" if r.case == "b" else "cp + sync", 0)
        plain = base.get("cp", 0)
        net = f"{(r.wall - startup) / cp:.2f}" if r.name.startswith("ckptx convert") else ""
        lines.append(
            f"| {r.case} | {r.name} | {r.wall:.2f} | {r.wall / plain:.2f} | {r.wall / cp:.2f} | {net} | "
            f"{_paired(r)} | {r.rss_mib:.0f} | {r.rss_mib - floor:+.0f} | {r.target} | {r.met} |"
        )
    if scaling:
        lines += [
            "",
            "| case | command | input | wall (s) | x cp+sync | x cp+sync without ckptx startup "
            "| median of per-round x cp+sync | peak RSS (MiB) | RSS above `ckptx --version` |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        sync_wall = {r.size_gib: r.wall for r in scaling if r.name == "cp + sync"}
        for r in sorted(scaling, key=lambda r: (r.case, r.size_gib)):
            cp = sync_wall[r.size_gib]
            net = f"{(r.wall - startup) / cp:.2f}" if r.name.startswith("ckptx") else ""
            lines.append(
                f"| {r.case} | {r.name} | {r.size_gib:g} GiB | {r.wall:.2f} | {r.wall / cp:.2f} | {net} | "
                f"{_paired(r)} | {r.rss_mib:.0f} | {r.rss_mib - floor:+.0f} |"
            )
    if plan:
        lines += [
            "",
            "| planning benchmark (100,000 keys, 50 rename steps, 100,000 renames) | wall (s) | CPU (s) |",
            "|---|---:|---:|",
        ]
        for name in ("open", "plan", "validate", "plan+validate", "total"):
            lines.append(f"| {name} | {plan[f'{name} wall']:.2f} | {plan[f'{name} cpu']:.2f} |")
    return "\n".join(lines)


def _paired(row: Row) -> str:
    paired = row.extra.get("paired")
    return f"{paired:.2f}" if isinstance(paired, float) else ""


def plan_benchmark(work: Path, env: dict[str, str]) -> dict[str, float]:
    """The planning benchmark in a fresh interpreter."""
    done = subprocess.run(
        [sys.executable, str(HERE / "plan_bench.py"), "--workdir", str(work)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout)


def main() -> None:
    """Parse arguments, run everything, print the tables, clean up."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gib", type=float, default=2.0, help="size of the main synthetic checkpoint (default 2)")
    parser.add_argument(
        "--scaling",
        default="",
        metavar="SIZES",
        help="comma-separated GiB sizes for the ckptx rows again (e.g. 1,4), to show RSS does not grow",
    )
    parser.add_argument(
        "--cache",
        choices=["cold", "warm"],
        default="cold",
        help="cold: drop the page cache before each command (needs root; falls back to warm); "
        "warm: read the inputs just before each command",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        metavar="N",
        help="run N rounds of every command; report the fastest wall time, the highest peak RSS "
        "and the median over rounds of each ckptx time / cp+sync in the same round",
    )
    parser.add_argument("--workdir", default=None, help="where the temporary folder goes (default: the system's)")
    parser.add_argument("--no-plan", action="store_true", help="skip the planning benchmark")
    parser.add_argument(
        "--json",
        "--json-out",
        dest="json_out",
        metavar="FILE",
        help="also write the raw numbers as JSON (benchmarks/record.py; rendered by render_docs.py)",
    )
    args = parser.parse_args()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "HF_HUB_OFFLINE": "1",
    }
    work = Path(tempfile.mkdtemp(prefix="ckptx-bench-", dir=args.workdir))
    load_before = os.getloadavg()[0]
    recorder = record.Recorder("run")
    try:
        runner = Runner(work, args.cache, env, max(1, args.repeat))
        facts: dict[str, dict[str, float]] = {}
        rows = main_run(runner, work, args.size_gib, facts, full=True)
        scaling: list[Row] = []
        for size in [float(s) for s in args.scaling.split(",") if s.strip()]:
            scaling += main_run(runner, work, size, facts, full=False)
        judge(rows, facts[f"{args.size_gib:g}"])
        plan = {} if args.no_plan else plan_benchmark(work, env)
        import torch

        meta = {
            "page cache": (
                "dropped before every command (cold input; the programs re-warmed: python, torch, numpy "
                "and ckptx imported once)"
            )
            if runner.cache == "cold"
            else "inputs read just before every command (warm)",
            "runs": (
                f"{runner.repeat} round(s) of every command (shuffled after the first): fastest wall time, "
                f"highest peak RSS; "
                "paired ratio = median over rounds of ckptx / cp+sync in the same round"
            ),
            "machine": f"{os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}, "
            f"torch {torch.__version__}",
            "load average (1 min) at start / end": f"{load_before:.2f} / {os.getloadavg()[0]:.2f}",
            "command": " ".join([os.path.relpath(sys.executable, REPO), "benchmarks/run.py", *sys.argv[1:]]),
        }
        print(markdown(rows, scaling, facts, plan, meta))
        results = {"size_gib": args.size_gib, "rounds": runner.repeat, "cache": runner.cache}
        results |= {"rows": [r.__dict__ for r in rows + scaling], "facts": facts, "plan": plan, "meta": meta}
        recorder.write(args.json_out, results)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
