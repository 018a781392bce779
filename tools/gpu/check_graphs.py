"""On the GPU machine: Memcpy and Shape nodes in ONNX Runtime's optimised CUDA graphs of a bundle, fused-op counts."""
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch  # noqa: F401  (loads the CUDA libraries onnxruntime-gpu links against)
import onnx
import onnxruntime as ort

from ldm_export.runtime.bundle import Bundle

b = Bundle.open(sys.argv[1])
for comp in b.components:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    with tempfile.TemporaryDirectory() as tmp:
        so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "opt.onnx_data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        ort.InferenceSession(str(b.model_path(comp)), so, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        ops = Counter(n.op_type for n in onnx.load(so.optimized_model_filepath, load_external_data=False).graph.node)
    memcpy = sum(v for k, v in ops.items() if k.startswith("Memcpy"))
    print(f"{comp}: optimised CUDA graph: {sum(ops.values())} nodes, Memcpy {memcpy}, Shape {ops.get('Shape', 0)}, "
          f"kernels {b.manifest['components'][comp].get('kernels')}; top ops {ops.most_common(8)}")
