"""`ldm-export build` for the DiT families (SD3, FLUX, the demo DiT): load -> export and verify each component by
its kind -> fp16 by the kind's policy -> bundle in Optimum's layout (atomic, as the U-Net build).

Bundle: ``text_encoder*/``, ``transformer/``, ``vae_decoder/`` (model.onnx [+ model.onnx_data over 2 GB] and
config.json), ``tokenizer*/`` (CLIP BPE files; T5's tokenizer.json), ``scheduler/scheduler_config.json``,
``model_index.json`` and the manifest, whose ``model`` block holds what the runtime's family needs (latent scale
and shift, packing, text lengths, the encoders' kinds).
"""
from __future__ import annotations

import datetime as _dt
import gc
import json
import logging
import shutil
from pathlib import Path

from ldm_export.runtime.bundle import FORMAT, FORMAT_VERSION, MANIFEST, sha256_file
from ldm_export.runtime.errors import LdmExportError
from ldm_export.zoo_dit import FLUX_TRANSFORMER, T5, DiTSpec, get_dit_model

from .bundle_writer import check_out_dir, staging
from .precision import PRECISIONS

log = logging.getLogger(__name__)

PIPELINE_CLASS = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline", "demo-dit": "StableDiffusion3Pipeline"}


def _noop(component: str, stage: str, detail: str = "") -> None:
    pass


def validate_dit(cfg) -> DiTSpec:
    """Everything checkable before loading weights (``cfg``: export.build.BuildConfig)."""
    spec = get_dit_model(cfg.model)
    if cfg.precision not in PRECISIONS:
        raise LdmExportError(f"unknown precision '{cfg.precision}'; choose one of: {', '.join(PRECISIONS)}")
    if cfg.target not in ("cpu", "cuda"):
        raise LdmExportError(f"unknown target '{cfg.target}'; choose one of: cpu, cuda")
    if cfg.weights is not None and cfg.random_weights:
        raise LdmExportError("give either --weights PATH or --random-weights, not both")
    if cfg.weights is None and not cfg.random_weights and spec.embedded_weights is None:
        raise LdmExportError(f"model '{spec.name}' needs weights: pass --weights PATH (a diffusers folder or a "
                             ".safetensors checkpoint) or --random-weights for the real architecture")
    check_out_dir(cfg.resolved_out(), cfg.force)
    return spec


def build_dit(cfg, progress=_noop) -> dict:
    """Build the DiT bundle described by ``cfg``; return its manifest. Leaves no bundle if anything fails."""
    import torch

    from ldm_export.export.build import _tool_versions
    from ldm_export.export.dit_export import export_component
    from ldm_export.export.dit_weights import load_dit_weights

    spec = validate_dit(cfg)
    out = cfg.resolved_out()
    weights = cfg.weights
    embedded = weights is None and not cfg.random_weights
    if embedded:
        loaded = load_embedded(spec)
    else:
        progress("weights", "loading", str(weights or "random"))
        loaded = load_dit_weights(spec, weights, random_weights=cfg.random_weights, seed=cfg.seed,
                                  trust_pickle=cfg.trust_pickle)
    modules = loaded.modules
    torch.set_grad_enabled(False)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    vae_cfg = modules["vae"].config
    manifest: dict = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": model_block(spec, float(vae_cfg.scaling_factor), float(vae_cfg.shift_factor or 0.0), modules),
        "weights": {"source": loaded.source, "sha256": loaded.sha256, "seed": loaded.seed,
                    "path": None if embedded or loaded.source == "random" else str(weights),
                    **({"model": spec.name, "files": dict(loaded.files)} if embedded else {})},
        "target": cfg.target, "static_shape": cfg.static_shape, "verify_provider": cfg.resolved_verify_provider(),
        "components": {}, "files": {}, "tools": _tool_versions(),
    }
    with staging(out, cfg.force) as stage:
        for component in spec.components:
            progress(component, "export", "")
            folder = stage / component
            folder.mkdir()
            precision = cfg.component_precision(component)
            cspec, files, report = export_component(spec, component, modules, folder, stage, precision, cfg.target,
                                                    cfg.static_shape, cfg.seed, cfg.threads,
                                                    cfg.resolved_verify_provider())
            source = "vae" if component == "vae_decoder" else component
            _write_json(folder / "config.json", component_config(modules[source]))
            manifest["components"][component] = {
                "precision": report.pop("precision"), "kind": report.pop("kind"), "spec": cspec.to_json(),
                "files": [str(f.relative_to(stage)) for f in files], "fp16_policy": report.pop("fp16_policy"),
                "kernels": [], "verification": report,
            }
            modules.pop(source, None)
            gc.collect()
            progress(component, "done", "")
        write_side_files(stage, spec, loaded)
        manifest["files"] = {str(p.relative_to(stage)): {"sha256": sha256_file(p), "size": p.stat().st_size}
                             for p in sorted(stage.rglob("*")) if p.is_file()}
        _write_json(stage / MANIFEST, manifest)
    progress("bundle", "done", str(out))
    return manifest


