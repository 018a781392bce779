"""Model families: each module declares one family and registers it by name (see ``base``)."""
from .base import Component, Conditioning, Family, LatentFormat, Module, family_names, get_family, register
from . import sd  # noqa: F401  registers sd1, sd2

__all__ = ["Component", "Conditioning", "Family", "LatentFormat", "Module", "family_names", "get_family", "register"]
