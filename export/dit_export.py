"""Export one DiT-family component (kind chosen by the zoo's declaration) to ONNX, verify it against torch, and
convert it to fp16 by its kind's policy. The same steps as the U-Net build, with the kinds' own verification inputs.
"""
from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Mapping

import numpy as np

from ldm_export.runtime.errors import LdmExportError
from ldm_export.runtime.flux import image_ids, text_ids
from ldm_export.runtime.spec import ComponentSpec
from ldm_export.zoo_dit import CLIP, CLIP_WITH_PROJECTION, FLUX_TRANSFORMER, T5, DiTSpec

log = logging.getLogger(__name__)


def component_kind(spec: DiTSpec, component: str) -> str:
    if component in spec.text_encoders:
        return spec.text_encoders[component].kind
    if component == "transformer":
        return spec.transformer_kind
    return component  # vae_decoder


def static_dims(spec: DiTSpec, component: str) -> dict[str, int]:
    """Concrete sizes for verification and static-shape builds: CFG batch 2 (FLUX: 1, no CFG batch), the default
    resolution, full-length prompts."""
    side = spec.latent_side
    cfg_batch = 1 if spec.transformer_kind == FLUX_TRANSFORMER else 2
    batch = 1 if component == "vae_decoder" else cfg_batch if component == "transformer" else 2
    seq = spec.text_encoders[component].max_length if component in spec.text_encoders else spec.text_length
    return {"batch": batch, "height": side, "width": side, "sequence": seq, "text_sequence": spec.text_length,
            "image_sequence": (side // 2) ** 2, "image_height": side * spec.vae_scale_factor,
            "image_width": side * spec.vae_scale_factor}


def sample_inputs(spec: DiTSpec, component: str, cspec: ComponentSpec, dims: Mapping[str, int],
                  seed: int = 0) -> dict[str, np.ndarray]:
    """Realistic verification inputs of one DiT component (prompt-shaped ids, timesteps in range, real ids)."""
    from .onnx_export import sample_inputs as generic  # CLIP-shaped prompt ids

    rng = np.random.default_rng(seed)
    kind = component_kind(spec, component)
    if kind == T5:
        shape = cspec.concrete_shape(cspec.inputs[0], dims)
        vocab = spec.text_encoders[component].config["vocab_size"]
        ids = np.zeros(shape, np.int32)  # pad 0
        for row in ids:
            n = int(rng.integers(3, shape[1]))
            row[:n - 1] = rng.integers(3, vocab, n - 1)
            row[n - 1] = 1  # </s>
        return {"input_ids": ids}
    if component == "vae_decoder":  # the decoder sees latents / scale + shift
        shape = cspec.concrete_shape(cspec.inputs[0], dims)
        lat = rng.standard_normal(shape) / spec.latent_scale + spec.latent_shift
        return {"latent_sample": lat.astype(np.float32)}
    feeds = {t.name: rng.standard_normal(cspec.concrete_shape(t, dims)).astype(np.float32) for t in cspec.inputs}
    if kind in (CLIP, CLIP_WITH_PROJECTION):
        return generic(cspec, dims, seed=seed)
    if component == "transformer":
        b = feeds["hidden_states"].shape[0]
        if kind == FLUX_TRANSFORMER:
            side = dims["height"]
            feeds["timestep"] = rng.uniform(0.05, 1.0, b).astype(np.float32)  # sigma: FLUX takes t / 1000
            feeds["img_ids"] = image_ids(side, side)
            feeds["txt_ids"] = text_ids(feeds["encoder_hidden_states"].shape[1])
            if "guidance" in feeds:
                feeds["guidance"] = rng.uniform(1.0, 5.0, b).astype(np.float32)
        else:
            feeds["timestep"] = rng.uniform(1.0, 999.0, b).astype(np.float32)
    return feeds


def export_component(spec: DiTSpec, component: str, modules: dict, folder: Path, stage: Path, precision: str,
                     target: str = "cpu", static: bool = False, seed: int = 0, threads: int | None = None,
                     verify_provider: str | None = None) -> tuple[ComponentSpec, list[Path], dict]:
    """Export, verify (fp32, then fp16 when asked) and write ``folder/model.onnx`` (+ ``model.onnx_data`` over
    2 GB); return the component's final spec, its files and the verification report. Raises on a failed check."""
    from . import dit_models as M
    from . import onnx_export as X
    from .dit_precision import convert_fp16_with, dit_fp16_policy

    kind = component_kind(spec, component)
    cspec = spec.component_specs()[component]
    dims = static_dims(spec, component)
    if static:
        cspec = cspec.static(dims)
    wrapper = M.wrap(component, spec, modules)
    feeds = sample_inputs(spec, component, cspec, dims, seed)
    reference = X.torch_outputs(wrapper, cspec, feeds)
    M.register_onnx_symbolics(X.OPSET)
    model = X.export_onnx(wrapper, cspec, stage, feeds, static=static)
    path = folder / "model.onnx"
    files = X.save_onnx(model, path)
    del model, wrapper
    gc.collect()
    provider = verify_provider or target
    report = {"fp32": X.verify(path, cspec, feeds, reference, "fp32", threads, provider).to_json()}
    _check(report["fp32"], component, "fp32")
    policy = None
    if precision == "fp16" and component == "vae_decoder" and spec.vae.get("force_upcast"):
        precision = "fp32"  # diffusers runs this VAE in fp32 under fp16 pipelines (force_upcast in its config)
        log.info("vae_decoder: kept fp32 (the VAE config sets force_upcast)")
    if precision == "fp16":
        policy = dit_fp16_policy(spec, kind, target)
        model16 = convert_fp16_with(str(path), policy, component)
        for f in files:
            f.unlink()
        files = X.save_onnx(model16, path)
        del model16
        gc.collect()
        cspec = cspec.with_dtype("float16", [t.name for t in (*cspec.inputs, *cspec.outputs)
                                             if t.dtype == "float32" and t.name not in policy.keep_fp32_io])
        report["fp16"] = X.verify(path, cspec, feeds, reference, "fp16", threads, provider).to_json()
        _check(report["fp16"], component, "fp16")
    report["kind"] = kind
    report["precision"] = precision
    report["fp16_policy"] = policy.to_json() if policy else None
    return cspec, files, report


def _check(report: dict, component: str, precision: str) -> None:
    if report["passed"]:
        return
    name, r = min(report["outputs"].items(), key=lambda kv: kv[1]["cosine"] if kv[1]["cosine"] == kv[1]["cosine"] else -2)
    raise LdmExportError(
        f"verification failed: {component} {precision} output '{name}' has cosine {r['cosine']:.6f} against torch "
        f"(threshold {report['cosine_threshold']}), max abs error {r['max_abs']:.3g}; the export is wrong, no bundle "
        "was written")
