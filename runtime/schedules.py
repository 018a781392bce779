"""Noise schedules as pure numpy functions, reproducing diffusers 0.35.2's arithmetic (numpy only).

diffusers keeps its tables (`betas`, `alphas_cumprod`, `sigmas`) as float32 tensors; these functions round
to float32 at the same places so that timesteps and sigmas agree with diffusers', and return float32 arrays
where diffusers holds float32. Step arithmetic elsewhere is float64 on these values.
"""
from __future__ import annotations

import math

import numpy as np

from .errors import LdmExportError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")


def betas_for_alpha_bar(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Cosine ("squaredcos_cap_v2") betas of Nichol & Dhariwal (2021), eq. 17, as diffusers' betas_for_alpha_bar."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), max_beta)
             for i in range(num_train_timesteps)]
    return np.asarray(betas, dtype=np.float32)


def make_betas(num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
               beta_schedule: str = "linear", trained_betas=None) -> np.ndarray:
    """Training betas (T,) float32 for a diffusers beta_schedule, or the given trained_betas."""
    if trained_betas is not None:
        return np.asarray(trained_betas, dtype=np.float32)
    # diffusers uses torch.linspace(float32); float64 linspace rounded to float32 differs from it by at most
    # one float32 ulp on some entries (torch's vectorised kernel rounds differently): ~1e-7 relative.
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, num_train_timesteps).astype(np.float32)
    if beta_schedule == "scaled_linear":
        root = np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps).astype(np.float32)
        return root * root
    if beta_schedule == "squaredcos_cap_v2":
        return betas_for_alpha_bar(num_train_timesteps)
    raise LdmExportError(f"beta_schedule {beta_schedule!r} is not supported; use one of {', '.join(BETA_SCHEDULES)} "
                         f"or give trained_betas")


def rescale_betas_zero_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale betas to zero terminal SNR, Algorithm 1 of Lin et al. (2023) "Common Diffusion Noise Schedules..."."""
    alphas_bar_sqrt = np.sqrt(make_alphas_cumprod(betas))
    first, last = alphas_bar_sqrt[0].copy(), alphas_bar_sqrt[-1].copy()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt ** 2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (1 - alphas).astype(np.float32)


def make_alphas_cumprod(betas: np.ndarray) -> np.ndarray:
    """alphas_cumprod (T,) float32 as torch.cumprod gives it: float32 factors, float64 accumulator, float32 out."""
    return np.cumprod((1.0 - betas).astype(np.float32).astype(np.float64)).astype(np.float32)


def alphas_cumprod_from_config(config: dict, zero_snr_clamp: bool = False) -> np.ndarray:
    """Betas → (optionally zero-SNR rescaled) alphas_cumprod (T,) float32 for a scheduler config."""
    betas = make_betas(config["num_train_timesteps"], config["beta_start"], config["beta_end"],
                       config["beta_schedule"], config.get("trained_betas"))
    if config.get("rescale_betas_zero_snr"):
        betas = rescale_betas_zero_snr(betas)
    alphas_cumprod = make_alphas_cumprod(betas)
    if config.get("rescale_betas_zero_snr") and zero_snr_clamp:
        # diffusers' sigma-based schedulers set the last entry to 2**-24 so that sigma stays finite.
        alphas_cumprod[-1] = 2.0 ** -24
    return alphas_cumprod


def sigmas_from_alphas_cumprod(alphas_cumprod: np.ndarray) -> np.ndarray:
    """k-diffusion sigmas sqrt((1 - a) / a), (T,) float32 like diffusers' table."""
    return np.sqrt((1 - alphas_cumprod) / alphas_cumprod).astype(np.float32)


def spaced_timesteps(spacing: str, num_train_timesteps: int, num_inference_steps: int, steps_offset: int = 0,
                     *, plus_one: bool = False, last_timestep: int | None = None) -> np.ndarray:
    """Descending timesteps (n,) float64, unrounded for linspace, for diffusers' timestep_spacing.

    plus_one: the DPM-Solver/UniPC variant that spaces n+1 points and drops the last one.
    """
    T = num_train_timesteps
    n = num_inference_steps
    last = T if last_timestep is None else last_timestep
    if spacing == "linspace":
        if plus_one:
            return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy()
        return np.linspace(0, T - 1, n)[::-1].copy()
    if spacing == "leading":
        if plus_one:
            step_ratio = last // (n + 1)
            return (np.arange(0, n + 1) * step_ratio).round()[::-1][:-1].astype(np.float64) + steps_offset
        step_ratio = T // n
        return (np.arange(0, n) * step_ratio).round()[::-1].astype(np.float64) + steps_offset
    if spacing == "trailing":
        return np.round(np.arange(last, 0, -T / n)) - 1
    raise LdmExportError(f"timestep_spacing {spacing!r} is not supported; use one of {', '.join(TIMESTEP_SPACINGS)}")


