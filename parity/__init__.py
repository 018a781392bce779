"""Parity tables against the reference implementations (diffusers): ``python -m ldm_export.parity.samplers``."""
