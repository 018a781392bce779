"""`ldm-export bench` for the DiT families (SD3, FLUX, the demo DiT): every backend runs the runtime's own
``Pipeline`` loop (family encode -> flow sampler with CFG -> decode), so only the engines differ.

PyTorch eager and torch.compile run the same wrapped diffusers/transformers modules as the export (fp16 on CUDA)
behind the runtime's Engine protocol (``run(feeds) -> outputs``), with the per-image inputs (text context, pooled
vectors, ids) kept on the device between steps as the CUDA engine keeps them; ONNX Runtime runs the bundle (CUDA
engine with IOBinding and CUDA graphs for static shapes, or the CPU engine). Components: all text encoders (batch
2: negative + prompt), one transformer step (the CFG batch), the VAE decode; end to end: one image, ``steps`` steps.
The report has the U-Net bench's table (its "UNet step" column is the transformer step).
"""
from __future__ import annotations

import gc
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from ldm_export.runtime.errors import LdmExportError
from ldm_export.runtime.tokenizer import one_warning_per_prompt

from .run import (BenchConfig, Progress, _gpu_used_mb, _Skip, allow_tf32, failed_entry, fp32_components, graphed, image_fidelity,
                  parse_backend, precision_label, profile_engines, stats, timed, write_reports)


PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"


class TorchEngine:
    """A wrapped torch module behind the runtime's Engine protocol (numpy in and out)."""

    def __init__(self, module, spec, device, dtype, step_inputs=()):
        import torch

        self.torch, self.module, self.spec, self.device, self.dtype = torch, module, spec, device, dtype
        self.step_inputs = set(step_inputs)
        self._held: dict[str, tuple[int, object]] = {}  # input -> (id of the numpy array, device tensor)

    def _tensor(self, name, a):
        torch = self.torch
        if name not in self.step_inputs:  # per-image inputs: copied once, as the CUDA engine binds them
            held = self._held.get(name)
            if held is not None and held[0] == id(a):
                return held[1]
        t = torch.from_numpy(np.ascontiguousarray(a))
        t = t.to(self.device, self.dtype if t.is_floating_point() and name not in ("timestep", "guidance") else None)
        if name not in self.step_inputs:
            self._held[name] = (id(a), t)
        return t

    def run(self, feeds):
        with self.torch.inference_mode():
            out = self.module(*[self._tensor(n, feeds[n]) for n in self.spec.input_names])
        out = out if isinstance(out, (tuple, list)) else (out,)
        return {n: o.float().cpu().numpy() for n, o in zip(self.spec.output_names, out)}


def _sync(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def torch_engines(bundle, modules, device: str, half: bool, compile: bool, keep_fp32=()) -> dict:
    """The bundle's components as wrapped torch modules, fp16 where ``half`` except ``keep_fp32``."""
    import torch

    from ldm_export.export import models as M

    family = bundle.family
    if device == "cuda":
        allow_tf32(half)
    engines = {}
    for c in bundle.components:
        dtype = torch.float16 if half and c not in keep_fp32 else torch.float32
        wrapper = M.wrap(c, modules, family).to(device, dtype).eval()
        if compile:
            wrapper = torch.compile(wrapper)
        steps = family.step_inputs if c == family.denoiser else ()
        # the spec as exported but with float32 I/O: the pipeline casts to the spec's dtypes
        spec = bundle.spec(c).with_dtype("float32")
        if c == family.denoiser and bundle.manifest.get("sequential_cfg"):
            # a --sequential-cfg bundle's engine takes CFG as two batch-1 calls; PyTorch runs it at batch 2, as
            # diffusers does: the same work, each side in its own fastest way
            spec = spec.with_batch("batch", skip=family.unbatched_inputs)
        engines[c] = TorchEngine(wrapper, spec, device, dtype, steps)
    return engines


def ort_engines(bundle, device: str, threads: int | None, cuda_options) -> dict:
    from ldm_export.runtime.engine import OrtEngine
    from ldm_export.runtime.pipeline import cuda_engine

    if device == "cuda":
        return {c: cuda_engine(bundle, c, extra_options=cuda_options) for c in bundle.components}
    return {c: OrtEngine(bundle.model_path(c), bundle.spec(c), "cpu", threads=threads) for c in bundle.components}


def time_components(pipe, repeats: int, warmup: int, guidance_scale: float, device: str) -> tuple[dict, float]:
    """Text encoders (batch 2 with CFG: negative and prompt; else the prompt alone, as the pipeline encodes), one
    transformer step (the CFG batch), one decode; and the first-call seconds."""
    family = pipe.family
    cfg = family.uses_cfg(guidance_scale)
    prompts = ["", PROMPT] if cfg else [PROMPT]
    lf = pipe.latent_format
    side = pipe.resolution // lf.vae_scale_factor
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, lf.channels, side, side)).astype(np.float32)
    cond = family.prepare(pipe.encode(prompts), width=pipe.resolution, height=pipe.resolution,
                          guidance_scale=guidance_scale)
    sample = np.concatenate([x] * cond.batch)
    t = np.full((cond.batch,), 500.0)

    def call(fn):
        def run():
            fn()
            _sync(device)
        return run

    t0 = time.perf_counter()
    # first call: compiles under torch.compile, and binds the conditioning (each CFG half in its own slot of a
    # batch-1 engine); the timed steps then copy only the latents and timestep, as the sampler loop does
    call(lambda: pipe.denoise(sample, t, cond, bound=False))()
    first = time.perf_counter() - t0
    z = rng.standard_normal((1, lf.channels, side, side)).astype(np.float32)
    return {"text_encoder": timed(call(lambda: pipe.encode(prompts)), repeats, warmup),
            "unet_step": timed(call(lambda: pipe.denoise(sample, t, cond, bound=True)), repeats, warmup),
            "vae_decode": timed(call(lambda: pipe.decode(z)), repeats, warmup)}, first


