#!/usr/bin/env bash
# SDXL architecture (random weights) on one GPU, from the repository root: `OUT=/tmp/out bash tools/gpu/sdxl.sh`.
# 1. build: `ldm-export build --model sdxl --random-weights --precision fp16 --target cuda --static-shape` (1024x1024,
#    CFG batch 2; the VAE decoder stays fp32 by the SDXL VAE's force_upcast); wall time and peak memory from
#    /usr/bin/time -v, per-component precision, fused kernels and verification cosines from the manifest.
# 2. bench: `ldm-export bench` with torch-eager, torch-compile and ort-nhwc (the runtime's CUDA engine: static
#    shapes, CUDA graphs, channels-last, fused kernels) side by side in one run, 30 steps, Euler, CFG 7.5.
#    Targets: UNet step <= 30 ms; end to end >= 1.4x torch-compile and >= 2x eager. Beside ort-nhwc, three variants of
#    its CUDA provider options (BACKENDS= overrides the list; PROFILE=1 adds --profile). The PyTorch backends decode
#    in fp32, as the bundle and diffusers' SDXL pipeline do.
# Needs onnxruntime-gpu and diffusers importable (PYTHONPATH=/tmp/site, as tools/gpu/session.sh installs them). Writes build.log,
# build_summary.json, bench.log and bench_sdxl_cuda.{json,md,png} to $OUT. Budget: about 12 minutes (on an H100 with 16
# cores: build 7 min 16 s beside two other jobs, 52 GB peak RSS; bench 4.5 min, 155 s of it compiling); hard timeouts.
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=${PYTHONPATH:-/tmp/site}
OUT=${OUT:-/tmp/sdxl-out}; mkdir -p "$OUT"
B=${SDXL_BUNDLE:-/tmp/sdxl-cuda-fp16}
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || python3 -c "import ldm_export" || { echo "pip install -e . failed"; exit 1; }  # steps side by side race on the install
python3 -c "import torch, onnxruntime as o, diffusers; print('torch', torch.__version__, 'ort', o.__version__, o.get_available_providers(), 'diffusers', diffusers.__version__, torch.cuda.get_device_name(0))" | tee "$OUT/versions.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/versions.log"

t0=$(date +%s)
# STAGE=build builds only; STAGE=bench benches a bundle built before (a GPU session builds while other work runs)
[ "${STAGE:-all}" != bench ] && timeout ${BUILD_TIMEOUT:-1200} /usr/bin/time -v python3 -m ldm_export.cli -v build --model sdxl --random-weights \
  --precision fp16 --target cuda --static-shape --out $B --force 2>&1 | grep --line-buffered -v Warning | tee "$OUT/build.log"
echo "build exit ${PIPESTATUS[0]} after $(( $(date +%s) - t0 )) s" | tee -a "$OUT/build.log"
grep -E "Elapsed \(wall clock\)|Maximum resident set size" "$OUT/build.log"
[ -f $B/ldm_export.json ] && python3 - "$B" "$OUT" <<'PY' | tee -a "$OUT/build.log"
import json, sys, pathlib
b, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
m = json.loads((b / "ldm_export.json").read_text())
summary = {c: {"precision": v["precision"], "kernels": v.get("kernels"),
               "cosine": {p: min(o["cosine"] for o in r["outputs"].values()) for p, r in v["verification"].items()},
               "mb": round(sum(m["files"][f]["size"] for f in v["files"]) / 2**20, 1)}
           for c, v in m["components"].items()}
(out / "build_summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary))
PY

[ "${STAGE:-all}" = build ] && exit 0
t1=$(date +%s)
BA=""; BK=torch-eager,torch-compile
# the runtime's engine, then variants of its CUDA provider options side by side in the same run: cuDNN's conv+bias
# runtime fusion (off by default for the first image's sake: docs/gpu.md) and ONNX Runtime's own flash attention in
# place of cuDNN's (sdpa_kernel=1)
V=ort-nhwc,ort-nhwc:fuse_conv_bias=1,ort-nhwc:sdpa_kernel=1,ort-nhwc:fuse_conv_bias=1:sdpa_kernel=1
[ -f $B/ldm_export.json ] && { BA="--bundle $B"; BK=${BACKENDS:-torch-eager,torch-compile,$V}; }
[ -n "${PROFILE:-}" ] && BA="$BA --profile"
[ -z "$BA" ] && echo "no bundle (build failed or timed out): benching the PyTorch backends alone" | tee "$OUT/bench.log"
timeout ${BENCH_TIMEOUT:-560} python3 -m ldm_export.cli bench $BA --model sdxl --device cuda --backends $BK --steps 30 \
  --repeats ${REPEATS:-5} --e2e-repeats ${E2E_REPEATS:-1} --warmup 2 --out "$OUT" 2>&1 | grep --line-buffered -v Warning | tee -a "$OUT/bench.log"
echo "bench exit ${PIPESTATUS[0]} after $(( $(date +%s) - t1 )) s; total $(( $(date +%s) - t0 )) s" | tee -a "$OUT/bench.log"
