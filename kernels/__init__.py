"""Graph rewrites that put fused kernels (attention, GroupNorm, GEGLU, residual norms) into exported ONNX graphs.

The build calls three hooks per component and target: ``export_patches`` (a context manager around the
torch export, which routes attention, GroupNorm and GEGLU through autograd functions that export as fused
nodes), ``rewrite`` (passes over the exported graph: SiLU folded into GroupNorm, residual adds folded into the
norms after them) and ``describe`` (what was fused, with counts, for the manifest).

What each target gets:

=============  =============================================  ==========================================
component      cuda                                           cpu
=============  =============================================  ==========================================
unet           MultiHeadAttention, GroupNorm(+SiLU) NHWC,     standard ONNX ops (the fused ops' CPU
               BiasSplitGelu, SkipGroupNorm,                  kernels are fp32-only or missing)
               SkipLayerNormalization
vae_decoder    GroupNorm(+SiLU) NHWC; its single attention     standard ONNX ops
               stays unfused (head size 512; softmax in
               fp32 by the fp16 policy); no residual folds
               (measured on an H100: SkipGroupNorm made the
               SD 1.5 decoder 0.3 ms slower, 10.63 against
               10.33 ms: its sum kernel is slow at 512x512)
text_encoder   nothing (causal mask, 77 tokens, one call)      standard ONNX ops
transformer    SD3's joint attention as one MultiHeadAttention standard ONNX ops
               per block (joint_attention.py); FLUX's
               double- and single-stream attention as one
               MultiHeadAttention each, rotary embeddings
               in standard ops before it (flux_attention.py);
               each feed-forward's bias + tanh GELU as one
               FastGelu (fast_gelu.py); at a static batch of
               1 (``build --sequential-cfg``), an SD3
               transformer's AdaLN modulation, gated
               residuals and biases in LayerNormalization /
               SkipLayerNormalization (adaln.py)
=============  =============================================  ==========================================

Target ``tensorrt`` keeps standard ONNX ops only (TensorRT's parser reads no ONNX Runtime contrib op) and emits
attention in the unet and vae_decoder as the BMM1 -> Softmax -> BMM2 graph with the scale on Q that TensorRT's
builder fuses itself (``mha_pattern``); GroupNorm stays InstanceNormalization and LayerNorm LayerNormalization,
which TensorRT's parser maps onto its own normalisation layer.

``LDM_EXPORT_DISABLE_KERNELS`` (comma-separated kinds: attention, groupnorm, geglu, gelu, residual, adaln) leaves kinds out
of a build, to bisect a numerical or speed problem to one kernel (adaln emits attention and FastGelu itself: leaving
either out leaves it out too).
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections import Counter

from ldm_export.runtime.errors import LdmExportError
from . import adaln, attention, fast_gelu, flux_attention, geglu, groupnorm, joint_attention, mha_pattern, residual

log = logging.getLogger(__name__)

TARGETS = ("cpu", "cuda", "tensorrt")
KINDS = ("attention", "groupnorm", "geglu", "gelu", "residual", "adaln")
FUSED_OPS = {(attention.DOMAIN, attention.OP), (groupnorm.DOMAIN, groupnorm.OP), (geglu.DOMAIN, geglu.OP),
             (fast_gelu.DOMAIN, fast_gelu.OP), (residual.DOMAIN, residual.SKIP_GROUP_NORM),
             (residual.DOMAIN, residual.SKIP_LAYER_NORM)}
# fused ops that have no ONNX Runtime CPU kernel: graphs holding them are verified on the CUDA provider
GPU_ONLY_OPS = (groupnorm.OP, geglu.OP, residual.SKIP_GROUP_NORM)

_last: dict[tuple[str, str], dict[str, int]] = {}  # (component, target) -> counts of the last rewrite
_uncovered: dict[tuple[str, str], bool] = {}  # (component, target) -> its patches had nothing to replace


def _check_target(target: str) -> None:
    if target not in TARGETS:
        raise NotImplementedError(f"fused kernels for target '{target}' are not built; choose one of {', '.join(TARGETS)}")


def disabled_kinds() -> set[str]:
    """Kinds named in ``LDM_EXPORT_DISABLE_KERNELS``; an unknown name is an error, not a silent no-op."""
    names = {k.strip() for k in os.environ.get("LDM_EXPORT_DISABLE_KERNELS", "").split(",") if k.strip()}
    unknown = names - set(KINDS)
    if unknown:
        raise LdmExportError(f"LDM_EXPORT_DISABLE_KERNELS: unknown kernel kinds {sorted(unknown)}; choose from {', '.join(KINDS)}")
    return names


_cpu_kinds: tuple[str, ...] = ()  # opt-in kernels of the cpu target (``cpu_kernels``)


@contextlib.contextmanager
def cpu_kernels(kinds: tuple[str, ...]):
    """Within the block, the cpu target also fuses ``kinds`` in the UNet: only ``attention`` (ONNX Runtime's CPU
    MultiHeadAttention, fp32, computes attention in blocks instead of a tokens x tokens score matrix: the low-memory
    mode's peak; TensorRT's parser cannot read it, so it is opt-in: ``build --fused-attention``)."""
    global _cpu_kinds
    bad = [k for k in kinds if k != "attention"]
    if bad:
        raise LdmExportError(f"the cpu target can fuse attention only, not {bad[0]} (its other fused ops have no CPU kernel)")
    saved, _cpu_kinds = _cpu_kinds, tuple(kinds)
    try:
        yield
    finally:
        _cpu_kinds = saved


def plan(component: str, target: str, batch: int | None = None) -> tuple[str, ...]:
    """The kernels applied to ``component`` for ``target``; ``batch``: the static batch of the graph (None: dynamic);
    the transformer's fused AdaLN modulation needs batch 1."""
    _check_target(target)
    if target == "cpu":
        return tuple(k for k in _cpu_kinds if k not in disabled_kinds()) if component == "unet" else ()
    if target == "tensorrt":
        return () if "attention" in disabled_kinds() or component not in ("unet", "vae_decoder") else ("attention",)
    kinds = {"unet": ("attention", "groupnorm", "geglu", "residual"),
             "vae_decoder": ("groupnorm",),
             "transformer": ("attention", "gelu") + (("adaln",) if batch == 1 else ())}.get(component, ())
    off = disabled_kinds()
    if off & {"attention", "gelu"}:  # the fused AdaLN forward emits both itself: bisecting either leaves it out too
        off = off | {"adaln"}
    return tuple(k for k in kinds if k not in off)


