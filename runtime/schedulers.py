"""Maps diffusers' scheduler_config.json (`_class_name` + keys) onto the samplers, with numerics equal to diffusers.

Public: ``sample(model, latents, scheduler_config, num_inference_steps, noise=None, callback=None)``,
``resolve_scheduler(name, base_config)``, ``sampler_names()``, ``build_plan(scheduler_config, steps)``.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import samplers as S
from . import schedules as sch
from .errors import LdmExportError

logger = logging.getLogger(__name__)

_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
          "trained_betas": None}
_THRESH = {"thresholding": False, "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0}
_SHIFTING = {"use_dynamic_shifting": False, "time_shift_type": "exponential"}
_SIGMA_KINDS = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}
_K_BETAS = dict(_BETAS, beta_start=0.00085, beta_end=0.012)

# diffusers 0.35.2 __init__ defaults of each supported class (numerics-relevant or not).
DEFAULTS: dict[str, dict] = {
    "DDIMScheduler": dict(_BETAS, **_THRESH, clip_sample=True, set_alpha_to_one=True, steps_offset=0,
                          prediction_type="epsilon", clip_sample_range=1.0, timestep_spacing="leading",
                          rescale_betas_zero_snr=False),
    "DDPMScheduler": dict(_BETAS, **_THRESH, variance_type="fixed_small", clip_sample=True, prediction_type="epsilon",
                          clip_sample_range=1.0, timestep_spacing="leading", steps_offset=0,
                          rescale_betas_zero_snr=False),
    "PNDMScheduler": dict(_BETAS, skip_prk_steps=False, set_alpha_to_one=False, prediction_type="epsilon",
                          timestep_spacing="leading", steps_offset=0),
    "LMSDiscreteScheduler": dict(_BETAS, **_SIGMA_KINDS, prediction_type="epsilon", timestep_spacing="linspace",
                                 steps_offset=0),
    "EulerDiscreteScheduler": dict(_BETAS, **_SIGMA_KINDS, prediction_type="epsilon", interpolation_type="linear",
                                   sigma_min=None, sigma_max=None, timestep_spacing="linspace",
                                   timestep_type="discrete", steps_offset=0, rescale_betas_zero_snr=False,
                                   final_sigmas_type="zero"),
    "EulerAncestralDiscreteScheduler": dict(_BETAS, prediction_type="epsilon", timestep_spacing="linspace",
                                            steps_offset=0, rescale_betas_zero_snr=False),
    "HeunDiscreteScheduler": dict(_K_BETAS, **_SIGMA_KINDS, prediction_type="epsilon", clip_sample=False,
                                  clip_sample_range=1.0, timestep_spacing="linspace", steps_offset=0),
    "KDPM2DiscreteScheduler": dict(_K_BETAS, **_SIGMA_KINDS, prediction_type="epsilon", timestep_spacing="linspace",
                                   steps_offset=0),
    "KDPM2AncestralDiscreteScheduler": dict(_K_BETAS, **_SIGMA_KINDS, prediction_type="epsilon",
                                            timestep_spacing="linspace", steps_offset=0),
    "DPMSolverMultistepScheduler": dict(_BETAS, **_THRESH, **_SIGMA_KINDS, **_SHIFTING, solver_order=2,
                                        prediction_type="epsilon", algorithm_type="dpmsolver++",
                                        solver_type="midpoint", lower_order_final=True, euler_at_final=False,
                                        use_lu_lambdas=False, use_flow_sigmas=False, flow_shift=1.0,
                                        final_sigmas_type="zero", lambda_min_clipped=-math.inf, variance_type=None,
                                        timestep_spacing="linspace", steps_offset=0, rescale_betas_zero_snr=False),
    "DPMSolverSinglestepScheduler": dict(_BETAS, **_THRESH, **_SIGMA_KINDS, **_SHIFTING, solver_order=2,
                                         prediction_type="epsilon", algorithm_type="dpmsolver++",
                                         solver_type="midpoint", lower_order_final=False, use_flow_sigmas=False,
                                         flow_shift=1.0, final_sigmas_type="zero", lambda_min_clipped=-math.inf,
                                         variance_type=None),
    "UniPCMultistepScheduler": dict(_BETAS, **_THRESH, **_SIGMA_KINDS, **_SHIFTING, solver_order=2,
                                    prediction_type="epsilon", predict_x0=True, solver_type="bh2",
                                    lower_order_final=True, disable_corrector=[], solver_p=None,
                                    use_flow_sigmas=False, flow_shift=1.0, timestep_spacing="linspace",
                                    steps_offset=0, final_sigmas_type="zero", rescale_betas_zero_snr=False),
    "LCMScheduler": dict(_K_BETAS, **_THRESH, beta_schedule="scaled_linear", original_inference_steps=50,
                         clip_sample=False, clip_sample_range=1.0, set_alpha_to_one=True, steps_offset=0,
                         prediction_type="epsilon", timestep_spacing="leading", timestep_scaling=10.0,
                         rescale_betas_zero_snr=False),
    "FlowMatchEulerDiscreteScheduler": dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False,
                                            base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                            max_image_seq_len=4096, invert_sigmas=False, shift_terminal=None,
                                            use_karras_sigmas=False, use_exponential_sigmas=False,
                                            use_beta_sigmas=False, time_shift_type="exponential",
                                            stochastic_sampling=False),
}
# k-diffusion's sample_dpmpp_2s_ancestral has no diffusers class; this ldm-export class name selects it. Its
# schedule is EulerAncestralDiscreteScheduler's (plus Karras/exponential sigmas).
DPMPP_2S_ANCESTRAL = "DPMSolverPP2SAncestralScheduler"
DEFAULTS[DPMPP_2S_ANCESTRAL] = dict(_BETAS, **_SIGMA_KINDS, prediction_type="epsilon", timestep_spacing="linspace",
                                    steps_offset=0, rescale_betas_zero_snr=False)

# Keys that never change numerics (metadata).
_METADATA_KEYS = {"_class_name", "_diffusers_version", "_use_default_values", "_name_or_path"}
_ALL_KNOWN_KEYS = set().union(*DEFAULTS.values()) | {"clip_sample", "set_alpha_to_one", "skip_prk_steps"}


@dataclass
class Plan:
    """Everything one run needs: the sampler, its schedule and the latents' conversion in and out."""

    class_name: str
    sampler: Callable
    levels: np.ndarray  # sigmas (n+1,) for sigma samplers, alphas_cumprod (n+1,) for alpha samplers
    timesteps: np.ndarray  # (n_evals,) model timesteps, float64 of diffusers' values
    denoiser_kwargs: dict
    init_noise_sigma: float = 1.0
    vp_io: bool = False  # diffusers' latents are variance-preserving but the sampler works in sigma space
    flow: bool = False
    options: dict = field(default_factory=dict)


