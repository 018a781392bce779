"""CudaEngine: IOBinding, CUDA graphs, the partial-update path and the NaN/Inf guard; profile summaries.

The engine tests need onnxruntime-gpu and a GPU and are skipped elsewhere with that reason."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402

from ldm_export.runtime.engine_cuda import CudaEngine, cuda_available, profile_summary  # noqa: E402
from ldm_export.runtime.errors import LdmExportError  # noqa: E402
from ldm_export.runtime.spec import ComponentSpec, TensorSpec  # noqa: E402

needs_cuda = pytest.mark.skipif(not cuda_available(), reason="needs onnxruntime-gpu with the CUDA provider and a GPU")


def _model(path, name="unet", dtype=TensorProto.FLOAT16):
    """out_sample = sample * timestep + encoder_hidden_states (broadcast): a static graph with the UNet's names."""
    nodes = [helper.make_node("Cast", ["timestep"], ["t16"], to=dtype),
             helper.make_node("Mul", ["sample", "t16"], ["m"]),
             helper.make_node("Add", ["m", "encoder_hidden_states"], ["out_sample"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("sample", dtype, [2, 4, 8, 8]),
                                       helper.make_tensor_value_info("timestep", TensorProto.FLOAT, []),
                                       helper.make_tensor_value_info("encoder_hidden_states", dtype, [2, 4, 8, 8])],
                          [helper.make_tensor_value_info("out_sample", dtype, [2, 4, 8, 8])])
    m = helper.make_model(g, ir_version=9, opset_imports=[helper.make_opsetid("", 17)])
    path.write_bytes(m.SerializeToString())
    spec = ComponentSpec(name, (TensorSpec("sample", "float16", (2, 4, 8, 8)), TensorSpec("timestep", "float32", ()),
                                TensorSpec("encoder_hidden_states", "float16", (2, 4, 8, 8))),
                         (TensorSpec("out_sample", "float16", (2, 4, 8, 8)),))
    return spec


def test_runtime_module_does_not_import_torch():
    code = "import sys, ldm_export.runtime.engine_cuda; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_zero_d_feeds_stay_zero_d():
    from ldm_export.runtime.engine_cuda import CudaEngine as E

    e = E.__new__(E)
    e._dtypes = {"timestep": np.dtype("float32"), "sample": np.dtype("float16")}
    out = e._cast({"timestep": np.asarray(3.0, np.float64), "sample": np.ones((2, 3), np.float32)[:, ::2]})
    assert out["timestep"].shape == () and out["timestep"].dtype == np.float32
    assert out["sample"].dtype == np.float16 and out["sample"].flags.c_contiguous


def test_profile_summary_skips_warmup_runs(tmp_path):
    ev = [{"name": "model_run", "cat": "Session", "ts": 0, "dur": 10},
          {"name": "model_run", "cat": "Session", "ts": 100, "dur": 10},
          {"name": "model_run", "cat": "Session", "ts": 200, "dur": 10}]
    for ts, op, dur in [(1, "Conv", 5000), (101, "Conv", 2000), (102, "GroupNorm", 1000), (201, "Conv", 4000), (202, "GroupNorm", 2000)]:
        ev.append({"name": f"n{ts}_kernel_time", "cat": "Node", "ts": ts, "dur": dur, "args": {"op_name": op}})
    p = tmp_path / "trace.json"
    p.write_text(json.dumps(ev))
    total, rows = profile_summary(p, skip_runs=1)
    assert total == pytest.approx(4.5)  # (2 + 1 + 4 + 2) ms over 2 runs
    assert rows[0][:3] == ("Conv", pytest.approx(3.0), 1.0) and rows[1][0] == "GroupNorm"
    with pytest.raises(LdmExportError):
        profile_summary(p, skip_runs=3)


@pytest.mark.skipif(cuda_available(), reason="checks the message given without onnxruntime-gpu")
def test_engine_without_cuda_says_what_to_install(tmp_path):
    spec = _model(tmp_path / "m.onnx")
    with pytest.raises(LdmExportError, match="onnxruntime-gpu"):
        CudaEngine(tmp_path / "m.onnx", spec)


class _CpuBackedSession:
    """Stands in for a CUDA session on a machine without a GPU: runs the graph on ONNX Runtime's CPU provider and,
    with ``enable_cuda_graph`` on, refuses the way ``refuse`` says: at creation or at the first (capturing) run."""
    made: list = []

    def __init__(self, path, sess_options=None, providers=()):
        self.graph = providers[0][1]["enable_cuda_graph"] == "1"
        type(self).made.append(self.graph)
        if self.graph and self.refuse == "oom":
            raise RuntimeError("CUDA failure 2: out of memory")
        if self.graph and self.refuse == "create":
            raise RuntimeError("This session cannot use the graph capture feature as requested by the user as all "
                               "compute graph nodes have not been partitioned to the CUDA execution provider")
        self.real = _REAL_SESSION(str(path), providers=["CPUExecutionProvider"])

    def get_inputs(self):
        return self.real.get_inputs()

    def get_outputs(self):
        return self.real.get_outputs()

    def io_binding(self):
        return _Binding()

    def run_with_iobinding(self, binding, run_options=None):
        if self.graph and self.refuse == "run":
            raise RuntimeError("CUDA failure 900: operation not permitted when stream is capturing")
        outs = self.real.run(list(binding.outputs), {k: v.numpy() for k, v in binding.inputs.items()})
        for v, o in zip(binding.outputs.values(), outs):
            v.update_inplace(o)


class _Binding:
    def __init__(self):
        self.inputs, self.outputs = {}, {}

    def clear_binding_inputs(self):
        self.inputs.clear()

    def clear_binding_outputs(self):
        self.outputs.clear()

    def bind_ortvalue_input(self, name, v):
        self.inputs[name] = v

    def bind_ortvalue_output(self, name, v):
        self.outputs[name] = v


_REAL_SESSION = ort.InferenceSession


@pytest.mark.parametrize("refuse", ["create", "run"])
def test_graph_fallback_runs_without_a_cuda_graph_where_capture_is_refused(tmp_path, monkeypatch, caplog, refuse):
    """A DiT transformer's engine asks for a CUDA graph with ``graph_fallback``: where ONNX Runtime refuses the
    capture (at session creation, or in the first run), it warns and runs without one, on the same buffers, with
    the right outputs; without ``graph_fallback`` the refusal stays an error, and a failure after the first run is
    never retried."""
    import ldm_export.runtime.engine_cuda as EC

    spec = _model(tmp_path / "m.onnx", name="transformer", dtype=TensorProto.FLOAT)
    spec = spec.with_dtype("float32")
    monkeypatch.setattr(EC, "cuda_available", lambda: True)
    monkeypatch.setattr(_CpuBackedSession, "refuse", refuse, raising=False)
    monkeypatch.setattr(_CpuBackedSession, "made", [])
    monkeypatch.setattr(ort, "InferenceSession", _CpuBackedSession)
    monkeypatch.setattr(ort.OrtValue, "ortvalue_from_shape_and_type",
                        staticmethod(lambda shape, dtype, device, device_id: _REAL_ORTVALUE(np.zeros(shape, dtype))))
    rng = np.random.default_rng(0)
    x, ehs = rng.standard_normal((2, 4, 8, 8)).astype(np.float32), rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    feeds = {"sample": x, "timestep": np.asarray(3.0, np.float32), "encoder_hidden_states": ehs}

    e = CudaEngine(tmp_path / "m.onnx", spec, cuda_graph=True, graph_fallback=True)
    with caplog.at_level("WARNING"):
        out = e.run(feeds)["out_sample"]
    np.testing.assert_allclose(out, x * 3 + ehs, rtol=1e-6)
    assert e.cuda_graph is False and _CpuBackedSession.made == [True, False]
    assert "running without a CUDA graph" in caplog.text
    assert ("graph capture" if refuse == "create" else "stream is capturing") in caplog.text
    np.testing.assert_allclose(e.run({**feeds, "timestep": np.asarray(0.5, np.float32)})["out_sample"], x * 0.5 + ehs,
                               rtol=1e-6)

    if refuse == "create":
        with pytest.raises(LdmExportError, match="graph capture"):
            CudaEngine(tmp_path / "m.onnx", spec, cuda_graph=True)
        monkeypatch.setattr(_CpuBackedSession, "refuse", "oom")  # not about the graph: no second try without it
        monkeypatch.setattr(_CpuBackedSession, "made", [])
        with pytest.raises(LdmExportError, match="out of memory"):
            CudaEngine(tmp_path / "m.onnx", spec, cuda_graph=True, graph_fallback=True)
        assert _CpuBackedSession.made == [True]
    else:
        strict = CudaEngine(tmp_path / "m.onnx", spec, cuda_graph=True)
        with pytest.raises(LdmExportError, match="stream is capturing"):
            strict.run(feeds)
        monkeypatch.setattr(_CpuBackedSession, "refuse", None)
        ok = CudaEngine(tmp_path / "m.onnx", spec, cuda_graph=True, graph_fallback=True)
        ok.run(feeds)
        monkeypatch.setattr(_CpuBackedSession, "refuse", "run")  # a failure after the first run is not a capture
        with pytest.raises(LdmExportError, match="stream is capturing"):
            ok.run(feeds)
        assert ok.cuda_graph is True


def test_cuda_engine_asks_a_graph_for_the_dit_transformer_only_with_fallback(monkeypatch):
    """``cuda_engine``: UNet and VAE decoder get CUDA graphs (strict), the DiT transformer a graph with fallback,
    text encoders none."""
    import ldm_export.runtime.engine_cuda as EC
    from ldm_export.runtime import pipeline as P

    seen = {}

    class Recorder:
        def __init__(self, path, spec, **kw):
            seen[spec] = (kw["cuda_graph"], kw["graph_fallback"], kw["prefer_nhwc"])

    class FakeBundle:
        class family:
            denoiser = "transformer"

        def spec(self, c):
            return c

        def model_path(self, c):
            return c

        def precision(self, c):
            return "fp16"

    monkeypatch.setattr(EC, "CudaEngine", Recorder)
    for c in ("transformer", "vae_decoder", "text_encoder_3"):
        P.cuda_engine(FakeBundle(), c)
    assert seen == {"transformer": (None, True, False), "vae_decoder": (None, False, True),
                    "text_encoder_3": (False, False, False)}
    FakeBundle.family.denoiser = "unet"
    P.cuda_engine(FakeBundle(), "unet")
    assert seen["unet"] == (None, False, True)


_REAL_ORTVALUE = ort.OrtValue.ortvalue_from_numpy


@needs_cuda
@pytest.mark.parametrize("graph", [True, False])
def test_engine_runs_and_partial_updates(tmp_path, graph):
    spec = _model(tmp_path / "m.onnx")
    e = CudaEngine(tmp_path / "m.onnx", spec, cuda_graph=graph)
    rng = np.random.default_rng(0)
    x, ehs = rng.standard_normal((2, 4, 8, 8)).astype(np.float32), rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    for t in (1.0, 3.0, 0.5):  # graph replays must see the new values copied in place
        out = e.run({"sample": x, "timestep": np.asarray(t, np.float32), "encoder_hidden_states": ehs})["out_sample"]
        np.testing.assert_allclose(out, (x.astype(np.float16) * np.float16(t) + ehs.astype(np.float16)), rtol=2e-3, atol=2e-3)
    x2 = x + 1
    out = e.run_partial({"sample": x2, "timestep": np.asarray(2.0, np.float32)})["out_sample"]
    np.testing.assert_allclose(out, x2.astype(np.float16) * np.float16(2) + ehs.astype(np.float16), rtol=2e-3, atol=2e-3)
    with pytest.raises(LdmExportError, match="expected shape"):
        e.run_partial({"sample": x[:1]})


@needs_cuda
@pytest.mark.parametrize("graph", [True, False])
def test_slots_keep_their_own_inputs_and_graphs(tmp_path, graph):
    """Two slots (two CUDA graphs, gpu_graph_id 0 and 1), each with its own embeddings: after one full run each, the
    partial runs alternate and each slot computes with its own embeddings; a slot never fed is refused."""
    spec = _model(tmp_path / "m.onnx")
    e = CudaEngine(tmp_path / "m.onnx", spec, cuda_graph=graph)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    ehs = [rng.standard_normal((2, 4, 8, 8)).astype(np.float32) for _ in range(2)]
    with pytest.raises(LdmExportError, match="never fed to slot 1"):
        e.run_partial({"sample": x, "timestep": np.asarray(1.0, np.float32)}, slot=1)
    for k in (0, 1):
        e.run_partial({"sample": x, "timestep": np.asarray(1.0, np.float32), "encoder_hidden_states": ehs[k]}, slot=k)
    for t in (2.0, 0.5, 3.0):
        for k in (1, 0):
            out = e.run_partial({"sample": x + t, "timestep": np.asarray(t, np.float32)}, slot=k)["out_sample"]
            want = (x + t).astype(np.float16) * np.float16(t) + ehs[k].astype(np.float16)
            np.testing.assert_allclose(out, want, rtol=2e-3, atol=2e-3)
    with pytest.raises(LdmExportError, match="out of range"):
        e.run_partial({"sample": x}, slot=8)


@needs_cuda
def test_engine_guards_vae_output_against_nan(tmp_path):
    spec = _model(tmp_path / "m.onnx", name="vae_decoder")
    e = CudaEngine(tmp_path / "m.onnx", spec)
    x = np.full((2, 4, 8, 8), 6e4, np.float32)
    with pytest.raises(LdmExportError, match="vae_decoder produced .* NaN/Inf"):
        e.run({"sample": x, "timestep": np.asarray(10.0, np.float32), "encoder_hidden_states": x})


@needs_cuda
def test_replay_and_kernel_profile_see_the_graph_kernels(tmp_path):
    """CUPTI (through PyTorch's profiler) sees ONNX Runtime's kernels, CUDA graph replays included."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("the kernel profile reads CUPTI through a CUDA build of PyTorch")
    from ldm_export.bench.kernel_profile import profile_kernels

    spec = _model(tmp_path / "m.onnx")
    e = CudaEngine(tmp_path / "m.onnx", spec, cuda_graph=True)
    with pytest.raises(LdmExportError, match="has run once"):
        e.replay()
    x = np.ones((2, 4, 8, 8), np.float32)
    e.run({"sample": x, "timestep": np.asarray(2.0, np.float32), "encoder_hidden_states": x})
    p = profile_kernels(e.replay, runs=4)
    assert p["kernels_per_run"] >= 2 and p["device_ms_per_run"] > 0  # Cast, Mul, Add (maybe fused by ORT)
    assert {r["kind"] for r in p["by_kind"]} <= {"elementwise", "other", "copy"}
