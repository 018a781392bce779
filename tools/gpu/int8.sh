#!/usr/bin/env bash
# On the GPU machine, from the repository root: `bash tools/gpu/int8.sh` (about 5 minutes on an H200).
# Measures, with ONNX Runtime's CUDA provider:
#   1. the int8 QDQ SD 1.5 UNet (TensorRT-format QDQ: per-channel int8 weights, per-tensor int8 activations, float
#      biases; quant level 2.5) against the fp16 bundle: UNet step (batch 2, 64x64 latents) and end to end (20 steps);
#   2. weight-only int8 and int4 MatMulNBits for the UNet's Linear layers on the fp16 graph: step time, GPU memory,
#      file size, SQNR against fp16.
# Needs onnxruntime-gpu and diffusers under /tmp/site. Uses $SD15_BUNDLE (an sd15 fp16 bundle of this project,
# random weights seed 0) when it exists, else builds one (static, --target cuda). Both bundles use the same random
# weights, so the images compare. Tables print; logs and int8_gpu.json go to $OUT.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/int8-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || python3 -c "import ldm_export" || { echo "pip install -e . failed"; exit 1; }  # steps side by side race on the install
python3 -c "import torch, onnxruntime as o; print('torch', torch.__version__, 'ort', o.__version__, o.get_available_providers())" | tee "$OUT/env.log"
T0=$(date +%s)
FP16=${SD15_BUNDLE:-/tmp/sd15-cuda-fp16}
if [ "${STAGE:-all}" != build ] && [ ! -f "$FP16/ldm_export.json" ]; then
  FP16=/tmp/sd15-cuda-fp16
  timeout 240 python3 -m ldm_export.cli build --model sd15 --random-weights --precision fp16 --target cuda --static-shape \
    --out $FP16 --force 2>&1 | grep --line-buffered -v Warning | tail -4 | tee "$OUT/build_fp16.log"
fi
INT8=/tmp/sd15-int8
# a short calibration (1 prompt x 3 steps): enough for speed and memory; the quality table comes from the demo model
# STAGE=build builds only; STAGE=probe measures bundles built before (a GPU session builds while other work runs)
[ "${STAGE:-all}" = probe ] && [ -f $INT8/ldm_export.json ] || timeout ${BUILD_TIMEOUT:-600} /usr/bin/time -v python3 -m ldm_export.cli build --model sd15 --random-weights --precision int8 \
  --int8-format tensorrt --calib-size 1 --calib-steps 3 --quality-prompts 0 --threads 16 --out $INT8 --force 2>&1 \
  | grep --line-buffered -v Warning | grep -E "✓|error|Elapsed|Maximum resident|SQNR|layers int8" | tee "$OUT/build_int8.log"
echo "builds took $(( $(date +%s) - T0 )) s" | tee -a "$OUT/build_int8.log"
[ "${STAGE:-all}" = build ] && exit 0
timeout 240 python3 tools/gpu/int8_probe.py "$OUT" $FP16 $INT8 --steps 20 2>&1 | grep --line-buffered -v Warning | tee "$OUT/int8_probe.log"
echo "total $(( $(date +%s) - T0 )) s" | tee -a "$OUT/int8_probe.log"
