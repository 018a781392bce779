"""Fused tanh-GELU of the DiT feed-forwards: the bias add and GELU of diffusers' ``GELU(approximate="tanh")`` (SD3's
and FLUX's ``FeedForward``) as one ``com.microsoft::FastGelu`` with its bias input, and FLUX's single-stream
``nn.GELU(approximate="tanh")`` as a bias-free ``FastGelu``.

Pattern replaced: ``F.gelu(proj(x), approximate="tanh")``, which the TorchScript exporter (opset 17, no Gelu op)
writes as MatMul -> Add(bias) -> Mul, Mul, Mul, Add, Mul, Tanh, Add, Mul, Mul: ten passes over the (B, S, 4D)
hidden tensor of every feed-forward, the widest activation of a block (at 1024² in SD3 medium, 2 x 4096 x 6144
fp16 = 100 MB a pass). ONNX Runtime's own FastGelu fusion does not match this order of the multiplications, so
without this the graph keeps all ten. ``FastGelu(X, bias)`` computes ``gelu_tanh(X + bias)`` in one pass; ONNX
Runtime has it on the CUDA provider (fp32, fp16, bf16) and on the CPU provider (fp32), so cuda-target graphs that
hold it verify on either. Emitted at export time as :mod:`geglu` does (an autograd function whose forward is the
torch computation and whose ``symbolic`` is the fused op); cuda target, transformer component.
"""
from __future__ import annotations

import functools
import math

import numpy as np

from ._patch import patch_forward, restore_forward

OP = "FastGelu"
DOMAIN = "com.microsoft"


def fast_gelu_ref(x: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """numpy reference, float64: y = x + bias; 0.5 y (1 + tanh(sqrt(2/pi) (y + 0.044715 y^3)))."""
    y = x.astype(np.float64) + (0.0 if bias is None else bias.astype(np.float64))
    return 0.5 * y * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (y + 0.044715 * y ** 3)))


@functools.cache  # the torch.autograd.Function classes, built once torch is imported
def _functions():
    import torch
    import torch.nn.functional as F

    def typed(g, out, x):
        if x.type().kind() == "TensorType":
            out.setType(x.type())
        return out

    class FastGeluBiasFn(torch.autograd.Function):
        """(..., N) projection without bias, bias (N,) -> gelu_tanh(x + bias); exports as FastGelu(x, bias)."""

        @staticmethod
        def forward(ctx, x, bias):
            return F.gelu(x + bias, approximate="tanh")

        @staticmethod
        def symbolic(g, x, bias):
            return typed(g, g.op(f"{DOMAIN}::{OP}", x, bias), x)

    class FastGeluFn(torch.autograd.Function):
        """x -> gelu_tanh(x); exports as FastGelu(x)."""

        @staticmethod
        def forward(ctx, x):
            return F.gelu(x, approximate="tanh")

        @staticmethod
        def symbolic(g, x):
            return typed(g, g.op(f"{DOMAIN}::{OP}", x), x)

    return FastGeluBiasFn, FastGeluFn


def fast_gelu(x, bias=None):
    with_bias, plain = _functions()
    return plain.apply(x) if bias is None else with_bias.apply(x, bias)


def _diffusers_gelu_forward(self, hidden_states):
    import torch.nn.functional as F

    return fast_gelu(F.linear(hidden_states, self.proj.weight), self.proj.bias)  # bias None: FastGelu(x)


def _nn_gelu_forward(self, x):
    return fast_gelu(x)


def install(module) -> list:
    """Route every tanh GELU under ``module`` through the fused op: diffusers' ``GELU`` modules (projection and
    activation; the bias folded in where the projection has one) and bare ``nn.GELU(approximate="tanh")``."""
    from torch import nn
    from diffusers.models.activations import GELU

    saved = patch_forward(module, lambda m: isinstance(m, GELU) and m.approximate == "tanh",
                          _diffusers_gelu_forward, "GELU(tanh) with its projection")
    saved += patch_forward(module, lambda m: isinstance(m, nn.GELU) and m.approximate == "tanh",
                           _nn_gelu_forward, "nn.GELU(tanh)")
    return saved


uninstall = restore_forward
