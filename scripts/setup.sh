#!/usr/bin/env bash
# Create .venv and install loramux (editable) with the tested, pinned versions.
# Idempotent: a second run with unchanged constraints/pyproject does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${LORAMUX_VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
stamp="$VENV/.loramux-setup"
want=$(cat constraints.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing into $VENV (torch pinned in constraints.txt)" >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
  "$VENV/bin/python" -m pip install -q -c constraints.txt torch
  "$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[train,dev,ray]"
  echo "$want" > "$stamp"
fi
# loramux's CPU kernels (4-bit product, LoRA term, decode attention), compiled once into the cache (~30 s) so that no server start
# waits for it; without a C++ compiler the server keeps bitsandbytes' way and says so.
"$VENV/bin/python" -m loramux.model.kernels >&2 || echo "setup: no fused 4-bit CPU kernel (see above)" >&2
