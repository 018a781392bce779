"""Load the weights of a DiT-family export: random, a local diffusers folder, or a single-file checkpoint.

Diffusers folders (``model_index.json``, ``transformer/``, ``vae/``, ``text_encoder*/``, ``tokenizer*/``) load
component by component with the zoo spec's architecture checked first. Single-file checkpoints in Stability's
SD3 layout (``model.diffusion_model.joint_blocks.*``, ``first_stage_model.*``, ``text_encoders.clip_l/clip_g/
t5xxl.transformer.*``) convert with diffusers' own ``single_file_utils`` converters. FLUX.1 transformers load from
Black Forest Labs' single file (``flux1-dev.safetensors``: ``double_blocks.N.img_attn.qkv.weight``, ...; also with
ComfyUI's ``model.diffusion_model.`` prefix) through diffusers' ``convert_flux_transformer_checkpoint_to_diffusers``;
that file holds the transformer alone, so the text encoders, VAE and tokenizers come from the diffusers folder it
sits in, as Black Forest Labs' release ships it (``flux1-dev.safetensors`` beside ``model_index.json``). Either way
the state dicts are compared with a meta-device build of the spec and the first key that differs is named: a U-Net checkpoint
given for a DiT model (or the reverse, through :func:`refuse_dit_for_unet`) fails with that key.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm_export.runtime.errors import LdmExportError
from ldm_export.zoo import ModelSpec

from .models import build_module
from .weights import (_finish, load_failure, PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, _check_config, _check_loading_info, _compare_state_dicts,
                      _folder_weight_files, _one_line, _parameters_on_meta, _PickleCheckpoint, _read_json,
                      _SafetensorsCheckpoint, _sha256, _with_init_defaults)

log = logging.getLogger(__name__)

# Stability's single-file SD3 layout
SD3_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD3_TEXT_PREFIXES = {"clip_l": "text_encoders.clip_l.transformer.", "clip_g": "text_encoders.clip_g.transformer.",
                     "t5xxl": "text_encoders.t5xxl.transformer."}
# Black Forest Labs' single-file FLUX.1 layout (transformer only); ComfyUI saves it under SD3_PREFIX
FLUX_MARKER = "double_blocks."
# diffusers' FLUX converter splits each single block's fused linear1 (q, k, v, MLP) at FLUX.1's width, 3072
FLUX_CONVERTER_WIDTH = 3072
# keys that say which kind of denoiser a checkpoint holds
UNET_MARKER = "model.diffusion_model.input_blocks."
_DIT_MODELS = {"sd3": "sd3-medium or sd35-medium", "flux": "flux-dev or flux-schnell"}  # a family's published ones
_DIT_FILES = {"model.diffusion_model.joint_blocks.": ("an SD3-class MMDiT", _DIT_MODELS["sd3"]),
              "model.diffusion_model.double_blocks.": ("a FLUX.1-class transformer", _DIT_MODELS["flux"]),
              "double_blocks.": ("a FLUX.1-class transformer", _DIT_MODELS["flux"])}
DIT_MARKERS = {marker: f"{what} (--model {models})" for marker, (what, models) in _DIT_FILES.items()}
# CLIPTextConfig / T5Config keys that decide weights and forward pass
_CLIP_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "max_position_embeddings", "hidden_act", "layer_norm_eps")
_T5_KEYS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "relative_attention_num_buckets",
            "relative_attention_max_distance", "feed_forward_proj")
_NON_ARCHITECTURE = {"transformer": {"sample_size", "out_channels"}, "vae": {"sample_size", "force_upcast"}}
# the modules' roles, for messages
_ROLES = {"CLIPTextModel": "CLIP text encoder", "CLIPTextModelWithProjection": "CLIP text encoder with projection",
          "T5EncoderModel": "T5 encoder"}
# a diffusers folder may point a module at another folder (the demo DiT reuses the demo model's CLIP and VAE)
SHARED_KEY = "_ldm_export_shared"


def _module_class(spec: ModelSpec, name: str):
    import importlib

    declared = spec.family_def.module(name)
    return getattr(importlib.import_module(declared.library), declared.class_name)


@dataclass(frozen=True)
class LoadedDiT:
    modules: dict[str, nn.Module]  # text encoders by component name, "transformer", "vae"
    source: str  # "random", "diffusers", "single-file"
    sha256: str | None = None
    files: dict[str, str] = field(default_factory=dict)
    seed: int | None = None
    tokenizer_dirs: dict[str, Path] = field(default_factory=dict)  # tokenizer folder name -> the weights' folder


def refuse_dit_for_unet(keys, path: Path) -> None:
    """For the U-Net loaders: a DiT single file names itself by its keys; say which model it is."""
    for marker, (what, models) in _DIT_FILES.items():
        key = next((k for k in keys if k.startswith(marker)), None)
        if key is not None:
            raise LdmExportError(f"{path.name} holds {what}, not a U-Net: its key '{key}' has no place in a U-Net "
                                 f"checkpoint; {_model_hint(path, models)}")


def _model_hint(path: Path, models: str) -> str:
    """Which --model to pass for a DiT single file: the zoo model its shapes say (as --model auto tells it), else
    the family's published ``models``."""
    from .folder_spec import model_of_checkpoint

    try:
        return f"build it with --model {model_of_checkpoint(path)} (or --model auto)"
    except LdmExportError:  # no zoo model fits it exactly
        return f"pass the --model it belongs to ({models})"


