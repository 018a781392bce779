#!/usr/bin/env bash
# On the GPU machine, from the repository root: the tests that need a GPU (kernels, the CUDA engine, the runtime's
# CUDA path, ONNX Runtime's TensorRT providers, TensorRT-RTX; each skips with its reason where its path cannot run),
# then `ldm-export bench` of a tiny static fp16 cuda bundle with two variants of the CUDA engine side by side
# (`ort-nhwc` and `ort-nhwc:fuse_conv_bias=1:sdpa_kernel=1`). Light enough to run beside a big build.
# Needs onnxruntime-gpu and diffusers under /tmp/site (tools/gpu/session.sh sets PYTHONPATH). Logs to $OUT.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-/tmp/site} HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/gpu-tests}; mkdir -p "$OUT"
W=/tmp/gpu-tests-work; rm -rf $W; mkdir -p $W
log() { echo "== $* $(date +%T)" | tee -a "$OUT/gpu_tests.log"; }
log tests
timeout 420 python3 -m pytest -q -p no:cacheprovider -rs tests/test_kernels.py tests/test_engine_cuda.py tests/test_tensorrt.py \
  tests/test_ort_tensorrt.py 2>&1 | tail -25 | tee -a "$OUT/gpu_tests.log"
timeout 300 python3 -m pytest -q -p no:cacheprovider -rs tests/test_pipeline.py -k "cuda" 2>&1 | tail -12 | tee -a "$OUT/gpu_tests.log"
log "bench variants (tiny, static fp16 cuda)"
timeout 200 python3 -m ldm_export.cli build --model tiny --random-weights --precision fp16 --target cuda --static-shape \
  --out $W/tiny --force 2>&1 | grep --line-buffered -v Warning | tail -3 | tee -a "$OUT/gpu_tests.log"
timeout 200 python3 -m ldm_export.cli bench --bundle $W/tiny --device cuda --steps 4 --repeats 5 --warmup 2 --e2e-repeats 1 \
  --backends torch-eager,ort-nhwc,ort-nhwc:fuse_conv_bias=1:sdpa_kernel=1 --out "$OUT" 2>&1 | grep --line-buffered -v Warning \
  | tail -14 | tee -a "$OUT/gpu_tests.log"
log done
