"""Residual and bias adds folded into the norms after them: SkipGroupNorm and SkipLayerNormalization.

Pattern replaced (a matcher over the exported graph, after the GroupNorm/attention kernels are in):
- ``Add(h, skip) -> Transpose(NCHW->NHWC) -> GroupNorm`` becomes ``com.microsoft::SkipGroupNorm`` (NHWC), which
  adds, normalises and applies SiLU in one kernel and also returns the sum when a later residual needs it. In the
  ResNet blocks ``skip`` is the time embedding, (N, C, 1, 1), broadcast; between blocks it is the residual stream.
- ``Add(x, residual) -> LayerNormalization`` becomes ``com.microsoft::SkipLayerNormalization``, with the bias of
  the projection before it (attention's ``to_out``) moved into the op, and the sum returned for the next residual.
- ``x / 1`` (diffusers' ResNet ``output_scale_factor`` of 1) is dropped first, so the residual Add meets the norm.

The matching is ONNX Runtime's own (``onnxruntime.transformers``' fusion passes for Stable Diffusion), run on our
graphs, which already hold the fused GroupNorm in the NHWC form those passes expect. Both ops are CUDA kernels of
ONNX Runtime (SkipLayerNormalization also has a CPU kernel; SkipGroupNorm has none), so this runs for target cuda.
numpy references: :func:`skip_group_norm_ref`, :func:`skip_layer_norm_ref`.
"""
from __future__ import annotations

import contextlib
import io
import logging
from collections import Counter

import numpy as np

from .groupnorm import group_norm_ref

log = logging.getLogger(__name__)

DOMAIN = "com.microsoft"
SKIP_GROUP_NORM = "SkipGroupNorm"
SKIP_LAYER_NORM = "SkipLayerNormalization"


def skip_group_norm_ref(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, skip: np.ndarray, groups: int,
                        epsilon: float = 1e-5, silu: bool = False, bias: np.ndarray | None = None
                        ) -> tuple[np.ndarray, np.ndarray]:
    """numpy reference of SkipGroupNorm on NHWC ``x``; ``skip`` is (N, H, W, C), (N, 1, 1, C) or (N, C).

    Returns (GroupNorm(x + skip + bias) (+ SiLU), x + skip + bias), float64."""
    s = x.astype(np.float64)
    sk = skip.astype(np.float64)
    s = s + (sk[:, None, None, :] if sk.ndim == 2 else sk)
    if bias is not None:
        s = s + bias.astype(np.float64)
    return group_norm_ref(s, gamma, beta, groups, epsilon, silu, channels_last=True), s


def skip_layer_norm_ref(x: np.ndarray, skip: np.ndarray, gamma: np.ndarray, beta: np.ndarray | None,
                        bias: np.ndarray | None = None, epsilon: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
    """numpy reference of SkipLayerNormalization: (LayerNorm(x + skip + bias), x + skip + bias), float64."""
    s = x.astype(np.float64) + skip.astype(np.float64)
    if bias is not None:
        s = s + bias.astype(np.float64)
    mean = s.mean(-1, keepdims=True)
    var = s.var(-1, keepdims=True)
    y = (s - mean) / np.sqrt(var + epsilon) * gamma.astype(np.float64)
    if beta is not None:
        y = y + beta.astype(np.float64)
    return y, s


def fuse_residual_adds(model) -> dict[str, int]:
    """Fold residual/bias Adds into SkipGroupNorm / SkipLayerNormalization, in place; returns counts of new ops.

    Needs shapes (which Add input is the broadcast skip): ONNX Runtime's symbolic shape inference runs on the
    graph; if it fails the GroupNorm fusion cannot run and this raises rather than silently fusing less."""
    import onnxruntime.transformers  # noqa: F401  (puts the package's folder on sys.path for its own imports)
    from onnxruntime.transformers.fusion_skip_group_norm import FusionSkipGroupNorm
    from onnxruntime.transformers.onnx_model_unet import UnetOnnxModel

    before = Counter(n.op_type for n in model.graph.node)
    sink = io.StringIO()  # the passes print progress and shape-inference failures to stdout
    with contextlib.redirect_stdout(sink), _quiet("onnxruntime.transformers", "fusion_base", "onnx_model",
                                                  "fusion_skiplayernorm", "fusion_skip_group_norm"):
        m = UnetOnnxModel(model)
        m.remove_useless_div()
        m.fuse_skip_layer_norm()
        fusion = FusionSkipGroupNorm(m)
        if fusion.shape_infer_helper is None:
            from ldm_export.runtime.errors import LdmExportError

            raise LdmExportError("the residual folds need shapes, and ONNX Runtime's symbolic shape inference failed on "
                                 f"this graph ({' '.join(sink.getvalue().split())[-200:] or 'no detail'}); build without "
                                 "them with LDM_EXPORT_DISABLE_KERNELS=residual")
        fusion.apply()
        m.fuse_add_bias_skip_layer_norm()
        m.prune_graph()
        m.topological_sort()
    after = Counter(n.op_type for n in model.graph.node)
    counts = {op: after[op] for op in (SKIP_GROUP_NORM, SKIP_LAYER_NORM) if after[op]}
    log.debug("residual adds: %d -> %d Add nodes, %s", before["Add"], after["Add"], counts)
    return counts


@contextlib.contextmanager
def _quiet(*names: str):
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
