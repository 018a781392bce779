"""Per-step host overhead of the numpy runtime (sampler + CFG) next to the UNet time, on the CPU.

    python tools/runtime_overhead.py BUNDLE [BUNDLE ...] [--steps 20] [--sampler "DPM++ 2M Karras"] [--out docs/runtime_overhead.md]

Times a whole generation with the UNet engine wrapped by a timer; overhead = (sampling time - UNet time) / steps.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

from ldm_export.runtime.pipeline import Pipeline


class TimedEngine:
    def __init__(self, engine):
        self.engine, self.spec, self.seconds = engine, engine.spec, 0.0

    def run(self, feeds):
        t = time.perf_counter()
        out = self.engine.run(feeds)
        self.seconds += time.perf_counter() - t
        return out


def measure(bundle: Path, steps: int, sampler: str, repeats: int) -> dict:
    pipe = Pipeline.from_bundle(bundle)
    unet = pipe.engines["unet"] = TimedEngine(pipe.engines["unet"])
    text = pipe.engines["text_encoder"] = TimedEngine(pipe.engines["text_encoder"])
    pipe("warm-up", num_inference_steps=2, seed=0, scheduler=sampler, return_latents=True)
    overheads, unets = [], []
    for r in range(repeats):
        unet.seconds = text.seconds = 0.0
        t0 = time.perf_counter()
        pipe("a red circle on the left", num_inference_steps=steps, seed=r, scheduler=sampler, return_latents=True)
        total = time.perf_counter() - t0
        # what is left once the engines' own time is taken out: tokenizer, sampler, CFG, checks
        overheads.append((total - unet.seconds - text.seconds) / steps)
        unets.append(unet.seconds / steps)
    side = pipe.resolution // pipe.vae_scale_factor
    overhead, unet_s = statistics.median(overheads), statistics.median(unets)
    return {"bundle": pipe.bundle.model["name"], "latents": f"1x{pipe.latent_channels}x{side}x{side}",
            "unet_ms": unet_s * 1e3, "overhead_us": overhead * 1e6, "share": overhead / unet_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundles", nargs="+", type=Path)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sampler", default="DPM++ 2M Karras")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    lines = [f"Command: `python tools/runtime_overhead.py {' '.join(str(b) for b in a.bundles)} --steps {a.steps} "
             f"--sampler \"{a.sampler}\" --repeats {a.repeats}`; machine: {platform.machine()} CPU, "
             f"{__import__('os').cpu_count()} cores; CFG batch 2; medians of {a.repeats} runs.", "",
             "| model | latents | UNet per step (ms) | sampler + CFG per step (µs) | overhead / UNet |",
             "| --- | --- | --- | --- | --- |"]
    for b in a.bundles:
        m = measure(b, a.steps, a.sampler, a.repeats)
        lines.append(f"| {m['bundle']} | {m['latents']} | {m['unet_ms']:.2f} | {m['overhead_us']:.0f} | {m['share'] * 100:.2f} % |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
