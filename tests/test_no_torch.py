"""The runtime never imports torch, diffusers or transformers: checked in a fresh interpreter."""
from __future__ import annotations

import json
import subprocess
import sys

FORBIDDEN = ("torch", "diffusers", "transformers")

# Imports ldm_export.runtime and every module under it (found with pkgutil, so new modules are covered),
# then reports which modules were imported and which forbidden top-level packages got loaded.
PROBE = r"""
import importlib, json, pkgutil, sys
import ldm_export.runtime as rt
names = sorted(m.name for m in pkgutil.walk_packages(rt.__path__, rt.__name__ + "."))
for name in names:
    importlib.import_module(name)
loaded = sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[1:]))
print(json.dumps({"modules": names, "loaded": loaded}))
"""


def test_runtime_imports_without_torch_diffusers_transformers():
    proc = subprocess.run([sys.executable, "-c", PROBE, *FORBIDDEN], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    # the walk found the runtime's modules (an empty walk would make the check below vacuous)
    assert {"ldm_export.runtime.errors", "ldm_export.runtime.spec", "ldm_export.runtime.tokenizer"} <= set(report["modules"])
    assert report["loaded"] == [], f"runtime imported {report['loaded']}; keep torch, diffusers and transformers out of runtime/"


def test_probe_detects_a_forbidden_import():
    # The same probe, with a module that is surely imported by it, must report it: the check can fail.
    proc = subprocess.run([sys.executable, "-c", PROBE, "pkgutil", "json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["loaded"] == ["json", "pkgutil"]


# A runtime-only install, simulated: importing the export extras' packages fails as it would where they are absent
BLOCKER = r"""
import importlib.abc, sys
BLOCK = {"torch", "onnx", "diffusers", "transformers", "safetensors", "onnxscript", "peft"}
class _Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCK:
            raise ModuleNotFoundError(f"No module named '{name}'", name=name)
        return None
sys.meta_path.insert(0, _Absent())
"""


def test_export_commands_on_a_runtime_only_install_say_what_to_install(tmp_path):
    import os

    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    for args in (["build", "--model", "tiny", "--random-weights", "--out", str(tmp_path / "b")],
                 ["bench", "--model", "tiny", "--device", "cpu"]):
        proc = subprocess.run([sys.executable, "-m", "ldm_export.cli", *args], capture_output=True, text=True,
                              timeout=120, env=env)
        err = proc.stderr.strip()
        assert proc.returncode == 2, (args, proc.stderr)
        assert "Traceback" not in err and len(err.splitlines()) == 1, err
        assert "pip install 'ldm-export[export]'" in err, err
    assert not (tmp_path / "b").exists()
    # the runtime's own commands still run there
    proc = subprocess.run([sys.executable, "-m", "ldm_export.cli", "models"], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0 and "tiny" in proc.stdout, proc.stderr
