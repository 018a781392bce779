"""Engines built for real on this CPU by TensorRT-RTX (its builder and ONNX parser need no GPU when told the target
compute capability): every kind of bundle the tests build is parsed and built, and the engines index is checked.
A graph change that TensorRT cannot parse or build fails here. Running the engines needs a supported GPU
(tests/test_tensorrt.py::test_end_to_end_engines_match_onnxruntime_cpu)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from ldm_export.runtime.bundle import Bundle, sha256_file
from ldm_export.runtime.engine_tensorrt import (
    ANY_GPU, ENGINES_JSON, EngineTarget, check_plan_header, engines_root, find_engines_folder, locate_plan,
)
from ldm_export.runtime.errors import LdmExportError

rtx = pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX is not installed (pip install 'ldm-export[tensorrt-rtx]')")

CC = "8.6"  # an RTX 30 / A10 class GPU; any compute capability TensorRT-RTX builds for would do
FAST = ("--opt-level", "0")  # CI builds: the fastest builder level; the default (3) is for real deployments


def _copy(src: Path, tmp_path: Path, name: str) -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("engines"))
    return dst


def build_and_check(bundle: Path, *extra: str, components: tuple[str, ...] | None = None) -> dict:
    """`ldm-export engines BUNDLE --compute-capability 8.6` through the CLI, then check the engines index against the
    bundle: every component, plan size and sha256, the ONNX it was built from, the profile from the spec."""
    comps = ("--components", ",".join(components)) if components else ()
    r = run_cli("engines", str(bundle), "--compute-capability", CC, *FAST, *comps, *extra)
    assert r.returncode == 0, r.stderr
    b = Bundle.open(bundle, verify=True)  # the bundle's own manifest is untouched
    folder = engines_root(bundle) / f"any_sm86_trtrtx{rtx.__version__}"
    index = json.loads((folder / ENGINES_JSON).read_text())
    assert index["target"] == {"gpu": ANY_GPU, "compute_capability": CC, "builder": "tensorrt-rtx",
                               "tensorrt": rtx.__version__}
    assert sorted(index["engines"]) == sorted(components or b.components)
    for comp in components or b.components:
        e = index["engines"][comp]
        plan = folder / e["file"]
        assert plan.stat().st_size == e["size"] > 100_000 and sha256_file(plan) == e["sha256"]
        assert e["onnx_sha256"] == b.manifest["files"][e["onnx"]]["sha256"]
        assert e["network"] == "strongly-typed" and e["timing_cache"] is None
        spec = b.spec(comp)
        for t in spec.inputs:
            for which in ("min", "opt", "max"):
                assert tuple(e["profile"][t.name][which]) == spec.concrete_shape(t, which=which)
        assert e["tools"]["tensorrt-rtx-cu13-libs"] == rtx.__version__
    assert not list(folder.glob(".*.tmp"))
    return index


def test_an_interrupt_cancels_a_real_build_through_the_progress_monitor(tiny_bundle):
    """Ctrl-C sets the event `interrupts_held` yields; TensorRT-RTX's builder then stops at its next step (the
    monitor's step_complete returns False) instead of finishing the engine."""
    import threading

    from ldm_export.export.tensorrt_build import _cancelling_monitor

    logger = rtx.Logger()
    builder = rtx.Builder(logger)
    network = builder.create_network(1 << int(rtx.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    assert rtx.OnnxParser(network, logger).parse_from_file(str(tiny_bundle / "vae_decoder" / "model.onnx"))
    spec = Bundle.open(tiny_bundle).spec("vae_decoder")
    plans = {}
    for stop in (False, True):
        config = builder.create_builder_config()
        config.num_compute_capabilities = 1
        config.set_compute_capability(rtx.ComputeCapability.SM86, 0)
        config.builder_optimization_level = 0
        profile = builder.create_optimization_profile()
        for t in spec.inputs:
            profile.set_shape(t.name, *(spec.concrete_shape(t, which=w) for w in ("min", "opt", "max")))
        config.add_optimization_profile(profile)
        interrupted = threading.Event()
        if stop:
            interrupted.set()
        config.progress_monitor = _cancelling_monitor(rtx, interrupted)
        plans[stop] = builder.build_serialized_network(network, config)
    assert plans[False] is not None and plans[True] is None


def test_tiny_bundle_builds(tiny_bundle, tmp_path):
    build_and_check(_copy(tiny_bundle, tmp_path, "tiny"))


def test_demo_bundle_builds(demo_bundle, tmp_path):
    index = build_and_check(_copy(demo_bundle, tmp_path, "demo"))
    assert index["engines"]["unet"]["bundle_precision"] == "fp32"


@pytest.fixture(scope="module")
def tiny_tensorrt_bundles(tmp_path_factory):
    """The tiny model for --target tensorrt: fp16 static (the GPU deployment shape) and fp32 dynamic."""
    from ldm_export.export.build import BuildConfig, build

    root = tmp_path_factory.mktemp("trt-bundles")
    out = {"fp16-static": root / "tiny-trt-fp16-static", "fp32": root / "tiny-trt-fp32"}
    build(BuildConfig(model="tiny", precision="fp16", random_weights=True, static_shape=True, target="tensorrt",
                      out=out["fp16-static"]))
    build(BuildConfig(model="tiny", precision="fp32", random_weights=True, target="tensorrt", out=out["fp32"]))
    return out


@pytest.mark.parametrize("kind", ["fp16-static", "fp32"])
def test_tiny_tensorrt_target_bundles_build(tiny_tensorrt_bundles, tmp_path, kind):
    bundle = _copy(tiny_tensorrt_bundles[kind], tmp_path, kind)
    m = Bundle.open(bundle).manifest
    assert m["target"] == "tensorrt"
    assert m["components"]["unet"]["kernels"] == ["attention pattern (TensorRT fuses) x8"]
    index = build_and_check(bundle)
    if kind == "fp16-static":
        assert index["engines"]["unet"]["bundle_precision"] == "fp16"
        assert all(p["min"] == p["max"] for e in index["engines"].values() for p in e["profile"].values())


def test_tensorrt_target_graph_has_no_contrib_ops_and_the_attention_pattern(tiny_tensorrt_bundles):
    import onnx

    for comp, n in (("unet", 8), ("vae_decoder", 1)):
        g = onnx.load(str(tiny_tensorrt_bundles["fp32"] / comp / "model.onnx")).graph
        assert {x.domain for x in g.node} <= {"", "ai.onnx"}
        ops = [x.op_type for x in g.node]
        assert ops.count("Softmax") == n and "Sqrt" not in ops  # one scale on Q, not sqrt(scale) on Q and K


def test_cuda_target_bundle_is_refused_with_the_rebuild_flag(tiny_bundle, tmp_path):
    """--target cuda graphs hold ONNX Runtime contrib ops TensorRT cannot parse: refused before any build. (The tiny
    UNet exported for target cuda as the build does; the build itself verifies on the CUDA provider, absent here.)"""
    from ldm_export import kernels
    from ldm_export.export import models as M
    from ldm_export.export import onnx_export as X
    from ldm_export.export.build import static_dims
    from ldm_export.zoo import get_model

    bundle = _copy(tiny_bundle, tmp_path, "tiny-cuda")
    spec = get_model("tiny")
    cs = spec.component_specs()["unet"]
    wrapper = M.wrap("unet", M.build_random(spec, 0))
    feeds = X.sample_inputs(cs, static_dims(spec, "unet"))
    with kernels.export_patches(wrapper, "unet", "cuda"):
        model = X.export_onnx(wrapper, cs, tmp_path, feeds)
    X.save_onnx(kernels.rewrite(model, "unet", "cuda"), bundle / "unet" / "model.onnx")
    m = json.loads((bundle / "ldm_export.json").read_text())
    m["target"] = "cuda"
    p = bundle / "unet" / "model.onnx"
    m["files"]["unet/model.onnx"] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    (bundle / "ldm_export.json").write_text(json.dumps(m, indent=2))

    r = run_cli("engines", str(bundle), "--compute-capability", CC)
    assert r.returncode == 2
    line = r.stderr.strip()
    assert "\n" not in line and "contrib ops TensorRT cannot parse" in line and "--target tensorrt" in line
    assert "com.microsoft::MultiHeadAttention" in line and "built with --target cuda" in line
    assert not list(engines_root(bundle).glob("*/*.plan"))


# ---------------------------------------------------------------- int8 from a QDQ graph

def _qdq_unet(bundle: Path) -> None:
    """Replace the bundle's UNet by an int8 QDQ graph (ONNX Runtime's static quantiser: Conv/MatMul, symmetric,
    per-channel weights, biases left float, as TensorRT's parser requires) and update the manifest to match."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    b = Bundle.open(bundle)
    spec = b.spec("unet")
    rng = np.random.default_rng(0)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([{"sample": rng.standard_normal((2, 4, 8, 8)).astype(np.float32),
                                "timestep": np.array(t, dtype=np.float32),
                                "encoder_hidden_states": rng.standard_normal((2, 77, 32)).astype(np.float32)}
                               for t in (900.0, 500.0, 100.0)])

        def get_next(self):
            return next(self.feeds, None)

    src = b.model_path("unet")
    pre = bundle / "unet" / "pre.onnx"
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    quantize_static(str(pre), str(src), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=["Conv", "MatMul", "Gemm"],
                    extra_options={"QuantizeBias": False, "ActivationSymmetric": True, "WeightSymmetric": True})
    pre.unlink()
    m = json.loads((bundle / "ldm_export.json").read_text())
    m["components"]["unet"]["precision"] = "int8"
    m["files"]["unet/model.onnx"] = {"sha256": sha256_file(src), "size": src.stat().st_size}
    (bundle / "ldm_export.json").write_text(json.dumps(m, indent=2))
    assert spec.input_names == Bundle.open(bundle).spec("unet").input_names


def test_int8_qdq_graph_builds(tiny_bundle, tmp_path):
    bundle = _copy(tiny_bundle, tmp_path, "tiny-int8")
    _qdq_unet(bundle)
    index = build_and_check(bundle, components=("unet",))
    e = index["engines"]["unet"]
    assert e["bundle_precision"] == "int8" and e["quantization"].startswith("int8 QDQ (")
    assert int(e["quantization"].split("(")[1].split()[0]) > 20  # Q/DQ pairs around every Conv and MatMul


# ---------------------------------------------------------------- bad input, one line each

@pytest.fixture(scope="module")
def built(tiny_bundle, tmp_path_factory) -> Path:
    """A tiny bundle with TensorRT-RTX engines for compute capability 8.6 (read-only for the tests below)."""
    bundle = _copy(tiny_bundle, tmp_path_factory.mktemp("built"), "tiny")
    r = run_cli("engines", str(bundle), "--compute-capability", CC, *FAST)
    assert r.returncode == 0, r.stderr
    return bundle


def _rtx_here(name: str, cc: tuple[int, int], version: str | None = None) -> EngineTarget:
    return EngineTarget(name, cc, version or rtx.__version__, "tensorrt-rtx")


def test_engines_for_a_compute_capability_load_on_any_gpu_of_it(built):
    b = Bundle.open(built)
    plan, entry = locate_plan(b, "unet", _rtx_here("NVIDIA GeForce RTX 3090", (8, 6)))
    assert plan.parent.name == f"any_sm86_trtrtx{rtx.__version__}" and entry["file"] == "unet.plan"
    assert find_engines_folder(built, _rtx_here("NVIDIA A10", (8, 6))) == plan.parent


@pytest.mark.parametrize("here, why", [
    (("NVIDIA L4", (8, 9), None), "compute capability"),  # another GPU generation
    (("NVIDIA GeForce RTX 3090", (8, 6), "1.8.0.1"), "another TensorRT-RTX version"),
    (("NVIDIA H200", (9, 0), None), "a GPU TensorRT-RTX does not run on"),
])
def test_mismatched_engines_are_refused_with_how_to_rebuild(built, here, why):
    name, cc, version = here
    with pytest.raises(LdmExportError) as e:
        locate_plan(Bundle.open(built), "unet", _rtx_here(name, cc, version))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("no TensorRT engines for this GPU and builder"), why
    assert f"found: any_sm86_trtrtx{rtx.__version__}" in msg and f"rebuild with `ldm-export engines {built}`" in msg


def test_full_tensorrt_never_loads_a_tensorrt_rtx_plan(built):
    with pytest.raises(LdmExportError, match="no TensorRT engines for this GPU and builder"):
        locate_plan(Bundle.open(built), "unet", EngineTarget("NVIDIA GeForce RTX 3090", (8, 6), rtx.__version__, "tensorrt"))


def test_truncated_engine_is_refused(built, tmp_path):
    bundle = _copy(built, tmp_path, "cut")
    shutil.copytree(engines_root(built), engines_root(bundle))
    plan = next(engines_root(bundle).glob("*/unet.plan"))
    data = plan.read_bytes()
    plan.write_bytes(data[: len(data) // 2])
    with pytest.raises(LdmExportError, match=r"unet.plan is truncated \(\d+ of \d+ bytes\); rebuild with `ldm-export engines .* --components unet`"):
        locate_plan(Bundle.open(bundle), "unet", _rtx_here("NVIDIA A10", (8, 6)))


def test_plan_header_check_refuses_a_cut_plan(built):
    """TensorRT-RTX's own header check (run before deserialising) says a cut file is not a complete engine."""
    trt = rtx
    plan = next(engines_root(built).glob("*/unet.plan"))
    runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
    with pytest.raises(LdmExportError, match="not a complete engine file"):
        check_plan_header(trt, runtime, plan.read_bytes()[:10], plan)


def _has_nvidia_driver() -> bool:
    import ctypes.util

    return ctypes.util.find_library("cuda") is not None or Path("/dev/nvidiactl").exists()


@pytest.mark.skipif(_has_nvidia_driver(), reason="there is a GPU here: engines build for it without --compute-capability")
def test_no_gpu_and_no_compute_capability_is_one_line(tiny_bundle):
    r = run_cli("engines", str(tiny_bundle))
    assert r.returncode == 2
    line = r.stderr.strip()
    assert "\n" not in line and "no NVIDIA driver" in line and "--compute-capability" in line
    assert "--provider" not in line  # generate's option: `engines` has none


@pytest.mark.skipif(_has_nvidia_driver(), reason="there is a GPU here: the engines would load")
def test_generate_on_engines_without_a_gpu_says_to_run_on_the_cpu(built, tmp_path):
    """generate's refusal named `engines`' --compute-capability, and `engines`' named generate's --provider cpu."""
    r = run_cli("generate", str(built), "a cat", "--provider", "tensorrt-native", "--steps", "1",
                "--out", str(tmp_path / "x.png"))
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip()
    assert "\n" not in line and "no NVIDIA driver" in line and line.endswith("run on the CPU with --provider cpu")
    assert "--compute-capability" not in line and not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("args, match", [
    (("--compute-capability", "7.0"), "cannot build for compute capability 7.0"),
    (("--compute-capability", "eight"), "must look like 8.6"),
    (("--compute-capability", CC, "--precision", "fp16"), "strongly typed"),
])
def test_bad_engine_options_are_one_line(tiny_bundle, tmp_path, args, match):
    bundle = _copy(tiny_bundle, tmp_path, "b")
    r = run_cli("engines", str(bundle), "--components", "vae_decoder", *args)
    assert r.returncode == 2, r.stderr
    assert "\n" not in r.stderr.strip() and match in r.stderr
    assert not engines_root(bundle).exists()  # no engines folder left empty (a refused compute capability made one)


def test_refit_without_a_gpu_is_one_line(tiny_bundle, tmp_path):
    """TensorRT-RTX compiles refittable engines on the device: on a GPU-less machine the build stops in one line."""
    bundle = _copy(tiny_bundle, tmp_path, "refit")
    r = run_cli("engines", str(bundle), "--components", "vae_decoder", "--compute-capability", CC, "--refit", *FAST)
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip()
    assert "\n" not in line and "could not build the engine" in line and "--refit" in line
    assert not engines_root(bundle).exists()


def test_an_earlier_engine_of_another_model_onnx_is_flagged_when_building_others(tiny_bundle, tmp_path):
    """The summary listed an engine built from another model.onnx (a bundle remade by `ldm-export lora` around an
    engines folder copied in) as a plain "(earlier)" one; the runtime refuses it, so `engines` says so now."""
    bundle = _copy(tiny_bundle, tmp_path, "stale")
    build_and_check(bundle, components=("text_encoder",))
    index_path = next(engines_root(bundle).glob("*/engines.json"))
    index = json.loads(index_path.read_text())
    index["engines"]["text_encoder"]["onnx_sha256"] = "0" * 64
    index_path.write_text(json.dumps(index))
    r = run_cli("engines", str(bundle), "--components", "vae_decoder", "--compute-capability", CC, *FAST)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("STALE") == 1  # the text_encoder row, not the vae_decoder just built
    assert ("warning: the text_encoder engine was built from another model.onnx than this bundle's and will not load; "
            f"rebuild with `ldm-export engines {bundle} --components text_encoder --compute-capability {CC}`") in \
        " ".join(r.stderr.split())


def test_timing_cache_is_ignored_with_a_warning_on_tensorrt_rtx(tiny_bundle, tmp_path):
    bundle = _copy(tiny_bundle, tmp_path, "tc")
    r = run_cli("engines", str(bundle), "--components", "text_encoder", "--compute-capability", CC,
                "--timing-cache", str(tmp_path / "t.cache"), "--workspace", "1", *FAST)
    assert r.returncode == 0, r.stderr
    assert "keeps no timing cache" in r.stderr and not (tmp_path / "t.cache").exists()
    e = json.loads(next(engines_root(bundle).glob("*/engines.json")).read_text())["engines"]["text_encoder"]
    assert e["workspace_bytes"] == 2**30


def test_engines_prints_a_bundle_path_with_brackets_as_it_is(tiny_bundle, tmp_path):
    """Square brackets in a path are text, not console markup: '[/x]' (a closing tag) ended in a traceback."""
    bundle = _copy(tiny_bundle, tmp_path, "b[/x]")
    r = run_cli("engines", str(bundle), "--compute-capability", CC, *FAST, "--components", "vae_decoder")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "b[/x]" in (r.stdout + r.stderr).replace("\n", "")
