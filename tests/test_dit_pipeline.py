"""DiT families end to end: bundles of tiny-sd3 / tiny-flux run by the numpy Pipeline match diffusers' own
StableDiffusion3Pipeline / FluxPipeline on the same weights, tokenizers and initial noise (PSNR >= 40 dB)."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ldm_export.export.build import BuildConfig, build  # noqa: E402
from ldm_export.runtime import Pipeline  # noqa: E402
from ldm_export.runtime.bundle import Bundle  # noqa: E402
from ldm_export.runtime.errors import LdmExportError  # noqa: E402
from ldm_export.zoo import get_model  # noqa: E402
from ldm_export.parity.pipelines import (CASES, PROMPT, PSNR_TARGET, TINY_SCHNELL, build_case,  # noqa: E402
                                         compare_case)

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """name -> (bundle, diffusers folder, modules, spec) for tiny-sd3, tiny-flux (dev-like) and a schnell variant."""
    out = {}
    for spec in (get_model("tiny-sd3"), get_model("tiny-flux"), TINY_SCHNELL):
        out[spec.name] = (*build_case(spec, tmp_path_factory.mktemp(spec.name)), spec)
    return out


@pytest.mark.parametrize("name,guidance,negative", CASES)
def test_end_to_end_parity_with_diffusers_pipeline(built, name, guidance, negative):
    bundle, folder, modules, spec = built[name]
    r = compare_case(bundle, folder, modules, spec, guidance, negative)
    assert r["latent_max_abs"] < 1e-4 * r["latent_ref_max"]
    assert r["psnr_db"] >= PSNR_TARGET


def test_guidance_changes_flux_dev_but_not_schnell(built):
    latents = np.random.default_rng(1).standard_normal((1, 16, 8, 8)).astype(np.float32)
    run = lambda name, g: Pipeline.from_bundle(built[name][0])(PROMPT, num_inference_steps=2, guidance_scale=g,  # noqa: E731
                                                               latents=latents, return_latents=True)
    assert np.abs(run("tiny-flux", 1.5) - run("tiny-flux", 4.0)).max() > 1e-4  # dev: guidance is an input
    np.testing.assert_array_equal(run("tiny-flux-schnell", 1.5), run("tiny-flux-schnell", 4.0))


def test_images_carry_metadata_and_sizes_are_checked(built):
    pipe = Pipeline.from_bundle(built["tiny-flux"][0])
    image = pipe(PROMPT, num_inference_steps=2, seed=3, width=48, height=32)[0]
    assert image.size == (48, 32) and "Steps: 2" in image.info["parameters"]
    with pytest.raises(LdmExportError, match="multiple of 16"):
        pipe(PROMPT, num_inference_steps=2, width=40)


def test_t5_prompt_beyond_max_length_warns_with_the_cut_text(built, caplog):
    pipe = Pipeline.from_bundle(built["tiny-sd3"][0])
    long_prompt = " ".join(["a red circle on the left"] * 6) + " and finally a blue square"
    with caplog.at_level(logging.WARNING, logger="ldm_export.runtime.tokenizer_t5"):
        pipe.encode([long_prompt])
    assert "truncated" in caplog.text and "blue square" in caplog.text



def test_dit_families_refuse_editing_and_hand_off_in_one_line(built, tmp_path):
    from PIL import Image

    from ldm_export.export.build import validate

    with pytest.raises(LdmExportError, match="sd3 family of 'tiny-sd3' does not do yet"):  # was silently ignored
        validate(BuildConfig(model="tiny-sd3", random_weights=True, vae_encoder=True, out=tmp_path / "b"))
    Image.new("RGB", (64, 64)).save(tmp_path / "i.png")
    with pytest.raises(LdmExportError, match="sd3 family, which does not edit images yet"):  # not "rebuild it"
        Pipeline.from_bundle(built["tiny-sd3"][0])(PROMPT, init_image=tmp_path / "i.png", num_inference_steps=2)
    with pytest.raises(LdmExportError, match="flux family does not hand latents between models"):
        Pipeline.from_bundle(built["tiny-flux"][0])(PROMPT, num_inference_steps=4, denoising_end=0.5,
                                                    return_latents=True)



def test_a_negative_prompt_that_cannot_act_is_warned_about(built, caplog):
    flux, sd3 = Pipeline.from_bundle(built["tiny-flux"][0]), Pipeline.from_bundle(built["tiny-sd3"][0])
    with caplog.at_level(logging.WARNING, logger="ldm_export.runtime.pipeline"):
        flux(PROMPT, negative_prompt="blurry", num_inference_steps=1)
    assert "negative prompt has no effect: the flux family is guidance-distilled" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ldm_export.runtime.pipeline"):
        sd3(PROMPT, negative_prompt="blurry", num_inference_steps=1, guidance_scale=1.0)
        assert "guidance scale 1 (1 or less) runs no unconditional pass" in caplog.text
        caplog.clear()
        sd3(PROMPT, negative_prompt="blurry", num_inference_steps=1, guidance_scale=4.0)
        flux(PROMPT, num_inference_steps=1)
    assert "negative prompt" not in caplog.text


def test_a_guidance_scale_or_rescale_that_cannot_act_is_warned_about(built, caplog):
    """FLUX-schnell takes no guidance at all, and no family rescales without CFG: say so (they were ignored silently)."""
    schnell, dev = Pipeline.from_bundle(built["tiny-flux-schnell"][0]), Pipeline.from_bundle(built["tiny-flux"][0])
    default = schnell.bundle.defaults["guidance_scale"]
    with caplog.at_level(logging.WARNING, logger="ldm_export.runtime.pipeline"):
        schnell(PROMPT, num_inference_steps=1, guidance_scale=default + 2.0)
    assert "guidance scale has no effect: this flux model takes no guidance" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ldm_export.runtime.pipeline"):
        dev(PROMPT, num_inference_steps=1, guidance_rescale=0.7)
    assert "guidance rescale has no effect: the flux family is guidance-distilled" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ldm_export.runtime.pipeline"):
        schnell(PROMPT, num_inference_steps=1)  # the model's own guidance scale: nothing asked, nothing to say
        dev(PROMPT, num_inference_steps=1, guidance_scale=default + 2.0)  # dev's guidance is an input
    assert "no effect" not in caplog.text


def test_static_shape_bundle_matches_dynamic(built, tmp_path):
    bundle, folder, _, spec = built["tiny-sd3"]
    static = tmp_path / "static"
    build(BuildConfig(model="tiny-sd3", precision="fp32", weights=folder, out=static, static_shape=True))
    latents = np.random.default_rng(2).standard_normal((1, 16, 8, 8)).astype(np.float32)
    a = Pipeline.from_bundle(bundle)(PROMPT, num_inference_steps=3, guidance_scale=4.0, latents=latents,
                                     return_latents=True)
    b = Pipeline.from_bundle(static)(PROMPT, num_inference_steps=3, guidance_scale=4.0, latents=latents,
                                     return_latents=True)
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_a_static_flux_bundle_refuses_another_size_before_any_work(tmp_path, monkeypatch):
    """FLUX's transformer takes packed tokens, so the size check reads the decoder's latents: another size was a
    shape error from the transformer's boundary after the text encoders had run."""
    static = tmp_path / "static"
    build(BuildConfig(model="tiny-flux", precision="fp32", random_weights=True, out=static, static_shape=True))
    pipe = Pipeline.from_bundle(static)
    monkeypatch.setattr(Pipeline, "encode", lambda *a: pytest.fail("encoded before the size check"))
    with pytest.raises(LdmExportError, match=r"built with static shapes for 64x64; use that size \(--size 64x64 also resizes an init image to it\) or rebuild"):
        pipe(PROMPT, num_inference_steps=1, width=80, height=80)
    with pytest.raises(LdmExportError, match="built with static shapes for 64x64"):
        pipe.iter_images(PROMPT, num_inference_steps=1, width=64, height=96)


