"""Peak memory of `ldm-export generate`, normal against --low-memory: one markdown row per mode.

Runs each mode as its own process under GNU time (`/usr/bin/time -v`, "Maximum resident set size") and prints the
bundle's UNet weights beside it (the low-memory target is peak <= UNet weights + 600 MB). Heavy bundles (sd15): run
it under the machine's heavy-job lock, e.g. `flock /work/heavy.lock python tools/peak_memory.py BUNDLE --steps 2`.
"""
from __future__ import annotations

import argparse
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--steps", default=None)
    ap.add_argument("--size", default=None)
    ap.add_argument("--out", type=Path, default=Path("/tmp"))
    a = ap.parse_args()
    extra = (["--steps", a.steps] if a.steps else []) + (["--size", a.size] if a.size else [])
    unet = unet_weight_bytes(a.bundle) / 1e9
    print(f"| bundle | mode | peak RSS | UNet weights | target (UNet + 0.6 GB) | wall | command |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for mode, flags in (("normal (CFG batch 2)", []), ("low memory", ["--low-memory"])):
        peak, wall, cmd = run(a.bundle, extra + flags, a.out / f"peak-{'low' if flags else 'normal'}.png")
        print(f"| {a.bundle.name} | {mode} | {peak:.2f} GB | {unet:.2f} GB | {unet + 0.6:.2f} GB "
              f"{'met' if peak <= unet + 0.6 else 'not met'} | {wall:.0f} s | `{cmd}` |", flush=True)


if __name__ == "__main__":
    main()
