"""Verification inputs of the DiT families' component kinds: prompt-shaped T5 ids, timesteps in each model's range,
FLUX's real position ids, decoder latents at the scale and shift the runtime feeds. The build calls
:func:`sample_inputs` for every component; kinds not listed here get the generic inputs of ``onnx_export``."""
from __future__ import annotations

from typing import Mapping

import numpy as np

from ldm_export.runtime.flux import image_ids, text_ids
from ldm_export.runtime.spec import ComponentSpec

DIT_KINDS = ("t5_encoder", "sd3_transformer", "flux_transformer")


def sample_inputs(kind: str, cspec: ComponentSpec, dims: Mapping[str, int], seed: int, configs: Mapping,
                  latent_format) -> dict[str, np.ndarray]:
    """Inputs for verifying one component of ``kind`` (float32/int32), deterministic in ``seed``."""
    from .onnx_export import sample_inputs as generic

    rng = np.random.default_rng(seed)
    if kind == "t5_encoder":  # pieces, </s> (1), then <pad> (0)
        shape = cspec.concrete_shape(cspec.inputs[0], dims)
        vocab = int(configs["vocab_size"])
        ids = np.zeros(shape, np.int32)
        for row in ids:
            n = int(rng.integers(3, shape[1]))
            row[:n - 1] = rng.integers(3, vocab, n - 1)
            row[n - 1] = 1
        return {"input_ids": ids}
    if kind == "vae_decoder":  # the decoder sees latents / scale + shift
        shape = cspec.concrete_shape(cspec.inputs[0], dims)
        return {"latent_sample": latent_format.to_vae(rng.standard_normal(shape)).astype(np.float32)}
    if kind not in DIT_KINDS:
        return generic(cspec, dims, seed=seed, latent_scale=latent_format.scale)
    feeds = {t.name: rng.standard_normal(cspec.concrete_shape(t, dims)).astype(np.float32) for t in cspec.inputs}
    b = feeds["hidden_states"].shape[0]
    if kind == "flux_transformer":
        side = int(dims["height"])
        feeds["timestep"] = rng.uniform(0.05, 1.0, b).astype(np.float32)  # sigma: FLUX takes t / 1000
        feeds["img_ids"] = image_ids(side, side)
        feeds["txt_ids"] = text_ids(feeds["encoder_hidden_states"].shape[1])
        if "guidance" in feeds:
            feeds["guidance"] = rng.uniform(1.0, 5.0, b).astype(np.float32)
    else:
        feeds["timestep"] = rng.uniform(1.0, 999.0, b).astype(np.float32)
    return feeds
