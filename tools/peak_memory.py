"""Peak memory of `ldm-export generate`, normal against --low-memory: one markdown row per mode; with ``--phases``, the
low-memory path's peak and held RSS per phase in one process.

The modes run as their own processes under GNU time (`/usr/bin/time -v`, "Maximum resident set size"), with the
bundle's UNet weights beside them (the low-memory target is peak <= UNet weights + 600 MB). An sd15 bundle needs
about 11 GB free for the normal mode: run it alone on the machine.

``--phases`` (UNet bundles of one text encoder: SD 1.x, 2.x) loads and runs each component as low-memory mode does
(lean ONNX Runtime sessions, text encoder and UNet at batch 1, tiled decode), resetting the process's peak RSS
between phases (Linux: /proc/self/clear_refs), so the table says which phase sets the peak; ``--default-order``
makes the UNet's session with ONNX Runtime's default execution order, to compare.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import re
import subprocess
import sys
import time
from pathlib import Path


def unet_weight_bytes(bundle: Path) -> int:
    m = json.loads((bundle / "ldm_export.json").read_text())
    return sum(m["files"][f]["size"] for f in m["components"]["unet"]["files"])


def run(bundle: Path, extra: list[str], out: Path) -> tuple[float, float, str]:
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "ldm_export.cli", "generate", str(bundle),
           "a red circle on the left", "--seed", "1", "--out", str(out), *extra]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
    return kb * 1024 / 1e9, wall, " ".join(["ldm-export", "generate", str(bundle), '"a red circle on the left"', "--seed",
                                             "1", *extra])


def _rss() -> tuple[float, float]:
    """(peak since the last reset, current) resident set size in GB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmHWM"].split()[0]) * 1024 / 1e9, int(fields["VmRSS"].split()[0]) * 1024 / 1e9


def _phase(rows: list, name: str, fn):
    """Run ``fn`` with the peak RSS reset first (freed heap handed back, so each phase starts from what is held)."""
    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    t0 = time.perf_counter()
    out = fn()
    peak, held = _rss()
    rows.append((name, peak, held, time.perf_counter() - t0))
    print(f"| {name} | {peak:.2f} GB | {held:.2f} GB | {time.perf_counter() - t0:.1f} s |", flush=True)
    return out


def phases(bundle: Path, size: int, default_order: bool) -> None:
    """Each phase of low-memory generation on the CPU, in one process."""
    import numpy as np
    from ldm_export.runtime.bundle import Bundle
    from ldm_export.runtime.engine import OrtEngine
    from ldm_export.runtime.lowmem import TiledDecoder, lean_session_options, return_large_blocks

    b = Bundle.open(bundle)
    return_large_blocks()  # as low_memory_engines does

    def load(component: str) -> OrtEngine:
        so = lean_session_options(weights_first=component == "unet" and not default_order)
        return OrtEngine(b.model_path(component), b.spec(component), session_options=so)

    def typed(component: str, feeds: dict) -> dict:
        return {t.name: np.asarray(feeds[t.name]).astype(t.dtype) for t in b.spec(component).inputs}

    rng = np.random.default_rng(0)
    h = size // int(b.model.get("vae_scale_factor", 8))
    rows: list = []
    print(f"{bundle.name}, {size} px, {'default' if default_order else 'priority-based'} execution order")
    print("| phase | peak RSS | held after | time |\n| --- | --- | --- | --- |")
    _phase(rows, "start (imports, bundle opened)", lambda: None)
    te = _phase(rows, "text encoder: load", lambda: load("text_encoder"))
    ids = np.full((1, 77), 49407, np.int64)
    ctx = _phase(rows, "text encoder: run (batch 1)", lambda: te.run(typed("text_encoder", {"input_ids": ids})))
    ctx = next(iter(ctx.values()))
    del te
    _phase(rows, "text encoder: released", lambda: None)
    unet = _phase(rows, "UNet: load", lambda: load("unet"))
    feeds = typed("unet", {"sample": rng.standard_normal((1, 4, h, h)), "timestep": np.array([500.0]),
                           "encoder_hidden_states": ctx})
    if not b.spec("unet").inputs[1].shape:  # a scalar timestep
        feeds["timestep"] = feeds["timestep"].reshape(())
    for k in (1, 2):
        _phase(rows, f"UNet: call {k} (batch 1, {h}x{h} latents)", lambda: unet.run(feeds))
    del unet, feeds
    _phase(rows, "UNet: released", lambda: None)
    vae = _phase(rows, "VAE decoder: load", lambda: TiledDecoder(load("vae_decoder")))
    z = typed("vae_decoder", {"latent_sample": rng.standard_normal((1, 4, h, h))})
    _phase(rows, f"VAE decoder: decode {size}x{size}", lambda: vae.run(z))
    del vae
    _phase(rows, "VAE decoder: released", lambda: None)
    top = max(rows, key=lambda r: r[1])
    print(f"peak: {top[1]:.2f} GB in '{top[0]}'; UNet weights {unet_weight_bytes(bundle) / 1e9:.2f} GB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--steps", default=None)
    ap.add_argument("--size", default=None)
    ap.add_argument("--out", type=Path, default=Path("/tmp"))
    ap.add_argument("--mode", choices=("both", "normal", "low"), default="both", help="which generate modes to run")
    ap.add_argument("--phases", action="store_true", help="per-phase peak of the low-memory path, in one process")
    ap.add_argument("--default-order", action="store_true",
                    help="with --phases: the UNet in ONNX Runtime's default execution order")
    a = ap.parse_args()
    if a.phases:
        size = a.size or json.loads((a.bundle / "ldm_export.json").read_text())["model"]["resolution"]
        return phases(a.bundle, int(size), a.default_order)
    extra = (["--steps", a.steps] if a.steps else []) + (["--size", a.size] if a.size else [])
    unet = unet_weight_bytes(a.bundle) / 1e9
    print(f"| bundle | mode | peak RSS | UNet weights | target (UNet + 0.6 GB) | wall | command |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    modes = (("normal (CFG batch 2)", []), ("low memory", ["--low-memory"]))
    for mode, flags in modes[a.mode == "low":1 if a.mode == "normal" else 2]:
        peak, wall, cmd = run(a.bundle, extra + flags, a.out / f"peak-{'low' if flags else 'normal'}.png")
        print(f"| {a.bundle.name} | {mode} | {peak:.2f} GB | {unet:.2f} GB | {unet + 0.6:.2f} GB "
              f"{'met' if peak <= unet + 0.6 else 'not met'} | {wall:.0f} s | `{cmd}` |", flush=True)


if __name__ == "__main__":
    main()