def end_to_end(pipe, latents, steps: int, guidance_scale: float, device: str) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    final = pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance_scale, latents=latents, return_latents=True)
    image = pipe.decode(np.asarray(final, np.float32))
    _sync(device)
    return image, time.perf_counter() - t0


def _profile(engines, denoiser: str, runs: int = 5) -> dict:
    """GPU kernels of one transformer step and one decode as benchmarked (CUDA graph replays included), from CUPTI:
    ``{"profile": {component: profile}}``, or ``{"profile_skipped": why}``. The engines replay what their last run
    bound: the CFG-batch step and the decode of ``time_components``."""
    try:
        out = profile_engines(engines, [c for c in (denoiser, "vae_decoder") if c in engines], runs)
    except _Skip as e:
        return {"profile_skipped": str(e)}
    if not out[denoiser]["kernels_per_run"]:
        return {"profile_skipped": "the profiler saw no GPU kernels (CUPTI unavailable?)"}
    return {"profile": out}


def run_dit_bench(cfg: BenchConfig, bundle, progress: Progress = lambda s: None) -> dict:
    """The bench of a DiT bundle: same report files as the U-Net bench."""
    with one_warning_per_prompt():  # every backend encodes the same prompt many times: a cut is warned about once
        return _run_dit_bench(cfg, bundle, progress)


def _run_dit_bench(cfg: BenchConfig, bundle, progress: Progress) -> dict:
    import torch

    from ldm_export.export.weights import load_weights
    from ldm_export.runtime.pipeline import Pipeline
    from ldm_export.zoo import spec_of_bundle

    spec = spec_of_bundle(bundle)
    if cfg.guidance_scale is None:  # the model's own default: FLUX-schnell 0 (no CFG), FLUX-dev 3.5, SD3 7.0
        cfg = replace(cfg, guidance_scale=float(bundle.defaults["guidance_scale"]))
    info = bundle.manifest["weights"]
    if info["source"] == "random":
        loaded = load_weights(spec, None, random_weights=True, seed=info.get("seed") or 0)
    elif info["source"] == "embedded" or info.get("path") is None:
        from ldm_export.export.build import embedded_weights_path

        loaded = load_weights(spec, embedded_weights_path(spec))
    else:
        if cfg.weights is None:
            raise LdmExportError(f"the bundle was built from the weights '{info['path']}'; pass --weights PATH for the "
                                 "PyTorch backends (a bundle keeps no paths of the machine that built it)")
        loaded = load_weights(spec, Path(cfg.weights))
    modules = loaded.modules
    torch.set_grad_enabled(False)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    lf = bundle.family.latent_format(bundle.module_configs)
    side = spec.resolution // lf.vae_scale_factor
    latents = np.random.default_rng(cfg.seed).standard_normal((1, lf.channels, side, side)).astype(np.float32)
    result: dict = {"model": spec.name, "weights": info["source"], "device": cfg.device,
                    "gpu": torch.cuda.get_device_name(0) if cfg.device == "cuda" else None,
                    "resolution": spec.resolution, "steps": cfg.steps, "guidance_scale": cfg.guidance_scale,
                    "repeats": cfg.repeats, "e2e_repeats": cfg.e2e_repeats, "warmup": cfg.warmup,
                    "denoiser": "transformer", "cfg": bundle.family.uses_cfg(cfg.guidance_scale),
                    **({"sequential_cfg": True} if bundle.manifest.get("sequential_cfg") else {}),
                    "scheduler": bundle.scheduler_config.get("_class_name"), "bundle": str(cfg.bundle),
                    "bundle_target": bundle.manifest.get("target"),
                    "bundle_kernels": {c: bundle.manifest["components"][c].get("kernels") for c in bundle.components},
                    "torch": torch.__version__, "backends": {}, "notes": list(cfg.notes) + [
                        "DiT bundle: the 'UNet step' column is one transformer step (the CFG batch); the text encoder "
                        "column runs every text encoder of the family on the prompt (and the negative, with CFG)"],
                    "cuda_options": dict(cfg.cuda_options), "host_step_overhead_ms": None}  # not measured for DiTs

    progress("reference: PyTorch fp32 end to end")
    ref = Pipeline(bundle, torch_engines(bundle, modules, cfg.device, False, False))
    ref_image, ref_s = end_to_end(ref, latents, cfg.steps, cfg.guidance_scale, cfg.device)
    result["reference"] = {"backend": "torch fp32", "end_to_end_s": ref_s}
    del ref
    gc.collect()
    half = cfg.device == "cuda"
    # the same work: a component the bundle keeps fp32 (the SD3/FLUX VAE decoder, by its force_upcast) runs fp32 in
    # the PyTorch backends too (diffusers' own SD3 and FLUX pipelines decode in fp16: docs/dit.md)
    keep_fp32 = fp32_components(bundle, bundle.components) if half else ()
    _run_backends(cfg, bundle, modules, latents, ref_image, half, keep_fp32, result, progress)
    write_reports(result, cfg.out)
    return result


