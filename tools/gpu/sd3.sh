#!/usr/bin/env bash
# On the GPU machine (an H200), from the repository root. With no argument (as tools/gpu/session.sh runs it): build,
# bench and flux in order, about 12 minutes in all. One phase per call:
#   bash tools/gpu/sd3.sh build   the sd3-medium architecture with random weights as a static fp16 cuda bundle at
#                                 1024² (CLIP-L, CLIP-G, T5-XXL, MMDiT with fused joint attention = one
#                                 MultiHeadAttention per block, bias + tanh GELU = one FastGelu per feed-forward, 16-channel VAE fp32 by force_upcast); each component
#                                 verified on the CUDA provider; /usr/bin/time for wall time and peak RSS
#   bash tools/gpu/sd3.sh bench   `ldm-export bench` on that bundle (BENCH_TIMEOUT s, 540): ort first (the figure the
#                                 run exists for, safe from the timeout), torch-eager, torch-compile,
#                                 28 steps, CFG 7.0 (transformer batch 2, 333 text tokens), GPU kernel profile of
#                                 ort's transformer step; targets: transformer step <= 36 ms (ort), end to end faster
#                                 than torch-compile in the same run
#   bash tools/gpu/sd3.sh flux    the FLUX.1-dev transformer (11.9 B) exported to ONNX (fp16 on the GPU, external
#                                 data, static 1024²: 4096 image + 512 text tokens) and one step run by ONNX Runtime
#                                 CUDA against torch: export time, peak host RSS and GPU memory, cosine
#   bash tools/gpu/sd3.sh flux-fused  the same with fused attention (--target cuda: one MultiHeadAttention per
#                                 attention, 57 in FLUX.1): flux_export_fused.json, to compare with flux's
#   bash tools/gpu/sd3.sh probe   tools/gpu/sd3_adaln_probe.py: PROBE_LAYERS (6) of SD3-medium's blocks at full width,
#                                 today's batch-2 graph against the fused AdaLN batch-1 graphs, with torch eager and
#                                 torch.compile, in one run (about 3 minutes); PROBE_ARGS adds options (--loop 28: the
#                                 runtime's sampler loop per variant, --profile: GPU kernels by kind)
#   bash tools/gpu/sd3.sh tests   the DiT test files on the GPU machine
# SEQUENTIAL_CFG=1 builds with --sequential-cfg (the transformer at batch 1 with the fused AdaLN modulation, CFG as
# two calls a step) into /tmp/sd3-medium-cuda-fp16-seq, and bench reads that bundle.
# Needs onnxruntime-gpu and diffusers staged under /tmp/site (as for sd15.sh). Logs, JSON and tables go to $OUT.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-/tmp/site} HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/sd3-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || python3 -c "import ldm_export" || { echo "pip install -e . failed"; exit 1; }  # steps side by side race on the install
python3 -c "import torch, onnxruntime as o, diffusers; print('torch', torch.__version__, 'ort', o.__version__, o.get_available_providers(), 'diffusers', diffusers.__version__)" | tee "$OUT/versions.log"
SEQ=""; [ -n "${SEQUENTIAL_CFG:-}" ] && SEQ="--sequential-cfg"
B=${BUNDLE:-/tmp/sd3-medium-cuda-fp16${SEQ:+-seq}}
if [ $# -eq 0 ]; then
  for phase in build bench flux; do echo "== $phase $(date +%T)"; bash "$0" $phase; done
  exit 0
fi
case "$1" in
  build)
    /usr/bin/time -v timeout ${BUILD_TIMEOUT:-1500} python3 -m ldm_export.cli -v build --model sd3-medium --random-weights --precision fp16 \
      --target cuda --static-shape $SEQ --out $B --force 2>&1 | grep --line-buffered -v Warning | tee "$OUT/sd3_build.log"
    [ -f $B/ldm_export.json ] && python3 -c "
import json; m = json.load(open('$B/ldm_export.json'))
rows = {c: {'precision': v['precision'], 'kernels': v['kernels'],
            'cosine': {p: min(o['cosine'] for o in r['outputs'].values()) for p, r in v['verification'].items() if isinstance(r, dict) and 'outputs' in r}}
        for c, v in m['components'].items()}
print(json.dumps(rows, indent=1))" | tee "$OUT/sd3_verification.json"
    du -sh $B/* 2>/dev/null | tee -a "$OUT/sd3_build.log"
    ;;
  bench)
    [ -d $B ] || { echo "no bundle at $B: run 'bash tools/gpu/sd3.sh build' first"; exit 1; }
    timeout ${BENCH_TIMEOUT:-540} python3 -m ldm_export.cli bench --bundle $B --device cuda --backends ${BACKENDS:-ort,torch-eager,torch-compile} \
      --steps 28 --guidance-scale 7.0 --repeats ${REPEATS:-10} --e2e-repeats ${E2E_REPEATS:-1} --warmup 3 --profile --out "$OUT" 2>&1 \
      | grep --line-buffered -v Warning | tee "$OUT/sd3_bench.log"
    ;;
  flux)
    /usr/bin/time -v timeout ${FLUX_TIMEOUT:-360} python3 tools/gpu/flux_export.py --out "$OUT" --work /tmp/flux-dev-transformer 2>&1 \
      | grep --line-buffered -v Warning | tee "$OUT/flux_export.log"
    ;;
  flux-fused)
    /usr/bin/time -v timeout ${FLUX_TIMEOUT:-360} python3 tools/gpu/flux_export.py --fused --out "$OUT" --work /tmp/flux-dev-fused 2>&1 \
      | grep --line-buffered -v Warning | tee "$OUT/flux_export_fused.log"
    ;;
  probe)
    timeout ${PROBE_TIMEOUT:-540} python3 tools/gpu/sd3_adaln_probe.py --out "$OUT" --layers ${PROBE_LAYERS:-6} \
      --variants ${PROBE_VARIANTS:-batch2,adaln,adaln-biased-qkv} ${PROBE_ARGS:-} 2>&1 \
      | grep --line-buffered -v Warning | tee "$OUT/sd3_adaln_probe.log"
    ;;
  tests)
    timeout 500 python3 -m pytest -q -p no:cacheprovider tests/test_dit_export.py tests/test_dit_pipeline.py \
      tests/test_dit_runtime.py 2>&1 | tail -15 | tee "$OUT/dit_tests.log"
    ;;
  *) echo "usage: bash tools/gpu/sd3.sh build|bench|probe|flux|flux-fused|tests"; exit 2 ;;
esac
