"""ONNX Runtime's CUDA-only contrib ops as ``onnx.reference`` ops, backed by the kernels' numpy references.

With these, ``onnx.reference.ReferenceEvaluator`` runs a cuda-target graph on the CPU, so a graph rewrite that
emits GroupNorm, SkipGroupNorm, SkipLayerNormalization, MultiHeadAttention or BiasSplitGelu can be checked against
the plain graph without a GPU. The references compute in float64 and return the input's dtype.
"""
from __future__ import annotations

import numpy as np
from onnx.reference.op_run import OpRun

from ldm_export.kernels import attention, geglu, groupnorm, residual


class _MS(OpRun):
    op_domain = "com.microsoft"

    def _outs(self, *values):
        return tuple(values[: len(self.output)])


class GroupNorm(_MS):
    def _run(self, x, gamma, beta, activation=0, channels_last=1, epsilon=1e-5, groups=32):
        y = groupnorm.group_norm_ref(x, gamma, beta, groups, epsilon, bool(activation), channels_last=bool(channels_last))
        return (y.astype(x.dtype),)


class SkipGroupNorm(_MS):
    def _run(self, x, gamma, beta, skip, bias=None, activation=0, channels_last=1, epsilon=1e-5, groups=32):
        assert channels_last == 1
        y, s = residual.skip_group_norm_ref(x, gamma, beta, skip, groups, epsilon, bool(activation), bias)
        return self._outs(y.astype(x.dtype), s.astype(x.dtype))


class SkipLayerNormalization(_MS):
    def _run(self, x, skip, gamma, beta=None, bias=None, epsilon=1e-5):
        y, s = residual.skip_layer_norm_ref(x, skip, gamma, beta, bias, epsilon)
        mean = s.mean(-1, keepdims=True)
        inv_std = 1.0 / np.sqrt(s.var(-1, keepdims=True) + epsilon)
        return self._outs(y.astype(x.dtype), mean.astype(np.float32), inv_std.astype(np.float32), s.astype(x.dtype))


class MultiHeadAttention(_MS):
    def _run(self, query, key=None, value=None, *rest, num_heads=1, scale=None, **_):
        return (attention.attention_ref(query, key, value, num_heads, scale).astype(query.dtype),)


class BiasSplitGelu(_MS):
    def _run(self, x, bias):
        return (geglu.bias_split_gelu_ref(x, bias).astype(x.dtype),)


class Resize(OpRun):
    """Nearest-neighbour upsampling by integer scales (what SD's up-blocks use); onnx's own reference Resize
    fails on the empty ``roi`` input the exporter writes."""
    op_domain = ""

    def _run(self, x, roi=None, scales=None, sizes=None, mode="nearest", **_):
        if mode not in (b"nearest", "nearest"):
            raise NotImplementedError(f"reference Resize: mode {mode!r}")
        if scales is None or len(scales) == 0:
            scales = np.asarray(sizes, np.float64) / np.asarray(x.shape)
        for axis, f in enumerate(np.asarray(scales, np.float64)):
            if f != 1.0:
                if f != int(f):
                    raise NotImplementedError(f"reference Resize: non-integer scale {f}")
                x = np.repeat(x, int(f), axis=axis)
        return (x,)


CONTRIB_OPS = [GroupNorm, SkipGroupNorm, SkipLayerNormalization, MultiHeadAttention, BiasSplitGelu, Resize]


def run_reference(model, feeds: dict) -> list[np.ndarray]:
    """Run ``model`` (contrib ops included) on onnx's reference evaluator."""
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(model, new_ops=CONTRIB_OPS).run(None, feeds)
