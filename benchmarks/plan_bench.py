"""Planning benchmark: plan and validate a 100,000-key checkpoint with 50 regex rename steps (metadata only)."""

from __future__ import annotations

import argparse
import json
import struct
import sys
import time
from pathlib import Path

LAYERS, PARAMS = 2000, 50


def write_header_only_safetensors(path: Path, keys: list[str]) -> None:
    """A valid safetensors file of `keys`, each a 1-element float32 tensor (the data section is tiny)."""
    header = {k: {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i, k in enumerate(keys)}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + bytes(4 * len(keys)))


def source_keys() -> list[str]:
    """100,000 keys shaped like a deep transformer's."""
    return [f"model.layers.{layer}.p{param}.weight" for layer in range(LAYERS) for param in range(PARAMS)]


def rules_yaml() -> str:
    """50 rename steps, each a regex with a group and a back-reference touching 2% of the keys."""
    steps = [f"  - rename: [['^model\\.layers\\.(\\d+)\\.p{j}\\.', 'blocks.\\1.q{j}.']]" for j in range(PARAMS)]
    return "ckptx: 1\nname: plan-bench\nsteps:\n" + "\n".join(steps) + "\n"


def expected_keys() -> list[str]:
    """What the rules turn `source_keys()` into."""
    return [f"blocks.{layer}.q{param}.weight" for layer in range(LAYERS) for param in range(PARAMS)]


def run(workdir: Path, repeat: int = 3) -> dict[str, float]:
    """Best-of-`repeat` seconds (wall, and CPU of this process) for: open the header, plan, validate."""
    from ckptx.check.validation import validate
    from ckptx.dtypes import TensorMeta
    from ckptx.io.read.open import open_source
    from ckptx.planning.planner import plan_recipe
    from ckptx.rules.loader import load_rules
    from ckptx.targets.resolve import Target

    src, rules = workdir / "plan-src.safetensors", workdir / "plan-rules.yaml"
    write_header_only_safetensors(src, source_keys())
    rules.write_text(rules_yaml(), encoding="utf-8")
    recipe = load_rules(str(rules))
    target = Target("bench", {k: TensorMeta((1,), "float32") for k in expected_keys()})
    best: dict[str, float] = {}
    for _ in range(repeat):
        marks = [(time.perf_counter(), time.process_time())]
        with open_source(src) as source:
            marks.append((time.perf_counter(), time.process_time()))
            plan = plan_recipe(recipe, source, target=target.tensors)
            marks.append((time.perf_counter(), time.process_time()))
            report = validate(plan, target)
            marks.append((time.perf_counter(), time.process_time()))
        if not report.ok or len(plan.entries) != LAYERS * PARAMS:
            raise SystemExit(f"plan benchmark: unexpected result: {report}")
        spans = {"open": (0, 1), "plan": (1, 2), "validate": (2, 3), "plan+validate": (1, 3), "total": (0, 3)}
        for name, (a, b) in spans.items():
            for clock, suffix in ((0, "wall"), (1, "cpu")):
                seconds = marks[b][clock] - marks[a][clock]
                best[f"{name} {suffix}"] = min(best.get(f"{name} {suffix}", seconds), seconds)
    return best


def main() -> None:
    """Run the planning benchmark alone and print the timings."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--repeat", type=int, default=3, help="runs; the best of each timing is kept (default 3)")
    parser.add_argument("--json", metavar="FILE", help="also write the timings as JSON (benchmarks/record.py)")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import record

    recorder = record.Recorder("plan_bench")
    timings = run(args.workdir, args.repeat)
    print(json.dumps(timings, indent=1))
    recorder.write(
        args.json, {"keys": LAYERS * PARAMS, "rename_steps": PARAMS, "repeat": args.repeat, "best_seconds": timings}
    )


if __name__ == "__main__":
    main()
