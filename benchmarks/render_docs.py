"""Render docs/performance.md from the benchmarks' JSON results and the page's hand-written text.

    python benchmarks/render_docs.py            # write docs/performance.md
    python benchmarks/render_docs.py --check    # exit 1 if docs/performance.md is not what the results give

The text is benchmarks/performance.md.in; every `{{ name }}` in it is replaced by a block made from
benchmarks/results/*.json (each written by a benchmark's `--json FILE`, see benchmarks/record.py): tables,
and the date, command line, machine and load of each run. So the page states no number the results do not
hold, and tests/docs/test_performance_page.py keeps the committed page equal to what this script makes.
Standard library only (no torch, no ckptx).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
TEMPLATE = HERE / "performance.md.in"
PAGE = REPO / "docs" / "performance.md"
PLACEHOLDER = re.compile(r"\{\{\s*([\w.]+)\s*\}\}")
NAMES = (
    "run",
    "torch_out",
    "cow_bench",
    "dcp_bench",
    "zero_bench",
    "plan_bench",
    "suggest_bench",
    "batch",
    "fp8_bench",
    "gguf_bench",
    "audit_bench",
    "workers_bench",
    "partition_bench",
)


def load_results(folder: Path = RESULTS) -> dict[str, dict[str, Any]]:
    """Every benchmark's JSON document, by benchmark name (a missing file is simply absent)."""
    found = {}
    for name in NAMES:
        path = folder / f"{name}.json"
        if path.is_file():
            found[name] = json.loads(path.read_text(encoding="utf-8"))
    return found


# --- formatting -----------------------------------------------------------------------------------------------


def _s(seconds: float) -> str:
    return f"{seconds:.2f}"


def _mib(value: float) -> str:
    return f"{value:,.0f}"


def _x(ratio: float | None) -> str:
    return "" if ratio is None else f"{ratio:.2f}×"


def _spread(values: list[float], fmt: Callable[[float], str] = _s) -> str:
    return f"{fmt(statistics.median(values))} ({fmt(min(values))}–{fmt(max(values))})"


def _table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    align = align or "l" * len(header)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _code(text: str) -> str:
    return f"`{text}`" if "`" not in text else text


def header(doc: dict[str, Any]) -> str:
    """One line: when, how, on what, under which load."""
    m = doc["machine"]
    load = doc["load_average_1min"]
    return (
        f"Measured {doc['date']} with `{doc['command']}` on {m['cores']} cores, {m['memory_gib']} GiB, "
        f"Linux {m['kernel']}, Python {m['python']}, torch {m['torch']}; load average (1 min) "
        f"{load['start']:.2f} at the start, {load['end']:.2f} at the end."
    )


def machines(results: dict[str, dict[str, Any]]) -> str:
    """The machines and dates of every result, as a sentence."""
    dates = sorted({doc["date"] for doc in results.values()})
    kinds = sorted(
        {
            (
                d["machine"]["cores"],
                d["machine"]["memory_gib"],
                d["machine"]["arch"],
                d["machine"]["torch"],
                d["machine"]["python"],
            )
            for d in results.values()
        }
    )
    when = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
    what = "; ".join(
        f"{cores} cores, {memory} GiB of memory, {arch}, torch {torch}, Python {python}"
        for cores, memory, arch, torch, python in kinds
    )
    return f"measured {when} on {what}"


# --- run.py ---------------------------------------------------------------------------------------------------


_BASELINE_OF = {"b": "cp + sync (.pth)"}


def _run_rows(doc: dict[str, Any], size: float) -> list[dict[str, Any]]:
    return [r for r in doc["results"]["rows"] if r["size_gib"] == size]


def _paired(row: dict[str, Any], base: dict[str, Any] | None) -> float | None:
    """Median over rounds of the row's wall time / the baseline's in the same round."""
    if base is None or row is base:
        return None
    return statistics.median(w / b for w, b in zip(row["extra"]["walls"], base["extra"]["walls"]))


