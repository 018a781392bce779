"""LoRA: fuse low-rank adapters into the torch modules before export, or into a built bundle's ONNX initializers.

Files in kohya/A1111 (``lora_unet_*``, ``lora_te*_``) and diffusers/PEFT (``unet.*.lora_A``) layouts are read
with diffusers' own ``lora_state_dict`` (which converts kohya keys, SDXL's sgm block names included), injected
with diffusers' ``load_lora_into_unet`` / ``load_lora_into_text_encoder`` (PEFT), merged at the requested scale
with PEFT's ``merge`` and the adapter layers removed, so the modules export as plain ones.

Bundles get the same weights without re-export: at build time every torch parameter is matched to the ONNX
initializer holding it (by content, also transposed, as the exporter folds ``W.T`` for MatMul, or as one slice of a
packed initializer, the layout fused attention kernels take for q/k/v); ``lora`` computes each adapter's weight
delta by merging it into a zero-weight copy of the architecture and adds it there, in the initializer's own layout
and dtype (fp16 bundles too). ``--target cuda`` bundles work the same way: their fused kernels (MultiHeadAttention,
BiasSplitGelu, the residual folds) take the weights as initializers of ordinary MatMul/Conv nodes or as packed ones.

Verification is by tests against a fresh export with ``--lora`` of the same model. ONNX Runtime's CPU provider has
no kernel for some fused ops of cuda-target graphs (GroupNorm, SkipGroupNorm, BiasSplitGelu), so without a GPU
those bundles are compared per initializer (max abs difference against the fresh export) and their UNet run on
onnx's reference evaluator with the contrib ops' numpy references (tests/test_lora.py); ``tools/gpu/lora.sh`` runs
the same comparison on the CUDA provider.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ldm_export.runtime.errors import LdmExportError

log = logging.getLogger(__name__)

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
_PEFT_SUFFIX = re.compile(r"\.lora_[AB]\.weight$|\.lora_B\.bias$|\.lora_magnitude_vector$")


@dataclass(frozen=True)
class LoraRef:
    """One ``--lora FILE[:SCALE]``."""

    path: Path
    scale: float = 1.0

    def to_json(self, sha256: str | None = None) -> dict:
        return {"file": self.path.name, "scale": self.scale, "sha256": sha256, "addnet_sha256": addnet_hash(self.path)}


def addnet_hash(path: Path) -> str | None:
    """The sha256 of a safetensors file's tensor data (the bytes after its header): the hash A1111 writes as a LoRA's
    short hash in "Lora hashes" (and civitai lists as AutoV3), unchanged when only the metadata changes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return None
        f.seek(8 + int.from_bytes(head, "little"))
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def parse_lora(arg: str) -> LoraRef:
    """``FILE[:SCALE]`` -> LoraRef; the scale defaults to 1."""
    path, scale = arg, 1.0
    head, sep, tail = arg.rpartition(":")
    if sep and head and not Path(arg).expanduser().is_file():  # a file named "style.safetensors:0.5" is that file
        try:
            scale = float(tail)
            path = head
        except ValueError:
            path = arg
    if not np.isfinite(scale):
        raise LdmExportError(f"LoRA scale must be a finite number, got '{tail}' in '{arg}'")
    p = Path(path).expanduser()
    if not p.is_file() and path == arg and sep and head and Path(head).expanduser().is_file():
        raise LdmExportError(f"LoRA scale '{tail}' in '{arg}' is not a number; pass FILE[:SCALE] with a number, e.g. "
                             f"{head}:0.8")
    if p.is_dir():
        raise LdmExportError(f"LoRA file {p} is a folder; pass FILE[:SCALE] with the .safetensors file in it")
    if not p.is_file():
        raise LdmExportError(f"LoRA file {p} does not exist; pass FILE[:SCALE] with a .safetensors file")
    if p.suffix.lower() != ".safetensors" and not _looks_like_safetensors(p):
        raise LdmExportError(f"LoRA file {p.name} is not .safetensors; convert it (pickle files run code when loaded)")
    if scale == 0:
        log.warning("LoRA %s has scale 0: it changes no weight", p.name)
    return LoraRef(p, scale)