def load_dit_weights(spec: ModelSpec, weights: str | Path | None, random_weights: bool = False, seed: int = 0,
                     trust_pickle: bool = False) -> LoadedDiT:
    """``spec``'s modules (eval, float32) with random weights or weights read from ``weights``."""
    if random_weights and weights is not None:
        raise LdmExportError("both --weights and --random-weights were given; pass only one of them")
    if random_weights:
        from .models import build_random

        return LoadedDiT(_finish(build_random(spec, seed)), "random", seed=seed)
    if weights is None:
        raise LdmExportError(f"no weights for model '{spec.name}'; pass --weights PATH (a diffusers folder or a "
                             "single-file checkpoint) or --random-weights")
    path = Path(weights).expanduser()
    if not path.exists():
        raise LdmExportError(f"weights path {path} does not exist; pass a diffusers folder or a .safetensors file")
    if path.is_dir():
        return _load_folder(spec, path, trust_pickle)
    return _load_single_file(spec, path, trust_pickle)


# ------------------------------------------------------------------------------------------------- folder


def _load_folder(spec: ModelSpec, folder: Path, trust_pickle: bool, skip: tuple[str, ...] = ()) -> LoadedDiT:
    """``spec``'s modules from a diffusers folder, but those in ``skip`` (loaded from elsewhere by the caller)."""
    from diffusers.utils import is_accelerate_available

    family = spec.family_def
    if not (folder / "model_index.json").is_file():
        raise LdmExportError(f"{folder} is a directory without model_index.json, so not a diffusers pipeline folder; "
                             "pass the pipeline's top folder or a single-file .safetensors checkpoint")
    index = _read_json(folder / "model_index.json")
    shared = {k: (folder / v).resolve() for k, v in (index.get(SHARED_KEY) or {}).items()}
    files = {"model_index.json": _sha256(folder / "model_index.json")}
    names = [m.name for m in family.modules if m.name not in skip]
    if "transformer" not in skip and not (folder / "transformer").is_dir() and (folder / "unet").is_dir():
        raise LdmExportError(f"{folder} holds a U-Net pipeline (unet/), not a DiT: model '{spec.name}' needs "
                             "transformer/; pass the --model these weights belong to (sd15, sd21, ...) or --model auto")
    _refuse_other_pipeline(spec, folder, index)
    subs = {name: shared.get(name, folder / name) for name in names}
    for name in names:  # every folder and config first, before any weights
        sub = subs[name]
        if not sub.is_dir():
            what = _ROLES.get(family.module(name).class_name, name)
            raise LdmExportError(f"diffusers folder {folder} has no {name}/ ({what}); model '{spec.name}' needs "
                                 f"{', '.join(n + '/' for n in names)}, each with config.json and weights")
        if not (sub / "config.json").is_file():
            raise LdmExportError(f"{sub} has no config.json; re-save the component with save_pretrained")
    for name in names:
        declared = family.module(name)
        got = _read_json(subs[name] / "config.json")
        want = spec.configs[name]
        if declared.library == "diffusers":
            _check_config(folder, name, _with_init_defaults(_module_class(spec, name), got),
                          {k: v for k, v in want.items() if k not in ("scaling_factor", "shift_factor")}, spec.name,
                          ignore=_NON_ARCHITECTURE.get(name, set()))
        else:
            keys = _T5_KEYS if declared.class_name == "T5EncoderModel" else _CLIP_KEYS
            _check_config(folder, name, got, {k: want[k] for k in keys if k in want}, spec.name)

    modules: dict[str, nn.Module] = {}
    tokenizers: dict[str, Path] = {}
    for name in names:
        sub = subs[name]
        weight_files, variant, use_safetensors = _folder_weight_files(sub, trust_pickle)
        for f in weight_files:
            files[f"{name}/{f.name}"] = _sha256(f)
        files[f"{name}/config.json"] = _sha256(sub / "config.json")
        kwargs: dict[str, Any] = {"local_files_only": True, "output_loading_info": True,
                                  "use_safetensors": use_safetensors, "variant": variant}
        loader = _module_class(spec, name).from_pretrained
        if family.module(name).library == "transformers":
            kwargs["dtype"] = torch.float32
        else:
            kwargs.update(torch_dtype=torch.float32, low_cpu_mem_usage=is_accelerate_available())
        try:
            module, info = loader(str(sub), **kwargs)
        except LdmExportError:
            raise
        except Exception as exc:
            raise load_failure(sub, weight_files, exc) from exc
        _check_loading_info(sub, name, info)
        _check_structure(spec, name, module, "the folder's module")
        modules[name] = module
        if name in family.text_encoders:
            tokenizer = family.tokenizers[family.text_encoders.index(name)]
            tok = shared.get(tokenizer, folder / tokenizer)
            if not tok.is_dir():
                raise LdmExportError(f"diffusers folder {folder} has no {tok.name}/ (the tokenizer of {name}); copy it "
                                     "from the model's release")
            tokenizers[tokenizer] = tok
    if "vae" in modules:  # not when the caller took the VAE from a single file
        scale = modules["vae"].config.scaling_factor
        if abs(float(scale) - float(spec.vae.get("scaling_factor", scale))) > 1e-6:
            log.warning("%s/vae has scaling_factor %s, model %s %s; using the folder's", folder, scale, spec.name,
                        spec.latent_scale)
    return LoadedDiT(_finish(modules), "diffusers", files=files, tokenizer_dirs=tokenizers)