def run_table(doc: dict[str, Any]) -> str:
    size = doc["results"]["size_gib"]
    rows = _run_rows(doc, size)
    by_name = {r["name"]: r for r in rows}
    out = []
    for r in rows:
        if r["case"] == "floor" or r["name"].startswith("cp + sync"):
            base = None  # start-up costs; the baselines themselves
        else:
            base = by_name.get(_BASELINE_OF.get(r["case"], "cp + sync"))
        name = _code(r["name"]) if r["case"] in ("floor", "baseline") else r["name"]
        name = name.replace("ckptx convert", "**ckptx convert**")
        out.append([r["case"], name, _s(r["wall"]), _x(_paired(r, base)), _mib(r["rss_mib"])])
    return _table(
        ["case", "command", "fastest wall (s)", "× `cp` + `sync` (median of rounds)", "peak RSS (MiB)"], out, "llrrr"
    )


def run_facts(doc: dict[str, Any]) -> str:
    lines = []
    for key, info in doc["results"]["facts"].items():
        lines.append(
            f"- {key} GiB input: {info['tensors']:.0f} float32 tensors, {info['bytes'] / 2**30:.2f} GiB, the "
            f"largest {info['largest'] / 2**20:.0f} MiB; case (c) casts {info['cast_tensors']:.0f} of them "
            f"({info['cast_bytes'] / 2**20:,.0f} MiB) to bfloat16."
        )
    rounds = doc["results"]["rounds"]
    cache = (
        "page cache dropped before every command (cold input; Python, torch, numpy and ckptx imported once "
        "before it, so programs start warm)"
        if doc["results"]["cache"] == "cold"
        else "inputs read just before every command (warm page cache)"
    )
    lines.append(f"- {rounds} rounds of every command, in a new order each round after the first; {cache}.")
    return "\n".join(lines)


def run_scaling(doc: dict[str, Any]) -> str:
    sizes = sorted({r["size_gib"] for r in doc["results"]["rows"]})
    cases = [("a", "(a) rename only"), ("b", "(b) `.pth` → safetensors"), ("c", "(c) 10% of tensors cast to bf16")]
    header_row = ["case"] + [f"{size:g} GiB" for size in sizes]
    out = []
    for case, label in cases:
        cells = [label]
        for size in sizes:
            rows = _run_rows(doc, size)
            ours = next((r for r in rows if r["case"] == case and r["name"].startswith("ckptx")), None)
            base = next((r for r in rows if r["name"] == "cp + sync"), None)
            cells.append("" if ours is None else f"{_x(_paired(ours, base))}, {_mib(ours['rss_mib'])} MiB")
        out.append(cells)
    return _table(header_row, out, "l" + "r" * len(sizes))


def run_value(doc: dict[str, Any], name: str, field: str = "wall") -> float:
    row = next(r for r in doc["results"]["rows"] if r["name"] == name)
    return float(row[field])


# --- the other benchmarks ---------------------------------------------------------------------------------------


def plan_table(doc: dict[str, Any]) -> str:
    best = doc["results"]["best_seconds"]
    rows = [
        [phase, _s(best[f"{phase} wall"]), _s(best[f"{phase} cpu"])]
        for phase in ("open", "plan", "validate", "plan+validate", "total")
    ]
    keys = doc["results"]["keys"]
    return (
        f"{keys:,} keys, {doc['results']['rename_steps']} rename steps; best of {doc['results']['repeat']} runs.\n\n"
        + _table(["phase", "wall (s)", "CPU (s)"], rows, "lrr")
    )


def torch_out_table(doc: dict[str, Any]) -> str:
    rows = []
    for r in doc["results"]["rows"]:
        rows.append([f"{r['size']:g} GiB", r["name"], _s(r["wall"]), _x(r["ratio"]), _mib(r["rss"])])
    cache = "dropped before every command" if doc["results"]["cache"] == "cold" else "warm"
    return f"{doc['results']['rounds']} rounds, page cache {cache}.\n\n" + _table(
        [
            "input",
            "command",
            "fastest wall (s)",
            "× `cp` + `sync` of the input (median of rounds)",
            "peak RSS (MiB)",
        ],
        rows,
        "llrrr",
    )


