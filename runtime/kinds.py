"""ComponentSpecs of the component kinds beyond SD 1.x, with Optimum's ONNX I/O names (``model_configs.py``).

* CLIP text encoder that also returns its penultimate hidden state (SDXL, SD3 read ``hidden_states[-2]``), with or
  without the text projection (``CLIPTextModelWithProjection`` gives ``text_embeds``). Optimum names hidden state
  ``i`` ``hidden_states.i``; only the one a family reads is exported, so graphs stay small.
* UNet with the "text_time" added conditions (``text_embeds``, ``time_ids``), as Optimum adds them when the UNet's
  ``addition_embed_type`` is ``"text_time"``.
* VAE encoder: ``sample`` (image in [-1, 1]) -> ``latent_parameters`` (the diagonal Gaussian's mean and log-variance,
  concatenated along channels, as ``AutoencoderKL.encode(x).latent_dist.parameters``).
"""
from __future__ import annotations

from .spec import ComponentSpec, TensorSpec, unet_spec


def penultimate_name(num_hidden_layers: int) -> str:
    """Optimum's output name of ``hidden_states[-2]`` (hidden states 0..L: embeddings, then each layer)."""
    return f"hidden_states.{num_hidden_layers - 1}"


def clip_text_spec(name: str, hidden_size: int, num_hidden_layers: int, max_length: int = 77,
                   projection_dim: int | None = None, batch: tuple[int, int, int] = (1, 2, 8)) -> ComponentSpec:
    """CLIP text: input_ids -> [text_embeds | pooler_output], last_hidden_state, hidden_states.{L-1}."""
    seq = ("batch", "sequence", hidden_size)
    last = TensorSpec("last_hidden_state", "float32", seq)
    penultimate = TensorSpec(penultimate_name(num_hidden_layers), "float32", seq)
    if projection_dim is None:
        outputs = (last, TensorSpec("pooler_output", "float32", ("batch", hidden_size)), penultimate)
    else:
        outputs = (TensorSpec("text_embeds", "float32", ("batch", projection_dim)), last, penultimate)
    return ComponentSpec(name, (TensorSpec("input_ids", "int32", ("batch", "sequence")),), outputs,
                         {"batch": batch, "sequence": (max_length, max_length, max_length)})


def text_time_unet_spec(in_channels: int, out_channels: int, context_dim: int, pooled_dim: int, num_time_ids: int,
                        latent_hw: tuple[int, int, int], max_length: int = 77,
                        batch: tuple[int, int, int] = (1, 2, 8)) -> ComponentSpec:
    """SDXL UNet: sample, timestep, encoder_hidden_states, text_embeds (B, P), time_ids (B, 6 or 5) -> out_sample."""
    base = unet_spec(in_channels, out_channels, context_dim, latent_hw, max_length, batch)
    extra = (TensorSpec("text_embeds", "float32", ("batch", pooled_dim)),
             TensorSpec("time_ids", "float32", ("batch", num_time_ids)))
    return ComponentSpec(base.name, base.inputs + extra, base.outputs, dict(base.profile))


def vae_encoder_spec(latent_channels: int, latent_hw: tuple[int, int, int], scale: int = 8,
                     batch: tuple[int, int, int] = (1, 1, 8)) -> ComponentSpec:
    """VAE encoder: sample (B, 3, H, W) in [-1, 1] -> latent_parameters (B, 2C, H/f, W/f): mean, then log-variance."""
    return ComponentSpec(
        "vae_encoder",
        (TensorSpec("sample", "float32", ("batch", 3, "image_height", "image_width")),),
        (TensorSpec("latent_parameters", "float32", ("batch", 2 * latent_channels, "height", "width")),),
        {"batch": batch, "height": latent_hw, "width": latent_hw,
         "image_height": tuple(scale * x for x in latent_hw), "image_width": tuple(scale * x for x in latent_hw)},
    )
