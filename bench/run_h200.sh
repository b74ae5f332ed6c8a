#!/usr/bin/env bash
# One H200 device call: set up the carried wheels and redis-server, then run "$@" (a step name).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
for f in .deb/*.deb; do dpkg -x "$f" /tmp/redis; done
export PATH=/tmp/redis/usr/bin:/tmp/site/bin:$PATH LD_LIBRARY_PATH=/tmp/redis/usr/lib/x86_64-linux-gnu PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
case "$1" in
  serve8b)
    python -m bench.serve_gpu --shape 8b --batches ${BATCHES:-64 256 512} --gateway-processes ${GATEWAYS:-4} --layouts ${LAYOUTS:-a_up_colocated c_serve_processes b_up_shared_gpu} \
      --work-dir "$OUT/serve8b" --out "$OUT/serve_h200_8b.json" 2>&1 | grep -v "^WARNING" | tail -60 ;;
  serve135m)
    python -m bench.serve_gpu --shape 135m --batches 512 --gateway-processes ${GATEWAYS:-6} \
      --clients ${CLIENTS:-6} --layouts ${LAYOUTS:-a_up_colocated c_serve_processes} \
      --work-dir "$OUT/serve135m" --out "$OUT/serve_h200_135m.json" 2>&1 | grep -v "^WARNING" | tail -30 ;;
  http_vs_grpc)
    # One mesh, the same closed-loop load through its OpenAI HTTP API and its gRPC API (#17).
    python -c "import httpx, starlette, uvicorn" || {
      echo "http_vs_grpc needs starlette, uvicorn and httpx (+ httpcore, certifi, idna) importable: add their wheels to .whl/"; exit 1; }
    python -m bench.http_vs_grpc_gpu --shape ${SHAPE:-8b} --concurrency ${CONCURRENCY:-64 256} --rounds ${ROUNDS:-2} \
      --work-dir "$OUT/http_vs_grpc" --out "$OUT/http_vs_grpc_h200.json" 2>&1 | grep -v "^WARNING" | tail -30 ;;
  sched)
    # fcfs vs mlfq (#23): the engine alone, 8B shape, a heavy-tailed workload near saturation.
    python -m bench.sched --device cuda --shape 8b --clock wall --requests ${REQUESTS:-200} --load ${LOAD:-1.0} \
      --max-num-seqs ${SEATS:-16} --policies ${POLICIES:-fcfs,mlfq,mlfq+swap} --out "$OUT/sched_h200_8b.json" 2>&1 | grep -v "^WARNING" | tail -20 ;;
  gputests)
    python -m pytest -q -p no:cacheprovider -m gpu tests/kernels tests/test_gpu_engine.py tests/test_offload.py \
      tests/test_quant_accuracy.py 2>&1 | tail -25 ;;
  quant8b)
    python -m bench.quant_gpu --shapes 8b --out "$OUT/quant-8b-h200.json" 2>&1 | grep -v "^WARNING" | tail -25 ;;
  moe)
    python -m bench.moe_gpu --out "$OUT/moe-h200.json" 2>&1 | grep -v "^WARNING" | tail -40 ;;
  offload70b)
    python -m bench.offload_gpu --shape 70b --budget-gib 40 --out "$OUT/offload_h200_70b.json" 2>&1 | grep -v "^WARNING" | tail -30 ;;
  profile_serve)
    python -m bench.profile_serve --shape ${SHAPE:-8b} --batch ${BATCH:-256} --layout ${LAYOUT:-a_up_colocated} \
      --out "$OUT/profile_serve" 2>&1 | grep -v "^WARNING" | tail -150 ;;
  gemm_shapes)
    python -m scripts.probes.gemm_shapes --out "$OUT/gemm_shapes.json" 2>&1 | grep -v "^WARNING" | tail -20 ;;
  attention_sweep)
    python -m scripts.probes.decode_attention_sweep --out "$OUT/decode_attention_sweep.json" 2>&1 | tail -60 ;;
  profile)
    python -m scripts.probes.profile_decode --batches 256 512 --steps 20 2>&1 | tail -80 > "$OUT/profile.txt"; head -c 20000 "$OUT/profile.txt" ;;
esac