def model_block(spec: DiTSpec, latent_scale: float, latent_shift: float, modules) -> dict:
    """The manifest's model description: what the runtime's family reads."""
    encoders = {name: {"kind": d.kind, "max_length": d.max_length, "tokenizer": tokenizer_folder(name),
                       "hidden_size": d.config.get("hidden_size", d.config.get("d_model"))}
                for name, d in spec.text_encoders.items()}
    return {
        "name": spec.name, "family": spec.family, "description": spec.description, "resolution": spec.resolution,
        "vae_scale_factor": spec.vae_scale_factor, "latent_scale": latent_scale, "latent_shift": latent_shift,
        "latent_channels": spec.latent_channels, "max_length": max(d.max_length for d in spec.text_encoders.values()),
        "text_encoders": encoders, "transformer_kind": spec.transformer_kind, "text_length": spec.text_length,
        "packed_latents": spec.transformer_kind == FLUX_TRANSFORMER, "guidance_embeds": spec.guidance_embeds,
        "joint_attention_dim": spec.transformer["joint_attention_dim"],
        "default_steps": spec.default_steps, "default_guidance": spec.default_guidance,
        "configs": {c: component_config(modules["vae" if c == "vae_decoder" else c]) for c in spec.components},
    }


def tokenizer_folder(component: str) -> str:
    return component.replace("text_encoder", "tokenizer")


def component_config(module) -> dict:
    config = module.config
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return {"_class_name": type(module).__name__, **{k: v for k, v in dict(config).items() if not k.startswith("_")}}


def write_side_files(stage: Path, spec: DiTSpec, loaded) -> None:
    """Tokenizers (the weights' own, else CLIP's packaged BPE and a stand-in T5), scheduler, model_index."""
    import diffusers

    from ldm_export.runtime.tokenizer import write_tokenizer_files

    from .t5_tokenizer import write_standin_t5_tokenizer

    for name, decl in spec.text_encoders.items():
        dest = stage / tokenizer_folder(name)
        source = loaded.tokenizer_dirs.get(name)
        if decl.kind == T5:
            if source is not None:
                dest.mkdir()
                for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                    if (source / f).is_file():
                        shutil.copyfile(source / f, dest / f)
                if not (dest / "tokenizer.json").is_file():
                    raise LdmExportError(f"{source} has no tokenizer.json; T5's fast tokenizer file is needed")
            else:
                log.warning("%s: no T5 tokenizer comes with these weights; writing a stand-in tokenizer "
                            "(ids are not T5's)", name)
                write_standin_t5_tokenizer(dest, vocab_size=min(1000, decl.config["vocab_size"]))
        else:
            # SD3's CLIP-G pads with '!' (id 0) as OpenCLIP did; CLIP-L pads with <|endoftext|>
            pad = "!" if spec.family == "sd3" and name == "text_encoder_2" else "<|endoftext|>"
            write_tokenizer_files(dest, pad_token=pad, source_dir=source)
    (stage / "scheduler").mkdir()
    _write_json(stage / "scheduler" / "scheduler_config.json",
                {**spec.scheduler, "_diffusers_version": diffusers.__version__})
    index = {"_class_name": PIPELINE_CLASS[spec.family], "_diffusers_version": diffusers.__version__,
             "scheduler": ["diffusers", spec.scheduler["_class_name"]]}
    for name, decl in spec.text_encoders.items():
        index[name] = ["optimum", "ORTTextEncoder"]
        index[tokenizer_folder(name)] = ["transformers", "T5TokenizerFast" if decl.kind == T5 else "CLIPTokenizer"]
    index["transformer"] = ["optimum", "ORTTransformer"]
    index["vae_decoder"] = ["optimum", "ORTVaeDecoder"]
    _write_json(stage / "model_index.json", index)


def load_embedded(spec: DiTSpec):
    """The embedded demo DiT: its transformer from ``assets/demo-dit``, CLIP and VAE from the demo U-Net model."""
    import torch
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    import ldm_export
    from ldm_export.demo.train import load_text_encoder

    from .dit_weights import LoadedDiT, _check_structure, _sha256

    root = Path(ldm_export.__file__).resolve().parent
    dit = root / spec.embedded_weights
    demo = root / "assets" / "demo"
    if not (dit / "transformer" / "config.json").is_file():
        raise LdmExportError(f"the embedded demo DiT's weights are missing from {dit}; reinstall ldm-export, or train "
                             "them (docs/demo_dit.md)")
    transformer = SD3Transformer2DModel.from_pretrained(dit / "transformer", torch_dtype=torch.float32)
    modules = {"text_encoder": load_text_encoder(demo / "text_encoder"), "transformer": transformer,
               "vae": AutoencoderKL.from_pretrained(demo / "vae", torch_dtype=torch.float32)}
    for name, module in modules.items():
        _check_structure(spec, name, module, "the embedded weights")
        module.float().eval()
    files = {str(p.relative_to(root)): _sha256(p) for p in sorted([*dit.rglob("*"), *(demo / "text_encoder").rglob("*"),
                                                                   *(demo / "vae").rglob("*")]) if p.is_file()}
    return LoadedDiT(modules, "embedded", files=files, tokenizer_dirs={"text_encoder": demo / "tokenizer"})


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
