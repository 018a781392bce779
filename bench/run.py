"""`ldm-export bench`: the same work on each backend, per component and end to end, with output fidelity.

Work: text encoder (batch 2: negative + prompt), one UNet step (batch 2: CFG), VAE decode (batch 1), and end to
end = text encoding + N UNet steps through the numpy sampler (``ldm_export.runtime.sample``) with CFG
(``guided_denoiser``) on the host + VAE decode. Backends: PyTorch eager (diffusers modules, SDPA),
torch.compile (default mode), this project's ONNX Runtime bundle (CUDA engine with IOBinding and CUDA graphs,
or the CPU engine), TensorRT where it is installed. Latencies are host-observed (a call returns with its
outputs ready); median and p90 over repeats after warm-up. Fidelity: the decoded image of each backend against
PyTorch fp32 on the same text ids and initial latents (cosine, PSNR with [-1, 1] mapped to [0, 1]).
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from ldm_export.runtime.errors import LdmExportError

log = logging.getLogger(__name__)

BACKENDS = ("torch-eager", "torch-compile", "ort", "ort-nhwc", "ort-int8", "tensorrt")
OPTION_BACKENDS = ("ort", "ort-nhwc", "ort-int8")  # ONNX Runtime CUDA engines: take per-backend provider options
Progress = Callable[[str], None]


def parse_backend(name: str) -> tuple[str, dict[str, str]]:
    """``ort-nhwc:fuse_conv_bias=1:sdpa_kernel=1`` -> ("ort-nhwc", {"fuse_conv_bias": "1", "sdpa_kernel": "1"}): one
    ONNX Runtime backend with its own CUDA provider options (over --cuda-option's), so that variants of the engine run
    side by side in one bench; a plain name has none."""
    base, *parts = [p.strip() for p in name.split(":")]
    if base not in BACKENDS:
        raise LdmExportError(f"unknown backend {base!r}; choose from {', '.join(BACKENDS)}")
    if parts and base not in OPTION_BACKENDS:
        raise LdmExportError(f"backend {name!r}: only {', '.join(OPTION_BACKENDS)} take CUDA provider options "
                             "(NAME:KEY=VALUE[:KEY=VALUE])")
    options = {}
    for p in parts:
        key, eq, value = p.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise LdmExportError(f"backend {name!r}: write its CUDA provider options as {base}:KEY=VALUE[:KEY=VALUE], "
                                 f"e.g. {base}:fuse_conv_bias=1")
        if key.strip() in options:
            raise LdmExportError(f"backend {name!r} sets {key.strip()} twice; give each option once")
        options[key.strip()] = value.strip()
    return base, options


@dataclass
class BenchConfig:
    model: str = "sd15"
    bundle: Path | None = None  # ONNX Runtime bundle (ldm-export build); its weights are the baselines' weights
    device: str = "cuda"  # cuda or cpu
    backends: tuple[str, ...] = ("torch-eager", "torch-compile", "ort", "tensorrt")
    steps: int = 50
    repeats: int = 20  # per component
    e2e_repeats: int = 3
    warmup: int = 3
    guidance_scale: float | None = None  # None: 7.5 for the U-Net bench (CFG batch 2); the bundle's default for DiTs
    seed: int = 0
    threads: int | None = None
    profile: bool = False  # GPU kernel profile of the UNet and VAE decoder (cuda: CUPTI via PyTorch's profiler)
    out: Path = Path("bench-out")
    notes: list[str] = field(default_factory=list)
    cuda_options: dict[str, str] = field(default_factory=dict)  # extra CUDA provider options for the ort backends
    weights: Path | None = None  # the weights a bundle was built from (bundles record their name, not their path)
    int8_bundle: Path | None = None  # the ort-int8 backend: an int8 bundle of the same model and weights as ``bundle``
    loras: tuple[str, ...] = ()  # FILE[:SCALE] of the LoRAs ``bundle`` holds (bundles record their names, not paths)


def _bundle_loras(cfg: BenchConfig, bundle, modules: dict, spec) -> list[str]:
    """Fuse ``cfg.loras`` into the PyTorch modules when they are the LoRAs the bundle holds (same files by sha256,
    same scales, same order), so every backend and the fidelity reference run the same weights; without them, a
    bundle that holds LoRAs is benched with a warning and a note in the report."""
    manifest = bundle.manifest if bundle is not None else {}
    recorded = (manifest.get("weights") or {}).get("loras") or manifest.get("loras") or []  # (top level: older bundles)
    names = ", ".join(f"{x['file']} x{x['scale']:g}" for x in recorded)
    if not cfg.loras:
        if not recorded:
            return []
        note = (f"the bundle holds LoRAs ({names}) that the PyTorch backends and the fidelity reference run without; "
                "pass each with --lora FILE[:SCALE] to bench the same weights")
        log.warning(note)
        return [note]
    if bundle is None:
        raise LdmExportError("--lora names the LoRAs a --bundle holds; build one with `ldm-export build --lora ...` "
                             "and pass --bundle DIR")
    if not recorded:
        raise LdmExportError(f"bundle {bundle.path} holds no LoRA; leave --lora out (or bench a bundle built with --lora)")
    from ldm_export.export.lora import apply_loras, parse_lora

    fused = apply_loras(modules, [parse_lora(a) for a in cfg.loras], spec.name)
    if [(x["sha256"], float(x["scale"])) for x in fused] != [(x.get("sha256"), float(x["scale"])) for x in recorded]:
        raise LdmExportError(f"--lora {' '.join(cfg.loras)} are not the LoRAs bundle {bundle.path} holds ({names}, in "
                             "this order, with these scales)")
    return []


def stats(times_s: list[float]) -> dict[str, float]:
    a = np.asarray(times_s, dtype=np.float64) * 1e3
    return {"median_ms": float(np.median(a)), "p90_ms": float(np.percentile(a, 90)), "min_ms": float(a.min()),
            "n": int(a.size)}


def timed(fn: Callable[[], object], repeats: int, warmup: int) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return stats(ts)


def image_fidelity(image: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Cosine and PSNR (dB) of a decoded image (B, 3, H, W) in [-1, 1] against the reference."""
    a = np.clip(image.astype(np.float64), -1, 1)
    r = np.clip(reference.astype(np.float64), -1, 1)
    cos = float((a.ravel() @ r.ravel()) / (np.linalg.norm(a) * np.linalg.norm(r) + 1e-30))
    mse = float(np.mean(((a - r) / 2.0) ** 2))
    psnr = float("inf") if mse == 0 else 10.0 * math.log10(1.0 / mse)
    return {"cosine": cos, "psnr_db": psnr, "finite": bool(np.isfinite(image).all())}


# ---------------------------------------------------------------- backends: components by name, composed by the family

class _Backend:
    """Runs a bundle's components by name (``run``); the family composes them (text encoders -> Conditioning,
    denoiser feeds, VAE decoder), so one backend serves SD 1.x, SDXL and any other family."""

    name = ""
    precision = ""
    family = None
    denoiser = "unet"

    def run(self, component: str, feeds: dict) -> dict: ...
    def memory_mb(self) -> float | None: return None
    def reset_memory(self) -> None: pass
    def close(self) -> None: pass

    # -- the work, through the family -------------------------------------------------------------------
    def text(self, ids: np.ndarray):
        """[negative, prompt] token ids (2, 77) -> the family's Conditioning (2 rows), float32."""
        return self.family.encode(_EncodeView(self, ids), ["", "prompt"][:len(ids)])

    def denoise(self, sample: np.ndarray, timestep: float, cond) -> np.ndarray:
        feeds = self.family.denoiser_feeds(sample, np.full((sample.shape[0],), float(timestep)), cond)
        return self.family.prediction(self.run_denoiser(feeds, cond), sample).astype(np.float32)

    def run_denoiser(self, feeds: dict, cond) -> dict:
        return self.run(self.denoiser, feeds)

    def vae(self, latent_sample: np.ndarray) -> np.ndarray:
        return self.run(self.family.decoder, {"latent_sample": latent_sample})["sample"].astype(np.float32)

    def time_components(self, ids, sample, timestep, cond, latent_sample, repeats, warmup) -> dict:
        return {"text_encoder": timed(lambda: self.text(ids), repeats, warmup),
                "unet_step": timed(lambda: self.denoise(sample, timestep, cond), repeats, warmup),
                "vae_decode": timed(lambda: self.vae(latent_sample), repeats, warmup)}


class _EncodeView:
    """What ``Family.encode`` needs of a pipeline: tokenizers (here: fixed ids) and ``run_component``."""

    def __init__(self, backend: _Backend, ids: np.ndarray):
        self.backend = backend
        self.tokenizers = {t: (lambda prompts: ids[:len(prompts)]) for t in backend.family.tokenizers}

    def run_component(self, component: str, feeds: dict, batched=None) -> dict:
        return self.backend.run(component, feeds)


def allow_tf32(allowed: bool) -> None:
    """PyTorch's process-wide TF32 flags, which each PyTorch backend sets for itself before it runs: off for the fp32
    fidelity reference (true fp32); on beside fp16, where the components kept fp32 (keep_fp32) use TF32 as ONNX
    Runtime's CUDA provider does for the bundle's fp32 graphs (its use_tf32 default)."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = allowed
    torch.backends.cudnn.allow_tf32 = allowed


def _components(family) -> list[str]:
    """The components a bench runs: text encoders, the denoiser and the decoder."""
    return [*family.text_encoders, family.denoiser, family.decoder]


class TorchBackend(_Backend):
    """diffusers/transformers modules on ``device``; ``compile`` wraps each component in torch.compile (default mode)."""

    def __init__(self, modules: dict, device: str, dtype: str, compile: bool = False, spec=None, keep_fp32=()):
        import torch

        from ldm_export.export import models as M

        self.torch = torch
        self.device = torch.device(device)
        self.dtype = {"fp16": torch.float16, "fp32": torch.float32}[dtype]
        keep_fp32 = [c for c in keep_fp32 if dtype != "fp32"]
        self.precision = precision_label(dtype, keep_fp32, _components(spec.family_def))
        self.name = "torch-compile" if compile else "torch-eager"
        self.family = spec.family_def
        self.denoiser = self.family.denoiser
        self.specs = spec.component_specs()
        self.configs = spec.configs
        if self.device.type == "cuda":
            allow_tf32(dtype != "fp32")
        self.dtypes = {c: torch.float32 if c in keep_fp32 else self.dtype for c in _components(self.family)}
        self.w = {c: M.wrap(c, modules, self.family).to(self.device, self.dtypes[c]).eval() for c in _components(self.family)}
        self.compile_s = None
        if compile:
            self.w = {c: torch.compile(m) for c, m in self.w.items()}
        self._cache: dict[str, tuple[object, object]] = {}  # input name -> (numpy array, device tensor)

    def _sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def _t(self, a, dtype=None):
        return self.torch.from_numpy(np.ascontiguousarray(a)).to(self.device, dtype or self.dtype)

    def _input(self, tensor_spec, a, dtype):
        torch = self.torch
        if tensor_spec.dtype.startswith("int"):
            return torch.from_numpy(np.ascontiguousarray(a)).to(self.device)
        if tensor_spec.name == "timestep":  # fp32: fp16 cannot hold fractional timesteps near 1000
            return torch.tensor(float(np.asarray(a).reshape(-1)[0]), device=self.device, dtype=torch.float32)
        cached = self._cache.get((tensor_spec.name, dtype))
        if cached is not None and cached[0] is a:  # conditioning stays on the device for one image
            return cached[1]
        t = self._t(a, dtype)
        self._cache[(tensor_spec.name, dtype)] = (a, t)
        return t

    def device_feeds(self, component: str, feeds: dict) -> list:
        return [self._input(t, feeds[t.name], self.dtypes[component]) for t in self.specs[component].inputs]

    def run(self, component, feeds):
        with self.torch.inference_mode():
            out = self.w[component](*self.device_feeds(component, feeds))
        out = out if isinstance(out, (tuple, list)) else (out,)
        return {n: o.float().cpu().numpy() for n, o in zip(self.specs[component].output_names, out)}

    def time_components(self, ids, sample, timestep, cond, latent_sample, repeats, warmup):
        torch = self.torch
        # made under inference_mode as run() makes the sampler loop's: a tensor made outside it fails torch.compile's
        # dispatch-key guard there, and the loop would run a second compilation of every component
        with torch.inference_mode():
            text_feeds = {c: self.device_feeds(c, {"input_ids": ids}) for c in self.family.text_encoders}
            unet_feeds = self.device_feeds(self.denoiser, self.family.denoiser_feeds(
                sample, np.full((sample.shape[0],), float(timestep)), cond))
            z = self.device_feeds(self.family.decoder, {"latent_sample": latent_sample})

        def run(fn):
            def call():
                with torch.inference_mode():
                    fn()
                self._sync()
            return call

        def text():
            for c, f in text_feeds.items():
                self.w[c](*f)

        t0 = time.perf_counter()
        run(lambda: self.w[self.denoiser](*unet_feeds))()  # first call: compiles under torch.compile
        run(lambda: self.w[self.family.decoder](*z))()
        run(text)()
        first = time.perf_counter() - t0
        if self.name == "torch-compile":
            self.compile_s = first
        return {"text_encoder": timed(run(text), repeats, warmup),
                "unet_step": timed(run(lambda: self.w[self.denoiser](*unet_feeds)), repeats, warmup),
                "vae_decode": timed(run(lambda: self.w[self.family.decoder](*z)), repeats, warmup)}

    def memory_mb(self):
        if self.device.type != "cuda":
            return None
        return self.torch.cuda.max_memory_allocated() / 2**20

    def reset_memory(self):
        if self.device.type == "cuda":
            self.torch.cuda.reset_peak_memory_stats()

    def close(self):
        self.w = {}
        self._cache = {}
        if self.device.type == "cuda":
            import gc

            gc.collect()
            self.torch.cuda.empty_cache()


class OrtBackend(_Backend):
    """The bundle's graphs on ONNX Runtime: CudaEngine (IOBinding, CUDA graphs when static) or the CPU OrtEngine."""

    def __init__(self, bundle_path: Path, device: str, threads: int | None = None, prefer_nhwc: bool = False,
                 cuda_options: dict[str, str] | None = None, native_tensorrt: bool = False):
        from ldm_export.runtime.bundle import Bundle

        self.bundle = Bundle.open(bundle_path)
        self.device = device
        self.name = "tensorrt" if native_tensorrt else "ort-nhwc" if prefer_nhwc else "ort"
        self.cuda_options = dict(cuda_options or {})
        self.family = self.bundle.family
        self.denoiser = self.family.denoiser
        self.precision = self.bundle.precision(self.denoiser)
        self.engines = {}
        t0 = time.perf_counter()
        for c in _components(self.family):
            spec = self.bundle.spec(c)
            if native_tensorrt:  # the plans `ldm-export engines` stored for this GPU and builder, as generate runs them
                from ldm_export.runtime.engine_tensorrt import load_tensorrt_engine

                self.engines[c] = load_tensorrt_engine(self.bundle, c)
            elif device == "cuda":
                from ldm_export.runtime.pipeline import cuda_engine

                # ort-nhwc: the runtime's own engine (channels-last, conv+bias fusion); ort: plain NCHW
                self.engines[c] = cuda_engine(self.bundle, c, tuned=prefer_nhwc, extra_options=cuda_options)
            else:
                from ldm_export.runtime.engine import OrtEngine

                self.engines[c] = OrtEngine(self.bundle.model_path(c), spec, "cpu", threads=threads)
        self.load_s = time.perf_counter() - t0
        self._cond_key = None
        self._base_mb = _gpu_used_mb() if device == "cuda" else None
        self._peak_mb = None

    def _typed(self, component, feeds):
        spec = self.engines[component].spec
        out = {}
        for t in spec.inputs:
            a = np.asarray(feeds[t.name])
            out[t.name] = np.asarray(a.reshape(-1)[0] if not t.shape and a.ndim else a).astype(t.dtype, copy=False)
        return out

    def run(self, component, feeds):
        out = self.engines[component].run(self._typed(component, feeds))
        self._track()
        return out

    def run_denoiser(self, feeds, cond):
        e = self.engines[self.denoiser]
        if hasattr(e, "run_partial") and e.static:
            typed = self._typed(self.denoiser, feeds)
            if self._cond_key is not cond:  # bound once per image, then only the latents and timestep travel
                self._cond_key = cond
                out = e.run_partial(typed)
            else:
                out = e.run_partial({n: typed[n] for n in self.family.step_inputs})
            self._track()
            return out
        return self.run(self.denoiser, feeds)

    def _track(self):
        if self._base_mb is not None:
            used = _gpu_used_mb()
            if used is not None:
                self._peak_mb = max(self._peak_mb or 0.0, used - self._base_mb)

    def time_components(self, ids, sample, timestep, cond, latent_sample, repeats, warmup):
        self._cond_key = None
        return super().time_components(ids, sample, timestep, cond, latent_sample, repeats, warmup)

    def memory_mb(self):
        return self._peak_mb

    def profile(self, runs: int = 5) -> dict:
        """Device time by kind of kernel for one UNet step and one VAE decode, as they run here (CUDA graphs
        included), from CUPTI; where it sees no kernels, ONNX Runtime's own per-op profile of the UNet instead.
        Needs a static-shape bundle (the engines replay their bound inputs)."""
        out = profile_engines(self.engines, ("unet", "vae_decoder"), runs)
        if not out["unet"]["kernels_per_run"]:
            log.warning("the profiler saw no GPU kernels (CUPTI unavailable?); falling back to ONNX Runtime's profiler")
            out = {"ort_unet_ops": profile_unet(self.bundle.path, runs=runs, prefer_nhwc=self.name == "ort-nhwc",
                                                cuda_options=self.cuda_options)}
        return out

    def close(self):
        self.engines = {}


def profile_engines(engines, components, runs: int = 5) -> dict:
    """CUPTI kernel profile of each of ``components``' engines replaying its last bound run (the U-Net and DiT
    benches' ``--profile``); raises _Skip for engines that cannot replay (dynamic shapes)."""
    from .kernel_profile import profile_kernels

    if not all(getattr(engines[c], "static", False) for c in components):
        raise _Skip("the kernel profile replays bound inputs: it needs a static-shape bundle (--static-shape)")
    return {c: profile_kernels(engines[c].replay, runs) for c in components}


def fp32_components(bundle, components) -> tuple[str, ...]:
    """The components ``bundle`` keeps in fp32 (SDXL's VAE decoder by its ``force_upcast``; a whole fp32 bundle): the
    PyTorch backends run those in fp32 too on a GPU. Without a bundle, none."""
    if bundle is None:
        return ()
    return tuple(c for c in components if c in bundle.components and bundle.precision(c) == "fp32")


def precision_label(dtype: str, keep_fp32, components=()) -> str:
    """"fp16", or "fp16 (vae_decoder fp32)" where some components run in fp32; "fp32" where all of ``components``
    do."""
    if dtype == "fp32" or (components and set(components) <= set(keep_fp32)):
        return "fp32"
    return f"{dtype} ({', '.join(keep_fp32)} fp32)" if keep_fp32 else dtype


def check_device_options(device: str, cuda_options, profile: bool, backends) -> None:
    """Options that mean nothing on this device or without an ort backend: refused before any work (the CLI calls
    this before it builds a bundle for the bench), instead of ignored."""
    if cuda_options and device != "cuda":
        raise LdmExportError("--cuda-option sets ONNX Runtime CUDA provider options; it needs --device cuda")
    parsed = [parse_backend(b) for b in backends]
    if device != "cuda" and any(opts for _, opts in parsed):
        raise LdmExportError(f"backend {next(b for b, (_, o) in zip(backends, parsed) if o)!r} sets ONNX Runtime CUDA "
                             "provider options; they need --device cuda")
    names = [b for b, _ in parsed]
    keys = [(b, tuple(sorted(o.items()))) for b, o in parsed]  # "ort:a=1" and "ort: a=1" are one backend
    if len(set(keys)) != len(keys):
        raise LdmExportError(f"--backends names {next(b for b, k in zip(backends, keys) if keys.count(k) > 1)!r} twice")
    if profile and device != "cuda":
        raise LdmExportError("--profile records the GPU kernels of the ort backends; it needs --device cuda")
    if profile and not any(b in ("ort", "ort-nhwc") for b in names):
        raise LdmExportError("--profile records the kernels of the ort backends: add ort (or ort-nhwc) to --backends")


def graphed(engines) -> list[str]:
    """The components whose CUDA engine replays a CUDA graph, read after the runs (an engine that fell back to none
    at its first run says so here, not only in a warning)."""
    return [c for c, e in engines.items() if getattr(e, "cuda_graph", False) is True]


def _gpu_used_mb() -> float | None:
    """Device memory in use (all processes), from NVML; None where NVML is missing."""
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        return pynvml.nvmlDeviceGetMemoryInfo(h).used / 2**20
    except Exception:  # NVML absent or no NVIDIA driver: memory is then not reported
        return None


# ---------------------------------------------------------------- the end-to-end loop

def end_to_end(backend: _Backend, ids: np.ndarray, latents: np.ndarray, scheduler_config: dict, steps: int,
               guidance_scale: float, size: int) -> tuple[np.ndarray, dict[str, float]]:
    """Text encoding + ``steps`` denoiser steps (numpy sampler, CFG batch 2) + VAE decode; returns the image and
    times. The family turns the text encoders' outputs into conditioning, the denoiser's feeds and the latents
    the VAE decodes."""
    from ldm_export.runtime import guided_denoiser, sample

    family = backend.family
    calls = [0, 0.0]  # denoiser calls in the loop and the time spent inside them

    def unet(x, t, c):
        s = time.perf_counter()
        out = backend.denoise(x, float(np.asarray(t).reshape(-1)[0]), c)
        calls[0] += 1
        calls[1] += time.perf_counter() - s
        return out

    t0 = time.perf_counter()
    cond = family.prepare(backend.text(ids), width=size, height=size, guidance_scale=guidance_scale)  # [neg, prompt]
    t1 = time.perf_counter()
    final = sample(guided_denoiser(unet, cond.rows(1, 2), cond.rows(0, 1), guidance_scale), latents, scheduler_config,
                   steps)
    t2 = time.perf_counter()
    image = backend.vae(family.latent_format(backend_configs(backend)).to_vae(final).astype(np.float32))  # (1, 3, H, W)
    t3 = time.perf_counter()
    return image, {"total_s": t3 - t0, "text_s": t1 - t0, "loop_s": t2 - t1, "decode_s": t3 - t2,
                   "unet_calls": calls[0], "unet_s": calls[1]}


def backend_configs(backend: _Backend) -> dict:
    return backend.bundle.module_configs if hasattr(backend, "bundle") else backend.configs


def host_step_overhead(scheduler_config: dict, steps: int, latents: np.ndarray, cond, guidance_scale: float) -> float:
    """Milliseconds a step spends on the host (sampler math + CFG + casts) with a denoiser that costs nothing."""
    from ldm_export.runtime import guided_denoiser, sample

    out = np.zeros((2,) + latents.shape[1:], np.float32)
    model = guided_denoiser(lambda x, t, c: out, cond.rows(1, 2), cond.rows(0, 1), guidance_scale, dtype=np.float16)
    t0 = time.perf_counter()
    sample(model, latents, scheduler_config, steps)
    return (time.perf_counter() - t0) / steps * 1e3


# ---------------------------------------------------------------- the run

def failed_entry(name: str, e: Exception) -> dict:
    """A failed backend's report entry, logged: an LdmExportError (a damaged bundle, a bad option) as its one line,
    anything else with its traceback."""
    if isinstance(e, LdmExportError):
        log.error("backend %s failed: %s", name, e)
    else:
        log.exception("backend %s failed", name)
    return {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}


def run_bench(cfg: BenchConfig, progress: Progress = lambda s: None) -> dict:
    """Run every backend of ``cfg`` on the same work; write bench.json, bench.md and a PNG chart to ``cfg.out``."""
    import torch

    from ldm_export.runtime.bundle import Bundle
    from ldm_export.zoo import get_model, spec_of_bundle

    from ldm_export.export.weights import load_weights

    if cfg.device not in ("cuda", "cpu"):
        raise LdmExportError(f"--device must be cuda or cpu, got {cfg.device!r}")
    check_device_options(cfg.device, cfg.cuda_options, cfg.profile, cfg.backends)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise LdmExportError("no CUDA device visible to PyTorch: run on a GPU machine, or pass --device cpu")
    wanted_ort = [b for b in cfg.backends if b.startswith("ort")]
    if wanted_ort and cfg.bundle is None:
        raise LdmExportError("the ort backends need a bundle: build one with `ldm-export build ... --out DIR` and pass --bundle DIR")
    bundle = Bundle.open(cfg.bundle) if cfg.bundle else None
    if bundle is not None and bundle.family.denoiser != "unet":  # SD3 / FLUX / demo DiT: the family's own loop
        if cfg.loras:
            raise LdmExportError("--lora: LoRAs reach the U-Net families only; a DiT bundle holds none")
        from .dit import run_dit_bench

        return run_dit_bench(cfg, bundle, progress)
    if cfg.guidance_scale is None:  # the U-Net bench times CFG's batch of 2 at every scale; 7.5 as diffusers' default
        cfg = replace(cfg, guidance_scale=7.5)
    from ldm_export.runtime.checks import MAX_GUIDANCE

    if not (math.isfinite(cfg.guidance_scale) and 1 < cfg.guidance_scale <= MAX_GUIDANCE):
        raise LdmExportError(f"the U-Net bench times classifier-free guidance (the UNet at batch 2), so --guidance-scale "
                             f"must be above 1 and at most {MAX_GUIDANCE:g}, got {cfg.guidance_scale:g}")
    if "ort-int8" in [parse_backend(b)[0] for b in cfg.backends]:
        _check_int8_bundle(cfg, bundle)
    spec = spec_of_bundle(bundle) if bundle else get_model(cfg.model)
    if "unet" not in spec.configs:
        raise LdmExportError(f"bench of the DiT model '{spec.name}' runs over a bundle: build one with `ldm-export "
                             f"build --model {spec.name} ... --out DIR` and pass --bundle DIR")
    if spec.unet["in_channels"] != spec.vae["latent_channels"]:
        raise LdmExportError(f"bench times text to image, and {spec.name}'s UNet is an inpainting UNet "
                             f"({spec.unet['in_channels']} input channels: latents, mask, masked-image latents); bench "
                             "its text-to-image model, or time edits with `generate --init-image/--mask`")
    weights_info = bundle.manifest["weights"] if bundle else {"source": "random", "seed": cfg.seed}
    source = weights_info["source"]
    if cfg.weights is not None and source in ("random", "embedded"):
        log.warning("--weights %s is not used: the bundle was built from %s weights, which bench makes again",
                    cfg.weights, source)
    if source == "random":
        loaded = load_weights(spec, None, random_weights=True, seed=weights_info.get("seed", cfg.seed))
    elif source == "embedded" or weights_info.get("path") is None:
        from ldm_export.export.build import embedded_weights_path

        loaded = load_weights(spec, embedded_weights_path(spec))
    else:
        if cfg.weights is None and any(b.startswith("torch") for b in cfg.backends):
            raise LdmExportError(f"the bundle was built from the weights '{weights_info['path']}'; pass --weights PATH for "
                                 "the PyTorch backends (a bundle keeps no paths of the machine that built it)")
        loaded = load_weights(spec, Path(cfg.weights))
        if weights_info.get("sha256") and loaded.sha256 and loaded.sha256 != weights_info["sha256"]:
            raise LdmExportError(f"--weights {cfg.weights} are not the weights the bundle was built from (sha256 differs)")
    modules = loaded.modules
    lora_notes = _bundle_loras(cfg, bundle, modules, spec)
    torch.set_grad_enabled(False)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    rng = np.random.default_rng(cfg.seed)
    side = spec.latent_side
    ids = np.full((2, spec.max_length), 49407, np.int32)  # [negative "", prompt]
    ids[:, 0] = 49406
    ids[1, 1:9] = rng.integers(256, 49406, 8)
    ids[0, 1] = 49407
    latents = rng.standard_normal((1, spec.vae["latent_channels"], side, side)).astype(np.float32)
    sample_x = rng.standard_normal((2, spec.vae["latent_channels"], side, side)).astype(np.float32)
    latent_sample = (rng.standard_normal((1, spec.vae["latent_channels"], side, side)) / spec.latent_scale).astype(np.float32)
    scheduler_config = bundle.scheduler_config if bundle else dict(spec.scheduler)
    gpu = torch.cuda.get_device_name(0) if cfg.device == "cuda" else None
    result: dict = {"model": spec.name, "weights": source, "device": cfg.device, "gpu": gpu,
                    "resolution": spec.resolution, "steps": cfg.steps, "guidance_scale": cfg.guidance_scale,
                    "repeats": cfg.repeats, "e2e_repeats": cfg.e2e_repeats, "warmup": cfg.warmup,
                    "scheduler": scheduler_config.get("_class_name"), "bundle": str(cfg.bundle) if cfg.bundle else None,
                    "bundle_target": bundle.manifest.get("target") if bundle else None,
                    # what ort-int8 is compared with: the --bundle's denoiser precision (fp16 on a GPU, fp32 on a CPU)
                    "bundle_precision": bundle.precision(spec.family_def.denoiser) if bundle else None,
                    "bundle_kernels": {c: bundle.manifest["components"][c].get("kernels") for c in bundle.components} if bundle else None,
                    "torch": torch.__version__, "backends": {}, "notes": list(cfg.notes) + lora_notes,
                    "cuda_options": dict(cfg.cuda_options)}
    try:
        import onnxruntime

        result["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass

    # reference: PyTorch fp32, same ids and latents
    progress("reference: PyTorch fp32 end to end")
    ref = TorchBackend(modules, cfg.device, "fp32", spec=spec)
    ref_image, ref_t = end_to_end(ref, ids, latents, scheduler_config, cfg.steps, cfg.guidance_scale, spec.resolution)
    cond_ref = spec.family_def.prepare(ref.text(ids), width=spec.resolution, height=spec.resolution,
                                       guidance_scale=cfg.guidance_scale)
    ref.close()
    del ref
    result["reference"] = {"backend": "torch fp32", "end_to_end_s": ref_t["total_s"]}
    result["host_step_overhead_ms"] = host_step_overhead(scheduler_config, cfg.steps, latents, cond_ref, cfg.guidance_scale)

    half = "fp16" if cfg.device == "cuda" else "fp32"
    # the same work: the PyTorch backends run a component in fp32 where the bundle keeps it fp32 (SDXL's VAE decoder,
    # which diffusers' SDXL pipeline upcasts too), not in a cheaper precision than the engine they are compared with
    keep_fp32 = fp32_components(bundle, _components(spec.family_def)) if half == "fp16" else ()
    for name in cfg.backends:
        progress(f"{name}: loading")
        entry: dict = {}
        b = None
        try:
            base, own_options = parse_backend(name)
            cuda_options = {**cfg.cuda_options, **own_options}
            if own_options:
                entry["cuda_options"] = own_options
            if base in ("torch-eager", "torch-compile"):
                b = TorchBackend(modules, cfg.device, half, compile=base == "torch-compile", spec=spec, keep_fp32=keep_fp32)
            elif base in ("ort", "ort-nhwc"):
                if base == "ort-nhwc" and cfg.device != "cuda":
                    raise _Skip("channels-last convolutions are a CUDA provider option")
                b = OrtBackend(cfg.bundle, cfg.device, cfg.threads, prefer_nhwc=base == "ort-nhwc",
                               cuda_options=cuda_options)
                entry["load_s"] = b.load_s
            elif base == "ort-int8":
                b = OrtBackend(cfg.int8_bundle, cfg.device, cfg.threads, cuda_options=cuda_options)
                b.name = "ort-int8"
                entry["load_s"] = b.load_s
            elif base == "tensorrt":
                if cfg.device != "cuda":
                    raise _Skip("TensorRT engines run on a CUDA GPU: use --device cuda")
                if cfg.bundle is None:
                    raise _Skip("the tensorrt backend runs the engines stored in a bundle: give --bundle")
                try:
                    b = OrtBackend(cfg.bundle, "cuda", native_tensorrt=True)
                except LdmExportError as e:  # no TensorRT, no engines for this GPU, a refused plan: say why
                    raise _Skip(str(e)) from None
                entry["load_s"] = b.load_s
            else:
                raise LdmExportError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
            b.reset_memory()
            progress(f"{name}: components")
            entry["precision"] = b.precision
            entry["components"] = b.time_components(ids, sample_x, 500.0, cond_ref.astype(np.float32), latent_sample,
                                                    cfg.repeats, cfg.warmup)
            if getattr(b, "compile_s", None) is not None:
                entry["compile_s"] = b.compile_s
            progress(f"{name}: end to end")
            image, _ = end_to_end(b, ids, latents, scheduler_config, cfg.steps, cfg.guidance_scale, spec.resolution)
            runs = []
            for _ in range(cfg.e2e_repeats):
                image, t = end_to_end(b, ids, latents, scheduler_config, cfg.steps, cfg.guidance_scale, spec.resolution)
                runs.append(t)
            entry["end_to_end"] = stats([r["total_s"] for r in runs])
            entry["end_to_end_loop_per_step_ms"] = float(np.median([r["loop_s"] for r in runs])) / cfg.steps * 1e3
            # where the loop's time goes: inside the UNet calls (device work + copies) and on the host around them
            entry["end_to_end_unet_calls"] = runs[-1]["unet_calls"]
            entry["end_to_end_unet_call_ms"] = float(np.median([r["unet_s"] / r["unet_calls"] for r in runs])) * 1e3
            entry["end_to_end_host_per_step_ms"] = float(np.median([(r["loop_s"] - r["unet_s"]) for r in runs])) / cfg.steps * 1e3
            entry["fidelity"] = image_fidelity(image, ref_image)
            entry["gpu_memory_peak_mb"] = b.memory_mb()
            if base.startswith("ort") and cfg.device == "cuda":
                entry["cuda_graphs"] = graphed(b.engines)
            if base.startswith("ort") and cfg.profile and cfg.device == "cuda":
                progress(f"{name}: profile")
                try:
                    entry["profile"] = b.profile()
                except _Skip as e:  # the timings stand; only the profile is missing
                    entry["profile_skipped"] = str(e)
        except _Skip as e:
            entry = {"skipped": str(e)}
        except Exception as e:  # one backend failing must not lose the others' numbers; the error is reported
            entry = failed_entry(name, e)
        finally:  # a failed backend must not keep its device memory (the next backend's reading would be off)
            if b is not None:
                b.close()
            del b
        result["backends"][name] = entry
        write_reports(result, cfg.out)  # after every backend: a run cut short keeps what it measured
        progress(f"{name}: done")
    if all("components" in result["backends"].get(n, {}) for n in ("ort", "ort-int8")):
        progress("ort vs ort-int8: in alternation")
        try:
            result["int8_paired"] = int8_paired(cfg, ids, sample_x, cond_ref.astype(np.float32), latents,
                                                scheduler_config, spec.resolution)
        except Exception as e:  # the backends' own figures stand; the pairing's failure is reported
            log.exception("the alternating ort / ort-int8 timing failed")
            result["int8_paired"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    write_reports(result, cfg.out)
    return result


def int8_paired(cfg: BenchConfig, ids, sample, cond, latents, scheduler_config: dict, resolution: int) -> dict:
    """The fp32 and int8 bundles timed call by call in alternation (A B, then B A), both loaded at once: on a machine
    whose load drifts (a shared CPU), one backend after the other can differ by the drift alone, while a pair shares
    it. UNet step: ``cfg.repeats`` pairs after ``cfg.warmup`` warm-up calls each; end to end: ``cfg.e2e_repeats`` pairs."""
    backends: dict = {}
    try:
        backends["fp32"] = OrtBackend(cfg.bundle, cfg.device, cfg.threads, cuda_options=cfg.cuda_options)
        backends["int8"] = OrtBackend(cfg.int8_bundle, cfg.device, cfg.threads, cuda_options=cfg.cuda_options)
        return _pairs(backends, cfg, ids, sample, cond, latents, scheduler_config, resolution)
    finally:
        for b in backends.values():
            b.close()


def _pairs(backends: dict, cfg: BenchConfig, ids, sample, cond, latents, scheduler_config: dict, resolution: int) -> dict:
    """Time ``backends["fp32"]`` and ``backends["int8"]`` in alternation: UNet steps, then whole images (each after
    its own untimed warm-up, as the per-backend timings)."""
    step = lambda b: b.denoise(sample, 500.0, cond)  # noqa: E731
    whole = lambda b: end_to_end(b, ids, latents, scheduler_config, cfg.steps, cfg.guidance_scale, resolution)  # noqa: E731
    out = {}
    for what, fn, pairs, warmup in (("unet_step", step, cfg.repeats, cfg.warmup), ("end_to_end", whole, cfg.e2e_repeats, 1)):
        for _ in range(warmup):
            for b in backends.values():
                fn(b)
        out[what] = alternate({name: (lambda b=b: fn(b)) for name, b in backends.items()}, pairs)
    return out


def alternate(calls: dict[str, Callable[[], object]], pairs: int,
              on_pair: Callable[[int, float, float], None] | None = None) -> dict:
    """Time ``calls["fp32"]`` and ``calls["int8"]`` in alternation, ``pairs`` pairs (at least one), who goes first
    alternating too; ``on_pair(i, fp32_s, int8_s)`` after each. Per-pair times (ms) and the fp32 / int8 ratios."""
    times: dict[str, list[float]] = {"fp32": [], "int8": []}
    for i in range(max(pairs, 1)):
        for name in (("fp32", "int8") if i % 2 == 0 else ("int8", "fp32")):
            t0 = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - t0)
        if on_pair is not None:
            on_pair(i, times["fp32"][-1], times["int8"][-1])
    ratios = [a / b for a, b in zip(times["fp32"], times["int8"])]
    return {"pairs": len(ratios), "fp32_ms": [t * 1e3 for t in times["fp32"]],
            "int8_ms": [t * 1e3 for t in times["int8"]], "ratio_median": float(np.median(ratios)),
            "ratio_min": float(min(ratios)), "ratio_max": float(max(ratios))}


class _Skip(Exception):
    pass


def _check_int8_bundle(cfg: BenchConfig, bundle) -> None:
    """The ort-int8 backend runs ``--int8-bundle``: an int8 bundle of the same model and weights as ``--bundle``."""
    from ldm_export.runtime.bundle import Bundle

    if cfg.int8_bundle is None:
        raise LdmExportError("the ort-int8 backend needs --int8-bundle DIR (`ldm-export build --precision int8` or "
                             "`ldm-export quantize`)")
    int8 = Bundle.open(cfg.int8_bundle)
    if "int8" not in int8.manifest:
        raise LdmExportError(f"{cfg.int8_bundle} is not an int8 bundle; build one with --precision int8")
    if bundle is None:
        raise LdmExportError("the ort-int8 backend is compared with --bundle (the fp32 bundle of the same model)")
    if "int8" in bundle.manifest:  # ort would time the int8 UNet too, and the report would compare int8 with itself
        raise LdmExportError(f"--bundle {cfg.bundle} is itself an int8 bundle; pass the fp32 bundle it was quantised from "
                             "as --bundle and the int8 one as --int8-bundle")
    if int8.model["name"] != bundle.model["name"] or int8.manifest["weights"] != bundle.manifest["weights"] \
            or int8.manifest.get("loras") != bundle.manifest.get("loras"):  # weights hold the LoRAs; older bundles: top level
        raise LdmExportError(f"{cfg.int8_bundle} holds another model or weights than {cfg.bundle}; give the int8 "
                             "bundle made from the same fp32 weights")


def profile_unet(bundle_path: Path, runs: int = 5, warmup: int = 2, prefer_nhwc: bool = False,
                 cuda_options: dict[str, str] | None = None) -> dict:
    """ONNX Runtime's profiler on the UNet (CUDA provider, no CUDA graph so nodes are timed, on the host): ms per
    op type a step. The fallback of :meth:`OrtBackend.profile`."""
    import tempfile

    from ldm_export.runtime.bundle import Bundle
    from ldm_export.runtime.engine_cuda import CudaEngine, profile_summary

    from ldm_export.export.onnx_export import sample_inputs

    b = Bundle.open(bundle_path)
    with tempfile.TemporaryDirectory() as tmp:
        e = CudaEngine(b.model_path("unet"), b.spec("unet"), cuda_graph=False, prefer_nhwc=prefer_nhwc,
                       profile_prefix=str(Path(tmp) / "unet_profile"), provider_options=cuda_options)
        feeds = sample_inputs(b.spec("unet"))
        for _ in range(warmup + runs):
            e.run(feeds)
        total, rows = profile_summary(e.end_profiling(), top=15, skip_runs=warmup)
    return {"per_step_ms_kernel_total": total,
            "by_op": [{"op": op, "ms_per_step": ms, "calls_per_step": n, "share": share} for op, ms, n, share in rows]}


# ---------------------------------------------------------------- reports

def markdown(result: dict) -> str:
    from .kernel_profile import format_profile

    eager = result["backends"].get("torch-eager", {}).get("end_to_end", {}).get("median_ms")
    where = result["gpu"] or "CPU"
    den = result.get("denoiser", "UNet")
    cfg_calls = (f"{den} batch 2; the engine's {den} in two batch-1 calls, --sequential-cfg"
                 if result.get("sequential_cfg") else f"{den} batch 2")
    guidance = (f"CFG {result['guidance_scale']:g} ({cfg_calls})" if result.get("cfg", True) else
                f"guidance {result['guidance_scale']:g}, no CFG ({den} batch 1)")
    warm = (f"after {result['warmup']} warm-up runs" if result.get("warmup") else
            "without warm-up runs (the first included)")
    lines = [f"**{result['model']}** ({result['weights']} weights), {result['resolution']}², {result['steps']} steps, "
             f"{guidance}, on {where}; median (p90) over {result['repeats']} runs per component {warm}, "
             f"{result['e2e_repeats']} end to end after one warm-up image.", "",
             "| backend | precision | text encoder ms | UNet step ms | VAE decode ms | end to end s | vs eager | "
             "GPU mem peak MB | image cosine | image PSNR dB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, e in result["backends"].items():
        if "skipped" in e or "error" in e:
            why = "skipped: " + e["skipped"] if "skipped" in e else "error: " + e["error"]
            lines.append(f"| {name} | — | {why if len(why) <= 240 else why[:237] + '...'} |"
                         " | | | | | | |")
            continue
        c = e["components"]
        f = lambda s: f"{s['median_ms']:.2f} ({s['p90_ms']:.2f})"  # noqa: E731
        e2e = e["end_to_end"]
        speed = f"{eager / e2e['median_ms']:.2f}×" if eager else "—"
        mem = f"{e['gpu_memory_peak_mb']:.0f}" if e.get("gpu_memory_peak_mb") else "—"
        lines.append(f"| {name} | {e['precision']} | {f(c['text_encoder'])} | {f(c['unet_step'])} | {f(c['vae_decode'])} | "
                     f"{e2e['median_ms'] / 1e3:.3f} ({e2e['p90_ms'] / 1e3:.3f}) | {speed} | {mem} | "
                     f"{e['fidelity']['cosine']:.6f} | {e['fidelity']['psnr_db']:.1f} |")
    lines.append("")
    if result.get("host_step_overhead_ms") is not None:
        lines.append(f"Host work per step (numpy sampler + CFG + casts, UNet excluded): {result['host_step_overhead_ms']:.3f} ms.")
    ratio = int8_speedup(result)
    base = result.get("bundle_precision") or "fp32"  # the --bundle int8 is compared with (fp16 on a GPU)
    if ratio:
        lines.append(f"int8 against {base} (ort-int8 vs ort, same run): UNet step {ratio['unet_step']:.2f}×, "
                     f"end to end {ratio['end_to_end']:.2f}× faster.")
    paired = result.get("int8_paired")
    if paired and "error" in paired:
        lines.append(f"int8 against {base} timed in alternation: failed ({paired['error']}).")
    elif paired:
        u, w = paired["unet_step"], paired["end_to_end"]
        lines.append(f"int8 against {base} timed in alternation ({base}/int8 per pair, both loaded, same feeds): UNet step "
                     f"{u['ratio_median']:.2f}× (median of {u['pairs']} pairs, {u['ratio_min']:.2f} to {u['ratio_max']:.2f}), "
                     f"end to end {w['ratio_median']:.2f}× (median of {w['pairs']} pairs, {w['ratio_min']:.2f} to "
                     f"{w['ratio_max']:.2f}).")
    if result.get("cuda_options"):
        lines.append("CUDA provider options for the ort backends: "
                     + ", ".join(f"{k}={v}" for k, v in result["cuda_options"].items()) + ".")
    for name, e in result["backends"].items():
        if "compile_s" in e:
            lines.append(f"{name}: first call (compilation) {e['compile_s']:.1f} s.")
        if "end_to_end_loop_per_step_ms" in e:
            lines.append(f"{name}: sampler loop {e['end_to_end_loop_per_step_ms']:.2f} ms a step end to end"
                         + (f" ({e['end_to_end_unet_calls']} UNet calls of {e['end_to_end_unet_call_ms']:.2f} ms, "
                            f"{e['end_to_end_host_per_step_ms']:.2f} ms a step on the host around them)."
                            if "end_to_end_unet_calls" in e else "."))
        if "cuda_graphs" in e:
            lines.append(f"{name}: CUDA graphs: {', '.join(e['cuda_graphs']) or 'none'}.")
        if "profile_skipped" in e:
            lines.append(f"{name}: no kernel profile: {e['profile_skipped']}")
        if "profile_note" in e:
            lines.append(f"{name}: {e['profile_note']}.")
        if "profile" in e:
            for comp, p in e["profile"].items():
                if comp == "ort_unet_ops":
                    lines += ["", f"ONNX Runtime profile of the UNet ({name}, CUDA provider without CUDA graphs, host-timed "
                              f"nodes {p['per_step_ms_kernel_total']:.2f} ms a step):", "", "| op | ms a step | calls | share |",
                              "|---|---|---|---|"]
                    lines += [f"| {r['op']} | {r['ms_per_step']:.3f} | {r['calls_per_step']:.0f} | {100 * r['share']:.1f}% |"
                              for r in p["by_op"]]
                else:
                    lines += ["", format_profile(p, f"GPU kernels of one {comp} run ({name}, as benchmarked)")]
    for n in result.get("notes", []):
        lines.append(f"Note: {n}")
    return "\n".join(lines) + "\n"


def int8_speedup(result: dict) -> dict | None:
    """How much faster ort-int8 ran than ort in one run: UNet step and end to end (None unless both ran)."""
    a, b = result["backends"].get("ort", {}), result["backends"].get("ort-int8", {})
    if "components" not in a or "components" not in b:
        return None
    return {"unet_step": a["components"]["unet_step"]["median_ms"] / b["components"]["unet_step"]["median_ms"],
            "end_to_end": a["end_to_end"]["median_ms"] / b["end_to_end"]["median_ms"]}


def chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = {n: e for n, e in result["backends"].items() if "components" in e}
    if not ok:
        return
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.6))
    keys = [("text_encoder", "text encoder (ms)"), ("unet_step", "UNet step, batch 2 (ms)"), ("vae_decode", "VAE decode (ms)")]
    names = list(ok)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (k, title) in zip(axes, keys):
        vals = [ok[n]["components"][k]["median_ms"] for n in names]
        ax.bar(names, vals, color=colors[: len(names)])
        ax.set_title(title, fontsize=9)
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    vals = [ok[n]["end_to_end"]["median_ms"] / 1e3 for n in names]
    axes[3].bar(names, vals, color=colors[: len(names)])
    axes[3].set_title(f"end to end, {result['steps']} steps (s)", fontsize=9)
    for i, v in enumerate(vals):
        axes[3].text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.suptitle(f"{result['model']} {result['resolution']}², {result['gpu'] or 'CPU'}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_reports(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stem = f"bench_{result['model']}_{result['device']}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(result))
    chart(result, out / f"{stem}.png")


def config_dict(cfg: BenchConfig) -> dict:
    d = asdict(cfg)
    d["out"] = str(cfg.out)
    d["bundle"] = str(cfg.bundle) if cfg.bundle else None
    return d
