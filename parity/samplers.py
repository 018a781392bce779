"""Sampler parity against diffusers 0.35.2: ``python -m ldm_export.parity.samplers``.

Runs every runtime sampler and diffusers' own scheduler loop (set_timesteps, scale_model_input, step) on the
same deterministic stand-in model and the same noise, prints a table of max relative errors and per-step
overhead, and writes docs/sampler_parity.md. The reference helpers are also used by tests/test_samplers.py.
"""
from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ldm_export.runtime import sample
from ldm_export.runtime.schedulers import DPMPP_2S_ANCESTRAL, resolve_scheduler

SD15_BASE = {"_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
             "beta_end": 0.012, "beta_schedule": "scaled_linear", "set_alpha_to_one": False, "skip_prk_steps": True,
             "steps_offset": 1, "clip_sample": False, "trained_betas": None}
FLOW_BASE = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
# FLUX.1's scheduler configs (schnell: static shift 1; dev: resolution-dependent shift from mu)
_FLUX_SHIFTING = {"base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15}
FLUX_SCHNELL_BASE = dict(FLOW_BASE, **_FLUX_SHIFTING, shift=1.0, use_dynamic_shifting=False)
FLUX_DEV_BASE = dict(FLOW_BASE, **_FLUX_SHIFTING, shift=3.0, use_dynamic_shifting=True)


def flux_schedule(config: dict, steps: int, image_seq_len: int) -> dict:
    """What FluxPipeline hands to set_timesteps: its own sigmas linspace(1, 1/n, n) and mu from the config."""
    from ldm_export.runtime.schedules import calculate_shift

    keys = ("base_image_seq_len", "max_image_seq_len", "base_shift", "max_shift")
    return {"sigmas": np.linspace(1.0, 1 / steps, steps), "mu": calculate_shift(image_seq_len, *(config[k] for k in keys))}


def stand_in_model(x: np.ndarray, t) -> np.ndarray:
    """A fixed nonlinear function of (x, t) standing in for a UNet: any sampler mistake changes its output."""
    tt = float(t) / 1000.0
    channel = np.arange(x.shape[1], dtype=np.float64).reshape(1, -1, *([1] * (x.ndim - 2)))
    return 0.6 * np.tanh(x) + 0.25 * np.sin(3.0 * tt + channel) * x + 0.1 * np.cos(2.0 * x * tt + channel)


class NoiseSequence:
    """A reproducible sequence of standard-normal draws; two instances with one seed yield the same draws."""

    def __init__(self, seed: int = 1):
        self.rng = np.random.default_rng(seed)
        self.calls = 0

    def __call__(self, shape):
        self.calls += 1
        return self.rng.standard_normal(tuple(shape))


@contextmanager
def patched_randn(scheduler_module, noise):
    """Make diffusers' randn_tensor in one scheduler module draw from `noise` (restored afterwards)."""
    import torch

    original = getattr(scheduler_module, "randn_tensor", None)
    if original is None:  # a deterministic scheduler: nothing to patch
        yield
        return

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        return torch.from_numpy(noise(tuple(shape))).to(dtype=dtype or torch.float32)

    scheduler_module.randn_tensor = randn_tensor
    try:
        yield
    finally:
        scheduler_module.randn_tensor = original


def _lms_scheduler_class():
    """diffusers' LMSDiscreteScheduler; without scipy, its module is loaded with a stand-in scipy.integrate.quad.

    The stand-in is 16-point Gauss-Legendre quadrature, exact for the cubic Lagrange polynomials LMS integrates
    (scipy's quad is exact on them too); everything else is diffusers' own code.
    """
    import importlib
    import types

    try:
        import scipy  # noqa: F401
        return importlib.import_module("diffusers.schedulers.scheduling_lms_discrete").LMSDiscreteScheduler
    except ImportError:
        pass
    nodes, weights = np.polynomial.legendre.leggauss(16)

    def quad(func, a, b, epsrel=None):
        a, b = float(a), float(b)
        xs = 0.5 * (b - a) * nodes + 0.5 * (b + a)
        return 0.5 * (b - a) * sum(w * float(func(x)) for w, x in zip(weights, xs)), 0.0

    stub = types.ModuleType("scipy")
    stub.integrate = types.SimpleNamespace(quad=quad)
    stub.stats = types.ModuleType("scipy.stats")
    saved = {name: sys.modules.get(name) for name in ("scipy", "scipy.stats")}
    sys.modules["scipy"], sys.modules["scipy.stats"] = stub, stub.stats
    try:
        return importlib.import_module("diffusers.schedulers.scheduling_lms_discrete").LMSDiscreteScheduler
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def diffusers_reference(config: dict, steps: int, model, latents: np.ndarray, noise, **set_timesteps) -> np.ndarray:
    """The standard diffusers denoising loop over the scheduler class that config names, in float64;
    ``set_timesteps``: extra arguments of set_timesteps (flow matching's ``mu`` and ``sigmas``)."""
    import diffusers
    import torch

    if config["_class_name"] == "LMSDiscreteScheduler":
        cls = _lms_scheduler_class()
    else:
        cls = getattr(diffusers, config["_class_name"])
    scheduler = cls.from_config({k: v for k, v in config.items() if k != "_class_name"})
    if set_timesteps.get("sigmas") is not None:
        scheduler.set_timesteps(sigmas=list(set_timesteps["sigmas"]), mu=set_timesteps.get("mu"))
    else:
        scheduler.set_timesteps(steps, **set_timesteps)
    x = torch.from_numpy(latents.astype(np.float64)) * getattr(scheduler, "init_noise_sigma", 1.0)
    with patched_randn(sys.modules[cls.__module__], noise):
        for t in scheduler.timesteps:
            # FlowMatchEulerDiscreteScheduler has no scale_model_input: its model takes x as is.
            x_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
            out = torch.from_numpy(np.asarray(model(x_in.numpy(), np.float64(t.item())), dtype=np.float64))
            x = scheduler.step(out, t, x).prev_sample
    return x.numpy()


def kdiffusion_2s_ancestral_reference(config: dict, steps: int, model, latents: np.ndarray, noise) -> np.ndarray:
    """Direct torch transcription of k-diffusion's sample_dpmpp_2s_ancestral (eta 1, s_noise 1).

    Sigmas come from diffusers' EulerAncestralDiscreteScheduler for the same config (the schedule the runtime
    uses); the wrapped model is k-diffusion's CompVisDenoiser (c_in = 1/sqrt(sigma^2+1), eps or v output),
    evaluated at the schedule's timestep for a schedule sigma and at k-diffusion's sigma_to_t otherwise.
    """
    import diffusers
    import torch

    euler_config = dict(config, _class_name="EulerAncestralDiscreteScheduler")
    for key in ("use_karras_sigmas", "use_exponential_sigmas"):
        euler_config.pop(key, None)
    if config.get("use_karras_sigmas"):
        euler_config["_class_name"] = "EulerDiscreteScheduler"
        euler_config["use_karras_sigmas"] = True
    cls = getattr(diffusers, euler_config["_class_name"])
    scheduler = cls.from_config({k: v for k, v in euler_config.items() if k != "_class_name"})
    scheduler.set_timesteps(steps)
    sigmas = scheduler.sigmas.to(torch.float64)
    schedule_t = {float(s): float(t) for s, t in zip(scheduler.sigmas[:-1], scheduler.timesteps)}
    log_sigmas = torch.from_numpy(
        np.log(np.sqrt((1 - scheduler.alphas_cumprod.numpy()) / scheduler.alphas_cumprod.numpy()))).to(torch.float64)
    prediction_type = config.get("prediction_type", "epsilon")

    def sigma_to_t(sigma):  # k_diffusion.external.DiscreteSchedule.sigma_to_t
        log_sigma = sigma.log()
        dists = log_sigma - log_sigmas[:, None]
        low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.shape[0] - 2)
        high_idx = low_idx + 1
        low, high = log_sigmas[low_idx], log_sigmas[high_idx]
        w = ((low - log_sigma) / (low - high)).clamp(0, 1)
        return (1 - w) * low_idx + w * high_idx

    def denoiser(x, sigma):
        t = schedule_t.get(float(sigma.to(torch.float32)), None)
        t = float(sigma_to_t(sigma)) if t is None else t
        c_in = 1 / (sigma ** 2 + 1) ** 0.5
        out = torch.from_numpy(np.asarray(model((x * c_in).numpy(), np.float64(t)), dtype=np.float64))
        if prediction_type == "v_prediction":
            return x / (sigma ** 2 + 1) - out * sigma * c_in
        if prediction_type == "sample":
            return out
        return x - out * sigma

    def get_ancestral_step(sigma_from, sigma_to, eta=1.0):
        sigma_up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
        sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
        return sigma_down, sigma_up

    sigma_fn = lambda t: t.neg().exp()  # noqa: E731 (as k-diffusion writes it)
    t_fn = lambda sigma: sigma.log().neg()  # noqa: E731
    x = torch.from_numpy(latents.astype(np.float64)) * scheduler.init_noise_sigma.to(torch.float64)
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i])
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1])
        if sigma_down == 0:
            d = (x - denoised) / sigmas[i]
            x = x + d * (sigma_down - sigmas[i])
        else:
            t, t_next = t_fn(sigmas[i]), t_fn(sigma_down)
            r = 1 / 2
            h = t_next - t
            s = t + r * h
            x_2 = (sigma_fn(s) / sigma_fn(t)) * x - (-h * r).expm1() * denoised
            denoised_2 = denoiser(x_2, sigma_fn(s))
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised_2
        if sigmas[i + 1] > 0:
            x = x + torch.from_numpy(noise(tuple(x.shape))) * sigma_up
    return x.numpy()


