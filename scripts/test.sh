#!/usr/bin/env bash
# Set up (once), then lint and run every test. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
VENV=${LORAMUX_VENV:-.venv}
"$VENV/bin/ruff" check .
"$VENV/bin/python" -m pytest -q -p no:cacheprovider --durations=15 "$@"
