"""Configurations of the embedded demo model, torch-free: the zoo's DEMO spec and the trainer both read these.

The classes are Stable Diffusion 1.x's (CLIPTextModel, UNet2DConditionModel with cross-attention,
AutoencoderKL with 8x downsampling and 4 latent channels), only much smaller, for 64x64 images.
"""
from __future__ import annotations

RESOLUTION = 64  # pixels; latents are 8x8
MAX_LENGTH = 77
EMBEDDED_WEIGHTS = "assets/demo"  # relative to the ldm_export package

# transformers CLIPTextConfig kwargs: the real CLIP vocabulary and ids, a small transformer
TEXT_ENCODER = {
    "vocab_size": 49408, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 3,
    "num_attention_heads": 4, "max_position_embeddings": MAX_LENGTH, "hidden_act": "quick_gelu",
    "projection_dim": 64, "layer_norm_eps": 1e-5, "bos_token_id": 49406, "eos_token_id": 49407,
    "pad_token_id": 49407,
}

# diffusers UNet2DConditionModel config
UNET = {
    "sample_size": RESOLUTION // 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
    "block_out_channels": [64, 128, 128],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": TEXT_ENCODER["hidden_size"], "attention_head_dim": 8,
    "act_fn": "silu", "center_input_sample": False, "downsample_padding": 1, "flip_sin_to_cos": True,
    "freq_shift": 0, "mid_block_scale_factor": 1, "norm_eps": 1e-5, "norm_num_groups": 32,
}

# diffusers AutoencoderKL config; train.py measures scaling_factor after training the VAE (this is the shipped value)
VAE = {
    "sample_size": RESOLUTION, "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "layers_per_block": 1, "norm_num_groups": 16, "act_fn": "silu",
    "block_out_channels": [32, 64, 64, 64],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "scaling_factor": 0.5212063193321228,  # measured by train.py: 1 / std of the latents over 4096 images
}

# diffusers scheduler_config.json: SD's training schedule, sampled with Euler by default. The keys of the other
# samplers (clip_sample, set_alpha_to_one, skip_prk_steps) are part of the schedule, as in SD's own configs: without
# them switching to DDIM/DDPM/PLMS takes diffusers' defaults (clip_sample=True clips the latents to [-1, 1]).
SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
    "steps_offset": 1, "timestep_spacing": "leading", "interpolation_type": "linear",
    "use_karras_sigmas": False, "trained_betas": None,
    "clip_sample": False, "set_alpha_to_one": False, "skip_prk_steps": True,
}

DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 7.5
