"""UNet step of an fp32 bundle and its int8 bundle on the CPU, timed in alternation (A B A B ...) on the same feeds.

`ldm-export bench` times one backend after the other; on a shared CPU whose load drifts, that makes the ratio noise.
Alternating the two sessions call by call puts the same load on both, so the per-pair ratio stays honest:

    python tools/int8_cpu_ratio.py FP32_BUNDLE INT8_BUNDLE [--pairs 10] [--e2e-pairs 2] [--steps 10] [--threads 2]

Prints each pair, then the median step of each and the median of the per-pair ratios (fp32 / int8); then the same
for whole images (text encoder, ``--steps`` Euler steps with CFG, VAE decode) through the runtime's Pipeline.
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from ldm_export.bench.run import alternate
from ldm_export.runtime.bundle import Bundle
from ldm_export.runtime.engine import OrtEngine


def feeds_for(bundle: Bundle, seed: int = 0) -> dict[str, np.ndarray]:
    """Random feeds of the UNet's profile shapes at its default size, batch 2 (CFG)."""
    rng = np.random.default_rng(seed)
    spec = bundle.spec("unet")
    out = {}
    for t in spec.inputs:
        shape = spec.concrete_shape(t, {"batch": 2})
        if t.name == "timestep":
            out[t.name] = np.full(shape, 500, dtype=np.dtype(t.dtype))
        else:
            out[t.name] = rng.standard_normal(shape).astype(np.dtype(t.dtype))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("fp32_bundle")
    p.add_argument("int8_bundle")
    p.add_argument("--pairs", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--e2e-pairs", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    b32, b8 = Bundle.open(a.fp32_bundle), Bundle.open(a.int8_bundle)
    engines = {"fp32": OrtEngine(b32.model_path("unet"), b32.spec("unet"), threads=a.threads),
               "int8": OrtEngine(b8.model_path("unet"), b8.spec("unet"), threads=a.threads)}
    feeds = feeds_for(b32)
    print("feeds:", {k: v.shape for k, v in feeds.items()}, flush=True)
    for _ in range(a.warmup):
        for e in engines.values():
            e.run(feeds)
    step = alternate({name: (lambda e=e: e.run(feeds)) for name, e in engines.items()}, a.pairs, on_pair=lambda i, f, q: print(
        f"pair {i}: fp32 {f * 1e3:.0f} ms  int8 {q * 1e3:.0f} ms  ratio {f / q:.2f}", flush=True))
    result = {"fp32_step_ms_median": float(np.median(step["fp32_ms"])),
              "int8_step_ms_median": float(np.median(step["int8_ms"])),
              "ratio_median": step["ratio_median"], "ratio_min": step["ratio_min"], "ratio_max": step["ratio_max"],
              "pairs": a.pairs, "threads": a.threads, "feeds": {k: list(v.shape) for k, v in feeds.items()},
              "int8": b8.manifest.get("int8", {}).get("quantisation")}
    if a.e2e_pairs:
        from ldm_export.runtime.pipeline import Pipeline

        del engines
        pipes = {"fp32": Pipeline.from_bundle(a.fp32_bundle, threads=a.threads),
                 "int8": Pipeline.from_bundle(a.int8_bundle, threads=a.threads)}
        pair = {"i": 0}  # both images of pair i use seed i

        def image(pipe):
            pipe("a photograph of an astronaut riding a horse", num_inference_steps=a.steps, seed=pair["i"],
                 scheduler="Euler")

        def done(i, f, q):
            pair["i"] = i + 1
            print(f"image pair {i}: fp32 {f:.1f} s  int8 {q:.1f} s  ratio {f / q:.2f}", flush=True)

        e2e = alternate({name: (lambda p=p: image(p)) for name, p in pipes.items()}, a.e2e_pairs, on_pair=done)
        result["end_to_end"] = {"steps": a.steps, "fp32_s": [t / 1e3 for t in e2e["fp32_ms"]],
                                "int8_s": [t / 1e3 for t in e2e["int8_ms"]], "ratio_median": e2e["ratio_median"]}
    print(json.dumps({k: v for k, v in result.items() if k != "int8"}, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
