#!/usr/bin/env bash
# Set up (once) and serve: with no --model, the embedded default model is built locally.
# Extra arguments go to `loramux serve` (see `loramux serve --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec "${LORAMUX_VENV:-.venv}/bin/loramux" serve "$@"
