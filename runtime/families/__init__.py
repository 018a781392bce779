"""Model families: each module declares one family and registers it by name (see ``base``)."""
from .base import Component, Conditioning, Family, LatentFormat, Module, family_names, get_family, register
from . import sd  # noqa: F401  registers sd1, sd2
from . import sdxl  # noqa: F401  registers sdxl, sdxl-refiner
from . import sd3, flux, demo_dit  # noqa: F401,E401  registers sd3, flux, demo-dit

__all__ = ["Component", "Conditioning", "Family", "LatentFormat", "Module", "family_names", "get_family", "register"]
