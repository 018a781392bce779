#!/usr/bin/env bash
# On the GPU machine, from the repository root: the DiT path on CUDA at test size, in about two minutes, beside a
# big build (tools/gpu/session.sh gives it 2 threads). Checks what the sd3-medium bench relies on before it runs:
#   1. the CUDA kernel and engine tests (FastGelu, MultiHeadAttention, CUDA graphs and their fallback)
#   2. tiny-sd3 and tiny-flux built as static fp16 --target cuda bundles, every graph verified on the CUDA provider
#      (FastGelu and MultiHeadAttention in the transformer)
#   3. `ldm-export bench` of the tiny-sd3 bundle on cuda: torch-eager, ort (transformer as a CUDA graph), --profile
#   4. `generate` on each bundle with the CUDA provider
# Needs onnxruntime-gpu and diffusers under /tmp/site (tools/gpu/session.sh sets PYTHONPATH). Logs to $OUT.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-/tmp/site} HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/dit-smoke}; mkdir -p "$OUT"
W=/tmp/dit-smoke-work; rm -rf $W; mkdir -p $W
log() { echo "== $* $(date +%T)" | tee -a "$OUT/smoke.log"; }
log tests
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_engine_cuda.py -k "cuda or fast_gelu or graph" \
  2>&1 | tail -15 | tee -a "$OUT/smoke.log"
for m in tiny-sd3 tiny-flux; do
  log "build $m"
  timeout 300 python3 -m ldm_export.cli build --model $m --random-weights --precision fp16 --target cuda --static-shape \
    --out $W/$m --force 2>&1 | grep --line-buffered -v Warning | tail -12 | tee -a "$OUT/smoke.log"
  [ -f $W/$m/ldm_export.json ] && python3 -c "
import json; m = json.load(open('$W/$m/ldm_export.json'))
for c, v in m['components'].items():
    cos = {p: round(min(o['cosine'] for o in r['outputs'].values()), 6) for p, r in v['verification'].items() if isinstance(r, dict) and 'outputs' in r}
    print(c, v['precision'], v['kernels'], cos)" | tee -a "$OUT/smoke.log"
  log "generate $m"
  timeout 120 python3 -m ldm_export.cli generate $W/$m "a red circle on the left" --steps 4 --provider cuda --seed 1 \
    --out $W/$m.png 2>&1 | grep --line-buffered -v Warning | tail -4 | tee -a "$OUT/smoke.log"
done
log "bench tiny-sd3"
timeout 300 python3 -m ldm_export.cli bench --bundle $W/tiny-sd3 --device cuda --backends torch-eager,ort --steps 4 \
  --repeats 5 --warmup 2 --profile --out "$OUT/bench-tiny-sd3" 2>&1 | grep --line-buffered -v Warning | tail -30 | tee -a "$OUT/smoke.log"
log done
