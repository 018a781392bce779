"""Export one wrapped component to ONNX as its ComponentSpec says, and verify it against torch."""
from __future__ import annotations

import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx
import torch

from ldm_export.runtime.errors import LdmExportError
from ldm_export.runtime.spec import ComponentSpec

log = logging.getLogger(__name__)

OPSET = 17
TWO_GB = 2**31 - 1
EXTERNAL_DATA = "model.onnx_data"  # Optimum's name for the weights file beside model.onnx


def sample_inputs(spec: ComponentSpec, dims: Mapping[str, int] | None = None, seed: int = 0,
                  vocab_size: int = 49408, latent_scale: float = 0.18215) -> dict[str, np.ndarray]:
    """Realistic verification inputs for ``spec`` (float32/int32), deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for t in spec.inputs:
        shape = spec.concrete_shape(t, dims)
        if t.name == "input_ids":  # bos, words, eos, padding: the shape of a real prompt
            ids = np.full(shape, 49407, dtype=np.int32)
            for row in ids:
                n = int(rng.integers(3, shape[1] - 2))
                row[0] = 49406
                row[1:n] = rng.integers(256, min(vocab_size, 49406), n - 1)
            feeds[t.name] = ids
        elif t.name == "timestep":
            feeds[t.name] = np.asarray(rng.uniform(1, 999), dtype=np.float32).reshape(shape)
        elif t.name == "latent_sample":  # decoder input is latents / scale, std about 1/scale
            feeds[t.name] = (rng.standard_normal(shape) / latent_scale).astype(np.float32)
        else:
            feeds[t.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(a, copy=True, order="C"))  # keeps 0-d arrays 0-d (ascontiguousarray does not)


def torch_outputs(module: torch.nn.Module, spec: ComponentSpec, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    with torch.inference_mode():
        out = module(*[_tensor(feeds[n]) for n in spec.input_names])
    out = out if isinstance(out, (tuple, list)) else (out,)
    return [o.detach().float().numpy() for o in out]


def export_onnx(module: torch.nn.Module, spec: ComponentSpec, out_dir: Path, example: Mapping[str, np.ndarray],
                static: bool = False, opset: int = OPSET) -> onnx.ModelProto:
    """Trace ``module`` (forward == spec) to ONNX and return the loaded ModelProto (weights in memory)."""
    args = tuple(_tensor(example[n]) for n in spec.input_names)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".trace-") as tmp:
        path = Path(tmp) / "model.onnx"
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")
            # The TorchScript exporter: 10x faster than the dynamo one on these models, and its graphs are
            # what ONNX Runtime and TensorRT's SD tooling are tuned on.
            torch.onnx.export(
                module, args, str(path), input_names=spec.input_names, output_names=spec.output_names,
                dynamic_axes=None if static else spec.dynamic_axes(), opset_version=opset,
                do_constant_folding=True, dynamo=False,
            )
        model = onnx.load(str(path), load_external_data=True)
    return model


def save_onnx(model: onnx.ModelProto, path: Path) -> list[Path]:
    """Write model.onnx, with its weights in one model.onnx_data beside it when over 2 GB; return the files."""
    size = model.ByteSize() if _fits_protobuf(model) else TWO_GB + 1
    if size < TWO_GB:
        onnx.save_model(model, str(path))
        return [path]
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=EXTERNAL_DATA, size_threshold=1024)
    return [path, path.parent / EXTERNAL_DATA]


def _fits_protobuf(model: onnx.ModelProto) -> bool:
    total = 0
    for init in model.graph.initializer:
        total += len(init.raw_data) if init.HasField("raw_data") else 0
        if total >= TWO_GB:
            return False
    return True


# Documented thresholds: cosine similarity of each output against torch fp32 on the same inputs.
COSINE_THRESHOLD = {"fp32": 0.99999, "fp16": 0.999}


@dataclass
class Verification:
    component: str
    precision: str
    provider: str
    outputs: dict[str, dict[str, float]]  # output name -> {max_abs, cosine, ref_max_abs}
    threshold: float
    passed: bool

    def to_json(self) -> dict:
        return {"provider": self.provider, "precision": self.precision, "cosine_threshold": self.threshold,
                "passed": self.passed, "outputs": self.outputs}


def compare(name: str, got: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    g = got.astype(np.float64).ravel()
    r = ref.astype(np.float64).ravel()
    if g.shape != r.shape:
        raise LdmExportError(f"{name}: exported output has {got.shape}, torch gives {ref.shape}; re-export")
    finite = bool(np.isfinite(g).all())
    with np.errstate(all="ignore"):  # non-finite outputs are reported below, not warned about by numpy
        denom = np.linalg.norm(g) * np.linalg.norm(r)
        cos = float(g @ r / denom) if denom > 0 else float(np.array_equal(g, r))
    return {"max_abs": float(np.abs(g - r).max()) if finite else float("inf"), "cosine": cos if finite else float("nan"),
            "ref_max_abs": float(np.abs(r).max())}


def check_verify_provider(provider: str) -> None:
    """Refuse, before any work, to verify on the CUDA provider where ONNX Runtime has none (onnxruntime without GPU
    support): a --target cuda build would otherwise fail after its first component's export."""
    from ldm_export.runtime.engine_cuda import cuda_available

    if provider == "cuda" and not cuda_available():
        raise LdmExportError("verifying a cuda-target graph needs onnxruntime-gpu (ONNX Runtime's fused GPU kernels "
                             "in it have no CPU version, or none for fp16): build on a CUDA machine, or use --target cpu")


def verify(onnx_path: Path, spec: ComponentSpec, feeds: Mapping[str, np.ndarray], reference: list[np.ndarray],
           precision: str, threads: int | None = None, provider: str = "cpu") -> Verification:
    """Run the exported graph in ONNX Runtime (``provider``: cpu or cuda) on ``feeds``; compare outputs with torch fp32."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    if provider == "cuda":
        check_verify_provider(provider)
        providers = [("CUDAExecutionProvider", {"use_tf32": 0}), "CPUExecutionProvider"]  # true fp32, not TF32
    else:
        providers = ["CPUExecutionProvider"]
    sess = ort.InferenceSession(str(onnx_path), sess_options=so, providers=providers)
    typed = {}
    for t in spec.inputs:
        typed[t.name] = feeds[t.name].astype(t.dtype)
    outs = sess.run(spec.output_names, typed)
    results = {n: compare(n, o, r) for n, o, r in zip(spec.output_names, outs, reference)}
    thr = COSINE_THRESHOLD[precision]
    passed = all(np.isfinite(v["cosine"]) and v["cosine"] >= thr for v in results.values())
    return Verification(spec.name, precision, sess.get_providers()[0], results, thr, passed)
