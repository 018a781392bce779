"""ONNX Runtime's TensorRT and NvTensorRTRTX providers: options from the spec, caches in the bundle, CPU fallback;
the run itself where onnxruntime has the provider and a GPU (skipped with the reason elsewhere)."""
from __future__ import annotations

import logging
import shutil

import numpy as np
import onnxruntime as ort
import pytest

from ldm_export.runtime.bundle import Bundle
from ldm_export.runtime.engine_ort_trt import profile_strings, provider_options
from ldm_export.runtime.errors import LdmExportError
from ldm_export.runtime.pipeline import Pipeline
from ldm_export.runtime.spec import unet_spec


def test_profile_strings_from_the_spec():
    spec = unet_spec(4, 4, 768, latent_hw=(32, 64, 128), batch=(1, 2, 8))
    assert profile_strings(spec) == {
        "min": "sample:1x4x32x32,encoder_hidden_states:1x77x768",
        "opt": "sample:2x4x64x64,encoder_hidden_states:2x77x768",
        "max": "sample:8x4x128x128,encoder_hidden_states:8x77x768",
    }  # the scalar timestep has no symbolic dim: no profile entry
    assert profile_strings(spec.static({"batch": 2, "height": 64, "width": 64, "sequence": 77})) is None


def test_tensorrt_provider_options_put_caches_in_the_bundle(tiny_bundle):
    b = Bundle.open(tiny_bundle)
    o = provider_options(b, "unet", "tensorrt")
    cache = str(tiny_bundle / "engines" / "ort-tensorrt" / "unet")
    assert o["trt_engine_cache_enable"] == "True" and o["trt_engine_cache_path"] == cache
    assert o["trt_timing_cache_path"] == cache and o["trt_cuda_graph_enable"] == "False"  # dynamic: no CUDA graph
    assert o["trt_profile_max_shapes"].startswith("sample:8x4x16x16,")
    n = provider_options(b, "vae_decoder", "nv-tensorrt-rtx")
    assert n["nv_runtime_cache_path"] == str(tiny_bundle / "engines" / "ort-nv-tensorrt-rtx" / "vae_decoder")
    assert set(n) == {"nv_runtime_cache_path", "enable_cuda_graph", "nv_profile_min_shapes", "nv_profile_opt_shapes",
                      "nv_profile_max_shapes"}
    with pytest.raises(LdmExportError, match="not an ONNX Runtime TensorRT provider"):
        provider_options(b, "unet", "cuda")


def test_static_bundle_runs_cuda_graphs_but_not_for_the_text_encoder(tmp_path):
    from ldm_export.export.build import BuildConfig, build

    out = tmp_path / "s"
    build(BuildConfig(model="tiny", random_weights=True, static_shape=True, target="tensorrt", out=out))
    b = Bundle.open(out)
    for comp, graph in (("unet", "True"), ("vae_decoder", "True"), ("text_encoder", "False")):
        o = provider_options(b, comp, "tensorrt")
        assert o["trt_cuda_graph_enable"] == graph and not any(k.startswith("trt_profile") for k in o)


@pytest.mark.parametrize("provider", ["tensorrt", "nv-tensorrt-rtx"])
def test_missing_provider_falls_back_to_the_cpu_image(tiny_bundle, tmp_path, caplog, provider):
    if {"TensorrtExecutionProvider", "NvTensorRTRTXExecutionProvider"} & set(ort.get_available_providers()):
        pytest.skip("this onnxruntime has the provider: the GPU test below covers it")
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    kw = dict(num_inference_steps=2, seed=1)
    want = np.asarray(Pipeline.from_bundle(bundle)("a cat", **kw)[0])
    with caplog.at_level(logging.WARNING):
        got = np.asarray(Pipeline.from_bundle(bundle, provider=provider)("a cat", **kw)[0])
    np.testing.assert_array_equal(got, want)
    warned = [r for r in caplog.records if "falling back to the CPU" in r.getMessage()]
    assert len(warned) <= 1  # once per process and provider (an earlier test may have warned already)
    assert not (bundle / "engines").exists()  # no cache folders for a provider that is not there


def _ep_missing(provider: str) -> str | None:
    name = {"tensorrt": "TensorrtExecutionProvider", "nv-tensorrt-rtx": "NvTensorRTRTXExecutionProvider"}[provider]
    if name not in ort.get_available_providers():
        return f"onnxruntime {ort.__version__} has no {name} (it has {', '.join(ort.get_available_providers())})"
    return None


@pytest.mark.gpu
@pytest.mark.parametrize("provider", ["tensorrt", "nv-tensorrt-rtx"])
def test_ort_tensorrt_provider_matches_the_cpu_image(tiny_bundle, tmp_path, provider):
    why = _ep_missing(provider)
    if why:
        pytest.skip(why)
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    kw = dict(num_inference_steps=4, seed=1)
    want = np.asarray(Pipeline.from_bundle(bundle)("a cat", **kw)[0]).astype(np.float64)
    got = np.asarray(Pipeline.from_bundle(bundle, provider=provider)("a cat", **kw)[0]).astype(np.float64)
    psnr = 10 * np.log10(255.0**2 / max(np.mean((got - want) ** 2), 1e-12))
    assert psnr > 30, psnr
    assert any((bundle / "engines" / f"ort-{provider}" / "unet").iterdir())  # the cache was written in the bundle
