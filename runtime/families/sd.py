"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, a UNet with cross-attention, a KL VAE (4 latent channels).

SD 2.x differs only in data: OpenCLIP ViT-H's penultimate layer (expressed by its config's layer count), the
tokenizer padding with '!' (id 0), and v-prediction in its scheduler config.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from ..kinds import vae_encoder_spec
from ..spec import ComponentSpec, text_encoder_spec, unet_spec, vae_decoder_spec
from .base import Component, Conditioning, Family, Module, register

CLIP_EOS = "<|endoftext|>"


class UNetFamily(Family):
    """Shared by every family whose denoiser is diffusers' UNet2DConditionModel."""

    def size_multiple(self, configs: Mapping[str, Mapping[str, Any]]) -> int:
        # the UNet halves the latents once per block but the last; up-blocks then need sides that divide evenly
        downs = len(configs["unet"]["block_out_channels"]) - 1
        return self.latent_format(configs).vae_scale_factor * 2 ** downs

    @staticmethod
    def latent_profile(configs, resolution: int) -> tuple[int, int, int]:
        side = resolution // 2 ** (len(configs["vae"]["block_out_channels"]) - 1)
        return (max(1, side // 4), side, side * 2)


@register
class StableDiffusion1(UNetFamily):
    name = "sd1"
    description = "Stable Diffusion 1.x: CLIP ViT-L/14 text, UNet, KL VAE"
    modules = (Module("text_encoder", "transformers", "CLIPTextModel"),
               Module("unet", "diffusers", "UNet2DConditionModel"),
               Module("vae", "diffusers", "AutoencoderKL"))
    components = (Component("text_encoder", "clip_text", "text_encoder"),
                  Component("unet", "unet", "unet"),
                  Component("vae_decoder", "vae_decoder", "vae", static_batch=1),
                  Component("vae_encoder", "vae_encoder", "vae", static_batch=1, optional=True))
    pad_token = CLIP_EOS

    def component_specs(self, configs, resolution: int, max_length: int) -> dict[str, ComponentSpec]:
        hw = self.latent_profile(configs, resolution)
        lf = self.latent_format(configs)
        return {
            "text_encoder": text_encoder_spec(configs["text_encoder"]["hidden_size"], max_length),
            "unet": unet_spec(configs["unet"]["in_channels"], configs["unet"]["out_channels"],
                              configs["unet"]["cross_attention_dim"], hw, max_length),
            "vae_decoder": vae_decoder_spec(lf.channels, hw, lf.vae_scale_factor),
            "vae_encoder": vae_encoder_spec(lf.channels, hw, lf.vae_scale_factor),
        }

    def encode(self, pipe, prompts: Sequence[str]) -> Conditioning:
        ids = pipe.tokenizers["tokenizer"](list(prompts))  # (B, 77) int32
        out = pipe.run_component("text_encoder", {"input_ids": ids}, batched=["input_ids"])
        return Conditioning(out["last_hidden_state"].astype(np.float32))  # (B, 77, D)

    def denoiser_feeds(self, sample, timestep, cond: Conditioning) -> dict[str, np.ndarray]:
        return {"sample": self.denoiser_sample(sample, cond), "timestep": timestep,
                "encoder_hidden_states": cond.context}


@register
class StableDiffusion2(StableDiffusion1):
    name = "sd2"
    description = "Stable Diffusion 2.x: OpenCLIP ViT-H/14 text (penultimate layer), UNet, KL VAE"
    pad_token = "!"  # SD 2.x's tokenizer pads with '!' (id 0)
