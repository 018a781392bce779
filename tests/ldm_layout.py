"""Test helper: diffusers state dicts -> the original LDM single-file key layout (the reverse of loading).

Port of the key tables in diffusers' ``scripts/convert_diffusers_to_original_stable_diffusion.py``,
generalised from SD's fixed 4 blocks x 2 layers to any UNet/VAE config (so tiny models work), written
independently of the forward converters in ``diffusers.loaders.single_file_utils`` that the code under
test uses: a round trip through both proves the forward path on a real LDM layout.
"""
from __future__ import annotations

from typing import Any

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."

# (LDM, diffusers) pairs, as in the script
UNET_TOP = [
    ("time_embed.0.", "time_embedding.linear_1."),
    ("time_embed.2.", "time_embedding.linear_2."),
    ("input_blocks.0.0.", "conv_in."),
    ("out.0.", "conv_norm_out."),
    ("out.2.", "conv_out."),
    ("label_emb.0.0.", "add_embedding.linear_1."),  # SDXL's added text-time embedding
    ("label_emb.0.2.", "add_embedding.linear_2."),
]
UNET_RESNET = [
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("emb_layers.1", "time_emb_proj"),
    ("skip_connection", "conv_shortcut"),
]
VAE_TOP = [
    ("nin_shortcut", "conv_shortcut"),
    ("norm_out", "conv_norm_out"),
    ("mid.attn_1.", "mid_block.attentions.0."),
]
VAE_ATTENTION = [
    ("norm.", "group_norm."),
    ("q.", "to_q."),
    ("k.", "to_k."),
    ("v.", "to_v."),
    ("proj_out.", "to_out.0."),
]
OPEN_CLIP_LAYER = [
    ("resblocks.", "text_model.encoder.layers."),
    ("ln_1", "layer_norm1"),
    ("ln_2", "layer_norm2"),
    (".c_fc.", ".fc1."),
    (".c_proj.", ".fc2."),
    (".attn", ".self_attn"),
]


