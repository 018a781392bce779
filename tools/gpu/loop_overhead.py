"""Host work of the runtime's sampler loop around the denoiser, with an engine that costs nothing: SD3 at 1024²
(16x128x128 latents, 333x4096 text, CFG), 28 Euler flow steps through Pipeline.denoise and guided_denoiser. Prints ms a
step and the top of a cProfile. ``--slots``: a static batch-1 engine with slots (as a --sequential-cfg bundle on CUDA)."""
import argparse
import cProfile
import pstats
import time

import numpy as np

from ldm_export.runtime.families import Conditioning, get_family
from ldm_export.runtime.guidance import guided_denoiser
from ldm_export.runtime.pipeline import Pipeline
from ldm_export.runtime.spec_dit import sd3_transformer_spec

p = argparse.ArgumentParser()
p.add_argument("--batch", type=int, default=2)
p.add_argument("--steps", type=int, default=28)
p.add_argument("--io", default="fp32", help="the graph's latents in and out: fp32 (a build's fp16 policy) or fp16")
a = p.parse_args()
spec = sd3_transformer_spec(16, 16, 4096, 2048, (128, 128, 128), 333).static(
    {"batch": a.batch, "height": 128, "width": 128, "text_sequence": 333})
spec = spec.with_dtype("float16", names=["encoder_hidden_states", "pooled_projections"]
                       + (["hidden_states", "out_hidden_states"] if a.io == "fp16" else []))


class Free:
    static, max_slots = True, 8

    def __init__(self):
        self.spec = spec
        self.out = np.zeros((a.batch, 16, 128, 128), np.float16 if a.io == "fp16" else np.float32)

    def run(self, feeds):
        return self.run_partial(feeds)

    def run_partial(self, feeds, slot=0):
        for v in feeds.values():  # what update_inplace reads
            np.ascontiguousarray(v)
        return {"out_hidden_states": self.out.copy()}


pipe = Pipeline.__new__(Pipeline)
pipe.family, pipe.engines = get_family("sd3"), {"transformer": Free()}
rng = np.random.default_rng(0)
halves = [Conditioning(rng.standard_normal((1, 333, 4096)).astype(np.float16), rng.standard_normal((1, 2048)).astype(np.float16))
          for _ in range(2)]
last = {"c": None}


def unet_fn(sample, t, c):
    out = pipe.denoise(sample, t, c, bound=c is last["c"])
    last["c"] = c
    return out


model = guided_denoiser(unet_fn, halves[1], halves[0], 7.0)
x = rng.standard_normal((1, 16, 128, 128))
sig = np.linspace(1, 0, a.steps + 1)
model(x, 1000.0)


def loop(x):
    for i in range(a.steps):
        v = np.asarray(model(x, np.float64(sig[i] * 1000)), dtype=np.float64)
        x = x + (sig[i + 1] - sig[i]) * v
    return x


t0 = time.perf_counter()
loop(x)
print(f"host ms a step: {(time.perf_counter() - t0) * 1e3 / a.steps:.2f} (engine batch {a.batch}, latents {a.io})")
pr = cProfile.Profile()
pr.enable()
loop(x)
pr.disable()
pstats.Stats(pr).sort_stats("tottime").print_stats(14)
