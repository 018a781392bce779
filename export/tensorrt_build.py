"""Build TensorRT engines from a bundle's ONNX graphs into ``engines/<target>/``: with full TensorRT through
Polygraphy's loaders where it is installed, else with TensorRT-RTX's builder and ONNX parser (TensorRT's Python API;
it builds on a machine without a GPU when told the target compute capability).

One optimisation profile per component, read from its :class:`ComponentSpec` (every input's min/opt/max shape;
a static bundle gives min = opt = max). Precision follows the bundle: the network is created strongly typed
(``NetworkFromOnnxPath(path, strongly_typed=True)``, i.e. ``trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED``),
so TensorRT keeps the graph's own types: an fp32 bundle builds an fp32 engine, an fp16 bundle an fp16 engine with
the fp16 policy's fp32 islands (norm statistics, the VAE's last up-blocks) kept in fp32. TensorRT 10 deprecated
weak typing in 10.12 and TensorRT 11 removed the precision builder flags; ``precision="fp16"`` still offers
TensorRT 10's weakly typed ``BuilderFlag.FP16`` (``CreateConfig(fp16=True)``), where TensorRT picks fp16 kernels
wherever they are faster, ignoring the fp32 policy, and refuses it on TensorRT 11 and later.

Each plan is written to a temporary file and renamed into place; ``engines.json`` (rewritten the same way after
each component) records the target, the profile, the flags, the plan's sha256 and the sha256 of the
``model.onnx`` it was built from. The bundle's ``ldm_export.json`` is never touched (see docs/tensorrt.md).

int8: a graph holding QuantizeLinear/DequantizeLinear (explicit quantisation, as ``calibration`` writes) builds as
is: the strongly typed network takes its precision from the Q/DQ nodes, so no calibrator or INT8 flag is involved.
TensorRT-RTX keeps no timing cache (its timing cache calls are no-ops); its runtime cache of JIT-compiled kernels is
written beside each plan at run time instead (``runtime/engine_tensorrt.py``).
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from ldm_export.runtime.bundle import Bundle, sha256_file
from ldm_export.runtime.engine_tensorrt import (
    ANY_GPU, ENGINES_FORMAT, ENGINES_FORMAT_VERSION, ENGINES_JSON, EngineTarget, _first_line, current_target,
    engines_root, polygraphy_logging, read_engines_json, require_tensorrt, trt_logger,
)
from ldm_export.runtime.errors import LdmExportError
from ldm_export.runtime.spec import ComponentSpec

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp16")
Shape = tuple[int, ...]


@dataclass(frozen=True)
class EngineOptions:
    """How to build: ``precision`` "auto" (strongly typed, the graph's types) or "fp16" (TensorRT 10's FP16 flag);
    ``optimization_level`` is TensorRT's builder optimisation level (0-5, 3 is TensorRT's default);
    ``workspace_gb`` caps the builder's workspace pool (None: TensorRT's default, the GPU's memory);
    ``timing_cache`` is the tactic timing cache to read and extend (None: ``timing.cache`` in the engines folder);
    ``compute_capability`` ("8.6") builds TensorRT-RTX plans for that GPU generation without a GPU here;
    ``refit`` builds refittable engines (weights replaceable without a rebuild)."""

    precision: str = "auto"
    optimization_level: int = 3
    workspace_gb: float | None = None
    timing_cache: Path | None = None
    compute_capability: str | None = None
    refit: bool = False

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise LdmExportError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not 0 <= self.optimization_level <= 5:
            raise LdmExportError(f"the builder optimisation level must be 0 to 5, got {self.optimization_level}")
        if self.workspace_gb is not None and not 0 < self.workspace_gb < float("inf"):
            raise LdmExportError(f"--workspace must be a positive number of GB, got {self.workspace_gb}")
        if self.workspace_gb is not None and self.workspace_gb * (1 << 30) >= 1 << 63:  # TensorRT's limit is a size_t
            raise LdmExportError(f"--workspace is a number of GB (e.g. 8); {self.workspace_gb:g} GB is more than TensorRT "
                                 "can take")


@dataclass(frozen=True)
class EngineRecipe:
    """Everything one engine build reads, decided before TensorRT is touched (and recorded in engines.json)."""

    component: str
    onnx_path: Path
    bundle_precision: str
    profile: dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max) shape
    strongly_typed: bool
    fp16: bool
    optimization_level: int
    workspace_bytes: int | None
    timing_cache: Path | None  # None: TensorRT-RTX, which keeps none
    notes: tuple[str, ...] = field(default=())
    quantization: str | None = None  # "int8 QDQ" when the graph holds Q/DQ nodes
    refit: bool = False
    builder: str = "tensorrt"

    def to_json(self) -> dict[str, Any]:
        return {"bundle_precision": self.bundle_precision, "quantization": self.quantization,
                "network": "strongly-typed" if self.strongly_typed else "weakly-typed",
                "builder_flags": (["FP16"] if self.fp16 else []) + (["REFIT"] if self.refit else []),
                "builder_optimization_level": self.optimization_level, "workspace_bytes": self.workspace_bytes,
                "profile": {k: {"min": list(a), "opt": list(b), "max": list(c)} for k, (a, b, c) in self.profile.items()}}


def profile_shapes(spec: ComponentSpec) -> dict[str, tuple[Shape, Shape, Shape]]:
    """Every input's (min, opt, max) shape from the spec's profile; fixed dims (and static bundles) give min=opt=max."""
    return {t.name: tuple(spec.concrete_shape(t, which=w) for w in ("min", "opt", "max")) for t in spec.inputs}


def graph_facts(onnx_path: Path) -> dict[str, Any]:
    """What the builder needs to know of a graph before TensorRT sees it: ops outside the ONNX domain (ONNX Runtime
    contrib ops, which TensorRT's parser cannot read) and Q/DQ nodes (explicit quantisation). Without the ``onnx``
    package (a device's runtime install plus TensorRT) nothing is known ahead: TensorRT's parser then names a contrib
    op itself, and the quantisation is taken from the manifest."""
    try:
        import onnx
    except ImportError:
        return {"contrib_ops": [], "qdq_nodes": None}
    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends: a damaged or cut-short file
        raise LdmExportError(f"{onnx_path} is not a readable ONNX graph ({_first_line(e)}); the bundle is damaged: "
                             "check it with `ldm-export inspect BUNDLE` and rebuild it") from None
    contrib = sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    return {"contrib_ops": contrib, "qdq_nodes": len(qdq)}


def engine_recipe(bundle: Bundle, component: str, options: EngineOptions, timing_cache: Path | None,
                  builder: str = "tensorrt") -> EngineRecipe:
    """The build of one component from its spec, the manifest's precision and the graph itself."""
    spec = bundle.spec(component)
    precision = bundle.precision(component)
    facts = graph_facts(bundle.model_path(component))
    if facts["contrib_ops"]:
        raise LdmExportError(f"{component}: the graph holds ONNX Runtime contrib ops TensorRT cannot parse "
                             f"({', '.join(facts['contrib_ops'])}; the bundle was built with --target "
                             f"{bundle.manifest.get('target', 'cuda')}"
                             f"{' --fused-attention' if bundle.manifest.get('fused_attention') else ''}); "
                             "rebuild the bundle with --target tensorrt")
    int8 = bundle.manifest.get("int8")
    quantisation = int8.get("quantisation") if isinstance(int8, dict) else None  # a damaged section: the graph decides
    int8_format = quantisation.get("format") if isinstance(quantisation, dict) else None
    if precision == "int8" and int8_format == "onnxruntime":
        raise LdmExportError(f"{component}: the int8 graph is in the onnxruntime QDQ format (int32 biases, asymmetric u8 "
                             "activations for ONNX Runtime's CPU kernels), which TensorRT's parser refuses; quantise for "
                             "TensorRT with `ldm-export quantize FP32_BUNDLE --out DIR --int8-format tensorrt`")
    if options.precision == "fp16" and builder == "tensorrt-rtx":
        raise LdmExportError("--precision fp16 (TensorRT 10's weakly typed FP16 flag) does not exist in TensorRT-RTX, whose "
                             "networks are strongly typed: build an fp16 bundle (ldm-export build --precision fp16) and use "
                             "--precision auto")
    missing = [d for t in spec.inputs for d in t.shape if isinstance(d, str) and d not in spec.profile]
    if missing:
        raise LdmExportError(f"{component}: the bundle's spec has no min/opt/max for {sorted(set(missing))}; rebuild the bundle")
    notes = []
    if options.precision == "fp16" and precision == "fp16":
        notes.append("the FP16 flag lets TensorRT run the fp16 policy's fp32 islands in fp16")
    workspace = None if options.workspace_gb is None else int(options.workspace_gb * (1 << 30))
    if facts["qdq_nodes"] and options.precision == "fp16":
        notes.append("a Q/DQ (int8) graph with the FP16 flag: TensorRT may run the unquantised layers in fp16")
    return EngineRecipe(component, bundle.model_path(component), precision, profile_shapes(spec),
                        strongly_typed=options.precision == "auto", fp16=options.precision == "fp16",
                        optimization_level=options.optimization_level, workspace_bytes=workspace,
                        timing_cache=None if timing_cache is None else Path(timing_cache), notes=tuple(notes),
                        quantization=(f"int8 QDQ ({facts['qdq_nodes']} Q/DQ nodes)" if facts["qdq_nodes"] else
                                      "int8 QDQ (per the manifest)" if facts["qdq_nodes"] is None and precision == "int8"
                                      else None),
                        refit=options.refit, builder=builder)


class RtxEngineBytes:
    """TensorRT-RTX's build of one engine, lazy like Polygraphy's loaders: calling it parses the ONNX file, builds
    for ``target``'s compute capability (``IBuilderConfig.set_compute_capability``; ``CURRENT`` when built on the GPU
    that runs it) with the recipe's profile, workspace limit and flags, and returns the serialized plan."""

    def __init__(self, recipe: EngineRecipe, target: EngineTarget, trt=None):
        self.recipe, self.target, self._trt = recipe, target, trt

    def config(self, trt, builder, network):
        r = self.recipe
        config = builder.create_builder_config()
        config.num_compute_capabilities = 1
        if self.target.gpu_name == ANY_GPU:
            name = "SM%d%d" % self.target.compute_capability
            cc = getattr(trt.ComputeCapability, name, None)
            if cc is None:
                known = [k[2:-1] + "." + k[-1] for k in trt.ComputeCapability.__members__ if k.startswith("SM")]
                raise LdmExportError(f"TensorRT-RTX {trt.__version__} cannot build for compute capability {self.target.cc}; "
                                     f"it builds for {', '.join(known)}")
        else:
            cc = trt.ComputeCapability.CURRENT
        config.set_compute_capability(cc, 0)
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in r.profile.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
        config.builder_optimization_level = r.optimization_level
        if r.workspace_bytes is not None:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, r.workspace_bytes)
        if r.refit:
            config.set_flag(trt.BuilderFlag.REFIT)
        return config

    def __call__(self):
        trt = self._trt or require_tensorrt("tensorrt-rtx")
        r = self.recipe
        logger = trt_logger(trt)
        builder = trt.Builder(logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(r.onnx_path)):
            errs = [parser.get_error(i).desc() for i in range(parser.num_errors)] or logger.errors
            raise LdmExportError(f"{r.component}: TensorRT-RTX's ONNX parser rejected {r.onnx_path.name}: "
                                 f"{_first_line(errs[0]) if errs else 'no reason given'}; run with -v for TensorRT's log")
        config = self.config(trt, builder, network)
        with interrupts_held() as interrupted, _native_stderr_to_log():
            if hasattr(trt, "IProgressMonitor"):
                config.progress_monitor = _cancelling_monitor(trt, interrupted)  # Ctrl-C ends the build at its next step
            plan = builder.build_serialized_network(network, config)
        if plan is None:
            why = _first_line(logger.errors[-1]) if logger.errors else "no reason given"
            hint = ("; TensorRT-RTX compiles refittable engines on the GPU: build with --refit on a machine with the GPU, "
                    "or without --refit") if r.refit and self.target.gpu_name == ANY_GPU else "; run with -v for TensorRT's log"
            raise LdmExportError(f"{r.component}: TensorRT-RTX could not build the engine: {why}{hint}")
        return plan


@contextlib.contextmanager
def interrupts_held() -> Iterator[threading.Event]:
    """Record Ctrl-C (SIGINT) or SIGTERM while TensorRT builds and raise KeyboardInterrupt once the build call returns.

    TensorRT calls our logger (and progress monitor) from native code; a KeyboardInterrupt raised inside such a
    callback is swallowed there, so the build went on and the interrupt was lost. The yielded event is set on SIGINT
    (for a progress monitor to cancel the build); outside the main thread nothing is changed."""
    interrupted = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield interrupted
        return
    def on_sigint(signum, frame):
        if not interrupted.is_set():
            interrupted.set()
            print("interrupt: stopping the engine build (the engines already written stay)", file=sys.stderr, flush=True)

    old = signal.signal(signal.SIGINT, on_sigint)
    old_term = signal.signal(signal.SIGTERM, on_sigint)  # `kill`, a job scheduler: the same clean stop as Ctrl-C
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, old)
        signal.signal(signal.SIGTERM, old_term)
    if interrupted.is_set():
        raise KeyboardInterrupt