def _looks_like_safetensors(path: Path) -> bool:
    """A safetensors file by its content whatever its name ("v1.0:final"): a header that reads as one."""
    from .folder_spec import read_safetensors_shapes

    try:
        read_safetensors_shapes(path)
    except LdmExportError:
        return False
    return True


def _one_line(e: BaseException) -> str:
    from .weights import _one_line

    return _one_line(e)


def check_lora_model(model: str, has_unet: bool) -> None:
    """Refuse LoRA for a model without a UNet before any work (the loaders and the initializer map are the U-Net
    families')."""
    if not has_unet:
        raise LdmExportError(f"LoRA fuses into the UNet and text encoders of the U-Net families (SD 1.x/2.x, SDXL); "
                             f"model '{model}' has no UNet (a DiT), which LoRA does not reach yet")


def _mixin(modules: dict[str, Any]):
    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

    return StableDiffusionXLLoraLoaderMixin if "text_encoder_2" in modules else StableDiffusionLoraLoaderMixin


# the down/up matrix names of kohya/A1111, diffusers/PEFT and diffusers' older attention-processor files
LORA_PAIRS = ((".lora_down.weight", ".lora_up.weight"), (".lora_A.weight", ".lora_B.weight"),
              (".lora.down.weight", ".lora.up.weight"))


