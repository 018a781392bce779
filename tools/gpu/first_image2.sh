#!/usr/bin/env bash
# Where the first image's time goes: cuDNN's conv+bias runtime fusion (NVRTC-compiled kernels, cached in the CUDA
# JIT cache) on and off, with a cold cache (emptied) and a warm one, HEURISTIC search. Needs $SD15_BUNDLE.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/first2}; mkdir -p $OUT
B=${SD15_BUNDLE:-/tmp/sd15-cuda-fp16}
export CUDA_CACHE_PATH=/tmp/cudacache
for FUSE in 0 1; do
  rm -rf $CUDA_CACHE_PATH
  timeout 90 python3 tools/gpu/first_image_fusion.py $B $FUSE HEURISTIC $OUT/fuse${FUSE}_cold.json 2>&1 | grep -v "W:onnx" | tail -2
  timeout 60 python3 tools/gpu/first_image_fusion.py $B $FUSE HEURISTIC $OUT/fuse${FUSE}_warm.json 2>&1 | grep -v "W:onnx" | tail -2
done
