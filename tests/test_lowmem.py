"""Low-memory mode: one component at a time, text encoder freed before the UNet loads, sequential CFG, tiled VAE
decode; the image equals the normal pipeline's where no tiling happens."""
from __future__ import annotations

import numpy as np
import pytest

from ldm_export.runtime.bundle import Bundle
from ldm_export.runtime.lowmem import (
    LazyEngine, OneAtATime, TiledDecoder, blend_weights, low_memory_engines, tile_starts,
)
from ldm_export.runtime.pipeline import Pipeline
from ldm_export.runtime.spec import vae_decoder_spec


def test_low_memory_image_equals_the_normal_pipeline_in_sequential_cfg(tiny_bundle):
    normal = Pipeline.from_bundle(tiny_bundle, cfg_mode="sequential")
    lean = Pipeline.from_bundle(tiny_bundle, low_memory=True)
    assert lean.cfg_mode == "sequential"
    kw = dict(num_inference_steps=4, guidance_scale=5.0, seed=3)
    a = np.asarray(normal("a red circle", **kw)[0])
    b = np.asarray(lean("a red circle", **kw)[0])
    np.testing.assert_array_equal(a, b)


def test_low_memory_runs_several_images_one_at_a_time(tiny_bundle):
    """--num-images N in low-memory mode: every UNet call stays batch 1 (a dynamic bundle otherwise batches 4 images,
    four times the activations), and each image is the one the normal pipeline makes with its seed."""
    lean = Pipeline.from_bundle(tiny_bundle, low_memory=True)
    batches = []
    unet = lean.engines["unet"]

    class Recording:
        spec = unet.spec

        def run(self, feeds):
            batches.append(feeds["sample"].shape[0])
            return unet.run(feeds)

    lean.engines["unet"] = Recording()
    kw = dict(num_inference_steps=2, guidance_scale=5.0, seed=3, num_images=3)
    assert lean.images_per_batch() == 1
    images = [np.asarray(im) for _, im in lean.iter_images("a red circle", **kw)]
    assert len(images) == 3 and batches and set(batches) == {1}
    normal = Pipeline.from_bundle(tiny_bundle, cfg_mode="sequential")
    assert normal.images_per_batch() > 1
    for a, b in zip(images, normal("a red circle", **kw, batch_size=1)):  # lean sessions: a pixel may differ by 1
        assert np.abs(a.astype(np.int16) - np.asarray(b, np.int16)).max() <= 1


@pytest.fixture(scope="module")
def tiny_fp16_bundle(tmp_path_factory):
    """A tiny random-weights fp16 bundle: on a CPU every weight goes through an inserted fp16->fp32 Cast."""
    from ldm_export.export.build import BuildConfig, build

    out = tmp_path_factory.mktemp("lowmem") / "tiny-fp16"
    build(BuildConfig(model="tiny", precision="fp16", random_weights=True, seed=0, out=out))
    return out


def test_low_memory_fp16_image_equals_the_normal_pipelines(tiny_fp16_bundle):
    """The lean sessions give the normal pipeline's image within fp16 rounding: their basic graph optimisations round
    to fp16 between ops that the normal sessions' extended level fuses (1 level of 255 in 4.5 % of the pixels here,
    against the sequential-CFG pipeline)."""
    kw = dict(num_inference_steps=4, guidance_scale=5.0, seed=3)
    lean = np.asarray(Pipeline.from_bundle(tiny_fp16_bundle, low_memory=True)("a red circle", **kw)[0], np.int16)
    seq = np.asarray(Pipeline.from_bundle(tiny_fp16_bundle, cfg_mode="sequential")("a red circle", **kw)[0], np.int16)
    batch2 = np.asarray(Pipeline.from_bundle(tiny_fp16_bundle)("a red circle", **kw)[0], np.int16)
    for normal in (seq, batch2):
        assert np.abs(lean - normal).max() <= 2 and np.mean(lean != normal) < 0.1
    assert lean.std() > 5  # an image, not a flat field


class _Recorder:
    """Counts live engines through the factory, as a memory meter would."""

    def __init__(self, bundle):
        from ldm_export.runtime.engine import OrtEngine

        self.live, self.peak, self.bundle, self.Ort = set(), 0, bundle, OrtEngine

    def __call__(self, component):
        rec = self

        class Counted(self.Ort):
            def close(self_inner):
                rec.live.discard(component)

        eng = Counted(self.bundle.model_path(component), self.bundle.spec(component))
        self.live.add(component)
        self.peak = max(self.peak, len(self.live))
        return eng