def test_demo_dit_folder_reuses_the_demo_models_clip_and_vae(tmp_path):
    """A demo-dit folder as train_dit installs it (transformer + scheduler; CLIP, VAE, tokenizer shared from the
    demo U-Net model's folder) builds, and the bundle generates 64 px images through the same Pipeline."""
    import shutil
    from pathlib import Path

    import ldm_export
    from ldm_export.demo import train_dit
    from ldm_export.export.models import build_module

    spec = get_model("demo-dit")
    shutil.copytree(Path(ldm_export.__file__).parent / "assets" / "demo", tmp_path / "demo")
    trained = tmp_path / "trained"
    torch.manual_seed(0)
    build_module(spec, "transformer").save_pretrained(str(trained / "transformer"))
    (trained / "scheduler").mkdir()
    (trained / "scheduler" / "scheduler_config.json").write_text(json.dumps(spec.scheduler))
    folder = train_dit.install(trained, tmp_path / "demo-dit")
    bundle = tmp_path / "bundle"
    manifest = build(BuildConfig(model="demo-dit", precision="fp32", weights=folder, out=bundle))
    assert manifest["model"]["family"] == "demo-dit" and manifest["model"]["max_length"] == 32
    assert manifest["components"]["transformer"]["spec"]["inputs"][1]["shape"] == ["batch", "text_sequence", 64]
    pipe = Pipeline.from_bundle(bundle)
    assert pipe.tokenizers["tokenizer"]("a red circle").shape == (1, 32)
    images = pipe(["a red circle on the left", "a blue square"], num_inference_steps=3, guidance_scale=5.0, seed=0)
    assert [im.size for im in images] == [(64, 64), (64, 64)]
    assert "Euler" in images[0].info["parameters"]