def _refuse(class_name: str, key: str, value, what_to_do: str):
    raise LdmExportError(f"{class_name}: scheduler_config {key}={value!r} is not supported by the numpy runtime; "
                         f"{what_to_do}")


def _merged_config(config: dict) -> tuple[str, dict]:
    class_name = config.get("_class_name")
    if class_name not in DEFAULTS:
        raise LdmExportError(f"scheduler_config _class_name {class_name!r} is not supported; use one of "
                             f"{', '.join(sorted(DEFAULTS))} (or resolve a sampler name with resolve_scheduler)")
    defaults = DEFAULTS[class_name]
    merged = dict(defaults)
    for key, value in config.items():
        if key in _METADATA_KEYS:
            continue
        if key in defaults:
            merged[key] = value
        elif key in _ALL_KNOWN_KEYS:
            # diffusers' from_config ignores keys another class uses; so do we (numerics unchanged).
            logger.debug("%s ignores scheduler_config key %r (as diffusers does)", class_name, key)
        else:
            raise LdmExportError(f"{class_name}: unknown scheduler_config key {key!r}; remove it, or check its "
                                 f"spelling against diffusers' {class_name}")
    _check_supported(class_name, merged)
    return class_name, merged


def _check_supported(class_name: str, c: dict) -> None:
    if c.get("thresholding"):
        _refuse(class_name, "thresholding", True, "set thresholding to false (dynamic thresholding is for "
                                                  "pixel-space models)")
    if c.get("use_beta_sigmas"):
        _refuse(class_name, "use_beta_sigmas", True, "use use_karras_sigmas or use_exponential_sigmas instead")
    for key in ("use_dynamic_shifting", "use_lu_lambdas", "use_flow_sigmas", "invert_sigmas", "stochastic_sampling"):
        if key == "use_dynamic_shifting" and class_name == "FlowMatchEulerDiscreteScheduler":
            continue  # resolved per request from mu (build_plan)
        if c.get(key):
            _refuse(class_name, key, True, f"set {key} to false")
    if c.get("use_karras_sigmas") and c.get("use_exponential_sigmas"):
        _refuse(class_name, "use_exponential_sigmas", True, "use only one of use_karras_sigmas and "
                                                            "use_exponential_sigmas")
    if c.get("interpolation_type", "linear") != "linear":
        _refuse(class_name, "interpolation_type", c["interpolation_type"], "use 'linear'")
    if c.get("variance_type") not in (None, "fixed_small", "fixed_small_log", "fixed_large"):
        _refuse(class_name, "variance_type", c["variance_type"], "use fixed_small (learned variances need a "
                                                                  "UNet with twice the output channels)")
    if class_name != "DDPMScheduler" and c.get("variance_type") is not None:
        _refuse(class_name, "variance_type", c["variance_type"], "leave it null")
    if c.get("solver_p") is not None:
        _refuse(class_name, "solver_p", c["solver_p"], "leave it null")
    if class_name == "PNDMScheduler" and not c["skip_prk_steps"]:
        _refuse(class_name, "skip_prk_steps", False, "set skip_prk_steps true (PLMS, as Stable Diffusion's configs "
                                                     "do); the Runge-Kutta warm-up of PNDM is not implemented")
    if c.get("prediction_type") == "sample" and class_name in (
            "PNDMScheduler", "EulerAncestralDiscreteScheduler", "KDPM2DiscreteScheduler",
            "KDPM2AncestralDiscreteScheduler"):
        _refuse(class_name, "prediction_type", "sample", "diffusers does not support it for this class either; "
                                                         "use Euler, Heun, LMS, DDIM or DPM++")
    if class_name == "DPMSolverMultistepScheduler":
        if c["algorithm_type"] not in ("dpmsolver++", "sde-dpmsolver++", "deis"):
            _refuse(class_name, "algorithm_type", c["algorithm_type"], "use 'dpmsolver++' or 'sde-dpmsolver++'")
        if c["solver_order"] not in (1, 2, 3):
            _refuse(class_name, "solver_order", c["solver_order"], "use 1, 2 or 3")
    if class_name == "DPMSolverSinglestepScheduler":
        if c["algorithm_type"] not in ("dpmsolver++", "sde-dpmsolver++", "deis"):
            _refuse(class_name, "algorithm_type", c["algorithm_type"], "use 'dpmsolver++' or 'sde-dpmsolver++'")
        if c["solver_order"] not in (1, 2):
            _refuse(class_name, "solver_order", c["solver_order"], "use 1 or 2 (order 3 singlestep is not "
                                                                   "implemented)")
    if class_name == "UniPCMultistepScheduler" and int(c["solver_order"]) < 1:
        _refuse(class_name, "solver_order", c["solver_order"], "use 1, 2 or 3")