def read_lora(ref: LoraRef, modules: dict[str, Any]) -> tuple[dict, dict | None]:
    """The LoRA's state dict in diffusers' layout (keys prefixed ``unet.`` / ``text_encoder[_2].``) and alphas."""
    import torch
    from safetensors.torch import load_file

    try:
        raw = load_file(str(ref.path))
    except Exception as e:  # SafetensorError: truncated or not safetensors
        with open(ref.path, "rb") as f:
            head = f.read(9)
        # a zip archive (torch.save) or a bare pickle (protocol 2-5), renamed; a safetensors header starts at byte 8
        if head[8:9] != b"{" and (head[:2] == b"PK" or head[:1] == b"\x80" and head[1:2] in b"\x02\x03\x04\x05"):
            raise LdmExportError(f"LoRA file {ref.path.name} is a pickle (a .pt/.ckpt file renamed), which ldm-export "
                                 "never unpickles: convert it to .safetensors with the tool that trained it") from None
        raise LdmExportError(f"LoRA file {ref.path.name} is not a readable safetensors file ({e}): it is incomplete or "
                             "damaged; download or save it again") from None
    if not raw:
        raise LdmExportError(f"LoRA file {ref.path.name} holds no tensors")
    bad = next((k for k, t in raw.items() if t.is_floating_point() and not bool(t.isfinite().all())), None)
    if bad is not None:
        raise LdmExportError(f"LoRA file {ref.path.name}: tensor '{bad}' holds NaN or infinite values; the file is damaged")
    lycoris = next((k for k in raw if re.search(r"\.(hada_w[12]_[ab]|hada_t[12]|lokr_w[12](_[ab])?|lokr_t2|"
                                                r"b1\.weight|w_norm|diff(_b)?|lora_mid\.weight)$", k)), None)
    if lycoris is not None:
        raise LdmExportError(f"LoRA file {ref.path.name} is a LyCORIS file ('{lycoris}': LoHa, LoKr, (IA)^3, a "
                             "full diff or a LoCon with a Tucker core, lora_mid), which diffusers' loaders do not read; "
                             "ldm-export fuses kohya and diffusers/PEFT LoRA (lora_down/lora_up or lora_A/lora_B "
                             "matrices): merge it into the checkpoint with the tool that trained it, then build")
    raw_peft = next((k for k in raw if k.startswith("base_model.model.")), None)
    if raw_peft is not None:  # PEFT's own save_pretrained of a wrapped model: the component is not named
        raise LdmExportError(f"LoRA file {ref.path.name} holds PEFT's raw keys ('{raw_peft}'), which do not say which "
                             "model they adapt: save it with diffusers' save_lora_weights, or rename the prefix "
                             "'base_model.model.' to 'unet.' (or 'text_encoder.')")
    if not any("lora" in k.lower() for k in raw):  # diffusers' converter reads every LoRA layout it knows; this is none
        raise LdmExportError(f"LoRA file {ref.path.name} holds no LoRA keys (e.g. '{next(iter(raw))}'): it is not a "
                             "LoRA (a textual-inversion embedding or a model checkpoint?)")
    dora = next((k for k in raw if k.endswith(".dora_scale")), None)
    if dora is not None:  # diffusers' kohya converter drops these (with a log line): the result would not be the DoRA
        raise LdmExportError(f"LoRA file {ref.path.name} is a DoRA in kohya's layout ('{dora}'), whose magnitudes "
                             "diffusers' converter drops, so fusing it would not give the trained weights; ldm-export "
                             "fuses DoRA in the diffusers/PEFT layout (lora_magnitude_vector keys)")
    for key in raw:  # a matrix without its partner: name it here (diffusers' converter fails on it with less to go on)
        for down, up in LORA_PAIRS:
            for have, want, what in ((down, up, "up"), (up, down, "down")):
                if key.endswith(have) and key[:-len(have)] + want not in raw:
                    raise LdmExportError(f"LoRA file {ref.path.name}: '{key}' has no {what} matrix "
                                         f"('{key[:-len(have)] + want}'); the file is incomplete")
    if any(k.endswith(".alpha") for k in raw):
        # a kohya layer without its alpha has scale 1 (alpha = rank), as A1111 and kohya's scripts read it; diffusers
        # gives it the file's most common alpha instead, so name each one's own
        for key in [k for k in raw if k.endswith(".lora_down.weight")]:
            alpha = key[:-len(".lora_down.weight")] + ".alpha"
            if alpha not in raw:
                raw[alpha] = torch.tensor(float(raw[key].shape[0]))
    try:
        state, alphas = _mixin(modules).lora_state_dict(raw, unet_config=modules["unet"].config)
    except (KeyError, ValueError, RuntimeError, IndexError) as e:
        raise LdmExportError(f"LoRA file {ref.path.name}: diffusers cannot read its keys ({_one_line(e)}); it is not a "
                             "kohya or diffusers/PEFT LoRA (LyCORIS LoHa/LoKr files are not read)") from None
    return state, alphas


LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' save_lora_weights: each adapter's LoraConfig


def read_lora_metadata(path: Path) -> dict | None:
    """The PEFT adapter configs a diffusers file keeps in its header (``unet.r``, ``unet.lora_alpha``,
    ``unet.alpha_pattern``, ...; diffusers' ``save_lora_weights`` writes them), which set each layer's alpha / rank
    as diffusers' loaders read them; None when the file has none."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(LORA_ADAPTER_METADATA_KEY)
    except Exception:  # unreadable: read_lora names it
        return None
    if not raw:
        return None
    try:
        meta = json.loads(raw)
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        raise LdmExportError(f"LoRA file {path.name}: its header's {LORA_ADAPTER_METADATA_KEY} is not a JSON object; "
                             "save the LoRA again with diffusers' save_lora_weights")
    return meta


def is_dora(path: Path) -> str | None:
    """The first DoRA key of a safetensors LoRA (PEFT's magnitude vectors, kohya's dora_scale), or None."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            return next((k for k in f.keys() if k.endswith((".lora_magnitude_vector", ".dora_scale"))), None)
    except Exception:  # unreadable: read_lora names the problem
        return None


