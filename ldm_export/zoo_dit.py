"""DiT model specs (SD3-class MMDiT, FLUX.1-class transformers) with their real configurations, torch-free.

Configs are written here (diffusers ``SD3Transformer2DModel`` / ``FluxTransformer2DModel`` / ``AutoencoderKL``,
transformers ``CLIPTextModel(WithProjection)`` / ``T5EncoderModel``), never fetched, so ``--random-weights`` gives
the real architectures. Modules are named as in diffusers' folders and the families (``runtime/families/sd3.py``,
``flux.py``, ``demo_dit.py``) declare their kinds: ``text_encoder`` (CLIP-L), ``text_encoder_2`` (CLIP-G for SD3,
T5 for FLUX), ``text_encoder_3`` (T5 for SD3), ``transformer``, ``vae``. ``max_length`` is T5's token count (CLIP
always takes 77), or the demo DiT's CLIP length.
"""
from __future__ import annotations

from typing import Any

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


# SD 3.5 medium's "2.5B" counts its 384x384x1536 positional table, a buffer in diffusers: the test counts buffers there
PARAMS_WITH_BUFFERS = {("sd35-medium", "transformer")}


def dit_models(ModelSpec) -> dict[str, Any]:
    """The DiT architectures as zoo ModelSpecs (the class is passed in: zoo.py calls this, no import cycle)."""
    def _sd3(name: str, description: str, clip_l: dict, clip_g: dict, t5: dict, transformer: dict, vae: dict,
             t5_length: int = 256, **kwargs) -> ModelSpec:
        return ModelSpec(name=name, family="sd3", description=description, text_encoder=clip_l, unet=None, vae=vae,
                         scheduler=SD3_SCHEDULER, max_length=t5_length,
                         extra_configs={"text_encoder_2": clip_g, "text_encoder_3": t5, "transformer": transformer},
                         **{"resolution": 1024} | kwargs)


    def _flux(name: str, description: str, clip_l: dict, t5: dict, transformer: dict, vae: dict, scheduler: dict,
              t5_length: int, **kwargs) -> ModelSpec:
        return ModelSpec(name=name, family="flux", description=description, text_encoder=clip_l, unet=None, vae=vae,
                         scheduler=scheduler, max_length=t5_length,
                         extra_configs={"text_encoder_2": t5, "transformer": transformer}, **{"resolution": 1024} | kwargs)


    # Published parameter counts (millions) of the full-size models, by module; tests/test_dit.py builds each on the meta
    # device and compares within 2 % (published figures are rounded: "2B", "12B", "695M").
    # MMDiT "2B" (Stability AI); CLIP-L 123.1 M text tower + 0.6 M projection; OpenCLIP bigG text tower with projection
    # 695 M; T5 v1.1 XXL encoder 4.76 B; FLUX.1 "12B" (Black Forest Labs), 11.9 B in diffusers' count.
    _SD3_TEXT_M = {"text_encoder": 123.7, "text_encoder_2": 695.0, "text_encoder_3": 4760.0}
    _FLUX_TEXT_M = {"text_encoder": 123.1, "text_encoder_2": 4760.0}

    SD3_MEDIUM = _sd3("sd3-medium", "Stable Diffusion 3 medium (MMDiT 2B; CLIP-L + CLIP-G penultimate + T5-XXL; "
                      "16-channel VAE; flow matching, shift 3)", CLIP_L, CLIP_G, T5_XXL, SD3_MEDIUM_TRANSFORMER, SD3_VAE,
                      params_m={"transformer": 2000.0, **_SD3_TEXT_M},
                      defaults={"steps": 28, "guidance_scale": 7.0})  # StableDiffusion3Pipeline's
    SD35_MEDIUM = _sd3("sd35-medium", "Stable Diffusion 3.5 medium (MMDiT-X 2.5B: the SD3 class with dual attention in "
                       "13 blocks and RMS q/k norms)", CLIP_L, CLIP_G, T5_XXL, SD35_MEDIUM_TRANSFORMER, SD3_VAE,
                       params_m={"transformer": 2500.0, **_SD3_TEXT_M},
                       defaults={"steps": 40, "guidance_scale": 4.5})  # Stability AI's model card
    FLUX_SCHNELL = _flux("flux-schnell", "FLUX.1 [schnell] (12B rectified-flow transformer, 19 double + 38 single "
                         "blocks; CLIP-L pooled + T5-XXL; packed 2x2 latents; timestep-distilled, no CFG)", CLIP_L, T5_XXL,
                         FLUX_TRANSFORMER_CONFIG, FLUX_VAE, FLUX_SCHNELL_SCHEDULER, 256,
                         params_m={"transformer": 11900.0, **_FLUX_TEXT_M},
                         defaults={"steps": 4, "guidance_scale": 0.0})  # timestep-distilled: 4 steps, no guidance
    FLUX_DEV = _flux("flux-dev", "FLUX.1 [dev] (the FLUX.1 transformer with its guidance embedding: distilled guidance "
                     "as an input; T5 up to 512 tokens; resolution-dependent shift)", CLIP_L, T5_XXL,
                     FLUX_TRANSFORMER_CONFIG | {"guidance_embeds": True}, FLUX_VAE, FLUX_DEV_SCHEDULER, 512,
                     params_m={"transformer": 11900.0, **_FLUX_TEXT_M},
                     defaults={"steps": 28, "guidance_scale": 3.5})  # FluxPipeline's

    # ------------------------------------------------------------------------------------------------- tiny models

    _TINY_CLIP = _CLIP_IDS | {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                              "num_attention_heads": 4, "hidden_act": "quick_gelu", "projection_dim": 32}
    _TINY_CLIP_G = _TINY_CLIP | {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3,
                                 "num_attention_heads": 2, "hidden_act": "gelu", "projection_dim": 32}
    _TINY_T5 = T5_XXL | {"vocab_size": 1000, "d_model": 64, "d_kv": 16, "d_ff": 96, "num_layers": 2, "num_heads": 4}
    _TINY_VAE = _VAE_16CH | {"sample_size": 64, "layers_per_block": 1, "norm_num_groups": 8,
                             "block_out_channels": [8, 16, 16, 16]}

    # CLIP-L + CLIP-G widths (32 + 32) fit in T5's 64: SD3 pads the CLIP features up to T5's width
    TINY_SD3 = _sd3("tiny-sd3", "Tiny model of the SD3 classes for tests (a few MB, random weights)", _TINY_CLIP,
                    _TINY_CLIP_G, _TINY_T5,
                    SD3_MEDIUM_TRANSFORMER | {"sample_size": 8, "num_layers": 2, "attention_head_dim": 8,
                                              "num_attention_heads": 4, "joint_attention_dim": 64,
                                              "caption_projection_dim": 32, "pooled_projection_dim": 64,
                                              "pos_embed_max_size": 16},
                    _TINY_VAE | {"scaling_factor": 1.5305, "shift_factor": 0.0609}, t5_length=16, resolution=64)
    TINY_FLUX = _flux("tiny-flux", "Tiny model of the FLUX.1 classes for tests (a few MB, random weights; guidance "
                      "embedding as FLUX-dev)", _TINY_CLIP, _TINY_T5,
                      FLUX_TRANSFORMER_CONFIG | {"num_layers": 1, "num_single_layers": 2, "attention_head_dim": 16,
                                                 "num_attention_heads": 2, "joint_attention_dim": 64,
                                                 "pooled_projection_dim": 32, "axes_dims_rope": [4, 6, 6],
                                                 "guidance_embeds": True},
                      _TINY_VAE | {"scaling_factor": 0.3611, "shift_factor": 0.1159}, FLUX_DEV_SCHEDULER, 16, resolution=64)


    def _demo_dit_spec() -> ModelSpec:
        from ldm_export.demo import config as demo
        from ldm_export.demo import dit_config as dit

        return ModelSpec(
            name="demo-dit", family="demo-dit",
            description="Embedded demo DiT: an SD3-class MMDiT trained by this project by flow matching on generated "
                        "coloured shapes (64 px, 8x8 latents), with the demo model's CLIP text encoder and VAE",
            text_encoder=dict(demo.TEXT_ENCODER), unet=None, vae=dict(demo.VAE), scheduler=dict(dit.SCHEDULER),
            defaults={"steps": dit.DEFAULT_STEPS, "guidance_scale": dit.DEFAULT_GUIDANCE},
            resolution=dit.RESOLUTION, max_length=dit.MAX_LENGTH, embedded_weights=dit.EMBEDDED_WEIGHTS,
            extra_configs={"transformer": dict(dit.TRANSFORMER)},
        )


    DIT_MODELS: dict[str, ModelSpec] = {m.name: m for m in (SD3_MEDIUM, SD35_MEDIUM, FLUX_SCHNELL, FLUX_DEV, TINY_SD3,
                                                             TINY_FLUX, _demo_dit_spec())}
    return DIT_MODELS
