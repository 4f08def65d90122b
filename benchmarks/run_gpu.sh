#!/usr/bin/env bash
# The GPU session's one command: correctness core, headline rows, serving, report.
#
#   benchmarks/run_gpu.sh [--dry-run] [OUT_DIR] [-- extra args for gpu_session.run]
#
#   OUT_DIR   where the step files, run.log and report.{md,json} go (default: $OUT, else
#             benchmarks/results/session-<UTC date-time>); at most 7 files, no sub-folders
#   --dry-run every step's plumbing on the CPU: tiny shapes, Triton's interpreter, fp32
#             (CI runs it: benchmarks/test_gpu_session_dryrun.py); not a measurement
#
# Budgets: each step runs in its own process under a hard limit (benchmarks/gpu_session/
# run.py, STEPS and STAGES: ~3.5 min correctness core incl. the engine's CUDA-graph
# decode check, ~2.7 min headline rows plus what the core left, ~1.5 min serving); the
# whole command is bounded by SESSION_TOTAL_S (default 480 s, the dry run 460 s: a hang
# guard; it needs ~50 s of CPU time) plus a 20 s margin. A killed step keeps every
# record it had written.
#
# Wheels: if .whl/ holds wheels (python -m benchmarks.gpu_session.prepare writes it;
# the GPU machine has no registry), they are installed into /tmp/site first and put on
# PYTHONPATH (the serving stage needs fastapi / uvicorn / pydantic, not on the image).
# Exit status: 0 when every step finished without an error record or failed check.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
DRY=""
if [ "${1:-}" = "--dry-run" ]; then
  DRY="--dry-run"
  shift
fi
OUT_DIR="${1:-${OUT:-benchmarks/results/session-$(date -u +%Y%m%d-%H%M%S)}}"
shift "$(( $# > 0 ? 1 : 0 ))"
[ "${1:-}" = "--" ] && shift
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null 2>&1 || PY=python
if [ -n "$DRY" ]; then TOTAL="${SESSION_TOTAL_S:-460}"; else TOTAL="${SESSION_TOTAL_S:-480}"; fi
mkdir -p "$OUT_DIR" || exit 1

if [ -z "$DRY" ] && compgen -G ".whl/*.whl" >/dev/null; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl; then
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:${PYTHONPATH}}"
    echo "run_gpu.sh: installed $(ls .whl/*.whl | wc -l) carried wheels into /tmp/site"
  else
    echo "run_gpu.sh: installing the carried wheels failed; the serving stage will skip" >&2
  fi
fi
export PYTHONPATH=".${PYTHONPATH:+:${PYTHONPATH}}"
export PREFIXATTN_SESSION_COMMAND="benchmarks/run_gpu.sh${DRY:+ $DRY} $OUT_DIR${*:+ $*}"
export PYTHONUNBUFFERED=1

timeout -k 10 "$(( TOTAL + 20 ))" "$PY" -m benchmarks.gpu_session.run --out "$OUT_DIR" \
  --total-s "$TOTAL" $DRY "$@"
rc=$?
[ "$rc" = 124 ] && echo "run_gpu.sh: the whole session hit its ${TOTAL} s limit" >&2
echo
if [ -s "$OUT_DIR/report.md" ]; then
  sed -n '/^## Targets/,/^## Correctness/p' "$OUT_DIR/report.md"
  sed -n '/^## CUDA-graph decode/,/^## Kernel rows/p' "$OUT_DIR/report.md"
fi
echo "run_gpu.sh: exit $rc; files in $OUT_DIR: $(ls "$OUT_DIR" | tr '\n' ' ')"
exit "$rc"
