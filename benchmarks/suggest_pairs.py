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
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ.setdefault(_var, "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

ATOL = 1e-4


def save_source(pair: Any, folder: Path) -> tuple[Path, Any]:
    """The pair's source model, randomized, saved as its file; (path, model)."""
    from safetensors.torch import save_file

    from tests.suggest import models

    model = pair.source()
    models.randomize(model, seed=sum(map(ord, pair.name)) % 1000)
    model.eval()
    state = pair.state(model) if pair.state is not None else dict(model.state_dict())
    if pair.fmt == "safetensors":
        path = folder / "source.safetensors"
        save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, str(path))
    else:
        path = folder / "source.pth"
        torch.save(state, path)
    return path, model


def outputs_agree(pair: Any, model: Any, converted: dict[str, Any]) -> tuple[bool, str]:
    """(True, '') when the target loads `converted` strictly (allowed missing keys aside) and matches the source."""
    import re

    target = pair.build_target()
    missing, unexpected = target.load_state_dict(converted, strict=False)
    missing = [k for k in missing if not any(re.search(p, k) for p in pair.allow_missing)]
    if missing or unexpected:
        return False, f"does not load strictly: missing {missing[:3]}, unexpected {unexpected[:3]}"
    target.eval()
    x = pair.inputs()
    with torch.no_grad():
        a = pair.source_out(model, x).double()
        b = pair.target_out(target, x).double()
    if a.shape != b.shape:
        return False, f"output shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"
    diff = (a - b).abs().max().item()
    scale = max(1.0, a.abs().max().item())
    return diff <= ATOL * scale, f"max abs diff {diff:.3g}"


def evaluate(pair: Any, verify: bool = False) -> dict[str, Any]:
    import ckptx

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        src, model = save_source(pair, Path(tmp))
        options: dict[str, Any] = {"target_args": dict(pair.target_kwargs), "allow_missing": list(pair.allow_missing)}
        if verify and pair.verify_with:
            options["verify_with"] = pair.verify_with
        try:
            suggestion = ckptx.suggest(src, pair.target, **options)
        except Exception as exc:  # noqa: BLE001 - reported per pair
            return {"pair": pair.name, "outcome": "error", "detail": f"suggest: {type(exc).__name__}: {exc}"[:300]}
        report = suggestion.report
        undecided = list(getattr(report, "undecided", ()))
        try:
            if src.suffix == ".pth":
                state = torch.load(src, weights_only=True)
            else:
                from safetensors.torch import load_file

                state = load_file(str(src))
            converted = ckptx.apply(suggestion.recipe, state, pair.build_target())
            good, detail = outputs_agree(pair, model, converted)
        except Exception as exc:  # noqa: BLE001
            good, detail = False, f"convert: {type(exc).__name__}: {str(exc)[:200]}"
            if os.environ.get("PAIRS_TRACE"):
                traceback.print_exc()
    if report.ok:
        outcome = "right" if good else "WRONG-SILENT"
    else:
        outcome = "flagged-right" if good else "flagged"
    return {
        "pair": pair.name,
        "outcome": outcome,
        "detail": detail,
        "undecided": undecided[:5],
        "missing": list(report.missing)[:5],
        "notes": list(report.notes)[:3],
        "seconds": round(time.perf_counter() - started, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="")
    parser.add_argument("--verify", action="store_true", help="pass each pair's --verify-with when it has one")
    parser.add_argument("--json")
    args = parser.parse_args()
    import importlib.util

    from tests.suggest.pairs import PAIRS

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