# ---------------------------------------------------------------- schedules per class family


def _sigma_table(c: dict, zero_snr_clamp: bool):
    alphas_cumprod = sch.alphas_cumprod_from_config(c, zero_snr_clamp=zero_snr_clamp)
    table = sch.sigmas_from_alphas_cumprod(alphas_cumprod)  # (T,) float32
    return alphas_cumprod, table, np.log(table)


def _k_schedule(class_name: str, c: dict, n: int):
    """Sigmas/timesteps of the k-diffusion-style discrete classes (Euler, Euler a, Heun, DPM2, DPM2 a, LMS)."""
    clamp = class_name in ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", DPMPP_2S_ANCESTRAL)
    alphas_cumprod, table, log_sigmas = _sigma_table(c, clamp)
    timesteps = sch.spaced_timesteps(c["timestep_spacing"], c["num_train_timesteps"], n, c["steps_offset"])
    timesteps = timesteps.astype(np.float32)
    sigmas = sch.interp_sigmas(timesteps, table)
    # DPM2 and DPM2 a round the Karras timesteps (diffusers quirk, copied).
    round_karras = class_name in ("KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler")
    if c.get("use_karras_sigmas") or c.get("use_exponential_sigmas"):
        sigma_min = c.get("sigma_min") if c.get("sigma_min") is not None else float(sigmas[-1])
        sigma_max = c.get("sigma_max") if c.get("sigma_max") is not None else float(sigmas[0])
        if c.get("use_karras_sigmas"):
            sigmas = sch.karras_sigmas(sigma_min, sigma_max, n)
        else:
            sigmas = sch.exponential_sigmas(sigma_min, sigma_max, n)
        timesteps = sch.sigma_to_t(sigmas, log_sigmas)
        if round_karras and c.get("use_karras_sigmas"):
            timesteps = timesteps.round()
    last = sch.final_sigma(c.get("final_sigmas_type", "zero"), alphas_cumprod)
    sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
    timesteps = np.asarray(timesteps, dtype=np.float32)
    if c.get("timestep_type") == "continuous" and c["prediction_type"] == "v_prediction":
        timesteps = (0.25 * np.log(sigmas[:-1])).astype(np.float32)
    sigma_max = float(sigmas.max())
    init = sigma_max if c["timestep_spacing"] in ("linspace", "trailing") else math.sqrt(
        float(np.float32(sigma_max) ** 2 + 1))
    return sigmas.astype(np.float64), timesteps.astype(np.float64), log_sigmas, init


