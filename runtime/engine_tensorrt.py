"""Native TensorRT engines: one ``.plan`` per component, run through Polygraphy's ``TrtRunner``. numpy only.

Engines are not portable: a plan runs only on the GPU model and TensorRT version it was built with, so a bundle
keeps them under ``engines/<gpu-name>_sm<cc>_trt<version>/`` with an ``engines.json`` that records, per
component, the plan's sha256, the sha256 of the ``model.onnx`` it was built from, the optimisation profile and
the builder flags. This module picks the folder that matches the current GPU and TensorRT, checks it, and runs
the plans with the same protocol as :class:`~ldm_export.runtime.engine.OrtEngine` (``spec``, ``run(feeds)``).

``tensorrt`` and ``polygraphy`` are imported lazily (the ``[tensorrt]`` extra); the GPU is identified through
the CUDA driver API (``libcuda``) with ctypes, so no CUDA toolkit, torch or cuda-python is needed.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

from .bundle import Bundle, sha256_file
from .errors import LdmExportError
from .spec import ComponentSpec

log = logging.getLogger(__name__)

ENGINES_DIR = "engines"
ENGINES_JSON = "engines.json"
ENGINES_FORMAT = "ldm-export-engines"
ENGINES_FORMAT_VERSION = 1

INSTALL_HINT = ("pip install 'ldm-export[tensorrt]' and NVIDIA's TensorRT wheels "
                "(pip install --extra-index-url https://pypi.nvidia.com tensorrt)")

# CUDA driver API device attributes (cuda.h, CUdevice_attribute); stable since CUDA 2.x
_CU_ATTR_CC_MAJOR = 75
_CU_ATTR_CC_MINOR = 76


def require_tensorrt():
    """Import and return ``tensorrt`` (checking Polygraphy too), or raise one line saying what to install."""
    try:
        import tensorrt as trt
    except Exception as e:  # ImportError, or OSError when the wheel is there but libnvinfer is not
        raise LdmExportError(f"TensorRT is not installed: {_first_line(e)}; {INSTALL_HINT}") from None
    try:
        import polygraphy  # noqa: F401
    except ImportError:
        raise LdmExportError(f"Polygraphy is not installed; {INSTALL_HINT}") from None
    return trt


@dataclass(frozen=True)
class GpuInfo:
    name: str  # as the driver reports it, e.g. "NVIDIA H100 80GB HBM3"
    compute_capability: tuple[int, int]


def current_gpu(device: int = 0) -> GpuInfo:
    """Name and compute capability of CUDA device ``device`` from the driver API, or one line saying why not."""
    lib = None
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    if lib is None:
        raise LdmExportError("no NVIDIA driver on this machine (libcuda not found): TensorRT engines need an NVIDIA GPU; "
                             "run on the CPU with --provider cpu")

    def call(fn: str, *args) -> None:
        rc = getattr(lib, fn)(*args)
        if rc != 0:
            raise LdmExportError(f"no usable NVIDIA GPU: the CUDA driver returned error {rc} from {fn}; "
                                 "check nvidia-smi and CUDA_VISIBLE_DEVICES, or run with --provider cpu")

    call("cuInit", 0)
    count = ctypes.c_int(0)
    call("cuDeviceGetCount", ctypes.byref(count))
    if count.value <= device:
        raise LdmExportError(f"no CUDA device {device} (the driver sees {count.value}); check CUDA_VISIBLE_DEVICES, "
                             "or run with --provider cpu")
    dev = ctypes.c_int(0)
    call("cuDeviceGet", ctypes.byref(dev), device)
    buf = ctypes.create_string_buffer(256)
    call("cuDeviceGetName", buf, ctypes.c_int(len(buf)), dev)
    major, minor = ctypes.c_int(0), ctypes.c_int(0)
    call("cuDeviceGetAttribute", ctypes.byref(major), _CU_ATTR_CC_MAJOR, dev)
    call("cuDeviceGetAttribute", ctypes.byref(minor), _CU_ATTR_CC_MINOR, dev)
    return GpuInfo(buf.value.decode(errors="replace").strip(), (major.value, minor.value))


def _sanitise(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9.\-]+", "_", s).strip("_")


@dataclass(frozen=True)
class EngineTarget:
    """What a plan is tied to: the GPU model, its compute capability, and the exact TensorRT version."""

    gpu_name: str
    compute_capability: tuple[int, int]
    tensorrt_version: str

    @property
    def dirname(self) -> str:
        """``NVIDIA_H100_80GB_HBM3_sm90_trt10.13.3.9``: the engines folder for this target."""
        major, minor = self.compute_capability
        return f"{_sanitise(self.gpu_name)}_sm{major}{minor}_trt{_sanitise(self.tensorrt_version)}"

    def to_json(self) -> dict:
        return {"gpu": self.gpu_name, "compute_capability": f"{self.compute_capability[0]}.{self.compute_capability[1]}",
                "tensorrt": self.tensorrt_version}

    @classmethod
    def from_json(cls, d: Mapping) -> "EngineTarget":
        major, minor = (int(x) for x in str(d["compute_capability"]).split("."))
        return cls(d["gpu"], (major, minor), d["tensorrt"])


def current_target(trt=None, device: int = 0) -> EngineTarget:
    """The target of this machine: its GPU and the installed TensorRT (one-line errors when either is missing)."""
    trt = trt or require_tensorrt()
    gpu = current_gpu(device)
    return EngineTarget(gpu.name, gpu.compute_capability, str(trt.__version__))


def engines_root(bundle_path: str | os.PathLike) -> Path:
    return Path(bundle_path) / ENGINES_DIR


def read_engines_json(folder: Path) -> dict:
    p = folder / ENGINES_JSON
    try:
        index = json.loads(p.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise LdmExportError(f"cannot read {p}: {e}; delete {folder} and rebuild with `ldm-export engines`") from None
    if index.get("format") != ENGINES_FORMAT or not isinstance(index.get("format_version"), int) \
            or index["format_version"] > ENGINES_FORMAT_VERSION:
        raise LdmExportError(f"{p} is not an engines index this ldm-export reads (format {index.get('format')!r} "
                             f"v{index.get('format_version')}); upgrade ldm-export or rebuild the engines")
    return index


def available_targets(bundle_path: str | os.PathLike) -> list[str]:
    """Names of the engines folders in a bundle that hold an ``engines.json`` (sorted)."""
    root = engines_root(bundle_path)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / ENGINES_JSON).is_file())


def _rebuild(bundle: Bundle, component: str | None = None) -> str:
    return f"rebuild with `ldm-export engines {bundle.path}" + (f" --components {component}`" if component else "`")


def locate_plan(bundle: Bundle, component: str, target: EngineTarget) -> tuple[Path, dict]:
    """The plan for ``component`` built for ``target``, and its ``engines.json`` entry, checked against the bundle.

    Refuses (one line, listing what exists) a bundle with no engines for this GPU and TensorRT, a folder without
    this component, a missing or changed plan, and a plan built from a different ``model.onnx`` than the bundle's."""
    bundle.spec(component)  # an unknown component fails here with the bundle's own message
    folder = engines_root(bundle.path) / target.dirname
    index = read_engines_json(folder)
    if not index:
        found = available_targets(bundle.path)
        raise LdmExportError(
            f"no TensorRT engines for this GPU and TensorRT ({target.dirname}) in {engines_root(bundle.path)}; "
            f"found: {', '.join(found) if found else 'none'}; {_rebuild(bundle)}")
    entry = index.get("engines", {}).get(component)
    if entry is None:
        raise LdmExportError(f"{folder} has no engine for {component} (it has: {', '.join(index.get('engines', {})) or 'none'}); "
                             f"{_rebuild(bundle, component)}")
    plan = folder / entry["file"]
    if not plan.is_file():
        raise LdmExportError(f"{plan} is missing; {_rebuild(bundle, component)}")
    if plan.stat().st_size != entry["size"] or sha256_file(plan) != entry["sha256"]:
        raise LdmExportError(f"{plan}: sha256 mismatch (the file was changed or damaged); {_rebuild(bundle, component)}")
    onnx_rel = bundle.manifest["components"][component]["files"][0]
    onnx_sha = bundle.manifest["files"][onnx_rel]["sha256"]
    if entry.get("onnx_sha256") != onnx_sha:
        raise LdmExportError(f"the {component} engine in {folder} was built from a different {onnx_rel} than this bundle's; "
                             f"{_rebuild(bundle, component)}")
    return plan, entry


