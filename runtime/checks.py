"""Checks of one generation request before any work: seed, prompts, guidance, size, memory, threads.

Each is a pure function that returns the value to use or raises ``LdmExportError`` with a one-line message
saying what to do, so a bad request fails in milliseconds, not after the sampler has run (or never: an image
size whose activations cannot fit is refused from an estimate, not discovered by the allocator).
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import LdmExportError

log = logging.getLogger(__name__)

SEED_MAX = 2**32 - 1  # A1111's seeds are unsigned 32-bit; -1 asks for a random one
MAX_GUIDANCE = 100.0  # far past any useful CFG scale (A1111's slider stops at 30); 1e30 saturates to a grey image
# An image side outside [resolution * LOW, resolution * HIGH] is off the model's training size: one warning.
OFF_MODEL_LOW, OFF_MODEL_HIGH = 0.5, 1.5
# Share of the available memory a request may plan for: the engines' own weights and arenas need the rest.
MEMORY_SHARE = 0.8
_WARNED: set[str] = set()


def warn_once(key: str, message: str, *args) -> None:
    """Log ``message`` as a warning the first time ``key`` is seen in this process."""
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning(message, *args)


def refuse_out_under_a_file(out) -> None:
    """Refuse an --out path with a file where one of its folders should be (mkdir would say only "File exists")."""
    from pathlib import Path

    parent = Path(out).parent
    blocking = next((a for a in (parent, *parent.parents) if a.exists() and not a.is_dir()), None)
    if blocking is not None:
        raise LdmExportError(f"--out {out} lies under {blocking}, which is a file, not a folder; choose another --out")


def resolve_seed(seed: int | None) -> int:
    """A1111's seed rule: None or -1 draws a random seed; else an integer from 0 to 2**32 - 1."""
    if seed is None or (isinstance(seed, (int, np.integer)) and not isinstance(seed, bool) and seed == -1):
        return int(np.random.default_rng().integers(0, SEED_MAX))
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or not 0 <= seed <= SEED_MAX:
        raise LdmExportError(f"seed must be an integer from 0 to {SEED_MAX} (or -1 for a random one), got {seed!r}")
    return int(seed)


def image_seeds(seed: int, n: int) -> list[int]:
    """Image k of a request gets seed + k (A1111), so any one image can be made again alone; wraps at 2**32."""
    return [(seed + k) % (SEED_MAX + 1) for k in range(n)]


def check_text(prompts: Sequence[str], what: str) -> None:
    """Refuse text that cannot be written as UTF-8 (lone surrogates from a command line with invalid UTF-8)."""
    for p in prompts:
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as e:
            raise LdmExportError(f"the {what} is not valid UTF-8 text (byte {e.start} of {len(p)}: "
                                 f"{p[e.start:e.end].encode('utf-8', 'surrogateescape')!r}); fix its encoding") from None


def check_guidance(guidance_scale: float, guidance_rescale: float, usual: float = 7.5) -> tuple[float, float]:
    """CFG scale from 0 to MAX_GUIDANCE (<= 1 runs the conditional pass alone) and rescale from 0 to 1; ``usual``: the
    model's default scale, for the message."""
    for name, v, hi, hint in (("guidance scale", guidance_scale, MAX_GUIDANCE,
                               f"{usual:g} is this model's default"),
                              ("guidance rescale", guidance_rescale, 1.0, "0.7 is the paper's value; 0 turns it off")):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) or not math.isfinite(v):
            raise LdmExportError(f"{name} must be a finite number, got {v!r}")
        if not 0 <= v <= hi:
            raise LdmExportError(f"{name} must be from 0 to {hi:g}, got {v:g} ({hint})")
    return float(guidance_scale), float(guidance_rescale)


