"""Text-to-image from a DiT bundle (SD3, FLUX, the demo DiT): tokenizers -> text encoders -> flow-matching sampler
with CFG (or FLUX's guidance input) over the transformer -> VAE decoder -> PIL images. numpy only."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from . import dit as D
from .bundle import Bundle
from .engine import Engine
from .errors import LdmExportError
from .pipeline import MAX_STEPS, _as_prompts, check_finite, make_engine, run_batched

log = logging.getLogger(__name__)


def make_tokenizer(bundle: Bundle, component: str, info: Mapping):
    """The tokenizer of one text encoder, from the bundle's tokenizer folder."""
    folder = bundle.path / info["tokenizer"]
    if info["kind"] == "t5":
        from .tokenizer_t5 import T5Tokenizer

        return T5Tokenizer(folder, max_length=int(info["max_length"]))
    from .tokenizer import ClipTokenizer

    return ClipTokenizer(folder, max_length=int(info["max_length"]))


class DiTPipeline:
    """Flow-matching text-to-image over a DiT bundle's engines."""

    def __init__(self, bundle: Bundle, engines: Mapping[str, Engine], tokenizers: Mapping | None = None):
        self.bundle = bundle
        self.model = bundle.model
        if self.model.get("family") not in D.DIT_FAMILIES:
            raise LdmExportError(f"bundle {bundle.path} is a {self.model.get('family')!r} model, not a DiT; open it "
                                 "with Pipeline")
        self.engines = dict(engines)
        encoders = self.model["text_encoders"]
        self.tokenizers = dict(tokenizers) if tokenizers else {c: make_tokenizer(bundle, c, i) for c, i in encoders.items()}
        self.resolution = int(self.model["resolution"])
        self.vae_scale_factor = int(self.model["vae_scale_factor"])

    @classmethod
    def from_bundle(cls, path: str | Path, provider: str = "cpu", verify: bool = False,
                    threads: int | None = None) -> "DiTPipeline":
        bundle = Bundle.open(path, verify=verify)
        return cls(bundle, {c: make_engine(bundle, c, provider, threads) for c in bundle.components})

    @property
    def model_hash(self) -> str:
        rel = self.bundle.manifest["components"]["transformer"]["files"][0]
        return self.bundle.manifest["files"][rel]["sha256"][:10]

    def run_encoder(self, component: str, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        ids = self.tokenizers[component](list(prompts))
        out = run_batched(self.engines[component], {"input_ids": ids}, ["input_ids"])
        check_finite(component, out)
        return {k: v.astype(np.float32) for k, v in out.items()}

    def encode_prompt(self, prompts: Sequence[str]) -> D.Conditioning:
        return D.encode(self.model, self.run_encoder, prompts)

    def transformer(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        batched = ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"] + \
            (["guidance"] if "guidance" in feeds else [])
        out = run_batched(self.engines["transformer"], feeds, batched)["out_hidden_states"]
        return out.astype(np.float32)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        out = run_batched(self.engines["vae_decoder"], {"latent_sample": D.decoder_input(self.model, latents)},
                          ["latent_sample"])
        check_finite("vae_decoder", out)
        return out["sample"].astype(np.float32)

    def __call__(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None, seed: int | None = None,
                 latents: np.ndarray | None = None, width: int | None = None, height: int | None = None,
                 scheduler: str | Mapping | None = None, num_images: int = 1,
                 callback: Callable[[int, int, np.ndarray], None] | None = None, return_latents: bool = False):
        from .image import format_parameters, latents_to_images
        from .schedulers import a1111_name, resolve_scheduler, sample

        steps = int(self.model.get("default_steps", 28)) if num_inference_steps is None else num_inference_steps
        guidance_scale = float(self.model.get("default_guidance", 7.0)) if guidance_scale is None else guidance_scale
        prompts = _as_prompts(prompt, "prompt")
        negatives = _as_prompts("" if negative_prompt is None else negative_prompt, "negative_prompt")
        if len(negatives) == 1 and len(prompts) > 1:
            negatives = negatives * len(prompts)
        if len(negatives) != len(prompts):
            raise LdmExportError(f"got {len(prompts)} prompts but {len(negatives)} negative prompts; give one or as many")
        if not isinstance(steps, (int, np.integer)) or not 1 <= steps <= MAX_STEPS:
            raise LdmExportError(f"steps must be an integer from 1 to {MAX_STEPS}, got {steps!r}")
        if not np.isfinite(guidance_scale):
            raise LdmExportError(f"guidance scale must be a finite number, got {guidance_scale!r}")
        width, height = self._size(width, height)
        base = self.bundle.scheduler_config
        if scheduler is None:
            sched_cfg = base
        elif isinstance(scheduler, str):
            sched_cfg = resolve_scheduler(scheduler, base)
        else:
            sched_cfg = dict(scheduler)
        prompts = [p for p in prompts for _ in range(num_images)]
        negatives = [p for p in negatives for _ in range(num_images)]
        if seed is None:
            seed = int(np.random.default_rng().integers(0, 2**32 - 1))
        rng = np.random.default_rng(seed)
        start = D.initial_latents(self.model, rng, len(prompts), height, width) if latents is None else \
            np.asarray(latents, dtype=np.float64)
        x = D.to_sampler_space(self.model, start)
        do_cfg = D.uses_cfg(self.model, guidance_scale)
        cond = self.encode_prompt(prompts)
        if do_cfg:  # [uncond, cond] as one batch, diffusers' order; the embeddings are joined once
            uncond = self.encode_prompt(negatives)
            both = D.Conditioning(np.concatenate([uncond.context, cond.context]),
                                  np.concatenate([uncond.pooled, cond.pooled]))
        step = {"i": 0}

        def denoiser(x_in: np.ndarray, t) -> np.ndarray:
            if do_cfg:
                feeds = D.transformer_feeds(self.model, np.concatenate([x_in, x_in]), t, both, guidance_scale,
                                            height, width)
                v_uncond, v_cond = np.split(self.transformer(feeds), 2)
                v = v_uncond + guidance_scale * (v_cond - v_uncond)
            else:
                v = self.transformer(D.transformer_feeds(self.model, x_in, t, cond, guidance_scale, height, width))
            check_finite("transformer", {"out_hidden_states": v}, f" at step {step['i'] + 1} of {steps}")
            return v

        def on_step(i, n, x_k):
            step["i"] = i + 1
            if callback is not None:
                callback(i, n, x_k)

        final = sample(denoiser, x, sched_cfg, steps, callback=on_step,
                       **D.schedule_arguments(self.model, sched_cfg, steps, x))
        final = D.from_sampler_space(self.model, np.asarray(final, dtype=np.float32), height, width)
        if return_latents:
            return final
        images = latents_to_images(self.decode(final))
        for k, img in enumerate(images):
            img.info["parameters"] = format_parameters(
                prompts[k], negatives[k] or None, steps, a1111_name(sched_cfg), guidance_scale, seed, width, height,
                self.model_hash, model_name=self.model.get("name"),
                extra={"Batch pos": k % num_images} if num_images > 1 else None)
        return images

    def _size(self, width, height) -> tuple[int, int]:
        width = self.resolution if width is None else width
        height = self.resolution if height is None else height
        f = self.vae_scale_factor * (2 if self.model.get("packed_latents") else 1)
        for name, v in (("width", width), ("height", height)):
            if not isinstance(v, (int, np.integer)) or v <= 0 or v % f:
                raise LdmExportError(f"{name} must be a positive multiple of {f}, got {v!r}")
        return int(width), int(height)
