"""A model spec read from a diffusers pipeline folder (``build --weights FOLDER`` with no ``--model``, or ``--model auto``).

The zoo names architectures; a user's folder may hold one the zoo does not (SD 2.x base at 512 px, SDXL-turbo,
SD 3.5 large, a fine-tune saved at another size, a small test pipeline). As Optimum does, the folder then
says its own architecture: ``model_index.json`` names the diffusers pipeline, and so the family; each module's
``config.json`` is its config; ``scheduler/scheduler_config.json`` its scheduler. What a folder cannot say
(sampling defaults, T5's token count) comes from the family's reference model in the zoo, as do config keys an
older ``config.json`` lacks (SD 1.5's VAE predates ``scaling_factor``), so a folder of a zoo architecture gives the
same spec as its ``--model``. Reads JSON only: no torch.
"""
from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from ldm_export.runtime.errors import LdmExportError
from ldm_export.runtime.families import get_family
from ldm_export.zoo import AUTO_MODEL, ModelSpec, get_model

# diffusers pipeline classes (text-to-image and their editing variants, saved from any of them) -> family kind
PIPELINE_KINDS = {
    **dict.fromkeys(("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline",
                     "StableDiffusionInpaintPipelineLegacy"), "sd"),
    **dict.fromkeys(("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
                     "StableDiffusionXLInpaintPipeline"), "sdxl"),
    **dict.fromkeys(("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline",
                     "StableDiffusion3InpaintPipeline"), "sd3"),
    **dict.fromkeys(("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline"), "flux"),
}
# the zoo model each family's missing facts come from
_REFERENCE = {"sd1": "sd15", "sd2": "sd21", "sdxl": "sdxl", "sdxl-refiner": "sdxl-refiner", "sd3": "sd3-medium",
              "flux": "flux-schnell", "demo-dit": "demo-dit"}
# config.json keys that describe the file, not the architecture
_METADATA = {"architectures", "transformers_version", "torch_dtype", "dtype", "model_type"}
SHARED_KEY = "_ldm_export_shared"  # the demo DiT's folder points some modules at the demo model's


def is_pipeline_folder(path: Path | str | None) -> bool:
    return path is not None and Path(path).is_dir() and (Path(path) / "model_index.json").is_file()


def folder_model_name(folder: Path | str) -> str:
    """The folder's name as a model name (the bundle's default --out is NAME-PRECISION)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(folder).expanduser().resolve().name).strip("-.")
    return name or "model"


def _read(path: Path, what: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LdmExportError(f"{path} is not readable JSON ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
                             f"re-save the {what} with save_pretrained") from None
    if not isinstance(value, dict):
        raise LdmExportError(f"{path} holds a {type(value).__name__}, not a JSON object; re-save the {what} with save_pretrained")
    return value


def _present(index: dict[str, Any], name: str) -> bool:
    """model_index.json lists a module as [library, class]; a pipeline saved without it has [null, null]."""
    entry = index.get(name)
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] is not None


def _family(folder: Path, index: dict[str, Any]) -> str:
    cls = index.get("_class_name")
    if SHARED_KEY in index:  # this project's demo DiT folder: one CLIP, the SD3-class transformer
        return "demo-dit"
    kind = PIPELINE_KINDS.get(cls)
    if kind is None:
        known = ", ".join(sorted({k for k in PIPELINE_KINDS if not k.endswith(("Img2ImgPipeline", "InpaintPipeline", "Legacy"))}))
        raise LdmExportError(f"{folder}/model_index.json names the pipeline {cls!r}, which ldm-export does not export; "
                             f"it exports folders of {known} (and their img2img/inpaint variants)")
    if kind == "sd":
        return "sd2" if _pads_with_bang(folder) else "sd1"
    if kind == "sdxl":
        return "sdxl" if _present(index, "text_encoder") else "sdxl-refiner"
    return kind


def _pads_with_bang(folder: Path) -> bool:
    """SD 2.x's tokenizer pads with '!' (OpenCLIP ViT-H); SD 1.x's with its end token. Where the tokenizer files say
    nothing, the text encoder's width does (1024: OpenCLIP ViT-H; 768: OpenAI CLIP ViT-L)."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / "tokenizer" / name
        if path.is_file():
            pad = _read(path, "tokenizer").get("pad_token")
            if isinstance(pad, dict):
                pad = pad.get("content")
            if isinstance(pad, str):
                return pad == "!"
    config = folder / "text_encoder" / "config.json"
    return config.is_file() and _read(config, "text encoder").get("hidden_size") == 1024


def _module_folder(folder: Path, index: dict[str, Any], name: str) -> Path:
    shared = index.get(SHARED_KEY) or {}
    return (folder / shared[name]).resolve() if name in shared else folder / name


