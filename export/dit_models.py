"""Torch side of the DiT families: build each component from its zoo config, and one wrapper per component kind
whose forward is the kind's ComponentSpec (Optimum's input and output names).

Kinds: ``clip`` (CLIPTextModel), ``clip_with_projection`` (CLIPTextModelWithProjection, with the penultimate hidden
state SD3 conditions on), ``t5`` (T5EncoderModel), ``sd3_transformer`` (SD3Transformer2DModel),
``flux_transformer`` (FluxTransformer2DModel), and the VAE decoder with the 16-channel latents' shift.
"""
from __future__ import annotations

import torch
from torch import nn

from ldm_export.zoo_dit import CLIP, CLIP_WITH_PROJECTION, FLUX_TRANSFORMER, SD3_TRANSFORMER, T5, DiTSpec


def text_encoder_class(kind: str):
    """The transformers class of a text encoder kind."""
    import transformers

    names = {CLIP: "CLIPTextModel", CLIP_WITH_PROJECTION: "CLIPTextModelWithProjection", T5: "T5EncoderModel"}
    if kind not in names:
        raise ValueError(f"unknown text encoder kind {kind!r}")
    return getattr(transformers, names[kind])


def build_text_encoder(kind: str, config: dict) -> nn.Module:
    """A transformers text encoder of ``kind`` from its config dict, random weights, eval mode."""
    from transformers import CLIPTextConfig, T5Config

    config_cls = T5Config if kind == T5 else CLIPTextConfig
    return text_encoder_class(kind)(config_cls(**config)).eval()


def transformer_class(kind: str):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    return {SD3_TRANSFORMER: SD3Transformer2DModel, FLUX_TRANSFORMER: FluxTransformer2DModel}[kind]


def build_transformer(spec: DiTSpec) -> nn.Module:
    return transformer_class(spec.transformer_kind)(**spec.transformer).eval()


def build_vae(spec: DiTSpec) -> nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL(**spec.vae).eval()


def builders(spec: DiTSpec) -> dict[str, callable]:
    """Module name -> zero-argument builder (the VAE is one module, ``vae``, for the decoder component)."""
    out = {name: (lambda d=d: build_text_encoder(d.kind, d.config)) for name, d in spec.text_encoders.items()}
    out["transformer"] = lambda: build_transformer(spec)
    out["vae"] = lambda: build_vae(spec)
    return out


def build_random(spec: DiTSpec, seed: int = 0) -> dict[str, nn.Module]:
    """The real architecture with random weights (deterministic in ``seed``)."""
    torch.manual_seed(seed)
    return {name: build() for name, build in builders(spec).items()}


# ------------------------------------------------------------------------------------------------- wrappers


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

    def __init__(self, model, guidance: bool):
        super().__init__()
        self.model = model
        self.guidance = guidance

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                guidance=None):
        return self.model(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                          pooled_projections=pooled_projections, timestep=timestep, img_ids=img_ids, txt_ids=txt_ids,
                          guidance=guidance if self.guidance else None, return_dict=False)[0]


class ShiftedVaeDecoderWrapper(nn.Module):
    """latent_sample (B, 16, h, w), already ``latents / scaling_factor + shift_factor`` -> sample (B, 3, 8h, 8w).

    The runtime applies scale and shift (both in the manifest), as diffusers' SD3/FLUX pipelines do before
    ``vae.decode``; the graph is the plain decoder, like Optimum's vae_decoder."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


def wrap(component: str, spec: DiTSpec, modules: dict[str, nn.Module]) -> nn.Module:
    """The export wrapper of one component, chosen by the kind the spec declares for it."""
    if component in spec.text_encoders:
        kind = spec.text_encoders[component].kind
        model = modules[component]
        if kind == CLIP:
            from .models import TextEncoderWrapper

            return TextEncoderWrapper(model).eval()
        if kind == CLIP_WITH_PROJECTION:
            return ClipWithProjectionWrapper(model).eval()
        return T5EncoderWrapper(model).eval()
    if component == "transformer":
        if spec.transformer_kind == SD3_TRANSFORMER:
            return SD3TransformerWrapper(modules["transformer"]).eval()
        return FluxTransformerWrapper(modules["transformer"], spec.guidance_embeds).eval()
    if component == "vae_decoder":
        return ShiftedVaeDecoderWrapper(modules["vae"]).eval()
    raise ValueError(component)


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
