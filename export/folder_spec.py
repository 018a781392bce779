"""The model a build's weights say they are (``build --weights PATH`` with no ``--model``, or ``--model auto``).

A single-file checkpoint (.safetensors) names its zoo model by its keys and a few shapes (``model_of_checkpoint``),
as A1111 and ComfyUI tell checkpoints apart. A diffusers pipeline folder gives a spec of its own (below).

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
import logging
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from ldm_export.runtime.errors import LdmExportError
from ldm_export.runtime.families import get_family
from ldm_export.zoo import AUTO_MODEL, ModelSpec, get_model

log = logging.getLogger(__name__)

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
        if index.get(name) in (None, [None, None]) and name in index:  # saved with the module set to None
            raise LdmExportError(f"diffusers folder {folder} was saved without {name} ({pipeline}(..., {name}=None), "
                                 f"model_index.json says null); ldm-export exports the whole pipeline ({need}): "
                                 f"add {name}/ (and its tokenizer) from the original model")
        from .dit_weights import _ROLES

        role = _ROLES.get(get_family(family).module(name).class_name)
        missing = not path.parent.exists()  # the whole module folder, which no re-save brings back
        what = (f"{name}/" if missing else f"{name}/config.json") + (f" (the {role})" if role else "")
        fix = f"copy {name}/ from the model's release" if missing else "re-save the pipeline with save_pretrained"
        raise LdmExportError(f"diffusers folder {folder} has no {what}; a {pipeline} folder needs {need} "
                             f"(each with config.json and weights): {fix}")
    raw = _read(path, name)
    config = {k: v for k, v in raw.items() if not k.startswith("_") and k not in _METADATA}
    # keys the reference config has and an older config.json lacks: the reference's value (SD 1.5's VAE predates
    # scaling_factor and force_upcast; diffusers' defaults for those are SD 1.x's too, except force_upcast)
    return {**{k: v for k, v in reference.items() if k not in config}, **config}


# the scheduler keys that fix the noise schedule and what the denoiser predicts: the weights were trained with them
SCHEDULE_KEYS = ("prediction_type", "num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "trained_betas",
                 "rescale_betas_zero_snr", "timestep_spacing", "steps_offset", "shift", "use_dynamic_shifting",
                 "base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len")
_SCHEDULE_DEFAULTS = {"prediction_type": "epsilon", "trained_betas": None, "rescale_betas_zero_snr": False,
                      "steps_offset": 0, "shift": 1.0, "use_dynamic_shifting": False,  # diffusers' schedulers' own
                      "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}
# act only with use_dynamic_shifting (FLUX's resolution-dependent shift); save_pretrained writes them in every
# FlowMatchEulerDiscreteScheduler config, SD3's too
_DYNAMIC_SHIFT_KEYS = ("base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len")


def folder_scheduler(folder: Path, reference: ModelSpec) -> dict | None:
    """The folder's ``scheduler/scheduler_config.json`` (its class defaulting to ``reference``'s), or None."""
    path = folder / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return None
    scheduler = {k: v for k, v in _read(path, "scheduler").items() if k != "_diffusers_version"}
    if "_class_name" not in scheduler:
        scheduler = {"_class_name": reference.scheduler["_class_name"], **scheduler}
    return scheduler


def with_folder_scheduler(spec: ModelSpec, folder: Path) -> ModelSpec:
    """A named ``--model`` built from a diffusers folder samples as the folder's scheduler says (a v-prediction
    fine-tune, another flow shift), as diffusers' ``from_pretrained`` does and ``--model auto`` does; one warning
    names what differs from the named model's schedule."""
    scheduler = folder_scheduler(folder, spec)
    if scheduler is None:
        return spec
    def named(k):  # the named model's value, or diffusers' schedulers' default where its config leaves it out
        return spec.scheduler.get(k, _SCHEDULE_DEFAULTS.get(k))

    dynamic = bool(scheduler.get("use_dynamic_shifting") or named("use_dynamic_shifting"))
    differ = [k for k in SCHEDULE_KEYS if k in scheduler and scheduler[k] != named(k)
              and (dynamic or k not in _DYNAMIC_SHIFT_KEYS)]
    if differ:
        k = differ[0]
        more = f" (and {', '.join(differ[1:])})" if len(differ) > 1 else ""
        log.warning("%s: its scheduler says %s %r where %s's says %r%s; the bundle samples as the folder's scheduler "
                    "says, as diffusers does", folder.name, k, scheduler[k], spec.name, named(k), more)
    return replace(spec, scheduler=scheduler)