def cow_table(doc: dict[str, Any]) -> str:
    cow = doc["results"]["cow"]
    systems = [fs for fs in ("xfs", "btrfs") if fs in cow]
    lines = []
    skipped = [f"{fs}: skipped ({cow[fs]['skipped']})" for fs in systems if "skipped" in cow[fs]]
    measured = [fs for fs in systems if "rows" in cow[fs]]
    if measured:
        names = [r["name"] for r in cow[measured[0]]["rows"]]
        header_row = ["command"] + [f"{fs} {what}" for fs in measured for what in ("wall (s)", "MiB not shared")]
        rows = []
        for name in names:
            cells = [name.replace("ckptx pth", "ckptx .pth").replace("-> pth", "-> .pth")]
            for fs in measured:
                row = next(r for r in cow[fs]["rows"] if r["name"] == name)
                cells += [_s(row["wall"]), f"{row['unshared_mib']:,.1f}"]
            rows.append(cells)
        size = cow[measured[0]]["bytes"] / 2**30
        lines.append(
            f"{size:.2f} GiB of float32 tensors (64 MiB each), keys renamed; one run each; wall time includes "
            "Python's start-up.\n"
        )
        lines.append(_table(header_row, rows, "l" + "r" * (2 * len(measured))))
    lines += skipped
    return "\n".join(lines)


def cow_disk(doc: dict[str, Any]) -> str:
    disk = doc["results"]["disk"]
    rows = []
    for cache in ("warm", "cold"):
        ours, theirs = disk[cache]["ckptx"], disk[cache]["cp_sync"]
        rows.append([cache, _spread(ours), _spread(theirs), _spread([a / b for a, b in zip(ours, theirs)])])
    return (
        f"{disk['bytes'] / 2**30:.2f} GiB safetensors file on {disk['fstype']}, rename only, {disk['rounds']} paired "
        "rounds; median (min–max).\n\n"
        + _table(["cache", "ckptx (s)", "`cp` + `sync` (s)", "ckptx / `cp` + `sync`, per round"], rows, "lrrr")
    )


def dcp_table(doc: dict[str, Any]) -> str:
    r = doc["results"]
    names = {
        "ckptx": "`ckptx convert DIR -o x.safetensors`",
        "torch": "`dcp_to_torch_save` + `torch.load` + `save_file`",
    }
    rows = [[names[k], _s(v["wall"]), _mib(v["rss_mib"])] for k, v in r["routes"].items()]
    equal = "equal tensor for tensor" if r["equal"] else "NOT equal"
    return (
        f"{r['ranks']} ranks, {r['layers']} layers of a Shard(0) and a Shard(1) float32 matrix and a replicated norm, "
        f"{r['bytes'] / 2**30:.2f} GiB in {r['files']} files; outputs {equal}; "
        "one run each.\n\n" + _table(["route", "wall (s)", "peak RSS (MiB)"], rows, "lrr")
    )


def zero_table(doc: dict[str, Any]) -> str:
    r = doc["results"]
    rows = [
        [name, ", ".join(_s(x["wall"]) for x in runs), _mib(max(x["rss_mib"] for x in runs))]
        for name, runs in r["rounds"].items()
    ]
    return (
        f"ZeRO-{r['stage']}, {r['ranks']} ranks, fp32, {r['layers']} blocks of width {r['width']}: a "
        f"{r['state_dict_mib']:,.0f} MiB fp32 state dict in {r['pt_files_mib']:,.0f} MiB of `.pt` files (partitions "
        f"and Adam moments); {r['tensors']} tensors, equal tensor for tensor; warm page cache.\n\n"
        + _table(["command", "wall of each round (s)", "peak RSS (MiB)"], rows, "lrr")
    )


def fp8_table(doc: dict[str, Any]) -> str:
    r = doc["results"]
    what = f"{r['size_gib']} GiB of float8_e4m3fn weights with float32 128x128 block scales to bfloat16"
    return _commands_table(what, r)


def gguf_table(doc: dict[str, Any]) -> str:
    r = doc["results"]
    return _commands_table(f"{r['weights_gib']} GiB of float32 Llama weights (a HF model folder) to GGUF", r)


def _commands_table(what: str, r: dict[str, Any]) -> str:
    """Shuffled rounds of several commands against cp + sync: each round's wall, the median ratio, the peak RSS."""
    rows = [
        [name, ", ".join(_s(x) for x in c["wall_s"]), f"x{c['median_ratio_to_cp']}", _mib(c["max_rss_mib"])]
        for name, c in r["commands"].items()
    ]
    return f"{what}, {r['rounds']} shuffled rounds.\n\n" + _table(
        ["command", "wall of each round (s)", "median wall / cp + sync", "peak RSS (MiB)"], rows, "lrrr"
    )


