"""Native TensorRT engines: one ``.plan`` per component, built by full TensorRT or by TensorRT-RTX. numpy only.

Engines are not portable: a plan runs only on the compute capability (full TensorRT: the GPU model) and the exact
builder version it was built with, so a bundle keeps them under ``engines/<gpu>_sm<cc>_<builder><version>/``
(``trt`` for TensorRT, ``trtrtx`` for TensorRT-RTX; ``any`` as the GPU for a TensorRT-RTX plan built without a GPU
for a given compute capability) with an ``engines.json`` that records, per component, the plan's sha256 and size,
the sha256 of the ``model.onnx`` it was built from, the optimisation profile and the builder flags. This module
picks the folder that matches this GPU and builder, checks it, and runs plans with the same protocol as
:class:`~ldm_export.runtime.engine.OrtEngine` (``spec``, ``run(feeds)``) on device buffers and one CUDA stream.

Which TensorRT: ``tensorrt`` (full TensorRT 10+, NVIDIA's wheels or JetPack) where it imports, else
``tensorrt_rtx_bindings`` (TensorRT-RTX, from PyPI); ``LDM_EXPORT_TENSORRT=tensorrt|tensorrt-rtx`` picks one. Both
are imported lazily; the GPU is reached through the CUDA driver API (``libcuda``) with ctypes, so no CUDA toolkit,
torch, cuda-python or Polygraphy is needed to run engines (a Jetson's runtime install plus TensorRT).
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
BUILDERS = ("tensorrt", "tensorrt-rtx")
_MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx_bindings"}
_DIR_TAG = {"tensorrt": "trt", "tensorrt-rtx": "trtrtx"}
ANY_GPU = "any"  # the GPU of a TensorRT-RTX plan built without a GPU, for a compute capability

INSTALL_HINT = ("pip install 'ldm-export[tensorrt-rtx]' (TensorRT-RTX from PyPI: builds on any machine, runs on "
                "compute capability 8.0/8.6/8.9/12.x), or NVIDIA's TensorRT 10 (pip install 'ldm-export[tensorrt]' "
                "--extra-index-url https://pypi.nvidia.com; on a Jetson it comes with JetPack)")

# CUDA driver API device attributes (cuda.h, CUdevice_attribute); stable since CUDA 2.x
_CU_ATTR_CC_MAJOR = 75
_CU_ATTR_CC_MINOR = 76


def builder_of(trt) -> str:
    """"tensorrt-rtx" for the TensorRT-RTX bindings module, else "tensorrt"."""
    return "tensorrt-rtx" if getattr(trt, "__name__", "").startswith("tensorrt_rtx") else "tensorrt"


def require_tensorrt(builder: str | None = None):
    """Import and return the TensorRT module: full TensorRT where it imports, else TensorRT-RTX (or ``builder``, or
    ``LDM_EXPORT_TENSORRT``); one line saying what to install when neither is there."""
    import importlib

    builder = builder or os.environ.get("LDM_EXPORT_TENSORRT") or None
    if builder is not None and builder not in BUILDERS:
        raise LdmExportError(f"unknown TensorRT builder {builder!r} (LDM_EXPORT_TENSORRT); choose one of {', '.join(BUILDERS)}")
    errors = []
    for b in ([builder] if builder else list(BUILDERS)):
        try:
            return importlib.import_module(_MODULES[b])
        except Exception as e:  # ImportError, or OSError when the wheel is there but its libraries are not
            errors.append(f"{_MODULES[b]}: {_first_line(e)}")
    raise LdmExportError(f"TensorRT is not installed ({'; '.join(errors)}); {INSTALL_HINT}")


@dataclass(frozen=True)
class GpuInfo:
    name: str  # as the driver reports it, e.g. "NVIDIA H100 80GB HBM3"
    compute_capability: tuple[int, int]


def current_gpu(device: int = 0, hint: str | None = None) -> GpuInfo:
    """Name and compute capability of CUDA device ``device`` from the driver API, or one line saying why not and,
    ``hint``, what to do instead (default: run on the CPU)."""
    from .cuda_driver import RUN_ON_CPU, load_libcuda

    hint = hint or RUN_ON_CPU
    lib = load_libcuda(hint)

    def call(fn: str, *args) -> None:
        rc = getattr(lib, fn)(*args)
        if rc != 0:
            raise LdmExportError(f"no usable NVIDIA GPU: the CUDA driver returned error {rc} from {fn}; "
                                 f"check nvidia-smi and CUDA_VISIBLE_DEVICES, or {hint}")

    call("cuInit", 0)
    count = ctypes.c_int(0)
    call("cuDeviceGetCount", ctypes.byref(count))
    if count.value <= device:
        raise LdmExportError(f"no CUDA device {device} (the driver sees {count.value}); check CUDA_VISIBLE_DEVICES, "
                             f"or {hint}")
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


def parse_compute_capability(text: str) -> tuple[int, int]:
    """"8.6" or "86" or "sm86" -> (8, 6); one line for anything else."""
    m = re.fullmatch(r"(?:sm_?)?(\d+)\.(\d)|(?:sm_?)?(\d+)(\d)", str(text).strip().lower())
    if not m:
        raise LdmExportError(f"--compute-capability must look like 8.6 (or sm86), got {text!r}")
    a, b = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    return int(a), int(b)


@dataclass(frozen=True)
class EngineTarget:
    """What a plan is tied to: the GPU model (or ``any``), its compute capability, the builder and its version."""

    gpu_name: str
    compute_capability: tuple[int, int]
    tensorrt_version: str
    builder: str = "tensorrt"

    @property
    def dirname(self) -> str:
        """``NVIDIA_H100_80GB_HBM3_sm90_trt10.13.3.9`` or ``any_sm86_trtrtx1.7.1.116``: the engines folder."""
        major, minor = self.compute_capability
        return f"{_sanitise(self.gpu_name)}_sm{major}{minor}_{_DIR_TAG[self.builder]}{_sanitise(self.tensorrt_version)}"

    @property
    def cc(self) -> str:
        return f"{self.compute_capability[0]}.{self.compute_capability[1]}"

    def describe(self) -> str:
        gpu = "any GPU" if self.gpu_name == ANY_GPU else self.gpu_name
        return f"{self.builder} {self.tensorrt_version}, {gpu} (compute capability {self.cc})"

    def runs_here(self, here: "EngineTarget") -> bool:
        """A plan built for ``self`` loads on ``here``: same builder and version, same compute capability, and the same
        GPU model unless the plan was built for any GPU of that compute capability (TensorRT-RTX)."""
        return (self.builder == here.builder and self.tensorrt_version == here.tensorrt_version
                and self.compute_capability == here.compute_capability
                and (self.gpu_name == here.gpu_name or self.gpu_name == ANY_GPU))

    def to_json(self) -> dict:
        return {"gpu": self.gpu_name, "compute_capability": self.cc, "builder": self.builder,
                "tensorrt": self.tensorrt_version}

    @classmethod
    def from_json(cls, d: Mapping) -> "EngineTarget":
        major, minor = (int(x) for x in str(d["compute_capability"]).split("."))
        return cls(d["gpu"], (major, minor), d["tensorrt"], d.get("builder", "tensorrt"))


def current_target(trt=None, device: int = 0, compute_capability: str | tuple[int, int] | None = None,
                   building: bool = False) -> EngineTarget:
    """The target of this machine: its GPU and the installed TensorRT. With ``compute_capability`` (TensorRT-RTX only)
    no GPU is needed: the plan is built for any GPU of that compute capability. ``building``: for `ldm-export engines`,
    whose way round a missing GPU is --compute-capability, not the CPU provider of `generate`."""
    trt = trt or require_tensorrt()
    builder = builder_of(trt)
    version = str(trt.__version__)
    if compute_capability is not None:
        cc = parse_compute_capability(compute_capability) if isinstance(compute_capability, str) else tuple(compute_capability)
        if builder != "tensorrt-rtx":
            raise LdmExportError("--compute-capability needs TensorRT-RTX (pip install 'ldm-export[tensorrt-rtx]'); "
                                 "full TensorRT builds for the GPU it runs on: leave it out")
        return EngineTarget(ANY_GPU, cc, version, builder)
    hint = None
    if building:
        hint = ("build for another machine's GPU with --compute-capability (e.g. 8.6 for an RTX 30, 8.9 for an L4/RTX 40)"
                if builder == "tensorrt-rtx" else
                "run `ldm-export engines` on the GPU that will run the engines (full TensorRT builds for the GPU it runs "
                "on), or build here with TensorRT-RTX (pip install 'ldm-export[tensorrt-rtx]') and --compute-capability")
    gpu = current_gpu(device, hint)
    return EngineTarget(gpu.name, gpu.compute_capability, version, builder)


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
    if not isinstance(index, dict) or not isinstance(index.get("engines", {}), dict):
        raise LdmExportError(f"{p} is damaged (not an engines index); delete {folder} and rebuild with `ldm-export engines`")
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


def find_engines_folder(bundle_path: str | os.PathLike, here: EngineTarget) -> Path | None:
    """The engines folder whose plans load on ``here``: its own name first, else a TensorRT-RTX folder built for
    any GPU of this compute capability; None when there is none."""
    root = engines_root(bundle_path)
    names = available_targets(bundle_path)
    names.sort(key=lambda name: name != here.dirname)  # its own name first; but the index's target decides, not the
    for name in names:  # name: a folder copied or renamed from another GPU's is no match
        index = read_engines_json(root / name)
        with contextlib.suppress(KeyError, ValueError, TypeError):
            if EngineTarget.from_json(index["target"]).runs_here(here):
                return root / name
    return None


def _rebuild(bundle: Bundle, component: str | None = None, target: EngineTarget | None = None) -> str:
    cc = f" --compute-capability {target.cc}" if target is not None and target.builder == "tensorrt-rtx" and target.gpu_name == ANY_GPU else ""
    return f"rebuild with `ldm-export engines {bundle.path}" + (f" --components {component}" if component else "") + cc + "`"


def locate_plan(bundle: Bundle, component: str, target: EngineTarget) -> tuple[Path, dict]:
    """The plan for ``component`` that loads on ``target``, and its ``engines.json`` entry, checked against the bundle.

    Refuses (one line, listing what exists) a bundle with no engines for this GPU and builder, a folder without this
    component, a missing, truncated or changed plan, and a plan built from a different ``model.onnx`` than the
    bundle's."""
    bundle.spec(component)  # an unknown component fails here with the bundle's own message
    folder = find_engines_folder(bundle.path, target)
    if folder is None:
        found = available_targets(bundle.path)
        raise LdmExportError(
            f"no TensorRT engines for this GPU and builder ({target.dirname}: {target.describe()}) in "
            f"{engines_root(bundle.path)}; found: {', '.join(found) if found else 'none'}; {_rebuild(bundle)}")
    index = read_engines_json(folder)
    entry = index.get("engines", {}).get(component)
    if component not in index.get("engines", {}):
        raise LdmExportError(f"{folder} has no engine for {component} (it has: {', '.join(index.get('engines', {})) or 'none'}); "
                             f"{_rebuild(bundle, component)}")
    if not (isinstance(entry, dict) and isinstance(entry.get("file"), str) and Path(entry["file"]).name == entry["file"]
            and isinstance(entry.get("size"), int) and isinstance(entry.get("sha256"), str)):
        raise LdmExportError(f"{folder / ENGINES_JSON}: the entry for {component} is damaged (it needs file, size and "
                             f"sha256); {_rebuild(bundle, component)}")
    plan = folder / entry["file"]
    if not plan.is_file():
        raise LdmExportError(f"{plan} is missing; {_rebuild(bundle, component)}")
    size = plan.stat().st_size
    if size < entry["size"]:
        raise LdmExportError(f"{plan} is truncated ({size} of {entry['size']} bytes); {_rebuild(bundle, component)}")
    try:
        digest = sha256_file(plan) if size == entry["size"] else None
    except OSError as e:  # e.g. a plan another user wrote with mode 0600 (as `engines` did before)
        raise LdmExportError(f"cannot read {plan}: {e.strerror}; let this user read the engines folder (chmod a+r) or "
                             f"{_rebuild(bundle, component)}") from None
    if digest != entry["sha256"]:
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
                                         "the TensorRT engine was built for (the model's profile); use sizes within it, "
                                         "or ONNX Runtime (--provider cpu or cuda) for this size")


