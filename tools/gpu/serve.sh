#!/usr/bin/env bash
# On the GPU machine, from the repository root: `SD15_BUNDLE=/tmp/sd15-cuda-fp16 bash tools/gpu/serve.sh`
# Serves an SD 1.5-architecture fp16 bundle built for CUDA (`tools/gpu/sd15.sh build` makes one) with
# `ldm-export serve --provider cuda`, one replica per GPU, and load-tests it at 20 steps, 512x512, Euler a, CFG 7.5:
# 1, 2, 4 and 8 concurrent clients, a fixed number of requests each: p50/p99 latency, requests per second (per GPU:
# divide by the replica count printed), errors, each replica's host memory before/after, and the GPU memory of
# the replica processes sampled by nvidia-smi. Also: the service's own answers (healthz, sd-models) and that
# every process it started is gone after the load test's SIGTERM. Under 3 minutes on one H200.
# Needs onnxruntime-gpu under /tmp/site and the [serve] wheels carried in .whl/ (see the list in the repo's report:
# ray 2.60.0, fastapi, starlette, uvicorn, pydantic and their dependencies the GPU image lacks).
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/serve-out}; mkdir -p "$OUT"
B=${SD15_BUNDLE:-/tmp/sd15-cuda-fp16}
[ -f "$B/ldm_export.json" ] || { echo "no bundle at $B: run tools/gpu/sd15.sh build first or set SD15_BUNDLE"; exit 1; }
if ! python3 -c "import ray.serve, fastapi, starlette, uvicorn, pydantic" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tail -3
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || python3 -c "import ldm_export" || { echo "pip install -e . failed"; exit 1; }  # steps side by side race on the install
python3 -c "import ray, fastapi, pydantic, onnxruntime as o; print('ray', ray.__version__, 'fastapi', fastapi.__version__, 'pydantic', pydantic.__version__, 'ort', o.__version__, o.get_available_providers())" 2>&1 | tee "$OUT/versions.log"
python3 -m pip check 2>&1 | grep -iE "ray|fastapi|starlette|uvicorn|pydantic|aiohttp|grpc|protobuf|opentelemetry" \
  | tee -a "$OUT/versions.log"  # a dependency of ray[serve] the image holds in a version too old shows here
NGPU=$(nvidia-smi -L | wc -l); echo "GPUs: $NGPU" | tee -a "$OUT/versions.log"
# GPU memory of every compute process every 5 s while the load test runs (the replicas' CUDA sessions)
( while sleep 5; do date +%T; nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader; done ) \
  > "$OUT/gpu_memory.log" 2>&1 &
SAMPLER=$!
timeout 170 python3 -m ldm_export.cli loadtest "$B" --provider cuda --replicas "$NGPU" --max-batch 4 --max-queued 64 \
  --clients 1,2,4,8 --requests ${REQUESTS:-24} --steps 20 --sampler "Euler a" --out "$OUT/loadtest.json" 2>&1 \
  | grep --line-buffered -v Warning | tee "$OUT/loadtest.log"
RC=$?
kill $SAMPLER 2>/dev/null
sleep 3
# nothing of the service may outlive it (the load test stopped it with SIGTERM)
ps -eo pid,args | grep -E "ray::|raylet|gcs_server|ldm_export.cli serve" | grep -v grep | tee "$OUT/leftover_processes.log"
[ -s "$OUT/leftover_processes.log" ] && echo "LEFTOVER PROCESSES" | tee -a "$OUT/loadtest.log"
tail -4 "$OUT/gpu_memory.log"
exit $RC
