"""ONNX Runtime's TensorRT and NvTensorRTRTX execution providers over a bundle, with their caches in the bundle.

Both providers build a TensorRT (or TensorRT-RTX) engine from the ONNX graph when a session is made, which takes
minutes for a full-size UNet; their caches make that a one-time cost: the TensorRT provider's engine and timing
caches, and the NvTensorRTRTX provider's runtime cache (JIT-compiled kernels), go to
``BUNDLE/engines/ort-<provider>/<component>/``. The optimisation profile comes from the component's spec (min/opt/max
of each symbolic dim, the same ranges ``ldm-export engines`` builds); a static-shape bundle needs none and runs as a
CUDA graph. Option names are ONNX Runtime's (TensorRT-ExecutionProvider and NvTensorRTRTX provider docs).
"""
from __future__ import annotations

import logging
from pathlib import Path

from .bundle import Bundle
from .engine import PROVIDERS, OrtEngine
from .engine_tensorrt import engines_root
from .errors import LdmExportError
from .spec import ComponentSpec

log = logging.getLogger(__name__)

ORT_TENSORRT_PROVIDERS = ("tensorrt", "nv-tensorrt-rtx")


def profile_strings(spec: ComponentSpec) -> dict[str, str] | None:
    """``{"min": "sample:1x4x32x32,encoder_hidden_states:1x77x768", "opt": ..., "max": ...}`` over the inputs with
    symbolic dims (ONNX Runtime's shape-list syntax); None for a static spec."""
    dynamic = [t for t in spec.inputs if any(isinstance(d, str) for d in t.shape)]
    if not dynamic:
        return None
    return {w: ",".join(f"{t.name}:{'x'.join(map(str, spec.concrete_shape(t, which=w)))}" for t in dynamic)
            for w in ("min", "opt", "max")}


def cache_dir(bundle: Bundle, component: str, provider: str) -> Path:
    return engines_root(bundle.path) / f"ort-{provider}" / component


def provider_options(bundle: Bundle, component: str, provider: str) -> dict[str, str]:
    """The provider options for one component: caches in the bundle, the spec's profile, CUDA graphs when static."""
    if provider not in ORT_TENSORRT_PROVIDERS:
        raise LdmExportError(f"not an ONNX Runtime TensorRT provider: {provider!r}; choose {', '.join(ORT_TENSORRT_PROVIDERS)}")
    spec = bundle.spec(component)
    cache = cache_dir(bundle, component, provider)
    shapes = profile_strings(spec)
    # the text encoder keeps a few shape ops on the CPU in ONNX Runtime's partitioning: no CUDA graph for it
    graph = "True" if spec.is_static and component != "text_encoder" else "False"
    if provider == "tensorrt":
        opts = {"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(cache),
                "trt_timing_cache_enable": "True", "trt_timing_cache_path": str(cache), "trt_cuda_graph_enable": graph}
        prefix = "trt_profile_"
    else:
        opts = {"nv_runtime_cache_path": str(cache), "enable_cuda_graph": graph}
        prefix = "nv_profile_"
    if shapes:
        opts.update({f"{prefix}{w}_shapes": v for w, v in shapes.items()})
    return opts


def ort_tensorrt_engine(bundle: Bundle, component: str, provider: str, threads: int | None = None) -> OrtEngine:
    """An OrtEngine on ONNX Runtime's TensorRT or NvTensorRTRTX provider with caches in the bundle (falls back to the
    CPU with one warning, as every provider does, when this onnxruntime lacks it)."""
    opts = provider_options(bundle, component, provider)
    import onnxruntime as ort

    if PROVIDERS[provider] in ort.get_available_providers():
        try:
            cache_dir(bundle, component, provider).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LdmExportError(f"cannot create the {provider} cache in {cache_dir(bundle, component, provider)}: "
                                 f"{e.strerror}; make the bundle writable") from None
    engine = OrtEngine(bundle.model_path(component), bundle.spec(component), provider=provider, threads=threads,
                       provider_options=opts)
    running = engine.session.get_providers()
    if PROVIDERS[provider] in ort.get_available_providers() and running[0] != PROVIDERS[provider]:
        # onnxruntime lists a provider whose libraries (TensorRT's) it then fails to load, and retries without it
        log.warning("%s: ONNX Runtime could not start %s (are TensorRT's libraries installed?); running on %s",
                    component, PROVIDERS[provider], running[0])
    return engine
