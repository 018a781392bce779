#!/usr/bin/env bash
# On the GPU machine: the fp16 `--sequential-cfg` path on tiny-sd3 (it cannot be verified on a CPU: its fused fp16
# graph has no CPU kernels): build it and the batch-2 bundle (static fp16 cuda, each graph verified on the CUDA
# provider), draw one image with each on CUDA, and compare them. Logs to $OUT/seq_smoke.log.
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/seq-smoke}; mkdir -p "$OUT"; W=/tmp/seq-smoke-work; rm -rf $W; mkdir -p $W
for kind in seq plain; do
  flag=""; [ $kind = seq ] && flag="--sequential-cfg"
  timeout 300 python3 -m ldm_export.cli build --model tiny-sd3 --random-weights --precision fp16 --target cuda \
    --static-shape $flag --out $W/$kind --force 2>&1 | grep -v Warning | tail -4
  timeout 120 python3 -m ldm_export.cli generate $W/$kind "a red circle on the left" --provider cuda --steps 8 --seed 5 \
    --out $W/$kind.png 2>&1 | grep -v Warning | tail -2
done 2>&1 | tee "$OUT/seq_smoke.log"
python3 - <<'PY' 2>&1 | tee -a "$OUT/seq_smoke.log"
import json
import numpy as np
from PIL import Image
a, b = (np.asarray(Image.open(f"/tmp/seq-smoke-work/{k}.png"), np.int16) for k in ("seq", "plain"))
m = json.load(open("/tmp/seq-smoke-work/seq/ldm_export.json"))["components"]["transformer"]
print("transformer kernels:", m["kernels"])
print("verification:", {p: min(o["cosine"] for o in r["outputs"].values()) for p, r in m["verification"].items()
                        if isinstance(r, dict) and "outputs" in r})
print(f"image seq vs plain: max {np.abs(a - b).max()}, mean {np.abs(a - b).mean():.3f} (8-bit levels)")
PY