def suggest_facts(doc: dict[str, Any]) -> str:
    r = doc["results"]
    order = "name order" if r["sorted_header"] else "registration order"
    return _table(
        ["what", "measured"],
        [
            ["source keys / target keys", f"{r['source_keys']:,} / {r['target_keys']:,}"],
            ["source header", order],
            ["wall of each run (s)", ", ".join(_s(t) for t in r["all_seconds"])],
            ["CPU of each run (s)", ", ".join(_s(t) for t in r["all_cpu_seconds"])],
            ["recipe validated", "yes" if r["validated"] else "no"],
            ["keys mapped otherwise than Meta's converter maps them", str(r["wrongly_mapped"])],
            ["rename rows", str(r["rename_rows"])],
            ["close calls reported", str(r["close_calls"])],
        ],
        "lr",
    )


def batch_table(doc: dict[str, Any]) -> str:
    r = doc["results"]
    seconds = r["seconds"]
    first = next(iter(seconds))
    base = statistics.median(seconds[first])
    mib = r["total_bytes"] / 2**20
    rows = [
        [
            f"`-j {w}`",
            _s(statistics.median(runs)),
            _s(min(runs)),
            f"{mib / statistics.median(runs):.0f}",
            f"{base / statistics.median(runs):.2f}×",
        ]
        for w, runs in seconds.items()
    ]
    what = f"to {r['format']}" + (" with an fp16 cast" if r["cast"] else "")
    return (
        f"{r['checkpoints']} DDP training checkpoints, {mib:,.0f} MiB in all, {what}, validated against a manifest; "
        f"{r['repeat']} runs per worker count, interleaved; warm page cache.\n\n"
        + _table(["workers", "median (s)", "best (s)", "MiB/s (median)", f"speed-up vs `-j {first}`"], rows, "lrrrr")
    )


def audit_table(doc: dict[str, Any]) -> str:
    r = doc["results"]
    facts = r["facts"]
    rows = [[row["name"], _spread(row["walls"]), _mib(row["rss_mib"]), f"`{row['command']}`"] for row in r["rows"]]
    return (
        f"{facts['tensors']} float32 tensors, {facts['bytes'] / 2**30:.2f} GiB; {r['rounds']} rounds, {r['cache']} "
        f"page cache. The card's overhead (median of the paired ratios `convert --audit` / `convert` in the same "
        f"round): {r['card_overhead_paired_median']:.2f}×.\n\n"
        + _table(["command", "wall (s), median (range)", "peak RSS (MiB)", "command line"], rows, "lrrl")
    )


def workers_table(doc: dict[str, Any]) -> str:
    r = doc["results"]
    by_name = {(row["case"], row["name"]): row for row in r["rows"]}
    cp = by_name[("baseline", "cp + sync")]
    out = [[_code("cp + sync"), "", _spread(cp["walls"]), "", "", _mib(cp["rss_mib"]), ""]]
    labels = {"cast": "cast to bf16", "rename": "rename only"}
    for row in r["rows"]:
        if row["case"] == "baseline":
            continue
        worker = _mib(row["worker_peak_rss_mib"]) if row["worker_peak_rss_mib"] else ""
        units = f"{row['units']} on {row['workers']}" if row.get("units") else ""
        name = row["name"].replace("ckptx convert", "**ckptx convert**")
        paired = statistics.median(w / b for w, b in zip(row["walls"], cp["walls"]))
        out.append([name, labels[row["case"]], _spread(row["walls"]), _x(paired), units, _mib(row["rss_mib"]), worker])
    equal = "identical (SHA-256 of every file)" if r["identical"] else "NOT identical"
    return (
        f"{r['tensors']} float32 tensors of 64 MiB ({r['bytes'] / 2**30:.2f} GiB) in safetensors shards; "
        f"{r['rounds']} paired rounds, warm page cache; the ckptx outputs of every round were {equal}.\n\n"
        + _table(
            [
                "command",
                "case",
                "wall (s): median (min–max)",
                "× `cp` + `sync` (median of rounds)",
                "units on workers",
                "peak RSS of the process (MiB)",
                "peak RSS of a worker (MiB)",
            ],
            out,
            "llrrrrr",
        )
    )


def workers_summary(doc: dict[str, Any]) -> str:
    rows = []
    labels = {"cast": "cast to bf16", "rename": "rename only"}
    for case, found in doc["results"]["summary"].items():
        rows.append(
            [
                labels[case],
                _x(found["speed-up of --workers 2 over one process"]),
                _x(found["speed-up of dask over one process"]),
                _x(found["one process / cp+sync"]),
            ]
        )
    return _table(
        [
            "case",
            "`--workers 2` speed-up over one process",
            "Dask speed-up over one process",
            "one process × `cp` + `sync`",
        ],
        rows,
        "lrrr",
    )


