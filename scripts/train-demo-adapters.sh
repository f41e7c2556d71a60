#!/usr/bin/env bash
# Reproduce the demo adapters committed under adapters/ (uppercase, json, signoff): QLoRA on
# the default model (SmolLM2-135M-Instruct, NF4) from data/<task>.jsonl, the base model's own
# answers restyled (data/make_chat_demo_data.py). About 2.5 minutes per adapter on 2 CPU cores.
#   scripts/train-demo-adapters.sh [TASK ...]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
VENV=${LORAMUX_VENV:-.venv}
for task in "${@:-uppercase json signoff}"; do
  for t in $task; do
    "$VENV/bin/loramux" train --model smollm2-135m-instruct --data "data/$t.jsonl" --eval-data "data/$t-eval.jsonl" \
      --out "adapters/$t" --overwrite --rank 8 --alpha 16 --dropout 0 --lr 2e-3 --epochs 4 --seed 0 \
      --save-total-limit 1
    rm -rf "adapters/$t/checkpoints"
  done
done
