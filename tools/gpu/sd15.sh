#!/usr/bin/env bash
# On the GPU machine, from the repository root: `bash tools/gpu/sd15.sh build` then `bash tools/gpu/sd15.sh bench`.
# build: the static fp16 cuda bundle, the GPU-only tests, and the optimised-graph checks (Memcpy/Shape/Transpose).
# bench: `ldm-export bench` on every backend, alone on the machine (timings), with the GPU kernel profile;
#        ort-nhwc is the runtime's own CUDA engine (channels-last, cuDNN conv+bias fusion), ort the plain NCHW one.
# check: the GPU tests only.
# probe: a second bundle without the residual folds (LDM_EXPORT_DISABLE_KERNELS=residual), then tools/gpu/probe.py
#        on both, with padded convolution channels and cuDNN attention as further variants.
# Needs onnxruntime-gpu and diffusers installed under /tmp/site; writes logs and reports to $BENCH_OUT.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1
OUT=${BENCH_OUT:-/tmp/bench-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || python3 -c "import ldm_export" || { echo "pip install -e . failed"; exit 1; }  # steps side by side race on the install
python3 -c "import torch, onnxruntime as o, diffusers; print('torch', torch.__version__, 'ort', o.__version__, o.get_available_providers(), 'diffusers', diffusers.__version__)"
B=${BUNDLE:-/tmp/sd15-cuda-fp16}
case "$1" in
  build)
    /usr/bin/time -v python3 -m ldm_export.cli -v build --model sd15 --random-weights --precision fp16 --target cuda \
      --static-shape --out $B --force 2>&1 | grep --line-buffered -v Warning | tee "$OUT/build.log"
    python3 -c "import json; m=json.load(open('$B/ldm_export.json')); print(json.dumps({c: (v['precision'], v['kernels'], {p: min(o['cosine'] for o in r['outputs'].values()) for p, r in v['verification'].items()}) for c, v in m['components'].items()}))" | tee -a "$OUT/build.log"
    timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_engine_cuda.py 2>&1 | tail -15 | tee "$OUT/gpu_tests.log"
    [ -d $B ] && timeout 240 python3 tools/gpu/check_graphs.py $B --nhwc 2>&1 | tee "$OUT/graphs.log"
    # the bundle as built against the CUDA provider's conv+bias fusion (cuDNN runtime fusion, which the runtime uses)
    [ -d $B ] && timeout 200 python3 tools/gpu/probe.py "$OUT/probe" bundle=$B --option-variant fuse_conv_bias=1 2>&1 \
      | grep --line-buffered -v Warning | tee "$OUT/probe.log"; rm -rf "$OUT/probe/graphs"
    ;;
  bench)
    BK=torch-eager,torch-compile,tensorrt; BA=""; PROF=""  # --profile records the ort backends' kernels only
    [ -d $B ] && { BK=${BACKENDS:-torch-eager,torch-compile,ort,ort-nhwc,tensorrt}; BA="--bundle $B"; PROF=--profile; }
    python3 -m ldm_export.cli bench $BA --device cuda --backends $BK --steps 50 --repeats ${REPEATS:-10} \
      --e2e-repeats 2 --warmup 3 $PROF --out "$OUT" 2>&1 | grep --line-buffered -v Warning | tee "$OUT/bench.log"
    ;;
  check)  # the GPU tests alone (kernels, engine, the runtime's CUDA path on tiny bundles): no sd15 build
    timeout 400 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_engine_cuda.py \
      tests/test_pipeline.py -k "cuda or kernel or fused or skip or reference or residual" 2>&1 | tail -15 | tee "$OUT/gpu_tests.log"
    ;;
  probe)
    B0=/tmp/sd15-cuda-fp16-nores
    LDM_EXPORT_DISABLE_KERNELS=residual python3 -m ldm_export.cli build --model sd15 --random-weights --precision fp16 \
      --target cuda --static-shape --out $B0 --force 2>&1 | grep --line-buffered -v Warning | tail -3 | tee "$OUT/build_nores.log"
    timeout 330 python3 tools/gpu/probe.py "$OUT/probe" residual=$B no-residual=$B0 --pad-channels --cudnn-attention \
      2>&1 | grep --line-buffered -v Warning | tee "$OUT/probe.log"; rm -rf "$OUT/probe/graphs"
    ;;
esac