def test_one_component_at_a_time_and_text_encoder_freed_before_the_unet(tiny_bundle):
    bundle = Bundle.open(tiny_bundle)
    rec = _Recorder(bundle)
    engines = low_memory_engines(bundle, factory=rec)
    pipe = Pipeline(bundle, engines, cfg_mode="sequential")
    pipe("a blue square", num_inference_steps=3, guidance_scale=7.5, seed=0)
    slot = engines["unet"].slot
    assert slot.loads == ["text_encoder", "unet", "vae_decoder"]  # each loaded once, in this order
    assert rec.peak == 1  # never two components in memory at once
    assert rec.live == set() and slot.engine is None  # the decoder is released after it ran
    pipe("a blue square", num_inference_steps=2, guidance_scale=7.5, seed=0)
    assert slot.loads == ["text_encoder", "unet", "vae_decoder"] * 2


def test_blend_weights_sum_to_one_everywhere():
    size, tile, overlap = 20, 8, 2
    total = np.zeros(size)
    for s in tile_starts(size, tile, overlap):
        total[s:s + tile] += blend_weights(size, s, tile, overlap)
    np.testing.assert_allclose(total, 1.0)
    assert tile_starts(size, tile, overlap) == [0, 6, 12]
    assert tile_starts(8, 8, 2) == [0]


class _Upsample:
    """A pointwise 'decoder' (8x nearest upsampling of the first 3 channels): tiling it must be exact."""

    spec = vae_decoder_spec(4, (1, 8, 512))

    def __init__(self):
        self.shapes = []

    def run(self, feeds):
        z = feeds["latent_sample"]
        self.shapes.append(z.shape)
        return {"sample": np.repeat(np.repeat(z[:, :3], 8, axis=2), 8, axis=3).astype(np.float32)}


def test_tiled_decode_of_a_pointwise_decoder_is_exact():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((1, 4, 24, 40)).astype(np.float32)
    inner = _Upsample()
    got = TiledDecoder(inner, tile=16, overlap=4).run({"latent_sample": z})["sample"]
    want = _Upsample().run({"latent_sample": z})["sample"]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert all(s[2] <= 16 and s[3] <= 16 for s in inner.shapes) and len(inner.shapes) == 2 * 3


def test_small_images_decode_whole(tiny_bundle):
    inner = _Upsample()
    z = np.zeros((1, 4, 16, 16), np.float32)
    TiledDecoder(inner, tile=16, overlap=4).run({"latent_sample": z})
    assert inner.shapes == [(1, 4, 16, 16)]


def test_tiled_decode_of_the_tiny_vae_is_close_to_the_whole_decode(tiny_bundle):
    """A real decoder: each tile normalises with its own GroupNorm statistics, so tiles differ a little."""
    from ldm_export.runtime.engine import OrtEngine

    b = Bundle.open(tiny_bundle)
    vae = OrtEngine(b.model_path("vae_decoder"), b.spec("vae_decoder"))
    rng = np.random.default_rng(1)
    z, other = (rng.standard_normal((1, 4, 16, 16)).astype(np.float32) for _ in range(2))
    whole = vae.run({"latent_sample": z})["sample"]
    tiled = TiledDecoder(vae, tile=12, overlap=4).run({"latent_sample": z})["sample"]
    assert tiled.shape == whole.shape

    def psnr(a, b):
        return 10 * np.log10(4.0 / np.mean((a - b) ** 2))  # images in [-1, 1]
    # random weights make the decoder very sensitive to its norms' statistics (23.1 dB measured); an unrelated
    # latent gives 12.0 dB: the tiles decode the same image
    assert psnr(tiled, whole) > 20 and psnr(tiled, whole) > psnr(vae.run({"latent_sample": other})["sample"], whole) + 8


def test_bad_overlap_is_refused():
    with pytest.raises(ValueError, match="overlap"):
        TiledDecoder(_Upsample(), tile=16, overlap=8)


def test_slot_releases_on_switch():
    closed = []

    class E:
        def __init__(self, name):
            self.name = name

        def close(self):
            closed.append(self.name)

    slot = OneAtATime(E)
    a = LazyEngine(slot, "a", None)
    slot.get("a")
    slot.get("a")
    slot.get("b")
    assert closed == ["a"] and slot.loads == ["a", "b"] and a.slot is slot


