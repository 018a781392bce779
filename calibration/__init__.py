"""int8 calibration: capture the UNet's inputs while the project's sampler runs, quantise to QDQ int8 with ONNX
Runtime's quantisation tool by TensorRT's diffusion recipe, and report the price in quality."""
from .capture import DEFAULT_PROMPTS, Capture, capture_unet_inputs, load_capture, read_prompts, save_capture
from .quantize import EXCLUDED, METHODS, QUANT_LEVELS, combine_steps, parse_level, quantize_unet, select_nodes

__all__ = ["DEFAULT_PROMPTS", "Capture", "capture_unet_inputs", "load_capture", "read_prompts", "save_capture", "EXCLUDED",
           "METHODS", "QUANT_LEVELS", "combine_steps", "parse_level", "quantize_unet", "select_nodes"]
