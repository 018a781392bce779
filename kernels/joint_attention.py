"""Fused joint attention of SD3-class MMDiTs: the image and text streams' queries, keys and values joined on the
sequence axis and attended as one ``com.microsoft::MultiHeadAttention`` node (packed heads, (B, S + L, D)).

Pattern replaced: diffusers' ``JointAttnProcessor2_0`` core (per block: two view/transpose triples, optional q/k
RMS norms, a concat on the sequence axis, ``scaled_dot_product_attention``, transpose/reshape, a split), which the
TorchScript exporter turns into ~20 nodes around MatMul/Softmax/MatMul and which materialises the (B, heads,
S + L, S + L) scores: at 1024² with 333 text tokens, 2 x 24 x 4429² fp16 = 1.9 GB per block. Emitted at export time
as :mod:`attention` does (the same autograd function, so torch reference and graph agree); cuda target only.
FLUX's attention (rotary embeddings on q and k) is :mod:`flux_attention`'s.
"""
from __future__ import annotations

import logging
import math

from .attention import multi_head_attention

log = logging.getLogger(__name__)


def joined_qkv(attn, hidden_states, encoder_hidden_states=None):
    """(query, key, value) of diffusers' joint attention: the image tokens' projections (with their q/k norms), the
    text tokens' appended on the sequence axis where ``encoder_hidden_states`` is given; each (B, S [+ L], D)."""
    b, heads = hidden_states.shape[0], attn.heads

    def project(x, to, norm):  # (B, S, D) -> (B, S, D), the per-head RMS norm applied on (B, S, H, hd)
        y = to(x)
        if norm is not None:
            y = norm(y.view(b, -1, heads, y.shape[-1] // heads)).flatten(2)
        return y

    query = project(hidden_states, attn.to_q, attn.norm_q)
    key = project(hidden_states, attn.to_k, attn.norm_k)
    value = attn.to_v(hidden_states)
    if encoder_hidden_states is not None:
        import torch

        query = torch.cat([query, project(encoder_hidden_states, attn.add_q_proj, attn.norm_added_q)], dim=1)
        key = torch.cat([key, project(encoder_hidden_states, attn.add_k_proj, attn.norm_added_k)], dim=1)
        value = torch.cat([value, attn.add_v_proj(encoder_hidden_states)], dim=1)
    return query, key, value


def attention_scale(attn) -> float:
    """The softmax scale of ``attn``: its own, else 1 / sqrt(head size)."""
    if getattr(attn, "scale", None) is not None:
        return float(attn.scale)
    return 1.0 / math.sqrt(attn.to_k.out_features // attn.heads)


class FusedJointAttnProcessor:
    """diffusers ``JointAttnProcessor2_0`` with its attention core as one fused op (no masks)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if attention_mask is not None:
            raise NotImplementedError("fused joint attention with a mask is not built (SD3 passes none)")
        n = hidden_states.shape[1]
        query, key, value = joined_qkv(attn, hidden_states, encoder_hidden_states)
        out = multi_head_attention(query, key, value, attn.heads, attention_scale(attn)).to(query.dtype)  # (B, S + L, D)
        if encoder_hidden_states is not None:
            out, context = out[:, :n], out[:, n:]
            if not attn.context_pre_only:
                context = attn.to_add_out(context)
        out = attn.to_out[1](attn.to_out[0](out))
        return (out, context) if encoder_hidden_states is not None else out


def install(module) -> list[tuple[object, object]]:
    """Give every attention block of ``module`` that runs ``JointAttnProcessor2_0`` the fused processor."""
    from diffusers.models.attention_processor import Attention

    saved = []
    for m in module.modules():
        if isinstance(m, Attention) and type(m.processor).__name__ == "JointAttnProcessor2_0":
            saved.append((m, m.processor))
            m.set_processor(FusedJointAttnProcessor())
    log.debug("fused joint attention on %d blocks", len(saved))
    return saved


def uninstall(saved) -> None:
    for m, proc in saved:
        m.set_processor(proc)
