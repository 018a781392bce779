"""Every code block of README.md runs: Python blocks as written, shell blocks command by command."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT, torch_available

README = ROOT / "README.md"
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
# The set-up commands are what CI itself runs (.ci/run makes the venv and installs the same extras), and
# `bash .ci/run` is CI: a test cannot run the command that runs it. Every other command runs here.
SETUP = ("python3 -m venv", ". .venv/bin/activate", "pip install", "bash .ci/run")
# A server runs until stopped: `serve` runs with --dry-run (it loads the bundle, writes its config and exits). The
# cluster example names a cluster and shared storage this test does not have (HEAD:6379, /shared/).
PLACEHOLDERS = ("HEAD:6379", "/shared/")


def blocks() -> list[tuple[str, str]]:
    return BLOCK.findall(README.read_text())


def test_every_block_says_what_it_is():
    kinds = [lang for lang, _ in blocks()]
    assert kinds and set(kinds) <= {"bash", "python", "text"}, kinds
    assert "python" in kinds and "bash" in kinds


def test_the_setup_commands_are_the_ones_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    for lang, body in blocks():
        if lang != "bash":
            continue
        for cmd in _commands(body):
            if cmd.startswith("pip install"):
                spec = cmd.split("pip install", 1)[1].strip().replace('"', "").replace("-e .[export]", "-e .[export")
                assert spec.split("[")[0] in ci.replace('"', ""), cmd


def _commands(body: str) -> list[str]:
    return [c.strip() for line in body.splitlines() if line.strip() and not line.startswith("#")
            for c in line.split("&&")]


@pytest.mark.skipif(not torch_available(), reason="the README's shell block builds the demo bundle (needs torch)")
def test_shell_blocks_run(tmp_path):
    ran = 0
    for lang, body in blocks():
        if lang != "bash":
            continue
        for cmd in _commands(body):
            if cmd.startswith(SETUP) or any(p in cmd for p in PLACEHOLDERS):
                continue
            argv = shlex.split(cmd.split("#")[0])
            if argv[:2] == ["ldm-export", "serve"]:
                pytest.importorskip("ray", reason="`ldm-export serve` needs the [serve] extra")
                argv.append("--dry-run")
            assert argv[0] == "ldm-export", f"README command not covered by this test: {cmd}"
            r = subprocess.run([sys.executable, "-m", "ldm_export.cli", *argv[1:]], cwd=tmp_path, capture_output=True,
                               text=True, timeout=900)
            assert r.returncode == 0, (cmd, r.stderr[-2000:])
            ran += 1
    assert ran >= 2 and (tmp_path / "red-circle.png").is_file() and (tmp_path / "demo-bundle" / "ldm_export.json").is_file()


def test_python_blocks_run(demo_bundle, tmp_path):
    (tmp_path / "demo-bundle").symlink_to(demo_bundle)
    for k, (lang, body) in enumerate(blocks()):
        if lang != "python":
            continue
        script = tmp_path / f"block{k}.py"
        script.write_text(body)
        r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                           env={**os.environ, "PYTHONPATH": str(ROOT / "tests")})
        assert r.returncode == 0, (body, r.stderr[-3000:])
    assert sorted(p.name for p in tmp_path.glob("triangle-*.webp")) == ["triangle-0.webp", "triangle-1.webp",
                                                                        "triangle-2.webp"]