def _solver_schedule(class_name: str, c: dict, n: int):
    """Sigmas/timesteps of DPMSolverMultistep, DPMSolverSinglestep and UniPCMultistep (diffusers 0.35.2)."""
    alphas_cumprod, table, log_sigmas = _sigma_table(c, class_name != "DPMSolverSinglestepScheduler")
    T = c["num_train_timesteps"]
    if class_name == "UniPCMultistepScheduler":
        last_timestep = T
    else:
        alpha_t = np.sqrt(alphas_cumprod)
        lambda_t = np.log(alpha_t) - np.log(np.sqrt(1 - alphas_cumprod))
        last_timestep = T - int(np.searchsorted(lambda_t[::-1], c["lambda_min_clipped"]))
    spacing = c.get("timestep_spacing", "linspace")
    timesteps = sch.spaced_timesteps(spacing, T, n, c.get("steps_offset", 0), plus_one=True,
                                     last_timestep=last_timestep)
    if c.get("use_karras_sigmas") or c.get("use_exponential_sigmas"):
        in_sigmas = table[::-1]
        if c.get("use_karras_sigmas"):
            sigmas = sch.karras_sigmas(float(in_sigmas[-1]), float(in_sigmas[0]), n)
        else:
            sigmas = sch.exponential_sigmas(float(in_sigmas[-1]), float(in_sigmas[0]), n)
        timesteps = sch.sigma_to_t(sigmas, log_sigmas)
        if c.get("use_karras_sigmas") and (class_name != "DPMSolverMultistepScheduler"
                                           or c["beta_schedule"] != "squaredcos_cap_v2"):
            timesteps = timesteps.round()
        if class_name == "UniPCMultistepScheduler" and c["final_sigmas_type"] == "sigma_min":
            last = float(sigmas[-1])  # UniPC appends the last Karras sigma here (diffusers quirk, copied)
        else:
            last = sch.final_sigma(c["final_sigmas_type"], alphas_cumprod)
    else:
        sigmas = sch.interp_sigmas(timesteps, table)
        last = sch.final_sigma(c["final_sigmas_type"], alphas_cumprod)
    sigmas = np.concatenate([sigmas, [last]]).astype(np.float32).astype(np.float64)
    timesteps = np.asarray(timesteps).astype(np.int64).astype(np.float64)
    return sigmas, timesteps, log_sigmas


