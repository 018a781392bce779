"""Build torch modules from zoo specs (random weights) and wrap each so its forward is its ComponentSpec."""
from __future__ import annotations

import logging

import torch
from torch import nn

from ldm_export.zoo import ModelSpec

log = logging.getLogger(__name__)


def build_module(spec: ModelSpec, name: str) -> nn.Module:
    """The family's module ``name`` of ``spec``, random weights, from its config (``transformers`` configs are
    passed to the class's config type, ``diffusers`` configs are the class's keyword arguments)."""
    import importlib

    declared = spec.family_def.module(name)
    config = spec.configs[name]
    cls = getattr(importlib.import_module(declared.library), declared.class_name)
    if declared.library == "transformers":
        return cls(cls.config_class(**config)).eval()
    return cls(**config).eval()


def build_text_encoder(spec: ModelSpec):
    return build_module(spec, "text_encoder")


def build_unet(spec: ModelSpec):
    return build_module(spec, "unet")


def build_vae(spec: ModelSpec):
    return build_module(spec, "vae")


def build_random(spec: ModelSpec, seed: int = 0) -> dict[str, nn.Module]:
    """The real architecture with random weights (deterministic in ``seed``), for exports and benchmarks."""
    torch.manual_seed(seed)
    return {m.name: build_module(spec, m.name) for m in spec.family_def.modules}


class TextEncoderWrapper(nn.Module):
    """input_ids (B, 77) int32 -> last_hidden_state (B, 77, D), pooler_output (B, D)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        out = self.model(input_ids=input_ids.to(torch.int64), return_dict=True)
        return out.last_hidden_state, out.pooler_output


class UNetWrapper(nn.Module):
    """sample (B, 4, h, w), timestep (B,), encoder_hidden_states (B, 77, D) -> out_sample (B, 4, h, w)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.model(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class VaeDecoderWrapper(nn.Module):
    """latent_sample (B, 4, h, w), already divided by the latent scale -> sample (B, 3, 8h, 8w) in [-1, 1]."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


def _kinds() -> dict[str, type[nn.Module]]:
    from .kinds import ClipTextWrapper, TextTimeUNetWrapper, VaeEncoderWrapper

    return {"clip_text_hidden": ClipTextWrapper, "unet_text_time": TextTimeUNetWrapper, "vae_encoder": VaeEncoderWrapper}


# component kind -> the wrapper whose forward is that kind's ComponentSpec (Optimum: one export config per kind)
WRAPPERS: dict[str, type[nn.Module]] = {
    "clip_text": TextEncoderWrapper,
    "unet": UNetWrapper,
    "vae_decoder": VaeDecoderWrapper,
    **_kinds(),
}


from .dit_models import DIT_WRAPPERS  # noqa: E402  the DiT families' kinds

WRAPPERS.update(DIT_WRAPPERS)


def wrap(component: str, modules: dict[str, nn.Module], family=None) -> nn.Module:
    """The export wrapper of ``component``: the family declares its kind and the module it is traced from."""
    from ldm_export.runtime.families import get_family

    decl = (family or get_family("sd1")).component(component)
    try:
        wrapper = WRAPPERS[decl.kind]
    except KeyError:
        raise NotImplementedError(f"no export wrapper for component kind '{decl.kind}' yet") from None
    return wrapper(modules[decl.module]).eval()


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