def reference(config: dict, steps: int, model, latents: np.ndarray, noise, **set_timesteps) -> np.ndarray:
    if config["_class_name"] == DPMPP_2S_ANCESTRAL:
        return kdiffusion_2s_ancestral_reference(config, steps, model, latents, noise)
    return diffusers_reference(config, steps, model, latents, noise, **set_timesteps)


def max_relative_error(ours: np.ndarray, theirs: np.ndarray) -> float:
    """max |ours - theirs| / max |theirs|: one number per run, scale-free."""
    return float(np.max(np.abs(ours - theirs)) / max(np.max(np.abs(theirs)), 1e-30))


def compare(config: dict, steps: int, shape=(1, 4, 8, 8), seed: int = 0, model=stand_in_model, **set_timesteps) -> float:
    latents = np.random.default_rng(seed).standard_normal(shape)
    ours = sample(model, latents, config, steps, noise=NoiseSequence(seed + 1), **set_timesteps)
    theirs = reference(config, steps, model, latents, NoiseSequence(seed + 1), **set_timesteps)
    return max_relative_error(ours, theirs)


# (label, A1111 or class name, base, extra config keys)
TABLE_ROWS = [
    ("DDIM", "DDIM", SD15_BASE, {}),
    ("DDPM", "DDPM", SD15_BASE, {}),
    ("PLMS", "PLMS", SD15_BASE, {}),
    ("LMS", "LMS", SD15_BASE, {}),
    ("LMS Karras", "LMS Karras", SD15_BASE, {}),
    ("Euler", "Euler", SD15_BASE, {}),
    ("Euler Karras", "Euler Karras", SD15_BASE, {}),
    ("Euler a", "Euler a", SD15_BASE, {}),
    ("Heun", "Heun", SD15_BASE, {}),
    ("DPM2", "DPM2", SD15_BASE, {}),
    ("DPM2 Karras", "DPM2 Karras", SD15_BASE, {}),
    ("DPM2 a", "DPM2 a", SD15_BASE, {}),
    ("DPM++ 2M", "DPM++ 2M", SD15_BASE, {}),
    ("DPM++ 2M Karras", "DPM++ 2M Karras", SD15_BASE, {}),
    ("DPM++ 2M SDE", "DPM++ 2M SDE", SD15_BASE, {}),
    ("DPM++ 2M SDE Karras", "DPM++ 2M SDE Karras", SD15_BASE, {}),
    ("DPM++ 2S", "DPM++ 2S", SD15_BASE, {}),
    ("DPM++ 2S a (vs k-diffusion transcription)", "DPM++ 2S a", SD15_BASE, {}),
    ("UniPC", "UniPC", SD15_BASE, {}),
    ("LCM", "LCM", SD15_BASE, {}),
    ("Euler (flow matching, shift 3)", "Euler (flow)", FLOW_BASE, {}),
    # (..., FluxPipeline's set_timesteps arguments for a packed token count): 1024² is 4096 tokens, 512² 1024
    ("Euler (flow, FLUX-schnell: static shift 1, pipeline sigmas)", "Euler (flow)", FLUX_SCHNELL_BASE, {}, 4096),
    ("Euler (flow, FLUX-dev: dynamic shift, 512², mu 0.63)", "Euler (flow)", FLUX_DEV_BASE, {}, 1024),
    ("Euler (flow, FLUX-dev: dynamic shift, 1024², mu 1.15)", "Euler (flow)", FLUX_DEV_BASE, {}, 4096),
    ("Euler (flow, dynamic shift, diffusers' default sigmas, mu 0.8)", "Euler (flow)", FLUX_DEV_BASE, {}, {"mu": 0.8}),
]


