"""Low-memory generation (Jetson-class devices, small CPUs): one component in memory at a time, sequential CFG,
tiled VAE decode for large images.

``Pipeline.from_bundle(..., low_memory=True)`` takes its engines from :func:`low_memory_engines`: each component is
a :class:`LazyEngine` that loads on its first ``run`` through one shared :class:`OneAtATime` slot, which releases the
engine it holds first. So the text encoder is freed when the UNet loads (after encoding), the UNet when the VAE
decoder loads, and the decoder after it has run; the peak is the largest component plus the runtime, not the sum.
ONNX Runtime sessions are made without the CPU memory arena and memory patterns (both keep freed memory for
reuse, which a process that swaps components should hand back) and with basic graph optimisations only (the
extended ones keep fp32 copies of fp16 weights; an int8 QDQ UNet keeps them, to run on int8 kernels); the denoiser's in the priority-based execution order (ONNX Runtime
then casts each fp16 weight to fp32 next to its consumer), and glibc hands freed tensors back to the OS
(:func:`return_large_blocks`). Where the memory goes, per phase: docs/runtime.md. CFG runs the UNet twice at batch 1
(``cfg_mode="sequential"``) instead of once at batch 2, halving its activations.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
from typing import Callable, Mapping

import numpy as np

from .bundle import Bundle
from .engine import Engine
from .families import get_family
from .spec import ComponentSpec

log = logging.getLogger(__name__)

TILE = 64  # latent pixels a side (512 image pixels for SD): decoders above this size decode in tiles
OVERLAP = 8  # latent pixels two tiles share, blended linearly


def _trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc keeps them otherwise, and RSS would not drop); Linux only."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
MMAP_THRESHOLD = 128 * 1024  # glibc's initial value, held fixed


def return_large_blocks() -> bool:
    """Make glibc serve every allocation of 128 KiB or more with its own mmap, unmapped when freed (Linux, glibc).

    glibc starts there but raises the threshold to each large block freed (up to 32 MiB), after which ONNX Runtime's
    tensors (the arena is off) come from the heap, whose freed holes stay resident: one SD 1.5 fp16 UNet call at 512
    px peaked at 3.50 GB with the moving threshold and 2.87 GB with it fixed, and held 2.15 against 1.78 GB after.
    Process-wide and kept for the process's life; False where there is no glibc."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


class OneAtATime:
    """Holds at most one loaded engine: asking for another component releases the one held first."""

    def __init__(self, factory: Callable[[str], Engine]):
        self.factory = factory
        self.component: str | None = None
        self.engine: Engine | None = None
        self.loads: list[str] = []  # the components loaded, in order (the tests read it)

    def get(self, component: str) -> Engine:
        if self.component != component:
            self.release()
            log.info("low memory: loading %s", component)
            self.engine = self.factory(component)
            self.component = component
            self.loads.append(component)
        return self.engine

    def release(self) -> None:
        if self.engine is None:
            return
        log.info("low memory: releasing %s", self.component)
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()
        self.engine = self.component = None
        gc.collect()
        _trim_heap()


class LazyEngine:
    """The engine protocol over a component loaded on demand through a :class:`OneAtATime` slot."""

    def __init__(self, slot: OneAtATime, component: str, spec: ComponentSpec, release_after_run: bool = False):
        self.slot, self.component, self.spec = slot, component, spec
        self.release_after_run = release_after_run

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.slot.get(self.component).run(feeds)
        if self.release_after_run:
            self.slot.release()
        return out


