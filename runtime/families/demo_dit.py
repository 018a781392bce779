"""The embedded demo DiT: an SD3-class MMDiT trained by this project, conditioned by one CLIP (the demo U-Net
model's): its last hidden state over 32 tokens as context and its pooler output as the pooled vector; CFG; the
demo model's 4-channel VAE (no shift)."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from ..spec import ComponentSpec, text_encoder_spec, vae_decoder_spec
from ..spec_dit import sd3_transformer_spec
from .base import Component, Conditioning, Module, register
from .sd3 import StableDiffusion3


@register
class DemoDiT(StableDiffusion3):
    name = "demo-dit"
    description = "Embedded demo DiT: one CLIP, an SD3-class MMDiT, the demo model's VAE, flow matching"
    modules = (Module("text_encoder", "transformers", "CLIPTextModel"),
               Module("transformer", "diffusers", "SD3Transformer2DModel"),
               Module("vae", "diffusers", "AutoencoderKL"))
    components = (Component("text_encoder", "clip_text", "text_encoder"),
                  Component("transformer", "sd3_transformer", "transformer"),
                  Component("vae_decoder", "vae_decoder", "vae", static_batch=1))
    text_encoders = ("text_encoder",)
    tokenizers = ("tokenizer",)
    tokenizer_classes = ("CLIPTokenizer",)
    tokenizer_kinds = ("clip",)
    pad_token = "<|endoftext|>"

    pad_tokens = ("<|endoftext|>",)

    def clip_length(self, model: Mapping[str, Any]) -> int:
        return int(model["max_length"])  # 32: every caption of the data fits

    def text_length(self, max_length: int) -> int:
        return max_length

    def component_specs(self, configs, resolution: int, max_length: int) -> dict[str, ComponentSpec]:
        hw = self.latent_profile(configs, resolution)
        lf = self.latent_format(configs)
        t = configs["transformer"]
        return {
            "text_encoder": text_encoder_spec(configs["text_encoder"]["hidden_size"], max_length),
            "transformer": sd3_transformer_spec(t["in_channels"], t["out_channels"], t["joint_attention_dim"],
                                                t["pooled_projection_dim"], hw, max_length),
            "vae_decoder": vae_decoder_spec(lf.channels, hw, lf.vae_scale_factor),
        }

    def static_dims(self, component: str, configs, resolution: int, max_length: int) -> dict[str, int]:
        dims = super(StableDiffusion3, self).static_dims(component, configs, resolution, max_length)
        dims["text_sequence"] = max_length
        return dims

    def encode(self, pipe, prompts: Sequence[str]) -> Conditioning:
        out = self.run_text(pipe, "text_encoder", prompts)
        return Conditioning(out["last_hidden_state"], out["pooler_output"])  # (B, 32, 64), (B, 64)
