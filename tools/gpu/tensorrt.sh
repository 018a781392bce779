#!/usr/bin/env bash
# On the GPU machine (an H200, compute capability 9.0), from the repository root: `bash tools/gpu/tensorrt.sh`.
# What it does, in about 3 minutes, logging everything to $OUT (default /tmp/trt-out):
#  1. installs the TensorRT-RTX wheels from .whl/ (tensorrt_rtx_cu13_libs-1.7.1.116-py3-none-manylinux_2_28_x86_64.whl
#     and tensorrt_rtx_cu13_bindings-1.7.1.116-cp312-none-manylinux_2_28_x86_64.whl; cp312 = this machine's Python)
#     and this package (no deps); onnxruntime-gpu and diffusers are expected under /tmp/site as for sd15.sh;
#  2. builds the demo bundle (fp32, target cpu) and a demo fp16 --target tensorrt bundle (export on the CPU);
#  3. `ldm-export engines` on the demo bundle with the GPU (TensorRT-RTX's CURRENT compute capability) and with
#     --compute-capability 8.9: records what builds and what refuses;
#  4. tries to run those plans (our TensorRTEngine, then TensorRT-RTX's own deserializer) and records the refusal;
#  5. ONNX Runtime path: generate on the --target tensorrt bundle with the CUDA provider (PSNR against the CPU image),
#     then with the TensorRT and NvTensorRTRTX providers if this onnxruntime lists them (falls back otherwise);
#  6. the TensorRT / ONNX Runtime GPU tests (they skip with their reason where a path cannot run here).
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/trt-out}; mkdir -p "$OUT"; W=/tmp/trt-work; rm -rf $W; mkdir -p $W
exec > >(tee "$OUT/tensorrt.log") 2>&1
step() { echo; echo "=== $* ($(date -u +%T))"; }

step install
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || python3 -c "import ldm_export" || { echo "pip install -e . failed"; exit 1; }  # steps side by side race on the install
if ls .whl/tensorrt_rtx_cu13_*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-deps --no-index .whl/tensorrt_rtx_cu13_*.whl || echo "TensorRT-RTX wheels did not install"
else
  echo "no .whl/tensorrt_rtx_cu13_*.whl: TensorRT-RTX not installed (the builder steps will say so)"
fi
nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv
python3 -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"
python3 -c "import tensorrt_rtx_bindings as t; print('tensorrt-rtx', t.__version__)" || true

step "build bundles (export on the CPU)"
timeout 150 python3 -m ldm_export.cli build --out $W/demo --force 2>&1 | tail -4
timeout 150 python3 -m ldm_export.cli build --target tensorrt --precision fp16 --out $W/demo-trt16 --force 2>&1 | tail -4

step "engines on this GPU (TensorRT-RTX, compute capability CURRENT)"
timeout 120 python3 -m ldm_export.cli -v engines $W/demo 2>&1 | grep -v "^DEBUG" | tail -15
step "engines for compute capability 8.9 (an L4 / RTX 40), built here"
timeout 120 python3 -m ldm_export.cli engines $W/demo --compute-capability 8.9 2>&1 | tail -15
timeout 120 python3 -m ldm_export.cli engines $W/demo-trt16 --compute-capability 8.9 2>&1 | tail -15
ls -la $W/demo/engines/* $W/demo-trt16/engines/* 2>&1

step "run the plans here"
timeout 60 python3 - "$W/demo" <<'PY' 2>&1
import sys, glob
from ldm_export.runtime.bundle import Bundle
from ldm_export.runtime.errors import LdmExportError
from ldm_export.runtime.engine_tensorrt import TensorRTEngine, load_tensorrt_engine, require_tensorrt, trt_logger
b = Bundle.open(sys.argv[1])
try:
    load_tensorrt_engine(b, "unet")
    print("load_tensorrt_engine(unet): loaded")
except LdmExportError as e:
    print("load_tensorrt_engine(unet) refused:", e)
for plan in sorted(glob.glob(sys.argv[1] + "/engines/*/unet.plan")):
    try:
        TensorRTEngine(plan, b.spec("unet"))
        print(plan, ": loaded")
    except LdmExportError as e:
        print(plan, ": TensorRTEngine refused:", e)
    trt = require_tensorrt("tensorrt-rtx")
    lg = trt_logger(trt)
    rt = trt.Runtime(lg)
    data = open(plan, "rb").read()
    print("  get_engine_validity:", rt.get_engine_validity(data[:rt.engine_header_size]))
    eng = rt.deserialize_cuda_engine(data)
    print("  deserialize_cuda_engine:", "engine" if eng is not None else "None", "| TensorRT errors:", lg.errors)
PY

step "ONNX Runtime: CUDA provider on the --target tensorrt fp16 bundle, against the CPU"
for p in cpu cuda tensorrt nv-tensorrt-rtx; do
  timeout 120 python3 -m ldm_export.cli generate $W/demo-trt16 "a red circle on the left" --seed 1 --steps 20 \
    --provider $p --out "$OUT/demo-trt16-$p.png" 2>&1 | tail -4
done
python3 - "$OUT" <<'PY'
import sys, numpy as np
from PIL import Image
ref = np.asarray(Image.open(f"{sys.argv[1]}/demo-trt16-cpu.png"), np.float64)
for p in ("cuda", "tensorrt", "nv-tensorrt-rtx"):
    try:
        x = np.asarray(Image.open(f"{sys.argv[1]}/demo-trt16-{p}.png"), np.float64)
    except FileNotFoundError:
        print(p, "no image"); continue
    mse = np.mean((x - ref) ** 2)
    print(p, "PSNR vs cpu:", "inf" if mse == 0 else f"{10 * np.log10(255**2 / mse):.1f} dB")
PY
ls $W/demo-trt16/engines 2>/dev/null && du -sh $W/demo-trt16/engines/* 2>/dev/null

step "GPU tests"
timeout 200 python3 -m pytest -q -p no:cacheprovider -rs tests/test_tensorrt.py tests/test_ort_tensorrt.py \
  -k "end_to_end or provider_matches or falls_back" 2>&1 | tail -12
step done
