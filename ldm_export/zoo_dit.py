"""DiT model specs (SD3-class MMDiT, FLUX.1-class transformers) with their real configurations, torch-free.

Configs are written here (diffusers ``SD3Transformer2DModel`` / ``FluxTransformer2DModel`` / ``AutoencoderKL``,
transformers ``CLIPTextModel(WithProjection)`` / ``T5EncoderModel``), never fetched, so ``--random-weights`` gives
the real architectures. Each text encoder is declared with its *component kind* (the export wrapper and I/O
contract it gets) and its tokenizer; components are named as in diffusers' and Optimum's folders:
``text_encoder`` (CLIP-L), ``text_encoder_2`` (CLIP-G for SD3, T5 for FLUX), ``text_encoder_3`` (T5 for SD3),
``transformer``, ``vae_decoder``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ldm_export.runtime.errors import LdmExportError
from ldm_export.runtime.spec import ComponentSpec, text_encoder_spec, vae_decoder_spec
from ldm_export.runtime.spec_dit import (clip_with_projection_spec, flux_transformer_spec, sd3_transformer_spec,
                                         t5_encoder_spec)

# component kinds of the DiT families (the U-Net families add "clip", "unet", "vae_decoder")
CLIP = "clip"  # CLIPTextModel: last_hidden_state, pooler_output
CLIP_WITH_PROJECTION = "clip_with_projection"  # CLIPTextModelWithProjection: text_embeds, hidden states
T5 = "t5"  # T5EncoderModel: last_hidden_state
SD3_TRANSFORMER = "sd3_transformer"
FLUX_TRANSFORMER = "flux_transformer"


@dataclass(frozen=True)
class TextEncoderDecl:
    """One text encoder of a family: its component kind, its transformers config and its tokenizer."""

    kind: str  # CLIP, CLIP_WITH_PROJECTION or T5
    config: dict[str, Any]
    max_length: int  # tokens the family feeds it (CLIP 77; T5 256 for SD3 and FLUX-schnell, 512 for FLUX-dev)
    tokenizer: str  # "clip" or "t5"


@dataclass(frozen=True)
class DiTSpec:
    name: str
    family: str  # "sd3", "flux", "demo-dit"
    description: str
    text_encoders: dict[str, TextEncoderDecl]  # component name -> declaration, in the family's order
    transformer_kind: str  # SD3_TRANSFORMER or FLUX_TRANSFORMER
    transformer: dict[str, Any]
    vae: dict[str, Any]  # AutoencoderKL config, with scaling_factor and shift_factor
    scheduler: dict[str, Any]  # FlowMatchEulerDiscreteScheduler config, with _class_name
    resolution: int
    # published parameter counts (millions) the configs must reproduce (tests/test_dit_zoo.py, within 1.5 %)
    params_m: dict[str, float] = field(default_factory=dict)
    # components whose published count includes persistent buffers (SD3.5's 384x384 positional table)
    params_with_buffers: tuple[str, ...] = ()
    embedded_weights: str | None = None
    default_steps: int = 28  # diffusers' pipeline defaults
    default_guidance: float = 7.0

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae["block_out_channels"]) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae["latent_channels"])

    @property
    def latent_scale(self) -> float:
        return float(self.vae.get("scaling_factor", 1.0))

    @property
    def latent_shift(self) -> float:
        return float(self.vae.get("shift_factor") or 0.0)

    @property
    def latent_side(self) -> int:
        return self.resolution // self.vae_scale_factor

    @property
    def components(self) -> tuple[str, ...]:
        return (*self.text_encoders, "transformer", "vae_decoder")

    @property
    def text_length(self) -> int:
        """Tokens of the transformer's text stream: SD3 joins CLIP's 77 and T5's; FLUX takes T5's alone."""
        t5 = [d.max_length for d in self.text_encoders.values() if d.kind == T5]
        if self.transformer_kind == FLUX_TRANSFORMER:
            return t5[0]
        clip = max(d.max_length for d in self.text_encoders.values() if d.kind != T5)
        return clip + (t5[0] if t5 else 0)

    def component_specs(self) -> dict[str, ComponentSpec]:
        """The I/O contract of every component, symbolic in batch and latent size."""
        side = self.latent_side
        hw = (max(2, side // 4), side, side * 2)
        specs: dict[str, ComponentSpec] = {}
        for name, d in self.text_encoders.items():
            c = d.config
            if d.kind == CLIP:
                s = text_encoder_spec(c["hidden_size"], d.max_length)
            elif d.kind == CLIP_WITH_PROJECTION:
                s = clip_with_projection_spec(name, c["hidden_size"], c["projection_dim"], c["num_hidden_layers"],
                                              d.max_length)
            else:
                s = t5_encoder_spec(name, c["d_model"], d.max_length)
            specs[name] = ComponentSpec(name, s.inputs, s.outputs, s.profile)
        t = self.transformer
        if self.transformer_kind == SD3_TRANSFORMER:
            specs["transformer"] = sd3_transformer_spec(t["in_channels"], t["out_channels"], t["joint_attention_dim"],
                                                        t["pooled_projection_dim"], hw, self.text_length)
        else:
            specs["transformer"] = flux_transformer_spec(t["in_channels"], t["joint_attention_dim"],
                                                         t["pooled_projection_dim"], hw, self.text_length,
                                                         self.guidance_embeds)
        specs["vae_decoder"] = vae_decoder_spec(self.latent_channels, hw, self.vae_scale_factor)
        return specs

    @property
    def guidance_embeds(self) -> bool:
        """FLUX-dev's distilled guidance: the transformer takes the guidance scale as an input, no CFG batch."""
        return bool(self.transformer.get("guidance_embeds", False))


