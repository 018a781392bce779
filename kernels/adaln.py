"""Fused AdaLN modulation of SD3-class MMDiTs at batch 1: each block's modulated norms, gated residuals and
projection biases in ONNX Runtime's normalisation kernels instead of separate element-wise passes.

Why batch 1: an MMDiT block modulates every norm per sample (``LN(x) * (1 + scale[b]) + shift[b]``, then
``x + gate[b] * y``). At CFG's batch 2 those are (B, 1, D) broadcasts that no fused op of ONNX Runtime takes, so the
graph runs them as separate Mul/Add passes over (B, S, D) activations: on an H100, SD3-medium's step spends 6.45 ms
in them and 6.77 ms in ``Gemm``'s bias broadcasts, against 18.97 ms of GEMMs (docs/dit.md). At batch 1 the
modulation is a (D,) vector, which is what a norm's own scale and shift are, so:

- ``LN(x) * (1 + scale) + shift`` is one ``LayerNormalization(x, 1 + scale, shift)`` (runtime scale and bias);
- ``x + gate * (a W^T + b)`` followed by the next modulated norm is one ``com.microsoft::SkipLayerNormalization``
  on ``gate * (a W^T)`` with ``skip = x``, ``bias = gate * b``, ``gamma = 1 + scale'``, ``beta = shift'``; it returns
  the normalised input of the next sub-layer and the new residual stream (its optional output 3). This crosses block
  boundaries: a block's feed-forward output goes straight into the next block's first norm (or ``norm_out``);
- the image stream's q/k/v projections run without bias and their biases go into ``MultiHeadAttention``'s bias
  input; the text stream's projections carry the difference of the two streams' biases, so that one (3D,) bias
  serves the joined sequence (exact: ``(c W' + b' - b) + b``). Where the attention has q/k RMS norms (SD3.5) the
  biases must come before the norm, and the projections keep them;
- the feed-forward's first bias and tanh GELU stay one ``FastGelu`` (``fast_gelu``).

What stays separate: the gate multiply on the sub-layer's output (one pass), the joins of q/k/v and the split of the
attention's output. The runtime runs CFG as two batch-1 calls (``run_batched`` splits a batch of 2 for a static
batch-1 engine). Emitted at export time by replacing ``SD3Transformer2DModel.forward`` on the instance; the torch
forward computes the same thing as diffusers' (to float rounding), so the build's torch reference and verification
stand. Blocks with SD3.5-medium's dual attention are not covered: such a transformer is exported at batch 1 without
the fusion (a warning says so).
"""
from __future__ import annotations

import functools
import logging
import types

from .attention import DOMAIN, OP as MHA_OP, multi_head_attention
from .fast_gelu import fast_gelu
from .joint_attention import attention_scale, joined_qkv
from .residual import SKIP_LAYER_NORM

log = logging.getLogger(__name__)

@functools.cache  # the torch.autograd.Function classes, built once torch is imported
def _functions():
    import torch
    import torch.nn.functional as F

    class SkipLayerNormFn(torch.autograd.Function):
        """(x, skip, gamma, beta, bias) -> (LN(x + skip + bias) * gamma + beta, x + skip + bias); exports as
        com.microsoft::SkipLayerNormalization with its sum output (output 3)."""

        @staticmethod
        def forward(ctx, x, skip, gamma, beta, bias, eps: float):
            s = x + skip + bias
            return F.layer_norm(s, (s.shape[-1],), gamma, beta, eps), s

        @staticmethod
        def symbolic(g, x, skip, gamma, beta, bias, eps: float):
            out, _mean, _inv_std, total = g.op(f"{DOMAIN}::{SKIP_LAYER_NORM}", x, skip, gamma, beta, bias,
                                               epsilon_f=float(eps), outputs=4)
            if x.type().kind() == "TensorType":
                out.setType(x.type())
                total.setType(x.type())
            return out, total

    class BiasedMultiHeadAttentionFn(torch.autograd.Function):
        """(B, S, D) q, k, v without bias, bias (3D,) -> attention of (q + bq, k + bk, v + bv); exports as
        MultiHeadAttention(query, key, value, bias)."""

        @staticmethod
        def forward(ctx, query, key, value, bias, num_heads: int, scale: float):
            d = query.shape[-1]
            b, s, _ = query.shape
            hd = d // num_heads
            q = (query + bias[:d]).view(b, s, num_heads, hd).transpose(1, 2)
            k = (key + bias[d:2 * d]).view(b, -1, num_heads, hd).transpose(1, 2)
            v = (value + bias[2 * d:]).view(b, -1, num_heads, hd).transpose(1, 2)
            out = F.scaled_dot_product_attention(q, k, v, scale=scale)
            return out.transpose(1, 2).reshape(b, s, d)

        @staticmethod
        def symbolic(g, query, key, value, bias, num_heads: int, scale: float):
            out = g.op(f"{DOMAIN}::{MHA_OP}", query, key, value, bias, num_heads_i=int(num_heads),
                       scale_f=float(scale))
            out.setType(query.type())
            return out

    return SkipLayerNormFn, BiasedMultiHeadAttentionFn


