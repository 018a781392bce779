"""On the GPU machine: bundles' UNet and VAE decoder under graph and provider variants, side by side.

    python tools/gpu/probe.py OUT NAME=BUNDLE [NAME=BUNDLE ...] [--runs 30] [--components unet,vae_decoder]
                              [--pad-channels] [--cudnn-attention] [--option-variant KEY=VALUE ...]

Per component, each bundle's graph as built; with ``--pad-channels`` also the first bundle's graph with every
convolution whose output channels are not a multiple of 8 padded to one (zero filters, then a Slice: channels-last
tensor-core convolutions want multiples of 8; SD's last convolutions have 3 or 4); with ``--cudnn-attention`` the
UNets also with cuDNN's attention in place of ONNX Runtime's flash attention (``sdpa_kernel=8``); with
``--option-variant`` each bundle also with that CUDA provider option. Every variant runs on the CUDA engine
(IOBinding, CUDA graph, channels-last convolutions, cuDNN exhaustive search; no other provider option). For
each: the median time of a run with the inputs already on the device, the output's cosine against the first
variant, and a kernel profile (CUPTI through PyTorch's profiler): device time by kind of kernel and the top
kernels. Writes OUT/probe.json and prints a summary.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch  # noqa: F401  (loads the CUDA libraries onnxruntime-gpu links against)
import numpy as np
import onnx

from ldm_export.export import onnx_export as X
from ldm_export.bench.kernel_profile import format_profile, profile_kernels
from ldm_export.runtime.bundle import Bundle
from ldm_export.runtime.engine_cuda import CudaEngine


def pad_conv_channels(m: onnx.ModelProto, multiple: int = 8) -> int:
    """Zero-pad the filters of convolutions with an odd output channel count; Slice the real channels back out."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in m.graph.initializer}
    uses: dict[str, int] = {}
    for n in m.graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    new_nodes, padded = [], 0
    for n in m.graph.node:
        new_nodes.append(n)
        if n.op_type != "Conv" or n.input[1] not in inits or any(a.name == "group" and a.i != 1 for a in n.attribute):
            continue
        if any(uses.get(i, 0) > 1 for i in n.input[1:]):  # a shared weight: padding it would change the others
            continue
        w = numpy_helper.to_array(inits[n.input[1]])
        cout = w.shape[0]
        if cout % multiple == 0:
            continue
        full = -(-cout // multiple) * multiple
        wp = np.zeros((full, *w.shape[1:]), w.dtype)
        wp[:cout] = w
        inits[n.input[1]].CopyFrom(numpy_helper.from_array(wp, n.input[1]))
        if len(n.input) > 2 and n.input[2] in inits:
            b = numpy_helper.to_array(inits[n.input[2]])
            bp = np.zeros(full, b.dtype)
            bp[:cout] = b
            inits[n.input[2]].CopyFrom(numpy_helper.from_array(bp, n.input[2]))
        out = n.output[0]
        n.output[0] = out + "_padded"
        names = [f"{out}_pad_{k}" for k in ("starts", "ends", "axes")]
        for name, v in zip(names, ([0], [cout], [1])):
            m.graph.initializer.append(numpy_helper.from_array(np.asarray(v, np.int64), name))
        new_nodes.append(helper.make_node("Slice", [n.output[0], *names], [out], name=n.name + "_slice"))
        padded += 1
    del m.graph.node[:]
    m.graph.node.extend(new_nodes)
    return padded


def variant_graph(src: Path, out: Path, transform) -> tuple[Path, object]:
    m = onnx.load(str(src))
    info = transform(m)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.onnx"
    onnx.save(m, str(path), save_as_external_data=True, location="model.onnx_data")
    return path, info


def measure(path: Path, spec, feeds, runs: int, provider_options=None) -> dict:
    t0 = time.perf_counter()
    e = CudaEngine(path, spec, prefer_nhwc=True, provider_options=provider_options)
    out = e.run(feeds)  # binds every input, captures the CUDA graph
    for _ in range(3):
        e.run(feeds)
    load_s = time.perf_counter() - t0
    run = e.replay
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    prof = profile_kernels(run, runs=5)
    # the host's part of a call: copy the inputs in, run, copy the outputs out (run() as the sampler uses it)
    calls = []
    for _ in range(10):
        t = time.perf_counter()
        e.run(feeds)
        calls.append(time.perf_counter() - t)
    first = next(iter(out.values())).astype(np.float32)
    del e
    return {"median_ms": float(np.median(times)) * 1e3, "p90_ms": float(np.percentile(times, 90)) * 1e3,
            "run_with_copies_ms": float(np.median(calls)) * 1e3,
            "load_s": load_s, "output": first, "profile": prof}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("bundles", nargs="+", help="NAME=BUNDLE")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--components", default="unet,vae_decoder")
    ap.add_argument("--pad-channels", action="store_true")
    ap.add_argument("--cudnn-attention", action="store_true")
    ap.add_argument("--option-variant", action="append", default=[], metavar="KEY=VALUE",
                    help="also run each bundle with this CUDA provider option")
    a = ap.parse_args()
    bundles = {k: Bundle.open(v) for k, v in (x.split("=", 1) for x in a.bundles)}
    first = next(iter(bundles.values()))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {}
    for comp in a.components.split(","):
        spec = first.spec(comp)
        feeds = X.sample_inputs(spec, latent_scale=first.model["latent_scale"])
        variants = {name: (b.model_path(comp), None) for name, b in bundles.items()}
        if a.pad_channels:
            t = time.perf_counter()
            path, n = variant_graph(first.model_path(comp), out / "graphs" / comp, pad_conv_channels)
            print(f"{comp}: padded {n} convolutions in {time.perf_counter() - t:.1f} s", flush=True)
            variants[f"{next(iter(bundles))}+pad-channels"] = (path, None)
        for kv in a.option_variant:
            k, v = kv.split("=", 1)
            for name, b in bundles.items():
                variants[f"{name}+{kv}"] = (b.model_path(comp), {k: v})
        if a.cudnn_attention and comp == "unet":
            for name, b in bundles.items():
                variants[f"{name}+cudnn-attention"] = (b.model_path(comp), {"sdpa_kernel": "8"})
        base = None
        for name, (path, opts) in variants.items():
            try:
                r = measure(path, spec, feeds, a.runs, opts)
            except Exception as ex:  # one variant failing keeps the others
                print(f"{comp} {name}: FAILED {type(ex).__name__}: {str(ex)[:400]}", flush=True)
                result[f"{comp}/{name}"] = {"error": str(ex)[:400]}
                continue
            o = r.pop("output")
            base = o if base is None else base
            r["cosine_vs_first"] = X.compare(comp, o, base)["cosine"]
            r["finite"] = bool(np.isfinite(o).all())
            result[f"{comp}/{name}"] = r
            print(f"{comp} {name}: median {r['median_ms']:.3f} ms (p90 {r['p90_ms']:.3f}), with host copies "
                  f"{r['run_with_copies_ms']:.3f} ms, cosine {r['cosine_vs_first']:.6f}, "
                  f"load {r['load_s']:.1f} s", flush=True)
            print(format_profile(r["profile"], f"{comp} {name}"), flush=True)
            for k in r["profile"]["top_kernels"][:15]:
                print(f"    {k['ms_per_run']:.3f} ms  x{k['calls_per_run']:.0f}  [{k['kind']}]  {k['name'][:120]}")
            (out / "probe.json").write_text(json.dumps(result, indent=1))
    print("done", flush=True)


if __name__ == "__main__":
    sys.exit(main())