def blend_weights(size: int, start: int, length: int, overlap: int) -> np.ndarray:
    """1-D weights of one tile over ``[start, start + length)`` of ``size``: linear ramps (never 0) over ``overlap``
    at edges shared with a neighbour, 1 elsewhere; with evenly spaced tiles they sum to 1 (the decoder divides by
    the sum anyway, since the last tile, flush with the end, can overlap more)."""
    w = np.ones(length, np.float64)
    ramp = (np.arange(overlap) + 0.5) / overlap
    if start > 0:
        w[:overlap] = ramp
    if start + length < size:
        w[length - overlap:] = ramp[::-1]
    return w


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile origins covering ``size`` with tiles of ``tile`` sharing ``overlap`` (the last one flush with the end)."""
    if size <= tile:
        return [0]
    step = tile - overlap
    starts = list(range(0, size - tile, step)) + [size - tile]
    return sorted(set(starts))


class TiledDecoder:
    """The VAE decoder engine protocol, decoding latents larger than ``tile`` a side in overlapping tiles blended
    linearly (the decoder's activations then scale with the tile, not the image). Each tile's GroupNorm statistics
    are its own, so a tiled image differs slightly from a whole decode (as with diffusers' ``enable_vae_tiling``);
    images up to ``tile`` a side decode whole and are identical."""

    def __init__(self, engine: Engine, tile: int = TILE, overlap: int = OVERLAP, scale: int = 8):
        if not 0 < overlap < tile // 2:
            raise ValueError(f"overlap must be between 0 and half the tile, got {overlap} for tile {tile}")
        self.engine, self.tile, self.overlap, self.scale = engine, tile, overlap, scale
        self.spec = engine.spec

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        (name,) = self.spec.input_names
        z = feeds[name]  # (B, C, h, w)
        b, _, h, w = z.shape
        if h <= self.tile and w <= self.tile:
            return self.engine.run(feeds)
        s, th, tw = self.scale, min(self.tile, h), min(self.tile, w)
        out_name = self.spec.output_names[0]
        acc = wsum = None
        for y in tile_starts(h, th, self.overlap):
            wy = blend_weights(h * s, y * s, th * s, self.overlap * s)
            for x in tile_starts(w, tw, self.overlap):
                part = self.engine.run({name: np.ascontiguousarray(z[:, :, y:y + th, x:x + tw])})[out_name]
                if acc is None:
                    acc = np.zeros((b, part.shape[1], h * s, w * s), np.float32)
                    wsum = np.zeros((h * s, w * s), np.float32)
                wx = blend_weights(w * s, x * s, tw * s, self.overlap * s)
                wt = np.outer(wy, wx).astype(np.float32)
                acc[:, :, y * s:(y + th) * s, x * s:(x + tw) * s] += part.astype(np.float32) * wt
                wsum[y * s:(y + th) * s, x * s:(x + tw) * s] += wt
        return {out_name: acc / wsum}

    def close(self) -> None:
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()


def lean_session_options(threads: int | None = None, weights_first: bool = False, quantized: bool = False):
    """ONNX Runtime session options that keep memory down: no CPU arena (it keeps its high-water mark), no memory
    patterns (a planned block per shape, kept for the session's life), basic graph optimisations only (extended for a
    ``quantized`` QDQ graph), and with ``weights_first`` (for a graph whose fp16 weights outweigh its activations: the
    denoiser) the priority-based execution order.

    A QDQ (int8) graph needs the extended level: it fuses DequantizeLinear -> Conv/MatMul -> QuantizeLinear into ONNX
    Runtime's int8 kernels, which read the int8 weights as they are; at the basic level every call dequantises the
    weights to fp32 and runs fp32 kernels. The demo's int8 UNet at batch 1 on a 2-core CPU: 6.0 ms a call and 50 MB of
    peak RSS growth (load and 5 calls) at the basic level, 1.6 ms and 33 MB at the extended one.

    The extended level keeps fp32 copies of fp16 weights: SD 1.5's fp16 text encoder (246 MB file) held 0.60 GB after
    load with it and 0.31 GB without, its VAE decoder (106 MB) 0.51 against 0.16 GB (ONNX Runtime 1.32, a CPU).
    The execution order matters for fp16 graphs on a CPU: ONNX Runtime's x86 CPU has no fp16 Conv, MatMul, Gemm, Add,
    Mul or Div kernels, so it inserts a Cast of every fp16 weight before its consumer, and its default order runs
    those Casts long before their consumers, holding the fp32 copies together. The priority-based order runs
    each Cast when its consumer is next: one SD 1.5 fp16 UNet call at 8x8 latents peaked 1.77 GB above the loaded
    session (1.77 GB) in the default order and 0.34 GB in this one; at 64x64 latents (512 px), 2.98 against 1.73 GB.
    For a graph of small weights and large activations the default order is the leaner one: the SD 1.5 fp16 VAE
    decoder at 512 px peaked at 1.35 GB in it and 1.70 GB in the priority-based one."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.enable_cpu_mem_arena = False
    so.enable_mem_pattern = False
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED if quantized
                                   else ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    if weights_first:
        so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    if threads:
        so.intra_op_num_threads = int(threads)
    return so


def low_memory_engines(bundle: Bundle, provider: str = "cpu", threads: int | None = None,
                       factory: Callable[[str], Engine] | None = None, tile: int = TILE) -> dict[str, Engine]:
    """One :class:`LazyEngine` per component over one shared slot, the VAE decoder tiled and released after it runs.
    ``factory`` makes a component's engine (default: ONNX Runtime with lean session options on the CPU, else the
    runtime's engine for ``provider``)."""
    if factory is None:
        from .engine import OrtEngine
        from .pipeline import make_engine

        denoiser = get_family(bundle.model.get("family", "sd1")).denoiser

        def factory(component: str) -> Engine:
            if provider == "cpu":
                return OrtEngine(bundle.model_path(component), bundle.spec(component), provider="cpu", threads=threads,
                                 session_options=lean_session_options(threads, weights_first=component == denoiser,
                                                                      quantized=bundle.precision(component) == "int8"))
            return make_engine(bundle, component, provider, threads)

    if provider == "cpu":
        return_large_blocks()
    slot = OneAtATime(factory)
    engines: dict[str, Engine] = {}
    scale = int(bundle.model.get("vae_scale_factor", 8))
    for c in bundle.components:
        lazy = LazyEngine(slot, c, bundle.spec(c), release_after_run=(c == "vae_decoder"))
        engines[c] = TiledDecoder(lazy, tile=tile, scale=scale) if c == "vae_decoder" and _tileable(bundle.spec(c), tile) else lazy
    return engines


def _tileable(spec: ComponentSpec, tile: int) -> bool:
    """Tiles need a dynamic-size decoder whose profile admits a tile a side."""
    shape = spec.inputs[0].shape
    if not all(isinstance(d, str) for d in shape[2:]):
        return False
    return all(spec.profile.get(d, (0, 0, 0))[0] <= tile <= spec.profile.get(d, (0, 0, 0))[2] for d in shape[2:])