def _run_backends(cfg, bundle, modules, latents, ref_image, half, keep_fp32, result, progress) -> None:
    import torch

    from ldm_export.runtime.pipeline import Pipeline

    for name in cfg.backends:
        progress(f"{name}: loading")
        entry: dict = {}
        try:
            if cfg.device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            base_mb = _gpu_used_mb() if cfg.device == "cuda" else None
            t0 = time.perf_counter()
            base, own_options = parse_backend(name)
            if own_options:
                entry["cuda_options"] = own_options
            if base in ("torch-eager", "torch-compile"):
                engines = torch_engines(bundle, modules, cfg.device, half, base == "torch-compile", keep_fp32)
                entry["precision"] = precision_label("fp16" if half else "fp32", keep_fp32, bundle.components)
            elif base == "ort-nhwc":  # not a second, identical row of the same engine
                raise _Skip("on DiT bundles, ort is the runtime's engine (on CUDA its VAE decoder runs channels-last "
                            "already); ort-nhwc is the U-Net bench's name for that")
            elif base == "ort":
                engines = ort_engines(bundle, cfg.device, cfg.threads, {**cfg.cuda_options, **own_options})
                entry["precision"] = bundle.precision(bundle.family.denoiser)
            else:
                raise _Skip(f"backend {name} is not built for DiT bundles (torch-eager, torch-compile, ort)")
            entry["load_s"] = time.perf_counter() - t0
            pipe = Pipeline(bundle, engines)
            progress(f"{name}: components")
            entry["components"], first = time_components(pipe, cfg.repeats, cfg.warmup, cfg.guidance_scale, cfg.device)
            if base == "torch-compile":
                entry["compile_s"] = first
            if base.startswith("ort") and cfg.profile and cfg.device == "cuda":
                progress(f"{name}: profile")
                entry.update(_profile(engines, bundle.family.denoiser))
                if bundle.manifest.get("sequential_cfg") and "profile" in entry:
                    entry["profile_note"] = ("the denoiser's profile is one of the step's two batch-1 calls "
                                             "(--sequential-cfg): a step is twice it")
            progress(f"{name}: end to end")
            end_to_end(pipe, latents, cfg.steps, cfg.guidance_scale, cfg.device)  # warm-up
            runs = [end_to_end(pipe, latents, cfg.steps, cfg.guidance_scale, cfg.device) for _ in range(cfg.e2e_repeats)]
            entry["end_to_end"] = stats([s for _, s in runs])
            entry["fidelity"] = image_fidelity(runs[-1][0], ref_image)
            if base.startswith("ort") and cfg.device == "cuda":
                entry["cuda_graphs"] = graphed(engines)
            if cfg.device == "cuda":
                torch_mb = torch.cuda.max_memory_allocated() / 2**20
                used = _gpu_used_mb()
                entry["gpu_memory_peak_mb"] = torch_mb if base.startswith("torch") else \
                    (used - base_mb if used is not None and base_mb is not None else None)
        except _Skip as e:
            entry = {"skipped": str(e)}
        except Exception as e:  # one backend failing must not lose the others' numbers
            entry = failed_entry(name, e)
        finally:
            engines = pipe = None
            gc.collect()
        result["backends"][name] = entry
        write_reports(result, cfg.out)
        progress(f"{name}: done")
