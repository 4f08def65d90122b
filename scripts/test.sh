#!/usr/bin/env bash
# The test command: set up (once), lint, check the import layers, then the whole suite (kernel tests run in Triton's
# CPU interpreter when there is no GPU; GPU-only tests and benchmarks skip with a reason).
#   scripts/test.sh [pytest args...]            pinned versions (constraints/ci.txt), .venv
#   scripts/test.sh --latest [pytest args...]   newest releases, in .venv-latest (drift check)
set -euo pipefail
# idle OpenMP threads sleep instead of spinning, so that a second PyTorch job on the same
# cores does not starve this one (prefixattn/_runtime.py); a value you set is kept
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
if [ "${1:-}" = "--latest" ]; then
  shift
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  export PREFIXATTN_PINS=latest
  export PREFIXATTN_VENV="${PREFIXATTN_VENV:-$root/.venv-latest}"
fi
. "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh" test
PREFIXATTN_PINNED_BY="$pins" python - <<'EOF'
import os
from importlib.metadata import PackageNotFoundError, version

names = ["torch", "triton", "transformers", "peft", "accelerate", "safetensors", "numpy"]
names += ["pytest", "hypothesis", "ruff"]
found = []
for name in names:
    try:
        found.append(f"{name} {version(name)}")
    except PackageNotFoundError:
        found.append(f"{name} -")
pins = os.environ["PREFIXATTN_PINNED_BY"]
source = "newest releases" if pins == "latest" else f"pinned by {pins}"
print(f"test.sh: versions ({source}):", ", ".join(found))
EOF
ruff check .
ruff format --check .
python scripts/check_layers.py  # prefixattn/ imports only downward (declared order)
set +e
# two workers by default (the suite is ~15 min on one core of a 2-core machine); whole files
# per worker, so a module's fixtures (servers, models) stay in one process.
# PYTEST_WORKERS=0 runs in this process (no xdist).
python -m pytest -n "${PYTEST_WORKERS:-2}" --dist loadfile "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then  # pytest: no tests collected (e.g. a -k that matches nothing)
  echo "test.sh: pytest collected no tests (exit 5); treating as success" >&2
  exit 0
fi
exit "$rc"
