"""Test helper: diffusers / transformers state dicts -> Stability's single-file SD3 layout (the reverse of loading).

Written from the key table of diffusers' ``convert_sd3_transformer_checkpoint_to_diffusers`` read backwards
(fused qkv, SAI block names, the final layers' swapped scale/shift), independently of the forward converter the
code under test uses: a round trip through both proves the forward path on the real layout.
"""
from __future__ import annotations

import torch

from ldm_layout import vae_to_ldm

SD3 = "model.diffusion_model."
TEXT = {"text_encoder": "text_encoders.clip_l.transformer.", "text_encoder_2": "text_encoders.clip_g.transformer.",
        "text_encoder_3": "text_encoders.t5xxl.transformer."}


def _swap(t: torch.Tensor) -> torch.Tensor:
    shift, scale = t.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


def sd3_transformer_to_sai(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    s = dict(state)
    out = {"pos_embed": s.pop("pos_embed.pos_embed")}
    simple = {"pos_embed.proj.": "x_embedder.proj.", "time_text_embed.timestep_embedder.linear_1.": "t_embedder.mlp.0.",
              "time_text_embed.timestep_embedder.linear_2.": "t_embedder.mlp.2.", "context_embedder.": "context_embedder.",
              "time_text_embed.text_embedder.linear_1.": "y_embedder.mlp.0.",
              "time_text_embed.text_embedder.linear_2.": "y_embedder.mlp.2.", "proj_out.": "final_layer.linear."}
    for hf, sai in simple.items():
        for p in ("weight", "bias"):
            out[sai + p] = s.pop(hf + p)
    for p in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{p}"] = _swap(s.pop(f"norm_out.linear.{p}"))
    for i in range(num_layers):
        b, x, c = f"transformer_blocks.{i}.", f"joint_blocks.{i}.x_block.", f"joint_blocks.{i}.context_block."
        last = i == num_layers - 1
        for p in ("weight", "bias"):
            out[x + f"attn.qkv.{p}"] = torch.cat([s.pop(b + f"attn.to_{n}.{p}") for n in "qkv"])
            out[c + f"attn.qkv.{p}"] = torch.cat([s.pop(b + f"attn.add_{n}_proj.{p}") for n in "qkv"])
            out[x + f"attn.proj.{p}"] = s.pop(b + f"attn.to_out.0.{p}")
            out[x + f"adaLN_modulation.1.{p}"] = s.pop(b + f"norm1.linear.{p}")
            ctx_mod = s.pop(b + f"norm1_context.linear.{p}")
            out[c + f"adaLN_modulation.1.{p}"] = _swap(ctx_mod) if last else ctx_mod
            out[x + f"mlp.fc1.{p}"] = s.pop(b + f"ff.net.0.proj.{p}")
            out[x + f"mlp.fc2.{p}"] = s.pop(b + f"ff.net.2.{p}")
            if not last:
                out[c + f"attn.proj.{p}"] = s.pop(b + f"attn.to_add_out.{p}")
                out[c + f"mlp.fc1.{p}"] = s.pop(b + f"ff_context.net.0.proj.{p}")
                out[c + f"mlp.fc2.{p}"] = s.pop(b + f"ff_context.net.2.{p}")
        for hf, sai in (("norm_q", x + "attn.ln_q"), ("norm_k", x + "attn.ln_k"), ("norm_added_q", c + "attn.ln_q"),
                        ("norm_added_k", c + "attn.ln_k")):
            if b + f"attn.{hf}.weight" in s:
                out[sai + ".weight"] = s.pop(b + f"attn.{hf}.weight")
        if b + "attn2.to_q.weight" in s:  # SD 3.5's dual attention (MMDiT-X): the image stream's second attention
            for p in ("weight", "bias"):
                out[x + f"attn2.qkv.{p}"] = torch.cat([s.pop(b + f"attn2.to_{n}.{p}") for n in "qkv"])
                out[x + f"attn2.proj.{p}"] = s.pop(b + f"attn2.to_out.0.{p}")
            for n in "qk":
                if b + f"attn2.norm_{n}.weight" in s:
                    out[x + f"attn2.ln_{n}.weight"] = s.pop(b + f"attn2.norm_{n}.weight")
    if s:
        raise KeyError(f"no SAI name for {sorted(s)[:3]}")
    return {SD3 + k: v for k, v in out.items()}


def to_sd3_single_file(modules: dict, transformer_config: dict, vae_config: dict,
                       text_encoders: tuple[str, ...] = tuple(TEXT)) -> dict[str, torch.Tensor]:
    """A whole SD3 single file (``*_incl_clips_t5xxl``) from diffusers modules; ``text_encoders`` picks which go in."""
    out = sd3_transformer_to_sai(modules["transformer"].state_dict(), transformer_config["num_layers"])
    out |= vae_to_ldm(modules["vae"].state_dict(), vae_config)
    for name in text_encoders:
        out |= {TEXT[name] + k: v for k, v in modules[name].state_dict().items()}
    return {k: v.contiguous().clone() for k, v in out.items()}


def flux_transformer_to_bfl(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """diffusers FluxTransformer2DModel state dict -> Black Forest Labs' single-file layout (flux1-dev.safetensors).

    The key table of diffusers' ``convert_flux_transformer_checkpoint_to_diffusers`` read backwards: q, k, v joined
    into ``qkv`` (double blocks) or with the MLP input into ``linear1`` (single blocks), RMS norm weights as
    ``*.norm.query_norm.scale``, the final AdaLN's scale/shift swapped. Every diffusers key is used exactly once."""
    s = dict(state)
    out: dict[str, torch.Tensor] = {}

    def take(hf: str) -> torch.Tensor:
        return s.pop(hf)

    def cat(*hf: str) -> torch.Tensor:
        return torch.cat([s.pop(k) for k in hf], dim=0)

    for hf, bfl in {"time_text_embed.timestep_embedder.": "time_in.", "time_text_embed.text_embedder.": "vector_in.",
                    "time_text_embed.guidance_embedder.": "guidance_in."}.items():
        if f"{hf}linear_1.weight" in s:
            for p in ("weight", "bias"):
                out[f"{bfl}in_layer.{p}"] = take(f"{hf}linear_1.{p}")
                out[f"{bfl}out_layer.{p}"] = take(f"{hf}linear_2.{p}")
    for p in ("weight", "bias"):
        out[f"txt_in.{p}"] = take(f"context_embedder.{p}")
        out[f"img_in.{p}"] = take(f"x_embedder.{p}")
        out[f"final_layer.linear.{p}"] = take(f"proj_out.{p}")
        out[f"final_layer.adaLN_modulation.1.{p}"] = _swap(take(f"norm_out.linear.{p}"))
    double = sorted({int(k.split(".")[1]) for k in s if k.startswith("transformer_blocks.")})
    for i in double:
        h, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for p in ("weight", "bias"):
            out[f"{b}img_mod.lin.{p}"] = take(f"{h}norm1.linear.{p}")
            out[f"{b}txt_mod.lin.{p}"] = take(f"{h}norm1_context.linear.{p}")
            out[f"{b}img_attn.qkv.{p}"] = cat(f"{h}attn.to_q.{p}", f"{h}attn.to_k.{p}", f"{h}attn.to_v.{p}")
            out[f"{b}txt_attn.qkv.{p}"] = cat(f"{h}attn.add_q_proj.{p}", f"{h}attn.add_k_proj.{p}",
                                              f"{h}attn.add_v_proj.{p}")
            out[f"{b}img_mlp.0.{p}"] = take(f"{h}ff.net.0.proj.{p}")
            out[f"{b}img_mlp.2.{p}"] = take(f"{h}ff.net.2.{p}")
            out[f"{b}txt_mlp.0.{p}"] = take(f"{h}ff_context.net.0.proj.{p}")
            out[f"{b}txt_mlp.2.{p}"] = take(f"{h}ff_context.net.2.{p}")
            out[f"{b}img_attn.proj.{p}"] = take(f"{h}attn.to_out.0.{p}")
            out[f"{b}txt_attn.proj.{p}"] = take(f"{h}attn.to_add_out.{p}")
        out[f"{b}img_attn.norm.query_norm.scale"] = take(f"{h}attn.norm_q.weight")
        out[f"{b}img_attn.norm.key_norm.scale"] = take(f"{h}attn.norm_k.weight")
        out[f"{b}txt_attn.norm.query_norm.scale"] = take(f"{h}attn.norm_added_q.weight")
        out[f"{b}txt_attn.norm.key_norm.scale"] = take(f"{h}attn.norm_added_k.weight")
    single = sorted({int(k.split(".")[1]) for k in s if k.startswith("single_transformer_blocks.")})
    for i in single:
        h, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for p in ("weight", "bias"):
            out[f"{b}modulation.lin.{p}"] = take(f"{h}norm.linear.{p}")
            out[f"{b}linear1.{p}"] = cat(f"{h}attn.to_q.{p}", f"{h}attn.to_k.{p}", f"{h}attn.to_v.{p}",
                                         f"{h}proj_mlp.{p}")
            out[f"{b}linear2.{p}"] = take(f"{h}proj_out.{p}")
        out[f"{b}norm.query_norm.scale"] = take(f"{h}attn.norm_q.weight")
        out[f"{b}norm.key_norm.scale"] = take(f"{h}attn.norm_k.weight")
    assert not s, f"diffusers keys the BFL table does not map: {sorted(s)[:5]}"
    return {prefix + k: v.contiguous() for k, v in out.items()}
