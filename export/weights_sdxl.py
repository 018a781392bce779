"""Weights of the SDXL family: random, a local diffusers folder, or a single-file SDXL checkpoint (LDM layout).

Single files are converted with diffusers' own ``single_file_utils`` converters and the zoo's configs (nothing
is downloaded): the UNet under ``model.diffusion_model.``, the VAE under ``first_stage_model.``, CLIP-L as a
transformers model under ``conditioner.embedders.0.transformer.`` and OpenCLIP bigG under
``conditioner.embedders.1.model.`` (the refiner's only text encoder sits at ``conditioner.embedders.0.model.``).
Keys and shapes are checked against modules built from the spec, naming the first mismatch.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm_export.runtime.errors import LdmExportError

from .models import build_module, build_random
from .weights import (_finish, load_failure, LDM_UNET_EMA_PREFIX, LDM_UNET_PREFIX, LDM_VAE_PREFIX, PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES,
                      LoadedWeights, _Checkpoint, _check_config, _check_loading_info, _compare_state_dicts, _convert,
                      _folder_weight_files, _parameters_on_meta, _PickleCheckpoint, _read_json, _sha256,
                      _SafetensorsCheckpoint, _TEXT_ENCODER_ARCHITECTURE_KEYS, _with_init_defaults, refuse_dit_folder)

log = logging.getLogger(__name__)

SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
REFINER_OPEN_CLIP_PREFIX = "conditioner.embedders.0.model."
_NON_ARCHITECTURE_KEYS = {"unet": {"sample_size", "upcast_attention"}, "vae": {"sample_size", "force_upcast"}}


def module_names(spec) -> tuple[str, ...]:
    return tuple(m.name for m in spec.family_def.modules)


def load_sdxl_weights(spec, weights: str | Path | None, random_weights: bool = False, seed: int = 0,
                      trust_pickle: bool = False) -> LoadedWeights:
    """``spec``'s modules (text_encoder [, text_encoder_2], unet, vae) with random weights or weights from a path."""
    if random_weights:
        return LoadedWeights(_finish(build_random(spec, seed)), "random", seed=seed)
    if weights is None:
        raise LdmExportError(f"no weights for model '{spec.name}'; pass --weights PATH (a diffusers folder or a "
                             "single-file .safetensors checkpoint) or --random-weights")
    path = Path(weights).expanduser()
    if not path.exists():
        raise LdmExportError(f"weights path {path} does not exist; pass a diffusers folder or a .safetensors file")
    if path.is_dir():
        return _load_folder(spec, path, trust_pickle)
    return _load_single_file(spec, path, trust_pickle)


def _load_folder(spec, folder: Path, trust_pickle: bool) -> LoadedWeights:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.utils import is_accelerate_available
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if not (folder / "model_index.json").is_file():
        raise LdmExportError(f"{folder} is a directory without model_index.json, so not a diffusers pipeline folder; "
                             "pass the pipeline's top folder or a single-file .safetensors checkpoint")
    _read_json(folder / "model_index.json")
    refuse_dit_folder(folder, spec.name)
    files = {"model_index.json": _sha256(folder / "model_index.json")}
    names = module_names(spec)
    for name in names:  # every config before any weights
        sub = folder / name
        if not (sub / "config.json").is_file():
            raise LdmExportError(f"diffusers folder {folder} has no {name}/config.json; an SDXL folder needs "
                                 f"{', '.join(n + '/' for n in names)} each with config.json and weights")
        config = _read_json(sub / "config.json")
        if name.startswith("text_encoder"):
            text_config = CLIPTextConfig.from_pretrained(str(sub), local_files_only=True)
            want = spec.configs[name]
            _check_config(folder, name, {k: getattr(text_config, k) for k in _TEXT_ENCODER_ARCHITECTURE_KEYS},
                          {k: want[k] for k in _TEXT_ENCODER_ARCHITECTURE_KEYS if k in want}, spec.name)
        else:
            cls = UNet2DConditionModel if name == "unet" else AutoencoderKL
            _check_config(folder, name, _with_init_defaults(cls, config), spec.configs[name], spec.name,
                          ignore=_NON_ARCHITECTURE_KEYS[name])
    loaders: dict[str, Any] = {"text_encoder": CLIPTextModel.from_pretrained,
                               "text_encoder_2": CLIPTextModelWithProjection.from_pretrained,
                               "unet": UNet2DConditionModel.from_pretrained, "vae": AutoencoderKL.from_pretrained}
    modules: dict[str, nn.Module] = {}
    for name in names:
        sub = folder / name
        weight_files, variant, use_safetensors = _folder_weight_files(sub, trust_pickle)
        for f in weight_files:
            files[f"{name}/{f.name}"] = _sha256(f)
        files[f"{name}/config.json"] = _sha256(sub / "config.json")
        kwargs: dict[str, Any] = {"local_files_only": True, "output_loading_info": True,
                                  "use_safetensors": use_safetensors, "variant": variant}
        if name.startswith("text_encoder"):
            kwargs["dtype"] = torch.float32
        else:
            kwargs.update(torch_dtype=torch.float32, low_cpu_mem_usage=is_accelerate_available())
        try:
            module, info = loaders[name](str(sub), **kwargs)
        except Exception as exc:
            raise load_failure(sub, weight_files, exc) from exc
        _check_loading_info(sub, name, info)
        with _parameters_on_meta():
            reference = build_module(spec, name)
        _compare_state_dicts(name, {k: v.shape for k, v in module.state_dict().items()}, reference.state_dict(),
                             spec.name, source="the folder's module")
        modules[name] = module
    return LoadedWeights(_finish(modules), "diffusers", files=files)


