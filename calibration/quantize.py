"""int8 QDQ quantisation of the UNet with ONNX Runtime's quantisation tool, by TensorRT's diffusion recipe.

Recipe (NVIDIA Model Optimizer as TensorRT's demo/Diffusion uses it): symmetric per-channel int8 weights,
per-tensor activations; activation ranges taken per denoising step and combined across steps (the first
``step_share`` of the steps, from the noisiest, then the minimum over them: Model Optimizer's
``PercentileCalibrator`` with ``collect_method`` "min-mean"); quant levels choosing which layers are int8, and
a named list of layers that stay in floating point. ONNX Runtime's calibrators (MinMax, Percentile, Entropy)
compute each step's ranges; we combine them and hand the table to ``quantize_static`` as its calibration cache.
"""
from __future__ import annotations

import contextlib
import io
import logging
import re
import tempfile
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from ldm_export.runtime.errors import LdmExportError

log = logging.getLogger(__name__)

QUANT_LEVELS = (1.0, 2.0, 2.5, 3.0)
# TensorRT's demo/Diffusion keeps these in higher precision (its filter_func): timestep embedding, the first and
# last convolutions, residual shortcuts, SDXL's added embedding, the transformers' output projection
EXCLUDED = ("time_emb_proj", "time_embedding", "conv_in", "conv_out", "conv_shortcut", "add_embedding", "proj_out")
METHODS = ("minmax", "percentile", "entropy")
# QDQ flavours: TensorRT's parser takes no int32 DequantizeLinear (biases stay float); ONNX Runtime's CPU
# kernels fuse Q/DQ around Conv into QLinearConv only with an int32 bias
FORMATS = ("tensorrt", "onnxruntime")
ACTIVATION_TYPES = ("s8", "u8")
QUANTISABLE = ("Conv", "MatMul", "Gemm")
LEVEL_HELP = ("1: convolutions; 2: + feed-forward Linear layers (ff.net); 2.5: + attention Q/K/V projections; "
              "3: every Linear layer (TensorRT's quant levels); always excluded: " + ", ".join(EXCLUDED))


def parse_level(level) -> float:
    """A quant level from the CLI or the API: 1, 2, 2.5 or 3."""
    try:
        value = float(level)
    except (TypeError, ValueError):
        value = None
    if value not in QUANT_LEVELS:
        raise LdmExportError(f"quant level {level!r} does not exist; choose one of 1, 2, 2.5, 3 ({LEVEL_HELP})")
    return value


def layer_class(node_name: str, op_type: str) -> str:
    """Which class of layer a Conv/MatMul/Gemm node is, from the module path the exporter writes into its name."""
    if re.search("|".join(EXCLUDED), node_name):
        return "excluded"
    if op_type == "Conv":
        return "conv"
    if "/ff/net" in node_name:
        return "ffn"
    if re.search(r"/to_[qkv]/", node_name):
        return "qkv"
    return "linear"


_LEVEL_OF = {"conv": 1.0, "ffn": 2.0, "qkv": 2.5, "linear": 3.0}


def select_nodes(model, level: float) -> tuple[list[str], dict[str, dict[str, int]]]:
    """Names of the nodes to quantise at ``level`` (Conv/MatMul/Gemm with a weight initializer: layers, not the
    attention's activation-by-activation products), and counts by class: {class: {"total", "int8"}}."""
    inits = {i.name for i in model.graph.initializer}
    chosen, counts = [], {}
    for node in model.graph.node:
        if node.op_type not in QUANTISABLE or len(node.input) < 2 or node.input[1] not in inits:
            continue
        cls = layer_class(node.name, node.op_type)
        c = counts.setdefault(cls, {"total": 0, "int8": 0})
        c["total"] += 1
        if cls != "excluded" and _LEVEL_OF[cls] <= level:
            chosen.append(node.name)
            c["int8"] += 1
    return chosen, counts


def calibration_tensors(model, nodes: Iterable[str]) -> set[str]:
    """The activations whose ranges the quantiser needs: the inputs and outputs of ``nodes`` that are not weights."""
    inits = {i.name for i in model.graph.initializer}
    wanted = set(nodes)
    out = set()
    for node in model.graph.node:
        if node.name in wanted:
            out.add(node.input[0])
            out.update(o for o in node.output if o)
    return out - inits


