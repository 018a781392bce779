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
    if s:
        raise KeyError(f"no SAI name for {sorted(s)[:3]} (dual attention is not in this helper)")
    return {SD3 + k: v for k, v in out.items()}


def to_sd3_single_file(modules: dict, transformer_config: dict, vae_config: dict,
                       text_encoders: tuple[str, ...] = tuple(TEXT)) -> dict[str, torch.Tensor]:
    """A whole SD3 single file (``*_incl_clips_t5xxl``) from diffusers modules; ``text_encoders`` picks which go in."""
    out = sd3_transformer_to_sai(modules["transformer"].state_dict(), transformer_config["num_layers"])
    out |= vae_to_ldm(modules["vae"].state_dict(), vae_config)
    for name in text_encoders:
        out |= {TEXT[name] + k: v for k, v in modules[name].state_dict().items()}
    return {k: v.contiguous().clone() for k, v in out.items()}
