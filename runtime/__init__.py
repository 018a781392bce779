"""The numpy runtime: bundles, engines, samplers, tokenizer and pipeline. Never imports torch."""
from .errors import LdmExportError
from .spec import ComponentSpec, TensorSpec
from .schedulers import resolve_scheduler, sample, sampler_names
from .bundle import Bundle
from .pipeline import Pipeline
from .tokenizer import ClipTokenizer, write_tokenizer_files
from .guidance import guided_denoiser, rescale_noise_cfg
from .image import format_parameters, latents_to_images, parse_parameters, read_parameters, save_image, save_png

__all__ = ["LdmExportError", "ComponentSpec", "TensorSpec"]
__all__ += ["ClipTokenizer", "write_tokenizer_files", "guided_denoiser", "rescale_noise_cfg",
            "format_parameters", "latents_to_images", "parse_parameters", "read_parameters", "save_image", "save_png"]
__all__ += ["resolve_scheduler", "sample", "sampler_names", "Bundle", "Pipeline"]
