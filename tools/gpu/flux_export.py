"""FLUX.1-dev transformer (11.9 B parameters, random weights) exported to ONNX on a GPU and one step verified.

    python tools/gpu/flux_export.py --out DIR [--work /tmp/flux] [--side 128] [--text 512] [--fused]

The fp32 export path of ``ldm-export build`` would hold 48 GB of weights twice in host memory; here the module is
built in fp16 directly on the GPU and traced there (the same wrapper, rotary export patch and opset as the build),
with weights in one external-data file. Then ONNX Runtime's CUDA provider runs one step on the same inputs as
torch. Writes ``flux_export.json`` to DIR: export seconds, file size, peak host RSS, peak GPU memory (torch's
allocator during export; the device's used memory during the ORT run), ORT session load and step time, cosine.
``--fused`` exports as ``--target cuda`` does (each attention one ``com.microsoft::MultiHeadAttention``,
``kernels/flux_attention.py``) and writes ``flux_export_fused.json`` with the count of fused nodes.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import time
from pathlib import Path

import numpy as np


def gpu_used_mb() -> float | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20).stdout
        return float(out.split()[0])
    except Exception:
        return None


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB on Linux


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--work", default="/tmp/flux-transformer")
    p.add_argument("--model", default="flux-dev")
    p.add_argument("--side", type=int, default=128, help="latent side (128: 1024 px)")
    p.add_argument("--text", type=int, default=512, help="T5 tokens")
    p.add_argument("--device", default="cuda", help="cpu: a smoke run of this script with --model tiny-flux, fp32")
    p.add_argument("--fused", action="store_true", help="fused attention (MultiHeadAttention), as --target cuda")
    args = p.parse_args()
    import contextlib

    import onnx
    import torch

    from ldm_export import kernels
    from ldm_export.export import models as M
    from ldm_export.export.dit_models import export_patches, register_onnx_symbolics
    from ldm_export.export.onnx_export import OPSET, compare
    from ldm_export.runtime.flux import image_ids, text_ids
    from ldm_export.zoo import get_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    spec = get_model(args.model)
    cfg = spec.configs["transformer"]
    cuda = args.device == "cuda"
    half = np.float16 if cuda else np.float32
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    name = "flux_export_fused.json" if args.fused else "flux_export.json"
    report: dict = {"model": spec.name, "latent_side": args.side, "text_tokens": args.text, "fused": args.fused,
                    "gpu": torch.cuda.get_device_name(0) if cuda else None, "torch": torch.__version__}
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(args.device):
        module = M.build_module(spec, "transformer").to(torch.float16 if cuda else torch.float32)
    report["parameters_m"] = sum(p.numel() for p in module.parameters()) / 1e6
    report["build_s"] = time.perf_counter() - t0
    wrapper = M.wrap("transformer", {"transformer": module}, spec.family_def).eval()
    rng = np.random.default_rng(0)
    n_img = (args.side // 2) ** 2
    feeds = {
        "hidden_states": rng.standard_normal((1, n_img, cfg["in_channels"])).astype(np.float16),
        "encoder_hidden_states": rng.standard_normal((1, args.text, cfg["joint_attention_dim"])).astype(np.float16),
        "pooled_projections": rng.standard_normal((1, cfg["pooled_projection_dim"])).astype(np.float16),
        "timestep": np.array([0.6], np.float16), "img_ids": image_ids(args.side, args.side).astype(np.float16),
        "txt_ids": text_ids(args.text).astype(np.float16)}
    if cfg.get("guidance_embeds"):
        feeds["guidance"] = np.array([3.5], np.float16)
    names = list(feeds)
    feeds = {n: a.astype(half) for n, a in feeds.items()}
    tensors = [torch.from_numpy(feeds[n]).to(args.device) for n in names]
    with torch.inference_mode():
        sync()
        t = time.perf_counter()
        reference = wrapper(*tensors).float().cpu().numpy()
        sync()
        report["torch_step_ms"] = (time.perf_counter() - t) * 1e3
    path = work / "model.onnx"
    register_onnx_symbolics(OPSET)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    fused = kernels.export_patches(wrapper, "transformer", "cuda") if args.fused else contextlib.nullcontext()
    with export_patches("flux_transformer"), fused, torch.inference_mode():
        torch.onnx.export(wrapper, tuple(tensors), str(path), input_names=names, output_names=["out_hidden_states"],
                          opset_version=OPSET, do_constant_folding=True, dynamo=False)
    report["torch_onnx_export_s"] = time.perf_counter() - t
    report["export_gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    t = time.perf_counter()
    model = onnx.load(str(path), load_external_data=True)
    report["fused_nodes"] = kernels.count_fused(model)
    for f in work.iterdir():
        if f.name != "model.onnx":
            f.unlink()  # the exporter's many per-tensor files -> one model.onnx_data
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx_data", size_threshold=1024)
    del model
    report["repack_s"] = time.perf_counter() - t
    report["files_gb"] = sum(f.stat().st_size for f in work.iterdir()) / 2**30
    report["export_total_s"] = time.perf_counter() - t0
    report["peak_host_rss_gb_after_export"] = rss_gb()
    del wrapper, module, tensors
    if cuda:
        torch.cuda.empty_cache()
    (out / name).write_text(json.dumps(report, indent=2) + "\n")

    import onnxruntime as ort

    base = gpu_used_mb() if cuda else None
    t = time.perf_counter()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    providers = [("CUDAExecutionProvider", {}), "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
    sess = ort.InferenceSession(str(path), so, providers=providers)
    report["ort_load_s"] = time.perf_counter() - t
    report["ort_providers"] = sess.get_providers()
    got = sess.run(["out_hidden_states"], feeds)[0]
    t = time.perf_counter()
    got = sess.run(["out_hidden_states"], feeds)[0]
    report["ort_step_ms_host_timed"] = (time.perf_counter() - t) * 1e3
    used = gpu_used_mb() if cuda else None
    report["ort_gpu_used_mb"] = None if used is None or base is None else used - base
    report["verification"] = compare("out_hidden_states", got.astype(np.float32), reference)
    report["peak_host_rss_gb"] = rss_gb()
    (out / name).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
