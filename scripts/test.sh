#!/usr/bin/env bash
# Set up if needed, then lint, type-check and run the whole test suite (CPU; GPU tests skip
# themselves without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/mypy engine kernels kvstore bench gateway pdmesh prefill_svc decode_svc
.venv/bin/python -m pytest -q "$@"
