#!/usr/bin/env bash
# The main job: set up (once), then `prefixattn demo` on its embedded default (a real
# pretrained LM and real data, both from pip packages). Extra args go to the demo.
#   scripts/demo.sh [demo args...]
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh" demo
exec prefixattn demo "$@"
