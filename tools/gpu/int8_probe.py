"""int8 on a CUDA GPU with ONNX Runtime: the int8 QDQ UNet against the fp16 bundle (UNet step, end to end), and
weight-only int8/int4 ``MatMulNBits`` for the UNet's Linear layers (memory and speed). Prints tables, writes JSON.

    python3 tools/gpu/int8_probe.py OUT FP16_BUNDLE INT8_BUNDLE [--steps 20]
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np


def gpu_used_mb() -> float:
    """Device memory in use (all processes), MB; 0 where no CUDA device is visible (a dry run on a CPU)."""
    try:
        import torch

        free, total = torch.cuda.mem_get_info()
    except Exception:  # no CUDA: the run still checks the script's logic
        return 0.0
    return (total - free) / 2**20


def time_unet(engine, feeds, repeats=20, warmup=3) -> dict:
    for _ in range(warmup):
        engine.run(feeds)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        engine.run(feeds)
        ts.append(time.perf_counter() - t0)
    a = np.asarray(ts) * 1e3
    return {"median_ms": float(np.median(a)), "p90_ms": float(np.percentile(a, 90)), "n": repeats}


def unet_feeds(spec, dtype_of, side=64):
    rng = np.random.default_rng(0)
    feeds = {}
    for t in spec.inputs:
        shape = [2 if d == "batch" else side if d in ("height", "width") else 77 if d == "sequence" else d for d in t.shape]
        feeds[t.name] = (rng.standard_normal(shape) if t.name != "timestep" else np.full(shape, 500.0)).astype(dtype_of(t))
    return feeds


def measure_unet(name, path, spec, provider_engine, out, side=64):
    """Load one UNet graph on the CUDA provider; GPU memory it takes, step latency, output."""
    gc.collect()
    base = gpu_used_mb()
    t0 = time.perf_counter()
    engine = provider_engine(path, spec)
    load_s = time.perf_counter() - t0
    feeds = unet_feeds(spec, lambda t: np.dtype(t.dtype), side)
    first = engine.run(feeds)["out_sample"].astype(np.float32)
    row = {"graph": name, "file_mb": sum(p.stat().st_size for p in Path(path).parent.glob(Path(path).name + "*")) / 2**20,
           "load_s": load_s, "gpu_mb": gpu_used_mb() - base, **time_unet(engine, feeds)}
    out[name] = row
    print(f"{name:28s} step {row['median_ms']:8.2f} ms (p90 {row['p90_ms']:.2f})  GPU +{row['gpu_mb']:7.0f} MB  "
          f"file {row['file_mb']:7.0f} MB  load {load_s:5.1f} s", flush=True)
    return engine, feeds, first


def matmul_nbits(src: Path, dst: Path, bits: int) -> dict:
    """Weight-only quantisation of every MatMul with a constant weight (the Linear layers) to ``bits`` with ONNX
    Runtime's MatMulNBitsQuantizer (block 32, symmetric); convolutions stay as they are."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(src))
    t0 = time.perf_counter()
    q = MatMulNBitsQuantizer(model, bits=bits, block_size=32, is_symmetric=True)
    q.process()
    onnx.save_model(q.model.model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=dst.name + ".data")
    n = sum(1 for node in q.model.model.graph.node if node.op_type == "MatMulNBits")
    return {"seconds": time.perf_counter() - t0, "matmulnbits_nodes": n}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("fp16_bundle")
    p.add_argument("int8_bundle")
    p.add_argument("--steps", type=int, default=20)
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    import onnxruntime as ort
    from ldm_export.runtime.bundle import Bundle
    from ldm_export.runtime.engine import OrtEngine
    from ldm_export.runtime.pipeline import Pipeline, cuda_engine

    result = {"onnxruntime": ort.__version__, "providers": ort.get_available_providers(), "unet": {}, "end_to_end": {},
              "errors": {}}
    fp16, int8 = Bundle.open(a.fp16_bundle), Bundle.open(a.int8_bundle)
    result["fp16_bundle"] = {"path": a.fp16_bundle, "static": fp16.spec("unet").is_static, "target": fp16.manifest.get("target")}
    result["int8_bundle"] = {"path": a.int8_bundle, "int8": int8.manifest.get("int8", {}).get("quantisation")}
    save = lambda: (out / "int8_gpu.json").write_text(json.dumps(result, indent=2) + "\n")  # noqa: E731

    print("\n== UNet step, batch 2 (CFG), 64x64 latents, ONNX Runtime CUDA ==", flush=True)
    cuda = lambda path, spec: OrtEngine(path, spec, provider="cuda")  # noqa: E731  plain session, NCHW, no CUDA graph
    ref = None
    for name, path, spec, make in (
            ("fp16 bundle (runtime engine)", fp16.model_path("unet"), fp16.spec("unet"), lambda p, s: cuda_engine(fp16, "unet")),
            ("fp16 bundle (plain session)", fp16.model_path("unet"), fp16.spec("unet"), cuda),
            ("int8 QDQ (plain session)", int8.model_path("unet"), int8.spec("unet"), cuda)):
        try:
            engine, feeds, first = measure_unet(name, path, spec, make, result["unet"])
            if ref is None:
                ref = first
            else:
                r, f = ref.astype(np.float64), first.astype(np.float64)
                result["unet"][name]["sqnr_vs_fp16_db"] = float(10 * np.log10((r * r).sum() / max(((f - r) ** 2).sum(), 1e-30)))
            del engine
        except Exception as e:  # one variant failing must not lose the others
            result["errors"][name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            print(f"{name}: FAILED {result['errors'][name]}", flush=True)
            traceback.print_exc()
        save()

    print("\n== weight-only MatMulNBits on the fp16 bundle's UNet (Linear layers; convolutions stay fp16) ==", flush=True)
    for bits in (8, 4):
        name = f"fp16 + MatMulNBits int{bits}"
        try:
            dst = out / f"unet_nbits{bits}.onnx"
            info = matmul_nbits(fp16.model_path("unet"), dst, bits)
            print(f"  quantised {info['matmulnbits_nodes']} MatMuls in {info['seconds']:.1f} s", flush=True)
            engine, feeds, first = measure_unet(name, dst, fp16.spec("unet"), cuda, result["unet"])
            result["unet"][name].update(info)
            r, f = ref.astype(np.float64), first.astype(np.float64)
            result["unet"][name]["sqnr_vs_fp16_db"] = float(10 * np.log10((r * r).sum() / max(((f - r) ** 2).sum(), 1e-30)))
            del engine
            for f_ in out.glob(dst.name + "*"):
                f_.unlink()  # GBs: do not send them back
        except Exception as e:
            result["errors"][name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            print(f"{name}: FAILED {result['errors'][name]}", flush=True)
            traceback.print_exc()
        save()

    print(f"\n== end to end, {a.steps} steps, Pipeline(provider='cuda') ==", flush=True)
    images = {}
    for name, path in (("fp16 bundle", a.fp16_bundle), ("int8 bundle", a.int8_bundle)):
        try:
            pipe = Pipeline.from_bundle(path, provider="cuda")
            pipe("warm-up", num_inference_steps=2, seed=0)
            ts = []
            for _ in range(3):
                t0 = time.perf_counter()
                lat = pipe("a photo of a cat", num_inference_steps=a.steps, seed=1, return_latents=True)
                img = pipe.decode(np.asarray(lat, np.float32))
                ts.append(time.perf_counter() - t0)
            images[name] = img
            result["end_to_end"][name] = {"median_s": float(np.median(ts)), "runs": ts}
            print(f"{name:14s} {np.median(ts):.3f} s an image", flush=True)
            del pipe
        except Exception as e:
            result["errors"]["e2e " + name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            print(f"e2e {name}: FAILED {result['errors']['e2e ' + name]}", flush=True)
            traceback.print_exc()
        save()
    if len(images) == 2:
        x, y = (np.clip(images[k].astype(np.float64), -1, 1) for k in ("fp16 bundle", "int8 bundle"))
        mse = float(np.mean(((x - y) / 2) ** 2))
        result["end_to_end"]["image_psnr_int8_vs_fp16_db"] = 10 * np.log10(1 / mse) if mse else float("inf")
        print(f"image PSNR int8 vs fp16 (same latents, random weights): {result['end_to_end']['image_psnr_int8_vs_fp16_db']:.2f} dB")
    save()
    print("\n| UNet graph | step ms (p90) | GPU MB | file MB | SQNR vs fp16 dB |\n|---|---|---|---|---|")
    for name, r in result["unet"].items():
        print(f"| {name} | {r['median_ms']:.2f} ({r['p90_ms']:.2f}) | {r['gpu_mb']:.0f} | {r['file_mb']:.0f} | "
              f"{r.get('sqnr_vs_fp16_db', float('nan')):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