def test_dit_bench_runs_every_backend_on_the_same_pipeline(built, tmp_path):
    from ldm_export.bench.run import BenchConfig, run_bench

    result = run_bench(BenchConfig(bundle=built["tiny-flux"][0], weights=built["tiny-flux"][1], device="cpu",
                                   backends=("torch-eager", "ort"),
                                   steps=2, repeats=1, e2e_repeats=1, warmup=0, out=tmp_path))
    for name in ("torch-eager", "ort"):
        entry = result["backends"][name]
        assert "error" not in entry, entry
        assert entry["components"]["unet_step"]["median_ms"] > 0 and entry["fidelity"]["psnr_db"] > 40
    report = (tmp_path / "bench_tiny-flux_cpu.md").read_text()
    assert "nan" not in report.lower()  # a figure the DiT bench does not measure is left out, not printed as nan
    # no --guidance-scale: the bundle's default (the tiny model's 7.5: FLUX-dev's distilled guidance input), and the
    # header says FLUX runs no CFG
    assert result["guidance_scale"] == Bundle.open(built["tiny-flux"][0]).defaults["guidance_scale"] == 7.5
    assert result["cfg"] is False and "guidance 7.5, no CFG (transformer batch 1)" in report and "without warm-up runs" in report
    import json

    json.loads((tmp_path / "bench_tiny-flux_cpu.json").read_text(),  # (Infinity is an identical image's PSNR)
               parse_constant=lambda c: pytest.fail("NaN in the JSON") if c == "NaN" else float(c))


def test_missing_embedded_demo_dit_weights_is_one_line_error(tmp_path, monkeypatch):
    import dataclasses

    from ldm_export.zoo import MODELS

    monkeypatch.setitem(MODELS, "demo-dit", dataclasses.replace(get_model("demo-dit"), embedded_weights="assets/absent"))
    with pytest.raises(LdmExportError, match="embedded weights of 'demo-dit' are not installed.*--random-weights"):
        build(BuildConfig(model="demo-dit", out=tmp_path / "b"))
    assert not (tmp_path / "b").exists()


