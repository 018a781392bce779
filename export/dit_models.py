"""Torch wrappers of the DiT families' component kinds, each a forward equal to the kind's ComponentSpec (Optimum's
input and output names): ``clip_text_with_projection`` (CLIPTextModelWithProjection, with the penultimate hidden
state SD3 conditions on), ``t5_encoder`` (T5EncoderModel), ``sd3_transformer`` (SD3Transformer2DModel),
``flux_transformer`` (FluxTransformer2DModel). The VAE decoder is the U-Net families' kind: the runtime applies the
latents' scale and shift (the family's latent format) before the graph, as diffusers' pipelines do before
``vae.decode``.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn


class ClipWithProjectionWrapper(nn.Module):
    """input_ids (B, 77) int32 -> text_embeds (B, P), last_hidden_state (B, 77, D), hidden_states.{N-1} (B, 77, D).

    Optimum's CLIPTextModelWithProjection export names its hidden states ``hidden_states.{i}``; SD3 conditions on
    the penultimate one, so only that one is an output (Optimum exports all N+1)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        out = self.model(input_ids=input_ids.to(torch.int64), output_hidden_states=True, return_dict=True)
        return out.text_embeds, out.last_hidden_state, out.hidden_states[-2]


class T5EncoderWrapper(nn.Module):
    """input_ids (B, L) int32 -> last_hidden_state (B, L, D). No attention mask: SD3 and FLUX run T5 unmasked over
    its padding, as their pipelines do."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids.to(torch.int64), return_dict=True).last_hidden_state


class SD3TransformerWrapper(nn.Module):
    """hidden_states (B, C, h, w), encoder_hidden_states (B, S, D), pooled_projections (B, P), timestep (B,)
    -> out_hidden_states (B, C, h, w): the flow velocity."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
        return self.model(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                          pooled_projections=pooled_projections, timestep=timestep, return_dict=False)[0]


class FluxTransformerWrapper(nn.Module):
    """hidden_states (B, N, 4C) packed 2x2 latents, encoder_hidden_states (B, S, D), pooled_projections (B, P),
    timestep (B,) in [0, 1], img_ids (N, 3), txt_ids (S, 3) [, guidance (B,)] -> out_hidden_states (B, N, 4C).

    ``timestep`` is sigma (FluxPipeline passes t / 1000; the model multiplies by 1000 inside); ``guidance`` is the
    distilled guidance scale itself (FLUX-dev only)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.guidance = bool(model.config.guidance_embeds)

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                guidance=None):
        return self.model(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                          pooled_projections=pooled_projections, timestep=timestep, img_ids=img_ids, txt_ids=txt_ids,
                          guidance=guidance if self.guidance else None, return_dict=False)[0]


DIT_WRAPPERS: dict[str, type[nn.Module]] = {
    "clip_text_with_projection": ClipWithProjectionWrapper,
    "t5_encoder": T5EncoderWrapper,
    "sd3_transformer": SD3TransformerWrapper,
    "flux_transformer": FluxTransformerWrapper,
}


def _rms_norm_symbolic(g, x, normalized_shape, weight, eps):
    """aten::rms_norm (torch.nn.RMSNorm, FLUX's q/k norms) as ONNX ops: x / sqrt(mean(x^2) + eps) * weight.

    The TorchScript exporter has no opset-17 symbolic for it (RMSNormalization is opset 23)."""
    from torch.onnx import symbolic_helper as sh

    axes = list(range(-len(sh._get_const(normalized_shape, "is", "normalized_shape")), 0))
    eps_value = None if sh._is_none(eps) else sh._maybe_get_const(eps, "f")
    if eps_value is None or not isinstance(eps_value, float):
        eps_value = float(torch.finfo(torch.float32).eps)  # torch's default for eps=None
    mean = g.op("ReduceMean", g.op("Mul", x, x), axes_i=axes, keepdims_i=1)
    y = g.op("Div", x, g.op("Sqrt", g.op("Add", mean, g.op("Constant", value_t=torch.tensor(eps_value)))))
    return y if sh._is_none(weight) else g.op("Mul", y, weight)


def register_onnx_symbolics(opset: int = 17) -> None:
    """Symbolics the DiT graphs need beyond the TorchScript exporter's own (idempotent)."""
    torch.onnx.register_custom_op_symbolic("aten::rms_norm", _rms_norm_symbolic, opset)


def _rotary_for_export(x, freqs_cis, use_real: bool = True, use_real_unbind_dim: int = -1, sequence_dim: int = 2):
    """diffusers' ``apply_rotary_emb`` (real form, interleaved pairs) with the pair rotation as a constant matmul.

    The original reshapes ``x`` to (..., D/2, 2); the TorchScript exporter bakes that shape as constants (batch and
    token count), so the graph would run at the traced size only. (x @ R) with R[2i+1, 2i] = -1, R[2i, 2i+1] = 1 is
    the same rotation (exact: one nonzero product per output) and knows no sequence length."""
    if not use_real or use_real_unbind_dim != -1:
        raise NotImplementedError("export patch covers FLUX's rotary embedding (use_real, unbind_dim -1) only")
    cos, sin = freqs_cis  # (S, D)
    if sequence_dim == 1:
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    else:
        cos, sin = cos[None, None, :, :], sin[None, None, :, :]
    d = x.shape[-1]
    rot = torch.zeros(d, d, dtype=torch.float32, device=x.device)
    idx = torch.arange(0, d, 2)
    rot[idx + 1, idx] = -1.0
    rot[idx, idx + 1] = 1.0
    x_rotated = x.float() @ rot
    return (x.float() * cos.to(x.device) + x_rotated * sin.to(x.device)).to(x.dtype)


@contextlib.contextmanager
def export_patches(kind: str):
    """Trace-friendly stand-ins for the export of one component kind (FLUX's rotary embedding)."""
    if kind != "flux_transformer":
        yield
        return
    from diffusers.models.transformers import transformer_flux

    original = transformer_flux.apply_rotary_emb
    transformer_flux.apply_rotary_emb = _rotary_for_export
    try:
        yield
    finally:
        transformer_flux.apply_rotary_emb = original
