"""Host work of the runtime's sampler loop around the denoiser, with an engine that costs nothing: SD3 at 1024²
(16x128x128 latents, 333x4096 text, CFG), 28 Euler flow steps through Pipeline.denoise and guided_denoiser. Prints ms a
step and the top of a cProfile. ``--batch 1``: a static batch-1 engine with slots (as a --sequential-cfg bundle on CUDA)."""
import argparse
import cProfile
import pstats
import time

import numpy as np

from ldm_export.runtime.families import Conditioning
from ldm_export.runtime.spec_dit import sd3_transformer_spec
from sd3_adaln_probe import euler_flow, guided_model  # the probe's loop, over an engine that costs nothing here

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


rng = np.random.default_rng(0)
halves = [Conditioning(rng.standard_normal((1, 333, 4096)).astype(np.float16), rng.standard_normal((1, 2048)).astype(np.float16))
          for _ in range(2)]
model = guided_model(Free(), halves)
x = rng.standard_normal((1, 16, 128, 128))
model(x, 1000.0)


def loop(x):
    return euler_flow(model, x, a.steps)


t0 = time.perf_counter()
loop(x)
print(f"host ms a step: {(time.perf_counter() - t0) * 1e3 / a.steps:.2f} (engine batch {a.batch}, latents {a.io})")
pr = cProfile.Profile()
pr.enable()
loop(x)
pr.disable()
pstats.Stats(pr).sort_stats("tottime").print_stats(14)
