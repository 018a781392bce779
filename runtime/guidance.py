"""Classifier-free guidance around a UNet engine, in numpy.

Implements classifier-free guidance from Ho & Salimans (2022), "Classifier-Free Diffusion Guidance",
as diffusers' Stable Diffusion pipelines apply it (unconditional half first, guidance only when
``guidance_scale > 1``), with the guidance rescale of Lin et al. (2023), "Common Diffusion Noise
Schedules and Sample Steps are Flawed", section 3.4 (diffusers' ``rescale_noise_cfg``).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .errors import LdmExportError
from .families.base import Conditioning

# unet_fn(sample (N, C, h, w), timestep (N,) float32, encoder_hidden_states (N, L, D)) -> (N, C', h, w)
UnetFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
Denoiser = Callable[[np.ndarray, float], np.ndarray]
BATCH_MODES = ("batch2", "sequential")


def rescale_noise_cfg(noise_cfg: np.ndarray, noise_pred_text: np.ndarray, guidance_rescale: float = 0.0) -> np.ndarray:
    """Rescale the guided prediction toward the conditional one's std (Lin et al. 2023, section 3.4, eq. 15-16)."""
    axes = tuple(range(1, noise_pred_text.ndim))
    # torch.std is the unbiased estimate, as diffusers uses it
    std_text = noise_pred_text.std(axis=axes, ddof=1, keepdims=True)
    std_cfg = noise_cfg.std(axis=axes, ddof=1, keepdims=True)
    noise_pred_rescaled = noise_cfg * (std_text / std_cfg)
    return guidance_rescale * noise_pred_rescaled + (1 - guidance_rescale) * noise_cfg


def _as_conditioning(name: str, e) -> Conditioning:
    if isinstance(e, Conditioning):
        return e
    if not isinstance(e, np.ndarray) or e.ndim != 3:
        got = f"shape {e.shape}" if isinstance(e, np.ndarray) else type(e).__name__
        raise LdmExportError(f"{name} must be a (batch, sequence, hidden) array from the text encoder, got {got}")
    return Conditioning(e)


def guided_denoiser(unet_fn: UnetFn, cond_embeddings, uncond_embeddings=None,
                    guidance_scale: float = 7.5, guidance_rescale: float = 0.0, batch_mode: str = "batch2",
                    dtype=np.float32) -> Denoiser:
    """``model(x_in, t)`` for a sampler: the UNet output with classifier-free guidance applied.

    ``cond_embeddings`` / ``uncond_embeddings`` are the text encoder's (B, L, D) arrays, or whole
    :class:`Conditioning` records (pooled vectors and extras too); ``unet_fn`` then gets the same kind for the rows
    it runs. ``batch_mode="batch2"`` runs [uncond, cond] as one batch of 2B (diffusers' order);
    ``"sequential"`` runs one batch-1 call per prompt and half, for memory-tight devices or static
    batch-1 engines. ``guidance_scale <= 1`` runs the conditional half only (as diffusers does), and
    then ``uncond_embeddings`` may be None. Feeds are cast to ``dtype`` (float16 for fp16 engines);
    the result is float64 when ``x_in`` is float64, else float32, and guidance is computed in it.
    Embeddings of batch 1 are broadcast over the latents' batch.
    """
    if batch_mode not in BATCH_MODES:
        raise LdmExportError(f"batch_mode must be one of {', '.join(BATCH_MODES)}, got {batch_mode!r}")
    if not 0.0 <= guidance_rescale <= 1.0:
        raise LdmExportError(f"guidance_rescale must lie in [0, 1], got {guidance_rescale}")
    feed_dtype = np.dtype(dtype)
    if feed_dtype.kind != "f":
        raise LdmExportError(f"dtype must be a floating type for the UNet feeds, got {feed_dtype}")
    do_cfg = guidance_scale > 1.0
    records = not isinstance(cond_embeddings, np.ndarray)  # give unet_fn what the caller gave us
    cond = _as_conditioning("cond_embeddings", cond_embeddings).astype(feed_dtype)
    if do_cfg:
        if uncond_embeddings is None:
            raise LdmExportError(f"guidance_scale {guidance_scale} > 1 needs uncond_embeddings (the negative or "
                                 "empty prompt's); pass them or use guidance_scale 1")
        uncond = _as_conditioning("uncond_embeddings", uncond_embeddings).astype(feed_dtype)
        if not uncond.same_layout(cond) or uncond.batch != cond.batch:
            raise LdmExportError(f"uncond_embeddings shape {uncond.context.shape} differs from cond_embeddings shape "
                                 f"{cond.context.shape}; encode both prompts padded to the same length")
        halves = (uncond, cond)
    else:
        halves = (cond,)
    by_batch: dict[int, tuple[Conditioning, ...]] = {}  # latents batch -> conditioning fitted to it
    stacked: dict[int, Conditioning] = {}  # latents batch -> [uncond; cond] for the batch-2 call

    def fitted(batch: int) -> tuple[Conditioning, ...]:
        if batch not in by_batch:
            if cond.batch not in (1, batch):
                raise LdmExportError(f"latents batch {batch} does not match the {cond.batch} prompt embeddings; "
                                     "give one embedding per latent, or one for all")
            by_batch[batch] = tuple(e.repeat(batch // e.batch) for e in halves)
            # one record for every step: an engine that keeps its inputs on the device sees the same embeddings
            # object each call and need not copy them again (see Pipeline and the CUDA engine's run_partial)
            stacked[batch] = Conditioning.concat(by_batch[batch])
        return by_batch[batch]

    def run(sample: np.ndarray, t: float, states: Conditioning, out_dtype) -> np.ndarray:
        n = sample.shape[0]
        out = unet_fn(sample, np.full((n,), t, dtype=np.float32), states if records else states.context)
        out = np.asarray(out)
        if out.ndim < 1 or out.shape[0] != n:
            raise LdmExportError(f"the UNet returned shape {out.shape} for a batch of {n}; check the engine's outputs")
        return out.astype(out_dtype, copy=False)

    def model(x_in: np.ndarray, t: float) -> np.ndarray:
        if not isinstance(x_in, np.ndarray) or x_in.ndim != 4:
            got = f"shape {x_in.shape}" if isinstance(x_in, np.ndarray) else type(x_in).__name__
            raise LdmExportError(f"latents must be a (batch, channels, height, width) array, got {got}")
        out_dtype = np.float64 if x_in.dtype == np.float64 else np.float32
        batch = x_in.shape[0]
        embeds = fitted(batch)
        sample = x_in.astype(feed_dtype, copy=False)  # (B, 4, h, w)
        t = float(t)
        if batch_mode == "batch2" or not do_cfg and batch == 1:
            both = run(np.concatenate([sample] * len(embeds)), t, stacked[batch], out_dtype)  # (2B, C, h, w)
            preds = np.split(both, len(embeds))
        else:
            preds = [np.concatenate([run(sample[i : i + 1], t, e.rows(i, i + 1), out_dtype) for i in range(batch)])
                     for e in embeds]
        if not do_cfg:
            return preds[0]
        noise_pred_uncond, noise_pred_text = preds
        noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
        if guidance_rescale > 0.0:
            noise_pred = rescale_noise_cfg(noise_pred, noise_pred_text, guidance_rescale)
        return noise_pred

    return model
