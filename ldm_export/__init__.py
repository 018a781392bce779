"""ldm-export: export latent diffusion models to verified ONNX bundles and run them with numpy."""
__version__ = "0.1.0"
