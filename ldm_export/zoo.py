"""Named model specs with the real configurations (diffusers config dicts), torch-free.

Each spec lists its components and their configs; the export side instantiates diffusers /
transformers classes from these dicts, so ``--random-weights`` gives the real architecture.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any

from ldm_export.runtime.errors import LdmExportError
from ldm_export.runtime.families import Family, get_family
from ldm_export.runtime.spec import ComponentSpec


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # a registered family (ldm_export.runtime.families): "sd1", "sd2", ...
    description: str
    text_encoder: dict[str, Any] | None  # transformers CLIPTextConfig kwargs
    unet: dict[str, Any] | None  # diffusers UNet2DConditionModel config (None for DiT families)
    vae: dict[str, Any]  # diffusers AutoencoderKL config
    scheduler: dict[str, Any]  # diffusers scheduler_config.json, with _class_name
    resolution: int  # default image side in pixels
    # published parameter counts (millions) this spec must reproduce; None where not applicable
    params_m: dict[str, float] = field(default_factory=dict)
    max_length: int = 77
    # a diffusers folder shipped inside the package (the embedded demo model); None: weights come from the user
    embedded_weights: str | None = None
    # configs of the family's other modules by module name (text_encoder_2, transformer, text_encoder_3, ...)
    extra_configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    # sampling defaults written into the bundle ({"steps": N, "guidance_scale": G}); unset keys: 20 steps, 7.5
    defaults: dict[str, Any] = field(default_factory=dict)

    @property
    def family_def(self) -> Family:
        return get_family(self.family)

    @property
    def configs(self) -> dict[str, dict[str, Any]]:
        """Every module's config by module name, as the family names its modules."""
        base = {"text_encoder": self.text_encoder, "unet": self.unet, "vae": self.vae}
        return {k: v for k, v in (base | self.extra_configs).items() if v is not None}

    @staticmethod
    def config_fields(configs: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """The inverse of ``configs``: the spec's config fields (``text_encoder``, ``unet``, ``vae``, None where
        absent; ``extra_configs`` the rest) from every module's config by module name."""
        rest = dict(configs)
        return {**{k: rest.pop(k, None) for k in ("text_encoder", "unet", "vae")}, "extra_configs": rest}

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.family_def.exported())

    @property
    def vae_scale_factor(self) -> int:
        return self.family_def.latent_format(self.configs).vae_scale_factor

    @property
    def latent_scale(self) -> float:
        return self.family_def.latent_format(self.configs).scale

    @property
    def latent_side(self) -> int:
        return self.resolution // self.vae_scale_factor

    def component_specs(self) -> dict[str, ComponentSpec]:
        return self.family_def.component_specs(self.configs, self.resolution, self.max_length)

    def static_dims(self, component: str) -> dict[str, int]:
        return self.family_def.static_dims(component, self.configs, self.resolution, self.max_length)

    def model_index(self) -> dict[str, Any]:
        """diffusers' model_index.json of the source pipeline (Optimum's loader reads the bundle's version of it)."""
        fam = self.family_def
        index: dict[str, Any] = {
            "_class_name": fam.pipeline_class, "_diffusers_version": "0.35.2", "feature_extractor": [None, None],
            "requires_safety_checker": False, "safety_checker": [None, None],
            "scheduler": ["diffusers", self.scheduler["_class_name"]],
        }
        index.update({t: ["transformers", cls] for t, cls in zip(fam.tokenizers, fam.tokenizer_classes)})
        index.update({m.name: [m.library, m.class_name] for m in fam.modules})
        return index


_SD_SCHEDULER_COMMON = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "clip_sample": False,
    "trained_betas": None,
}

_CLIP_VIT_L14 = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
    "projection_dim": 768, "layer_norm_eps": 1e-5, "bos_token_id": 49406, "eos_token_id": 49407,
    "pad_token_id": 1,
}

# OpenCLIP ViT-H/14 text tower; SD 2.x uses its penultimate layer, which diffusers expresses as
# 23 of its 24 layers (the last is dropped from the checkpoint).
_OPENCLIP_VIT_H14_PENULTIMATE = {
    "vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
    "num_attention_heads": 16, "max_position_embeddings": 77, "hidden_act": "gelu",
    "projection_dim": 512, "layer_norm_eps": 1e-5, "bos_token_id": 49406, "eos_token_id": 49407,
    "pad_token_id": 1,
}

_SD_UNET_COMMON = {
    "act_fn": "silu", "center_input_sample": False, "downsample_padding": 1, "flip_sin_to_cos": True,
    "freq_shift": 0, "in_channels": 4, "out_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1,
    "norm_eps": 1e-5, "norm_num_groups": 32, "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

_SD_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "scaling_factor": 0.18215,
}

