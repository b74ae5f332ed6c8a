#!/usr/bin/env bash
# Set up if needed, then lint, type-check and run the whole test suite (CPU; GPU tests skip
# themselves without CUDA). Extra arguments run just those pytest arguments instead.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/mypy engine kernels kvstore bench scripts/probes gateway serving pdmesh prefill_svc decode_svc
# The layers of pyproject.toml's [tool.importlinter]: imports go downward only.
.venv/bin/lint-imports --no-cache --no-logo

# Hugging Face reference answers computed by one test process are reused by the others of
# this run (tests/conftest.py's hf_greedy), never by another run.
PDMESH_TEST_HF_CACHE=$(mktemp -d)
export PDMESH_TEST_HF_CACHE
trap 'rm -rf "$PDMESH_TEST_HF_CACHE"' EXIT
pytest_run() { .venv/bin/python -m pytest -q -p no:cacheprovider "$@"; }
if [ "$#" -gt 0 ]; then
  pytest_run "$@"
  exit
fi
# A few pytest processes: each mesh module frees its engines (processes of their own) when it
# ends, but one process for everything once outgrew a 24 GiB machine. Grouping saves loading
# torch, the model and the Hugging Face reference once per module; a mesh module not named
# here runs in a process of its own.
failed=()
m=tests/mesh
light="$m/test_auth.py $m/test_compose.py $m/test_grpcurl.py $m/test_metrics.py $m/test_tls.py"
light+=" $m/test_up_cli.py $m/test_model_families_mesh.py $m/test_worker_failure.py"
light+=" $m/test_gateway_processes.py $m/test_priority.py $m/test_mesh_model.py"
# The end-to-end group runs two modules at a time; the others (many small meshes; kills and
# deadlines of a fraction of a second) one at a time.
named=(
  "$light"
  "$m/test_mesh_e2e.py $m/test_multi_turn.py $m/test_openai_api.py -n 2 --dist loadfile"
  "$m/test_chaos.py $m/test_colocated_and_routing.py $m/test_disaggregation.py"
)
# The engine, kernel and store tests run in two worker processes (pytest-xdist; a module
# stays in one): most of them are Python-bound, so two nearly halve their time on two cores.
groups=("tests --ignore=tests/mesh -n 2 --dist loadfile" "${named[@]}")
for file in "$m"/test_*.py; do
  [[ " ${named[*]} " == *" $file "* ]] || groups+=("$file")
done
groups+=("$m/reliability")
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
