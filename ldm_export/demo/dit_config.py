"""Configurations of the embedded demo DiT, torch-free: the zoo's ``demo-dit`` spec and ``train_dit`` read these.

An MMDiT of SD3's class (diffusers ``SD3Transformer2DModel``, joint attention over text and image tokens) trained
by flow matching on the demo's 8x8x4 latents. It reuses the demo U-Net model's VAE and CLIP text encoder, frozen:
the text encoder was trained with that U-Net, so its embeddings already separate colour, shape and position.
"""
from __future__ import annotations

from ldm_export.demo import config as demo

RESOLUTION = demo.RESOLUTION  # 64 px, 8x8 latents
# CLIP's causal mask makes the first 32 outputs of a 77-token run equal to a 32-token run, and every caption of the
# data (at most 20 tokens with bos/eos) fits: the DiT attends over 32 text tokens, not 77.
MAX_LENGTH = 32
EMBEDDED_WEIGHTS = "assets/demo_dit"  # transformer/ and scheduler/; text encoder, VAE, tokenizer from assets/demo

# diffusers SD3Transformer2DModel config. Patch 1: 64 image tokens, one per latent pixel (2x2 patches would give a
# 4x4 grid, too coarse for the shape the checker reads). pooled_projections is the CLIP pooler output (64).
TRANSFORMER = {
    "sample_size": RESOLUTION // 8, "patch_size": 1, "in_channels": 4, "out_channels": 4,
    "num_layers": 6, "attention_head_dim": 32, "num_attention_heads": 4,
    "joint_attention_dim": demo.TEXT_ENCODER["hidden_size"], "caption_projection_dim": 128,
    "pooled_projection_dim": demo.TEXT_ENCODER["hidden_size"], "pos_embed_max_size": RESOLUTION // 8,
    "qk_norm": "rms_norm", "dual_attention_layers": [],
}

# diffusers FlowMatchEulerDiscreteScheduler config (SD3's class); train_dit.py trains sigmas from a logit-normal
# distribution, as SD3 does; the shift is chosen by the adherence table (8x8 latents need none of SD3's 3.0).
SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0}

DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 5.0
