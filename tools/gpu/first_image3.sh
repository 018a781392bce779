#!/usr/bin/env bash
# The runtime's defaults (HEURISTIC search, no conv+bias runtime fusion) on the SD 1.5 static fp16 bundle: the first
# image of a process from a cold CUDA JIT cache and from a warm one, the steady state, and `generate --num-images 3`.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/first3}; mkdir -p $OUT
B=${SD15_BUNDLE:-/tmp/sd15-cuda-fp16}
export CUDA_CACHE_PATH=/tmp/cudacache3; rm -rf $CUDA_CACHE_PATH
timeout 90 python3 tools/gpu/first_image.py pipeline $B HEURISTIC $OUT/pipeline_cold.json 2>&1 | grep -v "W:onnx" | tail -1
timeout 60 python3 tools/gpu/first_image.py pipeline $B HEURISTIC $OUT/pipeline_warm.json 2>&1 | grep -v "W:onnx" | tail -1
timeout 60 python3 -m ldm_export.cli generate $B "a photograph of an astronaut riding a horse" --provider cuda --steps 50 \
  --num-images 3 --seed 0 --out $OUT/gen/image.png 2>&1 | grep -v "W:onnx" | tail -2