def row_schedule(config: dict, steps: int, row: tuple) -> dict:
    """set_timesteps arguments of a TABLE_ROWS row: none, FluxPipeline's for a token count, or given ones."""
    if len(row) < 5:
        return {}
    return dict(row[4]) if isinstance(row[4], dict) else flux_schedule(config, steps, row[4])


def overhead_us(config: dict, steps: int, shape=(1, 4, 64, 64), repeats: int = 3, **set_timesteps) -> tuple[float, int]:
    """Per-model-evaluation sampler overhead in µs: runtime of sample() with a free model, / evaluations."""
    zeros_model = lambda x, t: np.zeros_like(x)  # noqa: E731
    evaluations = _count_evaluations(config, steps, **set_timesteps)
    latents = np.random.default_rng(0).standard_normal(shape)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        sample(zeros_model, latents, config, steps, noise=NoiseSequence(0), **set_timesteps)
        best = min(best, time.perf_counter() - start)
    return best / evaluations * 1e6, evaluations


def _count_evaluations(config, steps, **set_timesteps):
    count = [0]

    def counting_model(x, t):
        count[0] += 1
        return np.zeros_like(x)

    sample(counting_model, np.zeros((1, 1, 1, 1)), config, steps, noise=NoiseSequence(0), **set_timesteps)
    return count[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "docs" / "sampler_parity.md"))
    args = parser.parse_args(argv)
    import diffusers
    import torch

    rows = []
    for row in TABLE_ROWS:
        label, name, base, extra = row[:4]
        config = dict(resolve_scheduler(name, base), **extra)
        steps = 4 if name == "LCM" else args.steps
        schedule = row_schedule(config, steps, row)
        error = compare(config, steps, **schedule)
        us, evaluations = overhead_us(config, steps, **schedule)
        rows.append((label, config["_class_name"], steps, evaluations, error, us))
        print(f"{label:45s} {steps:3d} steps {evaluations:3d} evals  max rel err {error:.2e}  {us:8.0f} µs/eval")
    lines = [
        "# Sampler parity with diffusers",
        "",
        f"Command: `python -m ldm_export.parity.samplers --steps {args.steps}`  ",
        f"Machine: a 2-core CPU ({platform.machine()}, Python {platform.python_version()}, numpy {np.__version__}, "
        f"torch {torch.__version__}, diffusers {diffusers.__version__}).",
        "",
        "Each row runs `ldm_export.runtime.sample()` and diffusers' own scheduler loop (`set_timesteps`, "
        "`scale_model_input`, `step`) on the same deterministic nonlinear stand-in model, 1×4×8×8 float64 latents "
        "and the same noise draws (diffusers' `randn_tensor` patched to draw from the same sequence). The base "
        "config is Stable Diffusion 1.5's (scaled_linear betas, leading spacing, steps_offset 1); sampler names "
        "resolve through `resolve_scheduler`. Error is max |ours − diffusers| / max |diffusers|. "
        "DPM++ 2S a has no diffusers class: it is compared with a direct torch transcription of k-diffusion's "
        "`sample_dpmpp_2s_ancestral` (see `kdiffusion_2s_ancestral_reference`). The FLUX rows use FLUX.1's "
        "scheduler configs and pass what `FluxPipeline` hands to `set_timesteps` (its sigmas linspace(1, 1/n, n) and "
        "mu from the packed token count through `calculate_shift` over the config's base/max values) to both sides.",
        "",
        "Residual errors of 1e-7 to 1e-6 come from diffusers' float32 arithmetic: its tables (betas, "
        "alphas_cumprod, sigmas) and scalar coefficients are float32 tensors and several `step()`s cast the sample "
        "to float32; the runtime uses the same float32 tables but float64 step arithmetic.",
        "",
        "Overhead: wall time of `sample()` with a model that returns zeros at once, per model evaluation, "
        "1×4×64×64 float64 latents, best of 3. Stochastic samplers' figures include drawing their noise "
        "(numpy `standard_normal`, about 150 µs per 1×4×64×64 draw); LMS's include its exact coefficient "
        "integration.",
        "",
        "| sampler | diffusers class | steps | model evals | max rel. error | overhead µs/eval |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for label, class_name, steps, evaluations, error, us in rows:
        lines.append(f"| {label} | {class_name} | {steps} | {evaluations} | {error:.1e} | {us:.0f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