def check_size(width, height, model: Mapping[str, Any], multiple: int, largest: int | None = None,
               warn: bool = True) -> tuple[int, int]:
    """Refuse sizes the denoiser cannot take (not a multiple of ``multiple`` px: the family's ``size_multiple``, the
    VAE's factor times the UNet's downsampling; over ``largest`` px: the family's ``largest_side``); with ``warn``,
    warn once for sizes off the training size (`warn_off_model`: callers with more checks to run call it after them,
    so that a refused size gets its error alone)."""
    for name, v in (("width", width), ("height", height)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0 or v % multiple:
            near = max(multiple, int(round(v / multiple)) * multiple) if isinstance(v, (int, np.integer)) and v > 0 else multiple
            if largest:
                near = min(near, largest)
            raise LdmExportError(f"{name} must be a positive multiple of {multiple} px for this model (its denoiser "
                                 f"downsamples the {model['vae_scale_factor']}x latents {multiple // int(model['vae_scale_factor'])}x), "
                                 f"got {v!r}; try {near}")
        if largest and v > largest:
            raise LdmExportError(f"{name} must be at most {largest} px for this model (its transformer's position "
                                 f"embedding covers {largest} px a side), got {v}; try {largest} or less")
    if warn:
        warn_off_model(width, height, model)
    return int(width), int(height)


def warn_off_model(width: int, height: int, model: Mapping[str, Any]) -> None:
    """Warn once for a size far from the model's training size."""
    resolution = int(model["resolution"])
    lo, hi = resolution * OFF_MODEL_LOW, resolution * OFF_MODEL_HIGH
    if not (lo <= width <= hi and lo <= height <= hi):
        warn_once(f"off-model {width}x{height}",
                  "%dx%d is far from the %d px this model was trained at; expect repeated or broken subjects "
                  "(sizes from %d to %d px are on-model)", width, height, resolution, int(lo), int(hi))


def _largest_scores(unet_config: Mapping[str, Any], tokens: int) -> int:
    """Values of the largest attention score matrix of one latent (heads x tokens^2) over the U-Net's attention
    levels: level i has tokens / 4^i latents and its own head count (SD 2.x: 5 heads at full size, 20 at 1/8;
    SDXL: no attention at full size)."""
    types = list(unet_config.get("down_block_types") or ["CrossAttnDownBlock2D"])
    # diffusers' SD configs store the head count as attention_head_dim (num_attention_heads where it is set)
    heads = unet_config.get("num_attention_heads") or unet_config.get("attention_head_dim") or 8
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * len(types)
    return max((int(heads[min(i, len(heads) - 1)]) * (tokens // 4 ** i) ** 2
                for i, kind in enumerate(types) if "CrossAttn" in str(kind)), default=0)


# score matrices alive at once in unfused attention (MatMul, scale, Softmax, and ONNX Runtime's arena): the demo model at
# 512x512 on a CPU peaked at 4.66 GiB RSS (maxrss 4,885,028 KiB; 4.17 GiB over its 256x256 run) against 1.0 GiB for
# one score matrix of batch 2 (`generate --size 512x512 --steps 2`, /usr/bin/time).
# Measured on that U-Net; a DiT's unfused attention is the same chain of ops, so it gets the same factor.
SCORE_COPIES = 4
# The VAE decoder's mid-block attention (single-head over every latent, unfused on every target): tiny-flux (8-channel
# VAE, so its feature maps are small) at 1536x1536 peaked at 12.2 GiB RSS (maxrss 12,811,984 KiB, `generate --size
# 1536x1536 --steps 1`, /usr/bin/time, a 2-core CPU) against 5.1 GiB for one 36864^2 float32 score matrix: 2.4 of them.
VAE_SCORE_COPIES = 2


def estimate_memory(model: Mapping[str, Any], configs: Mapping[str, Any], width: int, height: int, batch: int,
                    fused_attention: bool, bytes_per_value: int = 4) -> int:
    """Bytes of activations one UNet call on ``batch`` latents and one VAE decode of ``width x height`` need at their
    peak: the first attention's score matrix (batch x heads x tokens^2, absent with fused attention), a few
    feature maps of the widest block at full latent size, and the decoder's last blocks at full image size.
    An order-of-magnitude floor, used to refuse sizes that cannot fit; real peaks are higher. ``configs``: the
    bundle's module configs (``Bundle.module_configs``)."""
    return max(_peaks(model, configs, width, height, batch, fused_attention, bytes_per_value).values())


def _peaks(model: Mapping[str, Any], configs: Mapping[str, Any], width: int, height: int, batch: int,
           fused_attention: bool, bytes_per_value: int = 4) -> dict[str, int]:
    """Bytes of :func:`estimate_memory` per part: {"transformer" or "UNet": one call, "VAE decoder": one decode}."""
    unet = configs.get("unet") or {}
    vae = configs.get("vae") or {}
    f = int(model["vae_scale_factor"])
    tokens = (height // f) * (width // f)
    if configs.get("transformer"):  # a DiT: joint attention over patch tokens and text tokens
        unet_peak = _dit_peak(model, configs["transformer"], tokens, batch, fused_attention)
    else:
        c0 = int((unet.get("block_out_channels") or [320])[0])
        scores = 0 if fused_attention else SCORE_COPIES * batch * _largest_scores(unet, tokens)
        unet_peak = scores + 6 * batch * c0 * tokens
    vae_c = int((vae.get("block_out_channels") or [128])[0])
    vae_peak = 4 * vae_c * height * width + VAE_SCORE_COPIES * tokens * tokens  # single-head over the latents
    denoiser = "transformer" if configs.get("transformer") else "UNet"
    return {denoiser: int(unet_peak * bytes_per_value), "VAE decoder": int(vae_peak * bytes_per_value)}


def _dit_peak(model: Mapping[str, Any], transformer: Mapping[str, Any], latents: int, batch: int,
              fused_attention: bool) -> int:
    """Values alive at a DiT block's peak: the attention scores (batch x heads x tokens^2, absent with fused
    attention), a few hidden states and the MLP's 4x-wide one. Tokens: the latents in 2x2 patches (SD3's patch size;
    FLUX packs 2x2 latents into one token, its config's patch size 1 over 4x the channels), plus the text's (SD3: 77
    CLIP and the T5 count; FLUX: T5's)."""
    patch = int(transformer.get("patch_size") or 1)
    if patch == 1 and int(transformer.get("in_channels") or 0) == 4 * int(model.get("latent_channels") or 0):
        patch = 2
    text = int(model.get("max_length") or 0) + (77 if model.get("family") == "sd3" else 0)
    tokens = latents // (patch * patch) + text
    heads = int(transformer.get("num_attention_heads") or 8)
    inner = heads * int(transformer.get("attention_head_dim") or 64)
    scores = 0 if fused_attention else SCORE_COPIES * batch * heads * tokens * tokens
    return scores + 10 * batch * inner * tokens


MEMINFO, PROC_CGROUP, CGROUP_ROOT = "/proc/meminfo", "/proc/self/cgroup", "/sys/fs/cgroup"  # (tests point them elsewhere)


def _meminfo(key: str) -> int | None:
    try:
        with open(MEMINFO) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


_V1_NAMES = {"memory.max": "memory.limit_in_bytes", "memory.current": "memory.usage_in_bytes"}


def _cgroup_value(name: str) -> int | None:
    """A memory value of this process's cgroup (v2's ``memory.max``, ``memory.current``, ``memory.swap.max``, ...;
    under cgroup v1 the first two as ``memory.limit_in_bytes`` / ``memory.usage_in_bytes``), or None where there is no
    such file or no limit."""
    try:
        with open(PROC_CGROUP) as f:
            lines = [line.strip().split(":", 2) for line in f if line.count(":") >= 2]
    except OSError:
        return None
    places = []
    for _, controllers, rel in lines:
        if controllers == "":  # v2's unified hierarchy
            places += [f"{CGROUP_ROOT}{rel.rstrip('/')}/{name}", f"{CGROUP_ROOT}/{name}"]
        elif "memory" in controllers.split(",") and name in _V1_NAMES:
            places += [f"{CGROUP_ROOT}/memory{rel.rstrip('/')}/{_V1_NAMES[name]}",
                       f"{CGROUP_ROOT}/memory/{_V1_NAMES[name]}"]
    for place in places:
        try:
            with open(place) as f:
                text = f.read().strip()
        except OSError:
            continue
        if not text.isdigit():
            return None  # "max": no limit
        value = int(text)
        return None if value >= 1 << 60 else value  # v1's "no limit" is a page-rounded 2**63
    return None


def available_memory() -> int | None:
    """Bytes of memory this process can still take: the host's MemAvailable (/proc/meminfo, else sysconf), less where
    a container's cgroup limit leaves less (``memory.max`` - ``memory.current``); None when unknown."""
    free = _meminfo("MemAvailable")
    if free is None:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            free = None
    limit, used = _cgroup_value("memory.max"), _cgroup_value("memory.current")
    if limit is not None and used is not None:
        free = max(0, limit - used) if free is None else min(free, max(0, limit - used))
    return free


def available_swap() -> int:
    """Bytes of swap this process can still use: the host's SwapFree, within a cgroup's ``memory.swap.max``."""
    free = _meminfo("SwapFree") or 0
    limit, used = _cgroup_value("memory.swap.max"), _cgroup_value("memory.swap.current")
    if limit is not None:
        free = min(free, max(0, limit - (used or 0)))
    return free


def check_memory(model: Mapping[str, Any], configs: Mapping[str, Any], width: int, height: int, batch: int,
                 fused_attention: bool, available: int | None, where: str) -> None:
    """Refuse a request whose estimated activations exceed ``MEMORY_SHARE`` of ``available`` bytes."""
    peaks = _peaks(model, configs, width, height, batch, fused_attention)
    what, need = max(peaks.items(), key=lambda kv: kv[1])
    if available is not None and need > MEMORY_SHARE * available:
        per = (f"per {what} call ({batch} latents)" if what != "VAE decoder"
               else "in the VAE decoder (its attention over every latent)")
        raise LdmExportError(f"{width}x{height} needs about {_gb(need)} of activations {per}, "
                             f"more than the {_gb(available)} available {where}; use a smaller --size "
                             f"(the model's own is {model['resolution']} px)")


def _gb(n: float) -> str:
    return f"{n / 2**30:.1f} GB" if n < 2**50 else f"{n / 2**40:.3g} TB"


def cap_threads(threads: int | None) -> int | None:
    """CPU threads for ONNX Runtime: at least 1, at most this machine's cores (more only contend, and thousands hang)."""
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise LdmExportError(f"threads must be a positive integer, got {threads!r}")
    cores = os.cpu_count() or 1
    if threads > cores:
        warn_once(f"threads {threads}", "%d threads asked for, this machine has %d cores; using %d", threads, cores, cores)
        return cores
    return int(threads)