def _peft_parts(state: dict, prefix: str, is_unet: bool, file: str = "this LoRA") -> dict:
    """The keys one component receives, converted as diffusers converts them before PEFT injects them."""
    from diffusers.utils.state_dict_utils import (StateDictType, convert_state_dict_to_diffusers,
                                                  convert_state_dict_to_peft, convert_unet_state_dict_to_peft)

    part = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
    if not part:
        return part
    if any(".lora_A." in k for k in part):  # PEFT's layout already (diffusers' files, and its kohya converter's UNet)
        return part
    try:
        if is_unet:
            return convert_unet_state_dict_to_peft(part)
        # diffusers tells its old text-encoder layout (`to_q_lora.down.weight`, what its kohya converter writes) by an
        # `out_proj` key alone, so a kohya LoRA of q/k/v without out_proj (A1111 reads it) failed "to infer the type"
        old = any(re.search(r"\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$", k) for k in part)
        return convert_state_dict_to_peft(convert_state_dict_to_diffusers(
            part, original_type=StateDictType.DIFFUSERS_OLD if old else None))
    except ValueError as e:  # "Could not automatically infer state dict type"
        first = next(iter(part))
        raise LdmExportError(f"LoRA file {file}: diffusers cannot convert its {prefix} keys (e.g. '{prefix}.{first}'): "
                             f"{_one_line(e)}; the keys are not of a kohya or diffusers/PEFT LoRA for this model") from None


def _diffusers_layout(key: str) -> str:
    """A PEFT-layout key (``fc1.lora_A.weight``) in diffusers' layout (``fc1.lora_linear_layer.down.weight``)."""
    return re.sub(r"\.lora_([AB])\.weight$", lambda m: f".lora_linear_layer.{'down' if m[1] == 'A' else 'up'}.weight",
                  key)


def check_lora(ref: LoraRef, state: dict, modules: dict[str, Any], model: str) -> dict[str, int]:
    """Refuse a LoRA for another architecture, naming the first key that has no layer or another shape; return
    the number of layers it adapts per component."""
    import torch

    components = [c for c in ("unet", *TEXT_ENCODERS) if c in modules]
    stray = next((k for k in state if not k.startswith(tuple(c + "." for c in components))), None)
    if stray is not None:
        kohya = " (kohya's lora_te2_ keys: a LoRA for SDXL)" if stray.startswith("text_encoder_2.") else ""
        raise LdmExportError(f"LoRA file {ref.path.name}: key '{stray}'{kohya} is for no component of model '{model}' "
                             f"({', '.join(components)}); it is a LoRA for another architecture")
    counts = {}
    for component in components:
        part = _peft_parts(state, component, component == "unet", ref.path.name)
        layers = dict(modules[component].named_modules())
        targets = sorted({_PEFT_SUFFIX.sub("", k) for k in part})
        for path in targets:
            layer = layers.get(path)
            if layer is None:
                raise LdmExportError(f"LoRA file {ref.path.name} adapts '{component}.{path}', which model '{model}' "
                                     "does not have; it is a LoRA for another architecture")
            down, up = part.get(f"{path}.lora_A.weight"), part.get(f"{path}.lora_B.weight")
            if down is None or up is None:
                raise LdmExportError(f"LoRA file {ref.path.name}: '{component}.{path}' lacks its "
                                     f"{'down (A)' if down is None else 'up (B)'} matrix; the file is incomplete")
            if isinstance(layer, torch.nn.Linear):
                fan_in, fan_out = layer.in_features, layer.out_features
            elif isinstance(layer, torch.nn.Conv2d):
                fan_in, fan_out = layer.in_channels, layer.out_channels
            else:
                raise LdmExportError(f"LoRA file {ref.path.name} adapts '{component}.{path}', a "
                                     f"{type(layer).__name__}; only linear and convolution layers take LoRA")
            dims = 2 if isinstance(layer, torch.nn.Linear) else 4
            if down.ndim != dims or up.ndim != dims or down.shape[0] != up.shape[1]:
                raise LdmExportError(
                    f"LoRA file {ref.path.name}: '{component}.{path}' has down {tuple(down.shape)} and up "
                    f"{tuple(up.shape)}; a {type(layer).__name__} takes {dims}-D down and up matrices of one rank "
                    "(down's first size equal to up's second); the file is damaged")
            if down.shape[1] != fan_in or up.shape[0] != fan_out:
                raise LdmExportError(
                    f"LoRA file {ref.path.name}: '{component}.{path}' has down {tuple(down.shape)} and up "
                    f"{tuple(up.shape)} but the layer maps {fan_in} to {fan_out} features in model '{model}'; it is "
                    "a LoRA for another architecture")
        counts[component] = len(targets)
    if not any(counts.values()):
        raise LdmExportError(f"LoRA file {ref.path.name} adapts no layer of model '{model}'")
    return counts


