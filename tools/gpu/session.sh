#!/usr/bin/env bash
# A GPU machine's work, run in the background so that short commands can start it and poll it.
#   bash tools/gpu/session.sh unpack PART...     reassemble staged wheel parts (core.NN, ray.NN) and install them
#   bash tools/gpu/session.sh start STEP...      run the steps in order, in a new process session, and return
#   bash tools/gpu/session.sh status             print each step's state and log tail; copy every log to $OUT
# Steps run the per-topic scripts of tools/gpu/ with OUT=/tmp/gpu/STEP and SD15_BUNDLE=/tmp/sd15-cuda-fp16.
# Step names: sd15 (build the static fp16 cuda SD 1.5 bundle), first_image, tensorrt, int8 (int8_build, int8_probe),
# serve, sdxl (sdxl_build, sdxl_bench), gpu_tests (the GPU-only tests, light), sd3 (sd3_build, sd3_bench), flux, flux_fused, dit_smoke (tiny DiTs on CUDA);
# "a+b" runs a and b at the same time (builds that load the CPU while the GPU is idle); "STEP@N" runs a step on
# GPU N alone (CUDA_VISIBLE_DEVICES=N) on a machine with several GPUs.
#   bash tools/gpu/session.sh chains "a@0 b@0" "c@1 d@1"   runs each quoted chain in order, the chains side by side
# A step waits for the steps named in its AFTER_<step> variable below (one chain's step needing another's bundle).
set -u
G=/tmp/gpu; mkdir -p $G
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=/tmp/site:$PWD SD15_BUNDLE=/tmp/sd15-cuda-fp16
AFTER_int8_probe=int8_build
run_step() {
  local s=${1%@*} gpu=; [[ $1 == *@* ]] && gpu=${1#*@}; mkdir -p $G/$s
  local after; after=$(eval echo "\${AFTER_$s:-}")
  for a in $after; do  # wait up to 20 min for the step it needs to finish (or be skipped)
    for _ in $(seq 240); do grep -qE "^(exit|skipped)" $G/$a.state 2>/dev/null && break; sleep 5; done
  done
  [ -n "$gpu" ] && export CUDA_VISIBLE_DEVICES=$gpu
  # steps side by side share the host's cores: each gets its share of threads. Two SDXL/SD3 builds that each took
  # every core ran their CPU phases 3-8x slower than alone (CLIP-G export 139 s there against 16 s on a 2-core CPU).
  # a light step (dit_smoke: tiny models) takes 2 threads and leaves the rest to the heavy step beside it
  if [ "$s" = dit_smoke ] || [ "$s" = gpu_tests ]; then export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
  elif [ "${SESSION_PAR:-1}" -gt 1 ]; then
    local share=$(( ($(nproc) - 2 * ${SESSION_LIGHT:-0}) / SESSION_PAR )); export OMP_NUM_THREADS=$share MKL_NUM_THREADS=$share
  fi
  # `skip STEP...` (below) drops steps queued behind the one running
  if grep -qx "$s" $G/skip 2>/dev/null; then echo "skipped $(date +%T)" > $G/$s.state; return; fi
  echo "running $(date +%T)" > $G/$s.state
  local t0=$(date +%s)
  case $s in
    sd15) OUT=$G/$s bash -c 'set -o pipefail; /usr/bin/time -v python3 -m ldm_export.cli build --model sd15 --random-weights --precision fp16 --target cuda --static-shape --out $SD15_BUNDLE --force 2>&1 | grep --line-buffered -v Warning | tail -40 > $OUT/build.log' ;;
    sdxl_build) OUT=$G/$s STAGE=build bash tools/gpu/sdxl.sh > $G/$s/run.log 2>&1 ;;
    sdxl_bench) OUT=$G/$s STAGE=bench bash tools/gpu/sdxl.sh > $G/$s/run.log 2>&1 ;;
    sd3_build|sd3_bench|flux) OUT=$G/$s bash tools/gpu/sd3.sh ${s#sd3_} > $G/$s/run.log 2>&1 ;;
    flux_fused) OUT=$G/$s bash tools/gpu/sd3.sh flux-fused > $G/$s/run.log 2>&1 ;;
    int8_build) OUT=$G/$s STAGE=build bash tools/gpu/int8.sh > $G/$s/run.log 2>&1 ;;
    int8_probe) OUT=$G/$s STAGE=probe bash tools/gpu/int8.sh > $G/$s/run.log 2>&1 ;;
    *) OUT=$G/$s bash tools/gpu/$s.sh > $G/$s/run.log 2>&1 ;;
  esac
  echo "exit $? after $(( $(date +%s) - t0 )) s ($(date +%T))" > $G/$s.state
}
case "$1" in
  unpack)
    shift; mkdir -p /tmp/stg
    for p in "$@"; do cp .stage/$p /tmp/stg/; done
    for kind in core ray; do
      ls /tmp/stg/$kind.* >/dev/null 2>&1 || continue
      cat /tmp/stg/$kind.* | tar xf - -C /tmp/stg && rm /tmp/stg/$kind.*
    done
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/stg/*.whl 2>&1 | tail -3
    python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "pip install -e . failed"
    python3 -c "import torch; import onnxruntime as o; print('ort', o.__version__, o.get_available_providers())"
    ;;
  start)
    shift
    setsid bash -c "for s in $*; do if [[ \$s == *+* ]]; then x=\${s//+/ }; set -- \$x; export SESSION_LIGHT=0; [[ +\$s+ == *+dit_smoke+* || +\$s+ == *+gpu_tests+* ]] && SESSION_LIGHT=1; export SESSION_PAR=\$(( \$# - SESSION_LIGHT )); for x in \${s//+/ }; do bash $0 one \$x & done; wait; else SESSION_PAR=1 bash $0 one \$s; fi; done; echo all-done > $G/ALL" \
      > $G/session.log 2>&1 < /dev/null &
    echo $! > /tmp/gpu-session.pid
    echo started "$@"
    ;;
  one) run_step "$2" ;;
  chains)
    shift; export SESSION_PAR=$#
    setsid bash -c "for c in \"\$@\"; do (for s in \$c; do bash $0 one \$s; done) & done; wait; echo all-done > $G/ALL" \
      chains "$@" > $G/session.log 2>&1 < /dev/null &
    echo $! > /tmp/gpu-session.pid
    echo started chains "$@"
    ;;
  skip) shift; for s in "$@"; do echo "$s" >> $G/skip; done; echo "will skip $*" ;;
  stop)  # the whole process group of the last start (setsid made it a group leader)
    [ -f /tmp/gpu-session.pid ] && kill -- -"$(cat /tmp/gpu-session.pid)" 2>/dev/null; sleep 2
    [ -f /tmp/gpu-session.pid ] && kill -9 -- -"$(cat /tmp/gpu-session.pid)" 2>/dev/null; rm -f /tmp/gpu-session.pid
    echo stopped ;;
  status)
    for f in $G/*.state; do [ -f "$f" ] && echo "$(basename $f .state): $(cat $f)"; done
    [ -f $G/ALL ] && echo ALL DONE
    nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader; free -g | sed -n 2p
    for d in $G/*/; do for f in $d*.log; do [ -f "$f" ] && { echo "== $f"; tail -n ${TAIL:-6} "$f"; }; done; done
    [ -n "${OUT:-}" ] && find $G -type f -size -4M ! -name '*.onnx*' ! -name '*.safetensors' ! -name '*.plan' ! -name '*.engine' -printf '%P\n' | tar czf $OUT/gpu-logs.tgz -C $G -T - 2>/dev/null
    ;;
esac
