#!/usr/bin/env bash
# `ldm-export lora` on --target cuda bundles, on one GPU, from the repository root: `OUT=/tmp/out bash tools/gpu/lora.sh`.
# For the tiny model, then the SD 1.5 architecture (random weights), fp16, --target cuda --static-shape:
#   plain bundle (sd15: $SD15_BUNDLE when the session built it, else built here), a fresh build with --lora, and
#   `ldm-export lora PLAIN FILE:0.8 --out PATCHED`; wall seconds of the fresh build and of `lora` side by side
#   (timings.log), then tools/gpu/lora_check.py compare: max abs difference per initializer patched vs fresh, and
#   one 20-step image of each bundle on the CUDA provider (max pixel difference patched vs fresh, and vs plain).
# Needs onnxruntime-gpu and diffusers importable (PYTHONPATH=/tmp/site). Writes *.log and lora_{tiny,sd15}.json to
# $OUT. Budget: about 1.5 min for tiny, 4 min for sd15 with $SD15_BUNDLE present (7 without); hard timeouts per step.
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=${PYTHONPATH:-/tmp/site}
OUT=${OUT:-/tmp/lora-out}; mkdir -p "$OUT"; W=/tmp/lora-work; mkdir -p $W
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || python3 -c "import ldm_export" || { echo "pip install -e . failed"; exit 1; }
python3 -c "import torch, onnxruntime as o; print('torch', torch.__version__, 'ort', o.__version__, o.get_available_providers())" | tee "$OUT/versions.log"
timed() {  # timed LABEL LIMIT CMD...: wall seconds into timings.log
  local label=$1 limit=$2; shift 2; local t0; t0=$(date +%s.%N)
  timeout "$limit" "$@" 2>&1 | grep --line-buffered -v Warning | tail -5 | tee -a "$OUT/$label.log"; local rc=${PIPESTATUS[0]}
  echo "$label: exit $rc, $(python3 -c "print(f'{$(date +%s.%N) - $t0:.1f}')") s" | tee -a "$OUT/timings.log"
}
for MODEL in ${LORA_MODELS:-tiny sd15}; do  # LORA_MODELS=sd15: one model
  [ "$MODEL" = sd15 ] && [ "${SKIP_SD15:-0}" = 1 ] && break
  ARGS="--model $MODEL --random-weights --precision fp16 --target cuda --static-shape --force"
  PLAIN=$W/$MODEL-plain; [ "$MODEL" = sd15 ] && [ -f "${SD15_BUNDLE:-/nonexistent}/ldm_export.json" ] && PLAIN=$SD15_BUNDLE
  python3 tools/gpu/lora_check.py make $MODEL $W/$MODEL-lora.safetensors | tee -a "$OUT/make.log"
  [ -f $PLAIN/ldm_export.json ] || timed build_plain_$MODEL 300 python3 -m ldm_export.cli build $ARGS --out $PLAIN
  timed build_fresh_$MODEL 300 python3 -m ldm_export.cli build $ARGS --lora $W/$MODEL-lora.safetensors:0.8 --out $W/$MODEL-fresh
  timed lora_$MODEL 120 python3 -m ldm_export.cli lora $PLAIN $W/$MODEL-lora.safetensors:0.8 --out $W/$MODEL-patched --force
  timeout 200 python3 tools/gpu/lora_check.py compare $W/$MODEL-patched $W/$MODEL-fresh $PLAIN "$OUT/lora_$MODEL.json" 2>&1 \
    | grep --line-buffered -v Warning | tee "$OUT/compare_$MODEL.log"
  rm -rf $W/$MODEL-fresh $W/$MODEL-patched
done
cat "$OUT/timings.log"
