"""FLUX.1 [schnell] / [dev]: CLIP-L (pooled) and T5-XXL, a rectified-flow transformer over packed 2x2 latent tokens
with rotary position ids, a 16-channel KL VAE with scale and shift.

As diffusers' ``FluxPipeline`` (0.35.2): the context is T5's hidden states, the pooled vector CLIP-L's pooler
output; there is no CFG batch: FLUX-dev takes its distilled guidance scale as the ``guidance`` input, schnell none;
the transformer gets timestep / 1000; the schedule is sigmas linspace(1, 1/n, n) shifted by mu from the packed token
count (``calculate_shift`` over the scheduler config's base/max values). The sampler works on (B, C, h, w) latents;
packing (a permutation) happens at the transformer's boundary, so the Euler steps are the pipeline's.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from ..flux import image_ids, pack_latents, text_ids, unpack_latents
from ..schedules import calculate_shift
from ..spec import ComponentSpec, text_encoder_spec, vae_decoder_spec
from ..spec_dit import flux_transformer_spec, t5_encoder_spec
from .base import Component, Conditioning, Module, register
from .sd3 import CLIP_LENGTH, TransformerFamily

_SHIFT_KEYS = ("base_image_seq_len", "max_image_seq_len", "base_shift", "max_shift")
_SHIFT_DEFAULTS = (256, 4096, 0.5, 1.15)  # FlowMatchEulerDiscreteScheduler's defaults, for configs that omit them


@register
class Flux(TransformerFamily):
    name = "flux"
    description = "FLUX.1 [schnell] / [dev]: CLIP-L pooled + T5-XXL, rectified-flow transformer on packed latents"
    modules = (Module("text_encoder", "transformers", "CLIPTextModel"),
               Module("text_encoder_2", "transformers", "T5EncoderModel"),
               Module("transformer", "diffusers", "FluxTransformer2DModel"),
               Module("vae", "diffusers", "AutoencoderKL"))
    # no CFG batch: a static transformer runs batch 1
    components = (Component("text_encoder", "clip_text", "text_encoder"),
                  Component("text_encoder_2", "t5_encoder", "text_encoder_2"),
                  Component("transformer", "flux_transformer", "transformer", static_batch=1),
                  Component("vae_decoder", "vae_decoder", "vae", static_batch=1))
    text_encoders = ("text_encoder", "text_encoder_2")
    tokenizers = ("tokenizer", "tokenizer_2")
    tokenizer_classes = ("CLIPTokenizer", "T5TokenizerFast")
    tokenizer_kinds = ("clip", "t5")
    pipeline_class = "FluxPipeline"
    unbatched_inputs = ("img_ids", "txt_ids")

    pad_tokens = ("<|endoftext|>", None)

    def size_multiple(self, configs) -> int:
        return self.latent_format(configs).vae_scale_factor * 2  # 2x2 latent patches per token

    def component_specs(self, configs, resolution: int, max_length: int) -> dict[str, ComponentSpec]:
        hw = self.latent_profile(configs, resolution)
        lf = self.latent_format(configs)
        t = configs["transformer"]
        return {
            "text_encoder": text_encoder_spec(configs["text_encoder"]["hidden_size"], CLIP_LENGTH),
            "text_encoder_2": t5_encoder_spec("text_encoder_2", configs["text_encoder_2"]["d_model"], max_length),
            "transformer": flux_transformer_spec(t["in_channels"], t["joint_attention_dim"], t["pooled_projection_dim"],
                                                 hw, max_length, bool(t.get("guidance_embeds"))),
            "vae_decoder": vae_decoder_spec(lf.channels, hw, lf.vae_scale_factor),
        }

    def static_dims(self, component: str, configs, resolution: int, max_length: int) -> dict[str, int]:
        dims = super().static_dims(component, configs, resolution, max_length)
        side = dims["height"]
        dims["sequence"] = max_length if component == "text_encoder_2" else CLIP_LENGTH
        dims["text_sequence"] = max_length
        dims["image_sequence"] = (side // 2) * (side // 2)
        return dims

    def encode(self, pipe, prompts: Sequence[str]) -> Conditioning:
        pooled = self.run_text(pipe, "text_encoder", prompts)["pooler_output"]  # (B, 768)
        context = self.run_text(pipe, "text_encoder_2", prompts)["last_hidden_state"]  # (B, 512, 4096)
        return Conditioning(context, pooled)

    def uses_cfg(self, guidance_scale: float) -> bool:
        return False  # distilled: dev's guidance is an input, schnell has none

    def takes_guidance(self, denoiser_inputs) -> bool:
        return "guidance" in denoiser_inputs  # schnell is timestep-distilled: no guidance at all

    def prepare(self, cond: Conditioning, *, width: int, height: int, guidance_scale: float) -> Conditioning:
        # the distilled guidance scale as an input (FLUX-dev); schnell's graph has no such input and ignores it
        guidance = np.full((cond.batch,), guidance_scale, np.float32)
        return Conditioning(cond.context, cond.pooled, {**cond.extras, "guidance": guidance})

    def schedule_arguments(self, scheduler_config: Mapping[str, Any], steps: int, latent_shape: tuple) -> dict:
        tokens = (latent_shape[-2] // 2) * (latent_shape[-1] // 2)
        values = [scheduler_config.get(k, d) for k, d in zip(_SHIFT_KEYS, _SHIFT_DEFAULTS)]
        return {"sigmas": np.linspace(1.0, 1 / steps, steps), "mu": calculate_shift(tokens, *values)}

    def denoiser_feeds(self, sample, timestep, cond: Conditioning) -> dict[str, np.ndarray]:
        feeds = {"hidden_states": pack_latents(np.asarray(sample)), "encoder_hidden_states": cond.context,
                 "pooled_projections": cond.pooled,
                 # FluxPipeline passes t / 1000 in float32 (the model multiplies by 1000 inside)
                 "timestep": np.asarray(timestep, np.float32) / np.float32(1000),
                 "img_ids": image_ids(sample.shape[-2], sample.shape[-1]),
                 "txt_ids": text_ids(cond.context.shape[1])}
        if "guidance" in cond.extras:
            feeds["guidance"] = cond.extras["guidance"]
        return feeds

    def prediction(self, outputs, sample: np.ndarray) -> np.ndarray:
        return unpack_latents(outputs[self.denoiser_output], sample.shape[-2], sample.shape[-1])
