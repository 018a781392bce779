"""SD3 transformer blocks, full width, three ONNX graphs side by side on ONNX Runtime CUDA: is the fused AdaLN worth it?

    python tools/gpu/sd3_adaln_probe.py --out DIR [--layers 6] [--side 128] [--text 333] [--runs 20] [--variants ...]

Builds SD3-medium's transformer (width 1536, 24 heads, 1024²: 4096 image + 333 text tokens) with ``--layers`` of its
24 blocks and random fp16 weights on the GPU, then exports it three ways (fp16, static shapes, opset 17) and times a
CFG step of each, with CUDA graphs and I/O bound on the device, beside PyTorch eager (first) and torch.compile (last,
after the ONNX graphs) of the same module at batch 2:
- ``batch2``: the fused ops of ``build --target cuda --static-shape`` today: one call at batch 2, joint attention as
  MultiHeadAttention, FastGelu (kernels/joint_attention.py, fast_gelu.py). All three graphs are exported straight in
  fp16, not through the build's fp16 policy (which keeps the modulation linears in fp32), so their times are ratios
  to each other, not the build's absolute figures;
- ``adaln``: the fused batch-1 forward of kernels/adaln.py (modulated LayerNormalization, SkipLayerNormalization
  across the residuals, q/k/v biases inside MultiHeadAttention): two batch-1 calls a step;
- ``adaln-biased-qkv``: the same with the q/k/v biases left in the projections;
- ``adaln-packed``: the fused graph with each stream's q, k and v projections as one GEMM (stacked weights), split
  after.
``--layers 24`` is the whole transformer (each graph then goes over 2 GB and is written with external data);
``--variants batch2,adaln`` times only those graphs. ``--io fp32`` (the default) gives the ONNX graphs float32 latents in
and out, cast inside the graph, as a build's fp16 policy does; ``--sdpa 1,8`` also times each graph with those
values of the CUDA provider's ``sdpa_kernel`` option (which attention kernel MultiHeadAttention runs). ``--profile`` adds each graph's GPU kernels by kind. ``--loop N``
also runs each graph and torch.compile through the runtime's own sampler loop for N steps (Pipeline.denoise with
CFG 7.0 and an Euler flow step, the CUDA engine with its slots, as ``generate`` runs a bundle; PyTorch through the
bench's TorchEngine, conditioning kept on the device): the per-step cost with the host's work around the calls. Writes ``sd3_adaln_probe.json`` and ``.md`` to DIR: per
variant the step's median and p90 (ms), the ONNX node counts, export seconds and, against torch on the same
inputs, each output's cosine and max abs error.
``--device cpu --model tiny-sd3 --layers 2 --side 16 --text 20`` is a smoke run of this script (fp32, CPU provider,
no CUDA graphs).
"""
from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np


def guided_model(engine, halves, guidance_scale: float = 7.0):
    """``model(x, t)`` as ``generate`` runs an SD3 transformer engine: Pipeline.denoise (each image's conditioning
    bound once, then only the latents and timestep copied) under guided_denoiser; ``halves``: the negative's and
    the prompt's Conditioning (batch 1 each)."""
    from ldm_export.runtime.families import get_family
    from ldm_export.runtime.guidance import guided_denoiser
    from ldm_export.runtime.pipeline import Pipeline

    pipe = Pipeline.__new__(Pipeline)  # only what denoise() reads: the family and the engine
    pipe.family, pipe.engines = get_family("sd3"), {"transformer": engine}
    last = {"cond": None}

    def unet_fn(sample, t, c):
        out = pipe.denoise(sample, t, c, bound=c is last["cond"])
        last["cond"] = c
        return out

    return guided_denoiser(unet_fn, halves[1], halves[0], guidance_scale)