def apply_loras(modules: dict[str, Any], loras: Iterable[LoraRef], model: str) -> list[dict]:
    """Fuse each LoRA into ``modules`` in place (diffusers' loaders, PEFT's merge); returns what was fused."""
    from diffusers.loaders.lora_base import _remove_text_encoder_monkey_patch
    from peft.tuners.tuners_utils import BaseTunerLayer

    from .weights import _sha256

    report = []
    for k, ref in enumerate(loras):
        state, alphas = read_lora(ref, modules)
        metadata = None if alphas else read_lora_metadata(ref.path)  # kohya's alphas are in the tensors

        def config_of(prefix: str) -> dict:  # the adapter config of one model, as diffusers passes it (or nothing)
            own = {k: v for k, v in (metadata or {}).items() if k.startswith(f"{prefix}.")}
            if not own:
                return {}
            for key in ("rank_pattern", "alpha_pattern"):  # LoraConfig's, which diffusers' reader indexes
                own.setdefault(f"{prefix}.{key}", {})
            return {"metadata": own}

        counts = check_lora(ref, state, modules, model)
        mixin = _mixin(modules)
        adapter = f"ldm_export_{k}"
        targets = []
        try:  # what check_lora does not see (a DoRA magnitude of another shape) fails in PEFT's loader
            if counts.get("unet"):
                mixin.load_lora_into_unet(state, alphas, unet=modules["unet"], adapter_name=adapter,
                                          **config_of("unet"))
                targets.append(("unet", modules["unet"]))
            for te in TEXT_ENCODERS:
                if counts.get(te):
                    # _peft_parts converts the keys (it tells diffusers' old layout without an out_proj key, which
                    # the loader's own conversion cannot); they go in in diffusers' layout, which the loader's two
                    # conversions read for any layer (from PEFT's layout they rename q/k/v/out_proj alone, so a LoRA
                    # of the MLP only failed to "infer its type")
                    part = {f"{te}.{_diffusers_layout(k)}": v
                            for k, v in _peft_parts(state, te, False, ref.path.name).items()}
                    mixin.load_lora_into_text_encoder(part, alphas, modules[te], prefix=te, adapter_name=adapter,
                                                      **config_of(te))
                    targets.append((te, modules[te]))
        except (RuntimeError, ValueError, KeyError) as e:
            raise LdmExportError(f"LoRA file {ref.path.name} does not load into model '{model}': {_one_line(e)[:300]}; "
                                 "it is damaged or for another architecture") from None
        for name, module in targets:
            merged = 0
            for layer in module.modules():
                if isinstance(layer, BaseTunerLayer) and adapter in layer.lora_A:
                    # scaling = scale * alpha / rank, as diffusers' fuse_lora(lora_scale=scale) computes it
                    layer.scaling[adapter] = layer.scaling[adapter] * ref.scale
                    layer.merge(adapter_names=[adapter])
                    merged += 1
            if name == "unet":
                module.unload_lora()
            else:
                _remove_text_encoder_monkey_patch(module)
            log.info("fused LoRA %s (scale %s) into %d %s layers", ref.path.name, ref.scale, merged, name)
        report.append(ref.to_json(_sha256(ref.path)) | {"layers": counts})
    return report