def _cancelling_monitor(trt, interrupted: threading.Event):
    """A TensorRT progress monitor that cancels the build (``step_complete`` returns False) once ``interrupted``."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps):
            pass

        def step_complete(self, phase_name, step):
            return not interrupted.is_set()

        def phase_finish(self, phase_name):
            pass

    return Monitor()


@contextlib.contextmanager
def _native_stderr_to_log() -> Iterator[None]:
    """TensorRT-RTX's compiler prints some failures straight to the process's stderr (file descriptor 2), past its
    logger: catch them in a temporary file and log them (debug), so the CLI's error stays one line."""
    import sys

    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # no real stderr (e.g. captured): nothing to redirect
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), fd)
        try:
            yield
        finally:
            os.dup2(saved, fd)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode(errors="replace").strip()
            if text:
                log.debug("TensorRT-RTX (stderr): %s", text)


def engine_loader(recipe: EngineRecipe, trt=None, target: EngineTarget | None = None):
    """The lazy build of one engine: calling it returns the serialized plan. Full TensorRT: Polygraphy's loader chain
    (parse, build, extend the timing cache); constructing it needs no TensorRT unless a workspace limit names its pool
    enum. TensorRT-RTX: :class:`RtxEngineBytes`."""
    if recipe.builder == "tensorrt-rtx":
        if target is None:
            raise ValueError("a TensorRT-RTX build needs its target (the compute capability)")
        return RtxEngineBytes(recipe, target, trt)
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile

    profile = Profile()
    for name, (lo, opt, hi) in recipe.profile.items():
        profile.add(name, min=lo, opt=opt, max=hi)
    pools = None
    if recipe.workspace_bytes is not None:
        trt = trt or require_tensorrt()
        pools = {trt.MemoryPoolType.WORKSPACE: recipe.workspace_bytes}
    with polygraphy_logging():  # CreateConfig logs a TF32 note at construction
        config = CreateConfig(fp16=recipe.fp16, profiles=[profile], builder_optimization_level=recipe.optimization_level,
                              memory_pool_limits=pools, load_timing_cache=str(recipe.timing_cache),
                              **({"refittable": True} if recipe.refit else {}))
    network = NetworkFromOnnxPath(str(recipe.onnx_path), strongly_typed=recipe.strongly_typed)
    return EngineBytesFromNetwork(network, config=config, save_timing_cache=str(recipe.timing_cache))


