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
import time

import numpy as np

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
    times: dict[str, list[float]] = {"fp32": [], "int8": []}
    for i in range(a.pairs):
        order = ("fp32", "int8") if i % 2 == 0 else ("int8", "fp32")  # alternate which goes first, too
        for name in order:
            t0 = time.perf_counter()
            engines[name].run(feeds)
            times[name].append(time.perf_counter() - t0)
        print(f"pair {i}: fp32 {times['fp32'][-1] * 1e3:.0f} ms  int8 {times['int8'][-1] * 1e3:.0f} ms  "
              f"ratio {times['fp32'][-1] / times['int8'][-1]:.2f}", flush=True)
    ratios = [f / q for f, q in zip(times["fp32"], times["int8"])]
    result = {"fp32_step_ms_median": 1e3 * float(np.median(times["fp32"])),
              "int8_step_ms_median": 1e3 * float(np.median(times["int8"])),
              "ratio_median": float(np.median(ratios)), "ratio_min": float(min(ratios)), "ratio_max": float(max(ratios)),
              "pairs": a.pairs, "threads": a.threads, "feeds": {k: list(v.shape) for k, v in feeds.items()},
              "int8": b8.manifest.get("int8", {}).get("quantisation")}
    if a.e2e_pairs:
        from ldm_export.runtime.pipeline import Pipeline

        del engines
        pipes = {"fp32": Pipeline.from_bundle(a.fp32_bundle, threads=a.threads),
                 "int8": Pipeline.from_bundle(a.int8_bundle, threads=a.threads)}
        e2e: dict[str, list[float]] = {"fp32": [], "int8": []}
        for i in range(a.e2e_pairs):
            for name in (("fp32", "int8") if i % 2 == 0 else ("int8", "fp32")):
                t0 = time.perf_counter()
                pipes[name]("a photograph of an astronaut riding a horse", num_inference_steps=a.steps, seed=i,
                            scheduler="Euler")
                e2e[name].append(time.perf_counter() - t0)
            print(f"image pair {i}: fp32 {e2e['fp32'][-1]:.1f} s  int8 {e2e['int8'][-1]:.1f} s  "
                  f"ratio {e2e['fp32'][-1] / e2e['int8'][-1]:.2f}", flush=True)
        r2 = [f / q for f, q in zip(e2e["fp32"], e2e["int8"])]
        result["end_to_end"] = {"steps": a.steps, "fp32_s": e2e["fp32"], "int8_s": e2e["int8"],
                                "ratio_median": float(np.median(r2))}
    print(json.dumps({k: v for k, v in result.items() if k != "int8"}, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