def check_profile_bounds(spec: ComponentSpec, feeds: Mapping[str, np.ndarray]) -> None:
    """Refuse feeds whose symbolic dims fall outside the profile the engine was built for; say which and the range."""
    for t in spec.inputs:
        for d, n in zip(t.shape, np.shape(feeds[t.name])):
            if isinstance(d, str) and d in spec.profile:
                lo, _, hi = spec.profile[d]
                if not lo <= n <= hi:
                    raise LdmExportError(f"{spec.name}.{t.name}: dimension '{d}' is {n}, outside the range {lo}..{hi} "
                                         "the TensorRT engine was built for; use sizes within it or rebuild the bundle "
                                         "with a wider profile")


def _first_line(e: BaseException) -> str:
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    return lines[0] if lines else type(e).__name__


@contextlib.contextmanager
def polygraphy_logging() -> Iterator[None]:
    """Polygraphy (and TensorRT's log, through it) prints to stdout on its own: map our logging level onto it.

    At the default level it is silenced entirely, even its critical messages, which it also raises as exceptions
    that we turn into one line; ``-v`` shows its INFO log, debug logging its VERBOSE one."""
    from polygraphy.logger import G_LOGGER

    level = logging.getLogger("ldm_export").getEffectiveLevel()
    severity = (G_LOGGER.VERBOSE if level <= logging.DEBUG else G_LOGGER.INFO if level <= logging.INFO
                else G_LOGGER.CRITICAL + 1)
    with G_LOGGER.verbosity(severity):
        yield