def preprocess(src: Path, dst: Path, external: bool) -> None:
    """ONNX Runtime's pre-processing (shape inference + basic graph optimisation) before quantisation; its
    symbolic shape inference fails on these exports, ONNX's own shape inference is kept."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(src), str(dst), skip_symbolic_shape=True, save_as_external_data=external,
                      all_tensors_to_one_file=True, external_data_location=dst.name + ".data" if external else None)


class _Reader:
    """An ONNX Runtime ``CalibrationDataReader`` over recorded UNet calls."""

    def __init__(self, capture, indices: Sequence[int], input_names: Sequence[str]):
        self.capture, self.indices, self.names = capture, list(indices), list(input_names)
        self.pos = 0

    def get_next(self):
        if self.pos >= len(self.indices):
            return None
        feeds = self.capture.feeds(self.indices[self.pos])
        self.pos += 1
        return {k: feeds[k] for k in self.names}

    def __len__(self):
        return len(self.indices)

    def set_range(self, start_index: int, end_index: int):
        self.indices = self.indices[start_index:end_index]
        self.pos = 0


def step_amax(model_path: Path, capture, method: str, tensors: set[str], work: Path, external: bool,
              percentile: float = 99.99) -> dict[int, dict[str, float]]:
    """Per denoising step, the symmetric range (amax) of each tensor in ``tensors`` by ONNX Runtime's ``method``
    calibrator over that step's recorded calls: {step: {tensor: amax}}."""
    from onnxruntime.quantization.calibrate import EntropyCalibrater, MinMaxCalibrater, PercentileCalibrater

    if method not in METHODS:
        raise LdmExportError(f"unknown calibration method {method!r}; choose one of: {', '.join(METHODS)}")
    kwargs = dict(augmented_model_path=str(work / "augmented.onnx"), use_external_data_format=external, symmetric=True)
    if method == "minmax":
        cal = MinMaxCalibrater(str(model_path), None, **kwargs)
    elif method == "percentile":
        cal = PercentileCalibrater(str(model_path), None, num_bins=2048, percentile=percentile, **kwargs)
    else:
        # 512 bins: the threshold search is a Python loop over every candidate bin, 4x slower at 2048
        cal = EntropyCalibrater(str(model_path), None, num_bins=512, num_quantized_bins=128, **kwargs)
    select = cal.select_tensors_to_calibrate

    def only_needed(model):  # the quantised nodes' activations only: all of them would hold GBs (attention maps)
        found, infos = select(model)
        return found & tensors, infos

    cal.select_tensors_to_calibrate = only_needed
    cal.augment_graph()
    cal.create_inference_session()
    names = [i.name for i in cal.infer_session.get_inputs()]
    out: dict[int, dict[str, float]] = {}
    for step in capture.steps:
        # a fresh statistic per step: the calibrators merge across collect_data calls otherwise
        if method == "minmax":
            cal.calibrate_tensors_range = None
        else:
            cal.collector = None
        with contextlib.redirect_stdout(io.StringIO()) as said:  # ONNX Runtime's histogram calibrators print
            cal.collect_data(_Reader(capture, capture.indices(step), names))
            ranges = cal.compute_data()
        log.debug("%s", said.getvalue().strip())
        out[step] = {name: float(max(np.max(np.abs(td.range_value[0])), np.max(np.abs(td.range_value[1]))))
                     for name, td in ranges.items()}
        log.info("step %d: ranges of %d tensors", step, len(out[step]))
    del cal
    return out


def combine_steps(per_step: Mapping[int, Mapping[str, float]], step_share: float = 1.0, how: str = "min") -> dict[str, float]:
    """One amax per tensor from per-step amaxes: the first ``step_share`` of the steps (noisiest first), then the
    minimum over them (TensorRT's recipe; ``how="max"`` gives the pooled range instead)."""
    if not per_step:
        raise LdmExportError("no calibration steps to combine")
    if not 0 < step_share <= 1:
        raise LdmExportError(f"step share must lie in (0, 1], got {step_share}")
    steps = sorted(per_step)
    kept = steps[:max(1, int(round(step_share * len(steps))))]
    reduce = {"min": min, "max": max}[how]
    names = set.intersection(*(set(per_step[s]) for s in kept))
    return {n: float(reduce(per_step[s][n] for s in kept)) for n in sorted(names)}