_DIT_KINDS = {"sd3": "sd3", "demo-dit": "sd3", "flux": "flux"}


def _refuse_other_pipeline(spec: ModelSpec, folder: Path, index: dict) -> None:
    """A FLUX folder given for an SD3 model (or the reverse): name the folder's pipeline, not a part it lacks."""
    from .folder_spec import PIPELINE_KINDS

    got = PIPELINE_KINDS.get(index.get("_class_name"))
    want = _DIT_KINDS.get(spec.family)
    if got in _DIT_MODELS and want is not None and got != want:
        raise LdmExportError(f"{folder} holds a {index['_class_name']} (its model_index.json), not the "
                             f"{spec.family_def.pipeline_class} of model '{spec.name}'; pass the --model it belongs to "
                             f"({_DIT_MODELS[got]}) or --model auto")


def _check_structure(spec: ModelSpec, name: str, module: nn.Module, source: str) -> None:
    with _parameters_on_meta():
        reference = build_module(spec, name)
    _compare_state_dicts(name, {k: v.shape for k, v in module.state_dict().items()}, reference.state_dict(), spec.name,
                         source=source)


# ------------------------------------------------------------------------------------------------- single file


def _load_single_file(spec: ModelSpec, path: Path, trust_pickle: bool) -> LoadedDiT:
    if not os.access(path, os.R_OK):
        raise LdmExportError(f"cannot read {path} (permission denied); check the file's permissions")
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        if not trust_pickle:
            raise LdmExportError(f"{path.name} is a pickle checkpoint, and loading pickle runs code from the file; pass "
                                 "--trust-pickle if you trust its source, or convert it to .safetensors")
        checkpoint = _PickleCheckpoint(path)
    elif suffix in SAFETENSORS_SUFFIXES:
        checkpoint = _SafetensorsCheckpoint(path)
    else:
        raise LdmExportError(f"{path.name}: unknown weights format '{suffix}'; pass a .safetensors file or a "
                             "diffusers folder")
    digest = _sha256(path)
    with checkpoint:
        if spec.family_def.module("transformer").class_name == "FluxTransformer2DModel":
            return _load_flux_single_file(spec, path, checkpoint, digest, trust_pickle)
        modules = _convert_single_file(spec, path, checkpoint)
    family = spec.family_def
    missing = [m.name for m in family.modules if m.name not in modules]
    files = {path.name: digest}
    # the file holds no tokenizer: T5's comes from the model's folder around it, where the release has one
    tokenizers = {name: path.parent / name for name, cls in zip(family.tokenizers, family.tokenizer_classes)
                  if cls == "T5TokenizerFast" and (path.parent / name).is_dir()}
    if missing:  # a release without its VAE or text encoders: they come from the diffusers folder around it
        if not (path.parent / "model_index.json").is_file():
            what = ("the transformer-only release" if not any(m.startswith("text_encoder") for m in modules) else
                    f"it holds {', '.join(sorted(modules))}: a release without T5, which ldm-export does not build"
                    if missing == ["text_encoder_3"] else f"it holds {', '.join(sorted(modules))}")
            raise LdmExportError(f"{path.name} holds no {', '.join(missing)} weights ({what}); put it in the model's "
                                 "diffusers folder beside model_index.json, or pass the single file that includes the "
                                 "text encoders and VAE, or the diffusers folder itself")
        rest = _load_folder(spec, path.parent, trust_pickle, skip=tuple(modules))
        modules.update({name: rest.modules[name] for name in missing})
        files.update(rest.files)
        tokenizers = rest.tokenizer_dirs
    return LoadedDiT(_finish({m.name: modules[m.name] for m in family.modules}), "single-file", sha256=digest,
                     files=files, tokenizer_dirs=tokenizers)