def skip_layer_norm(x, skip, gamma, beta, bias, eps: float):
    return _functions()[0].apply(x, skip, gamma, beta, bias, float(eps))


def biased_attention(query, key, value, bias, num_heads: int, scale: float):
    return _functions()[1].apply(query, key, value, bias, int(num_heads), float(scale))


# -- the transformer's forward at batch 1 -------------------------------------------------------------------------
# Each module keeps its own call (so the exported node names keep their scopes: the fp16 policy keeps
# ``/norm1/linear/`` and its kin in fp32 by name); the residual stream travels between blocks with its last
# sub-layer output not yet added ("pending": the gated projection and its gated bias), so that the next norm that
# sees it, the next block's ``norm1`` or ``norm_out``, adds it inside SkipLayerNormalization.
class _Mod:
    """One norm's modulation as (D,) vectors: shift/scale of its norm, and where it has them the gate of the
    attention, the shift/scale of the feed-forward's norm and the feed-forward's gate; ``eps`` of its norm."""

    def __init__(self, norm, temb):
        import torch

        from diffusers.models.normalization import AdaLayerNormContinuous

        self.eps = float(norm.norm.eps)
        emb = norm(temb)  # the patched forward: the norm's modulation linear alone (_norm_forward)
        if isinstance(norm, AdaLayerNormContinuous):  # (scale, shift): the order diffusers chunks it in
            scale, shift = torch.chunk(emb, 2, dim=1)
            self.shift, self.scale = shift.reshape(-1), scale.reshape(-1)
            self.gate = self.shift_mlp = self.scale_mlp = self.gate_mlp = None
        else:  # AdaLayerNormZero
            parts = [p.reshape(-1) for p in emb.chunk(6, dim=1)]
            self.shift, self.scale, self.gate, self.shift_mlp, self.scale_mlp, self.gate_mlp = parts


def _norm_forward(self, temb):
    """Patched on AdaLayerNormZero / AdaLayerNormContinuous: their modulation linear over SiLU(temb) alone."""
    return self.linear(self.silu(temb))


def _bias(linear):
    import torch

    return linear.bias if linear.bias is not None else torch.zeros(linear.out_features, dtype=linear.weight.dtype,
                                                                  device=linear.weight.device)


def _enter(resid, pending, mod: _Mod):
    """The modulated norm that opens a block (or ``norm_out``): LayerNormalization with runtime scale and shift, or,
    with a pending sub-layer output, SkipLayerNormalization that also adds it. Returns (normed, residual stream)."""
    import torch.nn.functional as F

    if pending is None:
        return F.layer_norm(resid, (resid.shape[-1],), 1 + mod.scale, mod.shift, mod.eps), resid
    y, bias = pending
    return skip_layer_norm(y, resid, 1 + mod.scale, mod.shift, bias, mod.eps)


