"""ONNX Runtime CUDA engine: IOBinding on device-resident buffers, CUDA graphs for static shapes. numpy only.

Same protocol as :class:`~ldm_export.runtime.engine.OrtEngine` (``run(feeds) -> dict``), plus
:meth:`CudaEngine.run_partial`, the sampler loop's path: inputs that do not change between steps (the text
embeddings) stay on the device, and only the ones given (latents, timestep: 64 KB) are copied in place.
A static engine has up to :data:`MAX_SLOTS` slots, each its own set of device buffers and its own CUDA graph
(ONNX Runtime's ``gpu_graph_id``): a batch-1 engine that runs CFG as two calls (``--sequential-cfg``) keeps the
negative's embeddings in slot 0 and the prompt's in slot 1, so each step copies only the latents and timestep.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Mapping

import numpy as np

from .errors import LdmExportError, all_finite, load_error, overflow_message
from .spec import ComponentSpec

log = logging.getLogger(__name__)

CONV_ALGO_SEARCH = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")
MAX_SLOTS = 8  # device input sets (and CUDA graphs) a static engine keeps: CFG's two halves of up to 4 images


class _Slot:
    """One set of device buffers bound to one IOBinding; ``run_options`` name the CUDA graph it replays (slot k:
    ``gpu_graph_id`` k; slot 0: ONNX Runtime's default graph, set by no run option)."""

    def __init__(self, session, run_options):
        self.binding = session.io_binding()
        self.inputs: dict[str, object] = {}
        self.outputs: dict[str, object] = {}
        self.run_options = run_options
        self.written: set[str] = set()  # inputs copied in at least once
        self.ran = False


def cuda_available() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


# set by the engine's own arguments; provider_options may not change them behind its back
_OWN_OPTIONS = ("device_id", "enable_cuda_graph", "prefer_nhwc", "cudnn_conv_algo_search")


def _about_capture(e: Exception) -> bool:
    """ONNX Runtime's refusals of a CUDA graph ("cannot use the graph capture feature", "operation not permitted
    when stream is capturing"): other failures (out of memory, a bad model) are not retried without the graph."""
    msg = str(e.__cause__ or e).lower()  # ONNX Runtime's own message, not ours around it (paths may say "graph")
    return "graph" in msg or "captur" in msg


class CudaEngine:
    """One component on ONNX Runtime's CUDA provider, inputs and outputs bound to preallocated device buffers.

    ``cuda_graph`` (static-shape bundles only) captures the whole graph on the first run and replays it after;
    ``conv_algo_search`` is cuDNN's convolution algorithm search (EXHAUSTIVE: slower first run, fastest kernels);
    ``prefer_nhwc`` lets ONNX Runtime run convolutions channels-last (fewer layout transposes around the NHWC
    GroupNorm kernels); ``check_finite`` raises, naming the component, when an output holds NaN or Inf;
    ``provider_options`` adds or overrides CUDA provider options (e.g. ``{"sdpa_kernel": "8"}``: cuDNN attention);
    ``graph_fallback``: where ONNX Runtime refuses to capture the graph (nodes it keeps on the CPU, or a kernel that
    cannot be captured), run without a CUDA graph instead of failing, with a warning. ``precision`` (the bundle's
    for this graph) picks the fix a NaN/Inf refusal names.
    """

    def __init__(self, model_path: str | os.PathLike, spec: ComponentSpec, device_id: int = 0,
                 cuda_graph: bool | None = None, conv_algo_search: str = "EXHAUSTIVE", prefer_nhwc: bool = False,
                 check_finite: bool | None = None, session_options=None, profile_prefix: str | None = None,
                 provider_options: Mapping[str, str] | None = None, graph_fallback: bool = False,
                 precision: str | None = None):
        import onnxruntime as ort

        own = sorted(set(provider_options or {}) & set(_OWN_OPTIONS))
        if own:
            raise LdmExportError(f"provider option(s) {own} are set by CudaEngine's own arguments (device_id, cuda_graph, "
                                 "prefer_nhwc, conv_algo_search); pass those instead")
        if not cuda_available():
            raise LdmExportError("onnxruntime has no CUDA provider: install onnxruntime-gpu (in place of onnxruntime), "
                                 "or run on the CPU with --provider cpu")
        if conv_algo_search not in CONV_ALGO_SEARCH:
            raise LdmExportError(f"conv_algo_search must be one of {', '.join(CONV_ALGO_SEARCH)}, got {conv_algo_search!r}")
        self.spec = spec
        self.path = Path(model_path)
        self.device_id = device_id
        self.static = spec.is_static
        if cuda_graph and not self.static:
            raise LdmExportError(f"{spec.name}: CUDA graphs need a static-shape bundle; rebuild with --static-shape "
                                 "or pass cuda_graph=False")
        self.cuda_graph = self.static if cuda_graph is None else bool(cuda_graph)
        self.graph_fallback = graph_fallback
        self.check_finite = (spec.name == "vae_decoder") if check_finite is None else check_finite
        self.precision = precision  # the bundle's for this graph: which fix a NaN/Inf refusal names
        self._options = {"device_id": str(device_id), "cudnn_conv_algo_search": conv_algo_search,
                         "cudnn_conv_use_max_workspace": "1", "do_copy_in_default_stream": "1",
                         "prefer_nhwc": "1" if prefer_nhwc else "0",
                         **{k: str(v) for k, v in (provider_options or {}).items()}}
        so = session_options or ort.SessionOptions()
        so.log_severity_level = 3
        if profile_prefix:
            so.enable_profiling = True
            so.profile_file_prefix = profile_prefix
        self._session_options = so
        try:
            self.session = self._open()
        except LdmExportError as e:
            if not (self.cuda_graph and graph_fallback and _about_capture(e)):
                raise
            self._no_graph(e)
            self.session = self._open()
        spec.check_graph(self.session, self.path)
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._dtypes = {t.name: np.dtype(t.dtype) for t in spec.inputs}
        self.max_slots = MAX_SLOTS if self.static else 1
        self._slots: list[_Slot] = []
        self._slot(0)  # dynamic engines bind per call on slot 0; static ones get their buffers now

    @property
    def _ran(self) -> bool:
        return any(s.ran for s in self._slots)

    def _slot(self, index: int) -> _Slot:
        """Slot ``index``, made (buffers allocated and bound) on first use."""
        import onnxruntime as ort

        if not 0 <= index < self.max_slots:
            raise LdmExportError(f"{self.spec.name}: slot {index} out of range: this engine keeps {self.max_slots} "
                                 "input set(s) on the device")
        while len(self._slots) <= index:
            k = len(self._slots)
            options = ort.RunOptions()
            if k:  # each slot replays its own CUDA graph; 0 is the default one
                options.add_run_config_entry("gpu_graph_id", str(k))
            slot = _Slot(self.session, options)
            self._slots.append(slot)
            if self.static:
                self._allocate(slot, {t.name: self.spec.concrete_shape(t) for t in self.spec.inputs},
                               {t.name: (self.spec.concrete_shape(t), np.dtype(t.dtype)) for t in self.spec.outputs})
        return self._slots[index]

    def _open(self):
        import onnxruntime as ort

        options = {**self._options, "enable_cuda_graph": "1" if self.cuda_graph else "0"}
        try:
            return ort.InferenceSession(str(self.path), sess_options=self._session_options,
                                        providers=[("CUDAExecutionProvider", options), "CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for unreadable models
            raise load_error(self.path, e, " on CUDA") from e

    def _no_graph(self, why: Exception) -> None:
        log.warning("%s: running without a CUDA graph (ONNX Runtime could not capture this graph: %s)", self.spec.name,
                    " ".join(str(why).split())[:200])
        self.cuda_graph = False

    def _reopen_without_graph(self, why: Exception) -> None:
        """The first run failed while capturing: a new session without the graph, bound to the same device buffers."""
        self._no_graph(why)
        self.session = self._open()
        for slot in self._slots:
            slot.binding = self.session.io_binding()
            for name, v in slot.inputs.items():
                slot.binding.bind_ortvalue_input(name, v)
            for name, v in slot.outputs.items():
                slot.binding.bind_ortvalue_output(name, v)

    def _allocate(self, slot: _Slot, in_shapes: Mapping[str, tuple], out_shapes: Mapping[str, tuple]) -> None:
        import onnxruntime as ort

        slot.binding.clear_binding_inputs()
        slot.binding.clear_binding_outputs()
        for name, shape in in_shapes.items():
            v = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), self._dtypes[name], "cuda", self.device_id)
            slot.inputs[name] = v
            slot.binding.bind_ortvalue_input(name, v)
        for name, (shape, dtype) in out_shapes.items():
            v = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, "cuda", self.device_id)
            slot.outputs[name] = v
            slot.binding.bind_ortvalue_output(name, v)

    def _cast(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        # float32 feeds are accepted for float16 inputs (the sampler works in float32); other dtypes must match
        out = {}
        for k, a in feeds.items():
            want = self._dtypes.get(k)
            a = np.asarray(a)
            if want is not None and a.dtype != want and a.dtype.kind == "f" and want.kind == "f":
                a = a.astype(want)
            out[k] = a if a.flags.c_contiguous else np.array(a, order="C")  # ascontiguousarray makes 0-d arrays 1-d
        return out

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = self._cast(feeds)
        self.spec.check_feeds(feeds)
        if not self.static:
            return self._run_dynamic(feeds)
        return self.run_partial(feeds, _checked=True)

    def run_partial(self, feeds: Mapping[str, np.ndarray], _checked: bool = False, slot: int = 0) -> dict[str, np.ndarray]:
        """Copy only ``feeds`` into the device buffers of ``slot`` (its other inputs keep the values last copied into
        that slot), run (replaying that slot's CUDA graph), return host outputs."""
        if not self.static:
            raise LdmExportError(f"{self.spec.name}: run_partial needs a static-shape bundle; use run()")
        s = self._slot(slot)
        if not _checked:
            feeds = self._cast(feeds)
            unknown = set(feeds) - set(s.inputs)
            if unknown:
                raise LdmExportError(f"{self.spec.name}: unknown inputs {sorted(unknown)}; expected {self.spec.input_names}")
        unset = sorted(set(s.inputs) - s.written - set(feeds))
        if unset:  # a device buffer never written holds whatever the allocator left there
            raise LdmExportError(f"{self.spec.name}: {unset} never fed{f' to slot {slot}' if slot else ''}; feed "
                                 "every input on the first run (run(), or run_partial with all of them)")
        for name, a in feeds.items():
            buf = s.inputs[name]
            if tuple(a.shape) != tuple(buf.shape()):
                raise LdmExportError(f"{self.spec.name}.{name}: expected shape {tuple(buf.shape())}, got {tuple(a.shape)}")
            buf.update_inplace(a)
            s.written.add(name)
        try:
            self._run(s)
        except LdmExportError as e:
            if self._ran or not (self.cuda_graph and self.graph_fallback and _about_capture(e)):
                raise
            self._reopen_without_graph(e)
            self._run(s)
        s.ran = True
        out = {n: s.outputs[n].numpy() for n in self.output_names}
        self._guard(out)
        return out

    def replay(self, slot: int = 0) -> None:
        """Run again on the inputs already bound to ``slot``, leaving the outputs on the device (timing, profiling)."""
        if not self.static or slot >= len(self._slots) or not self._slots[slot].ran:
            raise LdmExportError(f"{self.spec.name}: replay needs a static-shape engine that has run once")
        self._run(self._slots[slot])

    def _run(self, slot: _Slot) -> None:
        try:
            self.session.run_with_iobinding(slot.binding, slot.run_options)
        except Exception as e:  # onnxruntime's own error types (cuDNN failures, out of memory, ...)
            msg = " ".join(str(e).split())
            raise LdmExportError(f"{self.spec.name}: ONNX Runtime failed on CUDA: {msg[:300]}") from e

    def _run_dynamic(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        b = self._slots[0].binding  # a dynamic engine binds each call's arrays on slot 0
        b.clear_binding_inputs()
        b.clear_binding_outputs()
        for name, a in feeds.items():
            b.bind_cpu_input(name, a)
        for name in self.output_names:
            b.bind_output(name, "cuda", self.device_id)
        b.synchronize_inputs()
        self._run(self._slots[0])
        b.synchronize_outputs()
        out = dict(zip(self.output_names, b.copy_outputs_to_cpu()))
        self._guard(out)
        return out

    def _guard(self, out: Mapping[str, np.ndarray]) -> None:
        if not self.check_finite:
            return
        for name, a in out.items():
            if not all_finite(a):
                bad = int(a.size - np.isfinite(a).sum())
                raise LdmExportError(f"{self.spec.name} produced {bad} NaN/Inf values in '{name}': "
                                     + overflow_message(self.spec.name, self.precision))

    def end_profiling(self) -> str:
        """Stop ONNX Runtime's profiler (``profile_prefix``) and return the JSON trace's path."""
        return self.session.end_profiling()


def profile_summary(trace_path: str | os.PathLike, top: int = 15,
                    skip_runs: int = 0) -> tuple[float, list[tuple[str, float, float, float]]]:
    """From an ONNX Runtime profile trace: (kernel ms a run, [(op type, ms a run, calls a run, share)]), largest first.

    The first ``skip_runs`` runs (warm-up, cuDNN algorithm search) are left out."""
    import json

    events = json.loads(Path(trace_path).read_text())
    run_events = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    if len(run_events) <= skip_runs:
        raise LdmExportError(f"the profile holds {len(run_events)} runs, not more than the {skip_runs} to skip")
    start = run_events[skip_runs]["ts"] if skip_runs else 0
    n_runs = len(run_events) - skip_runs
    per: dict[str, list[float]] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= start:
            op = e.get("args", {}).get("op_name", "?")
            per.setdefault(op, []).append(e.get("dur", 0) / 1000.0)
    total = sum(sum(v) for v in per.values()) / n_runs
    rows = sorted(((op, sum(v) / n_runs, len(v) / n_runs, sum(v) / n_runs / (total or 1.0)) for op, v in per.items()),
                  key=lambda r: -r[1])
    return total, rows[:top]
