#!/usr/bin/env bash
# Installs redis-server (the Debian/Ubuntu package) if it is not on PATH: the KV store's tests
# run against a real Redis, and the local cluster uses one. Idempotent; safe to run often.
set -euo pipefail

if command -v redis-server >/dev/null 2>&1; then
  exit 0
fi

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_redis.sh: no apt-get here; install redis-server with your package manager" >&2
  exit 1
fi

# Try the local package lists first; refresh them only if the package is not found there.
if ! as_root env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q --no-install-recommends redis-server; then
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
  as_root env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q --no-install-recommends redis-server
fi

command -v redis-server >/dev/null 2>&1 || {
  echo "install_redis.sh: redis-server is still not on PATH after installing it" >&2
  exit 1
}