def _alpha_at(alphas_cumprod: np.ndarray, t: int, final_alpha_cumprod: float) -> float:
    return float(alphas_cumprod[t]) if t >= 0 else final_alpha_cumprod


def _alpha_plan(class_name: str, c: dict, n: int) -> Plan:
    alphas_cumprod = sch.alphas_cumprod_from_config(c)
    T = c["num_train_timesteps"]
    final = 1.0 if c.get("set_alpha_to_one", True) else float(alphas_cumprod[0])
    clip = c["clip_sample_range"] if c.get("clip_sample") else None
    denoiser_kwargs = dict(prediction_type=c["prediction_type"], clip_sample_range=clip)
    if n > T:
        raise LdmExportError(f"num_inference_steps {n} exceeds num_train_timesteps {T}; use fewer steps")
    if class_name == "LCMScheduler":
        original_steps = c["original_inference_steps"]
        k = T // original_steps
        origin = (np.arange(1, original_steps + 1) * k - 1)[::-1]
        if len(origin) // n < 1:
            raise LdmExportError(f"LCMScheduler: {n} steps exceed original_inference_steps {original_steps}; use "
                                 f"at most {original_steps} steps")
        timesteps = origin[np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)]
        levels = np.array([alphas_cumprod[t] for t in timesteps] + [1.0], dtype=np.float64)
        return Plan(class_name, S.sample_lcm, levels, timesteps.astype(np.float64), denoiser_kwargs,
                    options=dict(timestep_scaling=c["timestep_scaling"]))
    spacing = c["timestep_spacing"]
    timesteps = sch.spaced_timesteps(spacing, T, n, c.get("steps_offset", 0))
    timesteps = (timesteps.round() if spacing == "linspace" else timesteps).astype(np.int64)
    r = T // n  # diffusers' previous timestep is `t - T // n` for DDIM and PNDM (a quirk for linspace/trailing)
    if class_name == "DDIMScheduler":
        prev = [_alpha_at(alphas_cumprod, int(t) - r, final) for t in timesteps]
        levels = np.array([alphas_cumprod[t] for t in timesteps] + [prev[-1]], dtype=np.float64)
        return Plan(class_name, S.sample_ddim, levels, timesteps.astype(np.float64), denoiser_kwargs,
                    options=dict(alphas_cumprod_prev=np.array(prev)))
    if class_name == "DDPMScheduler":
        levels = np.array([alphas_cumprod[t] for t in timesteps] + [1.0], dtype=np.float64)
        return Plan(class_name, S.sample_ddpm, levels, timesteps.astype(np.float64), denoiser_kwargs,
                    options=dict(variance_type=c["variance_type"]))
    # PNDMScheduler with skip_prk_steps: PLMS over n + 1 evaluations (step 0's timestep is evaluated twice).
    ascending = timesteps[::-1]
    plms = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1].astype(np.int64)
    a_from = [_alpha_at(alphas_cumprod, int(t) + (r if k == 1 else 0), final) for k, t in enumerate(plms)]
    a_to = [_alpha_at(alphas_cumprod, int(t) - (0 if k == 1 else r), final) for k, t in enumerate(plms)]
    levels = np.array([alphas_cumprod[t] for t in plms] + [a_to[-1]], dtype=np.float64)
    return Plan(class_name, S.sample_plms, levels, plms.astype(np.float64),
                dict(prediction_type=c["prediction_type"]),
                options=dict(alphas_cumprod_from=np.array(a_from), alphas_cumprod_prev=np.array(a_to)))


_K_SAMPLERS = {
    "EulerDiscreteScheduler": S.sample_euler,
    "EulerAncestralDiscreteScheduler": S.sample_euler_ancestral,
    "HeunDiscreteScheduler": S.sample_heun,
    "KDPM2DiscreteScheduler": S.sample_dpm_2,
    "KDPM2AncestralDiscreteScheduler": S.sample_dpm_2_ancestral,
    "LMSDiscreteScheduler": S.sample_lms,
    DPMPP_2S_ANCESTRAL: S.sample_dpmpp_2s_ancestral,
}


