"""FLUX latent packing and position ids in numpy, as diffusers' ``FluxPipeline`` makes them (0.35.2).

Latents (B, C, H, W) become (B, (H/2)(W/2), 4C) tokens, one per 2x2 patch, channels ordered (c, dy, dx); each
image token's id is (0, row, col) of its patch and every text token's id is (0, 0, 0): the transformer's rotary
embedding reads them over axes of (16, 56, 56) dims.
"""
from __future__ import annotations

import numpy as np

from .errors import LdmExportError


def pack_latents(latents: np.ndarray) -> np.ndarray:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): diffusers ``FluxPipeline._pack_latents``."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise LdmExportError(f"FLUX packs 2x2 latent patches: latent height and width must be even, got {h}x{w}; "
                             "use an image size that is a multiple of 16")
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2)
    return x.transpose(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: np.ndarray, height: int, width: int) -> np.ndarray:
    """(B, h/2 * w/2, 4C) -> (B, C, h, w) for latent size h x w: diffusers ``FluxPipeline._unpack_latents``."""
    b, n, d = tokens.shape
    if n != (height // 2) * (width // 2) or d % 4:
        raise LdmExportError(f"cannot unpack {tokens.shape} tokens into {height}x{width} latents")
    x = tokens.reshape(b, height // 2, width // 2, d // 4, 2, 2)
    return x.transpose(0, 3, 1, 4, 2, 5).reshape(b, d // 4, height, width)


def image_ids(height: int, width: int) -> np.ndarray:
    """(h/2 * w/2, 3) float32 ids (0, row, col) of the packed tokens of h x w latents:
    diffusers ``FluxPipeline._prepare_latent_image_ids``."""
    ids = np.zeros((height // 2, width // 2, 3), np.float32)
    ids[..., 1] = np.arange(height // 2, dtype=np.float32)[:, None]
    ids[..., 2] = np.arange(width // 2, dtype=np.float32)[None, :]
    return ids.reshape(-1, 3)


def text_ids(length: int) -> np.ndarray:
    """(L, 3) zeros: FLUX gives every text token position (0, 0, 0)."""
    return np.zeros((length, 3), np.float32)
