"""On the GPU machine: ONNX Runtime's optimised CUDA graphs of a bundle: Memcpy, Shape and Transpose nodes, fused ops.

    python tools/gpu/check_graphs.py BUNDLE [--nhwc]

``--nhwc`` also loads the UNet and VAE decoder with the CUDA provider's ``prefer_nhwc`` (channels-last convolutions)
and counts what the layout transformer leaves.
"""
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch  # noqa: F401  (loads the CUDA libraries onnxruntime-gpu links against)
import onnx
import onnxruntime as ort

from ldm_export.runtime.bundle import Bundle


def optimised_ops(path: Path, prefer_nhwc: bool) -> Counter:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    with tempfile.TemporaryDirectory() as tmp:
        so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "opt.onnx_data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        cuda = {"prefer_nhwc": "1" if prefer_nhwc else "0"}
        ort.InferenceSession(str(path), so, providers=[("CUDAExecutionProvider", cuda), "CPUExecutionProvider"])
        g = onnx.load(so.optimized_model_filepath, load_external_data=False).graph
        return Counter((n.domain + "::" if "nhwc" in n.domain else "") + n.op_type for n in g.node)


b = Bundle.open(sys.argv[1])
for comp in b.components:
    for nhwc in ((False, True) if "--nhwc" in sys.argv[2:] and comp != "text_encoder" else (False,)):
        ops = optimised_ops(b.model_path(comp), nhwc)
        memcpy = sum(v for k, v in ops.items() if k.startswith("Memcpy"))
        nhwc_ops = sum(v for k, v in ops.items() if "nhwc" in k)
        print(f"{comp}{' (prefer_nhwc)' if nhwc else ''}: optimised CUDA graph: {sum(ops.values())} nodes, Memcpy {memcpy}, "
              f"Shape {ops.get('Shape', 0)}, Transpose {ops.get('Transpose', 0)}, Cast {ops.get('Cast', 0)}, NHWC ops "
              f"{nhwc_ops}, kernels {b.manifest['components'][comp].get('kernels')}; top ops {ops.most_common(10)}", flush=True)
