"""Load the weights an export starts from: random, a local diffusers folder, or a single-file LDM checkpoint.

Single-file checkpoints in the original LDM key layout (CompVis / Stability releases, A1111-style
``.safetensors``) are converted with diffusers' own ``single_file_utils`` converters, using the zoo
spec's configs, never the hub; the converted state dicts then load with strict key and shape checks
into modules built from the zoo spec. Pickle formats run code on load, so they need ``trust_pickle``.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ldm_export.export.models import build_random, build_text_encoder, build_unet, build_vae
from ldm_export.runtime.errors import LdmExportError
from ldm_export.zoo import ModelSpec

log = logging.getLogger(__name__)

MODULE_NAMES = ("text_encoder", "unet", "vae")
SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")

# LDM key prefixes of a single-file Stable Diffusion checkpoint
LDM_UNET_PREFIX = "model.diffusion_model."
LDM_UNET_EMA_PREFIX = "model_ema."
LDM_VAE_PREFIX = "first_stage_model."
LDM_CLIP_PREFIX = "cond_stage_model.transformer."  # SD 1.x: HF CLIPTextModel under a wrapper
LDM_OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD 2.x: OpenCLIP's text tower

# Config keys that do not change a module's weights: the folder's value is used and a difference
# from the spec is logged, not refused.
_NON_ARCHITECTURE_KEYS = {
    "unet": {"sample_size", "upcast_attention"},
    "vae": {"sample_size"},
}
# CLIPTextConfig keys that decide the text encoder's weights and forward pass; token ids are left
# out because SD 1.x folders carry CLIP's legacy ids (eos 2) with identical results for CLIP ids.
_TEXT_ENCODER_ARCHITECTURE_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "max_position_embeddings", "hidden_act", "layer_norm_eps",
)
# Buffers a checkpoint may carry or lack without meaning another architecture (recomputed at init).
_OPTIONAL_BUFFERS = {"text_encoder": {"text_model.embeddings.position_ids"}}


# families whose checkpoints hold other modules than SD's three: family -> (module, loader function)
_FAMILY_LOADERS = {
    "sdxl": ("ldm_export.export.weights_sdxl", "load_sdxl_weights"),
    "sdxl-refiner": ("ldm_export.export.weights_sdxl", "load_sdxl_weights"),
}


@dataclass(frozen=True)
class LoadedWeights:
    """Modules ready for export plus what the manifest records about where their weights came from."""

    modules: dict[str, nn.Module]  # text_encoder, unet, vae; eval mode, float32
    source: str  # "random", "diffusers" or "single-file"
    sha256: str | None = None  # of the single file; None for random weights and folders
    files: dict[str, str] = field(default_factory=dict)  # each file read (relative to the folder) -> sha256
    seed: int | None = None  # for random weights


def load_modules(spec: ModelSpec, weights: str | Path | None, random_weights: bool = False, seed: int = 0,
                 trust_pickle: bool = False) -> dict[str, nn.Module]:
    """The modules of ``spec`` with the given weights; see :func:`load_weights`."""
    return load_weights(spec, weights, random_weights=random_weights, seed=seed, trust_pickle=trust_pickle).modules


def load_weights(spec: ModelSpec, weights: str | Path | None, random_weights: bool = False, seed: int = 0,
                 trust_pickle: bool = False) -> LoadedWeights:
    """Build ``spec``'s text_encoder, unet and vae with random weights or weights read from ``weights``."""
    if "unet" not in spec.configs:  # a DiT family (transformer/ and several text encoders): its own loader
        from .dit_weights import load_dit_weights

        return load_dit_weights(spec, weights, random_weights=random_weights, seed=seed, trust_pickle=trust_pickle)
    if random_weights and weights is not None:
        raise LdmExportError("both --weights and --random-weights were given; pass only one of them")
    if spec.family in _FAMILY_LOADERS:
        import importlib

        module, function = _FAMILY_LOADERS[spec.family]
        return getattr(importlib.import_module(module), function)(spec, weights, random_weights, seed, trust_pickle)
    if random_weights:
        log.info("building %s with random weights (seed %d)", spec.name, seed)
        modules = build_random(spec, seed)
        return LoadedWeights(_finish(modules), "random", seed=seed)
    if weights is None:
        raise LdmExportError(
            f"no weights for model '{spec.name}'; pass --weights PATH (a diffusers folder or a single-file "
            "checkpoint) or --random-weights")
    path = Path(weights).expanduser()
    if not path.exists():
        raise LdmExportError(f"weights path {path} does not exist; pass a diffusers folder or a .safetensors file")
    if path.is_dir():
        return _load_diffusers_folder(spec, path, trust_pickle)
    return _load_single_file(spec, path, trust_pickle)


