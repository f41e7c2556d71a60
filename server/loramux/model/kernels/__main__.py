"""`python -m loramux.model.kernels`: build loramux's CPU kernels now (scripts/setup.sh
does, so that no server start waits for the compiler)."""

import logging
import sys

from loramux.model.kernels import load

logging.basicConfig(level=logging.INFO, format="%(message)s")
sys.exit(0 if load() else 1)
