"""Attention for TensorRT: standard ONNX ops in the shape TensorRT's own multi-head attention fusion matches.

Pattern replaced: the TorchScript export of diffusers' ``AttnProcessor2_0`` core (``scaled_dot_product_attention``),
which multiplies Q and K^T by sqrt(scale) each (Sqrt + two Mul nodes per attention) and transposes K as a separate
node. Emitted at export time instead, per attention block, in ONNX opset 17 ops only:

    Q (B, S, D) -> Mul(scale) -> Reshape/Transpose (B, N, S, H) --\
    K (B, L, D) -> Reshape/Transpose (B, N, H, L) ----------------- MatMul (BMM1) -> Softmax -> MatMul (BMM2) -> (B, S, D)
    V (B, L, D) -> Reshape/Transpose (B, N, L, H) ---------------------------------------------/

This is TensorRT's documented attention graph (method 2 of "Fused Attention" in its developer guide: BMM1 ->
Softmax -> BMM2 from IMatrixMultiplyLayer / ISoftMaxLayer, with the attention scale applied to Q before BMM1), which
its builder fuses into one attention kernel; no ONNX Runtime contrib op is emitted, so the TensorRT ONNX parser and
ONNX Runtime's CPU provider (which verifies the build) both read the graph. Used for target ``tensorrt``.
"""
from __future__ import annotations

import logging

from .attention import CoreAttnProcessor

log = logging.getLogger(__name__)


def attention_core(query, key, value, heads: int, scale: float):
    """(B, S, D) q, (B, L, D) k, (B, L, Dv) v -> (B, S, Dv): softmax((q * scale) k^T) v per head, in plain ops."""
    b, s, d = query.shape
    hd, hdv = d // heads, value.shape[-1] // heads
    q = (query * scale).view(b, s, heads, hd).transpose(1, 2)  # (B, N, S, H), scaled before BMM1
    k = key.view(b, -1, heads, hd).permute(0, 2, 3, 1)  # (B, N, H, L)
    v = value.view(b, -1, heads, hdv).transpose(1, 2)  # (B, N, L, Hv)
    probs = (q @ k).softmax(dim=-1)  # (B, N, S, L)
    return (probs @ v).transpose(1, 2).reshape(b, s, heads * hdv)


class PatternAttnProcessor(CoreAttnProcessor):
    """``AttnProcessor2_0`` (no masks) with the core as :func:`attention_core` (TensorRT's attention pattern)."""

    what = "TensorRT-pattern attention"
    core = staticmethod(attention_core)


def install(module) -> list[tuple[object, object]]:
    """Give every diffusers ``Attention`` under ``module`` the pattern processor; return (attn, old processor) pairs."""
    from diffusers.models.attention_processor import Attention

    saved = []
    for m in module.modules():
        if isinstance(m, Attention):
            saved.append((m, m.processor))
            m.set_processor(PatternAttnProcessor())
    log.debug("TensorRT-pattern attention on %d attention blocks", len(saved))
    return saved


def uninstall(saved) -> None:
    for m, proc in saved:
        m.set_processor(proc)


def count_patterns(model) -> int:
    """How many MatMul -> Softmax -> MatMul chains with a scale Mul before BMM1 (the pattern above) the graph holds."""
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def walk_back(name, through=("Transpose", "Reshape", "Cast")):
        n = producer.get(name)
        while n is not None and n.op_type in through:
            n = producer.get(n.input[0])
        return n

    count = 0
    for sm in (n for n in model.graph.node if n.op_type == "Softmax"):
        bmm1 = producer.get(sm.input[0])
        bmm2 = [c for c in consumers.get(sm.output[0], []) if c.op_type == "MatMul"]
        if bmm1 is None or bmm1.op_type != "MatMul" or not bmm2:
            continue
        scaled = walk_back(bmm1.input[0])
        if scaled is not None and scaled.op_type == "Mul":
            count += 1
    return count
