"""Planning and partitioning a one-trillion-parameter conversion across 64 simulated workers, from metadata alone.

    .venv/bin/python benchmarks/partition_bench.py --repeat 3 --json benchmarks/results/partition_bench.json

The source is the key layout of a DeepSeek-V3-like mixture of experts at 1.03 trillion parameters in bfloat16: 61
layers of 384 experts (gate, up and down matrices of 2048 x 7168, and a per-expert vector), attention, shared experts
and router, about 95,000 tensors, in safetensors shards of about 5 GB and an index. The shards are sparse files:
their headers are real, their 2 TB of data are holes (nothing is read but headers). The recipe renames every key and
casts every tensor to float16 (a byte-kernel conversion, which the partitioner cuts at whole elements); the output is
safetensors shards of 5 GB. Timed, in this process, each `--repeat` times: opening the source (the index and every
shard's header), planning the recipe, laying out the output (every file, header and tensor offset: the writer's
`layout`) and cutting it into work units for 64 workers (`plan_units`, 4 units per worker). The goal: laying out and
partitioning in under 5 s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

import record  # noqa: E402  (benchmarks/record.py)

LAYERS, EXPERTS, HIDDEN, EXPERT_WIDTH = 61, 384, 7168, 2048
SHARD_BYTES = 5 * 10**9
WORKERS = 64
RULES = r"""ckptx: 1
name: trillion
steps:
  - rename: [['^model\.layers\.(\d+)\.', 'blocks.\1.']]
  - rename: [['\.mlp\.experts\.', '.moe.']]
  - cast: {dtype: float16}
"""


def layout() -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, in order."""
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (129280, HIDDEN)}
    for layer in range(LAYERS):
        p = f"model.layers.{layer}."
        shapes |= {
            f"{p}input_layernorm.weight": (HIDDEN,),
            f"{p}post_attention_layernorm.weight": (HIDDEN,),
            f"{p}self_attn.q_a_proj.weight": (1536, HIDDEN),
            f"{p}self_attn.q_a_layernorm.weight": (1536,),
            f"{p}self_attn.q_b_proj.weight": (24576, 1536),
            f"{p}self_attn.kv_a_proj_with_mqa.weight": (576, HIDDEN),
            f"{p}self_attn.kv_a_layernorm.weight": (512,),
            f"{p}self_attn.kv_b_proj.weight": (32768, 512),
            f"{p}self_attn.o_proj.weight": (HIDDEN, 16384),
            f"{p}mlp.gate.weight": (EXPERTS, HIDDEN),
            f"{p}mlp.gate.e_score_correction_bias": (EXPERTS,),
        }
        for name in ("gate_proj", "up_proj"):
            shapes[f"{p}mlp.shared_experts.{name}.weight"] = (EXPERT_WIDTH, HIDDEN)
        shapes[f"{p}mlp.shared_experts.down_proj.weight"] = (HIDDEN, EXPERT_WIDTH)
        for expert in range(EXPERTS):
            e = f"{p}mlp.experts.{expert}."
            shapes[f"{e}gate_proj.weight"] = (EXPERT_WIDTH, HIDDEN)
            shapes[f"{e}up_proj.weight"] = (EXPERT_WIDTH, HIDDEN)
            shapes[f"{e}down_proj.weight"] = (HIDDEN, EXPERT_WIDTH)
            shapes[f"{e}scale"] = (EXPERT_WIDTH,)
    shapes |= {"model.norm.weight": (HIDDEN,), "lm_head.weight": (129280, HIDDEN)}
    return shapes


def numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def write_source(folder: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    """Sparse bfloat16 safetensors shards of about SHARD_BYTES (real headers, holes for data) and their index."""
    groups: list[list[str]] = [[]]
    filled = 0
    for key, shape in shapes.items():
        size = 2 * numel(shape)
        if groups[-1] and filled + size > SHARD_BYTES:
            groups.append([])
            filled = 0
        groups[-1].append(key)
        filled += size
    weight_map = {}
    for number, keys in enumerate(groups, 1):
        name = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        header, offset = {}, 0
        for key in keys:
            size = 2 * numel(shapes[key])
            header[key] = {"dtype": "BF16", "shape": list(shapes[key]), "data_offsets": [offset, offset + size]}
            offset += size
            weight_map[key] = name
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(folder / name, "wb") as out:
            out.write(len(raw).to_bytes(8, "little") + raw)
            out.truncate(8 + len(raw) + offset)
    index = folder / "model.safetensors.index.json"
    total = sum(2 * numel(shape) for shape in shapes.values())
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return index


def timed(fn: Any) -> tuple[Any, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn()
    return value, time.perf_counter() - wall, time.process_time() - cpu


def once(index: Path, rules: Path, out: Path) -> dict[str, Any]:
    """One pass: open, plan, lay out, partition; the phases' wall and CPU seconds and what they made."""
    import ckptx
    from ckptx.io.read.open import open_source
    from ckptx.io.write.formats import writer_for
    from ckptx.io.write.output_layout import Literal
    from ckptx.io.write.units import plan_units
    from ckptx.io.write.writer import OutputOptions

    phases: dict[str, dict[str, float]] = {}
    source, wall, cpu = timed(lambda: open_source(index))
    phases["open"] = {"wall": wall, "cpu": cpu}
    recipe = ckptx.load_rules(str(rules))
    plan, wall, cpu = timed(lambda: ckptx.plan(recipe, source))
    phases["plan"] = {"wall": wall, "cpu": cpu}
    writer = writer_for(out / "model.safetensors.index.json", plan.entries, OutputOptions(max_shard_size=SHARD_BYTES))
    laid, wall, cpu = timed(lambda: writer.layout(source))
    phases["layout"] = {"wall": wall, "cpu": cpu}
    units, wall, cpu = timed(lambda: plan_units(laid, str(out), WORKERS * 4))
    phases["partition"] = {"wall": wall, "cpu": cpu}
    phases["layout + partition"] = {key: phases["layout"][key] + phases["partition"][key] for key in ("wall", "cpu")}
    data = sum(p.nbytes for p in laid.pieces if not isinstance(p.fill, Literal))
    assert sum(unit.nbytes for unit in units) == data, "the units do not cover the data"
    source.close()
    return {
        "phases": phases,
        "tensors": len(plan.entries),
        "parameters": sum(entry.meta.numel for entry in plan.entries),
        "output_files": len(laid.files),
        "output_bytes": sum(f.size for f in laid.files),
        "pieces": len(laid.pieces),
        "units": len(units),
        "unit_bytes": sorted(unit.nbytes for unit in units),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON (benchmarks/record.py)")
    args = parser.parse_args()
    recorder = record.Recorder("partition_bench")
    work = Path(tempfile.mkdtemp(prefix="ckptx-partition-", dir=args.workdir))
    try:
        (work / "src").mkdir()
        (work / "out").mkdir()
        index = write_source(work / "src", layout())
        rules = work / "trillion.yaml"
        rules.write_text(RULES)
        runs = [once(index, rules, work / "out") for _ in range(args.repeat)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    last = runs[-1]
    sizes = last.pop("unit_bytes")
    results = {
        **{k: v for k, v in last.items() if k != "phases"},
        "workers": WORKERS,
        "source_files": -(-last["output_bytes"] // SHARD_BYTES),
        "unit_bytes": {"min": sizes[0], "median": statistics.median(sizes), "max": sizes[-1]},
        "repeat": args.repeat,
        "runs": [run["phases"] for run in runs],
        "best": {
            phase: {key: min(run["phases"][phase][key] for run in runs) for key in ("wall", "cpu")}
            for phase in runs[0]["phases"]
        },
    }
    recorder.write(args.json, results)
    print(json.dumps({k: v for k, v in results.items() if k != "runs"}, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