def _load_single_file(spec, path: Path, trust_pickle: bool) -> LoadedWeights:
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        if not trust_pickle:
            raise LdmExportError(f"{path.name} is a pickle checkpoint, and loading pickle runs code from the file; "
                                 "pass --trust-pickle if you trust its source, or convert it to .safetensors")
        checkpoint: _Checkpoint = _PickleCheckpoint(path)
    elif suffix in SAFETENSORS_SUFFIXES:
        checkpoint = _SafetensorsCheckpoint(path)
    else:
        raise LdmExportError(f"{path.name}: unknown weights format '{suffix}'; pass a .safetensors file or a "
                             "diffusers folder")
    digest = _sha256(path)
    with checkpoint:
        modules = _convert_single_file(spec, path, checkpoint)
    return LoadedWeights(_finish(modules), "single-file", sha256=digest, files={path.name: digest})


def _convert_single_file(spec, path: Path, checkpoint: _Checkpoint) -> dict[str, nn.Module]:
    from diffusers.loaders import single_file_utils as sfu

    from .dit_weights import refuse_dit_for_unet

    keys = checkpoint.keys()
    refuse_dit_for_unet(keys, path)  # an SD3/FLUX single file names itself by its keys, as for SD 1.x/2.x models
    open_clip_prefix = SDXL_OPEN_CLIP_PREFIX if spec.text_encoder is not None else REFINER_OPEN_CLIP_PREFIX
    required = [(LDM_UNET_PREFIX, "UNet"), (LDM_VAE_PREFIX, "VAE"), (open_clip_prefix, "OpenCLIP bigG text encoder")]
    if spec.text_encoder is not None:
        required.append((SDXL_CLIP_L_PREFIX, "CLIP-L text encoder"))
    for prefix, what in required:
        if not any(k.startswith(prefix) for k in keys):
            raise LdmExportError(f"{path.name} has no {what} weights (no key starts with '{prefix}'); it is not a "
                                 f"single-file '{spec.name}' checkpoint; pass the matching --model or a diffusers folder")
    modules: dict[str, nn.Module] = {}
    state = checkpoint.take((LDM_UNET_PREFIX, LDM_UNET_EMA_PREFIX))
    modules["unet"] = _adopt(spec, "unet", _convert("unet", path, lambda: sfu.convert_ldm_unet_checkpoint(
        state, spec.unet, extract_ema=True)))
    state = checkpoint.take((LDM_VAE_PREFIX,))
    modules["vae"] = _adopt(spec, "vae", _convert("vae", path, lambda: sfu.convert_ldm_vae_checkpoint(state, spec.vae)))
    if spec.text_encoder is not None:
        state = checkpoint.take((SDXL_CLIP_L_PREFIX,))
        modules["text_encoder"] = _adopt(spec, "text_encoder", _convert("text_encoder", path, lambda: sfu.convert_ldm_clip_checkpoint(
            state, remove_prefix=SDXL_CLIP_L_PREFIX)))
    state = checkpoint.take((open_clip_prefix,))
    with _parameters_on_meta():
        shell = build_module(spec, "text_encoder_2")
    modules["text_encoder_2"] = _adopt(spec, "text_encoder_2", _convert("text_encoder_2", path, lambda: sfu.convert_open_clip_checkpoint(
        shell, state, prefix=open_clip_prefix)))
    del state
    return {name: modules[name] for name in module_names(spec)}


def _adopt(spec, name: str, state: dict[str, torch.Tensor]) -> nn.Module:
    """Build ``name`` with parameters on meta, check keys and shapes (first mismatch named), adopt the tensors."""
    with _parameters_on_meta():
        module = build_module(spec, name)
    expected = module.state_dict()
    optional = "text_model.embeddings.position_ids"
    if optional in state and optional not in expected:
        del state[optional]
    elif optional in expected and optional not in state:
        state[optional] = expected[optional]
    _compare_state_dicts(name, {k: v.shape for k, v in state.items()}, expected, spec.name, source="the checkpoint")
    for key in list(state):
        state[key] = state[key].to(torch.float32).contiguous()
    module.load_state_dict(state, strict=True, assign=True)
    return module
