"""Benchmarks, not export: `ldm-export bench` (``run``) and the GPU kernel profile (``kernel_profile``)."""