SD15 = ModelSpec(
    name="sd15",
    family="sd1",
    description="Stable Diffusion 1.5 (CLIP ViT-L/14 text, 512 px, epsilon prediction)",
    text_encoder=dict(_CLIP_VIT_L14),
    unet=_SD_UNET_COMMON | {"sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8},
    vae=_SD_VAE | {"sample_size": 512},
    scheduler={"_class_name": "PNDMScheduler", **_SD_SCHEDULER_COMMON, "skip_prk_steps": True},
    resolution=512,
    params_m={"text_encoder": 123.1, "unet": 859.5, "vae": 83.7},
)

SD21 = ModelSpec(
    name="sd21",
    family="sd2",
    description="Stable Diffusion 2.1 (OpenCLIP ViT-H/14 text, penultimate layer, 768 px, v-prediction)",
    text_encoder=dict(_OPENCLIP_VIT_H14_PENULTIMATE),
    unet=_SD_UNET_COMMON | {"sample_size": 96, "cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20],
                            "use_linear_projection": True, "upcast_attention": True},
    vae=_SD_VAE | {"sample_size": 768},
    scheduler={"_class_name": "DDIMScheduler", **_SD_SCHEDULER_COMMON, "prediction_type": "v_prediction",
               "skip_prk_steps": True},
    resolution=768,
    params_m={"text_encoder": 340.4, "unet": 865.9, "vae": 83.7},
)

TINY = ModelSpec(
    name="tiny",
    family="sd1",
    description="Tiny model of the SD 1.x classes for tests (a few MB, random weights)",
    text_encoder=_CLIP_VIT_L14 | {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                  "num_attention_heads": 4, "projection_dim": 32},
    unet=_SD_UNET_COMMON | {"sample_size": 8, "cross_attention_dim": 32, "attention_head_dim": 4,
                            "layers_per_block": 1, "norm_num_groups": 8, "block_out_channels": [16, 32],
                            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]},
    vae=_SD_VAE | {"sample_size": 64, "layers_per_block": 1, "norm_num_groups": 8,
                   "block_out_channels": [8, 16, 16, 16]},
    scheduler={"_class_name": "PNDMScheduler", **_SD_SCHEDULER_COMMON, "skip_prk_steps": True},
    resolution=64,
)

def inpainting(base: ModelSpec, name: str, description: str) -> ModelSpec:
    """``base``'s classes with the inpainting UNet's 9 input channels (latents, mask, masked-image latents); every
    other field copied (a published parameter count stays: the 5 extra input channels add 14 k parameters)."""
    return replace(copy.deepcopy(base), name=name, description=description, unet=base.unet | {"in_channels": 9})


# SD 1.5 inpainting (runwayml/stable-diffusion-inpainting)
SD15_INPAINT = inpainting(SD15, "sd15-inpaint", "Stable Diffusion 1.5 inpainting (UNet with 9 input channels: latents, "
                                                "mask, masked-image latents)")
TINY_INPAINT = inpainting(TINY, "tiny-inpaint", "Tiny SD 1.x inpainting model for tests (UNet with 9 input channels, "
                                                "random weights)")

MODELS: dict[str, ModelSpec] = {m.name: m for m in (SD15, SD21, TINY, TINY_INPAINT, SD15_INPAINT)}
INPAINT_MODELS = "sd15-inpaint, sdxl-inpaint"  # what a 9-channel UNet's weights are built with
DEFAULT_MODEL = "demo"  # the embedded demo model: real images on a CPU with no download
AUTO_MODEL = "auto"  # `build --model auto`: the architecture a diffusers folder's own configs say (export/folder_spec.py)


def get_model(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise LdmExportError(f"unknown model '{name}'; known models: {', '.join(sorted(MODELS))}") from None


_SET_BY_CLASS = {"is_encoder_decoder", "use_cache"}  # config keys a class sets itself (T5EncoderModel: no decoder)


def _same(a, b) -> bool:
    """Config values equal as JSON has them (tuples read back as lists)."""
    norm = lambda v: [norm(x) for x in v] if isinstance(v, (list, tuple)) else v  # noqa: E731
    return norm(a) == norm(b)


def spec_of_bundle(bundle) -> ModelSpec:
    """The spec a bundle was built from: the zoo's for a zoo model; for a bundle built from a folder's own architecture
    (``--model auto``), the one its manifest records (module configs, scheduler, resolution, token count)."""
    m = bundle.model
    configs = {name: {k: v for k, v in config.items() if not k.startswith("_")}
               for name, config in m["modules"].items()}
    zoo = MODELS.get(m["name"])
    if zoo is not None and zoo.family == m["family"] and all(
            _same(configs.get(module, {}).get(k, "<absent>"), v)
            for module, config in zoo.configs.items() for k, v in config.items() if k not in _SET_BY_CLASS):
        return zoo  # a zoo model's bundle (a folder named like one, of other sizes, is not: its configs differ)
    return ModelSpec(name=m["name"], family=m["family"], description=m.get("description", ""),
                     **ModelSpec.config_fields(configs), scheduler=dict(bundle.scheduler_config),
                     resolution=int(m["resolution"]), max_length=int(m["max_length"]),
                     defaults=dict(m.get("defaults") or {}))


def _demo_spec() -> ModelSpec:
    from ldm_export.demo import config as demo

    return ModelSpec(
        name="demo",
        family="sd1",
        description="Embedded demo model: SD 1.x classes trained by this project on generated coloured shapes "
                    "(64 px, 8x8 latents, ships in the package, no download)",
        text_encoder=dict(demo.TEXT_ENCODER),
        unet=dict(demo.UNET),
        vae=dict(demo.VAE),
        scheduler=dict(demo.SCHEDULER),
        resolution=demo.RESOLUTION,
        max_length=demo.MAX_LENGTH,
        embedded_weights=demo.EMBEDDED_WEIGHTS,
    )


DEMO = _demo_spec()
MODELS[DEMO.name] = DEMO


def _register_sdxl() -> None:
    from ldm_export import zoo_sdxl

    MODELS.update({m.name: m for m in zoo_sdxl.models()})


_register_sdxl()


# the DiT families' architectures (SD3, SD 3.5, FLUX.1, their tiny test models, the demo DiT)
from ldm_export.zoo_dit import dit_models  # noqa: E402

MODELS.update(dit_models(ModelSpec))