def _first_line(e: BaseException | str) -> str:
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


def trt_logger(trt):
    """A TensorRT ILogger that sends TensorRT's messages to logging (errors kept, for one-line messages)."""

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            S = trt.ILogger.Severity
            if severity in (S.INTERNAL_ERROR, S.ERROR):
                self.errors.append(msg)
                log.debug("TensorRT: %s", msg)
            elif severity == S.WARNING:
                log.debug("TensorRT: %s", msg)
            elif severity == S.INFO:
                log.debug("TensorRT: %s", msg)

    return Logger()


_DIAGNOSTICS = {1: "built by another TensorRT version", 2: "built for another compute capability",
                4: "the CUDA driver is too old", 8: "the CUDA runtime is too old", 16: "not enough GPU memory",
                32: "not a complete engine file (truncated or damaged)", 64: "a CUDA error while checking it"}


def check_plan_header(trt, runtime, data: bytes | memoryview, path: Path) -> None:
    """Refuse a plan this runtime says cannot load, before deserialising it (TensorRT-RTX's ``get_engine_validity``
    reads the header: version, compute capability, completeness); a no-op where the API is missing."""
    if not hasattr(runtime, "get_engine_validity"):
        return
    size = int(getattr(runtime, "engine_header_size", 0) or 0)
    validity, diagnostics = runtime.get_engine_validity(bytes(data[:size]) if size else bytes(data))
    if validity == trt.EngineValidity.INVALID:
        reasons = [why for bit, why in _DIAGNOSTICS.items() if int(diagnostics) & bit] or ["it cannot load here"]
        raise LdmExportError(f"cannot load the TensorRT engine {path}: {'; '.join(reasons)}; "
                             "rebuild it with `ldm-export engines BUNDLE` for this GPU")