def test_generate_cli_low_memory(tiny_bundle, tmp_path):
    from conftest import run_cli

    out = tmp_path / "x.png"
    r = run_cli("generate", str(tiny_bundle), "a cat", "--steps", "2", "--seed", "1", "--low-memory", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert out.stat().st_size > 0
    assert "cfg-mode" not in r.stderr  # the default says nothing
    r = run_cli("generate", str(tiny_bundle), "a cat", "--steps", "2", "--seed", "1", "--low-memory", "--cfg-mode",
                "batch2", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "--low-memory runs CFG as two batch-1 UNet calls: --cfg-mode batch2 is ignored" in r.stderr


def _fp16_matmul_chain(path, n: int = 40, width: int = 1024) -> int:
    """An fp16 graph of ``n`` chained MatMuls with fp16 weights (ONNX Runtime's x86 CPU MatMul is fp32: it casts every
    weight); returns the bytes its weights take in fp32."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(n):
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float16)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"y{i}"]))
        x = f"y{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["b", width])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT16, ["b", width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return n * width * width * 4


_RUN_PEAK = """
import sys, numpy as np, onnxruntime as ort
from ldm_export.runtime.lowmem import lean_session_options
def hwm():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
s = ort.InferenceSession(sys.argv[1], lean_session_options(1, weights_first=True), providers=["CPUExecutionProvider"])
x = np.ones((8, 1024), np.float16)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak (VmHWM) to the current RSS
base = hwm()
s.run(None, {"x": x})
print(hwm() - base)
"""


@pytest.mark.skipif(not __import__("os").access("/proc/self/clear_refs", __import__("os").W_OK),
                    reason="needs Linux's /proc/self/clear_refs to reset the peak RSS")
def test_lean_session_casts_fp16_weights_one_at_a_time(tmp_path):
    """The low-memory session options run each inserted fp16->fp32 weight Cast next to its consumer: a run's peak
    stays far below the fp32 copies of all weights (ONNX Runtime's default order held them all: 164 MB of 168 here)."""
    import subprocess
    import sys

    path = tmp_path / "chain.onnx"
    fp32_weights = _fp16_matmul_chain(path)
    r = subprocess.run([sys.executable, "-c", _RUN_PEAK, str(path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) < fp32_weights / 4, f"run peak {int(r.stdout) / 1e6:.0f} MB above the session's RSS"


_HOLES = """
import sys, numpy as np
from pathlib import Path
def rss():
    return next(int(l.split()[1]) * 1024 for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS"))
if sys.argv[1] == "low-memory":
    from ldm_export.runtime.lowmem import return_large_blocks
    assert return_large_blocks()
a = np.ones(16 << 20, np.uint8)
del a  # a freed 16 MiB block: glibc's moving threshold rises to it
base = rss()
blocks, pins = [], []
for _ in range(50):  # 200 MiB in 4 MiB blocks, each followed by a small block that stays
    blocks.append(np.ones(4 << 20, np.uint8))
    pins.append(np.ones(1000))
del blocks
print(rss() - base)
"""


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="glibc's mallopt and /proc: Linux only")
def test_low_memory_hands_freed_tensors_back_to_the_os():
    """Large blocks freed between small ones that stay (ONNX Runtime's tensors with the arena off) leave no resident
    holes in low-memory mode; with glibc's moving threshold they stay resident (200 MiB here)."""
    import subprocess
    import sys

    def held(mode: str) -> int:
        r = subprocess.run([sys.executable, "-c", _HOLES, mode], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return int(r.stdout)

    assert held("normal") > 150 * 2**20  # the effect exists on this machine (glibc)
    assert held("low-memory") < 20 * 2**20


def test_low_memory_engines_fix_the_threshold_and_order_the_denoiser_only(tiny_bundle, monkeypatch):
    """Low-memory mode on the CPU holds glibc's threshold, and makes only the denoiser's session in priority order
    (the default order is the leaner one for the VAE decoder)."""
    import onnxruntime as ort

    from ldm_export.runtime import lowmem

    calls, orders = [], {}
    monkeypatch.setattr(lowmem, "return_large_blocks", lambda: calls.append(1) or True)
    real = lowmem.lean_session_options

    def recording(threads=None, weights_first=False, **kwargs):
        so = real(threads, weights_first, **kwargs)
        orders[len(orders)] = so.execution_order
        return so

    monkeypatch.setattr(lowmem, "lean_session_options", recording)
    bundle = Bundle.open(tiny_bundle)
    engines = low_memory_engines(bundle)
    assert calls == [1]
    seen, slot = {}, engines["unet"].slot  # one slot for all components
    for c in ("text_encoder", "unet", "vae_decoder"):
        slot.get(c)
        seen[c] = orders[len(orders) - 1]
    assert seen == {"text_encoder": ort.ExecutionOrder.DEFAULT, "unet": ort.ExecutionOrder.PRIORITY_BASED,
                    "vae_decoder": ort.ExecutionOrder.DEFAULT}


def test_mha_rewrite_tool_keeps_the_unet_output(tiny_fp16_bundle, tmp_path):
    """tools/mha_rewrite.py (the fused-attention measurement in docs/runtime.md) replaces every attention of an fp16
    UNet with MultiHeadAttention and ONNX Runtime's CPU gives the same prediction within fp16 rounding."""
    import importlib.util

    import onnx
    import onnxruntime as ort

    from ldm_export.runtime.lowmem import lean_session_options

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("mha_rewrite", ROOT / "tools" / "mha_rewrite.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    src = tiny_fp16_bundle / "unet" / "model.onnx"
    model = onnx.load(src)
    softmaxes = sum(n.op_type == "Softmax" for n in model.graph.node)
    assert tool.rewrite(model, heads=4) == softmaxes > 0  # the tiny UNet: 4 heads
    assert not any(n.op_type == "Softmax" for n in model.graph.node)
    onnx.save(model, tmp_path / "mha.onnx")
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((1, 4, 16, 16)).astype(np.float32), "timestep": np.array(500, np.float32),
             "encoder_hidden_states": rng.standard_normal((1, 77, 32)).astype(np.float16)}

    def run(path):
        so = lean_session_options(weights_first=True)
        s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return s.run(None, feeds)[0].astype(np.float32)

    want, got = run(src), run(tmp_path / "mha.onnx")
    assert np.abs(got - want).max() < 1e-2 * np.abs(want).max()


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_fused_attention_cpu_build_draws_the_unfused_image(tiny_bundle, tmp_path, precision):
    """`build --fused-attention` (cpu target): every UNet attention is ONNX Runtime's MultiHeadAttention (no tokens x
    tokens score matrix: the low-memory peak), verified against torch, and the image equals the plain build's."""
    import onnx

    from ldm_export.export.build import BuildConfig, build

    fused = tmp_path / "fused"
    manifest = build(BuildConfig(model="tiny", precision=precision, random_weights=True, seed=0, out=fused,
                                 fused_attention=True))
    graph = onnx.load(str(fused / "unet" / "model.onnx"))
    mha = [n for n in graph.graph.node if n.op_type == "MultiHeadAttention" and n.domain == "com.microsoft"]
    assert mha and manifest["components"]["unet"]["kernels"] == [f"MultiHeadAttention x{len(mha)}"]
    assert not [n for n in graph.graph.node if n.op_type == "Softmax"]  # no unfused attention left
    assert all(r["passed"] for r in manifest["components"]["unet"]["verification"].values())
    plain = tiny_bundle if precision == "fp32" else tmp_path / "plain"
    if precision == "fp16":
        build(BuildConfig(model="tiny", precision="fp16", random_weights=True, seed=0, out=plain))
    kw = dict(num_inference_steps=4, guidance_scale=5.0, seed=3)
    a = np.asarray(Pipeline.from_bundle(plain)("a red circle", **kw)[0]).astype(int)
    b = np.asarray(Pipeline.from_bundle(fused, low_memory=True)("a red circle", **kw)[0]).astype(int)
    assert np.abs(a - b).max() <= (1 if precision == "fp32" else 3)


@pytest.mark.parametrize("args,text", [
    (dict(target="cuda"), "--target cuda fuses attention already"),
    (dict(model="tiny-sd3"), "tiny-sd3 has no UNet"),
])
def test_fused_attention_needs_a_cpu_unet_build(tmp_path, args, text):
    from ldm_export.export.build import BuildConfig, validate
    from ldm_export.runtime.errors import LdmExportError

    cfg = BuildConfig(**{"model": "tiny", "random_weights": True, "out": tmp_path / "b", "fused_attention": True, **args})
    with pytest.raises(LdmExportError, match=text):
        validate(cfg)
    assert not (tmp_path / "b").exists()


def test_engines_refuse_a_fused_attention_cpu_bundle_in_one_line(tmp_path):
    from conftest import run_cli

    out = tmp_path / "fused"
    r = run_cli("build", "--model", "tiny", "--random-weights", "--fused-attention", "--out", str(out))
    assert r.returncode == 0, r.stderr
    r = run_cli("engines", str(out), "--components", "unet", "--compute-capability", "8.6")
    line = r.stderr.strip()
    assert r.returncode != 0 and "\n" not in line
    assert "MultiHeadAttention" in line and "--target cpu --fused-attention" in line and "--target tensorrt" in line
