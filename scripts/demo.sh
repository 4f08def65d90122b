#!/usr/bin/env bash
# The main job: set up (once), then `prefixattn demo` on its embedded default (a real
# pretrained LM and real data, both from pip packages). Extra args go to the demo.
#   scripts/demo.sh [demo args...]
set -euo pipefail
# idle OpenMP threads sleep instead of spinning, so that a second PyTorch job on the same
# cores does not starve this one (prefixattn/_runtime.py); a value you set is kept
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
. "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh" demo
exec prefixattn demo "$@"
