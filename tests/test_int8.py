"""int8: capture from the runtime's sampler, per-step ranges and their combination, quant levels and exclusions, the
int8 build and its report, TensorRT-RTX parsing the QDQ UNet, and every bad input."""
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import run_cli

pytest.importorskip("torch")

from ldm_export.calibration import capture as C  # noqa: E402
from ldm_export.calibration import quantize as Q  # noqa: E402
from ldm_export.calibration.int8 import Int8Config, quantize_bundle  # noqa: E402
from ldm_export.runtime.bundle import Bundle  # noqa: E402
from ldm_export.runtime.errors import LdmExportError  # noqa: E402
from ldm_export.runtime.pipeline import Pipeline  # noqa: E402

FAST = dict(size=2, steps=3, quality_prompts=1, adherence_prompts=0)


def no_leftovers(parent: Path, name: str) -> bool:
    return not (parent / name).exists() and not list(parent.glob(f".{name}.*"))


@pytest.fixture(scope="module")
def tiny_capture(tiny_bundle):
    pipe = Pipeline.from_bundle(tiny_bundle)
    return C.capture_unet_inputs(pipe, ["a red circle", "a blue square on the left"], num_inference_steps=3,
                                 scheduler="Euler", seed=3, model_identity=C.model_identity(pipe.bundle))


