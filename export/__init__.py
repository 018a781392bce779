"""Torch side: load weights, wrap each component, export to ONNX, verify against torch, write bundles."""
