"""Does TensorRT take an int8 QDQ graph? Parse it with TensorRT's ONNX parser and build a plan with one optimisation
profile, using whichever TensorRT is installed: full TensorRT (``tensorrt``) or TensorRT-RTX
(``tensorrt_rtx_bindings``, whose builder and parser run on a machine without a GPU)."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Mapping, Sequence

from ldm_export.runtime.errors import LdmExportError

log = logging.getLogger(__name__)


def import_tensorrt():
    """TensorRT's Python module: ``tensorrt`` where installed, else TensorRT-RTX's ``tensorrt_rtx_bindings``."""
    for name in ("tensorrt", "tensorrt_rtx_bindings"):
        try:
            module = __import__(name)
        except ImportError:
            continue
        if hasattr(module, "Builder"):  # PyPI's `tensorrt` stub imports but has no API
            return module
    raise LdmExportError("neither TensorRT nor TensorRT-RTX is installed: pip install tensorrt-rtx-cu13-libs "
                         "tensorrt-rtx-cu13-bindings (the builder runs on a CPU)")


def parse_and_build(onnx_path: str | Path, profile: Mapping[str, Sequence[tuple[int, ...]]],
                    workspace_gb: float = 2.0) -> dict:
    """Parse ``onnx_path`` (strongly typed: the graph's own Q/DQ types decide what runs int8) and build a plan with
    ``profile`` {input: (min, opt, max)}; returns {"parsed", "built", "errors", "plan_bytes", "seconds", "layers"}."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    t0 = time.perf_counter()
    parsed = parser.parse_from_file(str(onnx_path))
    errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
    result = {"tensorrt": f"{trt.__name__} {getattr(trt, '__version__', '?')}", "parsed": bool(parsed),
              "built": False, "errors": errors, "plan_bytes": 0, "seconds": None, "layers": network.num_layers}
    if not parsed:
        return result
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2**30))
    opt = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        lo, mid, hi = profile[name]
        opt.set_shape(name, lo, mid, hi)
    config.add_optimization_profile(opt)
    plan = builder.build_serialized_network(network, config)
    result["seconds"] = time.perf_counter() - t0
    if plan is None:
        result["errors"].append("build_serialized_network returned no plan (see TensorRT's log)")
        return result
    result["built"] = True
    result["plan_bytes"] = int(plan.nbytes)
    return result


def unet_profile(spec, side: int, batch: int = 2, sequence: int = 77) -> dict[str, tuple[tuple[int, ...], ...]]:
    """min = opt = max at CFG's batch 2, the given latent side and prompt length, from the UNet's ComponentSpec."""
    shapes = {}
    for t in spec.inputs:
        dims = []
        for d in t.shape:
            if isinstance(d, int):
                dims.append(d)
            elif d == "batch":
                dims.append(batch)
            elif d in ("height", "width"):
                dims.append(side)
            elif d == "sequence":
                dims.append(sequence)
            else:
                raise LdmExportError(f"no size for dimension {d!r} of {t.name}; give a static profile")
        s = tuple(dims)
        shapes[t.name] = (s, s, s)
    return shapes