# ---------------------------------------------------------------------------------------------- bundles


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, dtype=np.float32).tobytes()).hexdigest()


def initializer_map(module, model) -> dict[str, dict]:
    """torch parameter name -> where its values sit in the ONNX graph, matched by content: ``{"initializer": name,
    "transposed": bool}`` for a whole initializer (the exporter folds ``W.T`` for MatMul), plus ``"view", "axis",
    "index"`` for a slice of a packed one (fused kernels may pack q/k/v or k/v into one weight: contiguous blocks or
    interleaved per head, as ONNX Runtime's packed MultiHeadAttention formats are). Ambiguous parameters (two with
    equal values, e.g. LayerNorm weights of ones) are left out: LoRA never targets them."""
    from onnx import numpy_helper

    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer
               if i.data_type == 1 and len(i.dims) > 0}  # float32 tensors only (ints/scalars are not weights)
    by_hash: dict[str, list[str]] = {}
    for name, a in weights.items():
        by_hash.setdefault(_digest(a), []).append(name)
    params = [(name, p.detach().numpy()) for name, p in module.named_parameters()]
    own = [_digest(a) for _, a in params]
    counts: dict[str, int] = {}
    for h in own:
        counts[h] = counts.get(h, 0) + 1
    out, loose = {}, {}
    for (name, a), h in zip(params, own):
        if counts[h] != 1:  # two parameters with equal values: no way to tell their initializers apart
            continue
        for transposed, digest in ((False, h), (True, _digest(a.T) if a.ndim == 2 else None)):
            if digest is not None and len(by_hash.get(digest, ())) == 1:
                out[name] = {"initializer": by_hash[digest][0], "transposed": transposed}
                break
        else:
            if a.ndim == 2:
                loose[name] = a
    if loose:
        out.update(_packed_slices(loose, {n: a for n, a in weights.items() if a.ndim == 2}))
    return out


def _packed_slices(params: dict[str, np.ndarray], weights: dict[str, np.ndarray]) -> dict[str, dict]:
    """Linear weights found as one slice of a packed 2-D initializer: ``init.reshape(view)[index along axis]``
    reshaped is the weight (or its transpose). Candidates: k = 2..4 pieces along either axis, contiguous or
    interleaved over N heads; a cheap test on the first values comes before the full comparison."""
    want: dict[tuple, list[tuple[str, bool, np.ndarray]]] = {}
    for name, a in params.items():
        for transposed, x in ((False, a), (True, np.ascontiguousarray(a.T))):
            want.setdefault(x.shape, []).append((name, transposed, x))
    found: dict[str, list[dict]] = {}
    for init, w in weights.items():
        for view, axis, shape in _packings(w.shape, want.keys()):
            v = w.reshape(view)
            for j in range(view[axis]):
                piece = v[(slice(None),) * axis + (j,)]
                head = piece[(0,) * (piece.ndim - 1)]  # the first values in C order
                for name, transposed, x in want[shape]:
                    if np.array_equal(x.reshape(-1)[:head.size], head) and np.array_equal(x, piece.reshape(shape)):
                        found.setdefault(name, []).append({"initializer": init, "transposed": transposed,
                                                           "view": list(view), "axis": axis, "index": j})
    return {name: hits[0] for name, hits in found.items() if len(hits) == 1}


