#!/usr/bin/env bash
# On the GPU machine, after the `sd15` step built /tmp/sd15-cuda-fp16: `ldm-export bench` of PyTorch eager and the
# runtime's CUDA engine with variants of its ONNX Runtime CUDA provider options side by side in one run (cuDNN's
# conv+bias runtime fusion, ONNX Runtime's own flash attention in place of cuDNN's, both), 50 steps, with the GPU
# kernel profile. `bash tools/gpu/session.sh start "sd15+gpu_tests" sd15_variants`. Writes to $OUT.
OUT=${OUT:-/tmp/sd15-variants}; mkdir -p "$OUT"
BENCH_OUT=$OUT BACKENDS=${BACKENDS:-torch-eager,ort-nhwc,ort-nhwc:fuse_conv_bias=1,ort-nhwc:sdpa_kernel=1,ort-nhwc:fuse_conv_bias=1:sdpa_kernel=1} \
  REPEATS=${REPEATS:-10} timeout ${BENCH_TIMEOUT:-420} bash tools/gpu/sd15.sh bench
