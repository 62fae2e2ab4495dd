#!/usr/bin/env bash
# Run every benchmark once at a modest size, each writing its JSON into benchmarks/results/, then render
# docs/performance.md from those files (benchmarks/render_docs.py). Takes about half an hour on 2 cores;
# needs root for the page-cache drops and the copy-on-write mounts (the benchmarks say what they skip).
#
#   PY=.venv/bin/python benchmarks/record_all.sh [NAME ...]     # default: every benchmark
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=benchmarks/results
mkdir -p "$OUT" bench-out
export HF_HUB_OFFLINE=1
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(run torch_out cow_bench dcp_bench zero_bench plan_bench suggest_bench batch fp8_bench audit_bench llm_folder_bench workers_bench partition_bench)
for name in "${names[@]}"; do
    echo "== $name" >&2
    case "$name" in
        run)           "$PY" benchmarks/run.py --size-gib 2 --scaling 1,4 --repeat 3 --json "$OUT/run.json" ;;
        torch_out)     "$PY" benchmarks/torch_out.py --size-gib 2 --repeat 3 --json "$OUT/torch_out.json" ;;
        cow_bench)     "$PY" benchmarks/cow_bench.py --size-gib 2 --rounds 5 --json "$OUT/cow_bench.json" ;;
        dcp_bench)     "$PY" benchmarks/dcp_bench.py --size-gib 2 --ranks 4 --json "$OUT/dcp_bench.json" ;;
        zero_bench)    "$PY" benchmarks/zero_bench.py --rounds 2 --json "$OUT/zero_bench.json" ;;
        fp8_bench)     "$PY" benchmarks/fp8_bench.py --size-gib 1 --repeat 3 --json "$OUT/fp8_bench.json" ;;
        plan_bench)    "$PY" benchmarks/plan_bench.py --workdir bench-out --repeat 3 --json "$OUT/plan_bench.json" ;;
        suggest_bench) "$PY" benchmarks/suggest_bench.py --repeat 3 --json "$OUT/suggest_bench.json" ;;
        batch)         "$PY" benchmarks/batch.py --repeat 3 --json "$OUT/batch.json" ;;
        audit_bench)   "$PY" benchmarks/audit_bench.py --size-gib 2 --repeat 3 --json "$OUT/audit_bench.json" ;;
        llm_folder_bench) "$PY" benchmarks/llm_folder_bench.py --repeats 3 --json "$OUT/llm_folder_bench.json" ;;
        workers_bench) "$PY" benchmarks/workers_bench.py --rounds 5 --json "$OUT/workers_bench.json" ;;
        partition_bench) "$PY" benchmarks/partition_bench.py --repeat 3 --json "$OUT/partition_bench.json" ;;
        *) echo "unknown benchmark: $name" >&2; exit 2 ;;
    esac
done
"$PY" benchmarks/render_docs.py