def write_table(amax: Mapping[str, float], method: str, path: Path) -> None:
    """The combined ranges as ONNX Runtime's calibration cache (symmetric: lowest = -amax, highest = amax)."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData, save_tensors_data

    enum = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
            "entropy": CalibrationMethod.Entropy}[method]
    data = {n: TensorData(lowest=np.array(-a, np.float32), highest=np.array(a, np.float32)) for n, a in amax.items()}
    save_tensors_data(TensorsData(enum, data), path)


def quantize_qdq(model_path: Path, out_path: Path, table: Path, method: str, nodes: Sequence[str],
                 fmt: str = "tensorrt", activation_type: str = "s8", external: bool = False) -> None:
    """QDQ int8 graph of ``model_path`` with the ranges in ``table``: per-channel symmetric int8 weights,
    per-tensor symmetric activations, only ``nodes`` quantised."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if fmt not in FORMATS:
        raise LdmExportError(f"unknown int8 format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if activation_type not in ACTIVATION_TYPES:
        raise LdmExportError(f"unknown activation type {activation_type!r}; choose one of: {', '.join(ACTIVATION_TYPES)}")
    if fmt == "tensorrt" and activation_type != "s8":
        raise LdmExportError("TensorRT takes symmetric int8 activations only; use s8 activations for the tensorrt format")
    enum = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
            "entropy": CalibrationMethod.Entropy}[method]
    quantize_static(
        str(model_path), str(out_path), calibration_data_reader=None, quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(QUANTISABLE), per_channel=True, reduce_range=False,
        activation_type=QuantType.QInt8 if activation_type == "s8" else QuantType.QUInt8, weight_type=QuantType.QInt8,
        nodes_to_quantize=list(nodes), use_external_data_format=external, calibrate_method=enum,
        calibration_cache_path=str(table),
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": fmt == "onnxruntime"},
    )


def quantize_unet(fp32_path: Path, out_path: Path, capture, method: str = "percentile", level: float = 2.5,
                  fmt: str = "tensorrt", activation_type: str = "s8", step_share: float = 1.0, combine: str = "min",
                  table_out: Path | None = None, smoothquant: float | None = None) -> dict:
    """fp32 UNet graph -> int8 QDQ graph at ``out_path`` calibrated on ``capture`` (SmoothQuant first on the Linear
    layers to quantise when ``smoothquant`` gives its alpha); returns what was done."""
    import onnx

    from .smooth import parse_alpha, smooth_graph

    level = parse_level(level)
    if smoothquant is not None:
        smoothquant = parse_alpha(smoothquant)
    external = (fp32_path.parent / "model.onnx_data").exists() or fp32_path.stat().st_size > 2**31 - 1
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".int8-") as tmp:
        work = Path(tmp)
        pre = work / "pre.onnx"
        preprocess(fp32_path, pre, external)
        model = onnx.load(str(pre), load_external_data=False)
        nodes, counts = select_nodes(model, level)
        if not nodes:
            raise LdmExportError(f"quant level {level:g} selects no layer of this UNet; nothing to quantise")
        smooth = None
        if smoothquant is not None:
            del model
            smoothed = work / "smoothed.onnx"
            smooth = smooth_graph(pre, smoothed, capture, nodes, smoothquant, work, external)
            pre = smoothed
            model = onnx.load(str(pre), load_external_data=False)
        tensors = calibration_tensors(model, nodes)
        del model
        per_step = step_amax(pre, capture, method, tensors, work, external)
        amax = combine_steps(per_step, step_share, combine)
        missing = tensors - set(amax)
        if missing:
            raise LdmExportError(f"calibration gave no range for {len(missing)} tensors (e.g. {sorted(missing)[0]}); "
                                 "the capture does not reach them")
        table = table_out or work / "table.json"
        write_table(amax, method, table)
        quantize_qdq(pre, out_path, table, method, nodes, fmt, activation_type, external)
    zero = sorted(n for n, a in amax.items() if a == 0.0)
    return {"method": method, "level": level, "format": fmt, "activation_type": activation_type,
            "weights": "int8 per-channel symmetric", "activations": f"{activation_type} per-tensor symmetric",
            "step_share": step_share, "combine": f"{combine} over steps", "steps": sorted(per_step),
            "layers": counts, "excluded_names": list(EXCLUDED), "quantised_nodes": len(nodes),
            "tensors_with_zero_range": len(zero), "smoothquant": smooth}