def build_plan(scheduler_config: dict, num_inference_steps: int, mu: float | None = None,
               sigmas: np.ndarray | None = None) -> Plan:
    """Resolve a diffusers scheduler_config into the sampler, its schedule and options.

    ``mu`` (flow matching with use_dynamic_shifting) and ``sigmas`` (a pipeline's own unshifted flow schedule, as
    FluxPipeline passes) are what diffusers' pipelines hand to ``set_timesteps``; the model family supplies them."""
    if int(num_inference_steps) < 1:
        raise LdmExportError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
    n = int(num_inference_steps)
    class_name, c = _merged_config(scheduler_config)
    if sigmas is not None and class_name != "FlowMatchEulerDiscreteScheduler":
        raise LdmExportError(f"{class_name}: a custom sigma schedule is supported for flow matching only")
    if class_name in ("DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LCMScheduler"):
        return _alpha_plan(class_name, c, n)
    if class_name in _K_SAMPLERS:
        sigmas, timesteps, log_sigmas, init = _k_schedule(class_name, c, n)
        clip = c["clip_sample_range"] if c.get("clip_sample") else None
        return Plan(class_name, _K_SAMPLERS[class_name], sigmas, timesteps,
                    dict(prediction_type=c["prediction_type"], clip_sample_range=clip, log_sigmas=log_sigmas),
                    init_noise_sigma=init)
    if class_name == "FlowMatchEulerDiscreteScheduler":
        T = c["num_train_timesteps"]
        sigmas = sch.flow_match_sigmas_shifted(n, T, c["shift"], c["shift_terminal"], c["use_dynamic_shifting"], mu,
                                               c["time_shift_type"], sigmas)
        if c["use_karras_sigmas"]:
            sigmas = sch.karras_sigmas(float(sigmas[-1]), float(sigmas[0]), n)
        elif c["use_exponential_sigmas"]:
            sigmas = sch.exponential_sigmas(float(sigmas[-1]), float(sigmas[0]), n)
        sigmas = sigmas.astype(np.float32)
        timesteps = (sigmas * np.float32(T)).astype(np.float32)
        sigmas = np.concatenate([sigmas, np.zeros(1, np.float32)])
        return Plan(class_name, S.sample_euler, sigmas.astype(np.float64), timesteps.astype(np.float64),
                    dict(num_train_timesteps=T), flow=True)
    sigmas, timesteps, log_sigmas = _solver_schedule(class_name, c, n)
    kwargs = dict(prediction_type=c["prediction_type"], log_sigmas=log_sigmas)
    if class_name == "UniPCMultistepScheduler":
        solver_type = c["solver_type"] if c["solver_type"] in ("bh1", "bh2") else "bh2"  # diffusers remaps others
        options = dict(solver_order=int(c["solver_order"]), solver_type=solver_type, predict_x0=c["predict_x0"],
                       lower_order_final=c["lower_order_final"], disable_corrector=tuple(c["disable_corrector"]))
        return Plan(class_name, S.sample_unipc, sigmas, timesteps, kwargs, vp_io=True, options=options)
    solver_type = c["solver_type"] if c["solver_type"] in ("midpoint", "heun") else "midpoint"
    options = dict(solver_order=int(c["solver_order"]), sde=c["algorithm_type"] == "sde-dpmsolver++",
                   solver_type=solver_type, lower_order_final=c["lower_order_final"])
    if class_name == "DPMSolverMultistepScheduler":
        options["euler_at_final"] = c["euler_at_final"]
        return Plan(class_name, S.sample_dpmpp_2m, sigmas, timesteps, kwargs, vp_io=True, options=options)
    return Plan(class_name, S.sample_dpmpp_2s, sigmas, timesteps, kwargs, vp_io=True, options=options)


