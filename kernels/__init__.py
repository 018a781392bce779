"""Graph rewrites that put fused kernels (attention, GroupNorm, GEGLU) into exported ONNX graphs.

The build calls three hooks per component and target: ``export_patches`` (a context manager around the
torch export, e.g. to route attention through an op that exports as a fused node), ``rewrite`` (a pass
over the exported graph) and ``describe`` (what was fused, for the manifest).
"""
from __future__ import annotations

import contextlib


@contextlib.contextmanager
def export_patches(module, component: str, target: str):
    if target != "cpu":
        raise NotImplementedError(f"fused kernels for target '{target}' are not built yet; build with --target cpu")
    yield


def rewrite(model, component: str, target: str):
    if target != "cpu":
        raise NotImplementedError(f"fused kernels for target '{target}' are not built yet; build with --target cpu")
    return model


def describe(component: str, target: str) -> list[str]:
    return []