def spec_from_folder(weights: Path | str) -> ModelSpec:
    """The ModelSpec of the diffusers pipeline folder ``weights`` (see the module's docstring)."""
    folder = Path(weights).expanduser()
    if not folder.exists():
        raise LdmExportError(f"weights path {folder} does not exist; pass a diffusers pipeline folder")
    if not is_pipeline_folder(folder):
        raise LdmExportError(f"--model {AUTO_MODEL} reads the architecture from a diffusers pipeline folder (one with "
                             f"model_index.json) or a single-file .safetensors checkpoint, and {folder} is a folder without "
                             "model_index.json: pass the pipeline's own folder, or the checkpoint file itself")
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
    if family == "sd3":
        reference = _sd3_reference(configs["transformer"], reference)
    scheduler = folder_scheduler(folder, reference) or reference.scheduler
    spec = replace(reference, name=folder_model_name(folder), embedded_weights=None, params_m={},
                   description=f"{pipeline} from the folder '{folder_model_name(folder)}' ({fam.description})",
                   **ModelSpec.config_fields(configs), scheduler=scheduler)
    return replace(spec, resolution=_resolution(spec, reference),
                   max_length=_max_length(spec, reference))


# SD 3.5 large (and its turbo, which no config tells apart) publishes 28 steps at guidance 3.5 on its model card
_SD35_LARGE_DEFAULTS = {"steps": 28, "guidance_scale": 3.5}


def _sd3_reference(transformer: dict[str, Any], sd3: ModelSpec) -> ModelSpec:
    """SD 3.5 is told by its RMS q/k norms: SD 3.5 medium also by its dual-attention blocks (40 steps, guidance 4.5),
    SD 3.5 large without them (28 steps, 3.5); SD3's 7.0 overcooks either. Else SD3 medium's."""
    if transformer.get("qk_norm") != "rms_norm":
        return sd3
    if transformer.get("dual_attention_layers"):
        return get_model("sd35-medium")
    return replace(sd3, defaults=dict(_SD35_LARGE_DEFAULTS))


def _resolution(spec: ModelSpec, reference: ModelSpec) -> int:
    """The default image side: the denoiser's sample size (in latents) times the VAE's factor; FLUX's transformer has
    none, so its VAE's sample size; else the reference model's."""
    def side(config) -> int | None:  # a sample_size, or the larger of a (height, width) one
        v = config.get("sample_size")
        v = max(v) if isinstance(v, (list, tuple)) and v else v
        return v if isinstance(v, int) and v > 0 else None

    configs = spec.configs
    latents = side(configs.get("unet") or configs.get("transformer") or {})
    if latents is not None:
        return latents * spec.vae_scale_factor
    return side(configs["vae"]) or reference.resolution


def _max_length(spec: ModelSpec, reference: ModelSpec) -> int:
    """CLIP's token count from its position table for the U-Net families; T5's count (which no config states) from
    the reference for SD3 and FLUX."""
    if spec.unet is None:
        return reference.max_length
    encoder = spec.text_encoder or spec.extra_configs.get("text_encoder_2") or {}
    return int(encoder.get("max_position_embeddings") or reference.max_length)


# ------------------------------------------------------------------------------------------------- single files

_U = "model.diffusion_model."  # Stability's layout (SD 1.x/2.x, SDXL, SD3; ComfyUI's FLUX)
_TEXT_MARKERS = (  # (key prefix, family): the text encoders a U-Net checkpoint carries say its family
    ("conditioner.embedders.1.model.", "sdxl"), ("conditioner.embedders.0.model.", "sdxl-refiner"),
    ("cond_stage_model.model.", "sd2"), ("cond_stage_model.transformer.", "sd1"))
_TOKEN_EMBEDDINGS = {"sd1": "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
                     "sd2": "cond_stage_model.model.token_embedding.weight",
                     "sdxl": "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"}