@pytest.fixture(scope="module")
def tiny_int8(tiny_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "tiny-int8"
    manifest = quantize_bundle(tiny_bundle, out, Int8Config(**FAST))
    return out, manifest


# ---------------------------------------------------------------- prompts and levels

def test_default_prompt_file_ships_and_reads():
    prompts = C.read_prompts(None)
    assert C.DEFAULT_PROMPTS.is_file() and len(prompts) >= 32 and not any(p.startswith("#") for p in prompts)
    assert C.read_prompts(None, 5) == prompts[:5]


def test_bad_prompt_files(tmp_path):
    with pytest.raises(LdmExportError, match="does not exist"):
        C.read_prompts(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n   \n")
    with pytest.raises(LdmExportError, match="has no prompts"):
        C.read_prompts(empty)
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeffa red circle\r\nblue square\r\n".encode("utf-8"))  # as Windows editors save it
    assert C.read_prompts(bom) == ["a red circle", "blue square"]


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="POSIX named pipes")
def test_a_prompt_pipe_is_refused_as_not_a_file(tmp_path):
    """`--calib-prompts <(grep cat prompts.txt)` names a pipe, which exists but was reported as not existing (and the
    prompts are read more than once during a build)."""
    import os

    fifo = tmp_path / "prompts.fifo"
    os.mkfifo(fifo)
    with pytest.raises(LdmExportError, match="is not a regular file \\(a pipe or device\\); write the prompts to a file"):
        C.read_prompts(fifo)


def test_calib_size_beyond_the_file_warns_once(tmp_path, caplog):
    short = tmp_path / "short.txt"
    short.write_text("a red circle\nblue square\n")
    with caplog.at_level("WARNING"):
        assert C.read_prompts(short, 32) == ["a red circle", "blue square"]  # the default size: no warning
        assert C.read_prompts(short, 8, warn_short=True) == ["a red circle", "blue square"]
        C.read_prompts(short, 8, warn_short=True)  # asked twice: one warning
    warned = [r.getMessage() for r in caplog.records if "--calib-size" in r.getMessage()]
    assert warned == ["--calib-size 8 asks for more prompts than short.txt holds: calibrating on its 2"]


@pytest.mark.parametrize("level", ["4", "0", "two", None, 2.4])
def test_nonexistent_quant_level(level):
    with pytest.raises(LdmExportError, match="does not exist; choose one of 1, 2, 2.5, 3"):
        Q.parse_level(level)


def test_levels_choose_layers_by_name_and_keep_the_exclusions(tiny_bundle):
    model = onnx.load(str(tiny_bundle / "unet" / "model.onnx"))
    chosen = {lvl: set(Q.select_nodes(model, lvl)[0]) for lvl in Q.QUANT_LEVELS}
    assert chosen[1.0] < chosen[2.0] < chosen[2.5] < chosen[3.0]
    assert all("/Conv" in n or n.endswith("Conv") for n in chosen[1.0])
    assert {n for n in chosen[2.0] - chosen[1.0]} and all("/ff/net" in n for n in chosen[2.0] - chosen[1.0])
    assert all(any(f"/to_{x}/" in n for x in "qkv") for n in chosen[2.5] - chosen[2.0])
    assert any("/to_out" in n for n in chosen[3.0] - chosen[2.5])
    for name in chosen[3.0]:
        assert not any(x in name for x in Q.EXCLUDED), name
    # the excluded layers exist in the graph: conv_in, conv_out, time embedding, proj_out
    names = [n.name for n in model.graph.node]
    for x in ("conv_in", "conv_out", "time_emb", "proj_out"):
        assert any(x in n for n in names)
    # attention's activation-by-activation MatMuls are never layers to quantise
    inits = {i.name for i in model.graph.initializer}
    for n in model.graph.node:
        if n.name in chosen[3.0]:
            assert n.input[1] in inits


def test_combine_steps_is_the_minimum_over_the_first_share_of_steps():
    per_step = {0: {"a": 4.0, "b": 1.0}, 1: {"a": 2.0, "b": 3.0}, 2: {"a": 8.0, "b": 0.5}}
    assert Q.combine_steps(per_step) == {"a": 2.0, "b": 0.5}
    assert Q.combine_steps(per_step, step_share=2 / 3) == {"a": 2.0, "b": 1.0}
    assert Q.combine_steps(per_step, step_share=0.1) == {"a": 4.0, "b": 1.0}
    assert Q.combine_steps(per_step, how="max") == {"a": 8.0, "b": 3.0}


# ---------------------------------------------------------------- capture

def test_capture_records_every_step_of_the_runtime_sampler(tiny_bundle, tiny_capture):
    cap = tiny_capture
    assert cap.steps == [0, 1, 2]
    assert cap.sample.shape == (6, 2, 4, 8, 8)  # 2 prompts x 3 Euler steps, CFG batch 2, tiny latents
    assert cap.encoder_hidden_states.shape == (2, 2, 77, 32)
    assert cap.info["sampler"] == "Euler" and cap.info["seed"] == 3 and cap.info["num_inference_steps"] == 3
    assert cap.info["prompts"] == ["a red circle", "a blue square on the left"]
    assert cap.info["shapes"]["sample"] == [2, 4, 8, 8]
    pipe = Pipeline.from_bundle(tiny_bundle)
    # the recorded conditioning is [uncond, cond] of each prompt, as the sampler fed it
    np.testing.assert_allclose(cap.encoder_hidden_states[1, 1], pipe.encode_prompt(["a blue square on the left"])[0], atol=1e-6)
    np.testing.assert_allclose(cap.encoder_hidden_states[1, 0], pipe.encode_prompt([""])[0], atol=1e-6)
    # each step's latents differ: the sampler moved between the recorded calls
    first = cap.indices(0)[0]
    assert not np.allclose(cap.sample[first], cap.sample[cap.indices(1)[0]])


def test_capture_at_chosen_steps(tiny_bundle):
    pipe = Pipeline.from_bundle(tiny_bundle)
    cap = C.capture_unet_inputs(pipe, ["a red circle"], num_inference_steps=4, record_steps=[1, 3])
    assert cap.steps == [1, 3] and len(cap.step) == 2
    with pytest.raises(LdmExportError, match="no UNet call was recorded"):
        C.capture_unet_inputs(pipe, ["a red circle"], num_inference_steps=2, record_steps=[7])


def test_a_build_with_lora_has_another_capture_identity(tiny_bundle):
    """`build --lora` records its LoRAs beside the weights, not in them: a cache captured without the LoRA was reused
    for a build with it (and the reverse), calibrating on another model's activations."""
    b = Bundle.open(tiny_bundle)
    plain = C.model_identity(b)
    lora = {**b.manifest, "loras": [{"file": "style.safetensors", "scale": 1.0, "sha256": "ab" * 32}]}
    assert C.model_identity(Bundle(b.path, lora))["weights"] != plain["weights"]
    assert C.model_identity(Bundle(b.path, {**b.manifest}))["weights"] == plain["weights"]  # caches made before still match


def test_capture_cache_round_trip_and_refusals(tiny_capture, tmp_path):
    C.save_capture(tiny_capture, tmp_path / "cache")
    ident = tiny_capture.info["model"]
    back = C.load_capture(tmp_path / "cache", ident, {"sample": [2, 4, 8, 8]})
    np.testing.assert_array_equal(back.sample, tiny_capture.sample)
    assert back.info == tiny_capture.info
    with pytest.raises(LdmExportError, match="captured for another model"):
        C.load_capture(tmp_path / "cache", {**ident, "name": "sd15"})
    with pytest.raises(LdmExportError, match="captured for another model"):
        C.load_capture(tmp_path / "cache", {**ident, "weights": "0" * 16})
    with pytest.raises(LdmExportError, match=r"holds sample of shape \[2, 4, 8, 8\], this build feeds \[2, 4, 16, 16\]"):
        C.load_capture(tmp_path / "cache", ident, {"sample": [2, 4, 16, 16]})
    # arrays cut by hand to fewer calls than the manifest records (a valid .npz): damaged, not an IndexError later
    with np.load(tmp_path / "cache" / C._ARRAYS) as z:
        arrays = {k: z[k] for k in z.files}
    np.savez(tmp_path / "cache" / C._ARRAYS, **{**arrays, "sample": arrays["sample"][:1]})
    with pytest.raises(LdmExportError, match="is damaged: its arrays do not match its manifest; delete it"):
        C.load_capture(tmp_path / "cache", ident)
    np.savez(tmp_path / "cache" / C._ARRAYS, **{**arrays, "prompt": arrays["prompt"] + 99})  # past the prompts
    with pytest.raises(LdmExportError, match="is damaged: its arrays do not match its manifest; delete it"):
        C.load_capture(tmp_path / "cache", ident)


# ---------------------------------------------------------------- per-step ranges

def test_per_step_ranges_come_from_that_step_alone(tiny_bundle, tiny_capture, tmp_path):
    """ONNX Runtime's MinMax calibrator, reset per step: the range of the UNet's input ``sample`` at step s is
    max |sample| over the calls of step s (not merged with other steps)."""
    per = Q.step_amax(tiny_bundle / "unet" / "model.onnx", tiny_capture, "minmax", {"sample"}, tmp_path, False)
    assert sorted(per) == [0, 1, 2]
    for step in per:
        expect = max(float(np.abs(tiny_capture.sample[i]).max()) for i in tiny_capture.indices(step))
        assert per[step]["sample"] == pytest.approx(expect, rel=1e-6)
    assert len({round(per[s]["sample"], 6) for s in per}) == 3  # the sampler's latents shrink step by step


# ---------------------------------------------------------------- the int8 bundle

def test_int8_bundle_manifest_graph_and_report(tiny_int8):
    out, manifest = tiny_int8
    b = Bundle.open(out, verify=True)
    assert b.precision("unet") == "int8" and b.precision("text_encoder") == "fp32" and b.precision("vae_decoder") == "fp32"
    model = onnx.load(str(out / "unet" / "model.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") > 10 and ops.count("DequantizeLinear") > ops.count("QuantizeLinear")
    # per-channel symmetric int8 weights: a weight DequantizeLinear has a vector of scales and zero points of 0
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    weight_dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                 and inits[n.input[0]].dtype == np.int8 and inits[n.input[0]].ndim >= 2]
    assert weight_dq and all(inits[n.input[1]].size > 1 and not inits[n.input[2]].any() for n in weight_dq)
    # the excluded layers keep float weights
    conv_in = next(n for n in model.graph.node if n.op_type == "Conv" and "conv_in" in n.name)
    assert conv_in.input[1] in inits and inits[conv_in.input[1]].dtype == np.float32
    q = manifest["int8"]
    # the tiny model's PNDM makes 4 evaluations for 3 steps (its warm-up re-does step 0), each recorded
    assert q["calibration"]["prompts"] == C.read_prompts(None, 2) and q["calibration"]["recorded_steps"] == [0, 1, 2, 3]
    assert q["calibration"]["sampler"] == "PLMS"
    assert q["quantisation"]["level"] == 2.5 and q["quantisation"]["method"] == "percentile"
    assert q["quantisation"]["combine"] == "min over steps" and q["quantisation"]["excluded_names"] == list(Q.EXCLUDED)
    unet_q = q["quality"]["components"]["unet"]
    assert np.isfinite(unet_q["sqnr_db"]) and unet_q["sqnr_db"] > 5 and sorted(map(int, unet_q["by_step_db"])) == [0, 1, 2, 3]
    assert q["quality"]["components"]["text_encoder"] == {"precision": "fp32", "sqnr_db": None}
    assert np.isfinite(q["quality"]["image"]["psnr_db_mean"]) and q["quality"]["image"]["images"] == 1
    ranges = json.loads((out / "unet" / "int8_ranges.json").read_text())
    assert ranges["data"] and all(v["highest"]["data"] == -v["lowest"]["data"] for v in ranges["data"].values())
    # the runtime draws an image from it
    images = Pipeline.from_bundle(out)("a red circle", num_inference_steps=3, seed=1)
    assert np.asarray(images[0]).std() > 0


def test_inspect_shows_the_int8_report(tiny_int8):
    out, _ = tiny_int8
    r = run_cli("inspect", str(out), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "int8 quality" in r.stdout and "unet SQNR vs fp32" in r.stdout and "image PSNR vs fp32" in r.stdout
    assert "fp32 (not quantised)" in r.stdout



@pytest.mark.parametrize("damage,text", [
    (lambda q: q.pop("quality"), "no 'quality'"),
    (lambda q: q["quantisation"].pop("level"), "no 'level'"),
    (lambda q: q.__setitem__("quantisation", None), "is damaged ("),
    (lambda q: q["quality"]["components"]["unet"].__setitem__("sqnr_db", None), "is damaged ("),
], ids=["no-quality", "no-level", "quantisation-null", "sqnr-null"])
def test_inspect_of_a_damaged_int8_section_is_one_line(tiny_int8, tmp_path, damage, text):
    """A hand-edited or cut int8 section of the manifest gave a traceback (KeyError, TypeError) in `inspect`."""
    out, _ = tiny_int8
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    m = json.loads((bad / "ldm_export.json").read_text())
    damage(m["int8"])
    (bad / "ldm_export.json").write_text(json.dumps(m))
    r = run_cli("inspect", str(bad), timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    line = r.stderr.strip()
    assert "\n" not in line and "the int8 section of the bundle's ldm_export.json is damaged" in line and text in line
    assert "ldm-export quantize" in line


def test_engines_reads_a_damaged_int8_section_without_a_traceback(tiny_int8, tmp_path):
    """`engines` looked the QDQ format up in the manifest with chained .get() calls: a non-dict int8 section raised
    AttributeError. The graph itself then decides (its Q/DQ nodes), as for a bundle without the section."""
    from ldm_export.export.tensorrt_build import EngineOptions, engine_recipe

    out, _ = tiny_int8
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    m = json.loads((bad / "ldm_export.json").read_text())
    m["int8"]["quantisation"] = None
    (bad / "ldm_export.json").write_text(json.dumps(m))
    recipe = engine_recipe(Bundle.open(bad), "unet", EngineOptions(), None, "tensorrt-rtx")
    assert recipe.quantization.startswith("int8 QDQ (") and recipe.bundle_precision == "int8"

def test_unet_sqnr_falls_with_cruder_ranges(tiny_bundle, tiny_capture, tmp_path):
    """The quality report measures what it claims: ranges shrunk 100x (heavy clipping) lose SQNR."""
    from ldm_export.calibration.report import unet_sqnr
    from ldm_export.runtime.engine import OrtEngine

    pre = tmp_path / "pre.onnx"
    Q.preprocess(tiny_bundle / "unet" / "model.onnx", pre, False)
    model = onnx.load(str(pre))
    nodes, _ = Q.select_nodes(model, 2.5)
    amax = Q.combine_steps(Q.step_amax(pre, tiny_capture, "minmax", Q.calibration_tensors(model, nodes), tmp_path, False))
    spec = Bundle.open(tiny_bundle).spec("unet")
    fp32 = OrtEngine(tiny_bundle / "unet" / "model.onnx", spec)
    results = {}
    for name, scale in (("calibrated", 1.0), ("clipped", 0.01)):
        Q.write_table({k: v * scale for k, v in amax.items()}, "minmax", tmp_path / f"{name}.json")
        Q.quantize_qdq(pre, tmp_path / f"{name}.onnx", tmp_path / f"{name}.json", "minmax", nodes)
        results[name] = unet_sqnr(fp32, OrtEngine(tmp_path / f"{name}.onnx", spec), tiny_capture)["sqnr_db"]
    assert results["calibrated"] > results["clipped"] + 10


# ---------------------------------------------------------------- TensorRT

def test_tensorrt_parses_and_builds_the_tensorrt_format_and_refuses_int32_biases(tiny_bundle, tiny_capture, tmp_path):
    """TensorRT-RTX's builder on this CPU: the tensorrt-format QDQ UNet (float biases) parses and builds; the
    onnxruntime format (int32 bias DequantizeLinear, for ONNX Runtime's QLinearConv) is refused, and we say why."""
    pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX is not installed (pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings)")
    from ldm_export.calibration.tensorrt_check import parse_and_build, unet_profile

    spec = Bundle.open(tiny_bundle).spec("unet")
    profile = unet_profile(spec, side=8)
    results = {}
    for fmt in Q.FORMATS:
        out = tmp_path / f"{fmt}.onnx"
        Q.quantize_unet(tiny_bundle / "unet" / "model.onnx", out, tiny_capture, "minmax", 3, fmt)
        results[fmt] = parse_and_build(out, profile)
    assert results["tensorrt"]["parsed"] and results["tensorrt"]["built"], results["tensorrt"]["errors"]
    assert results["tensorrt"]["plan_bytes"] > 0
    assert not results["onnxruntime"]["parsed"]
    assert "input has type Int32 but must have type" in results["onnxruntime"]["errors"][0]


# ---------------------------------------------------------------- bad input: one line, nothing written

def _one_line_error(r, text, after_progress=False):
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
    if after_progress:  # the build's progress lines come first; the error is the one last line, no traceback
        assert "Traceback" not in r.stderr and sum(x.startswith("error:") for x in lines) == 1
        lines = lines[-1:]
    assert len(lines) == 1 and lines[0].startswith("error:") and text in lines[0], r.stderr


@pytest.mark.parametrize("extra,text", [
    (["--calib-prompts", "MISSING"], "does not exist; pass --calib-prompts FILE"),
    (["--calib-prompts", "EMPTY"], "has no prompts; write one prompt a line"),
    (["--quant-level", "4"], "quant level '4' does not exist; choose one of 1, 2, 2.5, 3"),
    (["--int8-components", "text_encoder"], "text_encoder cannot be int8"),
    (["--int8-components", "vae_decoder"], "vae_decoder cannot be int8"),
    (["--int8-components", "unet,controlnet"], "unknown component 'controlnet' for int8"),
    (["--int8-format", "tensorrt", "--int8-activations", "u8"], "TensorRT takes symmetric int8 activations only"),
    (["--calib-size", "0"], "--calib-size must be at least 1"),
    (["--calib-size", "-2"], "--calib-size must be at least 1"),
    (["--calib-prompts", "FOLDER"], "is a folder; pass --calib-prompts FILE"),
    (["--calib-prompts", "BLANK"], "has no prompts; write one prompt a line"),
    (["--calib-prompts", "LATIN1"], "give a UTF-8 text file"),
    (["--quality-prompts", "-1"], "--quality-prompts must be 0 (no PSNR images) or more, got -1"),
    (["--adherence-prompts", "-1"], "--adherence-prompts must be 0 (skip the check) or more, got -1"),
    (["--calib-cache", "DAMAGED"], "is damaged (capture.json is not a capture manifest)"),
    (["--calib-cache", "BROKEN_JSON"], "is damaged (Expecting"),
    (["--calib-cache", "OTHER_STEPS", "--calib-steps", "5", "--calib-size", "1"], "captured with 3 steps, this build asks for 5"),
    (["--calib-cache", "OTHER_STEPS", "--calib-steps", "3", "--calib-size", "2"], "captured with 1 prompts, this build asks for 2"),
    (["--calib-cache", "OTHER_MODEL"], "was captured for model 'demo', this build is 'tiny'"),
    (["--target", "cuda"], "use --target cpu"),
    (["--target", "tensorrt"], "use --target cpu, with --int8-format tensorrt for `ldm-export engines`"),
    (["--model", "tiny-sdxl"], "tiny-sdxl is a sdxl model (text_encoder, text_encoder_2, unet, vae_decoder)"),
    (["--model", "tiny-flux"], "tiny-flux is a flux model"),
    (["--model", "tiny-inpaint"], "tiny-inpaint's UNet takes 9 input channels (an inpainting UNet)"),
])
def test_bad_int8_input_is_one_line_and_writes_nothing(tmp_path, extra, text):
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    other = tmp_path / "other-cache"
    other.mkdir()
    (other / "capture.json").write_text(json.dumps({"version": 1, "model": {"name": "demo"}}))
    (other / "unet_inputs.npz").write_bytes(b"")
    (tmp_path / "blank.txt").write_text("\n   \n\t\n")
    (tmp_path / "latin1.txt").write_bytes("une pomme rouge à gauche\n".encode("latin-1"))
    for name, content in (("damaged", "[]"), ("broken", "{"),
                       ("steps", json.dumps({"version": 1, "model": {"name": "tiny"}, "num_inference_steps": 3, "seed": 0,
                                             "guidance_scale": 7.5, "prompts": C.read_prompts(None, 1)}))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "capture.json").write_text(content)
        (tmp_path / name / "unet_inputs.npz").write_bytes(b"")
    subst = {"MISSING": str(tmp_path / "nope.txt"), "EMPTY": str(tmp_path / "empty.txt"), "OTHER_MODEL": str(other),
             "FOLDER": str(tmp_path), "BLANK": str(tmp_path / "blank.txt"), "LATIN1": str(tmp_path / "latin1.txt"),
             "DAMAGED": str(tmp_path / "damaged"), "BROKEN_JSON": str(tmp_path / "broken"),
             "OTHER_STEPS": str(tmp_path / "steps")}
    extra = [subst.get(x, x) for x in extra]
    out = tmp_path / "b"
    model = [] if "--model" in extra else ["--model", "tiny"]
    r = run_cli("build", *model, "--random-weights", "--precision", "int8", "--out", str(out), *extra, timeout=300)
    _one_line_error(r, text)
    assert no_leftovers(tmp_path, "b")


@pytest.mark.parametrize("where", ["b/calib", "b"])
def test_a_calib_cache_inside_the_out_folder_is_refused_before_any_work(tmp_path, monkeypatch, where):
    """`--calib-cache OUT/calib` made OUT during the capture, so the finished build could not be renamed into place:
    every step ran, then 'OUT appeared during the build', and OUT/calib was left."""
    monkeypatch.chdir(tmp_path)
    r = run_cli("build", "--model", "tiny", "--random-weights", "--precision", "int8", "--calib-size", "1",
                "--calib-steps", "1", "--quality-prompts", "0", "--calib-cache", where, "--out", "b", timeout=300)
    _one_line_error(r, f"--calib-cache {where} is inside the bundle folder b")
    assert no_leftovers(tmp_path, "b")


def test_quantize_refuses_a_calib_cache_inside_its_out(tiny_bundle, tmp_path):
    with pytest.raises(LdmExportError, match="is inside the bundle folder"):
        quantize_bundle(tiny_bundle, tmp_path / "q", Int8Config(**FAST, cache=tmp_path / "q" / "calib"))
    assert no_leftovers(tmp_path, "q")


def test_a_real_model_without_calib_prompts_is_warned(caplog):
    from ldm_export.calibration.int8 import validate

    with caplog.at_level("WARNING"):
        validate(Int8Config(size=2), "demo", "cpu")
    assert "--calib-prompts" not in caplog.text
    with caplog.at_level("WARNING"):
        validate(Int8Config(size=2), "sd15", "cpu")
    assert "calibrating sd15 on the prompt file shipped for the demo model" in caplog.text


def test_build_warns_once_about_the_demo_prompt_file(tmp_path):
    """`build` checks its options twice (before torch is imported, then in build()): the warning came twice."""
    r = run_cli("build", "--model", "tiny", "--random-weights", "--precision", "int8", "--calib-size", "1",
                "--calib-steps", "1", "--quality-prompts", "0", "--out", str(tmp_path / "b"), timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("no --calib-prompts: calibrating tiny on the prompt file shipped for the demo model") == 1


def test_calibration_options_need_int8(tmp_path):
    r = run_cli("build", "--model", "tiny", "--random-weights", "--quant-level", "2", "--out", str(tmp_path / "b"))
    _one_line_error(r, "add --precision int8")
    assert no_leftovers(tmp_path, "b")


def _build_int8_from_cache(cache, info, tmp_path):
    """`build --precision int8` reusing ``cache``, asking for what it holds: its ``info`` (capture.json, written back
    with the build's seed 0), its prompts and its step count. Returns the CLI result."""
    info["seed"] = 0  # the build's seed; prompts and steps are given below as the capture's
    (cache / "capture.json").write_text(json.dumps(info))
    (tmp_path / "prompts.txt").write_text("\n".join(info["prompts"]) + "\n")
    return run_cli("build", "--model", "tiny", "--random-weights", "--precision", "int8", "--calib-cache", str(cache),
                   "--calib-prompts", str(tmp_path / "prompts.txt"), "--calib-steps", str(info["num_inference_steps"]),
                   "--out", str(tmp_path / "b"), timeout=300)


def test_cache_of_another_shape_fails_after_export_and_leaves_nothing(tiny_capture, tmp_path):
    """A cache of the same model whose inputs have another shape is found only once the model is loaded: the
    build still fails with one line and leaves neither bundle nor staging folder."""
    cache = tmp_path / "cache"
    C.save_capture(tiny_capture, cache)
    info = json.loads((cache / "capture.json").read_text())
    z = dict(np.load(cache / "unet_inputs.npz"))
    z["sample"] = np.zeros(z["sample"].shape[:2] + (4, 4, 4), np.float32)  # 32 px latents of 4x4
    np.savez(cache / "unet_inputs.npz", **z)
    info["shapes"]["sample"] = [2, 4, 4, 4]
    r = _build_int8_from_cache(cache, info, tmp_path)
    _one_line_error(r, "holds sample of shape [2, 4, 4, 4], this build feeds [2, 4, 8, 8]", after_progress=True)
    assert no_leftovers(tmp_path, "b")


@pytest.mark.parametrize("damage", ["cut", "garbage"])
def test_a_damaged_cache_arrays_file_is_one_line_before_any_work(tiny_capture, tmp_path, damage):
    """A cut unet_inputs.npz raised zipfile.BadZipFile (a traceback) after the whole export; a foreign file gave numpy's
    advice to load pickles unsafely. Both are now one line, before the export."""
    cache = tmp_path / "cache"
    C.save_capture(tiny_capture, cache)
    arrays = cache / "unet_inputs.npz"
    arrays.write_bytes(arrays.read_bytes()[:2000] if damage == "cut" else b"not an npz" * 10)
    r = _build_int8_from_cache(cache, json.loads((cache / "capture.json").read_text()), tmp_path)
    _one_line_error(r, "is damaged (unet_inputs.npz: cut short or not an array file); delete it to capture anew")
    assert "pickle" not in r.stderr
    assert no_leftovers(tmp_path, "b")
    with pytest.raises(LdmExportError, match="cut short or not an array file"):
        C.load_capture(cache)


def test_build_int8_cli_reuses_its_cache(tmp_path):
    """`build --precision int8` end to end on the tiny model; the second build reuses the captured inputs and
    gives the same int8 graph."""
    cache = tmp_path / "cache"
    args = ["build", "--model", "tiny", "--random-weights", "--precision", "int8", "--calib-size", "2", "--calib-steps",
            "2", "--quality-prompts", "1", "--calib-method", "minmax", "--quant-level", "3", "--calib-cache", str(cache)]
    r1 = run_cli(*args, "--out", str(tmp_path / "a"), timeout=600)
    assert r1.returncode == 0, r1.stderr
    assert (cache / "capture.json").is_file() and "int8 quality" in r1.stdout
    r2 = run_cli(*args, "--out", str(tmp_path / "b"), timeout=600)
    assert r2.returncode == 0, r2.stderr
    assert "from cache" in r2.stderr
    a, b = (json.loads((tmp_path / x / "ldm_export.json").read_text()) for x in "ab")
    assert a["components"]["unet"]["precision"] == "int8" and a["int8"]["quantisation"]["level"] == 3.0
    assert a["files"]["unet/model.onnx"]["sha256"] == b["files"]["unet/model.onnx"]["sha256"]


def test_quantize_refuses_a_cut_unet_before_staging(tiny_bundle, tmp_path):
    src = tmp_path / "cut"
    shutil.copytree(tiny_bundle, src)
    graph = src / "unet" / "model.onnx"
    graph.write_bytes(graph.read_bytes()[:5000])
    r = run_cli("quantize", str(src), "--out", str(tmp_path / "q"), "--calib-size", "1", "--calib-steps", "1")
    _one_line_error(r, f"{graph} is missing or not the size its manifest records; the fp32 bundle is damaged",
                    after_progress=True)
    assert no_leftovers(tmp_path, "q")


def test_lora_on_an_int8_bundle_reaches_its_float_text_encoder_and_refuses_its_quantised_unet(tiny_int8, tmp_path):
    from test_lora import LAYERS, make_lora

    from ldm_export.export.lora import LoraRef, lora_bundle

    both, text = tmp_path / "both.safetensors", tmp_path / "text.safetensors"
    make_lora(both)
    make_lora(text, layers=[x for x in LAYERS if x[1] == "text_encoder"])
    with pytest.raises(LdmExportError, match=r"'s unet is int8 \(quantised weights\); fuse the LoRA into the fp32 .*quantize"):
        lora_bundle(tiny_int8[0], [LoraRef(both)], tmp_path / "a")
    assert no_leftovers(tmp_path, "a")
    manifest = lora_bundle(tiny_int8[0], [LoraRef(text)], tmp_path / "b")
    assert manifest["weights"]["loras"][0]["layers"] == {"unet": 0, "text_encoder": 5}
    unet = tiny_int8[1]["components"]["unet"]["files"]
    assert [manifest["files"][f]["sha256"] for f in unet] == [tiny_int8[1]["files"][f]["sha256"] for f in unet]


def test_quantize_refuses_a_non_fp32_bundle(tiny_int8, tmp_path):
    out, _ = tiny_int8
    with pytest.raises(LdmExportError, match="is not an fp32 bundle"):
        quantize_bundle(out, tmp_path / "again", Int8Config(**FAST))
    assert no_leftovers(tmp_path, "again")


def test_low_memory_runs_the_int8_unet_on_int8_kernels(tiny_int8):
    """--low-memory made every session at the basic optimisation level, which leaves QDQ unfused: the int8 UNet ran as
    dequantised fp32 (several times slower, more memory) and drew other images than the normal pipeline."""
    import onnxruntime as ort

    from ldm_export.runtime.lowmem import low_memory_engines

    out, _ = tiny_int8
    bundle = Bundle.open(out)
    slot = low_memory_engines(bundle)["unet"].slot
    levels = {c: slot.get(c).session.get_session_options().graph_optimization_level for c in ("text_encoder", "unet")}
    assert levels == {"text_encoder": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                      "unet": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}
    kw = dict(num_inference_steps=4, seed=5, scheduler="UniPC")
    normal = np.asarray(Pipeline.from_bundle(out, cfg_mode="sequential")("a red circle", **kw)[0], np.int16)
    low = np.asarray(Pipeline.from_bundle(out, low_memory=True)("a red circle", **kw)[0], np.int16)
    assert np.abs(normal - low).max() <= 2


def test_lora_on_an_int8_bundle_says_to_fuse_into_the_fp32_one(tiny_int8, tmp_path):
    """The int8 UNet keeps no float weight initializers: the refusal said 'build with --lora instead', not how."""
    from test_lora import make_lora

    out, _ = tiny_int8
    make_lora(tmp_path / "style.safetensors")
    r = run_cli("lora", str(out), str(tmp_path / "style.safetensors"), "--out", str(tmp_path / "l8"), timeout=300)
    _one_line_error(r, "'s unet is int8 (quantised weights); fuse the LoRA into the fp32 bundle it was quantised from")
    assert no_leftovers(tmp_path, "l8")


# ---------------------------------------------------------------- bench: int8 beside fp32 in one run

def test_bench_runs_int8_beside_fp32(tiny_bundle, tiny_int8, tmp_path):
    out, _ = tiny_int8
    r = run_cli("bench", "--bundle", str(tiny_bundle), "--int8-bundle", str(out), "--device", "cpu", "--backends",
                "ort,ort-int8", "--steps", "2", "--repeats", "2", "--e2e-repeats", "1", "--warmup", "1", "--threads", "1",
                "--out", str(tmp_path), timeout=600)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "bench_tiny_cpu.json").read_text())
    assert res["backends"]["ort"]["precision"] == "fp32" and res["backends"]["ort-int8"]["precision"] == "int8"
    assert np.isfinite(res["backends"]["ort-int8"]["fidelity"]["psnr_db"])
    assert "int8 against fp32 (ort-int8 vs ort, same run): UNet step" in r.stdout
    paired = res["int8_paired"]  # the alternating comparison: 2 UNet-step pairs and 1 end-to-end pair, all timed
    assert paired["unet_step"]["pairs"] == 2 and paired["end_to_end"]["pairs"] == 1
    ratios = [a / b for a, b in zip(paired["unet_step"]["fp32_ms"], paired["unet_step"]["int8_ms"])]
    assert all(t > 0 for t in paired["unet_step"]["fp32_ms"] + paired["unet_step"]["int8_ms"])
    assert paired["unet_step"]["ratio_median"] == pytest.approx(float(np.median(ratios)))
    assert "int8 against fp32 timed in alternation" in r.stdout


def test_bench_int8_needs_a_matching_int8_bundle(tiny_bundle, tmp_path):
    r = run_cli("bench", "--bundle", str(tiny_bundle), "--device", "cpu", "--backends", "ort,ort-int8", "--out", str(tmp_path))
    _one_line_error(r, "the ort-int8 backend needs --int8-bundle DIR")
    r = run_cli("bench", "--bundle", str(tiny_bundle), "--int8-bundle", str(tiny_bundle), "--device", "cpu", "--backends",
                "ort-int8", "--out", str(tmp_path))
    _one_line_error(r, "is not an int8 bundle")


def test_bench_int8_bundle_without_the_ort_int8_backend_is_one_line(tiny_bundle, tiny_int8, tmp_path):
    """--int8-bundle with backends that leave out ort-int8 (the default list) was ignored: no int8 row, no word."""
    out, _ = tiny_int8
    r = run_cli("bench", "--bundle", str(tiny_bundle), "--int8-bundle", str(out), "--device", "cpu", "--backends", "ort",
                "--steps", "1", "--repeats", "1", "--e2e-repeats", "1", "--warmup", "0", "--out", str(tmp_path / "bench"))
    _one_line_error(r, "--int8-bundle is timed by the ort-int8 backend: add it to --backends")
    assert not (tmp_path / "bench").exists()


def test_bench_int8_refuses_an_int8_bundle_built_with_a_lora_the_fp32_one_lacks(tiny_bundle, tiny_int8, tmp_path):
    out, _ = tiny_int8
    styled = tmp_path / "styled-int8"
    shutil.copytree(out, styled)
    m = json.loads((styled / "ldm_export.json").read_text())
    m["loras"] = [{"file": "style.safetensors", "scale": 1.0, "sha256": "ab" * 32}]  # as `build --lora` records them
    (styled / "ldm_export.json").write_text(json.dumps(m))
    r = run_cli("bench", "--bundle", str(tiny_bundle), "--int8-bundle", str(styled), "--device", "cpu", "--backends",
                "ort,ort-int8", "--steps", "1", "--repeats", "1", "--e2e-repeats", "1", "--warmup", "0",
                "--out", str(tmp_path / "bench"))
    _one_line_error(r, "holds another model or weights than")


def test_bench_int8_refuses_an_int8_bundle_as_the_fp32_side(tiny_int8, tmp_path):
    """`--bundle INT8 --int8-bundle INT8` timed the int8 UNet against itself and reported it as int8 against fp32."""
    out, _ = tiny_int8
    r = run_cli("bench", "--bundle", str(out), "--int8-bundle", str(out), "--device", "cpu", "--backends",
                "ort,ort-int8", "--steps", "1", "--repeats", "1", "--e2e-repeats", "1", "--warmup", "0",
                "--out", str(tmp_path / "bench"))
    _one_line_error(r, "is itself an int8 bundle; pass the fp32 bundle it was quantised from as --bundle")
    assert not (tmp_path / "bench").exists()


def test_sweep_table_and_plot(tmp_path):
    from ldm_export.calibration.report import write_plot
    from ldm_export.calibration.sweep import table_markdown

    adh = lambda c: {"colour": c, "shape": 90.0, "position": 100.0, "all": 88.0}  # noqa: E731
    rows = [{"method": m, "level": lvl, "quantised_nodes": 10 * lvl, "unet": {"sqnr_db": 20.0 - lvl},
             "image": {"psnr_db_mean": 30.0 - lvl, "psnr_db_min": 25.0},
             "adherence": {"fp32": adh(100.0), "int8": adh(97.5), "within_tolerance": True}}
            for m in ("minmax", "percentile") for lvl in (1.0, 2.5)]
    rows[-1]["smoothquant"] = {"alpha": 0.8}
    md = table_markdown({"rows": rows})
    assert "| fp32 | — | — | 0 | — | — | 100.0 | 90.0 | 100.0 | 88.0 | — |" in md
    assert "| percentile | 1 | off | 10.0 | 19.00 | 29.00 / 25.00 | 97.5 | 90.0 | 100.0 | 88.0 | yes |" in md
    assert "| percentile | 2.5 | 0.8 | 25.0 | 17.50 | 27.50 / 25.00 | 97.5 | 90.0 | 100.0 | 88.0 | yes |" in md
    write_plot(rows, tmp_path / "p.png", "t")
    assert (tmp_path / "p.png").stat().st_size > 1000


@pytest.mark.parametrize("args, text", [
    (["--levels", "2,4"], "quant level '4' does not exist"),
    (["--methods", "minmax,kl"], "unknown calibration method 'kl'"),
    (["--smoothquant", "off,2"], "is not a migration strength"),
    (["--bundle", "MISSING"], "no bundle at"),
])
def test_sweep_bad_input_is_one_line_before_any_capture(tiny_bundle, tmp_path, args, text):
    import subprocess
    import sys

    args = [str(tmp_path / "nope") if a == "MISSING" else a for a in args]
    base = ["--bundle", str(tiny_bundle)] if "--bundle" not in args else []
    r = subprocess.run([sys.executable, "-m", "ldm_export.calibration.sweep", *base, "--out", str(tmp_path / "o"),
                        "--calib-size", "1", "--calib-steps", "1", *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and text in last and "captured prompt" not in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()


def test_int8_of_an_external_data_unet(tiny_bundle, tmp_path):
    """An fp32 UNet stored as model.onnx + model.onnx_data (every UNet over 2 GB, SD 1.5's too) gives an int8
    bundle whose weights sit in one unet/model.onnx_data, opens, verifies and runs; the same graph as from a
    single-file UNet."""
    from onnx.external_data_helper import uses_external_data

    from ldm_export.runtime.bundle import sha256_file

    src = tmp_path / "ext-fp32"
    shutil.copytree(tiny_bundle, src)
    unet = src / "unet" / "model.onnx"
    onnx.save_model(onnx.load(str(unet)), str(unet), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx_data", size_threshold=0)
    m = json.loads((src / "ldm_export.json").read_text())
    m["components"]["unet"]["files"] = ["unet/model.onnx", "unet/model.onnx_data"]
    for rel in ("unet/model.onnx", "unet/model.onnx_data"):
        m["files"][rel] = {"sha256": sha256_file(src / rel), "size": (src / rel).stat().st_size}
    (src / "ldm_export.json").write_text(json.dumps(m))

    out = tmp_path / "ext-int8"
    manifest = quantize_bundle(src, out, Int8Config(**FAST))
    assert manifest["components"]["unet"]["files"] == ["unet/model.onnx", "unet/model.onnx_data"]
    assert sorted(p.name for p in (out / "unet").iterdir()) == ["config.json", "int8_ranges.json", "model.onnx",
                                                            "model.onnx_data"]
    graph = onnx.load(str(out / "unet" / "model.onnx"), load_external_data=False)
    ext = [t for t in graph.graph.initializer if uses_external_data(t)]
    assert ext and {e.value for t in ext for e in t.external_data if e.key == "location"} == {"model.onnx_data"}
    b = Bundle.open(out, verify=True)
    assert b.precision("unet") == "int8" and not list(out.parent.glob(".ext-int8*"))
    image = Pipeline.from_bundle(out)("a red circle", num_inference_steps=2, seed=0)
    assert np.asarray(image).std() > 0

    plain = quantize_bundle(tiny_bundle, tmp_path / "plain-int8", Int8Config(**FAST))
    a = onnx.load(str(out / "unet" / "model.onnx"))
    p = onnx.load(str(tmp_path / "plain-int8" / "unet" / "model.onnx"))
    wa = {i.name: onnx.numpy_helper.to_array(i) for i in a.graph.initializer}
    wp = {i.name: onnx.numpy_helper.to_array(i) for i in p.graph.initializer}
    assert wa.keys() == wp.keys() and all(np.array_equal(wa[k], wp[k]) for k in wa)
    assert plain["int8"]["quantisation"]["quantised_nodes"] == manifest["int8"]["quantisation"]["quantised_nodes"]