def euler_flow(model, x: np.ndarray, steps: int) -> np.ndarray:
    """``steps`` Euler steps of a flow-matching velocity ``model`` from sigma 1 to 0 (timesteps sigma * 1000)."""
    sigmas = np.linspace(1.0, 0.0, steps + 1)
    for i in range(steps):
        x = x + (sigmas[i + 1] - sigmas[i]) * np.asarray(model(x, sigmas[i] * 1000.0), dtype=np.float64)
    return x

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--work", default="/tmp/sd3-adaln-probe")
    p.add_argument("--model", default="sd3-medium")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--side", type=int, default=128, help="latent side (128: 1024 px)")
    p.add_argument("--text", type=int, default=333, help="text tokens (77 CLIP + 256 T5)")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--device", default="cuda")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--profile", action="store_true",
                   help="also record each ONNX graph's GPU kernels by kind (CUPTI through PyTorch's profiler)")
    p.add_argument("--io", choices=("fp32", "fp16"), default="fp32",
                   help="the ONNX graphs' latents in and out: fp32 as a build's fp16 policy keeps them (cast inside the "
                        "graph), or fp16")
    p.add_argument("--sdpa", default="",
                   help="also time each graph with these values of the CUDA provider's sdpa_kernel option (comma "
                        "separated; 1 flash, 2 memory-efficient, 8 cuDNN, 4|32 TensorRT's fused kernels; 0 the default)")
    p.add_argument("--loop", type=int, default=0, help="also time N steps of the runtime's sampler loop per variant")
    p.add_argument("--variants", default="batch2,adaln,adaln-biased-qkv",
                   help="which ONNX graphs to time, in order (torch.compile runs after them)")
    args = p.parse_args()

    import onnx
    import onnxruntime as ort
    import torch
    from diffusers import SD3Transformer2DModel

    from ldm_export import kernels
    from ldm_export.export.dit_models import SD3TransformerWrapper, register_onnx_symbolics
    from ldm_export.export.onnx_export import OPSET, save_onnx
    from ldm_export.kernels import adaln
    from ldm_export.zoo import get_model

    out_dir, work = Path(args.out), Path(args.work)
    out_dir.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    cuda = args.device == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    dev = torch.device(args.device)
    cfg = dict(get_model(args.model).configs["transformer"])
    cfg["num_layers"] = args.layers
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    torch.manual_seed(0)
    # PyTorch's default init (uniform, 1/sqrt(fan_in)): attention far from uniform, so the cosine check can see a
    # wrong graph (a tiny init makes every attention nearly uniform and hides a missing q/k norm)
    model = SD3Transformer2DModel.from_config(cfg).eval().to(dev, dtype)
    wrapper = SD3TransformerWrapper(model)

    class Fp32Latents(torch.nn.Module):  # the build's graph boundary: latents in and out float32, cast in the graph
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
            return self.inner(hidden_states.to(encoder_hidden_states.dtype), encoder_hidden_states, pooled_projections,
                              timestep).float()

    exported = Fp32Latents(wrapper) if args.io == "fp32" else wrapper
    n_params = sum(prm.numel() for prm in model.parameters())
    g = torch.Generator().manual_seed(1)
    side, text = args.side, args.text
    feeds2 = {"hidden_states": torch.randn(2, cfg["in_channels"], side, side, generator=g),
              "encoder_hidden_states": torch.randn(2, text, cfg["joint_attention_dim"], generator=g),
              "pooled_projections": torch.randn(2, cfg["pooled_projection_dim"], generator=g),
              "timestep": torch.tensor([700.0, 700.0])}
    feeds2 = {k: v.to(dev, dtype if k != "timestep" else torch.float32) for k, v in feeds2.items()}
    names = list(feeds2)
    result: dict = {"model": args.model, "layers": args.layers, "parameters_m": round(n_params / 1e6, 1),
                    "side": side, "text": text, "dtype": str(dtype), "device": torch.cuda.get_device_name(0) if cuda else "cpu",
                    "torch": torch.__version__, "onnxruntime": ort.__version__, "io": args.io, "variants": {}}
    torch.set_grad_enabled(False)
    ref = wrapper(*feeds2.values()).float().cpu().numpy()  # (2, C, h, w)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def timed(fn, runs):
        for _ in range(3):
            fn()
        sync()
        ts = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            sync()
            ts.append((time.perf_counter() - t0) * 1e3)
        return float(np.median(ts)), float(np.percentile(ts, 90))

    def sampler_loop(engine, steps: int) -> float:
        """ms a step of the runtime's loop: Pipeline.denoise through guided_denoiser (CFG 7.0), an Euler flow step."""
        from ldm_export.runtime.families import Conditioning

        host = {k: v.float().cpu().numpy() for k, v in feeds2.items()}
        halves = [Conditioning(host["encoder_hidden_states"][i:i + 1], host["pooled_projections"][i:i + 1])
                  for i in range(2)]
        model = guided_model(engine, halves)
        x = host["hidden_states"][:1].copy()
        for _ in range(3):  # binds the conditioning; ONNX Runtime captures each slot's CUDA graph after warm-up runs
            model(x, 1000.0)
        sync()
        t0 = time.perf_counter()
        euler_flow(model, x, steps)
        sync()
        return (time.perf_counter() - t0) * 1e3 / steps

    class TorchLoopEngine:  # the bench's TorchEngine on the probe's module (spec with float32 I/O, batch 2)
        def __new__(cls, module):
            from ldm_export.bench.dit import TorchEngine
            from ldm_export.runtime.spec_dit import sd3_transformer_spec

            spec = sd3_transformer_spec(cfg["in_channels"], cfg["out_channels"], cfg["joint_attention_dim"],
                                        cfg["pooled_projection_dim"], (side, side, side), text, batch=(2, 2, 2))
            return TorchEngine(module, spec, dev, dtype, ("hidden_states", "timestep"))

    # PyTorch at batch 2
    med, p90 = timed(lambda: wrapper(*feeds2.values()), args.runs)
    result["variants"]["torch-eager"] = {"step_ms": med, "p90_ms": p90, "calls": 1}
    print(f"torch-eager: {med:.2f} ms", flush=True)
    if args.loop:
        result["variants"]["torch-eager"]["loop_step_ms"] = sampler_loop(TorchLoopEngine(wrapper), args.loop)
        print(f"torch-eager: sampler loop {result['variants']['torch-eager']['loop_step_ms']:.2f} ms a step", flush=True)
    register_onnx_symbolics(OPSET)
    # adaln: the build's default (the q/k/v biases in the attention unless q/k norms need them first)
    known = {"batch2": (2, None), "adaln": (1, None), "adaln-biased-qkv": (1, False), "adaln-packed": (1, None)}
    wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
    profiles: list[str] = []
    if not wanted or any(v not in known for v in wanted):
        p.error(f"--variants takes names from {', '.join(known)}")
    import shutil

    io_dtype = torch.float32 if exported is not wrapper else dtype  # the graphs' latents in and out
    feeds2_io = {**feeds2, "hidden_states": feeds2["hidden_states"].to(io_dtype)}
    for name in wanted:
        batch, bias_in_attention = known[name]
        feeds = {k: v[:batch].contiguous() for k, v in feeds2_io.items()}
        vdir = work / name  # a graph over 2 GB comes out of the exporter as one file per tensor: one folder a graph
        shutil.rmtree(vdir, ignore_errors=True)
        vdir.mkdir(parents=True)
        path = vdir / "model.onnx"
        t0 = time.perf_counter()
        if batch == 2:
            ctx = kernels.export_patches(wrapper, "transformer", "cuda")
        else:
            import contextlib

            saved = adaln.install(model, bias_in_attention=bias_in_attention, pack_qkv=name == "adaln-packed")
            ctx = contextlib.nullcontext()
        try:
            with ctx:
                torch.onnx.export(exported, tuple(feeds.values()), str(path), input_names=names,
                                  output_names=["out_hidden_states"], opset_version=OPSET, dynamo=False)
        finally:
            if batch == 1:
                adaln.uninstall(saved)
        m = onnx.load(str(path))
        adaln.clear_unused_outputs(m)
        for f in vdir.iterdir():
            f.unlink()
        save_onnx(m, path)  # one model.onnx_data beside it when over 2 GB
        export_s = time.perf_counter() - t0
        ops = Counter(n.op_type for n in m.graph.node)
        del m
        prov = [("CUDAExecutionProvider", {"enable_cuda_graph": "1"}), "CPUExecutionProvider"] if cuda \
            else ["CPUExecutionProvider"]
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(path), so, providers=prov)
        graph = cuda
        # device buffers bound once (CUDA graphs need fixed addresses); each call copies one row of the CFG batch in
        bufs = {k: torch.empty_like(v) for k, v in feeds.items()}
        outb = torch.empty((batch, cfg["out_channels"], side, side), dtype=io_dtype, device=dev)
        io = sess.io_binding()
        np_t = {torch.float16: np.float16, torch.float32: np.float32}
        for k, v in bufs.items():
            io.bind_input(k, args.device, 0, np_t[v.dtype], list(v.shape), v.data_ptr())
        io.bind_output("out_hidden_states", args.device, 0, np_t[outb.dtype], list(outb.shape), outb.data_ptr())
        outs = torch.empty((2, cfg["out_channels"], side, side), dtype=io_dtype, device=dev)

        def step():
            for r in range(0, 2, batch):
                for k, v in bufs.items():
                    v.copy_(feeds2_io[k][r:r + batch])
                sync()
                sess.run_with_iobinding(io)
                outs[r:r + batch].copy_(outb)

        try:
            step()
        except Exception as e:  # a node the CUDA graph cannot capture: time it without the graph, and say so
            if not cuda:
                raise
            print(f"{name}: no CUDA graph ({' '.join(str(e).split())[:200]})", flush=True)
            sess = ort.InferenceSession(str(path), so, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
            io = sess.io_binding()
            for k, v in bufs.items():
                io.bind_input(k, args.device, 0, np_t[v.dtype], list(v.shape), v.data_ptr())
            io.bind_output("out_hidden_states", args.device, 0, np_t[outb.dtype], list(outb.shape), outb.data_ptr())
            graph = False
            step()
        got = outs.float().cpu().numpy()
        a, b = got.reshape(2, -1).astype(np.float64), ref.reshape(2, -1).astype(np.float64)
        cos = [float((a[i] @ b[i]) / (np.linalg.norm(a[i]) * np.linalg.norm(b[i]))) for i in range(2)]
        med, p90 = timed(step, args.runs)
        result["variants"][name] = {"step_ms": med, "p90_ms": p90, "calls": 2 // batch, "export_s": round(export_s, 1),
                                    "cuda_graph": graph,
                                    "cosine_vs_torch": min(cos), "max_abs_err": float(np.abs(a - b).max()),
                                    "ops": dict(ops.most_common(16))}
        print(f"{name}: {med:.2f} ms a step ({2 // batch} calls), cosine {min(cos):.6f}, export {export_s:.0f} s, "
              f"ops {dict(ops.most_common(10))}", flush=True)
        for kernel in [k.strip() for k in args.sdpa.split(",") if k.strip()] if cuda else []:
            sess = None
            opts = {"enable_cuda_graph": "1", "sdpa_kernel": kernel}
            sess = ort.InferenceSession(str(path), so, providers=[("CUDAExecutionProvider", opts), "CPUExecutionProvider"])
            io = sess.io_binding()
            for k, v in bufs.items():
                io.bind_input(k, args.device, 0, np_t[v.dtype], list(v.shape), v.data_ptr())
            io.bind_output("out_hidden_states", args.device, 0, np_t[outb.dtype], list(outb.shape), outb.data_ptr())
            try:
                step()
                k_med, k_p90 = timed(step, args.runs)
                got = outs.float().cpu().numpy().reshape(2, -1).astype(np.float64)
                k_cos = min(float((got[i] @ b[i]) / (np.linalg.norm(got[i]) * np.linalg.norm(b[i]))) for i in range(2))
                result["variants"][name].setdefault("sdpa_kernel", {})[kernel] = {"step_ms": k_med, "p90_ms": k_p90,
                                                                                   "cosine_vs_torch": k_cos}
                print(f"{name} sdpa_kernel={kernel}: {k_med:.2f} ms a step, cosine {k_cos:.6f}", flush=True)
            except Exception as e:  # a backend that refuses these shapes
                result["variants"][name].setdefault("sdpa_kernel", {})[kernel] = {"error": " ".join(str(e).split())[:200]}
                print(f"{name} sdpa_kernel={kernel}: failed ({' '.join(str(e).split())[:200]})", flush=True)
        if args.sdpa and cuda:  # back to the default session for the profile and loop
            sess = ort.InferenceSession(str(path), so, providers=prov)
            io = sess.io_binding()
            for k, v in bufs.items():
                io.bind_input(k, args.device, 0, np_t[v.dtype], list(v.shape), v.data_ptr())
            io.bind_output("out_hidden_states", args.device, 0, np_t[outb.dtype], list(outb.shape), outb.data_ptr())
            step()
        if args.profile and cuda:
            from ldm_export.bench.kernel_profile import format_profile, profile_kernels

            prof = profile_kernels(step, runs=5)
            result["variants"][name]["profile"] = prof
            profiles.append(format_profile(prof, f"{name}: GPU kernels of one CFG step ({2 // batch} calls)"))
            print(profiles[-1], flush=True)
        if args.loop:
            sess = io = None  # the runtime's engine opens the graph itself
            from ldm_export.runtime.spec_dit import sd3_transformer_spec

            spec = sd3_transformer_spec(cfg["in_channels"], cfg["out_channels"], cfg["joint_attention_dim"],
                                        cfg["pooled_projection_dim"], (side, side, side), text,
                                        batch=(batch, batch, batch))
            spec = spec.static({"batch": batch, "height": side, "width": side, "text_sequence": text})
            if cuda:  # exported straight in fp16: every float tensor of the graph but the fp32 timestep (and with
                # --io fp32, the latents in and out)
                fp32 = {"timestep"} | ({"hidden_states", "out_hidden_states"} if io_dtype == torch.float32 else set())
                spec = spec.with_dtype("float16", names=[n for n in (*spec.input_names, *spec.output_names)
                                                         if n not in fp32])
            if cuda:
                from ldm_export.runtime.engine_cuda import CudaEngine

                eng = CudaEngine(path, spec, cuda_graph=True, graph_fallback=True)
            else:
                from ldm_export.runtime.engine import OrtEngine

                eng = OrtEngine(path, spec, "cpu")
            result["variants"][name]["loop_step_ms"] = sampler_loop(eng, args.loop)
            print(f"{name}: sampler loop {result['variants'][name]['loop_step_ms']:.2f} ms a step", flush=True)
            eng = None
        (out_dir / "sd3_adaln_probe.json").write_text(json.dumps(result, indent=1))  # what ran so far survives a timeout
        sess = io = None  # free the session before the next graph loads
        shutil.rmtree(vdir, ignore_errors=True)
    if cuda and not args.no_compile:
        compiled = torch.compile(wrapper)
        t0 = time.perf_counter()
        compiled(*feeds2.values())
        sync()
        ct = time.perf_counter() - t0
        med, p90 = timed(lambda: compiled(*feeds2.values()), args.runs)
        result["variants"]["torch-compile"] = {"step_ms": med, "p90_ms": p90, "calls": 1, "compile_s": round(ct, 1)}
        print(f"torch-compile: {med:.2f} ms ({ct:.0f} s to compile)", flush=True)
        if args.loop:
            result["variants"]["torch-compile"]["loop_step_ms"] = sampler_loop(TorchLoopEngine(compiled), args.loop)
            print(f"torch-compile: sampler loop {result['variants']['torch-compile']['loop_step_ms']:.2f} ms a step",
                  flush=True)
        del compiled
        torch._dynamo.reset()
    (out_dir / "sd3_adaln_probe.json").write_text(json.dumps(result, indent=1))
    base_name = "batch2" if "batch2" in result["variants"] else wanted[0]
    base = result["variants"][base_name]["step_ms"]
    lines = [f"SD3 ({args.model}) transformer, {args.layers} of its blocks at full width ({result['parameters_m']} M "
             f"parameters), {side * 8}², {text} text tokens, CFG (batch 2 or two batch-1 calls), {result['dtype']} "
             f"(the ONNX graphs' latents in and out {args.io}), "
             f"on {result['device']}; median (p90) of {args.runs} steps after 3 warm-ups.", "",
             f"| variant | calls a step | step ms | vs {base_name} graph | cosine vs torch | sampler loop ms a step |",
             "|---|---|---|---|---|---|"]
    for name, v in result["variants"].items():
        cos = f"{v['cosine_vs_torch']:.6f}" if "cosine_vs_torch" in v else "—"
        loop = f"{v['loop_step_ms']:.2f}" if "loop_step_ms" in v else "—"
        lines.append(f"| {name} | {v['calls']} | {v['step_ms']:.2f} ({v['p90_ms']:.2f}) | {base / v['step_ms']:.2f}x | {cos} "
                     f"| {loop} |")
    (out_dir / "sd3_adaln_probe.md").write_text("\n\n".join(["\n".join(lines), *profiles]) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
