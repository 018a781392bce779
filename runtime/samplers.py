"""Samplers in the style of k-diffusion: pure functions over a denoiser, looping by index, history in locals.

Two families share one signature, ``sample_x(denoiser, x, levels, timesteps, *, noise=None, callback=None,
**options) -> x``:

* sigma samplers (Euler, Heun, DPM2, LMS, DPM-Solver++, UniPC, flow Euler): ``x`` lives in k-diffusion space
  (x = x0 + sigma * eps) and ``levels`` are the ``sigmas`` (n+1,), the last one the final noise level;
  ``denoiser(x, sigma, t)`` scales the input itself.
* alpha samplers (DDIM, DDPM, PLMS, LCM): ``x`` lives in variance-preserving space
  (x = sqrt(a) x0 + sqrt(1 - a) eps) and ``levels`` are ``alphas_cumprod`` (n+1,), because zero-terminal-SNR
  schedules put a = 0 (sigma = inf) on their first step; ``denoiser.vp(x, a, t)`` is used.

``timesteps`` (n,) are the model timesteps, as diffusers passes them to the UNet. ``noise(shape)`` is called
once per stochastic draw, in diffusers' order; ``callback(i, n, x)`` after each step (an array it returns
replaces x: inpainting blends the known latents in there).
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import numpy as np

from .errors import LdmExportError
from .schedules import sigma_to_t

NoiseFn = Callable[[tuple], np.ndarray]


class Prediction(NamedTuple):
    denoised: np.ndarray  # x0 estimate (clipped where the config asks), same shape as x
    eps: np.ndarray | None  # noise estimate from the unclipped x0
    raw: np.ndarray  # what the model returned


class Denoiser:
    """Wraps ``model(x_in, t)`` (eps / v / x0 by prediction_type) as a denoiser, Karras et al. (2022) App. B."""

    def __init__(self, model, prediction_type: str = "epsilon", clip_sample_range: float | None = None,
                 log_sigmas: np.ndarray | None = None):
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise LdmExportError(f"prediction_type {prediction_type!r} is not supported by this sampler; use "
                                 f"'epsilon', 'v_prediction' or 'sample'")
        self.model = model
        self.prediction_type = prediction_type
        self.clip_sample_range = clip_sample_range
        self.log_sigmas = log_sigmas

    def _clip(self, x0: np.ndarray) -> np.ndarray:
        if self.clip_sample_range is None:
            return x0
        return np.clip(x0, -self.clip_sample_range, self.clip_sample_range)

    def __call__(self, x: np.ndarray, sigma: float, t) -> Prediction:
        c_in = 1.0 / math.sqrt(sigma * sigma + 1.0)
        x_in = x * c_in
        raw = np.asarray(self.model(x_in, np.float64(t)), dtype=np.float64)
        if self.prediction_type == "epsilon":
            x0, eps = x - sigma * raw, raw
        elif self.prediction_type == "v_prediction":
            x0 = raw * (-sigma * c_in) + x / (sigma * sigma + 1.0)
            eps = c_in * (raw + sigma * x_in)
        else:
            x0, eps = raw, (x - raw) / sigma
        return Prediction(self._clip(x0), eps, raw)

    def vp(self, x: np.ndarray, alpha_prod: float, t) -> Prediction:
        raw = np.asarray(self.model(x, np.float64(t)), dtype=np.float64)
        sqrt_a, sqrt_b = math.sqrt(alpha_prod), math.sqrt(1.0 - alpha_prod)
        if self.prediction_type == "epsilon":
            x0, eps = (x - sqrt_b * raw) / sqrt_a, raw
        elif self.prediction_type == "v_prediction":
            x0, eps = sqrt_a * x - sqrt_b * raw, sqrt_a * raw + sqrt_b * x
        else:
            x0, eps = raw, (x - sqrt_a * raw) / sqrt_b
        return Prediction(self._clip(x0), eps, raw)

    def eps_vp(self, raw: np.ndarray, x: np.ndarray, alpha_prod: float) -> np.ndarray:
        """eps from a (combined) raw output, as PNDM converts after combining."""
        if self.prediction_type == "epsilon":
            return raw
        if self.prediction_type == "v_prediction":
            return math.sqrt(alpha_prod) * raw + math.sqrt(1.0 - alpha_prod) * x
        raise LdmExportError("PLMS supports prediction_type 'epsilon' or 'v_prediction' only (as diffusers' "
                             "PNDMScheduler); pick another sampler for 'sample'")

    def sigma_to_t(self, sigma: float) -> float:
        return float(sigma_to_t(np.float64(sigma), self.log_sigmas))


class FlowDenoiser:
    """Wraps a rectified-flow ``model(x, t)`` returning velocity (Lipman et al. 2023; Esser et al. 2024)."""

    def __init__(self, model, num_train_timesteps: int = 1000):
        self.model = model
        self.num_train_timesteps = num_train_timesteps

    def __call__(self, x: np.ndarray, sigma: float, t) -> Prediction:
        velocity = np.asarray(self.model(x, np.float64(t)), dtype=np.float64)
        return Prediction(x - sigma * velocity, None, velocity)

    def sigma_to_t(self, sigma: float) -> float:
        return sigma * self.num_train_timesteps


# ---------------------------------------------------------------- small shared math


def default_noise(seed: int = 0) -> NoiseFn:
    rng = np.random.default_rng(seed)
    return lambda shape: rng.standard_normal(shape)


def _notify(callback, i: int, n: int, x: np.ndarray) -> np.ndarray:
    """Call ``callback(i, n, x)`` after step i; an array it returns replaces x (inpainting's latent blend)."""
    if callback is not None:
        replaced = callback(i, n, x)
        if isinstance(replaced, np.ndarray):
            return replaced
    return x


def to_d(x: np.ndarray, sigma: float, denoised: np.ndarray) -> np.ndarray:
    """Karras ODE derivative dx/dsigma = (x - D(x)) / sigma."""
    return (x - denoised) / sigma


def ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up) splitting a step into a deterministic part and fresh noise (k-diffusion)."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * math.sqrt(sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2))
    return math.sqrt(sigma_to ** 2 - sigma_up ** 2), sigma_up


