"""ckptx benchmark (not part of the test suite): what a provenance card and an audit cost on a multi-GB checkpoint.

    .venv/bin/python benchmarks/audit_bench.py --size-gib 2 [--repeat 3] [--cache warm|cold] [--json FILE]

Writes the synthetic transformer-like float32 checkpoint of benchmarks/synth.py, then runs, in rounds (every
command once per round, in a new order each round after the first), each under benchmarks/measure.py (wall time
and peak RSS of the process and its children):

- `cp + sync` and `sha256sum` of the source (what copying and hashing the bytes costs on this machine);
- `ckptx convert` (rename only) without and with `--audit` (the card's overhead: the median over rounds of the
  ratio of the two in the same round; target at most 1.3x);
- `ckptx audit OUT` (hash and statistics of every tensor), `ckptx audit OUT --card CARD`, and
  `ckptx audit OUT --source SRC -r RULES` (every tensor proved against the source; targets: peak RSS at most
  300 MiB) against the naive check, `torch.load`-ing both files and comparing tensor by tensor.

`--json FILE` writes the rows through benchmarks/record.py. The children import the ckptx of this source tree.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import record  # noqa: E402  (benchmarks/record.py)
from run import Runner, ckptx, prepare  # noqa: E402  (benchmarks/run.py)

NAIVE = """
import sys, torch
from safetensors.torch import load_file
a, b = load_file(sys.argv[1]), load_file(sys.argv[2])
renamed = {k.replace('model.layers.', 'blocks.').removeprefix('model.'): v for k, v in a.items()}
bad = [k for k, v in b.items() if not torch.equal(v, renamed.get(k, torch.empty(0)))]
print(len(bad))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=float, default=2.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cache", choices=["warm", "cold"], default="warm")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON (benchmarks/record.py)")
    args = parser.parse_args()
    recorder = record.Recorder("audit_bench")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="ckptx-audit-bench-") as tmp:
        work = Path(tmp)
        runner = Runner(work, args.cache, env, args.repeat)
        src, _, facts = prepare(work, args.size_gib, with_pth=False)
        rules = str(HERE / "rules" / "rename.yaml")
        out, card, copy = work / "out.safetensors", work / "out.card.json", work / "copy.safetensors"
        naive = work / "naive_check.py"
        naive.write_text(NAIVE, encoding="utf-8")
        # The output audited in place: made once, kept.
        runner.run_once(ckptx("convert", str(src), "-r", rules, "-o", str(work / "kept.safetensors"),
                              "--audit", str(work / "kept.card.json")), [src], [])  # fmt: skip
        kept, kept_card = work / "kept.safetensors", work / "kept.card.json"
        commands = {
            "cp + sync": (["sh", "-c", 'cp "$0" "$1" && sync "$1"', str(src), str(copy)], [src], [copy]),
            "sha256sum": (["sha256sum", str(src)], [src], []),
            "convert (rename only)": (ckptx("convert", str(src), "-r", rules, "-o", str(out)), [src], [out]),
            "convert --audit": (
                ckptx("convert", str(src), "-r", rules, "-o", str(out), "--audit", str(card)),
                [src],
                [out, card],
            ),
            "audit OUT": (ckptx("audit", str(kept)), [kept], []),
            "audit OUT --card": (ckptx("audit", str(kept), "--card", str(kept_card)), [kept], []),
            "audit OUT --source -r": (ckptx("audit", str(kept), "--source", str(src), "-r", rules), [kept, src], []),
            "naive: load both + torch.equal": ([sys.executable, str(naive), str(src), str(kept)], [kept, src], []),
        }
        walls: dict[str, list[float]] = {name: [] for name in commands}
        rss: dict[str, list[float]] = {name: [] for name in commands}
        order = list(commands)
        for round_ in range(args.repeat):
            if round_:
                random.shuffle(order)
            for name in order:
                argv, inputs, outputs = commands[name]
                result = runner.run_once(argv, inputs, outputs)
                walls[name].append(result["wall"])
                rss[name].append(result["maxrss_kib"] / 1024)
        overhead = [a / b for a, b in zip(walls["convert --audit"], walls["convert (rename only)"])]
        rows = [
            {
                "name": name,
                "wall": statistics.median(walls[name]),
                "walls": walls[name],
                "rss_mib": max(rss[name]),
                "command": " ".join(commands[name][0])
                .replace(str(work) + "/", "")
                .replace(str(REPO) + "/", "")
                .replace(sys.executable, "python"),
            }
            for name in commands
        ]
        results = {
            "size_gib": args.size_gib,
            "rounds": args.repeat,
            "cache": runner.cache,
            "facts": facts,
            "rows": rows,
            "card_overhead_paired_median": statistics.median(overhead),
            "targets": {"card overhead": "<= 1.3x convert", "audit --source RSS": "<= 300 MiB"},
        }
    print(f"synthetic checkpoint: {facts['tensors']} tensors, {facts['bytes'] / 2**30:.2f} GiB; cache {runner.cache}")
    print("| command | median wall (s) | peak RSS (MiB) |")
    print("|---|---|---|")
    for row in rows:
        print(f"| {row['name']} | {row['wall']:.2f} | {row['rss_mib']:.0f} |")
    ratio = results["card_overhead_paired_median"]
    print(f"card overhead (median of paired ratios convert --audit / convert): {ratio:.2f}x")
    recorder.write(args.json, results)


if __name__ == "__main__":
    main()
