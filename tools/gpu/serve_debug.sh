#!/usr/bin/env bash
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/served}; mkdir -p $OUT
timeout 100 python3 -m ldm_export.cli serve ${SD15_BUNDLE:-/tmp/sd15-cuda-fp16} --provider cuda --port 7999 --log-dir $OUT/logs > $OUT/serve.log 2>&1 &
P=$!
for i in $(seq 1 45); do sleep 2; curl -s -m 2 localhost:7999/healthz > $OUT/health.txt 2>/dev/null && break; done
cat $OUT/health.txt; kill -INT $P; sleep 8; tail -30 $OUT/serve.log; ls $OUT/logs 2>/dev/null | head