def unet_block_map(config: dict[str, Any]) -> list[tuple[str, str]]:
    """(LDM, diffusers) prefixes of the UNet's blocks for a diffusers UNet2DConditionModel config."""
    n = len(config["block_out_channels"])
    layers = config["layers_per_block"]
    pairs = []
    for i in range(n):
        down_attention = config["down_block_types"][i].startswith("CrossAttn")
        for j in range(layers):
            pairs.append((f"input_blocks.{(layers + 1) * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            if down_attention:
                pairs.append((f"input_blocks.{(layers + 1) * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        up_attention = config["up_block_types"][i].startswith("CrossAttn")
        for j in range(layers + 1):
            pairs.append((f"output_blocks.{(layers + 1) * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            if up_attention:
                pairs.append((f"output_blocks.{(layers + 1) * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < n - 1:
            pairs.append((f"input_blocks.{(layers + 1) * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
            # the upsampler follows the resnet (and the attention, where the block has one)
            pairs.append((f"output_blocks.{(layers + 1) * i + layers}.{2 if up_attention else 1}.",
                          f"up_blocks.{i}.upsamplers.0."))
    pairs.append(("middle_block.1.", "mid_block.attentions.0."))
    for j in range(2):
        pairs.append((f"middle_block.{2 * j}.", f"mid_block.resnets.{j}."))
    return pairs


def unet_to_ldm(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    blocks = unet_block_map(config)
    out = {}
    for key, value in state.items():
        new = _replace_prefix(key, UNET_TOP)
        if new == key:
            new = _replace_prefix(key, blocks)
            if new == key:
                raise KeyError(f"no LDM name for UNet key {key}")
            if ".resnets." in key:
                for ldm, hf in UNET_RESNET:
                    new = new.replace(hf, ldm)
        out[UNET_PREFIX + new] = value
    return out


def vae_block_map(config: dict[str, Any]) -> list[tuple[str, str]]:
    n = len(config["block_out_channels"])
    layers = config["layers_per_block"]
    pairs = []
    for i in range(n):
        for j in range(layers):
            pairs.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}."))
        if i < n - 1:
            pairs.append((f"down.{i}.downsample.", f"down_blocks.{i}.downsamplers.0."))
            pairs.append((f"up.{n - 1 - i}.upsample.", f"up_blocks.{i}.upsamplers.0."))
        # decoder blocks run in the opposite order in LDM
        for j in range(layers + 1):
            pairs.append((f"decoder.up.{n - 1 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}."))
    for i in range(2):
        pairs.append((f"mid.block_{i + 1}.", f"mid_block.resnets.{i}."))
    return pairs


def vae_to_ldm(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    blocks = vae_block_map(config)
    out = {}
    for key, value in state.items():
        new = key
        for ldm, hf in VAE_TOP + blocks:
            new = new.replace(hf, ldm)
        if "attentions" in key:
            for ldm, hf in VAE_ATTENTION:
                new = new.replace(hf, ldm)
            if new.endswith(".weight") and value.ndim == 2 and "norm." not in new:
                value = value.reshape(*value.shape, 1, 1)  # LDM's attention projections are 1x1 convs
        out[VAE_PREFIX + new] = value
    return out


def clip_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SD 1.x: the HF CLIPTextModel sits unchanged under cond_stage_model.transformer."""
    return {CLIP_PREFIX + key: value for key, value in state.items()}


def open_clip_to_ldm(state: dict[str, torch.Tensor], extra_layer: dict[str, torch.Tensor] | None = None,
                     text_projection: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """SD 2.x: OpenCLIP's text tower, q/k/v fused into in_proj; ``extra_layer`` stands for the unused last layer."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    top = {
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
    }
    for key, value in state.items():
        if key == "text_model.embeddings.position_ids":
            continue
        if key in top:
            out[OPEN_CLIP_PREFIX + top[key]] = value
            continue
        for proj in ("q_proj", "k_proj", "v_proj"):
            if f".self_attn.{proj}." in key:
                base, kind = key.split(f".self_attn.{proj}.")
                qkv.setdefault(f"{base}.self_attn.in_proj_{kind}", {})[proj] = value
                break
        else:
            out[OPEN_CLIP_PREFIX + "transformer." + _replace_all(key, OPEN_CLIP_LAYER)] = value
    for key, parts in qkv.items():
        fused = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]], dim=0)
        out[OPEN_CLIP_PREFIX + "transformer." + _replace_all(key, OPEN_CLIP_LAYER)] = fused
    if extra_layer:
        out.update({OPEN_CLIP_PREFIX + "transformer." + k: v for k, v in extra_layer.items()})
    if text_projection is not None:
        out[OPEN_CLIP_PREFIX + "text_projection"] = text_projection
    return out


def to_ldm_checkpoint(modules: dict[str, torch.nn.Module], unet_config: dict[str, Any], vae_config: dict[str, Any],
                      text_layout: str = "clip") -> dict[str, torch.Tensor]:
    """A full single-file checkpoint (UNet, VAE, text encoder) in the LDM layout, tensors cloned."""
    state = {}
    state.update(unet_to_ldm(modules["unet"].state_dict(), unet_config))
    state.update(vae_to_ldm(modules["vae"].state_dict(), vae_config))
    text = modules["text_encoder"].state_dict()
    if text_layout == "clip":
        state.update(clip_to_ldm(text))
    elif text_layout == "open_clip":
        hidden = text["text_model.final_layer_norm.weight"].shape[0]
        state.update(open_clip_to_ldm(text, extra_layer=_extra_open_clip_layer(text, hidden),
                                      text_projection=torch.randn(hidden, hidden, device=text[
                                          "text_model.final_layer_norm.weight"].device)))
    else:
        raise ValueError(text_layout)
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def _extra_open_clip_layer(text: dict[str, torch.Tensor], hidden: int) -> dict[str, torch.Tensor]:
    """A random layer past the last one, as SD 2.x checkpoints carry (resblocks.23 of ViT-H)."""
    n = 1 + max(int(k.split(".")[3]) for k in text if k.startswith("text_model.encoder.layers."))
    fc1 = text["text_model.encoder.layers.0.mlp.fc1.weight"]
    ffn, device = fc1.shape[0], fc1.device  # meta tensors stay meta, for shape checks at full size
    shapes = {
        "ln_1.weight": (hidden,), "ln_1.bias": (hidden,),
        "attn.in_proj_weight": (3 * hidden, hidden), "attn.in_proj_bias": (3 * hidden,),
        "attn.out_proj.weight": (hidden, hidden), "attn.out_proj.bias": (hidden,),
        "ln_2.weight": (hidden,), "ln_2.bias": (hidden,),
        "mlp.c_fc.weight": (ffn, hidden), "mlp.c_fc.bias": (ffn,),
        "mlp.c_proj.weight": (hidden, ffn), "mlp.c_proj.bias": (hidden,),
    }
    return {f"resblocks.{n}.{name}": torch.randn(shape, device=device) for name, shape in shapes.items()}


def _replace_prefix(key: str, pairs: list[tuple[str, str]]) -> str:
    for ldm, hf in pairs:
        if key.startswith(hf):
            return ldm + key[len(hf):]
    return key


def _replace_all(key: str, pairs: list[tuple[str, str]]) -> str:
    for ldm, hf in pairs:
        key = key.replace(hf, ldm)
    return key


SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."


def sdxl_to_ldm_checkpoint(modules: dict[str, torch.nn.Module], unet_config: dict[str, Any],
                           vae_config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A single-file SDXL checkpoint (base layout; the refiner's has no CLIP-L and OpenCLIP at embedders.0)."""
    state = {}
    state.update(unet_to_ldm(modules["unet"].state_dict(), unet_config))
    state.update(vae_to_ldm(modules["vae"].state_dict(), vae_config))
    open_prefix = SDXL_OPEN_CLIP_PREFIX
    if "text_encoder" in modules:
        state.update({SDXL_CLIP_L_PREFIX + k: v for k, v in modules["text_encoder"].state_dict().items()})
    else:
        open_prefix = "conditioner.embedders.0.model."
    text = dict(modules["text_encoder_2"].state_dict())
    projection = text.pop("text_projection.weight").T  # OpenCLIP multiplies x @ proj; transformers' Linear does x @ W.T
    converted = open_clip_to_ldm(text, text_projection=projection)
    state.update({open_prefix + k[len(OPEN_CLIP_PREFIX):]: v for k, v in converted.items()})
    return {k: v.detach().clone().contiguous() for k, v in state.items()}