class TensorRTEngine:
    """One component's TensorRT plan behind the engine protocol, inputs checked against its spec and profile.

    Runs on TensorRT's execution context directly (``set_input_shape`` / ``set_tensor_address`` /
    ``execute_async_v3``) with device buffers kept between calls (reallocated only when a shape grows) and one
    CUDA stream. Static shapes run as a CUDA graph: full TensorRT's enqueue is captured once after a first run and
    replayed; TensorRT-RTX captures its own (``IRuntimeConfig.cuda_graph_strategy``), and its JIT-compiled kernels
    are kept in a runtime cache file beside the plan, so later loads skip the compilation.
    """

    def __init__(self, plan_path: str | os.PathLike, spec: ComponentSpec, expected_sha256: str | None = None,
                 runtime_cache: str | os.PathLike | None = None, cuda_graph: bool | None = None, trt=None):
        self.path = Path(plan_path)
        self.spec = spec
        self._bufs: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)
        self._graph = None
        if not self.path.is_file():
            raise LdmExportError(f"no TensorRT engine at {self.path}; build it with `ldm-export engines BUNDLE`")
        trt = trt or require_tensorrt()
        self.trt = trt
        current_gpu()  # one line when there is no GPU, before TensorRT's own multi-line CUDA errors
        from .cuda_driver import CudaDriver

        data = self.path.read_bytes()
        if expected_sha256 is not None:
            import hashlib
            if hashlib.sha256(data).hexdigest() != expected_sha256:
                raise LdmExportError(f"{self.path}: sha256 mismatch; rebuild with `ldm-export engines BUNDLE`")
        self.cuda = CudaDriver()
        self._logger = trt_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        check_plan_header(trt, self._runtime, data, self.path)
        self.engine = self._runtime.deserialize_cuda_engine(data)
        del data
        if self.engine is None:
            why = _first_line(self._logger.errors[-1]) if self._logger.errors else "TensorRT could not deserialize it"
            self.close()
            raise LdmExportError(f"cannot load the TensorRT engine {self.path}: {why}; it was built for another GPU or "
                                 "TensorRT, or is damaged: rebuild with `ldm-export engines BUNDLE`")
        self.static = spec.is_static
        self.rtx = builder_of(trt) == "tensorrt-rtx"
        self._cache_path = Path(runtime_cache) if runtime_cache else None
        self._cache = None
        if self.rtx:
            config = self.engine.create_runtime_config()
            if self._cache_path is not None:
                self._cache = config.create_runtime_cache()
                if self._cache_path.is_file():
                    self._cache.deserialize(self._cache_path.read_bytes())
                config.set_runtime_cache(self._cache)
            if cuda_graph if cuda_graph is not None else self.static:
                config.cuda_graph_strategy = trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
            self.context = self.engine.create_execution_context(runtime_config=config)
        else:
            self.context = self.engine.create_execution_context()
        self._own_graph = (not self.rtx) and (cuda_graph if cuda_graph is not None else self.static)
        io = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in io if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in io if n not in self.inputs]
        if set(self.inputs) != set(spec.input_names) or not set(spec.output_names) <= set(self.outputs):
            self.close()
            raise LdmExportError(f"{self.path}: the engine's inputs/outputs {sorted(self.inputs)}/{sorted(self.outputs)} differ "
                                 f"from the bundle's {spec.input_names}/{spec.output_names}; rebuild with `ldm-export engines BUNDLE`")
        self._dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in io}
        self._shapes: dict[str, tuple[int, ...]] = {}
        log.info("%s: TensorRT engine %s loaded (%s)", spec.name, self.path, builder_of(trt))

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self._bufs.get(name, (0, 0))
        if nbytes > size:
            self.cuda.free(ptr)
            ptr = self.cuda.alloc(nbytes)
            self._bufs[name] = (ptr, nbytes)
            self._drop_graph()  # addresses changed
        return ptr

    def _drop_graph(self) -> None:
        if self._graph is not None:
            self.cuda.destroy_graph(self._graph)
            self._graph = None

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.spec.check_feeds(feeds)
        check_profile_bounds(self.spec, feeds)
        shapes_changed = False
        for name in self.inputs:
            a = np.ascontiguousarray(feeds[name], dtype=self._dtypes[name])
            if self._shapes.get(name) != a.shape:
                if not self.context.set_input_shape(name, a.shape):
                    raise LdmExportError(f"{self.spec.name}.{name}: shape {a.shape} is outside the engine's profile; "
                                         "rebuild the engines for it")
                self._shapes[name] = a.shape
                shapes_changed = True
            ptr = self._buffer(name, a.nbytes)
            self.context.set_tensor_address(name, ptr)
            self.cuda.to_device(ptr, a)
        results = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            results[name] = np.empty(shape, dtype=self._dtypes[name])
            self.context.set_tensor_address(name, self._buffer(name, results[name].nbytes))
        if shapes_changed:
            self._drop_graph()
        if self._own_graph and self._graph is None and getattr(self, "_warm", False):
            self._graph = self.cuda.capture(lambda: self._enqueue())
        if self._graph is not None:
            self.cuda.launch(self._graph)
        else:
            self._enqueue()
            self._warm = True
        for name in self.outputs:
            self.cuda.to_host(results[name], self._bufs[name][0])
        self.cuda.synchronize()
        return {n: results[n] for n in self.spec.output_names}

    def _enqueue(self) -> None:
        if not self.context.execute_async_v3(self.cuda.stream.value or 0):
            why = _first_line(self._logger.errors[-1]) if self._logger.errors else "execute_async_v3 returned false"
            raise LdmExportError(f"{self.spec.name}: TensorRT inference failed: {why}")

    def save_runtime_cache(self) -> None:
        """Write TensorRT-RTX's runtime cache (JIT-compiled kernels) beside the plan, atomically."""
        if self._cache is None or self._cache_path is None:
            return
        data = self._cache.serialize()
        tmp = self._cache_path.with_name(f".{self._cache_path.name}.{os.getpid()}.tmp")
        with contextlib.suppress(OSError):
            tmp.write_bytes(memoryview(data))
            os.replace(tmp, self._cache_path)

    def close(self) -> None:
        if getattr(self, "cuda", None) is None:
            return
        with contextlib.suppress(Exception):
            self.save_runtime_cache()
        self._drop_graph()
        for ptr, _ in self._bufs.values():
            self.cuda.free(ptr)
        self._bufs = {}
        self.context = self.engine = None
        self.cuda.close()
        self.cuda = None

    def __enter__(self) -> "TensorRTEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def load_tensorrt_engine(bundle: Bundle, component: str, target: EngineTarget | None = None) -> TensorRTEngine:
    """The native TensorRT engine for ``component``, from the engines folder matching this GPU and builder."""
    target = target or current_target()
    plan, entry = locate_plan(bundle, component, target)  # checks the plan's size and sha256 already
    cache = plan.with_name(f"{component}.runtime.cache") if target.builder == "tensorrt-rtx" else None
    return TensorRTEngine(plan, bundle.spec(component), runtime_cache=cache)
