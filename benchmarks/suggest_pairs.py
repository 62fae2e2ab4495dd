"""`ckptx suggest`'s hit rate on real cross-library pairs (tests/suggest/pairs.py), metadata only.

For each pair: the source model (random weights) is saved as its file, `ckptx.suggest` writes a recipe from metadata,
the recipe converts the file, the target loads it with strict=True and runs on the pair's input beside the source.
Outcomes: `right` (exit 0, strict, outputs equal), `flagged-right` (exit 1 but the recipe is right), `flagged`
(exit 1, the recipe is wrong or incomplete: suggest said so), `WRONG-SILENT` (exit 0 and the outputs differ: the
failure suggest must never have), `error`.

    .venv/bin/python benchmarks/suggest_pairs.py [--only SUBSTRING] [--verify] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ.setdefault(_var, "1")
warnings.filterwarnings("ignore")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="")
    parser.add_argument("--verify", action="store_true", help="pass each pair's --verify-with when it has one")
    parser.add_argument("--json")
    args = parser.parse_args()
    import importlib.util

    from tests.suggest.pairs import PAIRS, evaluate

    results = []
    for pair in PAIRS:
        if args.only.lower() not in pair.name.lower():
            continue
        if any(importlib.util.find_spec(m) is None for m in pair.library):
            results.append({"pair": pair.name, "outcome": "skipped", "detail": "library missing"})
        else:
            try:
                results.append(evaluate(pair, args.verify))
            except Exception as exc:  # noqa: BLE001 - a pair that cannot be built is reported, not fatal
                results.append({"pair": pair.name, "outcome": "error", "detail": f"{type(exc).__name__}: {exc}"[:300]})
                if os.environ.get("PAIRS_TRACE"):
                    traceback.print_exc()
        r = results[-1]
        print(f"{r['outcome']:14} {r['pair']}: {r.get('detail', '')}", flush=True)
        for key in ("undecided", "missing"):
            if r.get(key):
                print(f"{'':14}   {key}: {r[key]}", flush=True)
    counts: dict[str, int] = {}
    for r in results:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    print("summary:", ", ".join(f"{v} {k}" for k, v in sorted(counts.items())), f"of {len(results)}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 1 if counts.get("WRONG-SILENT") else 0


if __name__ == "__main__":
    raise SystemExit(main())