# ------------------------------------------------------------------------------------------------- encoders

_CLIP_IDS = {"bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1, "max_position_embeddings": 77,
             "vocab_size": 49408, "layer_norm_eps": 1e-5}
# OpenAI CLIP ViT-L/14 text tower (SD3's text_encoder, FLUX's text_encoder)
CLIP_L = _CLIP_IDS | {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                      "num_attention_heads": 12, "hidden_act": "quick_gelu", "projection_dim": 768}
# OpenCLIP ViT-bigG/14 text tower with its projection (SD3's and SDXL's text_encoder_2)
CLIP_G = _CLIP_IDS | {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                      "num_attention_heads": 20, "hidden_act": "gelu", "projection_dim": 1280}
# google/t5-v1_1-xxl encoder (SD3's text_encoder_3, FLUX's text_encoder_2)
T5_XXL = {"vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
          "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128, "dropout_rate": 0.1,
          "layer_norm_epsilon": 1e-6, "feed_forward_proj": "gated-gelu", "is_encoder_decoder": True,
          "tie_word_embeddings": False, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0}

# ------------------------------------------------------------------------------------------------- VAEs

_VAE_16CH = {"in_channels": 3, "out_channels": 3, "latent_channels": 16, "layers_per_block": 2,
             "norm_num_groups": 32, "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
             "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
             "use_quant_conv": False, "use_post_quant_conv": False, "force_upcast": True, "mid_block_add_attention": True}
SD3_VAE = _VAE_16CH | {"sample_size": 1024, "scaling_factor": 1.5305, "shift_factor": 0.0609}
FLUX_VAE = _VAE_16CH | {"sample_size": 1024, "scaling_factor": 0.3611, "shift_factor": 0.1159}

# ------------------------------------------------------------------------------------------------- transformers

SD3_MEDIUM_TRANSFORMER = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16,
                          "num_layers": 24, "attention_head_dim": 64, "num_attention_heads": 24,
                          "joint_attention_dim": 4096, "caption_projection_dim": 1536, "pooled_projection_dim": 2048,
                          "pos_embed_max_size": 192, "dual_attention_layers": [], "qk_norm": None}
# SD 3.5 medium: the same class with other values (MMDiT-X: self-attention in the first 13 blocks, RMS qk-norm)
SD35_MEDIUM_TRANSFORMER = SD3_MEDIUM_TRANSFORMER | {"pos_embed_max_size": 384, "qk_norm": "rms_norm",
                                                    "dual_attention_layers": list(range(13))}
FLUX_TRANSFORMER_CONFIG = {"patch_size": 1, "in_channels": 64, "out_channels": None, "num_layers": 19,
                           "num_single_layers": 38, "attention_head_dim": 128, "num_attention_heads": 24,
                           "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": False,
                           "axes_dims_rope": [16, 56, 56]}

# ------------------------------------------------------------------------------------------------- schedulers

