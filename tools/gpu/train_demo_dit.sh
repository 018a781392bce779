#!/usr/bin/env bash
# On the GPU machine (an H200), from the repository root: `bash tools/gpu/train_demo_dit.sh`.
# Trains the embedded demo DiT (ldm_export/demo/train_dit.py: SD3-class MMDiT, 3.6M parameters, flow matching on the
# demo's 8x8x4 latents with the demo's VAE and CLIP text encoder frozen), bf16 autocast, batch 1024, for a 240 s
# budget, then the adherence table of the torch model (diffusers' FlowMatchEulerDiscreteScheduler, 120 prompts,
# guidance 1..10) at shifts 1 and 3. Needs diffusers (staged with onnxruntime-gpu under /tmp/site).
# Writes to $OUT: model/transformer (fp16 safetensors, ~7 MB), model/scheduler, train_log.jsonl, grid.png, train.log.
# Wall time: ~1 min data + 4 min training + ~1 min evaluation.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-/tmp/site} HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/demo-dit-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || python3 -c "import ldm_export" || { echo "pip install -e . failed"; exit 1; }  # steps side by side race on the install
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, torch.cuda.get_device_name())" \
  | tee "$OUT/train.log"
timeout 540 python3 -m ldm_export.demo.train_dit --out "$OUT" --device cuda --batch ${BATCH:-1024} --lr ${LR:-1e-3} \
  --seconds ${SECONDS_BUDGET:-240} --steps 100000 --log-every 200 --eval --eval-shifts 1 3 2>&1 \
  | grep --line-buffered -v Warning | tee -a "$OUT/train.log"
ls -la "$OUT" "$OUT/model/transformer" | tee -a "$OUT/train.log"
# the weights again in 3 MB parts (log collectors that skip large or .safetensors files keep these):
#   cat weights.part-* > model/transformer/diffusion_pytorch_model.safetensors; sha256sum -c weights.sha256
W="$OUT/model/transformer/diffusion_pytorch_model.safetensors"
[ -f "$W" ] && (cd "$OUT" && split -b 3M -d "$W" weights.part- && sha256sum "model/transformer/diffusion_pytorch_model.safetensors" > weights.sha256 \
  && cp model/transformer/config.json transformer_config.json && cp model/scheduler/scheduler_config.json scheduler_config.json)
