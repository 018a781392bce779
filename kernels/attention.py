"""Fused attention: softmax(Q K^T * scale) V over all heads as one ``com.microsoft::MultiHeadAttention`` node.

Pattern replaced: diffusers' ``AttnProcessor2_0`` core, i.e. per attention block
``view -> transpose -> scaled_dot_product_attention -> transpose -> reshape``, which the TorchScript exporter
turns into Reshape/Transpose/MatMul/Mul(sqrt scale, twice)/Softmax/MatMul/Transpose/Reshape (and, unfused,
materialises the (B, heads, S, S) score matrix: 512 MB per self-attention at 64x64 latents, fp16, batch 2).
Emitted at export time: :class:`FusedAttnProcessor` replaces each ``Attention``'s processor and calls
:class:`MultiHeadAttentionFn`, whose forward computes the same thing in torch (so the traced reference and the
CPU reference agree) and whose ``symbolic`` emits the fused op on (B, S, D) query/key/value.
Emitted op per target: cuda: MultiHeadAttention (flash / memory-efficient attention kernels, fp16); cpu: not
emitted (ONNX Runtime's CPU kernel is fp32 only, and fp16 CPU bundles exist).
"""
from __future__ import annotations

import functools
import logging
import math

import numpy as np

log = logging.getLogger(__name__)

OP = "MultiHeadAttention"
DOMAIN = "com.microsoft"


def attention_ref(query: np.ndarray, key: np.ndarray, value: np.ndarray, num_heads: int,
                  scale: float | None = None) -> np.ndarray:
    """numpy reference of MultiHeadAttention on (B, S, D) query and (B, L, D) key/value -> (B, S, Dv), float64."""
    b, s, d = query.shape
    dv = value.shape[-1]
    hd, hdv = d // num_heads, dv // num_heads
    scale = 1.0 / math.sqrt(hd) if scale is None else scale
    q = query.astype(np.float64).reshape(b, s, num_heads, hd).transpose(0, 2, 1, 3)
    k = key.astype(np.float64).reshape(b, -1, num_heads, hd).transpose(0, 2, 1, 3)
    v = value.astype(np.float64).reshape(b, -1, num_heads, hdv).transpose(0, 2, 1, 3)
    scores = q @ k.transpose(0, 1, 3, 2) * scale  # (B, N, S, L)
    scores -= scores.max(-1, keepdims=True)
    p = np.exp(scores)
    p /= p.sum(-1, keepdims=True)
    return (p @ v).transpose(0, 2, 1, 3).reshape(b, s, dv)


@functools.cache  # the torch.autograd.Function class, built once torch is imported
def _function():
    import torch
    import torch.nn.functional as F

    class MultiHeadAttentionFn(torch.autograd.Function):
        """(B, S, D) q, (B, L, D) k, (B, L, Dv) v -> (B, S, Dv); exports as com.microsoft::MultiHeadAttention."""

        @staticmethod
        def forward(ctx, query, key, value, num_heads: int, scale: float):
            b, s, d = query.shape
            hd, hdv = d // num_heads, value.shape[-1] // num_heads
            q = query.view(b, s, num_heads, hd).transpose(1, 2)
            k = key.view(b, -1, num_heads, hd).transpose(1, 2)
            v = value.view(b, -1, num_heads, hdv).transpose(1, 2)
            out = F.scaled_dot_product_attention(q, k, v, scale=scale)
            return out.transpose(1, 2).reshape(b, s, num_heads * hdv)

        @staticmethod
        def symbolic(g, query, key, value, num_heads: int, scale: float):
            out = g.op(f"{DOMAIN}::{OP}", query, key, value, num_heads_i=int(num_heads), scale_f=float(scale))
            out.setType(query.type())  # (B, S, D): SD's attentions have Dv == D
            return out

    return MultiHeadAttentionFn


def multi_head_attention(query, key, value, num_heads: int, scale: float):
    return _function().apply(query, key, value, num_heads, scale)


class CoreAttnProcessor:
    """diffusers attention processor equal to ``AttnProcessor2_0`` (no masks) with the scaled-dot-product core
    replaced by ``core(query, key, value, heads, scale)``; subclasses name the core and say what they are."""

    what = "this attention"

    @staticmethod
    def core(query, key, value, num_heads: int, scale: float):
        raise NotImplementedError("CoreAttnProcessor needs a subclass that names its attention core")

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if attention_mask is not None:
            raise NotImplementedError(f"{self.what} with an attention mask is not built (SD UNets pass none)")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)  # (B, S, D)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)  # (B, L, D)
        value = attn.to_v(encoder_hidden_states)
        if attn.norm_q is not None or attn.norm_k is not None:
            raise NotImplementedError(f"{self.what} with q/k norms is not built (SD 1.x/2.x have none)")
        head_dim = key.shape[-1] // attn.heads
        scale = attn.scale if getattr(attn, "scale", None) is not None else 1.0 / math.sqrt(head_dim)
        hidden_states = self.core(query, key, value, attn.heads, float(scale)).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class FusedAttnProcessor(CoreAttnProcessor):
    """``AttnProcessor2_0`` with the core as one fused op (no masks)."""

    what = "fused attention"
    core = staticmethod(multi_head_attention)


def install(module, skip_prefixes: tuple[str, ...] = ()) -> list[tuple[object, object]]:
    """Give every diffusers ``Attention`` under ``module`` the fused processor; return (attn, old processor) pairs."""
    from diffusers.models.attention_processor import Attention

    saved = []
    for name, m in module.named_modules():
        if isinstance(m, Attention) and not any(name.startswith(p) or f".{p}" in name for p in skip_prefixes):
            saved.append((m, m.processor))
            m.set_processor(FusedAttnProcessor())
    log.debug("fused attention processor on %d attention blocks", len(saved))
    return saved


def uninstall(saved) -> None:
    for m, proc in saved:
        m.set_processor(proc)
