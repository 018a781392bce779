"""The DiT families in numpy: prompts -> conditioning, the transformer's feeds, latent format (scale, shift, FLUX
packing), as diffusers' StableDiffusion3Pipeline and FluxPipeline compute them (0.35.2).

- ``sd3``: CLIP-L and CLIP-G penultimate hidden states joined on the feature axis and zero-padded to T5's width,
  then T5's tokens appended on the sequence axis (77 + 256); pooled = CLIP-L and CLIP-G projections joined; CFG
  with the negative prompt encoded the same way.
- ``flux``: T5's hidden states as context, CLIP-L's pooler output as pooled; packed 2x2 latents with position ids;
  FLUX-dev's distilled guidance is an input (no CFG batch), FLUX-schnell has none; sigmas linspace(1, 1/n, n) with
  mu from the packed token count.
- ``demo-dit``: one CLIP's last hidden state (32 tokens) and pooler output; CFG.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from .errors import LdmExportError
from .flux import image_ids, pack_latents, text_ids, unpack_latents
from .schedules import calculate_shift

log = logging.getLogger(__name__)

DIT_FAMILIES = ("sd3", "flux", "demo-dit")


@dataclass
class Conditioning:
    """What the text encoders give the denoiser: context (B, L, D) and pooled (B, P)."""

    context: np.ndarray
    pooled: np.ndarray


def penultimate_output(names: Sequence[str]) -> str:
    """The CLIP-with-projection component's ``hidden_states.{N-1}`` output (Optimum's name)."""
    found = [n for n in names if n.startswith("hidden_states.")]
    if len(found) != 1:
        raise LdmExportError(f"a CLIP-with-projection graph needs one 'hidden_states.N' output, got {list(names)}")
    return found[0]


def encode(model: Mapping, run_encoder, prompts: Sequence[str]) -> Conditioning:
    """Conditioning of ``prompts`` for the bundle's family; ``run_encoder(component, prompts)`` -> outputs dict."""
    family = model["family"]
    encoders = model["text_encoders"]
    if family == "sd3":
        clip_states, pooled = [], []
        t5 = None
        for name, info in encoders.items():
            out = run_encoder(name, prompts)
            if info["kind"] == "t5":
                t5 = out["last_hidden_state"]  # (B, 256, 4096)
            else:
                clip_states.append(out[penultimate_output(list(out))])  # (B, 77, 768 | 1280)
                pooled.append(out["text_embeds"])
        clip = np.concatenate(clip_states, axis=-1)  # (B, 77, 2048)
        width = int(model["joint_attention_dim"])
        if clip.shape[-1] > width:
            raise LdmExportError(f"CLIP features ({clip.shape[-1]}) are wider than the transformer's context "
                                 f"({width}); the bundle's text encoders do not fit its transformer")
        clip = np.pad(clip, ((0, 0), (0, 0), (0, width - clip.shape[-1])))
        if t5 is None:  # SD3 without T5: diffusers feeds zeros in its place
            t5_len = int(model["text_length"]) - clip.shape[1]
            t5 = np.zeros((clip.shape[0], t5_len, width), clip.dtype)
        return Conditioning(np.concatenate([clip, t5], axis=1), np.concatenate(pooled, axis=-1))
    if family == "flux":
        context = pooled = None
        for name, info in encoders.items():
            out = run_encoder(name, prompts)
            if info["kind"] == "t5":
                context = out["last_hidden_state"]
            else:
                pooled = out["pooler_output"]
        return Conditioning(context, pooled)
    if family == "demo-dit":
        (name,) = encoders
        out = run_encoder(name, prompts)
        return Conditioning(out["last_hidden_state"], out["pooler_output"])
    raise LdmExportError(f"unknown DiT family {family!r}; known: {', '.join(DIT_FAMILIES)}")


def uses_cfg(model: Mapping, guidance_scale: float) -> bool:
    """FLUX takes no CFG batch (schnell: timestep-distilled; dev: guidance is an input); SD3 and the demo do at > 1."""
    return model["family"] != "flux" and guidance_scale > 1.0


def initial_latents(model: Mapping, rng: np.random.Generator, batch: int, height: int, width: int) -> np.ndarray:
    """Standard-normal latents (B, C, h, w), as the sampler starts from them (before any packing)."""
    f = int(model["vae_scale_factor"])
    return rng.standard_normal((batch, int(model["latent_channels"]), height // f, width // f))


def to_sampler_space(model: Mapping, latents: np.ndarray) -> np.ndarray:
    """FLUX samples packed tokens (B, N, 4C); the others sample (B, C, h, w) as is."""
    return pack_latents(latents) if model.get("packed_latents") else latents


def from_sampler_space(model: Mapping, x: np.ndarray, height: int, width: int) -> np.ndarray:
    if not model.get("packed_latents"):
        return x
    f = int(model["vae_scale_factor"])
    return unpack_latents(x, height // f, width // f)


def schedule_arguments(model: Mapping, scheduler_config: Mapping, steps: int, x: np.ndarray) -> dict:
    """FluxPipeline's set_timesteps arguments: its sigmas and mu from the packed token count (from the config)."""
    if model["family"] != "flux":
        return {}
    keys = ("base_image_seq_len", "max_image_seq_len", "base_shift", "max_shift")
    defaults = (256, 4096, 0.5, 1.15)  # diffusers' FlowMatchEulerDiscreteScheduler defaults
    values = [scheduler_config.get(k, d) for k, d in zip(keys, defaults)]
    return {"sigmas": np.linspace(1.0, 1 / steps, steps), "mu": calculate_shift(x.shape[1], *values)}


def transformer_feeds(model: Mapping, x: np.ndarray, t: float, cond: Conditioning, guidance_scale: float,
                      height: int, width: int) -> dict[str, np.ndarray]:
    """The transformer's inputs for latents ``x`` (sampler space) at timestep ``t`` (0..1000)."""
    b = x.shape[0]
    t32 = np.float32(t)
    feeds = {"hidden_states": x.astype(np.float32), "encoder_hidden_states": cond.context,
             "pooled_projections": cond.pooled}
    if model["family"] == "flux":
        f = int(model["vae_scale_factor"])
        feeds["timestep"] = np.full((b,), t32 / np.float32(1000), np.float32)  # FluxPipeline passes t / 1000
        feeds["img_ids"] = image_ids(height // f, width // f)
        feeds["txt_ids"] = text_ids(cond.context.shape[1])
        if model.get("guidance_embeds"):
            feeds["guidance"] = np.full((b,), guidance_scale, np.float32)
    else:
        feeds["timestep"] = np.full((b,), t32, np.float32)
    return feeds


def decoder_input(model: Mapping, latents: np.ndarray) -> np.ndarray:
    """latents / scaling_factor + shift_factor, as diffusers' SD3/FLUX pipelines feed vae.decode."""
    return latents / float(model["latent_scale"]) + float(model.get("latent_shift", 0.0))