def _config(folder: Path, index: dict[str, Any], name: str, reference: dict[str, Any], family: str,
            pipeline: str) -> dict[str, Any]:
    path = _module_folder(folder, index, name) / "config.json"
    if not path.is_file():
        need = ", ".join(f"{m.name}/" for m in get_family(family).modules)
        raise LdmExportError(f"diffusers folder {folder} has no {name}/config.json; a {pipeline} folder needs {need} "
                             "(each with config.json and weights): re-save the pipeline with save_pretrained")
    raw = _read(path, name)
    config = {k: v for k, v in raw.items() if not k.startswith("_") and k not in _METADATA}
    # keys the reference config has and an older config.json lacks: the reference's value (SD 1.5's VAE predates
    # scaling_factor and force_upcast; diffusers' defaults for those are SD 1.x's too, except force_upcast)
    return {**{k: v for k, v in reference.items() if k not in config}, **config}


def spec_from_folder(weights: Path | str) -> ModelSpec:
    """The ModelSpec of the diffusers pipeline folder ``weights`` (see the module's docstring)."""
    folder = Path(weights).expanduser()
    if not folder.exists():
        raise LdmExportError(f"weights path {folder} does not exist; pass a diffusers pipeline folder")
    if not is_pipeline_folder(folder):
        raise LdmExportError(f"--model {AUTO_MODEL} reads the architecture from a diffusers pipeline folder (one with "
                             f"model_index.json), and {folder} is not one; for a single-file checkpoint pass the --model "
                             "it belongs to (`ldm-export build --help` lists them)")
    index = _read(folder / "model_index.json", "pipeline")
    family = _family(folder, index)
    pipeline = index.get("_class_name", "pipeline")
    reference = get_model(_REFERENCE[family])
    fam = get_family(family)
    configs = {m.name: _config(folder, index, m.name, reference.configs.get(m.name, {}), family, pipeline)
               for m in fam.modules}
    # force_upcast is diffusers' class default (True) in every VAE config it saves; only the SDXL pipelines act on it
    # (SDXL's fp16-fix VAE says false). Elsewhere the family's policy stands, as for its zoo model.
    if family not in ("sdxl", "sdxl-refiner"):
        configs["vae"].pop("force_upcast", None)
        if "force_upcast" in reference.configs["vae"]:
            configs["vae"]["force_upcast"] = reference.configs["vae"]["force_upcast"]
    if family == "flux" and configs["transformer"].get("guidance_embeds"):
        reference = get_model("flux-dev")  # the guidance-distilled variant: its defaults, shift and 512 T5 tokens
    scheduler_path = folder / "scheduler" / "scheduler_config.json"
    scheduler = reference.scheduler
    if scheduler_path.is_file():
        raw = _read(scheduler_path, "scheduler")
        scheduler = {k: v for k, v in raw.items() if k != "_diffusers_version"}
        if "_class_name" not in scheduler:
            scheduler = {"_class_name": reference.scheduler["_class_name"], **scheduler}
    base = {"text_encoder": None, "unet": None}
    main = {k: configs.pop(k) for k in ("text_encoder", "unet", "vae") if k in configs}
    spec = replace(reference, name=folder_model_name(folder), embedded_weights=None, params_m={},
                   description=f"{pipeline} from the folder '{folder_model_name(folder)}' ({fam.description})",
                   **(base | main), extra_configs=configs, scheduler=scheduler)
    return replace(spec, resolution=_resolution(spec, reference),
                   max_length=_max_length(spec, reference))


def _resolution(spec: ModelSpec, reference: ModelSpec) -> int:
    """The default image side: the denoiser's sample size (in latents) times the VAE's factor; FLUX's transformer has
    none, so its VAE's sample size; else the reference model's."""
    configs = spec.configs
    factor = spec.vae_scale_factor
    denoiser = configs.get("unet") or configs.get("transformer") or {}
    side = denoiser.get("sample_size")
    if isinstance(side, (list, tuple)) and side:
        side = max(side)
    if isinstance(side, int) and side > 0:
        return side * factor
    vae_side = configs["vae"].get("sample_size")
    if isinstance(vae_side, (list, tuple)) and vae_side:
        vae_side = max(vae_side)
    return vae_side if isinstance(vae_side, int) and vae_side > 0 else reference.resolution


def _max_length(spec: ModelSpec, reference: ModelSpec) -> int:
    """CLIP's token count from its position table for the U-Net families; T5's count (which no config states) from
    the reference for SD3 and FLUX."""
    if spec.unet is None:
        return reference.max_length
    encoder = spec.text_encoder or spec.extra_configs.get("text_encoder_2") or {}
    return int(encoder.get("max_position_embeddings") or reference.max_length)
