"""Fused GEGLU: the bias add, split and GELU gate of diffusers' ``GEGLU`` as one ``com.microsoft::BiasSplitGelu``.

Pattern replaced: ``proj(x).chunk(2, -1); a * gelu(gate)`` (exported as MatMul -> Add(bias) -> Slice, Slice ->
Gelu-by-Erf (Div, Erf, Add, Mul, Mul) -> Mul: about ten passes over the (B, S, 2*inner) tensor).
Emitted at export time: :class:`BiasSplitGeluFn` gets the bias-free projection and the bias; its forward is the
torch computation, its ``symbolic`` the fused op. ONNX Runtime has this kernel on the CUDA provider only, for
projection widths 2560, 5120 and 10240 (SD's 320/640/1280-channel blocks); other widths stay unfused.
"""
from __future__ import annotations

import functools
import math

import numpy as np

from ._patch import patch_forward, restore_forward

OP = "BiasSplitGelu"
DOMAIN = "com.microsoft"
CUDA_WIDTHS = (2560, 5120, 10240)  # the only widths ONNX Runtime's CUDA kernel accepts


def bias_split_gelu_ref(x: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """numpy reference: y = x + bias; left, gate = split(y, 2, -1); left * gelu(gate) (exact, erf), float64."""
    from math import erf

    y = x.astype(np.float64) + bias.astype(np.float64)
    left, gate = np.split(y, 2, axis=-1)
    gelu = 0.5 * gate * (1.0 + np.vectorize(erf)(gate / math.sqrt(2.0)))
    return left * gelu


@functools.cache  # the torch.autograd.Function class, built once torch is imported
def _function():
    import torch
    import torch.nn.functional as F

    class BiasSplitGeluFn(torch.autograd.Function):
        """(B, S, 2D) projection without bias, bias (2D,) -> (B, S, D); exports as com.microsoft::BiasSplitGelu."""

        @staticmethod
        def forward(ctx, x, bias):
            left, gate = (x + bias).chunk(2, dim=-1)
            return left * F.gelu(gate)

        @staticmethod
        def symbolic(g, x, bias):
            out = g.op(f"{DOMAIN}::{OP}", x, bias)
            sizes = x.type().sizes() if x.type().kind() == "TensorType" else None
            if sizes and sizes[-1] is not None:
                out.setType(x.type().with_sizes(list(sizes[:-1]) + [sizes[-1] // 2]))
            return out

    return BiasSplitGeluFn


def bias_split_gelu(x, bias):
    return _function().apply(x, bias)


def _fused_forward(self, hidden_states, *args, **kwargs):
    import torch.nn.functional as F

    return bias_split_gelu(F.linear(hidden_states, self.proj.weight), self.proj.bias)


def install(module, widths: tuple[int, ...] = CUDA_WIDTHS) -> list:
    """Route every diffusers ``GEGLU`` (with a bias, of a supported width) under ``module`` through the fused op."""
    from diffusers.models.activations import GEGLU

    return patch_forward(module, lambda m: isinstance(m, GEGLU) and m.proj.bias is not None and m.proj.out_features in widths,
                         _fused_forward, "GEGLU")


uninstall = restore_forward
