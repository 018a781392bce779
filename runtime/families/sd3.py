"""Stable Diffusion 3 / 3.5: CLIP-L and CLIP-G (penultimate layers, pooled projections) and T5-XXL, an MMDiT over
2x2 latent patches, a 16-channel KL VAE with scale and shift, flow matching with a static shift.

Conditioning as diffusers' ``StableDiffusion3Pipeline.encode_prompt`` (0.35.2): the two CLIPs' penultimate hidden
states joined on the feature axis (768 + 1280), zero-padded to T5's width (4096), T5's tokens appended on the
sequence axis (77 + 256 = 333 tokens); pooled = the two text projections joined (768 + 1280 = 2048); CFG with the
negative prompt encoded the same way.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import LdmExportError
from ..spec import ComponentSpec, vae_decoder_spec
from ..spec_dit import clip_with_projection_spec, penultimate_name, sd3_transformer_spec, t5_encoder_spec
from .base import Component, Conditioning, Family, Module, register

CLIP_LENGTH = 77


class TransformerFamily(Family):
    """Shared by the DiT families: a transformer denoiser fed ``hidden_states`` and ``timestep`` each step, flow
    matching, a VAE that diffusers upcasts to fp32 when its config says ``force_upcast``."""

    denoiser = "transformer"
    step_inputs = ("hidden_states", "timestep")
    denoiser_output = "out_hidden_states"
    # tokenizer folder -> "clip" or "t5"
    tokenizer_kinds: tuple[str, ...] = ("clip",)

    def load_tokenizer(self, bundle, name: str):
        kind = dict(zip(self.tokenizers, self.tokenizer_kinds))[name]
        if kind == "t5":
            from ..tokenizer_t5 import T5Tokenizer

            return T5Tokenizer(bundle.path / name, max_length=int(bundle.model["max_length"]))
        from ..tokenizer import ClipTokenizer

        return ClipTokenizer(bundle.path / name, max_length=self.clip_length(bundle.model))

    def clip_length(self, model: Mapping[str, Any]) -> int:
        return CLIP_LENGTH

    @staticmethod
    def latent_profile(configs, resolution: int) -> tuple[int, int, int]:
        side = resolution // 2 ** (len(configs["vae"]["block_out_channels"]) - 1)
        return (max(2, side // 4), side, side * 2)

    def run_text(self, pipe, name: str, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        tokenizer = self.tokenizers[self.text_encoders.index(name)]
        ids = pipe.tokenizers[tokenizer](list(prompts))
        out = pipe.run_component(name, {"input_ids": ids}, batched=["input_ids"])
        return {k: v.astype(np.float32) for k, v in out.items()}


@register
class StableDiffusion3(TransformerFamily):
    name = "sd3"
    description = "Stable Diffusion 3 / 3.5: CLIP-L + CLIP-G + T5-XXL, MMDiT, 16-channel VAE, flow matching"
    modules = (Module("text_encoder", "transformers", "CLIPTextModelWithProjection"),
               Module("text_encoder_2", "transformers", "CLIPTextModelWithProjection"),
               Module("text_encoder_3", "transformers", "T5EncoderModel"),
               Module("transformer", "diffusers", "SD3Transformer2DModel"),
               Module("vae", "diffusers", "AutoencoderKL"))
    components = (Component("text_encoder", "clip_text_with_projection", "text_encoder"),
                  Component("text_encoder_2", "clip_text_with_projection", "text_encoder_2"),
                  Component("text_encoder_3", "t5_encoder", "text_encoder_3"),
                  Component("transformer", "sd3_transformer", "transformer"),
                  Component("vae_decoder", "vae_decoder", "vae", static_batch=1))
    text_encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")
    tokenizers = ("tokenizer", "tokenizer_2", "tokenizer_3")
    tokenizer_classes = ("CLIPTokenizer", "CLIPTokenizer", "T5TokenizerFast")
    tokenizer_kinds = ("clip", "clip", "t5")
    pipeline_class = "StableDiffusion3Pipeline"

    pad_tokens = ("<|endoftext|>", "!", None)  # SD3's CLIP-G tokenizer pads with '!' (id 0); T5's file says its own

    def text_length(self, max_length: int) -> int:
        """The transformer's text tokens: CLIP's 77 then T5's ``max_length``."""
        return CLIP_LENGTH + max_length

    def size_multiple(self, configs) -> int:
        return self.latent_format(configs).vae_scale_factor * int(configs["transformer"].get("patch_size", 2))

    def largest_side(self, configs) -> int | None:
        """SD3's PatchEmbed crops a learned position table of pos_embed_max_size patches a side: no larger latents."""
        t = configs["transformer"]
        if not t.get("pos_embed_max_size"):
            return None
        return int(t["pos_embed_max_size"]) * int(t.get("patch_size", 2)) * self.latent_format(configs).vae_scale_factor

    def component_specs(self, configs, resolution: int, max_length: int) -> dict[str, ComponentSpec]:
        hw = self.latent_profile(configs, resolution)
        lf = self.latent_format(configs)
        t = configs["transformer"]
        specs = {}
        for name in ("text_encoder", "text_encoder_2"):
            c = configs[name]
            specs[name] = clip_with_projection_spec(name, c["hidden_size"], c["projection_dim"],
                                                    c["num_hidden_layers"], CLIP_LENGTH)
        specs["text_encoder_3"] = t5_encoder_spec("text_encoder_3", configs["text_encoder_3"]["d_model"], max_length)
        specs["transformer"] = sd3_transformer_spec(t["in_channels"], t["out_channels"], t["joint_attention_dim"],
                                                    t["pooled_projection_dim"], hw, self.text_length(max_length))
        specs["vae_decoder"] = vae_decoder_spec(lf.channels, hw, lf.vae_scale_factor)
        return specs

    def static_dims(self, component: str, configs, resolution: int, max_length: int) -> dict[str, int]:
        dims = super().static_dims(component, configs, resolution, max_length)
        dims["sequence"] = max_length if component == "text_encoder_3" else CLIP_LENGTH
        dims["text_sequence"] = self.text_length(max_length)
        return dims

    def encode(self, pipe, prompts: Sequence[str]) -> Conditioning:
        configs = pipe.bundle.module_configs
        clip_states, pooled = [], []
        for name in ("text_encoder", "text_encoder_2"):
            out = self.run_text(pipe, name, prompts)
            clip_states.append(out[penultimate_name(configs[name]["num_hidden_layers"])])  # (B, 77, 768 | 1280)
            pooled.append(out["text_embeds"])  # (B, 768 | 1280)
        t5 = self.run_text(pipe, "text_encoder_3", prompts)["last_hidden_state"]  # (B, 256, 4096)
        clip = np.concatenate(clip_states, axis=-1)  # (B, 77, 2048)
        width = t5.shape[-1]
        if clip.shape[-1] > width:
            raise LdmExportError(f"the CLIP features ({clip.shape[-1]}) are wider than T5's ({width}); these text "
                                 "encoders do not belong together")
        clip = np.pad(clip, ((0, 0), (0, 0), (0, width - clip.shape[-1])))
        return Conditioning(np.concatenate([clip, t5], axis=1), np.concatenate(pooled, axis=-1))  # (B, 333, 4096)

    def denoiser_feeds(self, sample, timestep, cond: Conditioning) -> dict[str, np.ndarray]:
        return {"hidden_states": sample, "encoder_hidden_states": cond.context, "pooled_projections": cond.pooled,
                "timestep": timestep}
