"""SDXL model specs (base, refiner, tiny) with diffusers' configs, torch-free.

Configs are those of stabilityai/stable-diffusion-xl-base-1.0 and -refiner-1.0 as diffusers saves them
(``unet/config.json``, ``text_encoder{,_2}/config.json``, ``vae/config.json``, ``scheduler/scheduler_config.json``),
written out here because nothing is downloaded; the family (``runtime/families/sdxl.py``) says how they run.
"""
from __future__ import annotations

_TOKENS = {"vocab_size": 49408, "max_position_embeddings": 77, "layer_norm_eps": 1e-5, "bos_token_id": 49406,
           "eos_token_id": 49407, "pad_token_id": 1}

# CLIP ViT-L/14 text tower (text_encoder); SDXL reads hidden_states[-2]
CLIP_VIT_L14 = _TOKENS | {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                          "num_attention_heads": 12, "hidden_act": "quick_gelu", "projection_dim": 768}

# OpenCLIP ViT-bigG/14 text tower with its projection (text_encoder_2, CLIPTextModelWithProjection)
OPENCLIP_VIT_BIGG14 = _TOKENS | {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                                 "num_attention_heads": 20, "hidden_act": "gelu", "projection_dim": 1280}

_UNET_COMMON = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "center_input_sample": False, "class_embed_type": None,
    "conv_in_kernel": 3, "conv_out_kernel": 3, "downsample_padding": 1, "dual_cross_attention": False,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-5,
    "norm_num_groups": 32, "num_attention_heads": None, "resnet_time_scale_shift": "default",
    "time_embedding_type": "positional", "upcast_attention": None, "use_linear_projection": True,
}

SDXL_UNET = _UNET_COMMON | {
    "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    # 1280 pooled (text_embeds) + 6 time ids x 256
    "projection_class_embeddings_input_dim": 2816, "sample_size": 128, "transformer_layers_per_block": [1, 2, 10],
}

SDXL_REFINER_UNET = _UNET_COMMON | {
    "attention_head_dim": [6, 12, 24, 24], "block_out_channels": [384, 768, 1536, 1536], "cross_attention_dim": 1280,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    # 1280 pooled + 5 time ids (original size, crop, aesthetic score) x 256
    "projection_class_embeddings_input_dim": 2560, "sample_size": 128, "transformer_layers_per_block": 4,
}

# force_upcast: diffusers' flag for a VAE that overflows fp16; the build keeps such a decoder fp32 (precision.py)
SDXL_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True,
}

SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "steps_offset": 1, "timestep_spacing": "leading",
    "interpolation_type": "linear", "use_karras_sigmas": False, "trained_betas": None, "clip_sample": False,
    "set_alpha_to_one": False, "skip_prk_steps": True, "sample_max_value": 1.0,
}

# The tiny SDXL of diffusers' own pipeline tests (tests/pipelines/stable_diffusion_xl), with a VAE that downsamples
# 8x as the real one (64 px images, 8x8 latents).
TINY_TEXT = _TOKENS | {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 5, "num_attention_heads": 4,
                       "hidden_act": "gelu", "projection_dim": 32}
TINY_UNET = _UNET_COMMON | {
    "block_out_channels": [32, 64], "layers_per_block": 2, "sample_size": 8, "attention_head_dim": [2, 4],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"], "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "addition_time_embed_dim": 8, "transformer_layers_per_block": [1, 2],
    "projection_class_embeddings_input_dim": 80, "cross_attention_dim": 64,  # 32 pooled + 6 x 8; 32 + 32
}
TINY_VAE = SDXL_VAE | {"block_out_channels": [8, 16, 16, 16], "layers_per_block": 1, "norm_num_groups": 8,
                       "sample_size": 64}


def models() -> list:
    """The SDXL-family ModelSpecs of the zoo."""
    from ldm_export.zoo import ModelSpec, inpainting

    specs = [
        ModelSpec(
            name="sdxl", family="sdxl",
            description="Stable Diffusion XL 1.0 base (CLIP ViT-L + OpenCLIP ViT-bigG text, 1024 px, epsilon prediction)",
            text_encoder=dict(CLIP_VIT_L14), unet=SDXL_UNET, vae=SDXL_VAE, scheduler=SDXL_SCHEDULER, resolution=1024,
            extra_configs={"text_encoder_2": dict(OPENCLIP_VIT_BIGG14)},
            params_m={"text_encoder": 123.1, "text_encoder_2": 694.7, "unet": 2567.5, "vae": 83.7},
            defaults={"steps": 30, "guidance_scale": 5.0}),  # StableDiffusionXLPipeline's guidance; TensorRT demo's steps
        ModelSpec(
            name="sdxl-refiner", family="sdxl-refiner",
            description="Stable Diffusion XL 1.0 refiner (OpenCLIP ViT-bigG text, aesthetic score, 1024 px)",
            text_encoder=None, unet=SDXL_REFINER_UNET, vae=SDXL_VAE, scheduler=SDXL_SCHEDULER, resolution=1024,
            extra_configs={"text_encoder_2": dict(OPENCLIP_VIT_BIGG14)},
            params_m={"text_encoder_2": 694.7, "unet": 2259.5, "vae": 83.7},
            defaults={"steps": 30, "guidance_scale": 5.0}),
        ModelSpec(
            name="tiny-sdxl", family="sdxl",
            description="Tiny model of the SDXL classes for tests (two text encoders, text-time UNet; random weights)",
            text_encoder=dict(TINY_TEXT), unet=TINY_UNET, vae=TINY_VAE, scheduler=SDXL_SCHEDULER, resolution=64,
            extra_configs={"text_encoder_2": dict(TINY_TEXT)}),
        ModelSpec(
            name="tiny-sdxl-refiner", family="sdxl-refiner",
            description="Tiny model of the SDXL refiner classes for tests",
            text_encoder=None, unet=TINY_UNET | {"projection_class_embeddings_input_dim": 72,  # 32 + 5 x 8
                                                 "cross_attention_dim": 32},
            vae=TINY_VAE, scheduler=SDXL_SCHEDULER, resolution=64, extra_configs={"text_encoder_2": dict(TINY_TEXT)}),
    ]
    by_name = {m.name: m for m in specs}
    return specs + [
        # diffusers/stable-diffusion-xl-1.0-inpainting-0.1: the base UNet with 9 input channels
        inpainting(by_name["sdxl"], "sdxl-inpaint", "Stable Diffusion XL 1.0 inpainting (the base classes, UNet with 9 "
                                                    "input channels: latents, mask, masked-image latents)"),
        inpainting(by_name["tiny-sdxl"], "tiny-sdxl-inpaint",
                   "Tiny model of the SDXL inpainting classes for tests (UNet with 9 input channels)"),
    ]