def test_embedded_demo_dit_builds_without_flags_and_draws_the_prompt(tmp_path):
    """The trained demo DiT ships in the package: `build --model demo-dit` needs no weights flag, and the numpy
    runtime draws each prompt's colour, shape and position at its default guidance (12 of the 120 checker cases,
    every colour, shape and position; the full table is docs/dit.md's)."""
    from ldm_export.demo import dit_config
    from ldm_export.demo.adherence import initial_latents, read_image, score
    from ldm_export.demo.data import prompt_cases
    from ldm_export.runtime.pipeline import Pipeline

    manifest = build(BuildConfig(model="demo-dit", out=tmp_path / "b"))
    assert manifest["model"]["family"] == "demo-dit" and manifest["weights"]["source"] == "embedded"
    assert manifest["model"]["defaults"] == {"steps": dit_config.DEFAULT_STEPS, "guidance_scale": dit_config.DEFAULT_GUIDANCE}
    pipe = Pipeline.from_bundle(tmp_path / "b")
    cases = prompt_cases()[::10]
    images = pipe([c[0] for c in cases], seed=0, latents=initial_latents(len(cases), 0))  # the model's defaults
    assert f"Steps: {dit_config.DEFAULT_STEPS}," in images[0].info["parameters"]
    assert f"CFG scale: {dit_config.DEFAULT_GUIDANCE:g}," in images[0].info["parameters"]
    readings = [read_image(im) for im in images]
    acc = score(readings, cases)
    assert acc["colour"] >= 90 and acc["position"] >= 90 and acc["shape"] >= 80, (acc, cases, readings)


def test_sizes_past_the_sd3_position_table_are_refused_in_one_line(built):
    """SD3's PatchEmbed crops a learned table of pos_embed_max_size patches a side (tiny-sd3: 16 patches of 2 latents
    of 8 px = 256 px): a larger image is refused before any work, not an ONNX Runtime broadcast traceback."""
    from ldm_export.runtime.pipeline import Pipeline

    pipe = Pipeline.from_bundle(built["tiny-sd3"][0])
    with pytest.raises(LdmExportError) as e:
        pipe("a cat", num_inference_steps=1, width=272, height=64)
    assert str(e.value) == ("width must be at most 256 px for this model (its transformer's position embedding covers "
                            "256 px a side), got 272; try 256 or less")
    assert pipe("a cat", num_inference_steps=1, width=256, height=64, seed=0)[0].size == (256, 64)


def test_serve_refuses_a_max_size_past_the_position_table_in_one_line(built):
    from conftest import run_cli

    r = run_cli("serve", str(built["tiny-sd3"][0]), "--dry-run", "--max-size", "512x256",
                "--serve-config", str(built["tiny-sd3"][0].parent / "serve.yaml"))
    assert r.returncode == 2 and r.stderr.strip() == ("error: --max-size 512x256 is past the 256 px a side this model's "
                                                      "transformer takes (its position embedding); use --max-size "
                                                      "256x256 or less"), r.stderr


def test_a_cut_prompt_is_warned_about_once_and_unused_options_stay_out_of_the_metadata(built, caplog):
    """SD3's two CLIP tokenizers each warned about the same cut; a prompt without spaces (emoji) was quoted whole in
    the warning; FLUX's image metadata recorded a guidance rescale it had just said has no effect."""
    from ldm_export.runtime.tokenizer import prompt_start

    pipe = Pipeline.from_bundle(built["tiny-sd3"][0])
    with caplog.at_level(logging.WARNING, logger="ldm_export.runtime.tokenizer"):
        pipe.encode([" ".join(["a red circle on the left"] * 20)])
    assert sum("because CLIP can only handle" in r.getMessage() for r in caplog.records) == 1
    assert prompt_start("🔴" * 300) == repr("🔴" * 60 + " ...")
    # once a request, not once a batch: three images one at a time warn as one image does (CLIP's cut and T5's)
    long = " ".join(["a red circle on the left"] * 20)
    counts = []
    for n in (1, 3):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            pipe(long, num_inference_steps=1, seed=0, num_images=n, batch_size=1)
        counts.append(sum("was truncated by" in r.getMessage() for r in caplog.records))
    assert counts == [2, 2], counts
    flux = Pipeline.from_bundle(built["tiny-flux"][0])
    image = flux(PROMPT, num_inference_steps=1, seed=0, guidance_rescale=0.7)[0]
    assert "Rescale" not in image.info["parameters"]


