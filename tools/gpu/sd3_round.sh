#!/usr/bin/env bash
# On the GPU machine, in the background (setsid), from a copy of the repository (a later call's sync of the working
# tree cannot touch it): tools/gpu/seq_smoke.sh (the fp16 --sequential-cfg path on tiny-sd3, verified on CUDA), then
# tools/gpu/sd3_adaln_probe.py on SD3-medium's whole transformer with PROBE_ARGS. TESTS=1 runs tools/gpu/gpu_tests.sh
# (the GPU tests and a tiny bench) before the smoke. State in /tmp/job/STATE, logs and
# results under /tmp/job. Poll with: cat /tmp/job/STATE; tail /tmp/job/probe.log
#   bash tools/gpu/sd3_round.sh start   smoke, then the probe (about 8 minutes)
#   bash tools/gpu/sd3_round.sh quick   the GPU tests (tools/gpu/gpu_tests.sh), then the smoke (about 6 minutes)
#   bash tools/gpu/sd3_round.sh full    smoke, then the SD3-medium --sequential-cfg build and its bench against
#                                       torch.compile and eager (tools/gpu/sd3.sh; about 25 minutes)
set -u
J=/tmp/job
copy() {  # the tree as it is now, installed from /tmp/repo
  rm -rf /tmp/repo $J && mkdir -p /tmp/repo $J && cp -r $(ls -A | grep -v '^.devwheels$') /tmp/repo/ && cd /tmp/repo || exit 1
  python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "pip install -e failed"; exit 1; }
  export PYTHONPATH=/tmp/site:/tmp/repo HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
}
[ "${1:-}" = quick ] && TESTS=1  # quick: the tests and the smoke, without the probe
TESTS_CMD=":"; [ "${TESTS:-0}" = 1 ] && TESTS_CMD="OUT=$J/tests bash tools/gpu/gpu_tests.sh > $J/tests.log 2>&1; echo tests-done >> $J/STATE"
SMOKE="$TESTS_CMD; OUT=$J/smoke bash tools/gpu/seq_smoke.sh > $J/smoke.log 2>&1; echo smoke-done >> $J/STATE"
case "${1:-}" in
  start)
    copy
    setsid nohup bash -c "$SMOKE;
      python3 tools/gpu/sd3_adaln_probe.py --out $J/probe ${PROBE_ARGS:---layers 24 --variants adaln,adaln-packed,batch2 --loop 28 --sdpa 1,32} \
        > $J/probe.log 2>&1; echo \"probe-done \$?\" >> $J/STATE" > /dev/null 2>&1 < /dev/null &
    echo started ;;
  quick)  # the GPU tests, then the smoke (about 6 minutes)
    copy
    setsid nohup bash -c "$SMOKE" > /dev/null 2>&1 < /dev/null &
    echo started ;;
  full)
    copy
    setsid nohup bash -c "$SMOKE; export SEQUENTIAL_CFG=1 OUT=$J/sd3;
      bash tools/gpu/sd3.sh build > $J/build.log 2>&1; echo \"build-done \$?\" >> $J/STATE;
      BACKENDS=${BACKENDS:-ort,torch-compile,torch-eager} bash tools/gpu/sd3.sh bench > $J/bench.log 2>&1;
      echo \"bench-done \$?\" >> $J/STATE" > /dev/null 2>&1 < /dev/null &
    echo started ;;
  *) echo "usage: bash tools/gpu/sd3_round.sh start|quick|full"; exit 2 ;;
esac
