#!/usr/bin/env bash
# Set up if needed, then lint, type-check and run the whole test suite (CPU; GPU tests skip
# themselves without CUDA). Extra arguments run just those pytest arguments instead.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/mypy engine kernels kvstore bench gateway pdmesh prefill_svc decode_svc

pytest_run() { .venv/bin/python -m pytest -q -p no:cacheprovider "$@"; }
if [ "$#" -gt 0 ]; then
  pytest_run "$@"
  exit
fi
# One pytest process per group: a mesh module starts several engines (a few GB each with
# their KV caches), and one process that had held them all outgrew a 24 GiB machine.
failed=()
groups=("tests --ignore=tests/mesh" tests/mesh/test_*.py tests/mesh/reliability)
for group in "${groups[@]}"; do
  echo "== pytest $group"
  # shellcheck disable=SC2086 # a group is a list of arguments
  pytest_run $group || failed+=("$group")
done
if [ "${#failed[@]}" -gt 0 ]; then
  echo "failed: ${failed[*]}" >&2
  exit 1
fi
echo "all test groups passed"
