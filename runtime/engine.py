"""Engines behind one small protocol: ``run(feeds) -> dict of outputs``, plus ``spec``.

ONNX Runtime here (CPU, CUDA EP, TensorRT EP); native TensorRT lives in its own module.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Mapping, Protocol

import numpy as np

from .checks import cap_threads
from .errors import LdmExportError, load_error
from .spec import ComponentSpec

log = logging.getLogger(__name__)

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "nv-tensorrt-rtx": "NvTensorRTRTXExecutionProvider",
}


class Engine(Protocol):
    spec: ComponentSpec

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


_WARNED: set[str] = set()  # warn once per missing provider, not once per component


def resolve_providers(provider: str) -> list[str]:
    """ONNX Runtime provider list for ``provider``, falling back to the CPU with a warning when missing."""
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise LdmExportError(f"unknown provider '{provider}'; choose one of: {', '.join(PROVIDERS)}")
    available = ort.get_available_providers()
    wanted = PROVIDERS[provider]
    if wanted not in available:
        if provider == "cpu":
            raise LdmExportError("onnxruntime has no CPU provider; reinstall onnxruntime")
        hint = {"cuda": "install onnxruntime-gpu (in place of onnxruntime)",
                "nv-tensorrt-rtx": "install an onnxruntime built with the NvTensorRTRTX provider (onnxruntime's "
                                   "TensorRT-RTX packages), in place of onnxruntime"}.get(
            provider, "install onnxruntime-gpu built with TensorRT, and TensorRT")
        if provider not in _WARNED:
            _WARNED.add(provider)
            log.warning("provider '%s' is not available in this onnxruntime (%s); falling back to the CPU: %s",
                        provider, ", ".join(available), hint)
        return ["CPUExecutionProvider"]
    chain = [wanted]
    if provider == "tensorrt" and "CUDAExecutionProvider" in available:
        chain.append("CUDAExecutionProvider")
    if wanted != "CPUExecutionProvider":
        chain.append("CPUExecutionProvider")  # ops the GPU providers lack
    return chain


class OrtEngine:
    """One ONNX Runtime session over one component's model.onnx, with inputs checked against its spec."""

    def __init__(self, model_path: str | os.PathLike, spec: ComponentSpec, provider: str = "cpu",
                 threads: int | None = None, session_options=None, provider_options: Mapping[str, str] | None = None):
        import onnxruntime as ort

        self.spec = spec
        self.path = Path(model_path)
        so = session_options or ort.SessionOptions()
        threads = cap_threads(threads)
        if threads:
            so.intra_op_num_threads = threads
        so.log_severity_level = 3
        self.providers = resolve_providers(provider)
        providers = list(self.providers)
        if provider_options and providers[0] == PROVIDERS.get(provider):
            providers[0] = (providers[0], dict(provider_options))  # options for the provider asked for, not a fallback
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=so, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types for unreadable models
            raise load_error(self.path, e) from e
        spec.check_graph(self.session, self.path)
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.spec.check_feeds(feeds)
        outs = self.session.run(self.output_names, dict(feeds))
        return dict(zip(self.output_names, outs))