def _packings(shape: tuple[int, ...], wanted):
    """(view, axis, piece shape) of every way a 2-D initializer of ``shape`` may pack k = 2..4 weights of a
    ``wanted`` shape along one axis: as blocks (N = 1) or interleaved over N heads ((N, k, head) on that axis)."""
    a, b = shape
    for k in (2, 3, 4):
        if b % k == 0 and (a, b // k) in wanted:
            for n in _divisors(b // k):
                yield (a, n, k, b // k // n), 2, (a, b // k)
        if a % k == 0 and (a // k, b) in wanted:
            for n in _divisors(a // k):
                yield (n, k, a // k // n, b), 1, (a // k, b)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def add_delta(base: np.ndarray, delta: np.ndarray, entry: dict) -> np.ndarray:
    """``base`` (float32, the initializer's shape) with ``delta`` (the torch parameter's layout) added where
    ``entry`` (from :func:`initializer_map`) says the parameter sits: the whole tensor or one packed slice."""
    d = delta.T if entry["transposed"] else delta
    if "view" not in entry:
        if base.shape != d.shape:
            raise ValueError(f"initializer has shape {base.shape}, the delta {d.shape}")
        return base + d
    out = base.reshape(entry["view"]).copy()
    piece = out[(slice(None),) * entry["axis"] + (entry["index"],)]
    if piece.size != d.size:
        raise ValueError(f"the slice of the packed initializer holds {piece.size} values, the delta {d.size}")
    piece += d.reshape(piece.shape)  # a view: writes into out
    return out.reshape(base.shape)


def zero_modules(spec_modules_builder) -> dict[str, Any]:
    """The architecture with every parameter zero (merging a LoRA into it leaves exactly the LoRA's delta)."""
    import torch

    from .weights import _parameters_on_meta

    with _parameters_on_meta():
        modules = spec_modules_builder()
    for module in modules.values():
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None:
                    sub._parameters[name] = torch.nn.Parameter(torch.zeros(p.shape), requires_grad=False)
        module.eval()
    return modules


def lora_bundle(bundle_path: str | Path, loras: list[LoraRef], out: str | Path, force: bool = False) -> dict:
    """A new bundle at ``out``: ``bundle_path`` with each LoRA added to the ONNX initializers it adapts (no
    re-export); written atomically. Returns the new manifest."""
    import json
    import shutil

    import onnx
    import torch
    from onnx import numpy_helper

    from ldm_export.runtime.bundle import MANIFEST, Bundle, sha256_file

    from .bundle_writer import check_out_dir, staging
    from .onnx_export import save_onnx

    if not loras:
        raise LdmExportError("give at least one LoRA: ldm-export lora BUNDLE FILE[:SCALE] ... --out NEW")
    for ref in loras:  # before any work: a DoRA's merge is not a delta that adds to the built weights
        key = is_dora(ref.path)
        if key is not None and key.endswith(".lora_magnitude_vector"):  # kohya's dora_scale: read_lora refuses it
            raise LdmExportError(f"LoRA file {ref.path.name} is a DoRA ('{key}'): its merge rescales each weight by that "
                                 "weight's own norm, so it cannot be added to a built bundle; build with "
                                 f"`ldm-export build ... --lora {ref.path.name}` instead")
    bundle = Bundle.open(bundle_path, verify=True)
    check_lora_model(bundle.manifest["model"]["name"], "unet" in bundle.manifest["components"])
    out = Path(out)
    if out.resolve() == bundle.path.resolve():
        raise LdmExportError("--out must be a new folder, not the bundle itself (the original stays as it is)")
    check_out_dir(out, force, source=bundle.path)
    manifest = json.loads(json.dumps(bundle.manifest))
    name = manifest["model"]["name"]
    builder = _architecture(bundle)
    torch.set_grad_enabled(False)
    modules = zero_modules(builder)
    fused = apply_loras(modules, loras, name)
    deltas: dict[str, dict[str, np.ndarray]] = {}
    for component in ("unet", *TEXT_ENCODERS):
        if component not in modules:
            continue
        changed = {k: p.detach().numpy() for k, p in modules[component].named_parameters() if bool(p.any())}
        if changed:
            deltas[component] = changed
    del modules
    with staging(out, force) as stage:
        for rel in manifest["files"]:
            (stage / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(bundle.path / rel, stage / rel)
        for component, changed in deltas.items():
            if bundle.precision(component) == "int8":  # its weights are quantised initializers: nothing to add to
                raise LdmExportError(f"{bundle.path}'s {component} is int8 (quantised weights); fuse the LoRA into the fp32 "
                                     "bundle it was quantised from (`ldm-export lora FP32_BUNDLE ... --out DIR`), then "
                                     "`ldm-export quantize DIR --out INT8_DIR`")
            info = manifest["components"].get(component)
            mapping = (info or {}).get("initializers")
            if not mapping:
                raise LdmExportError(f"bundle {bundle.path} records no initializer names for {component} (built before "
                                     "LoRA support, or without it); rebuild it, or build with --lora")
            path = stage / info["files"][0]
            model = onnx.load(str(path), load_external_data=True)
            inits = {i.name: i for i in model.graph.initializer}
            summed: dict[str, np.ndarray] = {}  # initializer -> float32 values with every delta added (packed q/k/v)
            for param, delta in sorted(changed.items()):
                entry = mapping.get(param)
                if entry is None or entry["initializer"] not in inits:
                    raise LdmExportError(f"{component}.{param}: the bundle's graph has no initializer that holds this "
                                         "weight (or two hold the same values); build with --lora instead")
                init = inits[entry["initializer"]]
                if init.name not in summed:
                    summed[init.name] = numpy_helper.to_array(init).astype(np.float32)
                try:
                    summed[init.name] = add_delta(summed[init.name], delta, entry)
                except ValueError as e:
                    raise LdmExportError(f"{component}.{param}: {e} in initializer {init.name}; the bundle is not of "
                                         f"model '{name}'") from None
            for init_name, values in summed.items():
                # in the initializer's own dtype: an fp16 bundle stays fp16 (rounded once, after every delta)
                init = inits[init_name]
                dtype = numpy_helper.to_array(init).dtype
                with np.errstate(over="ignore"):
                    cast = values.astype(dtype)
                bad = int(np.count_nonzero(~np.isfinite(cast)))
                if bad:  # refused before anything is written: a bundle that cannot run is no result
                    scales = ", ".join(f"{f['file']} x{f['scale']:g}" for f in fused)
                    raise LdmExportError(f"{component}: the LoRA ({scales}) pushes {bad} weights of {init_name} past "
                                         f"{dtype}'s range" + (" (+-65504)" if dtype == np.float16 else "")
                                         + ("; lower the scale, or patch an fp32 bundle" if dtype == np.float16
                                            else "; lower the scale"))
                init.CopyFrom(numpy_helper.from_array(cast, init_name))
            for f in info["files"]:
                (stage / f).unlink()
            files = save_onnx(model, path)
            info["files"] = [str(f.relative_to(stage)) for f in files]
            del model
        # a bundle built with --lora by an earlier ldm-export keeps them at the manifest's top level
        earlier = manifest["weights"].get("loras", []) or manifest.pop("loras", [])
        manifest["weights"] = dict(manifest["weights"], loras=earlier + fused,
                                   lora_base_bundle=bundle.manifest["files"][bundle.manifest["components"]["unet"]["files"][0]]["sha256"])
        manifest["files"] = {str(p.relative_to(stage)): {"sha256": sha256_file(p), "size": p.stat().st_size}
                             for p in sorted(stage.rglob("*")) if p.is_file() and p.name != MANIFEST}
        (stage / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _architecture(bundle):
    """A builder of the torch modules a LoRA adapts (text encoders and UNet) of the bundle's model: the zoo's, or the
    one its manifest records (a bundle built from a folder's own architecture)."""
    from ldm_export.zoo import spec_of_bundle

    from .models import build_module

    spec = spec_of_bundle(bundle)
    names = [m.name for m in spec.family_def.modules if m.name in ("unet", *TEXT_ENCODERS)]
    return lambda: {n: build_module(spec, n) for n in names}
