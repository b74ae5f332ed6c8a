#!/usr/bin/env bash
# Set up if needed, then bring the mesh up on the CPU with the embedded store and the default
# model: gateway on 127.0.0.1:50051, one prefill and one decode worker. Extra arguments go to
# `pdmesh up` (e.g. --prefill 2 --decode 2 --store redis). Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/pdmesh up --device cpu "$@"