def sample(model, latents, scheduler_config: dict, num_inference_steps: int, noise=None, callback=None,
           mu: float | None = None, sigmas: np.ndarray | None = None):
    """Run the sampler that scheduler_config selects; returns the final latents as diffusers' pipeline has them.

    model(x_in, t) returns the UNet output (eps / v / x0 / velocity) for the scaled input at timestep t;
    latents are standard-normal (init_noise_sigma is applied here); noise(shape) gives each stochastic draw.
    """
    plan = build_plan(scheduler_config, num_inference_steps, mu=mu, sigmas=sigmas)
    latents = np.asarray(latents)
    out_dtype = latents.dtype if np.issubdtype(latents.dtype, np.floating) else np.float64
    x = latents.astype(np.float64) * plan.init_noise_sigma  # (B, C, H, W)
    noise = noise if noise is not None else S.default_noise(0)
    if plan.flow:
        denoiser = S.FlowDenoiser(model, **plan.denoiser_kwargs)
    else:
        denoiser = S.Denoiser(model, **plan.denoiser_kwargs)
    step_callback = callback
    if plan.vp_io:
        sigmas = plan.levels
        x = x * math.sqrt(1.0 + sigmas[0] ** 2)  # variance-preserving → k-diffusion scaling
        if callback is not None:
            def step_callback(i, n, x_k):
                callback(i, n, x_k / math.sqrt(1.0 + sigmas[i + 1] ** 2))
    logger.debug("sampling with %s (%s), %d model timesteps", plan.class_name, plan.sampler.__name__,
                 len(plan.timesteps))
    x = plan.sampler(denoiser, x, plan.levels, plan.timesteps, noise=noise, callback=step_callback, **plan.options)
    if plan.vp_io:
        x = x / math.sqrt(1.0 + plan.levels[-1] ** 2)
    return x.astype(out_dtype)


# ---------------------------------------------------------------- names


# A1111 sampler name → (class, config overrides)
_A1111 = {
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler Karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "Heun Karras": ("HeunDiscreteScheduler", {"use_karras_sigmas": True}),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2 Karras": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
    "DPM2 a Karras": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                        "use_karras_sigmas": True}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "DPM++ 2M SDE Karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2,
                                                            "use_karras_sigmas": True}),
    "DPM++ 2S": ("DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "DPM++ 2S Karras": ("DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                         "use_karras_sigmas": True}),
    "DPM++ 2S a": (DPMPP_2S_ANCESTRAL, {}),
    "DPM++ 2S a Karras": (DPMPP_2S_ANCESTRAL, {"use_karras_sigmas": True}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "LMS Karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "DDIM": ("DDIMScheduler", {}),
    "DDPM": ("DDPMScheduler", {}),
    "PLMS": ("PNDMScheduler", {"skip_prk_steps": True}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "LCM": ("LCMScheduler", {}),
    "Euler (flow)": ("FlowMatchEulerDiscreteScheduler", {}),
}
# A1111's "Exponential" schedule (its names since 1.6: "DPM++ 2M SDE Exponential"; 1.9's scheduler field for the
# others) for the samplers whose exponential sigmas match diffusers' (tests/test_samplers.py)
_A1111.update({f"{name} Exponential": (_A1111[name][0], {**_A1111[name][1], "use_exponential_sigmas": True})
               for name in ("Euler", "Heun", "DPM2", "DPM2 a", "DPM++ 2M", "DPM++ 2M SDE", "DPM++ 2S", "LMS")})


def a1111_name(config: dict) -> str:
    """The A1111 sampler name of a scheduler_config (for PNG metadata), or its class name when none fits."""
    cls = config.get("_class_name", "?")
    defaults = DEFAULTS.get(cls, {})
    if cls == "FlowMatchEulerDiscreteScheduler":  # A1111/Forge call flow Euler "Euler" (with its sigma schedule)
        return "Euler" + (" Karras" if config.get("use_karras_sigmas") else
                          " Exponential" if config.get("use_exponential_sigmas") else "")
    fits = [(len(over), name) for name, (c, over) in _A1111.items()
            if c == cls and all(config.get(k, defaults.get(k)) == v for k, v in over.items())
            and not (config.get("use_karras_sigmas") and "use_karras_sigmas" not in over)]
    return max(fits)[1] if fits else cls


# Keys of the bundle's config that describe the model (its training schedule and output), not the sampler.
_CARRIED_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                 "prediction_type", "timestep_spacing", "steps_offset", "rescale_betas_zero_snr", "clip_sample",
                 "clip_sample_range", "set_alpha_to_one", "original_inference_steps", "timestep_scaling", "shift",
                 "shift_terminal", "base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len",
                 "use_dynamic_shifting", "time_shift_type")


