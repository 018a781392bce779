"""TensorRTEngine's own bookkeeping (shapes, device buffers, copies, CUDA graph capture and replay, the runtime cache)
on a stand-in TensorRT and CUDA driver: the engine 'computes' 8x nearest upsampling of the first 3 channels, the
driver's 'device memory' is host bytes. What it cannot show is TensorRT itself: that needs a supported GPU
(tests/test_tensorrt.py::test_end_to_end_engines_match_onnxruntime_cpu)."""
from __future__ import annotations

import types

import numpy as np
import pytest

from ldm_export.runtime import engine_tensorrt as E
from ldm_export.runtime.engine_tensorrt import GpuInfo, TensorRTEngine
from ldm_export.runtime.errors import LdmExportError
from ldm_export.runtime.spec import vae_decoder_spec


class FakeCuda:
    def __init__(self, device: int = 0):
        self.mem: dict[int, bytearray] = {}
        self.next, self.stream, self.graphs, self.log = 1, types.SimpleNamespace(value=7), {}, []

    def alloc(self, n):
        p = self.next
        self.next += 1
        self.mem[p] = bytearray(n)
        self.log.append(("alloc", n))
        return p

    def free(self, p):
        self.mem.pop(p, None)

    def to_device(self, p, a):
        b = np.ascontiguousarray(a).tobytes()
        self.mem[p][: len(b)] = b

    def to_host(self, a, p):
        a.reshape(-1).view(np.uint8)[:] = np.frombuffer(bytes(self.mem[p][: a.nbytes]), np.uint8)

    def synchronize(self):
        pass

    def capture(self, work):
        h = len(self.graphs) + 100
        self.graphs[h] = work  # a real capture records without running
        self.log.append(("capture", h))
        return h

    def launch(self, h):
        self.log.append(("launch", h))
        self.graphs[h]()

    def destroy_graph(self, h):
        self.graphs.pop(h, None)

    def close(self):
        self.log.append(("close",))


def fake_trt(name: str, cuda_holder: list):
    trt = types.ModuleType(name)
    trt.__version__ = "10.13.3.9" if name == "tensorrt" else "1.7.1.116"

    class ILogger:
        class Severity:
            INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self):
            pass

    trt.ILogger = ILogger
    trt.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    trt.CudaGraphStrategy = types.SimpleNamespace(WHOLE_GRAPH_CAPTURE="whole")
    trt.nptype = lambda dt: np.float32

    class Context:
        def __init__(self, config=None):
            self.config, self.shapes, self.addr, self.runs = config, {}, {}, 0

        def set_input_shape(self, name, shape):
            self.shapes[name] = tuple(shape)
            return shape[2] <= 16 and shape[3] <= 16  # the engine's profile: up to 16 latent pixels a side

        def get_tensor_shape(self, name):
            b, _, h, w = self.shapes["latent_sample"]
            return (b, 3, 8 * h, 8 * w)

        def set_tensor_address(self, name, ptr):
            self.addr[name] = ptr

        def execute_async_v3(self, stream):
            cuda = cuda_holder[0]
            shape = self.shapes["latent_sample"]
            z = np.frombuffer(bytes(cuda.mem[self.addr["latent_sample"]][: int(np.prod(shape)) * 4]), np.float32).reshape(shape)
            out = np.repeat(np.repeat(z[:, :3], 8, axis=2), 8, axis=3)
            cuda.to_device(self.addr["sample"], out)
            self.runs += 1
            return True

    class Cache:
        def __init__(self):
            self.data = b""

        def deserialize(self, b):
            self.data = b

        def serialize(self):
            return b"kernels:" + self.data

    class Engine:
        num_io_tensors = 2

        def get_tensor_name(self, i):
            return ["latent_sample", "sample"][i]

        def get_tensor_mode(self, n):
            return "in" if n == "latent_sample" else "out"

        def get_tensor_dtype(self, n):
            return "float"

        def create_runtime_config(self):
            return types.SimpleNamespace(create_runtime_cache=Cache, set_runtime_cache=lambda c: True,
                                         cuda_graph_strategy=None)

        def create_execution_context(self, runtime_config=None):
            self.context = Context(runtime_config)
            return self.context

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, data):
            if data != b"PLAN":
                self.logger.log(ILogger.Severity.ERROR, "Serialization assertion failed: magic tag\nsecond line")
                return None
            return Engine()

    trt.Runtime = Runtime
    return trt


