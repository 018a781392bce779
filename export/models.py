"""Build torch modules from zoo specs (random weights) and wrap each so its forward is its ComponentSpec."""
from __future__ import annotations

import logging

import torch
from torch import nn

from ldm_export.zoo import ModelSpec

log = logging.getLogger(__name__)


def build_text_encoder(spec: ModelSpec):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**spec.text_encoder)).eval()


def build_unet(spec: ModelSpec):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**spec.unet).eval()


def build_vae(spec: ModelSpec):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**spec.vae).eval()


def build_random(spec: ModelSpec, seed: int = 0) -> dict[str, nn.Module]:
    """The real architecture with random weights (deterministic in ``seed``), for exports and benchmarks."""
    torch.manual_seed(seed)
    return {"text_encoder": build_text_encoder(spec), "unet": build_unet(spec), "vae": build_vae(spec)}


class TextEncoderWrapper(nn.Module):
    """input_ids (B, 77) int32 -> last_hidden_state (B, 77, D), pooler_output (B, D)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        out = self.model(input_ids=input_ids.to(torch.int64), return_dict=True)
        return out.last_hidden_state, out.pooler_output


class UNetWrapper(nn.Module):
    """sample (B, 4, h, w), timestep (B,), encoder_hidden_states (B, 77, D) -> out_sample (B, 4, h, w)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.model(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class VaeDecoderWrapper(nn.Module):
    """latent_sample (B, 4, h, w), already divided by the latent scale -> sample (B, 3, 8h, 8w) in [-1, 1]."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


def wrap(component: str, modules: dict[str, nn.Module]) -> nn.Module:
    if component == "text_encoder":
        return TextEncoderWrapper(modules["text_encoder"]).eval()
    if component == "unet":
        return UNetWrapper(modules["unet"]).eval()
    if component == "vae_decoder":
        return VaeDecoderWrapper(modules["vae"]).eval()
    raise ValueError(component)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