_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        logger.warning(message)


def a1111_names() -> list[str]:
    """The A1111 sampler names resolve_scheduler accepts (sampler_names without the class names)."""
    return list(_A1111)


def sampler_names() -> list[str]:
    """Every name resolve_scheduler accepts: A1111 names, then scheduler class names."""
    return a1111_names() + sorted(DEFAULTS)


# A1111's own aliases for its k-diffusion samplers (what older API clients and scripts send)
_ALIASES = {"k_euler": "Euler", "k_euler_a": "Euler a", "k_euler_ancestral": "Euler a", "k_lms": "LMS", "k_heun": "Heun",
            "k_dpm_2": "DPM2", "k_dpm_2_a": "DPM2 a", "k_dpmpp_2s_a": "DPM++ 2S a", "k_dpmpp_2m": "DPM++ 2M",
            "k_dpmpp_2m_sde": "DPM++ 2M SDE"}


def canonical_sampler(name: str) -> str:
    """The known spelling of a sampler name: case and runs of spaces do not matter ("euler a", "dpm++ 2m  karras"),
    and A1111's k-diffusion aliases (``k_euler_a``) are accepted; an unknown name comes back unchanged."""
    if name in _A1111 or name in DEFAULTS:
        return name
    key = " ".join(str(name).split()).lower()
    for known in sampler_names():
        if known.lower() == key:
            return known
    return _ALIASES.get(key, name)


def resolve_scheduler(name: str, base_config: dict) -> dict:
    """scheduler_config for an A1111 sampler name or a class name, keeping the bundle's model-describing keys."""
    name = canonical_sampler(name)
    if name in _A1111:
        class_name, overrides = _A1111[name]
    elif name in DEFAULTS:  # PNDMScheduler by class: as Stable Diffusion's configs set it (PLMS; no PRK warm-up)
        class_name, overrides = name, ({"skip_prk_steps": True} if name == "PNDMScheduler" else {})
    else:
        raise LdmExportError(f"unknown sampler {name!r}; known: {', '.join(sampler_names())}")
    base_is_flow = base_config.get("_class_name") == "FlowMatchEulerDiscreteScheduler"
    if base_is_flow != (class_name == "FlowMatchEulerDiscreteScheduler"):
        # Euler, Euler Karras and Euler Exponential are flow Euler on a flow model, with diffusers' sigma options
        if base_is_flow and class_name == "EulerDiscreteScheduler" and set(overrides) <= {"use_karras_sigmas",
                                                                                          "use_exponential_sigmas"}:
            class_name = "FlowMatchEulerDiscreteScheduler"
        else:
            kind = "a flow-matching" if base_is_flow else "a noise-prediction"
            raise LdmExportError(f"sampler {name!r} does not fit {kind} model (base scheduler "
                                 f"{base_config.get('_class_name')!r}); use "
                                 f"{'Euler' if base_is_flow else 'a sampler other than Euler (flow)'}")
    if class_name == "LCMScheduler" and base_config.get("_class_name") != "LCMScheduler":
        _warn_once("lcm", "LCM samples models distilled for it (whose scheduler is LCMScheduler); this model's is "
                          f"{base_config.get('_class_name')!r}, so expect soft images: use 4-8 steps and guidance "
                          "about 1.5, or another sampler")
    accepted = DEFAULTS[class_name]
    config = {key: base_config[key] for key in _CARRIED_KEYS if key in base_config and key in accepted}
    config.update(overrides)
    config["_class_name"] = class_name
    return config
