"""Benchmark of `.pth` output (not part of the test suite): safetensors -> .pth and .pth -> .pth against
`cp` + `sync` of the same input file, in the same rounds.

    .venv/bin/python benchmarks/torch_out.py --size-gib 2 [--scaling 1,4] [--repeat 3] [--cache cold|warm]
        [--compare DIR]

Reuses run.py's synthetic checkpoint (benchmarks/synth.py), its Runner (every command under measure.py:
wall time and peak RSS; outputs deleted and `sync` run after each) and its shuffled rounds. For each size
prints one table row per command: fastest wall time, the median over rounds of its wall / the same round's
`cp + sync` of its input, and the highest peak RSS. Goals: ratio <= 1.5, RSS <= 300 MiB, flat with size.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import record  # noqa: E402  (benchmarks/record.py)
import run  # noqa: E402  (benchmarks/run.py)

RATIO_GOAL, RSS_GOAL = 1.5, 300.0


def commands(
    src: Path, pth: Path, out: Path, compare: str | None = None
) -> list[tuple[str, str, list[str], Path, Path]]:
    """(name, baseline name, argv, input, output) for one size; `compare`: also the ckptx of that source tree."""
    rename = str(HERE / "rules" / "rename.yaml")
    copy = 'cp "$0" "$1" && sync "$1"'
    other = (
        []
        if compare is None
        else [
            (
                f"ckptx of {compare}: .safetensors -> .pth",
                "cp + sync (.safetensors)",
                [
                    "env",
                    "PYTHONSAFEPATH=1",
                    f"PYTHONPATH={compare}",
                    *run.ckptx("convert", str(src), "-r", rename, "-o", str(out)),
                ],
                src,
                out,
            )
        ]
    )
    return other + [
        ("cp + sync (.safetensors)", "", ["sh", "-c", copy, str(src), str(out)], src, out),
        ("cp + sync (.pth)", "", ["sh", "-c", copy, str(pth), str(out)], pth, out),
        (
            "ckptx convert .safetensors -> .pth",
            "cp + sync (.safetensors)",
            run.ckptx("convert", str(src), "-r", rename, "-o", str(out)),
            src,
            out,
        ),
        (
            "ckptx convert .pth -> .pth",
            "cp + sync (.pth)",
            run.ckptx("convert", str(pth), "-r", rename, "-o", str(out)),
            pth,
            out,
        ),
    ]


def measure_size(runner: run.Runner, work: Path, size: float, compare: str | None = None) -> list[dict[str, object]]:
    """Every command of one size, `runner.repeat` shuffled rounds; one result row per command."""
    src, pth, facts = run.prepare(work, size)
    assert pth is not None
    plan = commands(src, pth, work / "out.pth", compare)
    walls: dict[str, list[float]] = {name: [] for name, *_ in plan}
    rss: dict[str, float] = dict.fromkeys(walls, 0.0)
    order = list(range(len(plan)))
    for round_number in range(runner.repeat):
        if round_number:
            random.Random(size * 100 + round_number).shuffle(order)
        for index in order:
            name, _, argv, source, output = plan[index]
            print(f"  [{size:g} GiB, round {round_number + 1}/{runner.repeat}] {name} ...", file=sys.stderr, flush=True)
            result = runner.run_once(argv, [source], [output])
            walls[name].append(result["wall"])
            rss[name] = max(rss[name], result["maxrss_kib"] / 1024)
    src.unlink()
    pth.unlink()
    rows = []
    for name, baseline, *_ in plan:
        ratio = statistics.median(w / b for w, b in zip(walls[name], walls[baseline])) if baseline else None
        rows.append(
            {
                "size": size,
                "name": name,
                "wall": min(walls[name]),
                "walls": walls[name],
                "ratio": ratio,
                "rss": rss[name],
                "tensors": facts["tensors"],
                "largest_mib": facts["largest"] / run.MIB,
            }
        )
    return rows


def markdown(rows: list[dict[str, object]], meta: dict[str, str]) -> str:
    """The result table."""
    lines = [f"- {k}: {v}" for k, v in meta.items()]
    lines += [
        "",
        "| input | command | best wall (s) | median x cp+sync of the input (same round) | peak RSS (MiB) "
        "| goal met | wall of each round (s) |",
        "|---:|---|---:|---:|---:|---|---|",
    ]
    for r in rows:
        ratio = r["ratio"]
        met = "" if ratio is None else ("yes" if ratio <= RATIO_GOAL and r["rss"] <= RSS_GOAL else "no")
        shown = "" if ratio is None else f"{ratio:.2f}"
        walls = ", ".join(f"{w:.2f}" for w in r["walls"])
        lines.append(
            f"| {r['size']:g} GiB | {r['name']} | {r['wall']:.2f} | {shown} | {r['rss']:.0f} | {met} | {walls} |"
        )
    return "\n".join(lines)


def main() -> None:
    """Parse arguments, run every size, print the table, clean up."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gib", type=float, default=2.0)
    parser.add_argument("--scaling", default="", metavar="SIZES", help="more comma-separated GiB sizes, e.g. 1,4")
    parser.add_argument("--repeat", type=int, default=3, metavar="N", help="rounds of every command (default 3)")
    parser.add_argument("--cache", choices=["cold", "warm"], default="cold")
    parser.add_argument("--workdir", default=None, help="where the temporary folder goes (default: the system's)")
    parser.add_argument(
        "--compare",
        metavar="DIR",
        help="also time the ckptx of another source tree (e.g. an older "
        "commit exported with git archive) at the first size",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON (benchmarks/record.py)")
    args = parser.parse_args()
    recorder = record.Recorder("torch_out")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(run.REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "HF_HUB_OFFLINE": "1",
    }
    work = Path(tempfile.mkdtemp(prefix="ckptx-bench-pth-", dir=args.workdir))
    load_before = os.getloadavg()[0]
    try:
        runner = run.Runner(work, args.cache, env, max(1, args.repeat))
        rows: list[dict[str, object]] = []
        for number, size in enumerate([args.size_gib, *(float(s) for s in args.scaling.split(",") if s.strip())]):
            rows += measure_size(runner, work, size, args.compare if number == 0 else None)
        meta = {
            "page cache": "dropped before every command" if runner.cache == "cold" else "inputs read just before",
            "rounds": f"{runner.repeat}, shuffled after the first",
            "machine": f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}",
            "load average (1 min) at start / end": f"{load_before:.2f} / {os.getloadavg()[0]:.2f}",
        }
        print(markdown(rows, meta))
        recorder.write(args.json, {"rounds": runner.repeat, "cache": runner.cache, "rows": rows})
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