def _finish(modules: dict[str, nn.Module]) -> dict[str, nn.Module]:
    for module in modules.values():
        module.float().eval()
    return modules


# ----------------------------------------------------------------------------------------------------------
# diffusers folder


def refuse_dit_folder(folder: Path, model: str) -> None:
    """A DiT pipeline folder (transformer/, no unet/) given for a U-Net model: say so, not which U-Net part it lacks."""
    if (folder / "transformer").is_dir() and not (folder / "unet").is_dir():
        raise LdmExportError(f"{folder} holds a DiT pipeline (transformer/), not a U-Net: model '{model}' needs unet/; "
                             "pass the --model these weights belong to (sd3-medium, sd35-medium, flux-dev, flux-schnell) or --model auto")


def _load_diffusers_folder(spec: ModelSpec, folder: Path, trust_pickle: bool) -> LoadedWeights:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.utils import is_accelerate_available
    from transformers import CLIPTextConfig, CLIPTextModel

    if not (folder / "model_index.json").is_file():
        raise LdmExportError(
            f"{folder} is a directory without model_index.json, so not a diffusers pipeline folder; pass the "
            "pipeline's top folder or a single-file .safetensors checkpoint")
    files = {"model_index.json": _sha256(folder / "model_index.json")}
    _read_json(folder / "model_index.json")  # refuse a corrupt index early
    refuse_dit_folder(folder, spec.name)

    # check every component's config before reading any weights
    configs: dict[str, Any] = {}
    for name in MODULE_NAMES:
        sub = folder / name
        if not sub.is_dir():
            raise LdmExportError(f"diffusers folder {folder} has no {name}/ subfolder; it needs text_encoder/, "
                                 "unet/ and vae/, each with config.json and weights")
        if not (sub / "config.json").is_file():
            raise LdmExportError(f"{sub} has no config.json; re-save the component with save_pretrained")
        configs[name] = _read_json(sub / "config.json")
    try:
        text_config = CLIPTextConfig.from_pretrained(str(folder / "text_encoder"), local_files_only=True)
    except Exception as exc:
        raise LdmExportError(f"{folder}/text_encoder/config.json is not a CLIP text config ({_one_line(exc)}); "
                             "re-save the component with save_pretrained") from exc
    _check_config(folder, "text_encoder", {k: getattr(text_config, k) for k in _TEXT_ENCODER_ARCHITECTURE_KEYS},
                  {k: spec.text_encoder[k] for k in _TEXT_ENCODER_ARCHITECTURE_KEYS if k in spec.text_encoder},
                  spec.name)
    for name, cls, spec_config in (("unet", UNet2DConditionModel, spec.unet), ("vae", AutoencoderKL, spec.vae)):
        _check_config(folder, name, _with_init_defaults(cls, configs[name]), spec_config, spec.name,
                      ignore=_NON_ARCHITECTURE_KEYS.get(name, set()))

    modules: dict[str, nn.Module] = {}
    loaders: dict[str, Callable[..., Any]] = {
        "text_encoder": CLIPTextModel.from_pretrained,
        "unet": UNet2DConditionModel.from_pretrained,
        "vae": AutoencoderKL.from_pretrained,
    }
    for name in MODULE_NAMES:
        sub = folder / name
        weight_files, variant, use_safetensors = _folder_weight_files(sub, trust_pickle)
        for f in weight_files:
            files[f"{name}/{f.name}"] = _sha256(f)
        files[f"{name}/config.json"] = _sha256(sub / "config.json")
        log.info("loading %s from %s", name, sub)
        kwargs: dict[str, Any] = {"local_files_only": True, "output_loading_info": True,
                                  "use_safetensors": use_safetensors, "variant": variant}
        if name == "text_encoder":
            kwargs["dtype"] = torch.float32
        else:
            # without accelerate, diffusers builds the module with random init and then copies the weights in
            kwargs.update(torch_dtype=torch.float32, low_cpu_mem_usage=is_accelerate_available())
        try:
            module, info = loaders[name](str(sub), **kwargs)
        except LdmExportError:
            raise
        except Exception as exc:  # from_pretrained raises OSError, ValueError, RuntimeError, SafetensorError...
            raise load_failure(sub, weight_files, exc) from exc
        _check_loading_info(sub, name, info)
        _check_structure(name, module, spec)
        modules[name] = module
    log.info("loaded diffusers folder %s as %s", folder, spec.name)
    return LoadedWeights(_finish(modules), "diffusers", files=files)


