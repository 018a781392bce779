"""`ldm-export bench`: statistics, fidelity metrics, reports, the CLI's checks, and one tiny CPU run end to end."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from ldm_export.bench.run import image_fidelity, markdown, stats, write_reports
from ldm_export.runtime.errors import LdmExportError

from conftest import run_cli, torch_available


def test_stats_median_and_p90():
    s = stats([0.001 * k for k in range(1, 11)])  # 1..10 ms
    assert s["median_ms"] == pytest.approx(5.5) and s["p90_ms"] == pytest.approx(9.1) and s["n"] == 10


def test_image_fidelity_analytic():
    ref = np.zeros((1, 3, 4, 4))
    assert image_fidelity(ref + 0.5, ref + 0.5) == {"cosine": pytest.approx(1.0), "psnr_db": math.inf, "finite": True}
    # a uniform error of 0.2 in [-1, 1] is 0.1 in [0, 1]: MSE 0.01, PSNR 20 dB
    assert image_fidelity(ref + 0.7, ref + 0.5)["psnr_db"] == pytest.approx(20.0)
    assert image_fidelity(ref + np.nan, ref + 0.5)["finite"] is False


def _result():
    comp = {k: {"median_ms": v, "p90_ms": v * 1.1, "min_ms": v, "n": 3} for k, v in
            (("text_encoder", 2.0), ("unet_step", 10.0), ("vae_decode", 5.0))}
    entry = lambda e2e: {"precision": "fp16", "components": comp, "end_to_end": {"median_ms": e2e, "p90_ms": e2e, "min_ms": e2e, "n": 2},  # noqa: E731
                         "fidelity": {"cosine": 0.99999, "psnr_db": 50.0, "finite": True}, "gpu_memory_peak_mb": 1000.0}
    return {"model": "sd15", "weights": "random", "device": "cuda", "gpu": "H100", "resolution": 512, "steps": 50,
            "guidance_scale": 7.5, "repeats": 3, "e2e_repeats": 2, "host_step_overhead_ms": 0.4,
            "backends": {"torch-eager": entry(2000.0), "ort": entry(500.0), "tensorrt": {"skipped": "not installed"}}}


def test_int8_speedup_line():
    r = _result()
    r["backends"]["ort-int8"] = json.loads(json.dumps(r["backends"]["ort"]))
    r["backends"]["ort-int8"]["components"]["unet_step"]["median_ms"] = 4.0
    r["backends"]["ort-int8"]["end_to_end"]["median_ms"] = 400.0
    assert "int8 against fp32 (ort-int8 vs ort, same run): UNet step 2.50×, end to end 1.25× faster." in markdown(r)
    assert "int8 against fp32" not in markdown(_result())
    r["int8_paired"] = {"unet_step": {"pairs": 4, "ratio_median": 1.8, "ratio_min": 1.5, "ratio_max": 2.1},
                        "end_to_end": {"pairs": 2, "ratio_median": 1.4, "ratio_min": 1.3, "ratio_max": 1.5}}
    assert ("int8 against fp32 timed in alternation (fp32/int8 per pair, both loaded, same feeds): UNet step 1.80× "
            "(median of 4 pairs, 1.50 to 2.10), end to end 1.40× (median of 2 pairs, 1.30 to 1.50).") in markdown(r)
    r["bundle_precision"] = "fp16"  # on a GPU the int8 graphs are compared with the fp16 bundle: named as such
    assert "int8 against fp16 (ort-int8 vs ort, same run)" in markdown(r) and "fp32" not in markdown(r).split("| ort-int8")[-1]


def test_int8_pairs_alternate_and_divide_fp32_by_int8(monkeypatch):
    """Two stand-in backends of fixed speeds: the pairs alternate who goes first, every timed call is after the
    warm-up, and the ratio is fp32 time / int8 time."""
    import time as _time

    from ldm_export.bench import run as R

    calls = []

    class Fake:
        def __init__(self, name, seconds):
            self.name, self.seconds = name, seconds

        def denoise(self, *a):
            calls.append(self.name)
            _time.sleep(self.seconds)

    monkeypatch.setattr(R, "end_to_end", lambda b, *a: b.denoise())
    cfg = R.BenchConfig(repeats=4, e2e_repeats=2, warmup=1, steps=2)
    out = R._pairs({"fp32": Fake("fp32", 0.03), "int8": Fake("int8", 0.01)}, cfg, None, None, None, None, {}, 64)
    assert calls[:2] == ["fp32", "int8"]  # warm-up
    assert calls[2:10] == ["fp32", "int8", "int8", "fp32", "fp32", "int8", "int8", "fp32"]
    assert calls[10:12] == ["fp32", "int8"] and len(calls) == 16  # the end-to-end warm-up, then 2 pairs
    assert out["unet_step"]["pairs"] == 4 and out["end_to_end"]["pairs"] == 2
    assert 2.0 < out["unet_step"]["ratio_median"] < 3.5  # 30 ms / 10 ms, give or take the sleep's slack


def test_int8_pairing_failure_keeps_the_table(tmp_path):
    r = _result()
    r["int8_paired"] = {"error": "RuntimeError: out of memory"}
    assert "int8 against fp32 timed in alternation: failed (RuntimeError: out of memory)." in markdown(r)


def test_reports_table_and_files(tmp_path):
    md = markdown(_result())
    assert "| ort | fp16 | 2.00 (2.20) | 10.00 (11.00) | 5.00 (5.50) | 0.500 (0.500) | 4.00× |" in md
    assert "skipped: not installed" in md
    write_reports(_result(), tmp_path)
    assert json.loads((tmp_path / "bench_sd15_cuda.json").read_text())["backends"]["ort"]["end_to_end"]["median_ms"] == 500.0
    assert (tmp_path / "bench_sd15_cuda.png").stat().st_size > 1000


def cuda_provider_available() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def test_cli_refuses_unknown_backend():
    r = run_cli("bench", "--backends", "torch-eager,onnx")
    assert r.returncode == 2 and "unknown backend 'onnx'" in r.stderr
    r = run_cli("bench", "--warmup", "-1")
    assert r.returncode == 2 and "--warmup must be 0 or more runs, got -1" in r.stderr


def test_bench_options_that_cannot_work_are_refused_before_any_timing(tiny_bundle, tmp_path):
    (tmp_path / "afile").write_text("x")
    common = ("bench", "--device", "cpu", "--bundle", str(tiny_bundle), "--backends", "ort", "--steps", "1",
              "--repeats", "1", "--e2e-repeats", "1", "--warmup", "0")
    for extra, message in (
            (("--out", str(tmp_path / "afile")), "is a file; the bench writes its reports into a folder"),
            (("--out", str(tmp_path / "afile" / "x")), "which is a file, not a folder"),
            (("--model", "tiny"), "with --bundle the bundle's own model is timed: pass one of them"),
            (("--threads", "0"), "--threads must be a positive integer, got 0"),
            (("--guidance-scale", "1"), "--guidance-scale must be above 1 and at most 100, got 1"),
            (("--guidance-scale", "nan"), "--guidance-scale must be above 1 and at most 100, got nan")):
        r = run_cli(*common, *extra)
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, (extra, r.stderr)
    if not cuda_provider_available():
        r = run_cli("bench")  # the default device is cuda; its bundle would be a cuda build
        assert r.returncode == 2 and "this machine has no CUDA provider" in r.stderr and "--device cpu" in r.stderr


@pytest.mark.slow
@pytest.mark.skipif(not torch_available(), reason="needs torch and diffusers")
def test_tiny_cpu_bench_end_to_end(tiny_bundle, tmp_path):
    r = run_cli("bench", "--bundle", str(tiny_bundle), "--device", "cpu", "--backends", "torch-eager,ort,tensorrt",
                "--steps", "2", "--repeats", "2", "--e2e-repeats", "1", "--warmup", "1", "--threads", "1", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "bench_tiny_cpu.json").read_text())
    assert res["backends"]["tensorrt"]["skipped"] == "TensorRT engines run on a CUDA GPU: use --device cuda"
    for name in ("torch-eager", "ort"):  # same weights, latents and sampler: the images agree with PyTorch fp32
        e = res["backends"][name]
        assert e["fidelity"]["cosine"] > 0.9999, e
        # PNDM's first PLMS step evaluates the UNet twice: steps + 1 calls, each timed inside the loop
        assert e["end_to_end_unet_calls"] == 3 and 0 < e["end_to_end_unet_call_ms"] * 3 / 2 < e["end_to_end_loop_per_step_ms"]
        assert e["end_to_end_host_per_step_ms"] > 0


def test_kernel_kinds_of_real_kernel_names():
    from ldm_export.bench.kernel_profile import kind_of

    assert kind_of("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize128x128x64") == "conv"
    assert kind_of("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1") == "gemm"
    assert kind_of("void flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 64, 4>>") == "attention"
    assert kind_of("void onnxruntime::contrib::cuda::GroupNormNHWCSumKernel<half>") == "groupnorm"
    assert kind_of("void onnxruntime::cuda::Transpose3DKernel<unsigned short>") == "transpose"
    assert kind_of("Memcpy HtoD (Pageable -> Device)") == "copy"
    assert kind_of("void onnxruntime::cuda::_BinaryElementWiseSimple<half, half, half, OP_Add<half>>") == "elementwise"
    assert kind_of("void op_generic_tensor_kernel<4, __half, float, __half, 256, (cudnnGenericOp_t)0>") == "conv bias"
    assert kind_of("nvjet_sm90_hsh_320x128_64x3_1x2_h_bz_coopB_NNT") == "gemm"
    assert kind_of("some_unknown_kernel") == "other"


def test_reports_show_the_kernel_profile():
    from ldm_export.bench.kernel_profile import format_profile

    r = _result()
    prof = {"runs": 5, "kernels_per_run": 700, "device_ms_per_run": 7.5,
            "by_kind": [{"kind": "conv", "ms_per_run": 3.0, "calls_per_run": 98, "share": 0.4},
                        {"kind": "gemm", "ms_per_run": 4.5, "calls_per_run": 180, "share": 0.6}], "top_kernels": []}
    r["backends"]["ort"]["profile"] = {"unet": prof, "vae_decoder": prof}
    md = markdown(r)
    assert "GPU kernels of one unet run (ort, as benchmarked): 7.500 ms of kernels a run, 700 kernels" in md
    assert "| conv | 3.000 | 98 | 40.0% |" in md
    assert format_profile(prof, "x").count("\n") == 5


def test_report_names_the_components_that_ran_as_cuda_graphs():
    from ldm_export.bench.run import graphed

    class E:
        def __init__(self, g):
            self.cuda_graph = g

    engines = {"text_encoder": E(False), "transformer": E(True), "vae_decoder": E(True), "cpu_engine": object()}
    assert graphed(engines) == ["transformer", "vae_decoder"]
    r = _result()
    r["backends"]["ort"]["cuda_graphs"] = graphed(engines)
    assert "ort: CUDA graphs: transformer, vae_decoder." in markdown(r)
    r["backends"]["ort"]["cuda_graphs"] = graphed({"transformer": E(False)})  # fell back at its first run
    assert "ort: CUDA graphs: none." in markdown(r)


def test_dit_bench_profiles_the_transformer_and_decoder_or_says_why_not(monkeypatch):
    """``bench --profile`` of a DiT bundle: the transformer step and the decode as the engines replay them; a
    dynamic-shape bundle, or a profiler that sees no kernel, gives the reason in the report instead."""
    from ldm_export.bench import dit, kernel_profile

    class Engine:
        def __init__(self, static):
            self.static, self.replays = static, 0

        def replay(self):
            self.replays += 1

    def fake_profile(fn, runs):
        for _ in range(runs):
            fn()
        return {"runs": runs, "kernels_per_run": 900, "device_ms_per_run": 31.0,
                "by_kind": [{"kind": "gemm", "ms_per_run": 20.0, "calls_per_run": 300, "share": 0.65}], "top_kernels": []}

    monkeypatch.setattr(kernel_profile, "profile_kernels", fake_profile)
    engines = {"text_encoder": Engine(False), "transformer": Engine(True), "vae_decoder": Engine(True)}
    got = dit._profile(engines, "transformer", runs=3)
    assert set(got["profile"]) == {"transformer", "vae_decoder"} and engines["transformer"].replays == 3
    assert engines["text_encoder"].replays == 0
    r = _result()
    r["backends"]["ort"].update(got)
    assert "GPU kernels of one transformer run (ort, as benchmarked): 31.000 ms of kernels a run, 900 kernels" in markdown(r)
    engines["transformer"].static = False
    skipped = dit._profile(engines, "transformer")
    assert "static-shape" in skipped["profile_skipped"]
    r["backends"]["ort"].pop("profile")
    r["backends"]["ort"].update(skipped)
    assert "ort: no kernel profile: the kernel profile replays bound inputs" in markdown(r)
    engines["transformer"].static = True
    monkeypatch.setattr(kernel_profile, "profile_kernels", lambda fn, runs: {"kernels_per_run": 0})
    assert "no GPU kernels" in dit._profile(engines, "transformer")["profile_skipped"]


def test_cli_cuda_option_needs_key_value_and_a_cuda_device(tiny_bundle):
    r = run_cli("bench", "--bundle", str(tiny_bundle), "--device", "cpu", "--cuda-option", "fuse_conv_bias")
    assert r.returncode == 2 and "--cuda-option takes KEY=VALUE" in r.stderr
    r = run_cli("bench", "--bundle", str(tiny_bundle), "--device", "cpu", "--cuda-option", "fuse_conv_bias=1")
    assert r.returncode == 2 and "it needs --device cuda" in r.stderr and "Traceback" not in r.stderr


def test_cli_refuses_profile_where_it_would_be_ignored_before_building_anything(tmp_path):
    """--profile on the CPU, or without an ort backend, is refused at once: without --bundle the bench would
    otherwise build a model first (seconds here, many minutes for a large one) and then drop the profile."""
    for args, want in [(["--device", "cpu", "--profile"], "--profile records the GPU kernels"),
                       (["--device", "cpu", "--cuda-option", "fuse_conv_bias=1"], "it needs --device cuda"),
                       (["--device", "cuda", "--profile", "--backends", "torch-eager"], "add ort (or ort-nhwc)")]:
        r = run_cli("bench", "--model", "tiny", *args, "--out", str(tmp_path / "o"))
        assert r.returncode == 2 and want in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr and "building" not in r.stdout + r.stderr
    assert not (tmp_path / "o").exists()


def test_reports_show_the_host_side_fallback_profile_and_cuda_options():
    r = _result()
    r["cuda_options"] = {"fuse_conv_bias": "1"}
    r["backends"]["ort"]["profile"] = {"ort_unet_ops": {"per_step_ms_kernel_total": 20.8, "by_op": [
        {"op": "Conv", "ms_per_step": 4.6, "calls_per_step": 98, "share": 0.222}]}}
    r["backends"]["torch-eager"] = {"error": "RuntimeError: " + "x" * 500}
    md = markdown(r)
    assert "host-timed nodes 20.80 ms a step" in md and "| Conv | 4.600 | 98 | 22.2% |" in md
    assert "CUDA provider options for the ort backends: fuse_conv_bias=1." in md
    assert "x" * 300 not in md and "xxx... |" in md  # long errors are cut in the table


@pytest.mark.skipif(not torch_available(), reason="needs torch and diffusers")
def test_tensorrt_backend_runs_the_bundles_engines_or_says_why(tiny_bundle):
    """The tensorrt backend loads the plans `ldm-export engines` stored (as generate does); a bundle without engines
    for this machine's GPU is refused in one line, which bench records as the backend's skip reason."""
    from ldm_export.bench.run import OrtBackend

    with pytest.raises(LdmExportError) as e:
        OrtBackend(tiny_bundle, "cuda", native_tensorrt=True)
    assert "\n" not in str(e.value) and str(e.value)


@pytest.mark.skipif(not torch_available(), reason="needs torch")
def test_torch_backend_feeds_the_same_kind_of_tensor_in_components_and_the_sampler_loop():
    """torch.compile guards on a tensor's dispatch keys: feeds made outside inference_mode in the component timing
    and inside it in the sampler loop compiled every component twice, and the loop ran the second compilation."""
    import torch

    from ldm_export.bench.run import TorchBackend, end_to_end
    from ldm_export.export.weights import load_weights
    from ldm_export.zoo import get_model

    spec = get_model("tiny")
    modules = load_weights(spec, None, random_weights=True, seed=0).modules
    b = TorchBackend(modules, "cpu", "fp32", spec=spec)
    seen = []
    inner = b.w[b.denoiser]

    def recording(*args):
        seen.append(tuple(a.is_inference() for a in args if isinstance(a, torch.Tensor)))
        return inner(*args)

    b.w[b.denoiser] = recording
    side, ch = spec.latent_side, spec.vae["latent_channels"]
    rng = np.random.default_rng(0)
    ids = np.full((2, spec.max_length), 49407, np.int32)
    ids[:, 0] = 49406
    cond = spec.family_def.prepare(b.text(ids), width=spec.resolution, height=spec.resolution, guidance_scale=7.5)
    b.time_components(ids, rng.standard_normal((2, ch, side, side)).astype(np.float32), 500.0, cond,
                      rng.standard_normal((1, ch, side, side)).astype(np.float32), 1, 0)
    n_components = len(seen)
    end_to_end(b, ids, rng.standard_normal((1, ch, side, side)).astype(np.float32), dict(spec.scheduler), 2, 7.5,
               spec.resolution)
    assert n_components >= 2 and len(seen) > n_components
    assert {flags for flags in seen} == {seen[0]} and all(seen[0]), seen


def test_bench_prints_an_out_path_with_brackets_as_it_is(tiny_bundle, tmp_path):
    """Square brackets in --out are text, not console markup: '[/x]' (a closing tag) ended in a traceback after the
    reports were written."""
    out = tmp_path / "o[/x]"
    r = run_cli("bench", "--bundle", str(tiny_bundle), "--device", "cpu", "--backends", "ort", "--steps", "1",
                "--repeats", "1", "--e2e-repeats", "1", "--warmup", "0", "--threads", "1", "--out", str(out))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert f"wrote {out}/bench_tiny_cpu.json" in r.stderr.replace("\n", "")


@pytest.mark.skipif(not torch_available(), reason="needs torch and diffusers")
def test_bench_refuses_inpainting_and_names_a_damaged_bundle_on_one_line_with_a_failing_exit(tiny_bundle, tmp_path):
    """An inpainting bundle crashed in the PyTorch reference (9 input channels fed 4); a damaged bundle printed two
    chained tracebacks and exited 0."""
    import shutil

    r = run_cli("bench", "--model", "tiny-inpaint", "--device", "cpu", "--steps", "1", "--repeats", "1",
                "--backends", "torch-eager", "--out", str(tmp_path / "a"))
    assert r.returncode == 2 and "is an inpainting UNet (9 input channels" in r.stderr and "Traceback" not in r.stderr
    damaged = shutil.copytree(tiny_bundle, tmp_path / "damaged")
    with open(damaged / "unet" / "model.onnx", "r+b") as f:
        f.truncate(1000)
    r = run_cli("bench", "--bundle", str(damaged), "--device", "cpu", "--backends", "torch-eager,ort", "--steps", "1",
                "--repeats", "1", "--e2e-repeats", "1", "--warmup", "0", "--out", str(tmp_path / "b"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "backend ort failed: LdmExportError:" in r.stderr and "is not a readable ONNX graph" in r.stderr
    assert "the report holds the other backends" in r.stderr
    report = json.loads(next((tmp_path / "b").glob("*.json")).read_text())
    assert "components" in report["backends"]["torch-eager"] and "error" in report["backends"]["ort"]


def test_backend_variants_carry_their_own_cuda_provider_options():
    from ldm_export.bench.run import check_device_options, parse_backend

    assert parse_backend("ort-nhwc") == ("ort-nhwc", {})
    assert parse_backend("ort-nhwc:fuse_conv_bias=1:sdpa_kernel=1") == ("ort-nhwc", {"fuse_conv_bias": "1", "sdpa_kernel": "1"})
    for bad, want in [("onnx:x=1", "unknown backend 'onnx'"), ("torch-eager:x=1", "only ort, ort-nhwc, ort-int8 take"),
                      ("ort:fuse_conv_bias", "ort:KEY=VALUE"), ("ort:=1", "ort:KEY=VALUE"), ("ort:k=", "ort:KEY=VALUE")]:
        with pytest.raises(LdmExportError, match=want):
            parse_backend(bad)
    with pytest.raises(LdmExportError, match="they need --device cuda"):
        check_device_options("cpu", {}, False, ("torch-eager", "ort:fuse_conv_bias=1"))
    with pytest.raises(LdmExportError, match="names 'ort' twice"):
        check_device_options("cuda", {}, False, ("ort", "torch-eager", "ort"))
    with pytest.raises(LdmExportError, match="names 'ort:a=1' twice"):
        check_device_options("cuda", {}, False, ("ort:a=1", "ort: a=1"))
    with pytest.raises(LdmExportError, match="sets a twice"):
        parse_backend("ort:a=1:a=2")
    check_device_options("cuda", {}, True, ("ort-nhwc:fuse_conv_bias=1", "ort-nhwc"))  # variants side by side: fine


def test_cli_refuses_bad_backend_variants_before_any_work(tmp_path):
    for backends, want in [("torch-compile:mode=max-autotune", "only ort, ort-nhwc, ort-int8 take"),
                           ("ort-nhwc:fuse_conv_bias", "ort-nhwc:KEY=VALUE"),
                           ("ort,ort:fuse_conv_bias=1", "they need --device cuda"),
                           (",", "names no backend")]:
        r = run_cli("bench", "--model", "tiny", "--device", "cpu", "--backends", backends, "--out", str(tmp_path / "o"))
        assert r.returncode == 2 and want in r.stderr and "Traceback" not in r.stderr, (backends, r.stderr)
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
@pytest.mark.skipif(not torch_available(), reason="needs torch and diffusers")
def test_ort_variants_run_side_by_side_each_with_its_options(tiny_bundle, tmp_path, monkeypatch):
    """Two rows of one ONNX Runtime backend in one run, each engine opened with the run's --cuda-option and its own
    options over them (the provider options are recorded here: a CPU has no CUDA provider to take them)."""
    import ldm_export.bench.run as R
    from ldm_export.bench.run import BenchConfig, run_bench

    opened = []

    class Recording(R.OrtBackend):
        def __init__(self, path, device, threads=None, prefer_nhwc=False, cuda_options=None, native_tensorrt=False):
            opened.append(dict(cuda_options or {}))
            super().__init__(path, device, threads, prefer_nhwc)

    monkeypatch.setattr(R, "OrtBackend", Recording)
    monkeypatch.setattr(R, "check_device_options", lambda *a: None)  # the CPU would refuse provider options
    cfg = BenchConfig(model="tiny", bundle=tiny_bundle, device="cpu", backends=("ort", "ort:fuse_conv_bias=1:sdpa_kernel=8"),
                      steps=1, repeats=1, e2e_repeats=1, warmup=0, threads=1, out=tmp_path,
                      cuda_options={"fuse_conv_bias": "0", "tunable_op_enable": "1"})
    result = run_bench(cfg)
    assert opened == [{"fuse_conv_bias": "0", "tunable_op_enable": "1"},
                      {"fuse_conv_bias": "1", "tunable_op_enable": "1", "sdpa_kernel": "8"}]
    rows = result["backends"]
    assert list(rows) == ["ort", "ort:fuse_conv_bias=1:sdpa_kernel=8"]
    assert rows["ort:fuse_conv_bias=1:sdpa_kernel=8"]["cuda_options"] == {"fuse_conv_bias": "1", "sdpa_kernel": "8"}
    assert "cuda_options" not in rows["ort"] and all("end_to_end" in e for e in rows.values())
    assert "| ort:fuse_conv_bias=1:sdpa_kernel=8 | fp32 |" in (tmp_path / "bench_tiny_cpu.md").read_text()


@pytest.mark.skipif(not torch_available(), reason="needs torch")
def test_torch_backends_run_in_fp32_what_the_bundle_keeps_fp32(tiny_bundle):
    """The same work: SDXL's bundle keeps its VAE decoder fp32 (force_upcast), so the fp16 PyTorch rows decode in fp32
    too, as diffusers' SDXL pipeline does, instead of timing a cheaper decoder than the engine's."""
    import torch

    from ldm_export.bench.run import TorchBackend, fp32_components, precision_label
    from ldm_export.export.weights import load_weights
    from ldm_export.runtime.bundle import Bundle
    from ldm_export.zoo import get_model

    class Kept:  # a bundle whose decoder alone is fp32
        components = ("text_encoder", "unet", "vae_decoder")

        def precision(self, c):
            return "fp32" if c == "vae_decoder" else "fp16"

    comps = ["text_encoder", "unet", "vae_decoder"]
    assert fp32_components(Kept(), comps) == ("vae_decoder",)
    assert fp32_components(None, comps) == ()
    assert fp32_components(Bundle.open(tiny_bundle), comps) == tuple(comps)  # an fp32 bundle: all of it
    assert precision_label("fp16", ("vae_decoder",)) == "fp16 (vae_decoder fp32)"
    assert precision_label("fp32", ("vae_decoder",)) == "fp32"
    assert precision_label("fp16", tuple(comps), comps) == "fp32"  # an fp32 bundle on a GPU: its PyTorch rows too

    spec = get_model("tiny")
    modules = load_weights(spec, None, random_weights=True, seed=0).modules
    b = TorchBackend(modules, "cpu", "fp16", spec=spec, keep_fp32=("vae_decoder",))
    assert b.precision == "fp16 (vae_decoder fp32)"
    assert {p.dtype for p in b.w["vae_decoder"].parameters()} == {torch.float32}
    assert {p.dtype for p in b.w["unet"].parameters()} == {torch.float16}
    side, ch = spec.latent_side, spec.vae["latent_channels"]
    image = b.vae(np.random.default_rng(0).standard_normal((1, ch, side, side)).astype(np.float32))
    assert image.dtype == np.float32 and np.isfinite(image).all()


def test_a_bench_stopped_by_sigterm_leaves_no_temporary_bundle(tmp_path):
    """`bench` without --bundle builds one in a temporary folder; SIGTERM (a service manager's stop) left it behind
    (40 MB for the demo model), where Ctrl-C removed it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "ldm_export.cli", "bench", "--model", "tiny", "--device", "cpu",
                             "--backends", "ort", "--steps", "2", "--repeats", "200", "--e2e-repeats", "50",
                             "--out", str(tmp_path / "out")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not list(tmp_path.glob("ldm-export-bench-*/bundle/ldm_export.json")):
        time.sleep(0.2)  # the bundle is built: the bench is timing in it
    assert list(tmp_path.glob("ldm-export-bench-*/bundle/ldm_export.json")), proc.communicate(timeout=60)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in err, err
    assert not list(tmp_path.glob("ldm-export-bench-*")) and not (tmp_path / "out").exists()
