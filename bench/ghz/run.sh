#!/usr/bin/env bash
# Runs the ghz load tests in this folder against a running gateway.
#
#   bash bench/ghz/run.sh [HOST:PORT] [extra ghz flags...]
#
# HOST:PORT defaults to 127.0.0.1:50051 (start a mesh first: `pdmesh up`). Each config's
# summary is printed and kept in bench/out/ghz_<config>.txt (add `--format json` for JSON).
set -euo pipefail
cd "$(dirname "$0")/../.."

if ! command -v ghz >/dev/null 2>&1; then
  cat >&2 <<'HELP'
ghz is not installed. Install it, then run this script again:
  - Go 1.21+:  go install github.com/bojand/ghz/cmd/ghz@latest   (binary in $(go env GOPATH)/bin)
  - Homebrew:  brew install ghz
  - Release binaries: https://github.com/bojand/ghz/releases (unpack `ghz` onto your PATH)
Without ghz, `pdmesh bench serve --target HOST:PORT` drives the gateway from Python.
HELP
  exit 127
fi

target=${1:-127.0.0.1:50051}
shift || true
mkdir -p bench/out
for config in bench/ghz/generate_unary.json bench/ghz/generate_stream.json; do
  name=$(basename "$config" .json)
  echo "== ghz $name against $target"
  ghz --config "$config" "$@" "$target" | tee "bench/out/ghz_$name.txt"
done