def _joint_attention(attn, x_in, c_in, bias_in_attention: bool):
    """The block's joint attention -> (image output, text output or None) of ``to_out`` / ``to_add_out`` WITHOUT their
    biases (the caller adds them gated, inside SkipLayerNormalization)."""
    import torch
    import torch.nn.functional as F

    n = x_in.shape[1]
    if bias_in_attention:
        image = (attn.to_q, attn.to_k, attn.to_v)
        text = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
        if getattr(attn, "_adaln_pack_qkv", False):  # one GEMM a stream for q, k and v, then split
            d = image[0].out_features
            qkv = F.linear(x_in, torch.cat([lin.weight for lin in image])).split(d, dim=-1)
            qkv_c = F.linear(c_in, torch.cat([lt.weight for lt in text]),
                             torch.cat([_bias(lt) - _bias(li) for lt, li in zip(text, image)])).split(d, dim=-1)
        else:
            qkv = [F.linear(x_in, lin.weight) for lin in image]
            qkv_c = [F.linear(c_in, lt.weight, _bias(lt) - _bias(li)) for lt, li in zip(text, image)]
        joined = [torch.cat([a, b], dim=1) for a, b in zip(qkv, qkv_c)]
        bias = torch.cat([_bias(lin) for lin in image])
        out = biased_attention(*joined, bias, attn.heads, attention_scale(attn))
    else:
        out = multi_head_attention(*joined_qkv(attn, x_in, c_in), attn.heads, attention_scale(attn))
    out = out.to(x_in.dtype)
    ax = F.linear(out[:, :n], attn.to_out[0].weight)
    ac = None if attn.context_pre_only else F.linear(out[:, n:], attn.to_add_out.weight)
    return ax, ac


def _after_attention(attn_out, out_bias, resid, mod: _Mod, ff, ff_eps: float):
    """One stream after the attention: the gated attention residual and the feed-forward's modulated norm (one
    SkipLayerNormalization), the feed-forward (FastGelu inside); returns (residual stream, pending output of the
    feed-forward: gated projection and gated bias)."""
    import torch.nn.functional as F

    f_in, resid = skip_layer_norm(attn_out * mod.gate, resid, 1 + mod.scale_mlp, mod.shift_mlp, out_bias * mod.gate,
                                  ff_eps)
    proj, out = ff.net[0].proj, ff.net[2]
    h = fast_gelu(F.linear(f_in, proj.weight), _bias(proj))
    return resid, (F.linear(h, out.weight) * mod.gate_mlp, _bias(out) * mod.gate_mlp)


def _block_forward(self, x, x_pending, c, c_pending, temb):
    """Patched on each JointTransformerBlock: -> (x, x_pending, c, c_pending); c_pending is None after a
    context_pre_only block (the text stream ends there)."""
    mx, mc = _Mod(self.norm1, temb), _Mod(self.norm1_context, temb)
    x_in, x = _enter(x, x_pending, mx)
    c_in, c = _enter(c, c_pending, mc)
    ax, ac = _joint_attention(self.attn, x_in, c_in, self._adaln_bias_in_attention)
    x, x_pending = _after_attention(ax, _bias(self.attn.to_out[0]), x, mx, self.ff, self.norm2.eps)
    if ac is None:
        return x, x_pending, c, None
    c, c_pending = _after_attention(ac, _bias(self.attn.to_add_out), c, mc, self.ff_context, self.norm2_context.eps)
    return x, x_pending, c, c_pending


def _fused_forward(self, hidden_states, encoder_hidden_states=None, pooled_projections=None, timestep=None,
                   block_controlnet_hidden_states=None, joint_attention_kwargs=None, return_dict=True,
                   skip_layers=None):
    """``SD3Transformer2DModel.forward`` at batch 1 with the fused modulation (module docstring); returns a tuple."""
    if hidden_states.shape[0] != 1:
        raise NotImplementedError(f"the fused AdaLN forward runs batch 1 (CFG as two calls), got batch {hidden_states.shape[0]}")
    if block_controlnet_hidden_states is not None or joint_attention_kwargs or skip_layers:
        raise NotImplementedError("the fused AdaLN forward takes no ControlNet residuals, IP-Adapter or skipped layers")
    height, width = hidden_states.shape[-2:]
    x = self.pos_embed(hidden_states)
    temb = self.time_text_embed(timestep, pooled_projections)
    c = self.context_embedder(encoder_hidden_states)
    x_pending = c_pending = None
    for blk in self.transformer_blocks:
        x, x_pending, c, c_pending = blk(x, x_pending, c, c_pending, temb)
    out, _ = _enter(x, x_pending, _Mod(self.norm_out, temb))
    out = self.proj_out(out)
    p = self.config.patch_size
    h, w = height // p, width // p
    out = out.reshape(1, h, w, p, p, self.out_channels)
    out = out.permute(0, 5, 1, 3, 2, 4).reshape(1, self.out_channels, h * p, w * p)  # "nhwpqc->nchpwq"
    return (out,)