@contextlib.contextmanager
def export_patches(module, component: str, target: str, batch: int | None = None):
    """Route the component's attention / GroupNorm / GEGLU through ops that export as fused nodes for ``target``."""
    kinds = plan(component, target, batch)
    undo = []
    try:
        if "attention" in kinds and component == "transformer":
            saved = joint_attention.install(module)
            undo.append((joint_attention.uninstall, saved))
            flux = flux_attention.install(module)
            undo.append((flux_attention.uninstall, flux))
            _uncovered[(component, target)] = not (saved or flux)  # a transformer of neither attention
        elif "attention" in kinds:
            fused = mha_pattern if target == "tensorrt" else attention
            undo.append((fused.uninstall, fused.install(module)))
        if "groupnorm" in kinds:
            undo.append((groupnorm.uninstall, groupnorm.install(module)))
        if "geglu" in kinds:
            undo.append((geglu.uninstall, geglu.install(module)))
        if "gelu" in kinds:
            undo.append((fast_gelu.uninstall, fast_gelu.install(module)))
        if "adaln" in kinds:  # last: its forward replaces the whole transformer's (and calls the fused ops itself)
            inner = next((m for m in module.modules() if type(m).__name__ == "SD3Transformer2DModel"), None)
            why = adaln.coverable(inner) if inner is not None else None
            if inner is not None and why is None:
                undo.append((adaln.uninstall, adaln.install(inner)))
            elif inner is not None:  # an SD3 transformer asked for at batch 1 that the fusion does not cover
                log.warning("%s: the fused AdaLN modulation does not cover this transformer (%s): it is exported at "
                            "batch 1 without it", component, why)
        yield
    finally:
        for fn, saved in reversed(undo):
            fn(saved)