def atomic_write_bytes(path: Path, data) -> None:
    """Write ``data`` (bytes or any buffer, e.g. TensorRT's IHostMemory) to a temp file beside ``path``, fsync,
    and rename it over ``path``: readers see the old file or the new one, never a part."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide the plans from the user that serves them
        with os.fdopen(fd, "wb") as f:
            f.write(memoryview(data))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """One builder per engines folder at a time (two would race on engines.json); POSIX only, no-op elsewhere."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(folder / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LdmExportError(f"another `ldm-export engines` is building into {folder}; wait for it to finish") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _removed_if_unused(folders: Sequence[Path]) -> Iterator[None]:
    """On failure, remove the folders this build created (innermost first) where they hold nothing but the builders'
    lock: a build refused or stopped before its first plan leaves no empty engines folder behind."""
    try:
        yield
    except BaseException:
        for f in reversed(folders):
            with contextlib.suppress(OSError, LdmExportError):  # LdmExportError: another builder holds it; it stays
                if {p.name for p in f.iterdir()} <= {".lock"}:
                    if (f / ".lock").exists():
                        with _folder_lock(f):
                            (f / ".lock").unlink()
                    f.rmdir()
        raise


def _serialize(loader) -> Any:
    if isinstance(loader, RtxEngineBytes):
        return loader()
    with polygraphy_logging():
        return loader()


