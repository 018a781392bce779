"""`ldm-export lora` on --target cuda bundles against a fresh cuda export with --lora, on the CUDA provider.

  python3 tools/gpu/lora_check.py make MODEL FILE            a random PEFT LoRA (rank 8) over MODEL's attention
                                                             (q/k/v/out), feed-forward, proj_in/out, ResNet conv1 and
                                                             text encoder layers
  python3 tools/gpu/lora_check.py compare PATCHED FRESH PLAIN OUT.json
      per initializer of the text encoder(s) and UNet: max abs difference patched vs fresh (and how many changed from
      plain); then the same prompt, seed and sampler through both bundles on the CUDA provider: max pixel difference
      patched vs fresh and patched vs plain (the LoRA's effect).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np


def make(model: str, out: str) -> None:
    import torch
    from safetensors.torch import save_file

    from ldm_export.export.lora import _architecture
    from ldm_export.export.weights import _parameters_on_meta

    with _parameters_on_meta():
        modules = _architecture(model)()
    g = torch.Generator().manual_seed(0)
    keys = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1",
            "q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
    state = {}
    for component, module in modules.items():
        for name, layer in module.named_modules():
            if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)) and name.endswith(keys):
                w = layer.weight
                state[f"{component}.{name}.lora_A.weight"] = torch.randn(8, *w.shape[1:], generator=g) * 0.05
                state[f"{component}.{name}.lora_B.weight"] = torch.randn(w.shape[0], 8, *([1] * (w.ndim - 2)), generator=g) * 0.05
    save_file(state, out)
    print(f"{out}: {len(state) // 2} layers")


def _initializers(bundle: Path, component: str) -> dict:
    import onnx
    from onnx import numpy_helper

    m = json.loads((bundle / "ldm_export.json").read_text())
    model = onnx.load(str(bundle / m["components"][component]["files"][0]))
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def compare(patched: str, fresh: str, plain: str, out: str) -> None:
    from ldm_export.runtime.pipeline import Pipeline

    p, f, b = Path(patched), Path(fresh), Path(plain)
    m = json.loads((p / "ldm_export.json").read_text())
    report = {"target": m["target"], "kernels": m["components"]["unet"]["kernels"], "initializers": {}}
    for c in [c for c in ("text_encoder", "text_encoder_2", "unet") if c in m["components"]]:
        a, fr, base = _initializers(p, c), _initializers(f, c), _initializers(b, c)
        diffs = {k: float(np.abs(a[k].astype(np.float32) - fr[k].astype(np.float32)).max()) for k in a}
        worst = max(diffs, key=diffs.get)
        report["initializers"][c] = {
            "count": len(a), "changed_by_lora": sum(not np.array_equal(a[k], base[k]) for k in a),
            "changed_in_fresh": sum(not np.array_equal(fr[k], base[k]) for k in fr),
            "max_abs_vs_fresh": diffs[worst], "worst": worst, "dtype": str(a[worst].dtype)}
        del a, fr, base
    images = {}
    for name, bundle in (("patched", p), ("fresh", f), ("plain", b)):
        pipe = Pipeline.from_bundle(bundle, provider=os.environ.get("PROVIDER", "cuda"))  # cpu: a dry run here
        images[name] = np.asarray(pipe("a photo of a cat", num_inference_steps=20, seed=1)[0], np.float32)
        del pipe
    report["image_max_abs_patched_vs_fresh"] = float(np.abs(images["patched"] - images["fresh"]).max())
    report["image_mean_abs_patched_vs_fresh"] = float(np.abs(images["patched"] - images["fresh"]).mean())
    report["image_max_abs_patched_vs_plain"] = float(np.abs(images["patched"] - images["plain"]).max())
    Path(out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(sys.argv[2], sys.argv[3])
    else:
        compare(*sys.argv[2:6])