def _lambda(sigma: float) -> float:
    """Half log-SNR lambda = -log(sigma) in k-diffusion scaling; +inf at sigma 0."""
    return math.inf if sigma == 0 else -math.log(sigma)


def lms_coefficient(order: int, sigmas: np.ndarray, i: int, j: int) -> float:
    """Integral over [sigma_i, sigma_i+1] of the j-th Lagrange basis polynomial on sigmas i, i-1, ..., i-order+1.

    Exact polynomial integration; diffusers and k-diffusion use scipy.integrate.quad on the same polynomial.
    """
    roots = [sigmas[i - k] for k in range(order) if k != j]
    scale = np.prod([sigmas[i - j] - r for r in roots]) if roots else 1.0
    poly = np.polynomial.Polynomial.fromroots(roots) if roots else np.polynomial.Polynomial([1.0])
    integral = poly.integ()
    return float((integral(sigmas[i + 1]) - integral(sigmas[i])) / scale)


def _dpmpp_update(x, sigma_s, sigma_t, D0, D1=None, D2=None, *, sde=False, noise_z=None, solver_type="midpoint"):
    """One DPM-Solver++ update from sigma_s to sigma_t (Lu et al. 2022b, eqs. 14-16 and the SDE variant, App. B).

    x, D0, D1, D2 in k-diffusion space; D1, D2 are the first and second divided differences of x0 estimates.
    """
    h = _lambda(sigma_t) - _lambda(sigma_s)
    if not sde:
        phi_1 = math.expm1(-h)  # exp(-h) - 1
        x_t = (sigma_t / sigma_s) * x - phi_1 * D0
        if D1 is not None:
            if D2 is None and solver_type == "midpoint":
                x_t = x_t - 0.5 * phi_1 * D1
            else:
                x_t = x_t + (phi_1 / h + 1.0) * D1
        if D2 is not None:
            x_t = x_t - ((phi_1 + h) / h ** 2 - 0.5) * D2
        return x_t
    decay = math.exp(-h)
    one_minus = -math.expm1(-2.0 * h)  # 1 - exp(-2h)
    x_t = (sigma_t / sigma_s) * decay * x + one_minus * D0
    if D1 is not None:
        if D2 is None and solver_type == "midpoint":
            x_t = x_t + 0.5 * one_minus * D1
        else:
            x_t = x_t + (one_minus / (-2.0 * h) + 1.0) * D1
    if D2 is not None:
        x_t = x_t + ((one_minus - 2.0 * h) / (2.0 * h) ** 2 - 0.5) * D2
    return x_t + sigma_t * math.sqrt(one_minus) * noise_z


