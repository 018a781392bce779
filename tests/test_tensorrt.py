"""Native TensorRT backend: profiles from specs, engines folders, atomic writes, the missing-TensorRT path, and
(where TensorRT and a GPU exist) a real build-and-run compared with ONNX Runtime on the CPU."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ldm_export.runtime.bundle import Bundle, sha256_file
from ldm_export.runtime.engine_tensorrt import (
    ENGINES_JSON, EngineTarget, available_targets, check_profile_bounds, engines_root, locate_plan,
)
from ldm_export.runtime.errors import LdmExportError
from ldm_export.runtime.spec import text_encoder_spec, unet_spec, vae_decoder_spec

H100 = EngineTarget("NVIDIA H100 80GB HBM3", (9, 0), "10.13.3.9")
L4 = EngineTarget("NVIDIA L4", (8, 9), "10.13.3.9")


def _tensorrt_missing() -> str | None:
    """Why engines cannot run here: no TensorRT (full or RTX), no GPU, or a GPU TensorRT-RTX does not run on."""
    from ldm_export.runtime.engine_tensorrt import builder_of, current_gpu, require_tensorrt

    try:
        trt = require_tensorrt()
        gpu = current_gpu()
    except LdmExportError as e:
        return str(e)
    if builder_of(trt) == "tensorrt-rtx" and gpu.compute_capability not in ((8, 0), (8, 6), (8, 9)) \
            and gpu.compute_capability[0] < 12:
        return (f"TensorRT-RTX does not run on compute capability {gpu.compute_capability[0]}.{gpu.compute_capability[1]} "
                f"({gpu.name}); it runs on 8.0, 8.6, 8.9 and 12.x")
    return None


def _polygraphy_missing() -> str | None:
    try:
        import polygraphy  # noqa: F401
    except ImportError:
        return "polygraphy is not installed (pip install polygraphy)"
    return None


needs_tensorrt = pytest.mark.skipif(bool(_tensorrt_missing()), reason=_tensorrt_missing() or "")
needs_polygraphy = pytest.mark.skipif(bool(_polygraphy_missing()), reason=_polygraphy_missing() or "")


# ---------------------------------------------------------------- profiles from specs

def test_profile_dynamic_unet_takes_min_opt_max_of_every_symbolic_dim():
    from ldm_export.export.tensorrt_build import profile_shapes

    spec = unet_spec(4, 4, 768, latent_hw=(32, 64, 128), batch=(1, 2, 8))
    prof = profile_shapes(spec)
    assert list(prof) == ["sample", "timestep", "encoder_hidden_states"]
    assert prof["sample"] == ((1, 4, 32, 32), (2, 4, 64, 64), (8, 4, 128, 128))
    assert prof["timestep"] == ((), (), ())  # the scalar: fixed, min = opt = max
    assert prof["encoder_hidden_states"] == ((1, 77, 768), (2, 77, 768), (8, 77, 768))


def test_profile_vae_and_text_encoder_use_their_own_batch_ranges():
    from ldm_export.export.tensorrt_build import profile_shapes

    vae = profile_shapes(vae_decoder_spec(4, (16, 64, 96), batch=(1, 1, 4)))
    assert vae == {"latent_sample": ((1, 4, 16, 16), (1, 4, 64, 64), (4, 4, 96, 96))}
    te = profile_shapes(text_encoder_spec(768, max_length=77, batch=(1, 2, 8)))
    assert te == {"input_ids": ((1, 77), (2, 77), (8, 77))}


def test_profile_static_spec_gives_min_equal_opt_equal_max():
    from ldm_export.export.tensorrt_build import profile_shapes

    spec = unet_spec(4, 4, 768, latent_hw=(32, 64, 128)).static({"batch": 2, "height": 64, "width": 48, "sequence": 77})
    prof = profile_shapes(spec)
    assert prof["sample"] == ((2, 4, 64, 48),) * 3
    assert prof["encoder_hidden_states"] == ((2, 77, 768),) * 3
    assert all(lo == opt == hi for lo, opt, hi in prof.values())


def test_profile_from_a_real_bundle_manifest(tiny_bundle):
    from ldm_export.export.tensorrt_build import EngineOptions, engine_recipe

    b = Bundle.open(tiny_bundle)
    for comp in b.components:
        spec = b.spec(comp)
        r = engine_recipe(b, comp, EngineOptions(), tiny_bundle / "tc")
        assert set(r.profile) == set(spec.input_names)
        for t in spec.inputs:
            lo, opt, hi = r.profile[t.name]
            for k, d in enumerate(t.shape):
                if isinstance(d, str):
                    assert (lo[k], opt[k], hi[k]) == tuple(spec.profile[d])
                else:
                    assert lo[k] == opt[k] == hi[k] == d
        assert r.strongly_typed and not r.fp16 and r.bundle_precision == "fp32"


def _fake_bundle(manifest_from: Path, precision: str) -> Bundle:
    b = Bundle.open(manifest_from)
    m = json.loads(json.dumps(b.manifest))
    for c in m["components"].values():
        c["precision"] = precision
    return Bundle(b.path, m)


@pytest.mark.parametrize("bundle_precision, option, typed, fp16", [
    ("fp32", "auto", True, False), ("fp16", "auto", True, False),
    ("fp32", "fp16", False, True), ("fp16", "fp16", False, True),
])
def test_precision_from_manifest_and_option(tiny_bundle, bundle_precision, option, typed, fp16):
    from ldm_export.export.tensorrt_build import EngineOptions, engine_recipe

    r = engine_recipe(_fake_bundle(tiny_bundle, bundle_precision), "unet", EngineOptions(precision=option), Path("tc"))
    assert (r.strongly_typed, r.fp16, r.bundle_precision) == (typed, fp16, bundle_precision)
    assert r.to_json()["network"] == ("strongly-typed" if typed else "weakly-typed")
    assert bool(r.notes) == (bundle_precision == "fp16" and option == "fp16")


def test_quantisation_is_read_from_the_graph_not_the_label(tiny_bundle):
    """An int8-labelled component builds strongly typed like any other; "int8 QDQ" is recorded only when the graph
    itself holds Q/DQ nodes (tests/test_tensorrt_rtx.py builds a real QDQ graph)."""
    from ldm_export.export.tensorrt_build import EngineOptions, engine_recipe

    r = engine_recipe(_fake_bundle(tiny_bundle, "int8"), "unet", EngineOptions(), Path("tc"))
    assert r.strongly_typed and r.bundle_precision == "int8" and r.quantization is None


def test_onnxruntime_format_int8_is_refused_before_the_parser(tiny_bundle):
    """The default int8 format (int32 biases, u8 activations with zero point 128) makes TensorRT's parser fail on a
    zero point with a DLA hint; the recipe says which format TensorRT takes instead. The tensorrt format passes."""
    from ldm_export.export.tensorrt_build import EngineOptions, engine_recipe

    b = _fake_bundle(tiny_bundle, "int8")
    for fmt in ("onnxruntime", "tensorrt"):
        m = json.loads(json.dumps(b.manifest))
        m["int8"] = {"quantisation": {"format": fmt, "activation_type": "u8" if fmt == "onnxruntime" else "s8"}}
        if fmt == "tensorrt":
            assert engine_recipe(Bundle(b.path, m), "unet", EngineOptions(), Path("tc")).bundle_precision == "int8"
            continue
        with pytest.raises(LdmExportError, match="onnxruntime QDQ format .* --int8-format tensorrt") as e:
            engine_recipe(Bundle(b.path, m), "unet", EngineOptions(), Path("tc"))
        assert "\n" not in str(e.value)


def test_a_damaged_model_onnx_is_one_line_before_the_builder(tiny_bundle, tmp_path):
    from ldm_export.export.tensorrt_build import EngineOptions, engine_recipe

    b = Bundle.open(tiny_bundle)
    cut = tmp_path / "model.onnx"
    cut.write_bytes(b.model_path("unet").read_bytes()[:5000])

    class Cut(Bundle):
        def model_path(self, component):
            return cut

    with pytest.raises(LdmExportError, match="is not a readable ONNX graph .* the bundle is damaged") as e:
        engine_recipe(Cut(b.path, b.manifest), "unet", EngineOptions(), Path("tc"))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kwargs, match", [({"precision": "bf16"}, "precision"), ({"optimization_level": 6}, "0 to 5"),
                                           ({"workspace_gb": 0}, "workspace"), ({"workspace_gb": float("inf")}, "workspace"),
                                           ({"workspace_gb": float("nan")}, "workspace"),
                                           ({"workspace_gb": 1e12}, "1e\\+12 GB is more than TensorRT can take")])
def test_bad_options_are_one_line_errors(kwargs, match):
    from ldm_export.export.tensorrt_build import EngineOptions

    with pytest.raises(LdmExportError, match=match) as e:
        EngineOptions(**kwargs)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- Polygraphy loader chain (constructed, not run)

@needs_polygraphy
@pytest.mark.parametrize("precision", ["auto", "fp16"])
def test_polygraphy_chain_carries_profile_flags_and_timing_cache(tiny_bundle, tmp_path, precision):
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath

    from ldm_export.export.tensorrt_build import EngineOptions, engine_loader, engine_recipe

    b = Bundle.open(tiny_bundle)
    cache = tmp_path / "timing.cache"
    r = engine_recipe(b, "unet", EngineOptions(precision=precision, optimization_level=4), cache)
    loader = engine_loader(r)
    assert isinstance(loader, EngineBytesFromNetwork)
    assert loader.timing_cache_path == str(cache)
    net, cfg = loader._network, loader._config
    assert isinstance(net, NetworkFromOnnxPath) and isinstance(cfg, CreateConfig)
    assert net.path == str(b.model_path("unet"))
    assert net.strongly_typed is (precision == "auto")
    assert cfg.fp16 is (precision == "fp16") and cfg.tf32 is False and cfg.int8 is False
    assert cfg.builder_optimization_level == 4
    assert cfg.timing_cache_path == str(cache)
    assert cfg.memory_pool_limits is None
    (profile,) = cfg.profiles
    spec = b.spec("unet")
    assert list(profile) == spec.input_names
    lo, hi = spec.profile["height"][0], spec.profile["height"][2]
    assert tuple(profile["sample"].min) == (spec.profile["batch"][0], 4, lo, lo)
    assert tuple(profile["sample"].max) == (spec.profile["batch"][2], 4, hi, hi)
    assert tuple(profile["encoder_hidden_states"].opt)[0] == spec.profile["batch"][1]
    assert tuple(profile["timestep"].min) == ()


def test_a_timing_cache_that_is_a_folder_is_one_line_before_any_build(bundle_copy, tmp_path):
    """Polygraphy opens the timing cache path as a file: a folder raised IsADirectoryError (a traceback) mid-build."""
    from ldm_export.export.tensorrt_build import EngineOptions, build_engines

    def never(loader):
        raise AssertionError("no build should start")

    with pytest.raises(LdmExportError, match="--timing-cache .* is a folder; give the cache file's path"):
        build_engines(bundle_copy, ["unet"], EngineOptions(timing_cache=tmp_path), target=H100, serialize=never)
    assert not engines_root(bundle_copy).exists()


@needs_polygraphy
def test_workspace_limit_goes_to_the_workspace_pool(tiny_bundle, tmp_path):
    from types import SimpleNamespace

    from ldm_export.export.tensorrt_build import EngineOptions, engine_loader, engine_recipe

    fake_trt = SimpleNamespace(MemoryPoolType=SimpleNamespace(WORKSPACE="WORKSPACE"))  # the enum is TensorRT's
    r = engine_recipe(Bundle.open(tiny_bundle), "vae_decoder", EngineOptions(workspace_gb=1.5), tmp_path / "tc")
    assert engine_loader(r, trt=fake_trt)._config.memory_pool_limits == {"WORKSPACE": int(1.5 * 2**30)}


# ---------------------------------------------------------------- engines folder naming and selection

@pytest.mark.parametrize("target, name", [
    (H100, "NVIDIA_H100_80GB_HBM3_sm90_trt10.13.3.9"),
    (EngineTarget("NVIDIA GeForce RTX 4090", (8, 9), "10.8.0.43"), "NVIDIA_GeForce_RTX_4090_sm89_trt10.8.0.43"),
    (EngineTarget("Orin (nvgpu)", (8, 7), "10.3.0"), "Orin_nvgpu_sm87_trt10.3.0"),
    (EngineTarget("A/B:C  D", (12, 0), "11.0.0+cuda13"), "A_B_C_D_sm120_trt11.0.0_cuda13"),
])
def test_engines_folder_name_is_sanitised(target, name):
    assert target.dirname == name
    assert "/" not in target.dirname and " " not in target.dirname
    assert EngineTarget.from_json(target.to_json()) == target


@pytest.fixture()
def bundle_copy(tiny_bundle, tmp_path) -> Path:
    """A private copy of the tiny bundle (tests here write engines into it)."""
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dst)
    return dst


def _fake_plans(loader) -> bytes:
    """Stands in for TensorRT here: a 'plan' naming the ONNX file and profile the chain was built with."""
    net, cfg = loader._network, loader._config
    return json.dumps({"onnx": net.path, "profile": repr(cfg.profiles[0]), "typed": net.strongly_typed}).encode()


@needs_polygraphy
def test_build_engines_layout_index_and_manifest_untouched(bundle_copy):
    from ldm_export.export.tensorrt_build import EngineOptions, build_engines

    manifest_before = (bundle_copy / "ldm_export.json").read_bytes()
    seen = []
    index = build_engines(bundle_copy, None, EngineOptions(), progress=lambda c, s, d: seen.append((c, s)),
                          target=H100, serialize=_fake_plans)
    folder = bundle_copy / "engines" / H100.dirname
    assert sorted(p.name for p in folder.glob("*.plan")) == ["text_encoder.plan", "unet.plan", "vae_decoder.plan"]
    assert json.loads((folder / ENGINES_JSON).read_text()) == index
    assert index["target"] == H100.to_json()
    b = Bundle.open(bundle_copy, verify=True)  # the manifest's sha256 list is still valid
    assert (bundle_copy / "ldm_export.json").read_bytes() == manifest_before
    for comp in b.components:
        e = index["engines"][comp]
        plan = folder / e["file"]
        assert e["sha256"] == sha256_file(plan) and e["size"] == plan.stat().st_size
        assert e["onnx_sha256"] == b.manifest["files"][e["onnx"]]["sha256"]
        assert json.loads(plan.read_text())["onnx"] == str(b.model_path(comp))
        assert e["network"] == "strongly-typed" and e["builder_flags"] == []
        assert e["timing_cache"] == str(folder / "timing.cache")
        assert (comp, "done") in seen
    assert e["profile"]["latent_sample"]["max"][2] == b.spec("vae_decoder").profile["height"][2]
    assert not list(folder.glob("*.tmp")) and not list(folder.glob(".*.tmp"))


@needs_polygraphy
def test_rebuilding_one_component_keeps_the_others(bundle_copy):
    from ldm_export.export.tensorrt_build import EngineOptions, build_engines

    build_engines(bundle_copy, None, EngineOptions(), target=H100, serialize=_fake_plans)
    first = json.loads((engines_root(bundle_copy) / H100.dirname / ENGINES_JSON).read_text())
    index = build_engines(bundle_copy, ["unet"], EngineOptions(precision="fp16", optimization_level=1), target=H100,
                          serialize=_fake_plans)
    assert index["engines"]["text_encoder"] == first["engines"]["text_encoder"]
    assert index["engines"]["unet"]["builder_flags"] == ["FP16"]
    assert index["engines"]["unet"]["builder_optimization_level"] == 1


@needs_polygraphy
def test_fp16_flag_refused_on_tensorrt_11(bundle_copy):
    from ldm_export.export.tensorrt_build import EngineOptions, build_engines

    trt11 = EngineTarget("NVIDIA H100 80GB HBM3", (9, 0), "11.0.0.1")
    with pytest.raises(LdmExportError, match="no FP16 builder flag"):
        build_engines(bundle_copy, ["unet"], EngineOptions(precision="fp16"), target=trt11, serialize=_fake_plans)
    assert not (engines_root(bundle_copy) / trt11.dirname).exists()


def test_unknown_component_is_refused_before_any_build(bundle_copy):
    from ldm_export.export.tensorrt_build import EngineOptions, build_engines

    with pytest.raises(LdmExportError, match="no component 'refiner'"):
        build_engines(bundle_copy, ["refiner"], EngineOptions(), target=H100, serialize=_fake_plans)
    assert not engines_root(bundle_copy).exists()


@needs_polygraphy
def test_selection_picks_the_matching_folder_and_lists_others(bundle_copy):
    from ldm_export.export.tensorrt_build import EngineOptions, build_engines

    b = Bundle.open(bundle_copy)
    with pytest.raises(LdmExportError, match="found: none") as e:
        locate_plan(b, "unet", H100)
    assert "ldm-export engines" in str(e.value) and "\n" not in str(e.value)

    build_engines(bundle_copy, None, EngineOptions(), target=H100, serialize=_fake_plans)
    build_engines(bundle_copy, ["unet"], EngineOptions(), target=L4, serialize=_fake_plans)
    assert available_targets(bundle_copy) == sorted([H100.dirname, L4.dirname])
    plan, entry = locate_plan(b, "unet", H100)
    assert plan == engines_root(bundle_copy) / H100.dirname / "unet.plan" and entry["file"] == "unet.plan"
    assert locate_plan(b, "unet", L4)[0].parent.name == L4.dirname

    other_trt = EngineTarget(H100.gpu_name, H100.compute_capability, "10.14.1.48")
    with pytest.raises(LdmExportError) as e:
        locate_plan(b, "unet", other_trt)
    msg = str(e.value)
    assert other_trt.dirname in msg and H100.dirname in msg and L4.dirname in msg
    assert f"ldm-export engines {bundle_copy}" in msg
    with pytest.raises(LdmExportError, match="has no engine for vae_decoder"):
        locate_plan(b, "vae_decoder", L4)


@needs_polygraphy
def test_selection_refuses_changed_plans_and_stale_onnx(bundle_copy):
    from ldm_export.export.tensorrt_build import EngineOptions, build_engines

    build_engines(bundle_copy, None, EngineOptions(), target=H100, serialize=_fake_plans)
    b = Bundle.open(bundle_copy)
    plan = engines_root(bundle_copy) / H100.dirname / "unet.plan"
    plan.write_bytes(plan.read_bytes()[:-1] + b"!")
    with pytest.raises(LdmExportError, match="sha256 mismatch"):
        locate_plan(b, "unet", H100)

    m = json.loads(json.dumps(b.manifest))  # a rebuilt bundle: same names, a different text_encoder graph
    m["files"]["text_encoder/model.onnx"]["sha256"] = "0" * 64
    with pytest.raises(LdmExportError, match="built from a different text_encoder/model.onnx"):
        locate_plan(Bundle(b.path, m), "text_encoder", H100)
    plan.unlink()
    with pytest.raises(LdmExportError, match="unet.plan is missing"):
        locate_plan(b, "unet", H100)


@needs_polygraphy
def test_an_unreadable_plan_is_one_line(bundle_copy, monkeypatch):
    """A plan another user wrote with mode 0600 raised PermissionError (a traceback) when its sha256 was checked."""
    from ldm_export.export.tensorrt_build import EngineOptions, build_engines
    from ldm_export.runtime import engine_tensorrt

    build_engines(bundle_copy, ["unet"], EngineOptions(), target=H100, serialize=_fake_plans)

    def denied(path, *a, **k):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(engine_tensorrt, "sha256_file", denied)
    with pytest.raises(LdmExportError, match=r"cannot read .*unet\.plan: Permission denied; let this user read the "
                                             r"engines folder \(chmod a\+r\) or rebuild with"):
        locate_plan(Bundle.open(bundle_copy), "unet", H100)


@needs_polygraphy
def test_a_folder_renamed_to_this_gpus_key_is_judged_by_its_index(bundle_copy):
    """Engines built for an L4, their folder renamed (or copied) to the H100's key: the index's target decides, so
    they are refused with the usual message instead of handed to TensorRT."""
    from ldm_export.export.tensorrt_build import EngineOptions, build_engines

    build_engines(bundle_copy, ["unet"], EngineOptions(), target=L4, serialize=_fake_plans)
    root = engines_root(bundle_copy)
    (root / L4.dirname).rename(root / H100.dirname)
    with pytest.raises(LdmExportError, match="no TensorRT engines for this GPU and builder"):
        locate_plan(Bundle.open(bundle_copy), "unet", H100)
    plan, _ = locate_plan(Bundle.open(bundle_copy), "unet", L4)  # where they do belong, the name does not matter
    assert plan.parent.name == H100.dirname


@needs_polygraphy
@pytest.mark.parametrize("damage", [
    lambda j: j["engines"]["unet"].__setitem__("size", "11980844"),
    lambda j: j["engines"]["unet"].pop("sha256"),
    lambda j: j["engines"]["unet"].pop("file"),
    lambda j: j["engines"]["unet"].__setitem__("file", "../../unet/model.onnx"),
    lambda j: j["engines"].__setitem__("unet", "unet.plan"),
    lambda j: j["engines"].__setitem__("unet", None),
    lambda j: j.__setitem__("engines", []),
])
def test_a_hand_damaged_engines_index_is_one_line(bundle_copy, damage):
    from ldm_export.export.tensorrt_build import EngineOptions, build_engines

    build_engines(bundle_copy, None, EngineOptions(), target=H100, serialize=_fake_plans)
    index_path = engines_root(bundle_copy) / H100.dirname / ENGINES_JSON
    index = json.loads(index_path.read_text())
    damage(index)
    index_path.write_text(json.dumps(index))
    with pytest.raises(LdmExportError, match="damaged") as e:
        locate_plan(Bundle.open(bundle_copy), "unet", H100)
    assert "\n" not in str(e.value)
    index_path.write_text("[]")
    with pytest.raises(LdmExportError, match="damaged"):
        locate_plan(Bundle.open(bundle_copy), "unet", H100)


def test_profile_bounds_are_checked_at_the_boundary():
    spec = unet_spec(4, 4, 32, latent_hw=(2, 8, 16), batch=(1, 2, 8))
    ok = {"sample": np.zeros((2, 4, 16, 2), np.float32), "timestep": np.float32(1.0),
          "encoder_hidden_states": np.zeros((2, 77, 32), np.float32)}
    check_profile_bounds(spec, ok)
    too_big = dict(ok, sample=np.zeros((2, 4, 17, 8), np.float32))
    with pytest.raises(LdmExportError, match=r"dimension 'height' is 17, outside the range 2\.\.16 .*--provider cpu"):
        check_profile_bounds(spec, too_big)
    with pytest.raises(LdmExportError, match="'batch' is 9"):
        check_profile_bounds(spec, dict(ok, sample=np.zeros((9, 4, 8, 8), np.float32),
                                        encoder_hidden_states=np.zeros((9, 77, 32), np.float32)))


@needs_polygraphy
@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_ctrl_c_or_sigterm_during_a_build_stops_it_and_keeps_the_earlier_engines(bundle_copy, signame):
    """TensorRT calls back into Python (its logger) from native code and swallows a KeyboardInterrupt raised there,
    so Ctrl-C during a build was lost and every component built anyway. The stand-in builder below swallows it the
    same way; the interrupt must still end `engines` with exit code 130 after the plans already written. SIGTERM
    (`kill`, a scheduler) killed `engines` with no message; it stops the same way."""
    import signal
    import time

    from ldm_export.export.tensorrt_build import EngineOptions, build_engines

    def swallowing(loader):
        if loader._network.path.endswith("unet/model.onnx"):
            try:
                os.kill(os.getpid(), getattr(signal, signame))
                time.sleep(0.2)
            except KeyboardInterrupt:  # what TensorRT's native callback does with it
                pass
        return _fake_plans(loader)

    before = signal.getsignal(signal.SIGINT)  # Python's default handler; SIG_IGN where the suite runs in the background
    before_term = signal.getsignal(signal.SIGTERM)
    with pytest.raises(LdmExportError, match="interrupted while building unet; .* keeps the engines it had: text_encoder") as e:
        build_engines(bundle_copy, None, EngineOptions(), target=H100, serialize=swallowing)
    assert e.value.exit_code == 130
    folder = engines_root(bundle_copy) / H100.dirname
    assert sorted(p.name for p in folder.glob("*.plan")) == ["text_encoder.plan"]
    assert list(json.loads((folder / ENGINES_JSON).read_text())["engines"]) == ["text_encoder"]
    assert signal.getsignal(signal.SIGINT) is before  # the build's own handlers are gone
    assert signal.getsignal(signal.SIGTERM) is before_term


@needs_polygraphy
def test_ctrl_c_during_the_first_build_leaves_no_engines_folder(bundle_copy):
    """Stopped before any plan: the message named the (now removed) folder as keeping 'none'."""
    import signal
    import time

    from ldm_export.export.tensorrt_build import EngineOptions, build_engines

    def interrupted(loader):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
        except KeyboardInterrupt:
            pass
        return _fake_plans(loader)

    with pytest.raises(LdmExportError) as e:
        build_engines(bundle_copy, None, EngineOptions(), target=H100, serialize=interrupted)
    assert e.value.exit_code == 130 and str(e.value) == "interrupted while building text_encoder; no engine was written"
    assert not engines_root(bundle_copy).exists()


# ---------------------------------------------------------------- atomic writes

def test_atomic_write_replaces_whole_and_leaves_no_temp(tmp_path):
    from ldm_export.export.tensorrt_build import atomic_write_bytes, atomic_write_json

    p = tmp_path / "unet.plan"
    atomic_write_bytes(p, b"old plan")
    atomic_write_bytes(p, memoryview(b"new plan, longer"))
    assert p.read_bytes() == b"new plan, longer"
    atomic_write_json(tmp_path / "engines.json", {"a": [1, 2]})
    assert json.loads((tmp_path / "engines.json").read_text()) == {"a": [1, 2]}
    assert sorted(x.name for x in tmp_path.iterdir()) == ["engines.json", "unet.plan"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_atomic_writes_get_the_modes_of_every_other_bundle_file(tmp_path):
    """Plans and engines.json were 0600 (mkstemp's mode) while the bundle's other files follow the umask, so engines
    built by one user (root in a container) could not be read by the one that serves them."""
    from ldm_export.export.tensorrt_build import atomic_write_bytes, atomic_write_json

    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "unet.plan", b"plan")
        atomic_write_json(tmp_path / "engines.json", {})
        os.umask(0o077)
        atomic_write_bytes(tmp_path / "private.plan", b"plan")
    finally:
        os.umask(old)
    assert (tmp_path / "unet.plan").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "engines.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "private.plan").stat().st_mode & 0o777 == 0o600


def test_atomic_write_failure_keeps_the_old_file(tmp_path, monkeypatch):
    from ldm_export.export import tensorrt_build

    p = tmp_path / "unet.plan"
    p.write_bytes(b"good plan")

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(tensorrt_build.os, "replace", broken_replace)
    with pytest.raises(OSError):
        tensorrt_build.atomic_write_bytes(p, b"x" * 1000)
    assert p.read_bytes() == b"good plan"
    assert [x.name for x in tmp_path.iterdir()] == ["unet.plan"]


@needs_polygraphy
def test_failed_build_leaves_earlier_engines_and_a_valid_index(bundle_copy):
    from ldm_export.export.tensorrt_build import EngineOptions, build_engines
    from polygraphy.exception import PolygraphyException

    def fails_on_vae(loader):
        if "vae_decoder" in loader._network.path:
            raise PolygraphyException("Failed to parse ONNX model.\nIn node 12 (Conv): bad")
        return _fake_plans(loader)

    with pytest.raises(LdmExportError) as e:
        build_engines(bundle_copy, None, EngineOptions(), target=H100, serialize=fails_on_vae)
    assert str(e.value).startswith("vae_decoder: TensorRT could not build the engine: Failed to parse ONNX model.")
    assert "\n" not in str(e.value)
    index = json.loads((engines_root(bundle_copy) / H100.dirname / ENGINES_JSON).read_text())
    assert sorted(index["engines"]) == ["text_encoder", "unet"]
    assert not (engines_root(bundle_copy) / H100.dirname / "vae_decoder.plan").exists()



@needs_polygraphy
def test_a_build_failing_before_its_first_plan_leaves_no_engines_folder(bundle_copy):
    """A refused or failed first component used to leave an empty engines/<target>/ (holding only the lock file)."""
    from ldm_export.export.tensorrt_build import EngineOptions, build_engines
    from polygraphy.exception import PolygraphyException

    def fails(loader):
        raise PolygraphyException("Failed to parse ONNX model.")

    with pytest.raises(LdmExportError, match="could not build the engine"):
        build_engines(bundle_copy, ["unet"], EngineOptions(), target=H100, serialize=fails)
    assert not engines_root(bundle_copy).exists()
    build_engines(bundle_copy, ["vae_decoder"], EngineOptions(), target=H100, serialize=_fake_plans)
    with pytest.raises(LdmExportError, match="could not build the engine"):  # another GPU's folder, beside one kept
        build_engines(bundle_copy, ["unet"], EngineOptions(), target=L4, serialize=fails)
    assert available_targets(bundle_copy) == [H100.dirname]
    assert sorted(p.name for p in engines_root(bundle_copy).iterdir()) == [H100.dirname]
    with pytest.raises(LdmExportError, match="could not build the engine"):  # a folder that has engines stays whole
        build_engines(bundle_copy, ["unet"], EngineOptions(), target=H100, serialize=fails)
    assert list(json.loads((engines_root(bundle_copy) / H100.dirname / ENGINES_JSON).read_text())["engines"]) == \
        ["vae_decoder"]


@pytest.mark.skipif(os.name != "posix", reason="the folder lock is POSIX flock")
def test_a_failed_build_leaves_a_folder_another_builder_holds(bundle_copy):
    """Two first builds into one new folder: the one that fails must not remove the folder the other is writing."""
    import fcntl

    from ldm_export.export.tensorrt_build import _removed_if_unused

    root = engines_root(bundle_copy)
    folder = root / H100.dirname
    folder.mkdir(parents=True)
    with open(folder / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the other builder
        with pytest.raises(LdmExportError, match="another"):
            with _removed_if_unused([root, folder]):
                raise LdmExportError("another `ldm-export engines` is building into the folder")
        assert (folder / ".lock").is_file()
    with pytest.raises(LdmExportError):  # once it is free (and still empty), a failure removes both
        with _removed_if_unused([root, folder]):
            raise LdmExportError("refused")
    assert not root.exists()


@needs_polygraphy
def test_a_component_named_twice_builds_once(bundle_copy):
    from ldm_export.export.tensorrt_build import EngineOptions, build_engines

    built = []
    build_engines(bundle_copy, ["unet", "vae_decoder", "unet"], EngineOptions(), target=H100,
                  progress=lambda c, s, d: built.append(c) if s == "done" else None, serialize=_fake_plans)
    assert built == ["unet", "vae_decoder"]

# ---------------------------------------------------------------- missing TensorRT, through the CLI

NO_TENSORRT = "import sys; sys.modules['tensorrt'] = None; sys.modules['tensorrt_rtx_bindings'] = None"


def _cli_without_tensorrt(*args: str) -> subprocess.CompletedProcess:
    """`ldm-export ARGS` in a fresh interpreter where neither TensorRT nor TensorRT-RTX imports, as on a machine
    without them."""
    code = (NO_TENSORRT + "; sys.argv = ['ldm-export', *sys.argv[1:]]; "
            "from ldm_export.cli import main; main()")
    env = {k: v for k, v in os.environ.items() if k != "LDM_EXPORT_DEBUG"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, env=env)


def test_engines_help_says_which_builder_reads_the_timing_cache():
    from conftest import run_cli

    r = run_cli("engines", "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    assert "Full TensorRT: tactic timing cache" in text and "TensorRT-RTX keeps none and ignores it" in text


def test_engines_without_tensorrt_is_one_line_naming_the_install(tiny_bundle):
    r = _cli_without_tensorrt("engines", str(tiny_bundle))
    assert r.returncode == 2, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert lines[0].startswith("error: TensorRT is not installed")
    assert "pip install 'ldm-export[tensorrt-rtx]'" in lines[0]
    assert "pip install 'ldm-export[tensorrt]'" in lines[0] and "pypi.nvidia.com" in lines[0]
    assert not engines_root(tiny_bundle).exists()


def test_tensorrt_native_provider_without_tensorrt_is_one_error(tiny_bundle):
    code = (NO_TENSORRT + "\n"
            "from ldm_export.runtime.errors import LdmExportError\n"
            "from ldm_export.runtime.pipeline import Pipeline\n"
            "try:\n    Pipeline.from_bundle(sys.argv[1], provider='tensorrt-native')\n"
            "except LdmExportError as e:\n    print('ERR', e); sys.exit(0)\n"
            "sys.exit(1)\n")
    r = subprocess.run([sys.executable, "-c", code, str(tiny_bundle)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("ERR TensorRT is not installed") and r.stdout.count("\n") == 1


def test_runtime_module_never_imports_torch():
    code = ("import sys, ldm_export.runtime.engine_tensorrt, ldm_export.runtime.pipeline; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'tensorrt', 'polygraphy')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"  # torch never; tensorrt and polygraphy only when an engine is made


# ---------------------------------------------------------------- the real thing (TensorRT + GPU)

def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


@pytest.mark.tensorrt
@needs_tensorrt
def test_end_to_end_engines_match_onnxruntime_cpu(bundle_copy):
    from ldm_export.cli import cli  # noqa: F401  the CLI must import with TensorRT present
    from ldm_export.runtime.engine import OrtEngine
    from ldm_export.runtime.engine_tensorrt import current_target, load_tensorrt_engine

    r = subprocess.run([sys.executable, "-m", "ldm_export.cli", "engines", str(bundle_copy), "--opt-level", "1"],
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr
    b = Bundle.open(bundle_copy, verify=True)
    target = current_target()
    assert available_targets(bundle_copy) == [target.dirname]
    rng = np.random.default_rng(0)
    for comp in b.components:
        spec = b.spec(comp)
        for which in ("min", "opt", "max"):
            feeds = {}
            dims = {d: spec.profile[d][{"min": 0, "opt": 1, "max": 2}[which]] for d in spec.profile}
            for t in spec.inputs:
                shape = spec.concrete_shape(t, dims)
                if t.dtype.startswith("int"):
                    feeds[t.name] = rng.integers(0, 1000, shape).astype(t.dtype)
                else:
                    feeds[t.name] = np.asarray(rng.standard_normal(shape) * (500 if t.name == "timestep" else 1),
                                               dtype=t.dtype)
            ref = OrtEngine(b.model_path(comp), spec, provider="cpu").run(feeds)
            with load_tensorrt_engine(b, comp, target) as eng:
                got = eng.run(feeds)
            for name in spec.output_names:
                assert got[name].shape == ref[name].shape, (comp, name, which)
                cos = _cosine(got[name], ref[name])
                assert cos >= 0.999, f"{comp}.{name} at {which}: cosine {cos:.6f}"


def test_engines_with_an_empty_component_list_is_one_line(tiny_bundle):
    """`--components ""` (or ",,") named nothing and built every component; now it says so, before any build."""
    from conftest import run_cli

    for value in ("", ",,"):
        r = run_cli("engines", str(tiny_bundle), "--components", value)
        assert r.returncode == 2, r.stderr
        assert "names no component" in r.stderr and "\n" not in r.stderr.strip()
