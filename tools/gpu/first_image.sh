#!/usr/bin/env bash
# The first image and batched generation on an H200, side by side with the steady state, one run:
#   bash tools/gpu/first_image.sh            (from the repository root; SD15_BUNDLE=DIR reuses a static fp16 cuda bundle)
# 1. builds `ldm-export build --model sd15 --random-weights --precision fp16 --target cuda --static-shape` (about 3 min)
#    unless $SD15_BUNDLE names one;
# 2. for each cuDNN convolution search (HEURISTIC, DEFAULT, EXHAUSTIVE), in a fresh process each:
#    Pipeline.from_bundle(provider="cuda") load time, the first 50-step image, 3 more images (steady state);
#    then `ldm-export generate ... --provider cuda --steps 50 --num-images 3` (load, first image, s per image after it);
# 3. prints one table and writes $OUT/first_image.json (+ .md, the per-run JSON and logs).
# Needs onnxruntime-gpu and diffusers under /tmp/site. Under 6 minutes with the build.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/first-image-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || python3 -c "import ldm_export" || { echo "pip install -e . failed"; exit 1; }  # steps side by side race on the install
python3 -c "import torch, onnxruntime as o; print('torch', torch.__version__, 'ort', o.__version__, o.get_available_providers())" \
  | tee "$OUT/env.log"
B=${SD15_BUNDLE:-/tmp/sd15-cuda-fp16-static}
if [ -z "$SD15_BUNDLE" ]; then
  t0=$(date +%s)
  timeout 270 python3 -m ldm_export.cli build --model sd15 --random-weights --precision fp16 --target cuda --static-shape \
    --out "$B" --force 2>&1 | grep --line-buffered -v Warning | tail -8 | tee "$OUT/build.log"
  echo "build: $(( $(date +%s) - t0 )) s" | tee -a "$OUT/build.log"
fi
[ -f "$B/ldm_export.json" ] || { echo "no bundle at $B"; exit 1; }
for S in HEURISTIC DEFAULT EXHAUSTIVE; do
  timeout 60 python3 tools/gpu/first_image.py pipeline "$B" $S "$OUT/pipeline_$S.json" 2>&1 | grep --line-buffered -v Warning \
    | tee "$OUT/pipeline_$S.log"
  timeout 60 python3 -m ldm_export.cli generate "$B" "a photograph of an astronaut riding a horse" --provider cuda \
    --cudnn-search $S --steps 50 --num-images 3 --seed 0 --out "$OUT/gen_$S/image.png" 2>&1 | grep --line-buffered -v Warning \
    | tee "$OUT/generate_$S.log"
  # the CLI's last line on a static bundle (one image a batch): "load X s, first image Y s, then Z s per image"
  python3 - "$OUT/generate_$S.log" "$S" "$OUT/generate_$S.json" <<'PY'
import json, re, sys
text = open(sys.argv[1]).read()
m = re.search(r"load ([\d.]+) s, first image ([\d.]+) s(?:, then ([\d.]+) s per image)?", text)
r = {"search": sys.argv[2]}
if m:
    r.update(load_s=float(m.group(1)), first_image_s=float(m.group(2)), per_image_s=float(m.group(3)) if m.group(3) else None)
json.dump(r, open(sys.argv[3], "w"))
PY
done
python3 tools/gpu/first_image.py table "$OUT" | tee "$OUT/table.log"
