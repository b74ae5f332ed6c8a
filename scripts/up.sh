#!/usr/bin/env bash
# Set up if needed, then serve the default model on the CPU.
# Until the gRPC mesh lands (issue 3) this streams one chat completion offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/pdmesh generate --chat --device cpu "${@:-Explain in two sentences what a KV cache is.}"
