#!/usr/bin/env bash
# Set up (or refresh) the project's virtualenv in .venv: CPU torch first, then ftdist with its
# dependencies and the dev extra. Quick the second time: it only reinstalls when pyproject.toml changed.
#   bash launch/setup.sh            # PYTHON=python3.11 to pick the interpreter
# On a GPU machine, install the torch build for your CUDA first, then run this (it keeps an installed torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
stamp="$VENV/.ftdist-setup"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
# a plain `torch` requirement would pull the newest CUDA build (GBs): pin the CPU build first
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  "$VENV/bin/pip" install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
"$VENV/bin/pip" install -q -e ".[dev]"
echo "$want" > "$stamp"
echo "ftdist environment ready in $VENV"
