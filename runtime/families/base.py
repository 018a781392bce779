"""What a model family is: its components, latent format, conditioning and denoiser inputs (torch-free).

A family is one small declarative class (ComfyUI's ``supported_models`` style) that the export side and the runtime
both read: which modules a checkpoint holds and which ONNX components are exported from them (each of a known
*component kind*, Optimum's one-export-config-per-component-type), how prompts become one :class:`Conditioning`
record (stable-diffusion.cpp's conditioner output), and what the denoiser is fed each step. ``Pipeline`` stays one
loop over any family; adding one means adding its module here and registering it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from ..errors import LdmExportError
from ..spec import ComponentSpec

if TYPE_CHECKING:  # pragma: no cover
    from ..pipeline import Pipeline


INPAINT = "inpaint_channels"  # Conditioning extra: the mask and masked-image latents of a 9-channel inpainting UNet


@dataclass(frozen=True)
class Module:
    """A torch module of a checkpoint: its folder name in a diffusers pipeline and its class."""

    name: str  # "text_encoder", "unet", "vae", "transformer", ...
    library: str  # "transformers" or "diffusers"
    class_name: str  # "CLIPTextModel", "UNet2DConditionModel", ...


@dataclass(frozen=True)
class Component:
    """An exported ONNX graph: its bundle folder, its kind (which export wrapper traces it) and its module."""

    name: str  # bundle folder and manifest key: "text_encoder", "unet", "vae_decoder", ...
    kind: str  # "clip_text", "unet", "vae_decoder", "vae_encoder", ...
    module: str  # the Module it is traced from
    static_batch: int = 2  # batch of a --static-shape build (CFG runs uncond + cond together; decoders 1)
    optional: bool = False  # exported only when asked for (the VAE encoder of editing bundles)


@dataclass(frozen=True)
class LatentFormat:
    """How the VAE's latents map to the diffusion model's: ``model = (vae - shift) * scale`` (ComfyUI's format)."""

    channels: int
    scale: float
    shift: float = 0.0
    vae_scale_factor: int = 8  # pixels per latent

    def to_vae(self, latents: np.ndarray) -> np.ndarray:
        return latents / self.scale + self.shift

    def from_vae(self, z: np.ndarray) -> np.ndarray:
        return (z - self.shift) * self.scale


@dataclass(frozen=True)
class Conditioning:
    """What the text encoders make of a batch of prompts, batch-major: cross-attention ``context`` (B, L, D),
    a ``pooled`` vector (B, P) where the family uses one, and ``extras`` (name -> (B, ...)) such as SDXL's time ids."""

    context: np.ndarray
    pooled: np.ndarray | None = None
    extras: Mapping[str, np.ndarray] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return int(self.context.shape[0])

    def _map(self, fn) -> "Conditioning":
        return Conditioning(fn(self.context), None if self.pooled is None else fn(self.pooled),
                            {k: fn(v) for k, v in self.extras.items()})

    def astype(self, dtype) -> "Conditioning":
        """Floating arrays cast to ``dtype`` (integer ids stay)."""
        return self._map(lambda a: a.astype(dtype, copy=False) if np.issubdtype(a.dtype, np.floating) else a)

    def repeat(self, n: int) -> "Conditioning":
        """Each row repeated ``n`` times (one embedding per latent)."""
        return self._map(lambda a: np.repeat(a, n, axis=0))

    def rows(self, start: int, stop: int) -> "Conditioning":
        return self._map(lambda a: a[start:stop])

    @staticmethod
    def concat(parts: Sequence["Conditioning"]) -> "Conditioning":
        """Stack along the batch (CFG's [uncond; cond])."""
        first = parts[0]
        pooled = None if first.pooled is None else np.concatenate([p.pooled for p in parts])
        return Conditioning(np.concatenate([p.context for p in parts]), pooled,
                            {k: np.concatenate([p.extras[k] for p in parts]) for k in first.extras})

    def same_layout(self, other: "Conditioning") -> bool:
        return (self.context.shape[1:] == other.context.shape[1:]
                and (self.pooled is None) == (other.pooled is None)
                and set(self.extras) == set(other.extras))


class Family:
    """Base of every family; subclasses declare the class attributes and override what differs."""

    name: str = ""
    description: str = ""
    modules: tuple[Module, ...] = ()
    components: tuple[Component, ...] = ()
    text_encoders: tuple[str, ...] = ("text_encoder",)  # components run on prompts, in order
    tokenizers: tuple[str, ...] = ("tokenizer",)  # bundle folders, one per text encoder
    tokenizer_classes: tuple[str, ...] = ("CLIPTokenizer",)  # transformers' class of each, for model_index.json
    pipeline_class: str = "StableDiffusionPipeline"  # diffusers' pipeline of the source model
    pad_token: str = "<|endoftext|>"  # what the tokenizer pads prompts with (CLIP: its end token)
    pad_tokens: tuple[str, ...] = ()  # per tokenizer where they differ (SDXL's second pads with '!'); else pad_token
    fp32_scopes: tuple[str, ...] = ()  # denoiser node scopes the fp16 policy keeps fp32 besides the common ones
    denoiser: str = "unet"  # the component the sampler loop runs
    decoder: str = "vae_decoder"
    encoder: str = "vae_encoder"
    # the denoiser's inputs that change every step; the others are bound once per image (see Pipeline.denoise)
    step_inputs: tuple[str, ...] = ("sample", "timestep")
    denoiser_output: str = "out_sample"
    vae_module: str = "vae"

    # -- declaration ------------------------------------------------------------------------------------
    def component(self, name: str) -> Component:
        for c in self.components:
            if c.name == name:
                return c
        raise LdmExportError(f"family {self.name} has no component '{name}'; it has "
                             f"{', '.join(c.name for c in self.components)}")

    def exported(self, with_optional: Sequence[str] = ()) -> tuple[Component, ...]:
        """The components a build writes: every required one plus the optional ones asked for."""
        return tuple(c for c in self.components if not c.optional or c.name in with_optional)

    def tokenizer_pads(self) -> dict[str, str]:
        """Each tokenizer folder and the token it pads prompts with."""
        return {t: (self.pad_tokens[k] if k < len(self.pad_tokens) else self.pad_token)
                for k, t in enumerate(self.tokenizers)}

    def module(self, name: str) -> Module:
        return next(m for m in self.modules if m.name == name)

    def latent_format(self, configs: Mapping[str, Mapping[str, Any]]) -> LatentFormat:
        vae = configs[self.vae_module]
        return LatentFormat(int(vae["latent_channels"]), float(vae.get("scaling_factor") or 0.18215),
                            float(vae.get("shift_factor") or 0.0), 2 ** (len(vae["block_out_channels"]) - 1))

    def size_multiple(self, configs: Mapping[str, Mapping[str, Any]]) -> int:
        """Image sides must be multiples of this many pixels (the VAE's factor times the denoiser's downsampling)."""
        return self.latent_format(configs).vae_scale_factor

    def largest_side(self, configs: Mapping[str, Mapping[str, Any]]) -> int | None:
        """The largest image side in pixels the denoiser can take (None: no limit but memory)."""
        return None

    def component_specs(self, configs: Mapping[str, Mapping[str, Any]], resolution: int,
                        max_length: int) -> dict[str, ComponentSpec]:
        raise NotImplementedError(f"family {self.name} does not declare its component specs")

    def static_dims(self, component: str, configs: Mapping[str, Mapping[str, Any]], resolution: int,
                    max_length: int) -> dict[str, int]:
        """Every symbolic dimension of ``component`` fixed at the model's default size (``--static-shape``)."""
        lf = self.latent_format(configs)
        side = resolution // lf.vae_scale_factor
        return {"batch": self.component(component).static_batch, "height": side, "width": side,
                "sequence": max_length, "image_height": resolution, "image_width": resolution}

    # -- runtime ----------------------------------------------------------------------------------------
    # denoiser inputs that have no batch axis (FLUX's position ids): never split or padded along axis 0
    unbatched_inputs: tuple[str, ...] = ()

    def load_tokenizer(self, bundle, name: str):
        """The tokenizer in the bundle's folder ``name`` (CLIP's BPE unless the family says otherwise)."""
        from ..tokenizer import ClipTokenizer

        return ClipTokenizer(bundle.path / name)

    def schedule_arguments(self, scheduler_config: Mapping[str, Any], steps: int, latent_shape: tuple) -> dict:
        """Extra arguments of the sampler's schedule, as a pipeline hands them to ``set_timesteps`` beside the config:
        FLUX's own sigmas linspace(1, 1/n, n) and its ``mu`` (a config cannot express that sigma list)."""
        return {}

    def encode(self, pipe: "Pipeline", prompts: Sequence[str]) -> Conditioning:
        raise NotImplementedError(f"family {self.name} does not say how prompts become conditioning")

    def encode_negative(self, pipe: "Pipeline", prompts: Sequence[str], cond: Conditioning,
                        given: bool) -> Conditioning:
        """The unconditional record for CFG; ``given``: the user passed a negative prompt (SDXL uses zeros when not)."""
        return self.encode(pipe, prompts)

    def denoiser_sample(self, sample: np.ndarray, cond: Conditioning) -> np.ndarray:
        """The denoiser's latent input: ``sample``, with an inpainting UNet's mask and masked-image latents
        (``cond.extras[INPAINT]``, (N, 1 + C, h, w)) concatenated along channels when the request has them."""
        extra = cond.extras.get(INPAINT)
        return sample if extra is None else np.concatenate([sample, extra.astype(sample.dtype, copy=False)], axis=1)

    def denoiser_feeds(self, sample: np.ndarray, timestep: np.ndarray, cond: Conditioning) -> dict[str, np.ndarray]:
        """The denoiser's feeds for latents ``sample`` (N, C, h, w) at ``timestep`` (N,) under ``cond`` (N rows)."""
        raise NotImplementedError(f"family {self.name} does not say what its denoiser is fed")

    def prediction(self, outputs: Mapping[str, np.ndarray], sample: np.ndarray) -> np.ndarray:
        """The denoiser's prediction in the latents' layout (N, C, h, w) (FLUX unpacks its 2x2 tokens here)."""
        return outputs[self.denoiser_output]

    def prepare(self, cond: Conditioning, *, width: int, height: int, guidance_scale: float) -> Conditioning:
        """Per-request conditioning that is not text: SDXL's size/crop time ids, FLUX's position ids and distilled
        guidance. Called once per request on the cond and uncond records."""
        return cond

    def prepare_negative(self, cond: Conditioning, *, width: int, height: int, guidance_scale: float) -> Conditioning:
        """:meth:`prepare` for the unconditional record (the SDXL refiner's negative aesthetic score)."""
        return self.prepare(cond, width=width, height=height, guidance_scale=guidance_scale)

    def uses_cfg(self, guidance_scale: float) -> bool:
        """Whether ``guidance_scale`` means classifier-free guidance (two passes); guidance-distilled models
        (FLUX) take it as an input instead."""
        return guidance_scale > 1.0

    def takes_guidance(self, denoiser_inputs: Sequence[str]) -> bool:
        """Whether a guidance scale changes what this model draws: CFG for every family that has it; a distilled
        model only where its denoiser has a guidance input (FLUX-dev's ``guidance``; FLUX-schnell has none)."""
        return True

    def guidance_is_input(self) -> bool:
        """Whether the guidance scale is an input of the model (a guidance-distilled FLUX.1 [dev]), not CFG."""
        return not self.uses_cfg(7.0)

    def recorded_guidance(self, guidance_scale: float, negative: str,
                          denoiser_inputs: Sequence[str]) -> tuple[float, str, dict]:
        """The CFG scale, negative prompt and extra fields an image's parameters record, as what drew it: without an
        unconditional pass the negative prompt had no effect (left out); a model that takes no guidance (FLUX.1
        [schnell]) drew the same at any scale (1: no CFG); a distilled guidance input (FLUX.1 [dev]) is Forge's
        ``Distilled CFG Scale`` beside a CFG scale of 1."""
        extra = {}
        if not self.uses_cfg(guidance_scale):
            negative = ""
        if not self.takes_guidance(denoiser_inputs):
            guidance_scale = 1.0
        elif self.guidance_is_input():
            guidance_scale, extra["Distilled CFG Scale"] = 1.0, guidance_scale
        return guidance_scale, negative, extra

    def scheduler_config(self, config: Mapping[str, Any], *, width: int, height: int) -> dict[str, Any]:
        """The scheduler config for one request (FLUX's resolution-dependent shift is resolved here)."""
        return dict(config)


_FAMILIES: dict[str, Family] = {}


def register(family: type[Family]) -> type[Family]:
    """Class decorator: make ``family`` known by its name (bundles record the name in their manifest)."""
    _FAMILIES[family.name] = family()
    return family


def get_family(name: str) -> Family:
    try:
        return _FAMILIES[name]
    except KeyError:
        raise LdmExportError(f"unknown model family '{name}'; this ldm-export knows {', '.join(sorted(_FAMILIES))}: "
                             "upgrade ldm-export to read this bundle") from None


def family_names() -> list[str]:
    return sorted(_FAMILIES)