def build_engines(bundle_path: str | os.PathLike, components: Sequence[str] | None = None,
                  options: EngineOptions = EngineOptions(),
                  progress: Callable[[str, str, str], None] | None = None,
                  target: EngineTarget | None = None,
                  serialize: Callable[[Any], Any] | None = None, trt=None) -> dict[str, Any]:
    """Build one plan per component into ``BUNDLE/engines/<target.dirname>/`` and return that folder's engines.json.

    ``target`` defaults to this machine (its GPU and TensorRT; with ``options.compute_capability`` and TensorRT-RTX,
    any GPU of that compute capability); ``serialize`` runs a loader and returns the plan (default: the loader's own
    builder). Both are parameters so that the folder, index and atomicity logic is testable without TensorRT."""
    bundle = Bundle.open(bundle_path)
    comps = list(dict.fromkeys(components)) if components else bundle.components  # a name given twice builds once
    unknown = [c for c in comps if c not in bundle.components]
    if unknown:
        raise LdmExportError(f"bundle {bundle.path} has no component {unknown[0]!r}; it has: {', '.join(bundle.components)}")
    if (target is None or serialize is None) and trt is None:
        trt = require_tensorrt()
    if target is None:
        target = current_target(trt, compute_capability=options.compute_capability, building=True)
    serialize = serialize or _serialize
    if options.precision == "fp16" and target.builder == "tensorrt" and int(target.tensorrt_version.split(".")[0]) >= 11:
        raise LdmExportError(f"TensorRT {target.tensorrt_version} has no FP16 builder flag (weak typing was removed in 11); "
                             "build an fp16 bundle with `ldm-export build --precision fp16` and use --precision auto")
    progress = progress or (lambda component, stage, detail: None)

    folder = engines_root(bundle.path) / target.dirname
    rtx = target.builder == "tensorrt-rtx"
    timing_cache = None if rtx else Path(options.timing_cache) if options.timing_cache else folder / "timing.cache"
    if timing_cache is not None and timing_cache.exists() and not timing_cache.is_file():
        raise LdmExportError(f"--timing-cache {timing_cache} is a folder; give the cache file's path (e.g. "
                             f"{timing_cache / 'timing.cache'}), which is made if missing")
    if rtx and options.timing_cache:
        log.warning("TensorRT-RTX keeps no timing cache (its timing cache calls are no-ops): --timing-cache is ignored; "
                    "its runtime cache of JIT-compiled kernels is written beside each plan when the engine runs")
    recipes = [engine_recipe(bundle, c, options, timing_cache, target.builder) for c in comps]  # fail before any build
    created = [p for p in (folder.parent, folder) if not p.exists()]  # removed again if no engine lands in them
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if timing_cache is not None:
            timing_cache.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LdmExportError(f"cannot create {folder}: {e.strerror}; is the bundle writable?") from None

    try:
        from polygraphy.exception import PolygraphyException
    except ImportError:  # a TensorRT-RTX-only install (the edge path) has no Polygraphy
        PolygraphyException = LdmExportError  # noqa: N806

    with _removed_if_unused(created), _folder_lock(folder):
        index = read_engines_json(folder) or {"format": ENGINES_FORMAT, "format_version": ENGINES_FORMAT_VERSION,
                                              "target": target.to_json(), "engines": {}}
        for r in recipes:
            for note in r.notes:
                log.warning("%s: %s", r.component, note)
            progress(r.component, "building", f"({'strongly typed' if r.strongly_typed else 'FP16 flag'}, "
                                              f"{r.bundle_precision} graph{', ' + r.quantization if r.quantization else ''})")
            t0 = time.perf_counter()
            try:
                with interrupts_held():  # full TensorRT through Polygraphy: Ctrl-C is raised once the build returns
                    plan = serialize(engine_loader(r, trt, target))
            except KeyboardInterrupt:
                kept = ", ".join(index["engines"])
                raise LdmExportError(f"interrupted while building {r.component}; " + (
                    f"{folder} keeps the engines it had: {kept}" if kept else "no engine was written"),
                    exit_code=130) from None
            except PolygraphyException as e:
                if isinstance(e, LdmExportError):
                    raise
                raise LdmExportError(f"{r.component}: TensorRT could not build the engine: {_first_line(e)}; "
                                     "run with -v to see TensorRT's log") from None
            seconds = time.perf_counter() - t0
            plan_path = folder / f"{r.component}.plan"
            try:
                atomic_write_bytes(plan_path, plan)
                onnx_rel = bundle.manifest["components"][r.component]["files"][0]
                index["engines"][r.component] = {
                    "file": plan_path.name, "size": plan_path.stat().st_size, "sha256": sha256_file(plan_path),
                    "onnx": onnx_rel, "onnx_sha256": bundle.manifest["files"][onnx_rel]["sha256"],
                    **r.to_json(), "timing_cache": None if timing_cache is None else str(timing_cache),
                    "build_seconds": round(seconds, 2),
                    "built": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "tools": _tool_versions(),
                }
                atomic_write_json(folder / ENGINES_JSON, index)
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise LdmExportError(f"disk full while writing {plan_path}; free space and rerun "
                                         "(engines already written are kept)") from None
                raise LdmExportError(f"cannot write {plan_path}: {e.strerror}") from None
            progress(r.component, "done", f"{plan_path.stat().st_size / 2**20:.1f} MB in {seconds:.1f} s")
    return index


def _tool_versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for dist in ("ldm-export", "polygraphy", "tensorrt", "tensorrt-rtx-cu13-libs"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    return out


def engines_summary(index: Mapping[str, Any], manifest: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Rows for the CLI's summary table, one per component; with the bundle's ``manifest``, ``stale`` says whether the
    plan was built from another ``model.onnx`` than the bundle's (the runtime refuses it)."""
    rows = []
    for comp, e in index.get("engines", {}).items():
        prof = ", ".join(f"{k} {'x'.join(map(str, v['min']))}..{'x'.join(map(str, v['max']))}"
                         for k, v in e["profile"].items() if v["min"] != v["max"])
        onnx = (manifest or {}).get("files", {}).get(e.get("onnx"), {}).get("sha256")
        rows.append({"component": comp, "file": e["file"], "size": e["size"], "network": e["network"],
                     "flags": ",".join(e["builder_flags"]) or "-", "dynamic": prof or "static",
                     "seconds": e["build_seconds"], "stale": manifest is not None and e.get("onnx_sha256") != onnx})
    return rows
