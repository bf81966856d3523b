#!/usr/bin/env bash
# Set up, then lint and run the whole test suite (tiny random models + the embedded real model).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check rsp_interp analyses tests scripts
.venv/bin/python -m pytest -q "$@"