_FLOW = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000}
SD3_SCHEDULER = _FLOW | {"shift": 3.0}
# FLUX's resolution-dependent shift: mu from the packed token count, linear from (256, 0.5) to (4096, 1.15)
_FLUX_SHIFTING = {"base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15}
FLUX_SCHNELL_SCHEDULER = _FLOW | _FLUX_SHIFTING | {"shift": 1.0, "use_dynamic_shifting": False}
FLUX_DEV_SCHEDULER = _FLOW | _FLUX_SHIFTING | {"shift": 3.0, "use_dynamic_shifting": True}


def _sd3_encoders(clip_l: dict, clip_g: dict, t5: dict, t5_length: int = 256) -> dict[str, TextEncoderDecl]:
    return {"text_encoder": TextEncoderDecl(CLIP_WITH_PROJECTION, clip_l, 77, "clip"),
            "text_encoder_2": TextEncoderDecl(CLIP_WITH_PROJECTION, clip_g, 77, "clip"),
            "text_encoder_3": TextEncoderDecl(T5, t5, t5_length, "t5")}


def _flux_encoders(clip_l: dict, t5: dict, t5_length: int) -> dict[str, TextEncoderDecl]:
    return {"text_encoder": TextEncoderDecl(CLIP, clip_l, 77, "clip"),
            "text_encoder_2": TextEncoderDecl(T5, t5, t5_length, "t5")}


SD3_MEDIUM = DiTSpec(
    name="sd3-medium", family="sd3",
    description="Stable Diffusion 3 medium (MMDiT 2B; CLIP-L + CLIP-G penultimate + T5-XXL; 16-channel VAE; flow "
                "matching, shift 3)",
    text_encoders=_sd3_encoders(CLIP_L, CLIP_G, T5_XXL), transformer_kind=SD3_TRANSFORMER,
    transformer=SD3_MEDIUM_TRANSFORMER, vae=SD3_VAE, scheduler=SD3_SCHEDULER, resolution=1024,
    # published: MMDiT "2B" (Stability AI); CLIP-L 123.1 M text tower + 0.6 M projection; OpenCLIP bigG text tower
    # with projection 695 M; T5 v1.1 XXL encoder 4.76 B
    params_m={"transformer": 2000.0, "text_encoder": 123.7, "text_encoder_2": 695.0, "text_encoder_3": 4760.0},
)
SD35_MEDIUM = DiTSpec(
    name="sd35-medium", family="sd3",
    description="Stable Diffusion 3.5 medium (MMDiT-X 2.5B; the SD3 class with dual attention in 13 blocks)",
    text_encoders=_sd3_encoders(CLIP_L, CLIP_G, T5_XXL), transformer_kind=SD3_TRANSFORMER,
    transformer=SD35_MEDIUM_TRANSFORMER, vae=SD3_VAE, scheduler=SD3_SCHEDULER, resolution=1024,
    # published: "2.5B" (Stability AI), which counts the 384x384x1536 positional table (a buffer in diffusers)
    params_m={"transformer": 2500.0, "text_encoder": 123.7, "text_encoder_2": 695.0, "text_encoder_3": 4760.0},
    params_with_buffers=("transformer",),
)
FLUX_SCHNELL = DiTSpec(
    name="flux-schnell", family="flux",
    description="FLUX.1 [schnell] (12B rectified-flow transformer, 19 double + 38 single blocks; CLIP-L pooled + "
                "T5-XXL; packed 2x2 latents; timestep-distilled, no CFG)",
    text_encoders=_flux_encoders(CLIP_L, T5_XXL, 256), transformer_kind=FLUX_TRANSFORMER,
    transformer=FLUX_TRANSFORMER_CONFIG, vae=FLUX_VAE, scheduler=FLUX_SCHNELL_SCHEDULER, resolution=1024,
    # published: FLUX.1 "12B" (Black Forest Labs), 11.9 B in diffusers' count; CLIP-L text 123.1 M; T5 4.76 B
    params_m={"transformer": 11900.0, "text_encoder": 123.1, "text_encoder_2": 4760.0},
    default_steps=4, default_guidance=0.0,
)
FLUX_DEV = DiTSpec(
    name="flux-dev", family="flux",
    description="FLUX.1 [dev] (the FLUX.1 transformer with its guidance embedding: distilled guidance as an input; "
                "T5 up to 512 tokens; resolution-dependent shift)",
    text_encoders=_flux_encoders(CLIP_L, T5_XXL, 512), transformer_kind=FLUX_TRANSFORMER,
    transformer=FLUX_TRANSFORMER_CONFIG | {"guidance_embeds": True}, vae=FLUX_VAE, scheduler=FLUX_DEV_SCHEDULER,
    resolution=1024,
    params_m={"transformer": 11900.0, "text_encoder": 123.1, "text_encoder_2": 4760.0}, default_guidance=3.5,
)

# ------------------------------------------------------------------------------------------------- tiny models

_TINY_CLIP = _CLIP_IDS | {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "hidden_act": "quick_gelu", "projection_dim": 32}
_TINY_CLIP_G = _TINY_CLIP | {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3,
                             "num_attention_heads": 2, "hidden_act": "gelu", "projection_dim": 32}
_TINY_T5 = T5_XXL | {"vocab_size": 1000, "d_model": 64, "d_kv": 16, "d_ff": 96, "num_layers": 2, "num_heads": 4}
_TINY_VAE = _VAE_16CH | {"sample_size": 64, "layers_per_block": 1, "norm_num_groups": 8,
                         "block_out_channels": [8, 16, 16, 16]}

TINY_SD3 = DiTSpec(
    name="tiny-sd3", family="sd3", description="Tiny model of the SD3 classes for tests (a few MB, random weights)",
    # CLIP-L + CLIP-G widths (32 + 32) fit in T5's 64: SD3 pads the CLIP features up to T5's width
    text_encoders=_sd3_encoders(_TINY_CLIP, _TINY_CLIP_G, _TINY_T5, t5_length=16),
    transformer_kind=SD3_TRANSFORMER,
    transformer=SD3_MEDIUM_TRANSFORMER | {"sample_size": 8, "num_layers": 2, "attention_head_dim": 8,
                                          "num_attention_heads": 4, "joint_attention_dim": 64,
                                          "caption_projection_dim": 32, "pooled_projection_dim": 64,
                                          "pos_embed_max_size": 16},
    vae=_TINY_VAE | {"scaling_factor": 1.5305, "shift_factor": 0.0609}, scheduler=SD3_SCHEDULER, resolution=64,
)
TINY_FLUX = DiTSpec(
    name="tiny-flux", family="flux", description="Tiny model of the FLUX.1 classes for tests (a few MB, random "
                                                 "weights; guidance embedding as FLUX-dev)",
    text_encoders=_flux_encoders(_TINY_CLIP, _TINY_T5, 16), transformer_kind=FLUX_TRANSFORMER,
    transformer=FLUX_TRANSFORMER_CONFIG | {"num_layers": 1, "num_single_layers": 2, "attention_head_dim": 16,
                                           "num_attention_heads": 2, "joint_attention_dim": 64,
                                           "pooled_projection_dim": 32, "axes_dims_rope": [4, 6, 6],
                                           "guidance_embeds": True},
    vae=_TINY_VAE | {"scaling_factor": 0.3611, "shift_factor": 0.1159}, scheduler=FLUX_DEV_SCHEDULER, resolution=64,
    default_guidance=3.5,
)


def _demo_dit_spec() -> DiTSpec:
    from ldm_export.demo import config as demo
    from ldm_export.demo import dit_config as dit

    return DiTSpec(
        name="demo-dit", family="demo-dit",
        description="Embedded demo DiT: an SD3-class MMDiT trained by this project by flow matching on generated "
                    "coloured shapes (64 px, 8x8 latents), with the demo model's CLIP text encoder and VAE",
        text_encoders={"text_encoder": TextEncoderDecl(CLIP, dict(demo.TEXT_ENCODER), dit.MAX_LENGTH, "clip")},
        transformer_kind=SD3_TRANSFORMER, transformer=dict(dit.TRANSFORMER), vae=dict(demo.VAE),
        scheduler=dict(dit.SCHEDULER), resolution=dit.RESOLUTION, embedded_weights=dit.EMBEDDED_WEIGHTS,
        default_steps=dit.DEFAULT_STEPS, default_guidance=dit.DEFAULT_GUIDANCE,
    )


DIT_MODELS: dict[str, DiTSpec] = {m.name: m for m in (SD3_MEDIUM, SD35_MEDIUM, FLUX_SCHNELL, FLUX_DEV, TINY_SD3,
                                                       TINY_FLUX, _demo_dit_spec())}


def get_dit_model(name: str) -> DiTSpec:
    try:
        return DIT_MODELS[name]
    except KeyError:
        raise LdmExportError(f"unknown DiT model '{name}'; known: {', '.join(sorted(DIT_MODELS))}") from None
