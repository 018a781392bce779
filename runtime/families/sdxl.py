"""Stable Diffusion XL (base and refiner): two CLIP text encoders, a UNet with added "text_time" conditions.

As diffusers' ``StableDiffusionXLPipeline.encode_prompt``: each text encoder's penultimate hidden state, concatenated
along features (CLIP-L 768 + OpenCLIP bigG 1280 = 2048), and the pooled, projected output of the last one
(``text_embeds``); the base's absent or empty negative prompt gives zeros (``force_zeros_for_empty_prompt``; diffusers
zeros an absent one, A1111 an empty one too). The UNet also takes ``time_ids``: original size, crop top-left and target
size (the base), or original size, crop and an aesthetic score (the refiner: 6 for the prompt, 2.5 for the negative),
each embedded sinusoidally inside the UNet.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..kinds import clip_text_spec, text_time_unet_spec, vae_encoder_spec
from ..spec import ComponentSpec, vae_decoder_spec
from .base import Component, Conditioning, Module, register
from .sd import CLIP_EOS, UNetFamily

AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5  # diffusers' defaults for the refiner


@register
class StableDiffusionXL(UNetFamily):
    name = "sdxl"
    description = "Stable Diffusion XL: CLIP ViT-L + OpenCLIP ViT-bigG text, UNet with text-time conditions, KL VAE"
    modules = (Module("text_encoder", "transformers", "CLIPTextModel"),
               Module("text_encoder_2", "transformers", "CLIPTextModelWithProjection"),
               Module("unet", "diffusers", "UNet2DConditionModel"),
               Module("vae", "diffusers", "AutoencoderKL"))
    components = (Component("text_encoder", "clip_text_hidden", "text_encoder"),
                  Component("text_encoder_2", "clip_text_hidden", "text_encoder_2"),
                  Component("unet", "unet_text_time", "unet"),
                  Component("vae_decoder", "vae_decoder", "vae", static_batch=1),
                  Component("vae_encoder", "vae_encoder", "vae", static_batch=1, optional=True))
    text_encoders = ("text_encoder", "text_encoder_2")
    tokenizers = ("tokenizer", "tokenizer_2")
    tokenizer_classes = ("CLIPTokenizer", "CLIPTokenizer")
    pad_tokens = (CLIP_EOS, "!")  # the second tokenizer pads with '!' (id 0), as OpenCLIP's
    pad_token = CLIP_EOS
    pipeline_class = "StableDiffusionXLPipeline"
    requires_aesthetics_score = False
    force_zeros_for_empty_prompt = True
    # the time ids are embedded with sinusoids of arguments up to ~1000: fp16 cannot hold them (see precision.py)
    fp32_scopes = ("/model/add_time_proj/",)

    def component_specs(self, configs, resolution: int, max_length: int) -> dict[str, ComponentSpec]:
        hw = self.latent_profile(configs, resolution)
        lf = self.latent_format(configs)
        pooled = int(configs["text_encoder_2"]["projection_dim"])
        unet = configs["unet"]
        specs = {te: clip_text_spec(te, configs[te]["hidden_size"], configs[te]["num_hidden_layers"], max_length,
                                    projection_dim=pooled if te == "text_encoder_2" else None)
                 for te in self.text_encoders}
        specs["unet"] = text_time_unet_spec(unet["in_channels"], unet["out_channels"], unet["cross_attention_dim"],
                                            pooled, 5 if self.requires_aesthetics_score else 6, hw, max_length)
        specs["vae_decoder"] = vae_decoder_spec(lf.channels, hw, lf.vae_scale_factor)
        specs["vae_encoder"] = vae_encoder_spec(lf.channels, hw, lf.vae_scale_factor)
        return specs

    def encode(self, pipe, prompts: Sequence[str]) -> Conditioning:
        contexts, pooled = [], None
        for te, tok in zip(self.text_encoders, self.tokenizers):
            ids = pipe.tokenizers[tok](list(prompts))  # (B, 77) int32
            out = pipe.run_component(te, {"input_ids": ids}, batched=["input_ids"])
            contexts.append(next(v for k, v in out.items() if k.startswith("hidden_states.")))  # hidden_states[-2]
            pooled = out.get("text_embeds", pooled)
        return Conditioning(np.concatenate(contexts, axis=-1).astype(np.float32),  # (B, 77, 2048)
                            np.asarray(pooled, dtype=np.float32))  # (B, 1280)

    def encode_negative(self, pipe, prompts: Sequence[str], cond: Conditioning, given: bool) -> Conditioning:
        # diffusers zeros an absent negative prompt; A1111 (sd_models_xl.py) an empty one too: an image's parameters
        # cannot tell "" from none, and A1111's API sends "" for none. Each image's own: an image does not depend on
        # the negative prompts it is batched with (A1111 zeros a batch only when all of it is empty)
        if not self.force_zeros_for_empty_prompt:
            return self.encode(pipe, prompts)
        empty = np.array([not given or p == "" for p in prompts])
        if empty.all():
            return Conditioning(np.zeros_like(cond.context), np.zeros_like(cond.pooled))
        negative = self.encode(pipe, prompts)
        negative.context[empty] = 0.0
        negative.pooled[empty] = 0.0
        return negative

    def time_ids(self, width: int, height: int, negative: bool = False) -> np.ndarray:
        """diffusers' ``_get_add_time_ids`` with original and target size the image's and no crop."""
        if self.requires_aesthetics_score:
            return np.array([height, width, 0, 0, NEGATIVE_AESTHETIC_SCORE if negative else AESTHETIC_SCORE],
                            dtype=np.float32)
        return np.array([height, width, 0, 0, height, width], dtype=np.float32)

    def prepare(self, cond: Conditioning, *, width: int, height: int, guidance_scale: float) -> Conditioning:
        return self._with_time_ids(cond, self.time_ids(width, height))

    def prepare_negative(self, cond: Conditioning, *, width: int, height: int, guidance_scale: float) -> Conditioning:
        return self._with_time_ids(cond, self.time_ids(width, height, negative=True))

    @staticmethod
    def _with_time_ids(cond: Conditioning, ids: np.ndarray) -> Conditioning:
        return Conditioning(cond.context, cond.pooled, {**cond.extras, "time_ids": np.repeat(ids[None], cond.batch, 0)})

    def denoiser_feeds(self, sample, timestep, cond: Conditioning) -> dict[str, np.ndarray]:
        return {"sample": self.denoiser_sample(sample, cond), "timestep": timestep,
                "encoder_hidden_states": cond.context, "text_embeds": cond.pooled, "time_ids": cond.extras["time_ids"]}


@register
class StableDiffusionXLRefiner(StableDiffusionXL):
    name = "sdxl-refiner"
    description = "Stable Diffusion XL refiner: OpenCLIP ViT-bigG text, UNet with text-time and aesthetic score"
    modules = StableDiffusionXL.modules[1:]
    components = StableDiffusionXL.components[1:]
    text_encoders = ("text_encoder_2",)
    tokenizers = ("tokenizer_2",)
    tokenizer_classes = ("CLIPTokenizer",)
    pad_tokens = ("!",)
    pad_token = "!"
    pipeline_class = "StableDiffusionXLImg2ImgPipeline"
    requires_aesthetics_score = True
    force_zeros_for_empty_prompt = False