def rewrite(model, component: str, target: str, batch: int | None = None):
    """Graph passes after export (SiLU into GroupNorm, residual adds into the norms); records the fused-op
    counts for :func:`describe`."""
    kinds = plan(component, target, batch)
    if target == "tensorrt":
        return _rewrite_tensorrt(model, component, kinds)
    silu = groupnorm.fuse_silu(model) if "groupnorm" in kinds else 0
    if "residual" in kinds:
        residual.fuse_residual_adds(model)
    if "adaln" in kinds:
        adaln.clear_unused_outputs(model)
    counts = count_fused(model)
    if silu:
        counts["GroupNorm+SiLU"] = silu
    if kinds and not counts and not _uncovered.pop((component, target), False):
        raise RuntimeError(f"{component}: no fused kernel was emitted for target {target}; the export patches matched nothing")
    _last[(component, target)] = counts
    log.info("%s (%s): fused %s", component, target, counts or "nothing")
    return model


def _rewrite_tensorrt(model, component: str, kinds: tuple[str, ...]):
    """No graph pass for TensorRT (its builder fuses); check that no contrib op slipped in and count the patterns."""
    contrib = sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    if contrib:
        raise RuntimeError(f"{component}: the tensorrt-target graph holds ops TensorRT's parser cannot read: {contrib}")
    counts = {}
    if kinds:
        n = mha_pattern.count_patterns(model)
        if not n:
            raise RuntimeError(f"{component}: no attention pattern was emitted for target tensorrt; the export patches matched nothing")
        counts["attention pattern (TensorRT fuses)"] = n
    _last[(component, "tensorrt")] = counts
    log.info("%s (tensorrt): %s", component, counts or "standard ops")
    return model


def count_fused(model) -> dict[str, int]:
    c = Counter(n.op_type for n in model.graph.node if (n.domain, n.op_type) in FUSED_OPS)
    return dict(sorted(c.items()))


def describe(component: str, target: str) -> list[str]:
    """What was fused in ``component`` for ``target`` (counts), for the manifest: e.g. ``MultiHeadAttention x32``."""
    counts = _last.get((component, target), {})
    return [f"{op} x{n}" for op, n in counts.items()]


def needs_gpu_verification(model_or_counts) -> bool:
    """True when the graph holds fused ops with no ONNX Runtime CPU kernel."""
    counts = model_or_counts if isinstance(model_or_counts, dict) else count_fused(model_or_counts)
    return any(counts.get(op) for op in GPU_ONLY_OPS)


def dedupe_nodes(model) -> int:
    """Drop exact duplicate nodes (same name, op, inputs, outputs, attributes); rename other same-named ones.

    ONNX Runtime's fp16 converter inserts the same fp16->fp32 Cast twice when a tensor feeds both an op with
    always-float inputs (GroupNorm's gamma/beta, Resize) and a blocked op; ORT then refuses the model
    ("two nodes with same node name"). Returns how many nodes were dropped or renamed."""
    seen: dict[str, bytes] = {}
    keep, changed = [], 0
    for n in model.graph.node:
        key = n.SerializeToString(deterministic=True)
        if n.name and n.name in seen:
            changed += 1
            if seen[n.name] == key:
                continue  # the very same node again
            k = 1
            while f"{n.name}_{k}" in seen:
                k += 1
            n.name = f"{n.name}_{k}"
        seen[n.name] = key
        keep.append(n)
    if changed:
        del model.graph.node[:]
        model.graph.node.extend(keep)
        log.info("fp16 graph: %d duplicate nodes dropped or renamed", changed)
    return changed