def interp_sigmas(timesteps: np.ndarray, sigmas_table: np.ndarray) -> np.ndarray:
    """Sigmas at (fractional) timesteps by linear interpolation of the training table, as diffusers does."""
    return np.interp(timesteps, np.arange(0, len(sigmas_table)), sigmas_table)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Noise levels of Karras et al. (2022), eq. 5 (float64, descending, no trailing zero)."""
    ramp = np.linspace(0, 1, n)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """Log-uniform noise levels (k-diffusion get_sigmas_exponential), float64, descending."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def sigma_to_t(sigma, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of sigma by linear interpolation in log-sigma, as diffusers' _sigma_to_t."""
    sigma = np.asarray(sigma)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    t = (1 - w) * low_idx + w * high_idx
    return t.reshape(sigma.shape)


def final_sigma(final_sigmas_type: str, alphas_cumprod: np.ndarray) -> float:
    """The sigma appended after the last step: 0 ("zero") or the training schedule's smallest ("sigma_min")."""
    if final_sigmas_type == "zero":
        return 0.0
    if final_sigmas_type == "sigma_min":
        return float(np.float32(np.sqrt((1 - alphas_cumprod[0]) / alphas_cumprod[0], dtype=np.float32)))
    raise LdmExportError(f"final_sigmas_type {final_sigmas_type!r} is not supported; use 'zero' or 'sigma_min'")


def shift_flow_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """Resolution shift of flow-matching sigmas, Esser et al. (2024) SD3 paper, eq. 23."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_match_sigmas(num_inference_steps: int, num_train_timesteps: int = 1000, shift: float = 1.0,
                      shift_terminal: float | None = None) -> np.ndarray:
    """Sigmas (n,) of diffusers' FlowMatchEulerDiscreteScheduler.set_timesteps (no trailing zero), float64.

    diffusers 0.35.2 quirk, copied: the training sigmas are shifted once in __init__, the inference range
    is taken between the shifted ends and the shift is applied a second time.
    """
    train = np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1] / np.float32(
        num_train_timesteps)
    train = shift_flow_sigmas(train, np.float32(shift)).astype(np.float32)
    sigma_max, sigma_min = float(train[0]), float(train[-1])
    timesteps = np.linspace(sigma_max * num_train_timesteps, sigma_min * num_train_timesteps, num_inference_steps)
    sigmas = shift_flow_sigmas(timesteps / num_train_timesteps, shift)
    if shift_terminal:
        one_minus_z = 1 - sigmas
        sigmas = 1 - one_minus_z / (one_minus_z[-1] / (1 - shift_terminal))
    return sigmas


def calculate_shift(image_seq_len: int, base_image_seq_len: int = 256, max_image_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """mu of FLUX's resolution-dependent shift: linear in the packed token count (diffusers ``calculate_shift``);
    the values come from the scheduler config, never from constants pasted here."""
    m = (max_shift - base_shift) / (max_image_seq_len - base_image_seq_len)
    return image_seq_len * m + (base_shift - m * base_image_seq_len)


def time_shift(mu: float, sigmas: np.ndarray, time_shift_type: str = "exponential") -> np.ndarray:
    """Dynamic shift of flow sigmas by mu (diffusers ``FlowMatchEulerDiscreteScheduler.time_shift``, exponent 1):
    the exponential type equals the static shift with shift = exp(mu)."""
    if time_shift_type == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
    if time_shift_type == "linear":
        return mu / (mu + (1 / sigmas - 1))
    raise LdmExportError(f"time_shift_type {time_shift_type!r} is not supported; use 'exponential' or 'linear'")


def flow_match_sigmas_shifted(num_inference_steps: int, num_train_timesteps: int = 1000, shift: float = 1.0,
                              shift_terminal: float | None = None, use_dynamic_shifting: bool = False,
                              mu: float | None = None, time_shift_type: str = "exponential",
                              sigmas: np.ndarray | None = None) -> np.ndarray:
    """Sigmas (n,) of diffusers' FlowMatchEulerDiscreteScheduler.set_timesteps(n, sigmas=..., mu=...).

    Static shift: as :func:`flow_match_sigmas`. Dynamic shift (FLUX-dev): the training sigmas are left unshifted
    and the inference sigmas are shifted once by ``mu``. ``sigmas``: a pipeline's own unshifted schedule
    (FluxPipeline passes linspace(1, 1/n, n)), taken as float32 as diffusers does."""
    if use_dynamic_shifting and mu is None:
        raise LdmExportError("this flow-matching scheduler shifts by resolution (use_dynamic_shifting): it needs mu, "
                             "which the model family computes from the image size")
    if sigmas is None:
        if not use_dynamic_shifting:
            return flow_match_sigmas(num_inference_steps, num_train_timesteps, shift, shift_terminal)
        train = np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1] / np.float32(
            num_train_timesteps)
        sigma_max, sigma_min = float(train[0]), float(train[-1])
        out = np.linspace(sigma_max * num_train_timesteps, sigma_min * num_train_timesteps,
                          num_inference_steps) / num_train_timesteps
    else:
        out = np.asarray(sigmas, dtype=np.float32)
    out = time_shift(mu, out, time_shift_type) if use_dynamic_shifting else shift_flow_sigmas(out, shift)
    if shift_terminal:
        one_minus_z = 1 - out
        out = 1 - one_minus_z / (one_minus_z[-1] / (1 - shift_terminal))
    return out