def test_the_metadata_records_the_guidance_that_drew_the_image(built):
    """Forge's infotext of FLUX: a distilled guidance input is "Distilled CFG Scale" beside "CFG scale: 1"; schnell
    drew the same at any scale and SD3 at scale 1 had no unconditional pass, yet the parameters recorded the scale and
    a negative prompt with no effect, which A1111's "send to txt2img" would then run as real CFG."""
    from ldm_export.runtime.image import parse_parameters

    def params(name, **kw):
        image = Pipeline.from_bundle(built[name][0])(PROMPT, num_inference_steps=1, seed=0, **kw)[0]
        return image, parse_parameters(image.info["parameters"])

    _, dev = params("tiny-flux", guidance_scale=4.5, negative_prompt="blurry")
    assert (dev["cfg_scale"], dev["extra"]["Distilled CFG Scale"], dev["negative_prompt"]) == (1.0, "4.5", None), dev
    a, schnell = params("tiny-flux-schnell", guidance_scale=3.5)
    b, default = params("tiny-flux-schnell")
    assert np.array_equal(np.asarray(a), np.asarray(b)) and schnell == default and schnell["cfg_scale"] == 1.0
    assert "Distilled CFG Scale" not in schnell.get("extra", {})
    _, sd3 = params("tiny-sd3", guidance_scale=1.0, negative_prompt="blurry")
    assert sd3["cfg_scale"] == 1.0 and sd3["negative_prompt"] is None
    # flow Euler is "Euler" in the parameters whichever name asked for it
    _, named = params("tiny-sd3", scheduler="Euler (flow)")
    _, by_class = params("tiny-sd3", scheduler="FlowMatchEulerDiscreteScheduler")
    assert named["sampler"] == by_class["sampler"] == "Euler"
    # serve: the response's info says what the parameters say (FLUX-dev: CFG 1 beside its distilled guidance)
    import json

    from ldm_export.serve import a1111
    from ldm_export.serve.app import run_jobs

    job = a1111.Job(PROMPT, "blurry", 0, 1, 4.5, "Euler", 32, 32)
    (r,) = run_jobs(Pipeline.from_bundle(built["tiny-flux"][0]), [job])
    assert r["recorded"] == {"cfg_scale": 1.0, "negative_prompt": "", "extra": {"Distilled CFG Scale": "4.5"}}, r
    info = json.loads(a1111.info_json({}, [job], [r["infotext"]], "m", "h", 32, 32, {}, recorded=r["recorded"]))
    assert (info["cfg_scale"], info["negative_prompt"], info["extra_generation_params"]) == \
        (1.0, "", {"Distilled CFG Scale": "4.5"})
    _, sd3 = params("tiny-sd3", guidance_scale=4.0, negative_prompt="blurry")
    assert sd3["cfg_scale"] == 4.0 and sd3["negative_prompt"] == "blurry" and "Distilled CFG Scale" not in sd3.get("extra", {})


def test_dit_bench_runs_ort_once_and_says_why_ort_nhwc_is_not_a_second_row(built, tmp_path):
    """ort-nhwc ran the very engine ort runs and reported it as a second row."""
    from conftest import run_cli

    import shutil

    from ldm_export.export.t5_tokenizer import write_standin_t5_tokenizer

    bundle, folder, _, _ = built["tiny-sd3"]
    # a T5 vocabulary of characters alone, so that tiny T5's 16 tokens cut the bench prompt (whole-word pieces fit it)
    cut = tmp_path / "bundle"
    shutil.copytree(bundle, cut)
    shutil.rmtree(cut / "tokenizer_3")
    write_standin_t5_tokenizer(cut / "tokenizer_3", vocab_size=100)
    r = run_cli("bench", "--bundle", str(cut), "--weights", str(folder), "--device", "cpu", "--backends",
                "ort,ort-nhwc", "--steps", "1", "--repeats", "1", "--e2e-repeats", "1", "--warmup", "0",
                "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("was truncated by") == 1, r.stderr  # the bench prompt is cut by tiny T5: said once, not per run
    report = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert "components" in report["backends"]["ort"]
    assert report["backends"]["ort-nhwc"]["skipped"].startswith("on DiT bundles, ort is the runtime's engine")
