"""The runtime pipeline: parity with diffusers' StableDiffusionPipeline, CFG modes, bad input, the generate CLI."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli
from ldm_export.runtime.bundle import Bundle
from ldm_export.runtime.errors import LdmExportError
from ldm_export.runtime.pipeline import Pipeline


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


@pytest.fixture(scope="module")
def pipe(tiny_bundle):
    return Pipeline.from_bundle(tiny_bundle)


class CountingEngine:
    """Wraps an engine and records the batch size of every call."""

    def __init__(self, engine):
        self.engine, self.spec, self.calls = engine, engine.spec, []

    def run(self, feeds):
        self.calls.append(next(iter(feeds.values())).shape[0] if next(iter(feeds.values())).ndim else 1)
        return self.engine.run(feeds)


@pytest.mark.parametrize("scheduler", [None, "Euler a", "DPM++ 2M Karras", "DDIM"])
def test_parity_with_diffusers_pipeline(tiny_bundle, tmp_path, scheduler):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from transformers import CLIPTokenizer

    from ldm_export.export.weights import load_weights
    from ldm_export.runtime.schedulers import resolve_scheduler
    from ldm_export.zoo import TINY

    mods = load_weights(TINY, None, random_weights=True, seed=0).modules  # the weights the bundle was built from
    bundle = Bundle.open(tiny_bundle)
    cfg = bundle.scheduler_config if scheduler is None else resolve_scheduler(scheduler, bundle.scheduler_config)
    sched_cls = getattr(diffusers, cfg["_class_name"])
    ref = diffusers.StableDiffusionPipeline(
        vae=mods["vae"], text_encoder=mods["text_encoder"], tokenizer=CLIPTokenizer.from_pretrained(tiny_bundle / "tokenizer"),
        unet=mods["unet"], scheduler=sched_cls.from_config({k: v for k, v in cfg.items() if k != "_class_name"}),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    latents = np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)
    # the stochastic samplers draw the same noise on both sides
    draws = np.random.default_rng(2).standard_normal((64, 1, 4, 8, 8)).astype(np.float32)
    k = {"i": 0}

    def noise(shape):
        k["i"] += 1
        return draws[k["i"] - 1].reshape(shape).astype(np.float64)

    j = {"i": 0}

    def fake_randn(shape, generator=None, device=None, dtype=None, layout=None):
        j["i"] += 1
        return torch.from_numpy(draws[j["i"] - 1].reshape(shape)).to(dtype or torch.float32)

    import diffusers.schedulers.scheduling_euler_ancestral_discrete as ea
    import diffusers.schedulers.scheduling_ddim as dd
    orig = (ea.randn_tensor, dd.randn_tensor)
    ea.randn_tensor = dd.randn_tensor = fake_randn
    try:
        with torch.no_grad():
            expected = ref("a red circle on the left", negative_prompt="blurry", num_inference_steps=8, guidance_scale=7.5,
                           latents=torch.from_numpy(latents), output_type="np").images[0]
    finally:
        ea.randn_tensor, dd.randn_tensor = orig
    ours = Pipeline.from_bundle(tiny_bundle)
    img = ours("a red circle on the left", negative_prompt="blurry", num_inference_steps=8, guidance_scale=7.5,
               latents=latents, scheduler=scheduler, noise=noise)[0]
    got = np.asarray(img, dtype=np.float64) / 255.0
    assert got.shape == expected.shape
    # diffusers' image is not rounded to 8 bits; compare at 8-bit precision on both sides
    assert psnr(got, np.round(expected * 255) / 255) >= 40.0


def test_cfg_batch2_and_sequential_agree_and_scale_one_skips_uncond(tiny_bundle):
    a = Pipeline.from_bundle(tiny_bundle, cfg_mode="batch2")
    b = Pipeline.from_bundle(tiny_bundle, cfg_mode="sequential")
    a.engines["unet"] = ca = CountingEngine(a.engines["unet"])
    b.engines["unet"] = cb = CountingEngine(b.engines["unet"])
    la = a("a blue square", num_inference_steps=3, guidance_scale=5.0, seed=3, return_latents=True)
    lb = b("a blue square", num_inference_steps=3, guidance_scale=5.0, seed=3, return_latents=True)
    np.testing.assert_allclose(la, lb, rtol=1e-4, atol=1e-5)
    assert set(ca.calls) == {2} and set(cb.calls) == {1} and len(cb.calls) == 2 * len(ca.calls)
    ca.calls.clear()
    a("a blue square", num_inference_steps=3, guidance_scale=1.0, seed=3, return_latents=True)
    assert set(ca.calls) == {1}  # no unconditional pass


class DeviceLikeEngine:
    """A static-shape engine that keeps its inputs between calls, like CudaEngine: run() sets all, run_partial() some."""

    def __init__(self, engine):
        self.engine, self.static, self.held, self.fed = engine, True, {}, []
        self.spec = engine.spec.static({"batch": 2, "height": 8, "width": 8, "sequence": 77})

    def run(self, feeds):
        self.held = {}
        return self.run_partial(feeds)

    def run_partial(self, feeds):
        self.fed.append(sorted(feeds))
        self.held.update({k: np.array(v) for k, v in feeds.items()})  # copies, as a device buffer would
        return self.engine.run(self.held)


def test_sampler_loop_binds_the_embeddings_once(tiny_bundle):
    plain = Pipeline.from_bundle(tiny_bundle)
    dev = Pipeline.from_bundle(tiny_bundle)
    dev.engines["unet"] = e = DeviceLikeEngine(dev.engines["unet"])
    for _ in range(2):  # a second image binds its own embeddings again
        e.fed.clear()
        got = dev("a green triangle", num_inference_steps=4, seed=5, return_latents=True)
        assert e.fed[0] == ["encoder_hidden_states", "sample", "timestep"]
        assert e.fed[1:] == [["sample", "timestep"]] * (len(e.fed) - 1) and len(e.fed) >= 4
    np.testing.assert_array_equal(got, plain("a green triangle", num_inference_steps=4, seed=5, return_latents=True))
    other = dev("a purple circle", num_inference_steps=4, seed=5, return_latents=True)
    np.testing.assert_array_equal(other, plain("a purple circle", num_inference_steps=4, seed=5, return_latents=True))


class SlotEngine:
    """A static batch-1 engine with device slots, like CudaEngine for a ``--sequential-cfg`` bundle: each slot keeps
    the inputs last copied into it; ``run`` is slot 0 with every input."""

    max_slots = 8

    def __init__(self, engine):
        self.engine, self.static, self.held, self.fed = engine, True, {}, []
        self.spec = engine.spec.static({"batch": 1, "height": 8, "width": 8, "sequence": 77})

    def run(self, feeds):
        self.held.pop(0, None)
        return self.run_partial(feeds)

    def run_partial(self, feeds, slot=0):
        self.fed.append((slot, sorted(feeds)))
        held = self.held.setdefault(slot, {})
        held.update({k: np.array(v) for k, v in feeds.items()})  # copies, as a device buffer would
        assert sorted(held) == sorted(self.spec.input_names), f"slot {slot} run with inputs never fed"
        return self.engine.run(held)


def test_batch1_engine_keeps_each_cfg_half_in_its_own_slot(tiny_bundle):
    """CFG on a static batch-1 engine: the negative's embeddings in slot 0, the prompt's in slot 1, bound on the
    first step; later steps copy only the latents and timestep into each. Same image as the plain engine."""
    plain = Pipeline.from_bundle(tiny_bundle)
    dev = Pipeline.from_bundle(tiny_bundle)
    dev.engines["unet"] = e = SlotEngine(dev.engines["unet"])
    got = dev("a green triangle", num_inference_steps=4, seed=5, return_latents=True)
    everything = ["encoder_hidden_states", "sample", "timestep"]
    assert e.fed[:2] == [(0, everything), (1, everything)]
    assert e.fed[2:] == [(0, ["sample", "timestep"]), (1, ["sample", "timestep"])] * ((len(e.fed) - 2) // 2)
    assert len(e.fed) >= 8 and len(e.fed) % 2 == 0
    np.testing.assert_allclose(got, plain("a green triangle", num_inference_steps=4, seed=5, return_latents=True),
                               rtol=1e-5, atol=1e-6)
    e.fed.clear()  # three images in one batch: six halves, one slot each
    three = dev("a red circle", num_inference_steps=2, seed=1, num_images=3, batch_size=3, return_latents=True)
    assert sorted({slot for slot, _ in e.fed}) == list(range(6))
    e.fed.clear()  # five: ten halves, more than the engine's slots: every input copied each call, chunk by chunk
    five = dev("a red circle", num_inference_steps=2, seed=1, num_images=5, batch_size=5, return_latents=True)
    assert {slot for slot, _ in e.fed} == {0} and all(names == everything for _, names in e.fed)
    np.testing.assert_allclose(three, five[:3], rtol=1e-5, atol=1e-6)


def test_same_seed_same_image_and_metadata(pipe, tiny_bundle):
    x = pipe("a red circle", num_inference_steps=2, seed=7, scheduler="Euler a")[0]
    y = pipe("a red circle", num_inference_steps=2, seed=7, scheduler="Euler a")[0]
    z = pipe("a red circle", num_inference_steps=2, seed=8, scheduler="Euler a")[0]
    assert np.array_equal(np.asarray(x), np.asarray(y)) and not np.array_equal(np.asarray(x), np.asarray(z))
    params = x.info["parameters"]
    assert params.startswith("a red circle\nSteps: 2, Sampler: Euler a, CFG scale: 7.5, Seed: 7, Size: 64x64, ")
    assert f"Model hash: {Bundle.open(tiny_bundle).model_hash}" in params


def test_num_images_and_empty_prompt(pipe):
    images = pipe("", num_inference_steps=2, seed=1, num_images=3)
    assert len(images) == 3 and all(i.size == (64, 64) for i in images)
    assert len({np.asarray(i).tobytes() for i in images}) == 3


@pytest.mark.parametrize("kwargs,message", [
    ({"prompt": 42}, "prompt must be a string"),
    ({"prompt": "x", "num_inference_steps": 0}, "steps must be an integer from 1 to 500"),
    ({"prompt": "x", "num_inference_steps": 100000}, "steps must be an integer from 1 to 500"),
    ({"prompt": "x", "width": 60}, "width must be a positive multiple of 16 px"),
    ({"prompt": "x", "scheduler": "Warp drive"}, "Warp drive"),
    ({"prompt": "x", "latents": np.zeros((1, 4, 4, 4))}, "latents must have shape (1, 4, 8, 8)"),
])
def test_bad_input(pipe, kwargs, message):
    with pytest.raises(LdmExportError) as e:
        pipe(**kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_nan_from_engine_names_component_and_step(tiny_bundle):
    p = Pipeline.from_bundle(tiny_bundle)
    real = p.engines["unet"]

    class NanAfterTwo:
        spec, n = real.spec, 0

        def run(self, feeds):
            self.n += 1
            out = real.run(feeds)
            if self.n > 2:
                out["out_sample"][:] = np.nan
            return out

    p.engines["unet"] = NanAfterTwo()
    with pytest.raises(LdmExportError, match=r"unet produced NaN in 'out_sample' at step 3 of 5") as e:
        p("x", num_inference_steps=5, seed=0, scheduler="Euler")
    # an fp32 graph: no rebuild flag helps, so none is offered
    assert p.bundle.precision("unet") == "fp32"
    assert "already runs in fp32" in str(e.value) and "--precision" not in str(e.value)


def test_overflow_fix_fits_the_precision():
    from ldm_export.runtime.errors import overflow_fix, overflow_message

    assert overflow_fix("vae_decoder", "fp16") == "rebuild with --no-half-vae (the decoder in fp32)"
    assert overflow_fix("unet", "fp16") == "rebuild with --precision fp32"
    assert overflow_fix("transformer") == "rebuild with --precision fp32"  # precision unknown: the fp16 advice
    fp32 = overflow_message("vae_decoder", "fp32")
    assert "the latents it decoded" in fp32 and "--no-half-vae" not in fp32 and "overflows at this precision" not in fp32
    assert overflow_message("unet", "fp16").startswith("the graph overflows at this precision: rebuild with --precision fp32")


def test_bundle_damage_is_refused(tiny_bundle, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_bundle, bad)
    (bad / "vae_decoder" / "model.onnx").write_bytes(b"not a model")
    with pytest.raises(LdmExportError, match="sha256 mismatch in vae_decoder/model.onnx"):
        Pipeline.from_bundle(bad, verify=True)
    (bad / "vae_decoder" / "model.onnx").unlink()
    with pytest.raises(LdmExportError, match="missing vae_decoder/model.onnx"):
        Pipeline.from_bundle(bad)
    newer = tmp_path / "newer"
    shutil.copytree(tiny_bundle, newer)
    m = json.loads((newer / "ldm_export.json").read_text())
    m["format_version"] = 99
    (newer / "ldm_export.json").write_text(json.dumps(m))
    with pytest.raises(LdmExportError, match="format version 99 is newer"):
        Pipeline.from_bundle(newer)


def test_engine_checks_inputs_against_spec(pipe):
    eng = pipe.engines["unet"]
    with pytest.raises(LdmExportError, match=r"unet.sample: expected dtype float32, got float64"):
        eng.run({"sample": np.zeros((1, 4, 8, 8)), "timestep": np.float32(1), "encoder_hidden_states": np.zeros((1, 77, 32), np.float32)})
    with pytest.raises(LdmExportError, match=r"expected inputs"):
        eng.run({"sample": np.zeros((1, 4, 8, 8), np.float32)})


def test_generate_cli_writes_png_with_a1111_parameters(tiny_bundle, tmp_path):
    out = tmp_path / "img.png"
    r = run_cli("generate", str(tiny_bundle), "a green triangle, top", "--negative", "blurry", "--steps", "3",
                "--cfg", "5", "--sampler", "DPM++ 2M Karras", "--seed", "11", "--out", str(out))
    assert r.returncode == 0, r.stderr
    text = Image.open(out).text["parameters"]
    assert text.splitlines()[0] == "a green triangle, top" and text.splitlines()[1] == "Negative prompt: blurry"
    assert "Steps: 3, Sampler: DPM++ 2M Karras, CFG scale: 5, Seed: 11, Size: 64x64" in text


@pytest.mark.parametrize("args,message", [
    (["--size", "63x64"], "width must be a positive multiple of 16 px"),
    (["--size", "big"], "--size must look like 512x512"),
    (["--steps", "0"], "steps must be an integer"),
    (["--sampler", "nope"], "unknown sampler"),
])
def test_generate_cli_bad_input(tiny_bundle, tmp_path, args, message):
    r = run_cli("generate", str(tiny_bundle), "x", "--out", str(tmp_path / "o.png"), *args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "o.png").exists()


def test_missing_gpu_provider_falls_back_to_cpu_with_one_warning(tiny_bundle, caplog):
    import onnxruntime as ort

    from ldm_export.runtime import engine

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: nothing to fall back from")
    engine._WARNED.discard("cuda")
    with caplog.at_level("WARNING", logger="ldm_export.runtime.engine"):
        p = Pipeline.from_bundle(tiny_bundle, provider="cuda")
    warnings = [r for r in caplog.records if "falling back to the CPU" in r.getMessage()]
    assert len(warnings) == 1 and "install onnxruntime-gpu" in warnings[0].getMessage()
    assert all(e.providers == ["CPUExecutionProvider"] for e in p.engines.values())
    assert len(p("x", num_inference_steps=2, seed=0)) == 1
    with pytest.raises(LdmExportError, match="unknown provider 'tpu'"):
        Pipeline.from_bundle(tiny_bundle, provider="tpu")


def test_cuda_engine_choices_per_component(tiny_bundle, tmp_path, monkeypatch):
    """What the runtime asks of the CUDA engine: channels-last (and, for static fp16 bundles, cuDNN's conv+bias
    fusion) for the UNet and VAE decoder; no CUDA graph for the text encoder; extra options on top."""
    import ldm_export.runtime.engine_cuda as ec
    from ldm_export.export.build import BuildConfig, build
    from ldm_export.runtime.bundle import Bundle
    from ldm_export.runtime.pipeline import cuda_engine

    seen = {}

    class Recorder:
        def __init__(self, path, spec, **kw):
            seen[spec.name] = kw

    monkeypatch.setattr(ec, "CudaEngine", Recorder)
    b16 = tmp_path / "b16"
    build(BuildConfig(model="tiny", precision="fp16", random_weights=True, static_shape=True, out=b16))
    monkeypatch.delenv("LDM_EXPORT_CUDNN_SEARCH", raising=False)
    for comp in ("text_encoder", "unet", "vae_decoder"):
        cuda_engine(Bundle.open(b16), comp, extra_options={"sdpa_kernel": "8"})
    search = {"conv_algo_search": "HEURISTIC"}
    assert seen["unet"] == seen["vae_decoder"] == {"prefer_nhwc": True, "cuda_graph": None, "graph_fallback": False,
                                                   **search, "provider_options": {"sdpa_kernel": "8"},
                                                   "precision": "fp16"}
    assert seen["text_encoder"] == {"prefer_nhwc": False, "cuda_graph": False, "graph_fallback": False, **search,
                                    "provider_options": {"sdpa_kernel": "8"}, "precision": "fp16"}
    # conv+bias fusion only when asked for (its kernels compile at first use); fp32 and dynamic bundles likewise
    cuda_engine(Bundle.open(b16), "unet", extra_options={"fuse_conv_bias": "1"})
    assert seen["unet"]["provider_options"] == {"fuse_conv_bias": "1"}
    cuda_engine(Bundle.open(tiny_bundle), "unet")  # (its precision picks the fix a NaN/Inf refusal names)
    assert seen["unet"] == {"prefer_nhwc": True, "cuda_graph": None, "graph_fallback": False, **search,
                            "provider_options": {}, "precision": "fp32"}
    cuda_engine(Bundle.open(b16), "unet", tuned=False)  # the bench's plain `ort` backend
    assert seen["unet"] == {"prefer_nhwc": False, "cuda_graph": None, "graph_fallback": False, **search,
                            "provider_options": {}, "precision": "fp16"}
    # cuDNN's search: an argument, ONNX Runtime's option name (bench --cuda-option), or the environment
    cuda_engine(Bundle.open(b16), "unet", cudnn_search="exhaustive")
    assert seen["unet"]["conv_algo_search"] == "EXHAUSTIVE"
    cuda_engine(Bundle.open(b16), "unet", extra_options={"cudnn_conv_algo_search": "DEFAULT"})
    assert seen["unet"]["conv_algo_search"] == "DEFAULT" and seen["unet"]["provider_options"] == {}
    monkeypatch.setenv("LDM_EXPORT_CUDNN_SEARCH", "EXHAUSTIVE")
    cuda_engine(Bundle.open(b16), "unet")
    assert seen["unet"]["conv_algo_search"] == "EXHAUSTIVE"
    monkeypatch.setenv("LDM_EXPORT_CUDNN_SEARCH", "fastest")
    with pytest.raises(LdmExportError, match="LDM_EXPORT_CUDNN_SEARCH"):
        cuda_engine(Bundle.open(b16), "unet")


def test_cuda_engine_refuses_options_it_sets_itself(tiny_bundle):
    from ldm_export.runtime.bundle import Bundle
    from ldm_export.runtime.engine_cuda import CudaEngine

    b = Bundle.open(tiny_bundle)
    with pytest.raises(LdmExportError, match=r"\['enable_cuda_graph'\] are set by CudaEngine's own arguments"):
        CudaEngine(b.model_path("unet"), b.spec("unet"), provider_options={"enable_cuda_graph": "1"})


def _has_cuda_provider() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.skipif(not _has_cuda_provider(), reason="needs onnxruntime-gpu with the CUDA provider and a GPU")
def test_cuda_pipeline_on_a_cuda_bundle_matches_the_cpu_image(tiny_bundle, tmp_path):
    """The runtime's CUDA path end to end (fused kernels, channels-last, CUDA graphs, the text
    encoder without one) draws the image the CPU draws from an fp32 bundle of the same weights."""
    from ldm_export.export.build import BuildConfig, build

    out = tmp_path / "tiny-cuda-fp16"
    build(BuildConfig(model="tiny", precision="fp16", random_weights=True, seed=0, static_shape=True, target="cuda", out=out))
    gpu = Pipeline.from_bundle(out, provider="cuda")
    opts = gpu.engines["unet"].session.get_provider_options()["CUDAExecutionProvider"]
    # no conv+bias runtime fusion by default: its kernels compile at first use (the first image's time)
    assert opts["fuse_conv_bias"] == "0" and opts["prefer_nhwc"] == "1" and opts["enable_cuda_graph"] == "1"
    assert gpu.engines["text_encoder"].session.get_provider_options()["CUDAExecutionProvider"]["enable_cuda_graph"] == "0"
    a = np.asarray(gpu("a red circle", num_inference_steps=4, seed=1)[0], np.float64)
    b = np.asarray(Pipeline.from_bundle(tiny_bundle)("a red circle", num_inference_steps=4, seed=1)[0], np.float64)
    psnr = 10 * np.log10(255.0 ** 2 / max(np.mean((a - b) ** 2), 1e-12))
    assert psnr >= 25, psnr
