#!/usr/bin/env bash
# The pytest-benchmark grid on a CUDA machine (by hand; the GPU session runs
# benchmarks/run_gpu.sh instead). Runs the grid, writes the JSON and the report, print the table;
# then scripts/host_overhead.py (host time per call, <gpu>-<date>-host.json).
#
#   benchmarks/run_grid.sh [OUT_DIR] [core|full] [extra pytest args...]
#
#   OUT_DIR   where <gpu>-<date>.json, <gpu>-<date>.md and the PNG plots go
#             (default: benchmarks/results)
#   core|full the grid (default: core, ~3 min on an H100; full is the whole issue grid)
#
# Environment:
#   BENCH_BUDGET_S  soft budget in seconds (default 480): GPU rows that would start after it
#                   are skipped with a reason, so the session always ends, writes its JSON
#                   and its report well inside a 10-minute limit; 0 = no budget.
#   PYTHON          the interpreter (default: python)
#
# Installs nothing and needs no network: torch, triton, pytest, pytest-benchmark,
# matplotlib (and transformers + peft for the end-to-end rows) must already be there.
# Runs from the repository root with PYTHONPATH=. so the checkout's prefixattn is used.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
OUT_DIR="${1:-benchmarks/results}"
GRID="${2:-core}"
shift "$(( $# < 2 ? $# : 2 ))"
case "$GRID" in
  core|full) ;;
  *) echo "run_grid.sh: grid must be 'core' or 'full', got '$GRID'" >&2; exit 64 ;;
esac
PY="${PYTHON:-python}"
BUDGET="${BENCH_BUDGET_S:-480}"
export PYTHONPATH=".${PYTHONPATH:+:${PYTHONPATH}}"
unset TRITON_INTERPRET PREFIXATTN_BENCH_SMOKE

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "run_grid.sh: torch sees no CUDA device; on a CPU machine run the smoke suite instead:" >&2
  echo "            pytest benchmarks" >&2
  exit 1
fi
mkdir -p "$OUT_DIR" || exit 1

GPU="$("$PY" -c '
import re, torch
name = torch.cuda.get_device_name(0).lower().replace("nvidia", "")
print(re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "gpu")
')"
JSON="$OUT_DIR/$GPU-$(date -u +%Y%m%d).json"
if [ -e "$JSON" ]; then
  JSON="$OUT_DIR/$GPU-$(date -u +%Y%m%d-%H%M%S).json"
fi
export PREFIXATTN_BENCH_COMMAND="benchmarks/run_grid.sh $OUT_DIR $GRID${*:+ $*} (BENCH_BUDGET_S=$BUDGET)"

start=$(date +%s)
"$PY" -m pytest benchmarks \
  --benchmark-enable \
  --benchmark-json="$JSON" \
  --benchmark-columns=min,median,max,rounds \
  --bench-grid="$GRID" \
  --bench-budget-s="$BUDGET" \
  -p no:cacheprovider \
  "$@"
rc=$?
echo
echo "run_grid.sh: pytest exited $rc after $(( $(date +%s) - start )) s; results in $JSON"

# host time per call: prefixattn's Python vs Triton's launches (split and fused backward)
echo
"$PY" scripts/host_overhead.py --json "${JSON%.json}-host.json" || rc=$(( rc ? rc : 1 ))

if [ -s "$JSON" ]; then
  echo
  "$PY" benchmarks/report.py "$JSON" --out "$OUT_DIR" || rc=$(( rc ? rc : 1 ))
else
  echo "run_grid.sh: no results file was written" >&2
  rc=$(( rc ? rc : 1 ))
fi
exit "$rc"