def read_safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Every tensor's shape from a safetensors file's header (no tensor is read, no torch)."""
    import struct

    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if not 2 <= size <= 100 * 2**20:
                raise ValueError(f"a header of {size} bytes")
            header = json.loads(f.read(size))
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as e:
        raise LdmExportError(f"{path.name} is not a readable safetensors file ({type(e).__name__}: {e}); check that "
                             "the download is complete") from None
    return {k: list(v.get("shape") or []) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}


def _count(keys, prefix: str) -> int:
    return len({k[len(prefix):].split(".", 1)[0] for k in keys if k.startswith(prefix)})


def _describe(path: Path, shapes: dict[str, list[int]]) -> tuple[str, dict[str, Any]] | None:
    """(family, facts to match a zoo model on) of a single file, None when its keys match no layout we read."""
    keys = shapes.keys()
    if any(k.startswith(_U + "joint_blocks.") for k in keys):
        x = shapes.get(_U + "x_embedder.proj.weight") or [None]
        return "sd3", {"num_layers": _count(keys, _U + "joint_blocks."), "width": x[0],
                       "dual attention": any(".x_block.attn2." in k for k in keys)}
    for p in ("", _U):
        if any(k.startswith(p + "double_blocks.") for k in keys):
            return "flux", {"num_layers": _count(keys, p + "double_blocks."),
                            "num_single_layers": _count(keys, p + "single_blocks."),
                            "width": (shapes.get(p + "img_in.weight") or [None])[0],
                            "guidance_embeds": any(k.startswith(p + "guidance_in.") for k in keys)}
    conv_in = shapes.get(_U + "input_blocks.0.0.weight")
    if conv_in is None or len(conv_in) != 4:
        return None
    family = next((f for prefix, f in _TEXT_MARKERS if any(k.startswith(prefix) for k in keys)), None)
    if family is None:
        return None
    token = shapes.get(_TOKEN_EMBEDDINGS.get(family, ""))
    return family, {"in_channels": conv_in[1], "block_out_channels[0]": conv_in[0],
                    "text width": token[1] if token else None}


def _facts(spec: ModelSpec) -> dict[str, Any]:
    """The same facts of a zoo model, from its configs."""
    t = spec.extra_configs.get("transformer") or {}
    if spec.family == "sd3":
        return {"num_layers": t["num_layers"], "width": t["num_attention_heads"] * t["attention_head_dim"],
                "dual attention": bool(t.get("dual_attention_layers"))}
    if spec.family == "flux":
        return {"num_layers": t["num_layers"], "num_single_layers": t["num_single_layers"],
                "width": t["num_attention_heads"] * t["attention_head_dim"],
                "guidance_embeds": bool(t.get("guidance_embeds"))}
    text = spec.text_encoder or {}
    return {"in_channels": spec.unet["in_channels"], "block_out_channels[0]": spec.unet["block_out_channels"][0],
            "text width": text.get("hidden_size") if spec.family != "sdxl-refiner" else None}


def model_of_checkpoint(path: Path | str) -> str:
    """The zoo model a single-file .safetensors checkpoint holds, told by its keys (which family) and a few shapes
    (which model of it); a one-line error naming what was found when no zoo model fits."""
    from ldm_export.zoo import MODELS

    path = Path(path).expanduser()
    if not path.is_file():
        raise LdmExportError(f"weights path {path} does not exist; pass a diffusers folder or a .safetensors file")
    if path.suffix.lower() != ".safetensors":
        raise LdmExportError(f"--model {AUTO_MODEL} tells a single file's model by its safetensors keys; for "
                             f"{path.name} pass the --model it belongs to (`ldm-export models` lists them)")
    shapes = read_safetensors_shapes(path)
    found = _describe(path, shapes)
    if found is None:
        from .lora import LORA_PAIRS

        if any(k.endswith(tuple(down for down, _ in LORA_PAIRS)) for k in shapes):
            raise LdmExportError(f"{path.name} holds a LoRA, not a model: pass it as --lora FILE[:SCALE] with the "
                                 "model's --weights (or --model), or to `ldm-export lora BUNDLE FILE`")
        raise LdmExportError(f"{path.name} is no checkpoint layout ldm-export reads (Stability's SD 1.x/2.x/SDXL/SD3, "
                             "Black Forest Labs' FLUX.1); pass a diffusers folder, or the --model it belongs to")
    family, facts = found
    fits = [name for name, spec in MODELS.items() if spec.family == family and _facts(spec) == facts]
    if not fits:
        said = ", ".join(f"{k} {v}" for k, v in facts.items())
        inside = is_pipeline_folder(path.parent)
        raise LdmExportError(f"{path.name} is a {get_family(family).description.split(':')[0]} checkpoint ({said}) "
                             "that no zoo model matches; " + (
                                 f"pass the diffusers folder it sits in (--weights {path.parent}), which says its own "
                                 "architecture" if inside else "save it as a diffusers folder (which says its own "
                                 "architecture) or pass the --model it belongs to"))
    if len(fits) > 1:
        raise LdmExportError(f"{path.name} fits the zoo models {', '.join(sorted(fits))} alike; pass the --model it "
                             "belongs to")
    name = fits[0]
    if family == "sd2":
        log.warning("%s: SD 2.x single files do not say their prediction type; building it as %s (v-prediction, "
                    "%d px); an SD 2.x base model (epsilon, 512 px) needs its diffusers folder", path.name, name,
                    MODELS[name].resolution)
    log.info("%s holds the model %s (%s)", path.name, name, ", ".join(f"{k} {v}" for k, v in facts.items()))
    return name
