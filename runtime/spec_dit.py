"""Torch-free I/O contracts of the DiT component kinds, in Optimum's names (its SD3 / FLUX ONNX export configs).

- CLIP with projection: ``input_ids`` -> ``text_embeds``, ``last_hidden_state``, ``hidden_states.{N-1}`` (the
  penultimate layer SD3 conditions on; Optimum names hidden state i ``hidden_states.i``).
- T5 encoder: ``input_ids`` -> ``last_hidden_state``.
- SD3 transformer: ``hidden_states``, ``encoder_hidden_states``, ``pooled_projections``, ``timestep`` ->
  ``out_hidden_states``.
- FLUX transformer: as SD3's over packed latents, plus ``img_ids``, ``txt_ids`` and (FLUX-dev) ``guidance``.
"""
from __future__ import annotations

from .spec import ComponentSpec, TensorSpec


def penultimate_name(num_hidden_layers: int) -> str:
    """Optimum's name of the penultimate hidden state of an N-layer CLIP (hidden_states has N + 1 entries)."""
    return f"hidden_states.{num_hidden_layers - 1}"


def clip_with_projection_spec(name: str, hidden_size: int, projection_dim: int, num_hidden_layers: int,
                              max_length: int = 77, batch: tuple[int, int, int] = (1, 2, 8)) -> ComponentSpec:
    return ComponentSpec(
        name,
        (TensorSpec("input_ids", "int32", ("batch", "sequence")),),
        (TensorSpec("text_embeds", "float32", ("batch", projection_dim)),
         TensorSpec("last_hidden_state", "float32", ("batch", "sequence", hidden_size)),
         TensorSpec(penultimate_name(num_hidden_layers), "float32", ("batch", "sequence", hidden_size))),
        {"batch": batch, "sequence": (max_length, max_length, max_length)},
    )


def t5_encoder_spec(name: str, d_model: int, max_length: int, batch: tuple[int, int, int] = (1, 2, 8)) -> ComponentSpec:
    return ComponentSpec(
        name,
        (TensorSpec("input_ids", "int32", ("batch", "sequence")),),
        (TensorSpec("last_hidden_state", "float32", ("batch", "sequence", d_model)),),
        {"batch": batch, "sequence": (max_length, max_length, max_length)},
    )


def sd3_transformer_spec(in_channels: int, out_channels: int, joint_attention_dim: int, pooled_projection_dim: int,
                         latent_hw: tuple[int, int, int], text_length: int,
                         batch: tuple[int, int, int] = (1, 2, 8)) -> ComponentSpec:
    """``latent_hw``: (min, opt, max) latent side; ``text_length``: CLIP 77 + T5 tokens (SD3), or the demo's 32."""
    return ComponentSpec(
        "transformer",
        (TensorSpec("hidden_states", "float32", ("batch", in_channels, "height", "width")),
         TensorSpec("encoder_hidden_states", "float32", ("batch", "text_sequence", joint_attention_dim)),
         TensorSpec("pooled_projections", "float32", ("batch", pooled_projection_dim)),
         TensorSpec("timestep", "float32", ("batch",))),
        (TensorSpec("out_hidden_states", "float32", ("batch", out_channels, "height", "width")),),
        {"batch": batch, "height": latent_hw, "width": latent_hw,
         "text_sequence": (text_length, text_length, text_length)},
    )


def flux_transformer_spec(packed_channels: int, joint_attention_dim: int, pooled_projection_dim: int,
                          latent_hw: tuple[int, int, int], text_length: int, guidance: bool,
                          batch: tuple[int, int, int] = (1, 1, 4)) -> ComponentSpec:
    """Packed 2x2 latents: (h/2)(w/2) image tokens of 4C channels; ids are (N, 3) as diffusers takes them now."""
    tokens = tuple((s // 2) * (s // 2) for s in latent_hw)
    inputs = [TensorSpec("hidden_states", "float32", ("batch", "image_sequence", packed_channels)),
              TensorSpec("encoder_hidden_states", "float32", ("batch", "text_sequence", joint_attention_dim)),
              TensorSpec("pooled_projections", "float32", ("batch", pooled_projection_dim)),
              TensorSpec("timestep", "float32", ("batch",)),
              TensorSpec("img_ids", "float32", ("image_sequence", 3)),
              TensorSpec("txt_ids", "float32", ("text_sequence", 3))]
    if guidance:
        inputs.append(TensorSpec("guidance", "float32", ("batch",)))
    return ComponentSpec(
        "transformer", tuple(inputs),
        (TensorSpec("out_hidden_states", "float32", ("batch", "image_sequence", packed_channels)),),
        {"batch": batch, "image_sequence": tokens, "text_sequence": (text_length, text_length, text_length)},
    )