def _folder_weight_files(sub: Path, trust_pickle: bool) -> tuple[list[Path], str | None, bool | None]:
    """The weight files of one component folder, the variant to ask for, and whether safetensors are used."""
    safetensors = sorted(sub.glob("*.safetensors"))
    if safetensors:
        # "model.safetensors", "model-00001-of-00002.safetensors"; a variant is "model.fp16.safetensors"
        if any(f.name.count(".") == 1 for f in safetensors):
            return [f for f in safetensors if f.name.count(".") == 1], None, True
        variant = sorted(f.name.split(".")[1].split("-")[0] for f in safetensors)[0]
        log.info("%s holds only the %s variant of its weights; loading that", sub, variant)
        return [f for f in safetensors if f.name.split(".")[1].split("-")[0] == variant], variant, True
    pickles = sorted(f for f in sub.iterdir() if f.suffix in PICKLE_SUFFIXES)
    if not pickles:
        # a release folder: one file beside model_index.json holds the weights (FLUX's beside its ae.safetensors: the
        # largest is the model)
        beside = sorted(sub.parent.glob("*.safetensors"), key=lambda f: f.stat().st_size, reverse=True)
        if beside:
            raise LdmExportError(f"{sub} has no weights (no .safetensors file), and {sub.parent.name}/ holds "
                                 f"{beside[0].name}: pass that file as --weights (the rest is read from its folder)")
        raise LdmExportError(f"{sub} has no weights (no .safetensors file); re-save it with save_pretrained")
    if not trust_pickle:
        raise LdmExportError(
            f"{sub} holds only pickle weights ({pickles[0].name}), and loading pickle runs code from the file; "
            "pass --trust-pickle if you trust its source, or convert it to safetensors")
    return pickles, None, False


def _check_config(folder: Path, name: str, got_config: dict[str, Any], spec_config: dict[str, Any], model: str,
                  ignore: set[str] = frozenset()) -> None:
    for key, want in spec_config.items():
        got = got_config.get(key, "<absent>")
        if _normalise(got) == _normalise(want):
            continue
        if key in ignore:
            log.info("%s/%s/config.json has %s=%r (model %s: %r); using the folder's value",
                     folder, name, key, got, model, want)
            continue
        raise LdmExportError(
            f"{folder}/{name}/config.json has {key}={got!r} but model '{model}' has {key}={want!r}; "
            f"pass the --model these weights belong to{_inpaint_hint(name, key, got)}, or --model auto to build the "
            "folder's own architecture")


def _inpaint_hint(name: str, key: str, got: Any) -> str:
    """Where a U-Net's input channels say it is an inpainting one (latents, mask, masked-image latents)."""
    from ldm_export.zoo import INPAINT_MODELS

    return f" (a 9-channel inpainting UNet: {INPAINT_MODELS})" if (name, key, got) == ("unet", "in_channels", 9) else ""


