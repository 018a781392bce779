"""Packaging: the install prints no setuptools warnings, and the wheel carries the demo models' weights and CLIP's
vocabulary."""
from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT


@pytest.fixture(scope="module")
def wheel_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-v", "-w", str(out), str(ROOT)],
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0 and "No matching distribution" in r.stdout + r.stderr:
        pytest.skip("no package index reachable for the build backend")
    assert r.returncode == 0, r.stderr[-3000:]
    return r, next(out.glob("*.whl"))


def test_building_prints_no_setuptools_warnings(wheel_build):
    r, _ = wheel_build
    text = r.stdout + r.stderr
    bad = [ln for ln in text.splitlines() if ("Warning" in ln or "deprecated" in ln) and "Location 'file" not in ln]
    assert not bad, "\n".join(bad[:10])


def test_the_wheel_carries_the_demo_model_and_the_vocabulary(wheel_build):
    _, whl = wheel_build
    names = set(zipfile.ZipFile(whl).namelist())
    for f in ("ldm_export/assets/demo/unet/diffusion_pytorch_model.safetensors",
              "ldm_export/assets/demo/scheduler/scheduler_config.json", "ldm_export/assets/demo/tokenizer/merges.txt",
              "ldm_export/runtime/data/vocab.json", "ldm_export/runtime/data/merges.txt",
              "ldm_export/assets/demo_dit/model_index.json", "ldm_export/assets/demo_dit/scheduler/scheduler_config.json",
              "ldm_export/assets/demo_dit/transformer/config.json",
              "ldm_export/assets/demo_dit/transformer/diffusion_pytorch_model.safetensors"):
        assert f in names, f
