"""SmoothQuant on the ONNX graph: per-input-channel scales that move activation outliers into the weights before int8.

Xiao et al. (2022), "SmoothQuant", Eq. 4: s_j = max|X_j|^alpha / max|W_j|^(1-alpha); X diag(s)^-1 . diag(s) W is the
same product, with an activation that is easier to quantise per tensor. Applied as NVIDIA Model Optimizer does on
Linear layers (TensorRT's diffusion recipe, alpha 0.8-1.0): a per-input-channel ``pre_quant_scale`` (here a
``Mul(x, 1/s)`` before the MatMul) and the weight's input rows scaled by s; where the activation comes straight from
a LayerNorm that feeds nothing else (but Shape), 1/s is folded into its gamma and beta as the authors'
``smooth_ln_fcs`` does, and no Mul is left. Layers reading one tensor share one s (max |W_j| over all of them).
ONNX Runtime's own ``SmoothQuant`` option needs Intel Neural Compressor 2.x and its own calibration; this is the
graph glue, statistics from the captured sampler calls.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from ldm_export.runtime.errors import LdmExportError

log = logging.getLogger(__name__)

# s is clipped to this range: a channel the calibration never saw move (or a dead weight row) must not blow up
SCALE_MIN, SCALE_MAX = 1e-5, 1e5
_SUFFIX = "_smoothquant"


def parse_alpha(alpha) -> float:
    """A SmoothQuant migration strength from the CLI or the API: 0 < alpha <= 1."""
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        value = float("nan")
    if not 0.0 < value <= 1.0:  # also refuses NaN
        raise LdmExportError(f"--smoothquant {alpha!r} is not a migration strength; give alpha with 0 < alpha <= 1 "
                             "(TensorRT's diffusion recipe uses 0.8 to 1.0)")
    return value


def smoothing_scales(act_amax: np.ndarray, weight_amax: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant's per-channel scale s_j = max|X_j|^alpha / max|W_j|^(1-alpha) (Xiao et al. 2022, Eq. 4),
    clipped to [SCALE_MIN, SCALE_MAX]; channels with a zero (or non-finite) statistic keep s = 1."""
    a = np.asarray(act_amax, np.float64)
    w = np.asarray(weight_amax, np.float64)
    ok = (a > 0) & (w > 0) & np.isfinite(a) & np.isfinite(w)
    s = np.ones_like(a)
    s[ok] = a[ok] ** alpha / w[ok] ** (1.0 - alpha)
    return np.clip(s, SCALE_MIN, SCALE_MAX).astype(np.float32)


@dataclass
class Group:
    """Layers reading one activation: they share one s, applied once to that activation."""
    tensor: str
    nodes: list = field(default_factory=list)  # MatMul/Gemm NodeProtos
    channels: int = 0


def _weight_rows(node, inits: Mapping) -> tuple[int, int] | None:
    """(input-channel count, axis of the input channels in the weight) of a MatMul/Gemm layer, None if not one."""
    if len(node.input) < 2 or node.input[1] not in inits:
        return None
    dims = list(inits[node.input[1]].dims)
    if len(dims) != 2:
        return None
    if node.op_type == "MatMul":
        return dims[0], 0
    if node.op_type == "Gemm":
        attrs = {a.name: a.i for a in node.attribute}
        if attrs.get("transA", 0):
            return None  # the activation's channels are its first axis: not a per-column scale
        return (dims[1], 1) if attrs.get("transB", 0) else (dims[0], 0)
    return None


def groups_of(model, nodes: Iterable[str]) -> list[Group]:
    """The MatMul/Gemm layers among ``nodes`` that take a weight initializer, grouped by the activation they read."""
    inits = {i.name: i for i in model.graph.initializer}
    wanted = set(nodes)
    by_tensor: dict[str, Group] = {}
    for node in model.graph.node:
        if node.name not in wanted or node.op_type not in ("MatMul", "Gemm"):
            continue
        rows = _weight_rows(node, inits)
        if rows is None:
            continue
        g = by_tensor.setdefault(node.input[0], Group(node.input[0], channels=rows[0]))
        if g.channels != rows[0]:
            raise LdmExportError(f"layers reading {node.input[0]} disagree on its channel count; cannot smooth them")
        g.nodes.append(node)
    return list(by_tensor.values())


def _opset(model) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _save(model, path: Path, external: bool) -> None:
    import onnx

    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data")
    else:
        onnx.save_model(model, str(path))


