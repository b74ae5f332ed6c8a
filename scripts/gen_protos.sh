#!/usr/bin/env bash
# Regenerates the Python stubs in pdmesh/v1/ from protos/pdmesh/v1/*.proto.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.}
.venv/bin/python -m grpc_tools.protoc -I protos --python_out="$out" --grpc_python_out="$out" \
  --pyi_out="$out" protos/pdmesh/v1/*.proto