def partition_table(doc: dict[str, Any]) -> str:
    r = doc["results"]
    best = r["best"]
    phases = ["open", "plan", "layout", "partition", "layout + partition"]
    rows = [[phase, _s(best[phase]["wall"]), _s(best[phase]["cpu"])] for phase in phases]
    sizes = r["unit_bytes"]
    return (
        f"{r['parameters'] / 1e12:.2f} trillion parameters in {r['tensors']:,} tensors; "
        f"{r['output_files']} output files ({r['output_bytes'] / 1e12:.2f} TB); {r['units']} units for "
        f"{r['workers']} workers ({sizes['min'] / 1e9:.1f}–{sizes['max'] / 1e9:.1f} GB each); best of {r['repeat']} "
        "runs.\n\n" + _table(["phase", "wall (s)", "CPU (s)"], rows, "lrr")
    )


# --- the page -------------------------------------------------------------------------------------------------


def blocks(results: dict[str, dict[str, Any]]) -> dict[str, Callable[[], str]]:
    """Placeholder name -> the function making its text (called only for placeholders the template uses)."""
    made: dict[str, Callable[[], str]] = {"machines": lambda: machines(results)}
    for name, doc in results.items():
        made[f"{name}.header"] = lambda doc=doc: header(doc)
    tables: dict[str, tuple[str, Callable[[dict[str, Any]], str]]] = {
        "run.table": ("run", run_table),
        "run.facts": ("run", run_facts),
        "run.scaling": ("run", run_scaling),
        "plan_bench.table": ("plan_bench", plan_table),
        "torch_out.table": ("torch_out", torch_out_table),
        "cow_bench.table": ("cow_bench", cow_table),
        "cow_bench.disk": ("cow_bench", cow_disk),
        "dcp_bench.table": ("dcp_bench", dcp_table),
        "zero_bench.table": ("zero_bench", zero_table),
        "suggest_bench.table": ("suggest_bench", suggest_facts),
        "batch.table": ("batch", batch_table),
        "fp8_bench.table": ("fp8_bench", fp8_table),
        "gguf_bench.table": ("gguf_bench", gguf_table),
        "audit_bench.table": ("audit_bench", audit_table),
        "workers_bench.table": ("workers_bench", workers_table),
        "workers_bench.summary": ("workers_bench", workers_summary),
        "partition_bench.table": ("partition_bench", partition_table),
    }
    for key, (name, fn) in tables.items():
        if name in results:
            made[key] = lambda fn=fn, doc=results[name]: fn(doc)
    if "run" in results:
        doc = results["run"]
        made["run.startup"] = lambda: _s(run_value(doc, "ckptx --version"))
        made["run.startup_rss"] = lambda: _mib(run_value(doc, "ckptx --version", "rss_mib"))
        made["run.torch_import"] = lambda: _s(run_value(doc, "python -c 'import torch'"))
        made["run.torch_import_rss"] = lambda: _mib(run_value(doc, "python -c 'import torch'", "rss_mib"))
    return made


def render(template: str | None = None, results: dict[str, dict[str, Any]] | None = None) -> str:
    """The page: the template with every placeholder filled (an unknown one is an error, not a blank)."""
    template = TEMPLATE.read_text(encoding="utf-8") if template is None else template
    made = blocks(load_results() if results is None else results)

    def fill(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in made:
            raise KeyError(f"{TEMPLATE.name}: no result for {{{{ {name} }}}} (is benchmarks/results/ complete?)")
        return made[name]()

    return PLACEHOLDER.sub(fill, template)


def main(argv: list[str] | None = None) -> int:
    """Write docs/performance.md, or check it (`--check`)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/performance.md differs from the render")
    args = parser.parse_args(argv)
    page = render()
    if args.check:
        current = PAGE.read_text(encoding="utf-8") if PAGE.is_file() else ""
        if current != page:
            print(
                f"{PAGE.relative_to(REPO)} is not what benchmarks/render_docs.py makes of benchmarks/results/; run it",
                file=sys.stderr,
            )
            return 1
        return 0
    PAGE.write_text(page, encoding="utf-8")
    print(f"wrote {PAGE.relative_to(REPO)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