def activation_amax(model_path: Path, capture, tensors: Mapping[str, int], work: Path, external: bool,
                    threads: int | None = None) -> dict[str, np.ndarray]:
    """Per-input-channel max |x| of each tensor (name -> channel count) over every recorded call: one pass of a graph
    augmented, as ONNX Runtime's calibrators do, with Reshape(-1, C) -> Abs -> ReduceMax(axis 0) per tensor."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(model_path), load_external_data=external)
    new_axes = _opset(model) >= 18  # ReduceMax takes its axes as an input from opset 18
    outputs = {}
    for k, (name, channels) in enumerate(sorted(tensors.items())):
        shape, flat, mag, out = (f"sq_amax_{k}_{x}" for x in ("shape", "flat", "abs", "out"))
        model.graph.initializer.append(numpy_helper.from_array(np.array([-1, channels], np.int64), shape))
        model.graph.node.append(helper.make_node("Reshape", [name, shape], [flat], name=f"sq_amax_{k}/Reshape"))
        model.graph.node.append(helper.make_node("Abs", [flat], [mag], name=f"sq_amax_{k}/Abs"))
        if new_axes:
            axes = f"sq_amax_{k}_axes"
            model.graph.initializer.append(numpy_helper.from_array(np.array([0], np.int64), axes))
            model.graph.node.append(helper.make_node("ReduceMax", [mag, axes], [out], keepdims=0, name=f"sq_amax_{k}/ReduceMax"))
        else:
            model.graph.node.append(helper.make_node("ReduceMax", [mag], [out], axes=[0], keepdims=0, name=f"sq_amax_{k}/ReduceMax"))
        model.graph.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, [channels]))
        outputs[out] = name
    path = work / "smoothquant_stats.onnx"
    _save(model, path, external)
    del model
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    inputs = [i.name for i in sess.get_inputs()]
    names = list(outputs)
    amax = {t: np.zeros(tensors[t], np.float32) for t in tensors}
    for i in capture.indices():
        feeds = capture.feeds(i)
        for out, value in zip(names, sess.run(names, {k: feeds[k] for k in inputs})):
            np.maximum(amax[outputs[out]], value, out=amax[outputs[out]])
    del sess
    for f in (path, path.with_name(path.name + ".data")):  # a second copy of an SD 1.5 UNet's weights: 3.4 GB
        f.unlink(missing_ok=True)
    return amax


def _unique_initializer(model, inits: dict, name: str, users: Mapping[str, int], node, slot: int):
    """The initializer at ``node.input[slot]``, copied under a new name first if other nodes read it too."""
    from onnx import numpy_helper

    tensor = inits[name]
    if users.get(name, 0) <= 1:
        return tensor
    copy = numpy_helper.from_array(numpy_helper.to_array(tensor).copy(), f"{name}{_SUFFIX}_{node.name.strip('/').replace('/', '_')}")
    model.graph.initializer.append(copy)
    copy = model.graph.initializer[-1]  # append stored a copy of the message: edit the one in the graph
    inits[copy.name] = copy
    users[name] -= 1
    users[copy.name] = 1
    node.input[slot] = copy.name
    return copy


def _set_array(tensor, array: np.ndarray) -> None:
    from onnx import numpy_helper

    tensor.CopyFrom(numpy_helper.from_array(array.astype(numpy_helper.to_array(tensor).dtype), tensor.name))


def _foldable_layernorm(model, group: Group, producers: dict, consumers: dict, inits: Mapping):
    """The LayerNormalization producing ``group.tensor`` when 1/s can go into its gamma and beta: it normalises the last
    axis, has float initializers for both, and its output feeds only this group's layers (and Shape, which reads no
    values); else None."""
    ln = producers.get(group.tensor)
    if ln is None or ln.op_type != "LayerNormalization" or ln.domain not in ("", "ai.onnx"):
        return None
    axis = next((a.i for a in ln.attribute if a.name == "axis"), -1)
    if axis != -1 or len(ln.input) < 2 or ln.input[1] not in inits:
        return None
    if len(ln.input) > 2 and ln.input[2] and ln.input[2] not in inits:
        return None
    if list(inits[ln.input[1]].dims) != [group.channels]:
        return None
    if any(o for o in ln.output[1:] if consumers.get(o)):  # Mean / InvStdDev are read: keep them as they are
        return None
    members = {id(n) for n in group.nodes}
    if any(id(c) not in members and c.op_type != "Shape" for c in consumers.get(group.tensor, [])):
        return None
    if any(o.name == group.tensor for o in model.graph.output):
        return None
    return ln


def apply_smoothing(model, groups: Sequence[Group], act_amax: Mapping[str, np.ndarray], alpha: float) -> dict:
    """Smooth ``model`` in place for ``alpha``: each group's weights get their input rows scaled by s, its activation
    is divided by s (folded into a LayerNorm where it can be, else a Mul before the layers). Returns what was done."""
    from onnx import helper, numpy_helper

    alpha = parse_alpha(alpha)
    inits = {i.name: i for i in model.graph.initializer}
    users: dict[str, int] = {}
    producers, consumers = {}, {}
    for node in model.graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
            consumers.setdefault(name, []).append(node)
        for name in node.output:
            producers[name] = node
    folded = muls = 0
    lo, hi = np.inf, 0.0
    for g in groups:
        rows = [_weight_rows(n, inits) for n in g.nodes]
        w_amax = np.max([np.abs(numpy_helper.to_array(inits[n.input[1]])).max(axis=1 - ax) for n, (_, ax) in zip(g.nodes, rows)],
                        axis=0)
        s = smoothing_scales(act_amax[g.tensor], w_amax, alpha)
        lo, hi = min(lo, float(s.min())), max(hi, float(s.max()))
        for node, (_, ax) in zip(g.nodes, rows):
            weight = _unique_initializer(model, inits, node.input[1], users, node, 1)
            w = numpy_helper.to_array(weight).astype(np.float64)
            _set_array(weight, w * (s[:, None] if ax == 0 else s[None, :]))
        inv = (1.0 / s.astype(np.float64))
        ln = _foldable_layernorm(model, g, producers, consumers, inits)
        if ln is not None:
            for slot in (1, 2):
                if slot < len(ln.input) and ln.input[slot]:
                    t = _unique_initializer(model, inits, ln.input[slot], users, ln, slot)
                    _set_array(t, numpy_helper.to_array(t).astype(np.float64) * inv)
            folded += 1
            continue
        scale_name, smoothed = f"{g.tensor}{_SUFFIX}_inv_scale", f"{g.tensor}{_SUFFIX}"
        model.graph.initializer.append(numpy_helper.from_array(inv.astype(np.float32), scale_name))
        mul = helper.make_node("Mul", [g.tensor, scale_name], [smoothed],
                               name=g.nodes[0].name.rsplit("/", 1)[0] + "/SmoothQuantMul")
        for node in g.nodes:
            node.input[0] = smoothed
        # before the group's first layer in the node list: the list is topologically sorted and x exists there
        first = min(i for i, n in enumerate(model.graph.node) if any(n is m for m in g.nodes))
        model.graph.node.insert(first, mul)
        muls += 1
    return {"alpha": alpha, "layers": sum(len(g.nodes) for g in groups), "groups": len(groups),
            "folded_into_layernorm": folded, "mul_nodes": muls,
            "scale_range": [lo, hi] if groups else None, "statistic": "per-input-channel max |x| over every recorded call"}


def smooth_graph(src: Path, dst: Path, capture, nodes: Sequence[str], alpha: float, work: Path, external: bool = False,
                 threads: int | None = None) -> dict:
    """``src`` with SmoothQuant applied to the MatMul/Gemm layers among ``nodes``, written to ``dst``; the float
    outputs are unchanged (up to rounding). Statistics from every call of ``capture``."""
    import onnx

    alpha = parse_alpha(alpha)
    model = onnx.load(str(src), load_external_data=external)
    groups = groups_of(model, nodes)
    if not groups:
        del model
        raise LdmExportError("SmoothQuant found no Linear layer (MatMul/Gemm with a weight) to smooth at this quant level; "
                             "use a level of 2 or more, or leave --smoothquant out")
    act = activation_amax(src, capture, {g.tensor: g.channels for g in groups}, work, external, threads)
    info = apply_smoothing(model, groups, act, alpha)
    _save(model, dst, external)
    log.info("SmoothQuant alpha %g: %d layers in %d groups (%d folded into LayerNorm, %d Mul)", alpha, info["layers"],
             info["groups"], info["folded_into_layernorm"], info["mul_nodes"])
    return info
