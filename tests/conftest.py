import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, timeout: int = 600, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `ldm-export ARGS` in a fresh interpreter, as a user would (in ``cwd`` if given)."""
    return subprocess.run([sys.executable, "-m", "ldm_export.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=cwd)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """A tiny random-weights fp32 bundle, built once per test session."""
    from ldm_export.export.build import BuildConfig, build

    out = tmp_path_factory.mktemp("bundles") / "tiny-fp32"
    build(BuildConfig(model="tiny", precision="fp32", random_weights=True, seed=0, out=out))
    return out


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
        import diffusers  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="session")
def demo_bundle(tmp_path_factory) -> Path:
    """The embedded demo model (its shipped weights), fp32 with dynamic shapes, built once per test session."""
    from ldm_export.export.build import BuildConfig, build

    out = tmp_path_factory.mktemp("bundles") / "demo-fp32"
    build(BuildConfig(model="demo", precision="fp32", out=out))
    return out
