"""The edge (Jetson) path: the base install resolves to aarch64 wheels for the Pythons JetPack has, and engines
build from the runtime install plus TensorRT with no torch, diffusers, transformers or onnx importable."""
from __future__ import annotations

import re
import subprocess
import sys
import tomllib

import pytest

from conftest import ROOT

# JetPack 6 is Ubuntu 22.04 (glibc 2.35, Python 3.10); 3.12 for users on newer images. pip does not widen a
# manylinux_2_35 tag to the older ones by itself: every tag a glibc 2.35 system accepts that wheels use is listed.
AARCH64 = ("manylinux2014_aarch64", "manylinux_2_28_aarch64", "manylinux_2_34_aarch64", "manylinux_2_35_aarch64")


def base_dependencies() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


@pytest.mark.parametrize("python", ["3.10", "3.12"])
def test_base_install_has_aarch64_wheels(tmp_path, python):
    """`pip download --only-binary=:all:` for aarch64, dependencies of dependencies included (what `pip install`
    resolves on the Jetson): a wheel for every package, none built from source."""
    deps = base_dependencies()
    platforms = [a for p in AARCH64 for a in ("--platform", p)]
    r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", *platforms,
                        "--python-version", python, "-d", str(tmp_path), *deps],
                       capture_output=True, text=True, timeout=600)
    if r.returncode and re.search(r"Could not fetch URL|Failed to establish|NewConnectionError|Temporary failure in name",
                                  r.stderr):
        pytest.skip(f"PyPI is not reachable: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr[-2000:]
    wheels = sorted(p.name for p in tmp_path.iterdir())
    names = {re.split(r"[<>=!~; \[]", d)[0].lower().replace("-", "_") for d in deps}
    got = {w.split("-")[0].lower() for w in wheels}
    assert names <= got, (names - got, wheels)
    assert len(got) > len(names)  # their own dependencies (onnxruntime's protobuf, ...) were resolved too
    for w in wheels:
        assert w.endswith("-none-any.whl") or "aarch64" in w, w


def test_engines_build_from_the_runtime_install_without_torch(tiny_bundle, tmp_path):
    """`ldm-export engines` with torch, diffusers, transformers, onnx and onnxscript made unimportable: the device's
    own install (base + TensorRT) builds its engines."""
    pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX is not installed")
    import shutil

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    code = ("import sys\n"
            "for m in ('torch', 'diffusers', 'transformers', 'onnx', 'onnxscript'): sys.modules[m] = None\n"
            "sys.argv = ['ldm-export', 'engines', sys.argv[1], '--compute-capability', '8.6', "
            "'--components', 'vae_decoder', '--opt-level', '0']\n"
            "from ldm_export.cli import main\nmain()\n")
    r = subprocess.run([sys.executable, "-c", code, str(bundle)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert list((bundle / "engines").glob("any_sm86_trtrtx*/vae_decoder.plan"))