def _with_init_defaults(cls: type, config: dict[str, Any]) -> dict[str, Any]:
    """A diffusers config with every __init__ default filled in, as from_pretrained would build it."""
    defaults = {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return defaults | config


def _normalise(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    return value


def _check_loading_info(sub: Path, name: str, info: dict[str, Any]) -> None:
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise LdmExportError(f"{sub}: the weights lack '{missing[0]}' ({len(missing)} missing in all); the folder "
                             "is incomplete or of another architecture")
    mismatched = info.get("mismatched_keys") or []
    if mismatched:
        key, got, want = mismatched[0]
        raise LdmExportError(f"{sub}: weight '{key}' has shape {tuple(got)} but the config needs {tuple(want)}")
    unexpected = sorted(info.get("unexpected_keys") or [])
    if unexpected:
        log.warning("%s: %d weights not used by %s, e.g. '%s'", sub, len(unexpected), name, unexpected[0])


def _check_structure(name: str, module: nn.Module, spec: ModelSpec) -> None:
    """Refuse a module whose parameters differ from those the spec's config builds."""
    with _parameters_on_meta():
        reference = _BUILDERS[name](spec)
    _compare_state_dicts(name, {k: v.shape for k, v in module.state_dict().items()}, reference.state_dict(),
                         spec.name, source="the folder's module")


# ----------------------------------------------------------------------------------------------------------
# single file


def _load_single_file(spec: ModelSpec, path: Path, trust_pickle: bool) -> LoadedWeights:
    if not os.access(path, os.R_OK):
        raise LdmExportError(f"cannot read {path} (permission denied); check the file's permissions")
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        if not trust_pickle:
            raise LdmExportError(
                f"{path.name} is a pickle checkpoint, and loading pickle runs code from the file; pass "
                "--trust-pickle if you trust its source, or convert it to .safetensors")
        checkpoint: _Checkpoint = _PickleCheckpoint(path)
    elif suffix in SAFETENSORS_SUFFIXES:
        checkpoint = _SafetensorsCheckpoint(path)
    else:
        raise LdmExportError(f"{path.name}: unknown weights format '{suffix}'; pass a .safetensors file, a "
                             "diffusers folder, or a pickle checkpoint (.ckpt/.pt/.pth/.bin) with --trust-pickle")
    digest = _sha256(path)
    with checkpoint:
        modules = _convert_single_file(spec, path, checkpoint)
    log.info("loaded single-file checkpoint %s (sha256 %s) as %s", path, digest[:10], spec.name)
    return LoadedWeights(_finish(modules), "single-file", sha256=digest, files={path.name: digest})


class _Checkpoint:
    """A state dict read one key prefix at a time, so at most one component is held twice in memory."""

    def __enter__(self) -> "_Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def keys(self) -> list[str]:
        raise NotImplementedError

    def take(self, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def load_failure(sub: Path, weight_files, exc: Exception) -> LdmExportError:
    """Why a folder module's from_pretrained failed, on one line: the first of its weight files that is not readable
    safetensors (truncated, empty, a bad header), named with what to do; else the loader's own message."""
    from safetensors import safe_open

    for f in weight_files:
        if f.suffix != ".safetensors":
            continue
        try:
            with safe_open(str(f), framework="pt", device="cpu") as handle:
                handle.keys()
        except Exception as bad:  # SafetensorError: bad header, truncated file, not safetensors at all
            return LdmExportError(f"{sub.name}/{f.name} is not a readable safetensors file ({_one_line(bad)}); check "
                                  "that the download is complete")
    return LdmExportError(f"could not load {sub}: {_one_line(exc)}")


class _SafetensorsCheckpoint(_Checkpoint):
    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        try:
            self._file = safe_open(str(path), framework="pt", device="cpu")
            self._keys = list(self._file.keys())
        except Exception as exc:  # SafetensorError: bad header, truncated file, not safetensors at all
            raise LdmExportError(f"{path.name} is not a readable safetensors file ({_one_line(exc)}); "
                                 "check that the download is complete") from exc

    def __exit__(self, *exc: object) -> None:
        self._file = None

    def keys(self) -> list[str]:
        return self._keys

    def take(self, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
        try:
            return {k: self._file.get_tensor(k) for k in self._keys if k.startswith(prefixes)}
        except Exception as exc:
            raise LdmExportError(f"{self.path.name}: cannot read tensor data ({_one_line(exc)}); the file "
                                 "is truncated or corrupt") from exc


class _PickleCheckpoint(_Checkpoint):
    def __init__(self, path: Path):
        log.warning("loading pickle checkpoint %s with weights_only=False (trusted by --trust-pickle)", path)
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=False)
        except Exception as exc:
            raise LdmExportError(f"{path.name} is not a readable torch checkpoint ({_one_line(exc)})") from exc
        while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise LdmExportError(f"{path.name} holds a {type(obj).__name__}, not a state dict; pass a checkpoint "
                                 "whose top level (or 'state_dict' entry) maps names to tensors")
        self._state = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}

    def keys(self) -> list[str]:
        return list(self._state)

    def take(self, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
        return {k: self._state.pop(k) for k in list(self._state) if k.startswith(prefixes)}


def _convert_single_file(spec: ModelSpec, path: Path, checkpoint: _Checkpoint) -> dict[str, nn.Module]:
    from diffusers.loaders import single_file_utils as sfu

    keys = checkpoint.keys()
    from .dit_weights import refuse_dit_for_unet

    refuse_dit_for_unet(keys, path)  # an SD3/FLUX single file names itself by its keys

    def require(prefix: str, what: str) -> None:
        if not any(k.startswith(prefix) for k in keys):
            raise LdmExportError(
                f"{path.name} has no {what} weights (no key starts with '{prefix}'); it is not a single-file "
                "Stable Diffusion checkpoint in the LDM layout; pass a diffusers folder instead")

    require(LDM_UNET_PREFIX, "UNet")
    require(LDM_VAE_PREFIX, "VAE")
    modules: dict[str, nn.Module] = {}

    # UNet: prefer EMA weights when the checkpoint has them (what inference uses)
    state = checkpoint.take((LDM_UNET_PREFIX, LDM_UNET_EMA_PREFIX))
    converted = _convert("unet", path, lambda: sfu.convert_ldm_unet_checkpoint(state, spec.unet, extract_ema=True))
    del state
    modules["unet"] = _load_converted("unet", converted, spec)
    del converted

    state = checkpoint.take((LDM_VAE_PREFIX,))
    converted = _convert("vae", path, lambda: sfu.convert_ldm_vae_checkpoint(state, spec.vae))
    del state
    modules["vae"] = _load_converted("vae", converted, spec)
    del converted

    if any(k.startswith(LDM_CLIP_PREFIX) for k in keys):
        state = checkpoint.take((LDM_CLIP_PREFIX,))
        converted = _convert("text_encoder", path, lambda: sfu.convert_ldm_clip_checkpoint(state))
    elif any(k.startswith(LDM_OPEN_CLIP_PREFIX) for k in keys):
        state = checkpoint.take((LDM_OPEN_CLIP_PREFIX,))
        with _parameters_on_meta():
            text_model = build_text_encoder(spec)  # the converter reads hidden_size from it
        converted = _convert("text_encoder", path,
                             lambda: sfu.convert_open_clip_checkpoint(text_model, state, prefix=LDM_OPEN_CLIP_PREFIX))
        converted = _drop_open_clip_extras(converted, spec)
    else:
        raise LdmExportError(
            f"{path.name} has no text encoder weights (no key starts with '{LDM_CLIP_PREFIX}' (SD 1.x) or "
            f"'{LDM_OPEN_CLIP_PREFIX}' (SD 2.x)); pass a full single-file checkpoint or a diffusers folder")
    del state
    modules["text_encoder"] = _load_converted("text_encoder", converted, spec)
    return {name: modules[name] for name in MODULE_NAMES}


def _convert(name: str, path: Path, convert: Callable[[], dict[str, Any]]) -> dict[str, torch.Tensor]:
    try:
        converted = convert()
    except (KeyError, IndexError, ValueError, RuntimeError, AttributeError) as exc:
        raise LdmExportError(f"{path.name}: cannot convert the {name} weights from the LDM layout "
                             f"({type(exc).__name__}: {_one_line(exc)}); the checkpoint is incomplete or of "
                             "another architecture") from exc
    # diffusers' converters map a key they expected but did not find to None
    return {k: v for k, v in converted.items() if v is not None}


_OPEN_CLIP_LAYER = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.")


def _drop_open_clip_extras(converted: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """SD 2.x conditions on OpenCLIP's penultimate layer: drop the last layer and the projection.

    diffusers' converter drops them only for ViT-H (layer 23); this does the same for any depth.
    """
    layers = spec.text_encoder["num_hidden_layers"]
    dropped = [k for k in converted
               if k == "text_projection.weight"
               or ((m := _OPEN_CLIP_LAYER.match(k)) is not None and int(m.group(1)) == layers)]
    for k in dropped:
        del converted[k]
    if dropped:
        log.info("dropped %d OpenCLIP weights past the penultimate layer (SD 2.x uses %d layers)", len(dropped),
                 layers)
    return converted


def _load_converted(name: str, state: dict[str, torch.Tensor], spec: ModelSpec) -> nn.Module:
    """Build ``name`` from the spec with parameters on meta, check keys and shapes, then adopt the tensors."""
    with _parameters_on_meta():
        module = _BUILDERS[name](spec)
    expected = module.state_dict()
    for key in _OPTIONAL_BUFFERS.get(name, ()):
        if key in state and key not in expected:
            del state[key]  # a non-persistent buffer here, stored by older transformers
        elif key in expected and key not in state:
            state[key] = expected[key]
    _compare_state_dicts(name, {k: v.shape for k, v in state.items()}, expected, spec.name,
                         source="the checkpoint")
    for key in list(state):
        # fp16/bf16 checkpoints become fp32; assign=True adopts the tensors instead of copying them
        state[key] = state[key].to(torch.float32).contiguous()
    module.load_state_dict(state, strict=True, assign=True)
    state.clear()
    return module


def _compare_state_dicts(name: str, got: dict[str, torch.Size], expected: dict[str, torch.Tensor], model: str,
                         source: str) -> None:
    """Raise naming the first key that is missing, unexpected, or of another shape."""
    for key, tensor in expected.items():
        if key not in got:
            raise LdmExportError(f"{name}: {source} lacks '{key}' (expected shape {tuple(tensor.shape)}); it is "
                                 f"incomplete or not a '{model}' model; pass the matching --model")
        if tuple(got[key]) != tuple(tensor.shape):
            channels = got[key][1] if key == "conv_in.weight" and len(got[key]) == 4 else None
            raise LdmExportError(f"{name}: '{key}' has shape {tuple(got[key])} in {source} but model '{model}' "
                                 f"expects {tuple(tensor.shape)}; pass the --model these weights belong to"
                                 f"{_inpaint_hint(name, 'in_channels', channels)}")
    for key in got:
        if key not in expected:
            raise LdmExportError(f"{name}: {source} has unexpected '{key}' that model '{model}' does not have; "
                                 "pass the --model these weights belong to")


_BUILDERS: dict[str, Callable[[ModelSpec], nn.Module]] = {
    "text_encoder": build_text_encoder, "unet": build_unet, "vae": build_vae,
}


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Create parameters on the meta device (no memory, no init cost) while buffers stay real.

    Same idea as accelerate's ``init_empty_weights``: non-persistent buffers such as CLIP's position_ids
    are computed at init and must stay real, which building under ``torch.device("meta")`` would lose.
    """
    original = nn.Module.register_parameter

    def register_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None:
            kwargs = dict(module._parameters[name].__dict__, requires_grad=param.requires_grad)
            module._parameters[name] = type(param)(module._parameters[name].to("meta"), **kwargs)

    nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


# ----------------------------------------------------------------------------------------------------------
# helpers


def _sha256(path: Path, chunk: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(chunk):
                digest.update(block)
    except PermissionError as exc:
        raise LdmExportError(f"cannot read {path} (permission denied); check the file's permissions") from exc
    except OSError as exc:
        raise LdmExportError(f"cannot read {path}: {_one_line(exc)}") from exc
    return digest.hexdigest()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except PermissionError as exc:
        raise LdmExportError(f"cannot read {path} (permission denied); check the file's permissions") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LdmExportError(f"{path} is not valid JSON ({_one_line(exc)}); re-save the folder") from exc
    if not isinstance(data, dict):
        raise LdmExportError(f"{path} holds a JSON {type(data).__name__}, not an object; re-save the folder")
    return data


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] + ("..." if len(text) > 300 else "")