def _load_flux_single_file(spec: ModelSpec, path: Path, checkpoint, digest: str, trust_pickle: bool) -> LoadedDiT:
    """The transformer from Black Forest Labs' single file; the other modules from the diffusers folder around it."""
    keys = checkpoint.keys()
    _refuse_unet(path, spec, keys)
    if not any(k.startswith((FLUX_MARKER, SD3_PREFIX + FLUX_MARKER)) for k in keys):
        other = next((f"'{k}' ({w})" for m, w in DIT_MARKERS.items() for k in keys if k.startswith(m)), None)
        first = other or (f"'{keys[0]}'" if keys else "no keys at all")
        raise LdmExportError(f"{path.name} is not a FLUX.1 transformer checkpoint: no key starts with '{FLUX_MARKER}' "
                             f"(first key: {first}); pass the --model it belongs to, or a diffusers folder")
    folder = path.parent
    if not (folder / "model_index.json").is_file():
        raise LdmExportError(f"{path.name} holds the FLUX.1 transformer alone (Black Forest Labs' layout); its text "
                             "encoders, VAE and tokenizers ship separately: put the file in the model's diffusers folder "
                             "beside model_index.json (as Black Forest Labs' release has it), or pass that folder")
    prefixed = any(k.startswith(SD3_PREFIX + FLUX_MARKER) for k in keys)
    state = checkpoint.take((SD3_PREFIX,) if prefixed else ("",))
    if prefixed:
        state = {k[len(SD3_PREFIX):]: v for k, v in state.items() if k.startswith(SD3_PREFIX)}
    else:  # a file that also holds other parts keeps them under their own prefixes; take the transformer's keys
        state = {k: v for k, v in state.items() if not k.startswith(("vae.", "text_encoders.", "first_stage_model."))}
    transformer = _adopt(spec, "transformer", _convert("transformer", path,
                                                       lambda: _convert_flux_transformer(spec, path, state)))
    rest = _load_folder(spec, folder, trust_pickle, skip=("transformer",))
    modules = {m.name: transformer if m.name == "transformer" else rest.modules[m.name] for m in spec.family_def.modules}
    return LoadedDiT(_finish(modules), "single-file", sha256=digest, files={path.name: digest, **rest.files},
                     tokenizer_dirs=rest.tokenizer_dirs)


