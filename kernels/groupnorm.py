"""Fused GroupNorm (+ SiLU): one ``com.microsoft::GroupNorm`` node, NHWC, statistics in fp32 inside the kernel.

Pattern replaced: ``torch.nn.GroupNorm`` (exported by the TorchScript exporter as Reshape -> InstanceNormalization
-> Reshape(Shape) -> Mul(gamma) -> Add(beta), which the fp16 policy then wraps in Casts to run the statistics in
fp32), and the SiLU that follows it in ResNet blocks (Sigmoid + Mul).
Emitted at export time: every ``nn.GroupNorm`` forward calls :class:`GroupNormFn`, whose forward is
``F.group_norm`` and whose ``symbolic`` emits Transpose(NCHW->NHWC) -> GroupNorm(channels_last=1) -> Transpose
back; :func:`fuse_silu` then folds a following Sigmoid + Mul into the node (``activation=1``).
ONNX Runtime's GroupNorm kernel exists on the CUDA provider only (NHWC only, gamma/beta float32: ORT's fp16
converter keeps them float32; it reads channels in pairs, so norms with an odd channel count per group stay unfused), so it is emitted for target cuda; target cpu keeps the standard ops.
"""
from __future__ import annotations

import functools
import logging

import numpy as np

from ._patch import patch_forward, restore_forward

log = logging.getLogger(__name__)

OP = "GroupNorm"
DOMAIN = "com.microsoft"


def group_norm_ref(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, groups: int, epsilon: float = 1e-5,
                   silu: bool = False, channels_last: bool = False) -> np.ndarray:
    """numpy reference of GroupNorm (+ SiLU) on (N, C, H, W), or (N, H, W, C) with ``channels_last``, float64."""
    x = x.astype(np.float64)
    if channels_last:
        x = x.transpose(0, 3, 1, 2)
    n, c = x.shape[:2]
    g = x.reshape(n, groups, -1)
    mean = g.mean(-1, keepdims=True)
    var = g.var(-1, keepdims=True)
    y = ((g - mean) / np.sqrt(var + epsilon)).reshape(x.shape)
    shape = (1, c) + (1,) * (x.ndim - 2)
    y = y * gamma.astype(np.float64).reshape(shape) + beta.astype(np.float64).reshape(shape)
    if silu:
        y = y / (1.0 + np.exp(-y))
    return y.transpose(0, 2, 3, 1) if channels_last else y


@functools.cache  # the torch.autograd.Function class, built once torch is imported
def _function():
    import torch
    import torch.nn.functional as F

    class GroupNormFn(torch.autograd.Function):
        """(N, C, H, W) -> (N, C, H, W); exports as NHWC com.microsoft::GroupNorm between two Transposes."""

        @staticmethod
        def forward(ctx, x, weight, bias, groups: int, epsilon: float):
            return F.group_norm(x, groups, weight, bias, epsilon)

        @staticmethod
        def symbolic(g, x, weight, bias, groups: int, epsilon: float):
            nhwc = g.op("Transpose", x, perm_i=[0, 2, 3, 1])
            y = g.op(f"{DOMAIN}::{OP}", nhwc, weight, bias, groups_i=int(groups), epsilon_f=float(epsilon),
                     activation_i=0, channels_last_i=1)
            y.setType(nhwc.type())
            out = g.op("Transpose", y, perm_i=[0, 3, 1, 2])
            out.setType(x.type())
            return out

    return GroupNormFn


def group_norm(x, weight, bias, groups: int, epsilon: float):
    if x.ndim == 3:  # (N, C, L), e.g. the VAE attention's norm: a 1 x L image
        return _function().apply(x.unsqueeze(2), weight, bias, groups, epsilon).squeeze(2)
    if x.ndim != 4:
        raise NotImplementedError(f"fused GroupNorm on {x.ndim}-d input is not built (UNet and VAE use 3-d and 4-d)")
    return _function().apply(x, weight, bias, groups, epsilon)


def _fused_forward(self, x):
    if not self.affine:
        raise NotImplementedError("fused GroupNorm without affine parameters is not built (SD's norms are affine)")
    return group_norm(x, self.weight, self.bias, self.num_groups, self.eps)


def install(module) -> list:
    """Route every ``nn.GroupNorm`` under ``module`` through the fused op; return what :func:`uninstall` needs."""
    import torch

    # the CUDA kernel works on channel pairs: a group of an odd channel count stays unfused (SD's are all even)
    return patch_forward(module, lambda m: isinstance(m, torch.nn.GroupNorm) and (m.num_channels // m.num_groups) % 2 == 0,
                         _fused_forward, "GroupNorm")


uninstall = restore_forward


def fuse_silu(model) -> int:
    """GroupNorm -> Transpose -> {Sigmoid, Mul(t, sigmoid(t))}: set activation=1 and drop the Sigmoid and Mul."""
    from onnx import helper

    g = model.graph
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    producer = {o: n for n in g.node for o in n.output}
    outputs = {o.name for o in g.output}
    dead, rename, fused = set(), {}, 0
    for gn in g.node:
        if gn.op_type != OP or gn.domain != DOMAIN:
            continue
        users = consumers.get(gn.output[0], [])
        if len(users) != 1 or users[0].op_type != "Transpose":
            continue
        tr = users[0]
        t = tr.output[0]
        users = consumers.get(t, [])
        sig = [u for u in users if u.op_type == "Sigmoid"]
        mul = [u for u in users if u.op_type == "Mul" and set(u.input) == {t, sig[0].output[0]}] if len(sig) == 1 else []
        if len(users) != 2 or len(sig) != 1 or len(mul) != 1 or t in outputs:
            continue
        if consumers.get(sig[0].output[0], []) != [mul[0]]:
            continue
        for a in gn.attribute:
            if a.name == "activation":
                a.CopyFrom(helper.make_attribute("activation", 1))
        dead.update((id(sig[0]), id(mul[0])))
        rename[mul[0].output[0]] = t
        fused += 1
    if not fused:
        return 0
    keep = [n for n in g.node if id(n) not in dead]
    del g.node[:]
    g.node.extend(keep)
    for n in g.node:
        for k, i in enumerate(n.input):
            if i in rename:
                n.input[k] = rename[i]
    for o in g.output:  # a graph output produced by a removed Mul keeps its name through an Identity
        if o.name in rename:
            g.node.append(helper.make_node("Identity", [rename[o.name]], [o.name]))
    del producer
    log.debug("SiLU folded into %d GroupNorm nodes", fused)
    return fused