# ---------------------------------------------------------------- sigma samplers (k-diffusion space)


def sample_euler(denoiser, x, sigmas, timesteps, *, noise=None, callback=None):
    """Euler method, Algorithm 2 of Karras et al. (2022) without churn (diffusers EulerDiscreteScheduler)."""
    n = len(timesteps)
    for i in range(n):
        denoised = denoiser(x, sigmas[i], timesteps[i]).denoised
        x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
        x = _notify(callback, i, n, x)
    return x


def sample_euler_ancestral(denoiser, x, sigmas, timesteps, *, noise=None, callback=None):
    """Ancestral Euler steps (k-diffusion sample_euler_ancestral; diffusers EulerAncestralDiscreteScheduler)."""
    noise = noise or default_noise()
    n = len(timesteps)
    for i in range(n):
        denoised = denoiser(x, sigmas[i], timesteps[i]).denoised
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1])
        x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        # diffusers draws on every step, the last one too (where sigma_up is 0): keep the sequence aligned.
        x = x + noise(x.shape) * sigma_up
        x = _notify(callback, i, n, x)
    return x


def _half(half_step, i: int, x_2):
    """``half_step(i, x_2)``'s replacement for a two-evaluation step's intermediate sample (an inpainting blend, which
    diffusers' loop applies after each of its scheduler's half steps), or ``x_2``."""
    return x_2 if half_step is None else half_step(i, x_2)


def sample_heun(denoiser, x, sigmas, timesteps, *, noise=None, callback=None, euler_at_cut=False, half_step=None):
    """Heun's 2nd-order method, Algorithm 1 of Karras et al. (2022) (diffusers HeunDiscreteScheduler).
    ``euler_at_cut``: the schedule is cut before its end (a base model's ``denoising_end``), and its last step is the
    first-order half alone, as diffusers' loop, which keeps the timesteps at or above the cut, ends it (the second
    evaluation would fall below the cut; the refiner takes over from there). ``half_step``: see :func:`_half`."""
    n = len(timesteps)
    for i in range(n):
        denoised = denoiser(x, sigmas[i], timesteps[i]).denoised
        d = to_d(x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0 or (euler_at_cut and i == n - 1):
            x = x + d * dt
        else:
            x_2 = _half(half_step, i, x + d * dt)
            denoised_2 = denoiser(x_2, sigmas[i + 1], timesteps[i + 1]).denoised
            x = x + (d + to_d(x_2, sigmas[i + 1], denoised_2)) / 2 * dt
        x = _notify(callback, i, n, x)
    return x


def _geometric_mid(sigma_a: float, sigma_b: float) -> float:
    return math.exp(0.5 * (math.log(sigma_a) + math.log(sigma_b)))


def sample_dpm_2(denoiser, x, sigmas, timesteps, *, noise=None, callback=None, half_step=None):
    """DPM-Solver-2 midpoint steps in log-sigma (k-diffusion sample_dpm_2; diffusers KDPM2DiscreteScheduler).
    ``half_step``: see :func:`_half`."""
    n = len(timesteps)
    for i in range(n):
        denoised = denoiser(x, sigmas[i], timesteps[i]).denoised
        d = to_d(x, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigmas[i])
        else:
            sigma_mid = _geometric_mid(sigmas[i], sigmas[i + 1])
            x_2 = _half(half_step, i, x + d * (sigma_mid - sigmas[i]))
            denoised_2 = denoiser(x_2, sigma_mid, denoiser.sigma_to_t(sigma_mid)).denoised
            x = x + to_d(x_2, sigma_mid, denoised_2) * (sigmas[i + 1] - sigmas[i])
        x = _notify(callback, i, n, x)
    return x


def sample_dpm_2_ancestral(denoiser, x, sigmas, timesteps, *, noise=None, callback=None, half_step=None):
    """Ancestral DPM-Solver-2 (k-diffusion sample_dpm_2_ancestral; diffusers KDPM2AncestralDiscreteScheduler).
    ``half_step``: see :func:`_half`."""
    noise = noise or default_noise()
    n = len(timesteps)
    for i in range(n):
        denoised = denoiser(x, sigmas[i], timesteps[i]).denoised
        d = to_d(x, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigmas[i])
        else:
            sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1])
            sigma_mid = _geometric_mid(sigmas[i], sigma_down)
            x_2 = _half(half_step, i, x + d * (sigma_mid - sigmas[i]))
            denoised_2 = denoiser(x_2, sigma_mid, denoiser.sigma_to_t(sigma_mid)).denoised
            x = x + to_d(x_2, sigma_mid, denoised_2) * (sigma_down - sigmas[i])
            x = x + noise(x.shape) * sigma_up
        x = _notify(callback, i, n, x)
    return x


