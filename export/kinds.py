"""Export wrappers of the component kinds beyond SD 1.x (SDXL's, and the VAE encoder of editing bundles).

The wrappers' forward signatures are the ComponentSpecs of ``runtime/kinds.py`` (Optimum's names):
CLIP text with its penultimate hidden state (and ``text_embeds`` through the projection), the UNet with the
"text_time" added conditions, and the VAE encoder returning the posterior's parameters.
"""
from __future__ import annotations

import torch
from torch import nn


class ClipTextWrapper(nn.Module):
    """input_ids (B, 77) int32 -> text_embeds (B, P), last_hidden_state, hidden_states[-2] with the projection;
    last_hidden_state, pooler_output (B, D), hidden_states[-2] without (Optimum's order)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.with_projection = hasattr(model, "text_projection")

    def forward(self, input_ids):
        out = self.model(input_ids=input_ids.to(torch.int64), output_hidden_states=True, return_dict=True)
        if self.with_projection:
            return out.text_embeds, out.last_hidden_state, out.hidden_states[-2]
        return out.last_hidden_state, out.pooler_output, out.hidden_states[-2]


class TextTimeUNetWrapper(nn.Module):
    """sample, timestep, encoder_hidden_states, text_embeds (B, P), time_ids (B, 6|5) -> out_sample."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.model(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]


class VaeEncoderWrapper(nn.Module):
    """sample (B, 3, H, W) in [-1, 1] -> latent_parameters (B, 2C, H/8, W/8): the posterior's mean and log-variance."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        return self.vae.encode(sample, return_dict=False)[0].parameters
