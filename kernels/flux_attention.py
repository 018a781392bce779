"""Fused attention of FLUX.1-class transformers: each double-stream block's joint text + image attention and each
single-stream block's attention as one ``com.microsoft::MultiHeadAttention`` node, rotary embeddings before it.

Pattern replaced: diffusers' ``FluxAttnProcessor`` core (per block: unflatten to heads, q/k RMS norms, the text
stream's q, k, v joined before the image stream's on the sequence axis, rotary embeddings on q and k, then
``dispatch_attention_fn`` (SDPA) over (B, S + L, heads, head_dim)), which the TorchScript exporter turns into
Transpose/MatMul/Mul/Softmax/MatMul around a (B, heads, S + L, S + L) score matrix: FLUX.1 at 1024² with 512 text
tokens, 24 x 4608² fp16 = 1.0 GB per block and batch row. The rotary embedding stays in standard ops (the
export's constant pair-rotation matmul, ``export/dit_models.py``): ONNX Runtime's ``RotaryEmbedding`` contrib op
reads cos/sin caches by a 1-D position id, while FLUX's cos/sin come from three-axis ids per token. After it the
(B, S + L, heads, head_dim) q, k, v are flattened to (B, S + L, D), a reshape only, and handed to
:func:`attention.multi_head_attention` (the same autograd function as the U-Net's and SD3's attention, so the torch
reference and the graph agree). cuda target only.
"""
from __future__ import annotations

import logging
import math

from .attention import multi_head_attention

log = logging.getLogger(__name__)

REPLACES = "FluxAttnProcessor"


class FusedFluxAttnProcessor:
    """diffusers ``FluxAttnProcessor`` (0.35) with its attention core as one fused op (no masks)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        import torch
        from diffusers.models.transformers import transformer_flux as tf

        if attention_mask is not None:
            raise NotImplementedError("fused FLUX attention with a mask is not built (FluxPipeline passes none)")
        query, key, value, encoder_query, encoder_key, encoder_value = tf._get_qkv_projections(
            attn, hidden_states, encoder_hidden_states)
        heads = attn.heads
        query = attn.norm_q(query.unflatten(-1, (heads, -1)))  # (B, S, heads, head_dim)
        key = attn.norm_k(key.unflatten(-1, (heads, -1)))
        value = value.unflatten(-1, (heads, -1))
        if attn.added_kv_proj_dim is not None:  # double-stream block: text tokens first, as FluxAttnProcessor
            query = torch.cat([attn.norm_added_q(encoder_query.unflatten(-1, (heads, -1))), query], dim=1)
            key = torch.cat([attn.norm_added_k(encoder_key.unflatten(-1, (heads, -1))), key], dim=1)
            value = torch.cat([encoder_value.unflatten(-1, (heads, -1)), value], dim=1)
        if image_rotary_emb is not None:  # looked up at call time: the export swaps in its trace-friendly form
            query = tf.apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = tf.apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        head_dim = query.shape[-1]
        scale = 1.0 / math.sqrt(head_dim)  # SDPA's default, which FluxAttnProcessor uses
        out = multi_head_attention(query.flatten(2), key.flatten(2), value.flatten(2), heads, scale)
        out = out.to(query.dtype)  # (B, L + S, D)
        if encoder_hidden_states is None:
            return out  # single-stream block: its proj_out follows outside the attention
        text = encoder_hidden_states.shape[1]
        context, out = out[:, :text], out[:, text:]
        out = attn.to_out[1](attn.to_out[0](out))
        return out, attn.to_add_out(context)


def install(module) -> list[tuple[object, object]]:
    """Give every attention of ``module`` that runs ``FluxAttnProcessor`` the fused processor."""
    saved = []
    for m in module.modules():
        if hasattr(m, "set_processor") and type(getattr(m, "processor", None)).__name__ == REPLACES:
            saved.append((m, m.processor))
            m.set_processor(FusedFluxAttnProcessor())
    log.debug("fused FLUX attention on %d blocks", len(saved))
    return saved


def uninstall(saved) -> None:
    for m, proc in saved:
        m.set_processor(proc)