class TensorRTEngine:
    """One component's TensorRT plan behind the engine protocol, inputs checked against its spec and profile.

    Runs through Polygraphy's ``TrtRunner(EngineFromBytes(BytesFromPath(plan)))``. Why not a hand-written execution
    context: the protocol is numpy in, numpy out, so each call copies inputs to the device and outputs back anyway;
    ``TrtRunner`` keeps its device buffers between calls (reallocating only when a shape grows) and its Python
    bookkeeping costs well under a millisecond against a UNet step of several ms on a datacentre GPU. A path that
    keeps the text embeddings resident on the device between steps (as ``CudaEngine.run_partial`` does) would need
    our own buffers; that is not built.
    """

    def __init__(self, plan_path: str | os.PathLike, spec: ComponentSpec, expected_sha256: str | None = None):
        trt = require_tensorrt()
        current_gpu()  # one line when there is no GPU, before TensorRT's own multi-line CUDA errors
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner
        from polygraphy.exception import PolygraphyException

        self._polygraphy_error = PolygraphyException
        self.spec = spec
        self.path = Path(plan_path)
        if not self.path.is_file():
            raise LdmExportError(f"no TensorRT engine at {self.path}; build it with `ldm-export engines BUNDLE`")
        if expected_sha256 is not None and sha256_file(self.path) != expected_sha256:
            raise LdmExportError(f"{self.path}: sha256 mismatch; rebuild with `ldm-export engines BUNDLE`")
        self._runner = TrtRunner(EngineFromBytes(BytesFromPath(str(self.path))), name=f"ldm-export-{spec.name}")
        try:
            with polygraphy_logging():
                self._runner.activate()
        except PolygraphyException as e:
            raise LdmExportError(f"cannot load the TensorRT engine {self.path}: {_first_line(e)}; it was built for another "
                                 "GPU or TensorRT, or is damaged: rebuild with `ldm-export engines BUNDLE`") from None
        engine = self._runner.engine
        io = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = {n for n in io if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT}
        outputs = set(io) - inputs
        if inputs != set(spec.input_names) or not set(spec.output_names) <= outputs:
            self.close()
            raise LdmExportError(f"{self.path}: the engine's inputs/outputs {sorted(inputs)}/{sorted(outputs)} differ from "
                                 f"the bundle's {spec.input_names}/{spec.output_names}; rebuild with `ldm-export engines BUNDLE`")
        log.info("%s: TensorRT engine %s loaded", spec.name, self.path)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.spec.check_feeds(feeds)
        check_profile_bounds(self.spec, feeds)
        feed = {k: np.ascontiguousarray(v) for k, v in feeds.items()}
        try:
            outs = self._runner.infer(feed, copy_outputs_to_host=True)
        except self._polygraphy_error as e:
            raise LdmExportError(f"{self.spec.name}: TensorRT inference failed: {_first_line(e)}") from None
        # TrtRunner reuses its host output buffers on the next call: copy, since samplers keep results across steps
        return {name: np.array(outs[name], copy=True) for name in self.spec.output_names}

    def close(self) -> None:
        runner = getattr(self, "_runner", None)
        if runner is not None and runner.is_active:
            runner.deactivate()

    def __enter__(self) -> "TensorRTEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def load_tensorrt_engine(bundle: Bundle, component: str, target: EngineTarget | None = None) -> TensorRTEngine:
    """The native TensorRT engine for ``component``, from the engines folder matching this GPU and TensorRT."""
    target = target or current_target()
    plan, entry = locate_plan(bundle, component, target)  # checks the plan's sha256 already
    return TensorRTEngine(plan, bundle.spec(component))
