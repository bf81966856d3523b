#!/usr/bin/env bash
# Set up, then run the headline experiment on the embedded model (SmolLM2-135M-Instruct).
# Extra arguments go to `rsp-interp attention-sink`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/rsp-interp models
.venv/bin/rsp-interp attention-sink --model smollm2-135m --out runs/attention-sink "$@"
