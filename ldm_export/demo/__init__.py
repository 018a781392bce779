"""The embedded demo model: a mini latent diffusion model of Stable Diffusion's classes, trained by this
project on generated images of coloured shapes (see docs/demo_model.md). Importing this package is
torch-free; ``train`` and ``adherence.diffusers_generate`` import torch when called.
"""