def coverable(module) -> str | None:
    """None when :func:`install` can fuse ``module``'s modulation; else why not (one phrase)."""
    from torch import nn
    from diffusers.models.attention import FeedForward
    from diffusers.models.activations import GELU
    from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero

    if type(module).__name__ != "SD3Transformer2DModel":
        return f"{type(module).__name__} is not an SD3 MMDiT"
    blocks = list(module.transformer_blocks)
    if not blocks:
        return "it has no blocks"
    for i, b in enumerate(blocks):
        if getattr(b, "use_dual_attention", False):
            return f"block {i} has SD3.5's dual attention"
        if b.context_pre_only != (i + 1 == len(blocks)):
            return f"block {i}'s context_pre_only is not the last block's alone"
        norms = [b.norm1] + ([] if b.context_pre_only else [b.norm1_context])
        if not all(type(n) is AdaLayerNormZero and n.emb is None and type(n.norm) is nn.LayerNorm
                   and not n.norm.elementwise_affine for n in norms):
            return f"block {i}'s norms are not AdaLayerNormZero over a plain LayerNorm"
        ffs = [b.ff] + ([] if b.context_pre_only else [b.ff_context])
        for ff in ffs:
            if not (isinstance(ff, FeedForward) and isinstance(ff.net[0], GELU) and ff.net[0].approximate == "tanh"
                    and isinstance(ff.net[2], nn.Linear)):
                return f"block {i}'s feed-forward is not tanh-GELU"
        for n in ([b.norm2] + ([] if b.context_pre_only else [b.norm2_context])):
            if not (type(n) is nn.LayerNorm and not n.elementwise_affine):
                return f"block {i}'s second norms are not plain LayerNorms"
    if not (isinstance(blocks[-1].norm1_context, AdaLayerNormContinuous) and isinstance(module.norm_out, AdaLayerNormContinuous)):
        return "its last norms are not AdaLayerNormContinuous"
    return None


def install(module, bias_in_attention: bool | None = None, pack_qkv: bool = False) -> list:
    """Patch ``module`` (an SD3Transformer2DModel): its forward, its blocks' and its AdaLN norms' (module docstring);
    returns what :func:`uninstall` takes. ``bias_in_attention``: the q/k/v biases in MultiHeadAttention (default:
    where the attention has no q/k norms). ``pack_qkv`` (with the biases in the attention): each stream's q, k and v
    projections as one GEMM over the stacked weights, split after (fewer, larger GEMMs; an experiment of
    tools/gpu/sd3_adaln_probe.py, not yet a build's default)."""
    why = coverable(module)
    if why is not None:
        raise NotImplementedError(f"fused AdaLN modulation: {why}")
    blocks = list(module.transformer_blocks)
    qk_norms = any(getattr(b.attn, n, None) is not None for b in blocks
                   for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"))
    if bias_in_attention is None:
        bias_in_attention = not qk_norms
    elif bias_in_attention and qk_norms:
        raise ValueError("the q/k/v biases cannot move into the attention of a transformer with q/k RMS norms: the "
                         "norms need them first (leave bias_in_attention at None)")
    patched = [(module, _fused_forward)]
    for b in blocks:
        b._adaln_bias_in_attention = bool(bias_in_attention)
        b.attn._adaln_pack_qkv = bool(pack_qkv)
        patched += [(b, _block_forward), (b.norm1, _norm_forward), (b.norm1_context, _norm_forward)]
    patched.append((module.norm_out, _norm_forward))
    for m, fn in patched:
        m.forward = types.MethodType(fn, m)
    log.debug("fused AdaLN modulation on %d blocks (q/k/v bias in attention: %s)", len(blocks), bias_in_attention)
    return [m for m, _ in patched]


def uninstall(saved) -> None:
    for m in saved:
        del m.forward  # back to the class's forward
        if hasattr(m, "_adaln_bias_in_attention"):
            del m._adaln_bias_in_attention
            if hasattr(m.attn, "_adaln_pack_qkv"):
                del m.attn._adaln_pack_qkv


def clear_unused_outputs(model) -> int:
    """SkipLayerNormalization's optional outputs that nothing reads (mean and inverse std always; the residual sum
    after the last norm of a stream): name them '' (ONNX's omitted optional output) so that no provider computes or
    writes them. Returns how many outputs were cleared."""
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    changed = 0
    for n in model.graph.node:
        if n.domain == DOMAIN and n.op_type == SKIP_LAYER_NORM and len(n.output) == 4:
            for k in (1, 2, 3):
                if n.output[k] and n.output[k] not in used:
                    n.output[k] = ""
                    changed += 1
    return changed