def _convert_flux_transformer(spec: ModelSpec, path: Path, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' ``convert_flux_transformer_checkpoint_to_diffusers`` on a BFL-layout state dict, at any width.

    The converter splits each single block's fused ``linear1`` (q, k, v, MLP rows) at FLUX.1's width (3072, a
    constant in diffusers 0.35 to 0.39), so any other width (the test models) fails there; every other key it maps by
    name and chunks in thirds. So that split is done here at the config's width, for every width alike (one path,
    the one the tests run), and the converter gets meta-device stand-ins of the shape it expects, whose outputs are
    replaced: every other key's mapping stays diffusers' own."""
    from diffusers.loaders import single_file_utils as sfu

    cfg = spec.configs["transformer"]
    width = int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"])
    mlp = int(width * 4.0)  # FluxSingleTransformerBlock's mlp_ratio
    own: dict[str, torch.Tensor] = {}
    for key in [k for k in state if k.startswith("single_blocks.") and ".linear1." in k]:
        i, what = key.split(".")[1], key.rsplit(".", 1)[1]
        tensor = state[key]
        expected = (3 * width + mlp, width) if what == "weight" else (3 * width + mlp,)
        if tuple(tensor.shape) != expected:
            raise LdmExportError(f"transformer: '{key}' has shape {tuple(tensor.shape)} in {path.name} but model "
                                 f"'{spec.name}' expects {expected}; pass the --model these weights belong to")
        q, k, v, m = torch.split(tensor, (width, width, width, mlp), dim=0)
        prefix = f"single_transformer_blocks.{i}."
        own.update({f"{prefix}attn.to_q.{what}": q, f"{prefix}attn.to_k.{what}": k,
                    f"{prefix}attn.to_v.{what}": v, f"{prefix}proj_mlp.{what}": m})
        state[key] = torch.empty((3 * FLUX_CONVERTER_WIDTH + 4 * FLUX_CONVERTER_WIDTH, *tensor.shape[1:]),
                                 device="meta")
    converted = sfu.convert_flux_transformer_checkpoint_to_diffusers(state)
    converted.update(own)
    if state:  # the converter pops what it maps; diffusers' own loader drops the rest too
        log.warning("%s: %d keys with no place in a FLUX transformer were ignored (first: '%s')", path.name, len(state),
                    next(iter(state)))
    return converted


def _refuse_unet(path: Path, spec: ModelSpec, keys) -> None:
    unet_key = next((k for k in keys if k.startswith(UNET_MARKER)), None)
    if unet_key is not None:
        raise LdmExportError(f"{path.name} holds a U-Net, not the transformer of '{spec.name}': its key '{unet_key}' "
                             "has no place in a DiT checkpoint; pass the --model it belongs to (sd15, sd21, ...)")


def _convert_single_file(spec: ModelSpec, path: Path, checkpoint) -> dict[str, nn.Module]:
    from diffusers.loaders import single_file_utils as sfu

    keys = checkpoint.keys()
    _refuse_unet(path, spec, keys)
    family = spec.family_def
    if family.module("transformer").class_name != "SD3Transformer2DModel" or len(family.text_encoders) != 3:
        raise LdmExportError(f"{path.name}: single-file checkpoints are read in Stability's SD3 and Black Forest Labs' "
                             f"FLUX.1 layouts; for '{spec.name}' pass a diffusers folder")
    marker = "model.diffusion_model.joint_blocks."
    if not any(k.startswith(marker) for k in keys):
        diffusers = next((k for k in keys if k.startswith("transformer_blocks.")), None)
        if diffusers is not None and "context_embedder.weight" in keys:  # an SD3Transformer2DModel's own state dict
            raise LdmExportError(f"{path.name} holds an SD3 transformer in diffusers' key layout ('{diffusers}'), not "
                                 f"Stability's single-file layout ('{marker}*'); put it in a diffusers folder "
                                 "(transformer/diffusion_pytorch_model.safetensors beside its config.json, with the "
                                 "text encoders and VAE) and pass the folder")
        other = next((f"'{k}' ({w})" for m, w in DIT_MARKERS.items() for k in keys if k.startswith(m)), None)
        first = other or (f"'{keys[0]}'" if keys else "no keys at all")
        raise LdmExportError(f"{path.name} is not an SD3 checkpoint: no key starts with '{marker}' (first key: "
                             f"{first}); pass the --model it belongs to, or a diffusers folder")
    modules: dict[str, nn.Module] = {}
    state = checkpoint.take((SD3_PREFIX,))
    converted = _convert("transformer", path, lambda: sfu.convert_sd3_transformer_checkpoint_to_diffusers(state))
    modules["transformer"] = _adopt(spec, "transformer", converted)
    if any(k.startswith(VAE_PREFIX) for k in keys):
        state = checkpoint.take((VAE_PREFIX,))
        modules["vae"] = _adopt(spec, "vae", _convert("vae", path,
                                                      lambda: sfu.convert_ldm_vae_checkpoint(state, spec.vae)))
    roles = dict(zip(family.text_encoders, ("clip_l", "clip_g", "t5xxl")))
    for name, role in roles.items():
        prefix = SD3_TEXT_PREFIXES[role]
        if not any(k.startswith(prefix) for k in keys):
            continue  # a release without its text encoders: they come from the folder around it (_load_single_file)
        state = checkpoint.take((prefix,))
        converted = {k[len(prefix):]: v for k, v in state.items()}
        if role == "t5xxl":
            converted.setdefault("encoder.embed_tokens.weight", converted.get("shared.weight"))
        modules[name] = _adopt(spec, name, {k: v for k, v in converted.items() if v is not None})
    return modules  # the modules the file holds; the transformer always


def _convert(name: str, path: Path, convert) -> dict[str, torch.Tensor]:
    try:
        converted = convert()
    except (KeyError, IndexError, ValueError, RuntimeError, AttributeError) as exc:
        raise LdmExportError(f"{path.name}: cannot convert the {name} weights ({type(exc).__name__}: "
                             f"{_one_line(exc)}); the checkpoint is incomplete or of another architecture") from exc
    return {k: v for k, v in converted.items() if v is not None}


def _adopt(spec: ModelSpec, name: str, state: dict[str, torch.Tensor]) -> nn.Module:
    """Build ``name`` on meta, compare keys and shapes (naming the first difference), then adopt the tensors."""
    with _parameters_on_meta():
        module = build_module(spec, name)
    expected = module.state_dict()
    for key in [k for k in state if k not in expected and k.endswith("position_ids")]:
        del state[key]  # CLIP's non-persistent buffer, stored by older exports
    _compare_state_dicts(name, {k: v.shape for k, v in state.items()}, expected, spec.name, source="the checkpoint")
    module.load_state_dict({k: v.to(torch.float32).contiguous() for k, v in state.items()}, strict=True, assign=True)
    return module