def sample_lms(denoiser, x, sigmas, timesteps, *, noise=None, callback=None, order=4, start=0):
    """Linear multistep method of order 4 over sigma (k-diffusion sample_lms; diffusers LMSDiscreteScheduler).

    ``start``: begin at step ``start`` of the schedule (image-to-image); diffusers then picks the order from the
    step's index in the whole schedule while only the derivatives since ``start`` exist (its zip truncates): copied.
    """
    n = len(timesteps)
    sigmas = np.asarray(sigmas, dtype=np.float64)
    ds = []
    for i in range(start, n):
        denoised = denoiser(x, sigmas[i], timesteps[i]).denoised
        ds = (ds + [to_d(x, sigmas[i], denoised)])[-order:]
        cur_order = min(i + 1, order)
        # diffusers integrates the last step to sigma 0 too (k-diffusion jumps to `denoised`): copied.
        coeffs = [lms_coefficient(cur_order, sigmas, i, j) for j in range(cur_order)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
        x = _notify(callback, i - start, n - start, x)
    return x


def sample_dpmpp_2m(denoiser, x, sigmas, timesteps, *, noise=None, callback=None, solver_order=2, sde=False,
                    solver_type="midpoint", lower_order_final=True, euler_at_final=False):
    """DPM-Solver++(2M) / (3M), and its SDE variant, Lu et al. (2022b) Algorithm 2 (DPMSolverMultistepScheduler)."""
    if sde:
        noise = noise or default_noise()
    n = len(timesteps)
    lams = [_lambda(s) for s in sigmas]
    history = []  # x0 estimates, newest last
    warm = 0  # steps taken so far, capped at solver_order (diffusers' lower_order_nums)
    for i in range(n):
        history = (history + [denoiser(x, sigmas[i], timesteps[i]).denoised])[-solver_order:]
        last = i == n - 1
        first_order_final = last and (euler_at_final or (lower_order_final and n < 15) or sigmas[-1] == 0)
        second_order_final = i == n - 2 and lower_order_final and n < 15
        noise_z = noise(x.shape) if sde else None
        m0 = history[-1]
        if solver_order == 1 or warm < 1 or first_order_final:
            x = _dpmpp_update(x, sigmas[i], sigmas[i + 1], m0, sde=sde, noise_z=noise_z)
        elif solver_order == 2 or warm < 2 or second_order_final:
            r0 = (lams[i] - lams[i - 1]) / (lams[i + 1] - lams[i])
            x = _dpmpp_update(x, sigmas[i], sigmas[i + 1], m0, (m0 - history[-2]) / r0, sde=sde, noise_z=noise_z,
                              solver_type=solver_type)
        else:
            h = lams[i + 1] - lams[i]
            r0, r1 = (lams[i] - lams[i - 1]) / h, (lams[i - 1] - lams[i - 2]) / h
            d1_0, d1_1 = (m0 - history[-2]) / r0, (history[-2] - history[-3]) / r1
            D1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
            D2 = (d1_0 - d1_1) / (r0 + r1)
            x = _dpmpp_update(x, sigmas[i], sigmas[i + 1], m0, D1, D2, sde=sde, noise_z=noise_z)
        warm = min(warm + 1, solver_order)
        x = _notify(callback, i, n, x)
    return x


def singlestep_orders(n: int, solver_order: int, lower_order_final: bool, final_zero: bool) -> list[int]:
    """Per-step orders of diffusers' DPMSolverSinglestepScheduler.get_order_list (orders 1 and 2)."""
    if solver_order == 1:
        orders = [1] * n
    elif lower_order_final:
        orders = [1, 2] * (n // 2 - 1) + [1, 1] if n % 2 == 0 else [1, 2] * (n // 2) + [1]
    else:
        orders = [1, 2] * (n // 2)
    if final_zero:
        orders[-1] = 1
    return orders


def sample_dpmpp_2s(denoiser, x, sigmas, timesteps, *, noise=None, callback=None, solver_order=2, sde=False,
                    solver_type="midpoint", lower_order_final=True, skipped=0, total=None):
    """Singlestep DPM-Solver++(2S), Lu et al. (2022b) Algorithm 1 on the schedule's points (DPMSolverSinglestep).

    ``skipped``: steps of the whole schedule before ``sigmas[0]`` (image-to-image), ``total`` its length; the per-step
    orders are those of the whole schedule, as diffusers keeps them."""
    if solver_order not in (1, 2):
        raise LdmExportError(f"DPMSolverSinglestepScheduler solver_order {solver_order} is not supported; use 1 or 2")
    if sde:
        noise = noise or default_noise()
    n = len(timesteps)
    total = total or n + skipped
    # diffusers forces lower_order_final on when steps % order != 0 or the final sigma is 0 (copied).
    lower_order_final = lower_order_final or total % solver_order != 0 or sigmas[-1] == 0
    orders = singlestep_orders(total, solver_order, lower_order_final, sigmas[-1] == 0)[skipped:skipped + n]
    lams = [_lambda(s) for s in sigmas]
    history = [None] * solver_order
    anchor = x  # the sample at the start of the current singlestep group
    for i in range(n):
        history = history[1:] + [denoiser(x, sigmas[i], timesteps[i]).denoised]
        noise_z = noise(x.shape) if sde else None
        order = orders[i]
        while history[-order] is None:
            order -= 1
        if order == 1:
            anchor = x
            x = _dpmpp_update(anchor, sigmas[i], sigmas[i + 1], history[-1], sde=sde, noise_z=noise_z)
        else:
            m0, m1 = history[-1], history[-2]
            r0 = (lams[i] - lams[i - 1]) / (lams[i + 1] - lams[i - 1])
            x = _dpmpp_update(anchor, sigmas[i - 1], sigmas[i + 1], m1, (m0 - m1) / r0, sde=sde, noise_z=noise_z,
                              solver_type=solver_type)
        x = _notify(callback, i, n, x)
    return x


def sample_dpmpp_2s_ancestral(denoiser, x, sigmas, timesteps, *, noise=None, callback=None, eta=1.0):
    """Ancestral DPM-Solver++(2S), k-diffusion sample_dpmpp_2s_ancestral (A1111 "DPM++ 2S a")."""
    noise = noise or default_noise()
    n = len(timesteps)
    for i in range(n):
        denoised = denoiser(x, sigmas[i], timesteps[i]).denoised
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if sigma_down == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            t, t_next = _lambda(sigmas[i]), _lambda(sigma_down)
            h = t_next - t
            sigma_s = math.exp(-(t + 0.5 * h))
            x_2 = (sigma_s / sigmas[i]) * x - math.expm1(-0.5 * h) * denoised
            denoised_2 = denoiser(x_2, sigma_s, denoiser.sigma_to_t(sigma_s)).denoised
            x = (sigma_down / sigmas[i]) * x - math.expm1(-h) * denoised_2
        if sigmas[i + 1] > 0:
            x = x + noise(x.shape) * sigma_up
        x = _notify(callback, i, n, x)
    return x


def _unipc_terms(hh: float, rks: list[float], order: int, solver_type: str):
    """phi_1 = expm1(hh), B(h), and the Vandermonde system R rho = b of UniPC (Zhao et al. 2023, Alg. 1-2).

    IEEE semantics as in diffusers' torch code: a zero step (UniPC + Karras + final_sigmas_type sigma_min repeats
    the last sigma) gives nan in b, which a first-order step never reads.
    """
    hh = np.float64(hh)
    with np.errstate(divide="ignore", invalid="ignore"):
        h_phi_1 = np.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        B_h = hh if solver_type == "bh1" else np.expm1(hh)
        rks = np.asarray(rks + [1.0])
        R, b, factorial_i = [], [], 1
        for k in range(1, order + 1):
            R.append(rks ** (k - 1))
            b.append(h_phi_k * factorial_i / B_h)
            factorial_i *= k + 1
            h_phi_k = h_phi_k / hh - 1 / factorial_i
    return float(h_phi_1), float(B_h), np.stack(R), np.asarray(b)


def _unipc_base(x, sigma_s, sigma_t, m0, h_phi_1, predict_x0):
    if predict_x0:
        return (sigma_t / sigma_s) * x - h_phi_1 * m0
    return x - sigma_t * h_phi_1 * m0


def sample_unipc(denoiser, x, sigmas, timesteps, *, noise=None, callback=None, solver_order=2, solver_type="bh2",
                 predict_x0=True, lower_order_final=True, disable_corrector=()):
    """UniPC predictor-corrector, Zhao et al. (2023) Algorithms 1-2 (diffusers UniPCMultistepScheduler)."""
    n = len(timesteps)
    lams = [_lambda(s) for s in sigmas]
    outputs = [None] * solver_order  # converted model outputs (x0 or eps), newest last
    last_sample, this_order, warm = None, 1, 0
    for i in range(n):
        pred = denoiser(x, sigmas[i], timesteps[i])
        m_new = pred.denoised if predict_x0 else pred.eps
        if i > 0 and (i - 1) not in disable_corrector and last_sample is not None:
            # UniC: correct x_i with the new output, using the previous step's history and order.
            m0 = outputs[-1]
            h = lams[i] - lams[i - 1]
            rks = [(lams[i - k - 1] - lams[i - 1]) / h for k in range(1, this_order)]
            D1s = [(outputs[-(k + 1)] - m0) / rk for k, rk in zip(range(1, this_order), rks)]
            hh = -h if predict_x0 else h
            h_phi_1, B_h, R, b = _unipc_terms(hh, rks, this_order, solver_type)
            rhos_c = np.array([0.5]) if this_order == 1 else np.linalg.solve(R, b)
            corr = sum(r * d for r, d in zip(rhos_c[:-1], D1s)) + rhos_c[-1] * (m_new - m0)
            scale = B_h if predict_x0 else sigmas[i] * B_h
            x = _unipc_base(last_sample, sigmas[i - 1], sigmas[i], m0, h_phi_1, predict_x0) - scale * corr
        outputs = outputs[1:] + [m_new]
        this_order = min(solver_order, n - i) if lower_order_final else solver_order
        this_order = min(this_order, warm + 1)
        last_sample = x
        # UniP: predict x_{i+1}.
        m0 = outputs[-1]
        h = lams[i + 1] - lams[i]
        rks = [(lams[i - k] - lams[i]) / h for k in range(1, this_order)]
        D1s = [(outputs[-(k + 1)] - m0) / rk for k, rk in zip(range(1, this_order), rks)]
        hh = -h if predict_x0 else h
        h_phi_1, B_h, R, b = _unipc_terms(hh, rks, this_order, solver_type)
        x = _unipc_base(x, sigmas[i], sigmas[i + 1], m0, h_phi_1, predict_x0)
        if D1s:
            rhos_p = np.array([0.5]) if this_order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1])
            scale = B_h if predict_x0 else sigmas[i + 1] * B_h
            x = x - scale * sum(r * d for r, d in zip(rhos_p, D1s))
        warm = min(warm + 1, solver_order)
        x = _notify(callback, i, n, x)
    return x


# ---------------------------------------------------------------- alpha samplers (variance-preserving space)


def sample_ddim(denoiser, x, alphas_cumprod, timesteps, *, noise=None, callback=None, alphas_cumprod_prev=None):
    """DDIM with eta = 0, Song et al. (2021) eq. 12 (diffusers DDIMScheduler).

    alphas_cumprod_prev (n,): the a of each step's target where diffusers' `timestep - T // n` is not the next
    timestep (linspace/trailing spacing; a diffusers quirk, copied); defaults to alphas_cumprod[1:].
    """
    n = len(timesteps)
    targets = alphas_cumprod[1:] if alphas_cumprod_prev is None else alphas_cumprod_prev
    for i in range(n):
        pred = denoiser.vp(x, alphas_cumprod[i], timesteps[i])
        a_prev = targets[i]
        x = math.sqrt(a_prev) * pred.denoised + math.sqrt(1 - a_prev) * pred.eps
        x = _notify(callback, i, n, x)
    return x


def sample_ddpm(denoiser, x, alphas_cumprod, timesteps, *, noise=None, callback=None, variance_type="fixed_small"):
    """Ancestral sampling from the DDPM posterior q(x_prev | x_t, x0), Ho et al. (2020) eqs. 6-7 (DDPMScheduler)."""
    noise = noise or default_noise()
    n = len(timesteps)
    for i in range(n):
        pred = denoiser.vp(x, alphas_cumprod[i], timesteps[i])
        a_t, a_prev = alphas_cumprod[i], alphas_cumprod[i + 1]
        beta_t = 1 - a_t / a_prev
        mean = (math.sqrt(a_prev) * beta_t / (1 - a_t)) * pred.denoised \
            + (math.sqrt(a_t / a_prev) * (1 - a_prev) / (1 - a_t)) * x
        if timesteps[i] > 0:
            variance = max((1 - a_prev) / (1 - a_t) * beta_t, 1e-20)
            if variance_type == "fixed_small_log":
                std = math.exp(0.5 * math.log(variance))
            elif variance_type == "fixed_large":
                std = math.sqrt(beta_t)
            else:
                std = math.sqrt(variance)
            mean = mean + std * noise(x.shape)
        x = mean
        x = _notify(callback, i, n, x)
    return x


_PLMS_COEFFS = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def sample_plms(denoiser, x, alphas_cumprod, timesteps, *, noise=None, callback=None, alphas_cumprod_from=None,
                alphas_cumprod_prev=None):
    """Pseudo linear multistep (PLMS), Liu et al. (2022) eq. 12 with the PNDM warm-up (PNDMScheduler, skip_prk_steps).

    Evaluation 1 re-does step 0 with the mean of the first two outputs (a 2nd-order warm-up). For each
    evaluation, alphas_cumprod_from / _prev are the a diffusers' update goes from / to (its `timestep +- T // n`
    arithmetic, which differs from the listed timesteps for linspace/trailing spacing: a quirk, copied).
    """
    n = len(timesteps)
    a_from = alphas_cumprod[:-1] if alphas_cumprod_from is None else alphas_cumprod_from
    a_to = alphas_cumprod[1:] if alphas_cumprod_prev is None else alphas_cumprod_prev
    history = []  # raw model outputs, newest last (evaluation 1 is not kept, as in diffusers)
    first_sample = x
    for i in range(n):
        raw = denoiser.vp(x, alphas_cumprod[i], timesteps[i]).raw
        if i == 1:
            combined, base = (raw + history[-1]) / 2, first_sample
        else:
            history = (history + [raw])[-4:]
            coeffs = _PLMS_COEFFS[len(history)]
            combined, base = sum(c * e for c, e in zip(coeffs, reversed(history))), x
        eps = denoiser.eps_vp(combined, base, a_from[i])
        a, a_prev = a_from[i], a_to[i]
        # DDIM step written as diffusers' _get_prev_sample (Liu et al. eq. 11).
        denom = a * math.sqrt(1 - a_prev) + math.sqrt(a * (1 - a) * a_prev)
        x = math.sqrt(a_prev / a) * base - (a_prev - a) * eps / denom
        x = _notify(callback, i, n, x)
    return x


def sample_lcm(denoiser, x, alphas_cumprod, timesteps, *, noise=None, callback=None, timestep_scaling=10.0,
               renoise_last=False):
    """Latent consistency model multistep sampling, Luo et al. (2023) Algorithm 1 (diffusers LCMScheduler).
    ``renoise_last``: the steps are the first part of a longer schedule (a base handing off to a refiner), so the last
    one noises its estimate to the next timestep, as diffusers' scheduler does for every step but the schedule's last."""
    noise = noise or default_noise()
    n = len(timesteps)
    sigma_data = 0.5
    for i in range(n):
        pred = denoiser.vp(x, alphas_cumprod[i], timesteps[i])
        scaled_t = float(timesteps[i]) * timestep_scaling
        c_skip = sigma_data ** 2 / (scaled_t ** 2 + sigma_data ** 2)
        c_out = scaled_t / math.sqrt(scaled_t ** 2 + sigma_data ** 2)
        denoised = c_out * pred.denoised + c_skip * x
        if i < n - 1 or renoise_last:
            a_prev = alphas_cumprod[i + 1]
            x = math.sqrt(a_prev) * denoised + math.sqrt(1 - a_prev) * noise(x.shape)
        else:
            x = denoised
        x = _notify(callback, i, n, x)
    return x