@pytest.fixture()
def fake(monkeypatch, tmp_path):
    """(make_engine, cuda_holder): TensorRTEngine on the stand-ins, for full TensorRT or TensorRT-RTX."""
    holder: list = []

    def make_cuda(device=0):
        holder.append(FakeCuda())
        return holder[-1]

    import ldm_export.runtime.cuda_driver as cd
    monkeypatch.setattr(cd, "CudaDriver", make_cuda)
    monkeypatch.setattr(E, "current_gpu", lambda device=0: GpuInfo("NVIDIA L4", (8, 9)))
    plan = tmp_path / "vae_decoder.plan"
    plan.write_bytes(b"PLAN")

    def make(name="tensorrt", static=False, data=b"PLAN", cache=None):
        plan.write_bytes(data)
        spec = vae_decoder_spec(4, (2, 8, 16), batch=(1, 1, 4))
        if static:
            spec = spec.static({"batch": 1, "height": 8, "width": 8, "image_height": 64, "image_width": 64})
        return TensorRTEngine(plan, spec, trt=fake_trt(name, holder), runtime_cache=cache)

    return make, holder


def _ref(z):
    return np.repeat(np.repeat(z[:, :3], 8, axis=2), 8, axis=3)


def test_dynamic_shapes_grow_buffers_and_give_fresh_outputs(fake):
    make, holder = fake
    eng = make()
    rng = np.random.default_rng(0)
    a = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    out_a = eng.run({"latent_sample": a})["sample"]
    np.testing.assert_array_equal(out_a, _ref(a))
    b = rng.standard_normal((2, 4, 16, 12)).astype(np.float32)
    np.testing.assert_array_equal(eng.run({"latent_sample": b})["sample"], _ref(b))
    np.testing.assert_array_equal(out_a, _ref(a))  # an earlier result is not overwritten by the next run
    c = rng.standard_normal((1, 4, 4, 4)).astype(np.float32)
    np.testing.assert_array_equal(eng.run({"latent_sample": c})["sample"], _ref(c))
    allocs = [n for op, *n in holder[0].log if op == "alloc"]
    assert len(allocs) == 4  # input and output once, then again only when the shape grew; not for the smaller one
    assert not [x for x in holder[0].log if x[0] == "capture"]  # dynamic: no CUDA graph


def test_static_full_tensorrt_captures_once_and_replays_with_new_inputs(fake):
    make, holder = fake
    eng = make(static=True)
    rng = np.random.default_rng(1)
    for _ in range(4):
        z = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
        np.testing.assert_array_equal(eng.run({"latent_sample": z})["sample"], _ref(z))
    ops = [x[0] for x in holder[0].log if x[0] in ("capture", "launch")]
    assert ops == ["capture", "launch", "launch", "launch"]  # first run plain, then one capture, replays after
    assert eng.engine.context.runs == 4


def test_tensorrt_rtx_uses_its_own_graph_strategy_and_keeps_the_runtime_cache(fake, tmp_path):
    make, holder = fake
    cache = tmp_path / "vae_decoder.runtime.cache"
    cache.write_bytes(b"old")
    eng = make("tensorrt_rtx_bindings", static=True, cache=cache)
    assert eng.engine.context.config.cuda_graph_strategy == "whole"
    z = np.ones((1, 4, 8, 8), np.float32)
    eng.run({"latent_sample": z})
    eng.run({"latent_sample": z})
    assert not [x for x in holder[0].log if x[0] == "capture"]  # TensorRT-RTX captures by itself
    eng.close()
    assert cache.read_bytes() == b"kernels:old" and ("close",) in holder[0].log


def test_damaged_plan_is_one_line(fake):
    make, _ = fake
    with pytest.raises(LdmExportError) as e:
        make(data=b"garbage")
    msg = str(e.value)
    assert "\n" not in msg and "Serialization assertion failed: magic tag" in msg and "ldm-export engines" in msg


def test_profile_outside_the_engine_is_refused_before_running(fake):
    make, _ = fake
    eng = make()
    with pytest.raises(LdmExportError, match=r"dimension 'height' is 24, outside the range 2\.\.16"):
        eng.run({"latent_sample": np.zeros((1, 4, 24, 8), np.float32)})
    assert eng.engine.context.runs == 0
