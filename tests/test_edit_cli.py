"""Editing end to end: the demo model's img2img and inpainting read back by the adherence checker, the generate
command's editing flags, a 9-channel inpainting UNet against diffusers, and every bad input as a one-line error."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli

pytest.importorskip("torch")

from ldm_export.demo.adherence import read_image  # noqa: E402
from ldm_export.demo.edits import IMG2IMG_PROMPT, INPAINT_PROMPT, img2img, inpaint, read_inpainted  # noqa: E402
from ldm_export.export.build import BuildConfig, build  # noqa: E402
from ldm_export.runtime.errors import LdmExportError  # noqa: E402
from ldm_export.runtime.pipeline import Pipeline  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


@pytest.fixture(scope="module")
def demo_edit(tmp_path_factory):
    out = tmp_path_factory.mktemp("edit") / "demo"
    build(BuildConfig(out=out, vae_encoder=True))
    return out


def test_demo_img2img_turns_the_red_circle_blue_and_keeps_it_left(demo_edit):
    init, results = img2img(Pipeline.from_bundle(demo_edit), seeds=[0, 1, 2, 3])
    assert (read_image(init).colour, read_image(init).position) == ("red", "left")
    for im in results:
        r = read_image(im)
        assert (r.colour, r.shape, r.position) == ("blue", "circle", "left"), r
        assert "Denoising strength: 0.6" in im.info["parameters"]


def test_demo_inpaint_repaints_the_right_half_and_keeps_the_left_exactly(demo_edit):
    init, mask, results = inpaint(Pipeline.from_bundle(demo_edit), seeds=[0, 1, 2, 3])
    assert read_image(init).colour == "red"
    for im in results:
        r, exact = read_inpainted(im, init, mask)
        assert exact
        assert (r.colour, r.shape, r.position) == ("green", "square", "right"), r


def test_generate_progress_counts_the_steps_img2img_runs(demo_edit, tmp_path, monkeypatch):
    """strength 0.6 of 20 steps runs 12: the bar's total says 12 a run and ends full."""
    import rich.progress
    from click.testing import CliRunner

    from ldm_export.cli import cli
    from ldm_export.demo.edits import drawn

    ends = []
    orig_exit = rich.progress.Progress.__exit__

    def record(self, *a):
        ends.extend((t.total, t.completed) for t in self.tasks)
        return orig_exit(self, *a)

    monkeypatch.setattr(rich.progress.Progress, "__exit__", record)
    init = tmp_path / "init.png"
    drawn("red", "circle", "left").save(init)
    r = CliRunner().invoke(cli, ["generate", str(demo_edit), IMG2IMG_PROMPT, "--init-image", str(init), "--strength",
                                 "0.6", "--steps", "20", "--seed", "1", "--out", str(tmp_path / "a.png")])
    assert r.exit_code == 0, r.output
    assert ends == [(12, 12)]


def test_a_mask_thinner_than_the_latent_grid_is_warned_about(demo_edit, tmp_path):
    from ldm_export.demo.edits import drawn

    init, mask = tmp_path / "init.png", tmp_path / "thin.png"
    drawn("red", "circle", "left").save(init)
    thin = Image.new("L", (64, 64), 0)
    thin.paste(255, (3, 0, 6, 64))  # columns 3-5: the latent grid samples columns 0, 8, 16, ...
    thin.save(mask)
    r = run_cli("generate", str(demo_edit), INPAINT_PROMPT, "--init-image", str(init), "--mask", str(mask), "--steps",
                "2", "--out", str(tmp_path / "a.png"))
    assert r.returncode == 0, r.stderr
    assert "misses the latent grid (every 8 px)" in r.stderr
    assert "widen the region to 8 px or more" in r.stderr and "--mask-blur" not in r.stderr  # a blur never helps
    wide, square = tmp_path / "wide.png", Image.new("L", (64, 64), 0)
    square.paste(255, (16, 16, 48, 48))
    square.save(wide)
    r = run_cli("generate", str(demo_edit), INPAINT_PROMPT, "--init-image", str(init), "--mask", str(wide), "--mask-blur",
                "1000", "--steps", "2", "--out", str(tmp_path / "b.png"))
    assert r.returncode == 0, r.stderr
    # a 32 px square is wide enough: the blur alone is the cause, and the advice says so (not "widen the region")
    assert "blurred by 1000 px, its white region is under half white at every point of the latent grid" in r.stderr
    assert "lower --mask-blur" in r.stderr and "widen" not in r.stderr


def test_generate_edits_from_the_command_line(demo_edit, tmp_path):
    from ldm_export.demo.edits import drawn, right_half_mask

    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    drawn("red", "circle", "left").save(init)
    right_half_mask().save(mask)
    r = run_cli("generate", str(demo_edit), IMG2IMG_PROMPT, "--init-image", str(init), "--strength", "0.6", "--seed", "1",
                "--out", str(tmp_path / "a.png"))
    assert r.returncode == 0, r.stderr
    out = Image.open(tmp_path / "a.png")
    assert read_image(out).colour == "blue" and "Denoising strength: 0.6" in out.text["parameters"]
    r = run_cli("generate", str(demo_edit), INPAINT_PROMPT, "--init-image", str(init), "--mask", str(mask),
                "--strength", "1", "--mask-blur", "2", "--seed", "1", "--out", str(tmp_path / "b.png"))
    assert r.returncode == 0, r.stderr
    got, orig = np.asarray(Image.open(tmp_path / "b.png")), np.asarray(Image.open(init))
    from ldm_export.runtime.editing import mask_array

    outside = mask_array(Image.open(mask).convert("L"), blur=2) == 0
    assert outside[:, :20].all() and not outside[:, 28:].any()
    np.testing.assert_array_equal(got[outside], orig[outside])  # outside the blurred mask: the original pixels
    assert np.abs(got[:, 40:].astype(int) - orig[:, 40:]).max() > 50  # the right half was repainted
    assert "Mask blur: 2" in Image.open(tmp_path / "b.png").text["parameters"]


def _cli_error(*args):
    r = run_cli("generate", *args)
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.splitlines()  # one line: no blank line from a progress bar before it (one stood there)
    assert "Traceback" not in r.stderr and len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    return r.stderr


def test_bad_edit_input_one_line_errors(demo_edit, tiny_bundle, tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 64), (200, 20, 20)).save(good)
    Image.new("RGBA", (64, 64)).save(tmp_path / "rgba.png")
    Image.new("L", (64, 64)).save(tmp_path / "gray.png")
    Image.new("RGB", (60, 64)).save(tmp_path / "odd.png")
    Image.new("L", (32, 32), 255).save(tmp_path / "small_mask.png")
    b = str(demo_edit)
    assert "RGBA" in _cli_error(b, "x", "--init-image", str(tmp_path / "rgba.png"))
    assert "grayscale" in _cli_error(b, "x", "--init-image", str(tmp_path / "gray.png"))
    assert "multiples of 32" in _cli_error(b, "x", "--init-image", str(tmp_path / "odd.png"))
    for bad in ("0", "1.5", "-0.2"):
        assert "strength must be a number in (0, 1]" in _cli_error(b, "x", "--init-image", str(good), "--strength", bad)
    assert "is 32x32 but the image is 64x64" in _cli_error(b, "x", "--init-image", str(good), "--mask",
                                                           str(tmp_path / "small_mask.png"))
    assert "--mask needs --init-image" in _cli_error(b, "x", "--mask", str(tmp_path / "small_mask.png"))
    assert "does not exist" in _cli_error(b, "x", "--init-image", str(tmp_path / "none.png"))
    assert "rebuild it with `ldm-export build --vae-encoder`" in _cli_error(str(tiny_bundle), "x", "--init-image", str(good))
    # another size with --size: resized with a warning, not refused
    r = run_cli("generate", b, "x", "--init-image", str(tmp_path / "odd.png"), "--size", "64x64", "--steps", "2",
                "--out", str(tmp_path / "r.png"))
    assert r.returncode == 0 and Image.open(tmp_path / "r.png").size == (64, 64), r.stderr



def test_edit_options_without_their_partner_and_a_refiner_of_other_latents_are_refused(demo_edit, tiny_bundle):
    # each was ignored without a word: text to image ran instead of the edit or hand-off the user asked for
    assert "--strength applies with --init-image" in _cli_error("no-bundle", "x", "--strength", "0.3")
    assert "--mask-blur applies with --mask" in _cli_error("no-bundle", "x", "--mask-blur", "2")
    assert "--refiner-start applies with --refiner" in _cli_error("no-bundle", "x", "--refiner-start", "0.5")
    err = _cli_error(str(tiny_bundle), "x", "--steps", "4", "--refiner", str(demo_edit))
    assert "a refiner must share the base's latents" in err and "scale 0.18215" in err



def test_lossy_inpaint_output_is_warned_about_and_the_demo_edits_tool_makes_its_folder(demo_edit, tmp_path):
    from ldm_export.demo.edits import drawn, main, right_half_mask

    drawn("red", "circle", "left").save(tmp_path / "init.png")
    right_half_mask().save(tmp_path / "mask.png")
    r = run_cli("generate", str(demo_edit), "x", "--init-image", str(tmp_path / "init.png"), "--mask",
                str(tmp_path / "mask.png"), "--steps", "2", "--out", str(tmp_path / "out.jpg"))
    assert r.returncode == 0 and "warning: .jpg is lossy" in r.stderr, r.stderr
    main(["--bundle", str(demo_edit), "--out", str(tmp_path / "new" / "img"), "--seeds", "0"])  # was FileNotFoundError
    assert (tmp_path / "new" / "img" / "edit_inpaint.png").is_file()



def test_size_checks_run_before_the_init_image_is_resized_or_encoded(demo_edit, tmp_path):
    # an init image with a huge --size (or of a huge size) was resized and encoded first: the VAE encoder ran out of
    # memory (killed) where text to image refuses the size in one line
    pipe = Pipeline.from_bundle(demo_edit)
    pipe.encode_image = lambda pixels: pytest.fail(f"encoded {pixels.shape} before the size checks")
    Image.new("RGB", (64, 64)).save(tmp_path / "small.png")
    Image.new("RGB", (2048, 2048)).save(tmp_path / "big.png")
    for path, size in ((tmp_path / "small.png", dict(width=8000, height=8000)), (tmp_path / "big.png", {})):
        with pytest.raises(LdmExportError, match="GB of activations per UNet call"):
            pipe("x", init_image=path, num_inference_steps=2, **size)
    static = tmp_path / "static"
    build(BuildConfig(model="tiny", random_weights=True, static_shape=True, vae_encoder=True, out=static))
    Image.new("RGB", (96, 64)).save(tmp_path / "wide.png")
    with pytest.raises(LdmExportError, match="built with static shapes for 64x64"):  # not the encoder's input check
        Pipeline.from_bundle(static)("x", init_image=tmp_path / "wide.png", num_inference_steps=2)



def test_the_refiner_loads_with_the_bases_memory_and_cudnn_options(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from ldm_export.cli import cli

    calls = []

    def from_bundle(path, **options):
        calls.append(options)
        if len(calls) == 2:
            raise LdmExportError("stop after the refiner's load")
        return object()

    monkeypatch.setattr(Pipeline, "from_bundle", from_bundle)
    r = CliRunner().invoke(cli, ["generate", "base", "x", "--steps", "4", "--cfg", "5", "--refiner", "refiner",
                                 "--low-memory", "--provider", "cuda", "--cudnn-search", "exhaustive",
                                 "--out", str(tmp_path / "x.png")])
    assert r.exit_code == 2 and len(calls) == 2, r.output
    base, refiner = calls
    assert refiner == base and refiner["low_memory"] is True and refiner["cudnn_search"] == "EXHAUSTIVE"


@pytest.fixture(scope="module")
def inpaint_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("inpaint") / "tiny-inpaint"
    build(BuildConfig(model="tiny-inpaint", random_weights=True, seed=2, out=out, vae_encoder=True))
    return out


def test_an_inpainting_unet_needs_a_mask(inpaint_bundle, tmp_path):
    pipe = Pipeline.from_bundle(inpaint_bundle)
    Image.new("RGB", (64, 64)).save(tmp_path / "i.png")
    with pytest.raises(LdmExportError, match="inpainting UNet .9 input channels.: give a mask"):
        pipe("x", init_image=tmp_path / "i.png")
    with pytest.raises(LdmExportError, match="inpainting UNet"):
        pipe("x")



def test_nine_channel_weights_name_the_inpainting_models_and_sdxl_inpaints(tmp_path, monkeypatch):
    import dataclasses

    from ldm_export.export.models import build_random
    from ldm_export.export.weights import load_weights
    from ldm_export.runtime.tokenizer import write_tokenizer_files
    from ldm_export.zoo import MODELS

    # SD 1.5 / SDXL inpainting weights had no --model to go to: "pass the --model these weights belong to" led nowhere
    assert MODELS["sd15-inpaint"].unet["in_channels"] == MODELS["sdxl-inpaint"].unet["in_channels"] == 9
    # an inpainting UNet runs only on encoded images: its bundle carries the VAE encoder without --vae-encoder
    for name, encoder in (("sd15-inpaint", True), ("sdxl-inpaint", True), ("tiny-inpaint", True), ("sd15", False)):
        assert ("vae_encoder" in BuildConfig(model=name).components(MODELS[name])) is encoder, name
    folder = tmp_path / "inpaint-weights"
    for name, module in build_random(MODELS["tiny-inpaint"], 2).items():
        module.save_pretrained(str(folder / name))
    write_tokenizer_files(folder / "tokenizer")
    (folder / "model_index.json").write_text(json.dumps(MODELS["tiny-inpaint"].model_index()))
    with pytest.raises(LdmExportError, match=r"in_channels=9 .* \(a 9-channel inpainting UNet: sd15-inpaint, "
                                             r"sdxl-inpaint\)"):
        load_weights(MODELS["tiny"], folder)
    # the SDXL family runs a 9-channel UNet as SD 1.x does: mask and masked-image latents as extra channels
    tiny = MODELS["tiny-sdxl"]
    monkeypatch.setitem(MODELS, "tiny-sdxl-nine", dataclasses.replace(tiny, name="tiny-sdxl-nine",
                                                                      unet=tiny.unet | {"in_channels": 9}))
    out = tmp_path / "sdxl-nine"
    build(BuildConfig(model="tiny-sdxl-nine", random_weights=True, out=out))
    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (24, 8, 56, 40))
    pipe = Pipeline.from_bundle(out)
    with pytest.raises(LdmExportError, match="inpainting UNet .9 input channels.: give a mask"):
        pipe("x", init_image=init, num_inference_steps=3)
    got = np.asarray(pipe("x", init_image=init, mask_image=mask, num_inference_steps=3, seed=1)[0]).astype(int)
    keep = np.asarray(mask) == 0
    np.testing.assert_array_equal(got[keep], np.asarray(init)[keep])
    assert np.abs(got[~keep] - np.asarray(init)[~keep]).mean() > 10


def test_nine_channel_inpainting_unet_matches_diffusers(inpaint_bundle, monkeypatch):

    import diffusers
    import torch
    from transformers import CLIPTokenizer

    from ldm_export.export.models import build_random
    from ldm_export.zoo import MODELS
    from test_edit_parity import PARITY, psnr, right_half_mask, scene, to_uint8

    import importlib

    module = importlib.import_module("diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint")
    monkeypatch.setattr(module, "retrieve_latents", lambda o, generator=None, sample_mode="sample": o.latent_dist.mode())
    m = build_random(MODELS["tiny-inpaint"], 2)
    sched = diffusers.PNDMScheduler.from_config(json.loads((inpaint_bundle / "scheduler/scheduler_config.json").read_text()))
    ref = diffusers.StableDiffusionInpaintPipeline(
        vae=m["vae"], text_encoder=m["text_encoder"], unet=m["unet"], scheduler=sched, safety_checker=None,
        tokenizer=CLIPTokenizer.from_pretrained(str(inpaint_bundle / "tokenizer")), feature_extractor=None,
        requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    init, mask = scene(), right_half_mask()
    theirs = ref("a green square", image=init, mask_image=mask, strength=1.0, num_inference_steps=10, height=64,
                 width=64, generator=torch.Generator().manual_seed(3), output_type="np").images
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(3)).numpy()
    got = np.asarray(Pipeline.from_bundle(inpaint_bundle)("a green square", init_image=init, mask_image=mask,
                                                          strength=1.0, num_inference_steps=10, latents=noise)[0])
    repaint = np.asarray(mask)[..., None].repeat(3, -1) > 0
    value = PARITY["tiny-inpaint (9-channel UNet), strength 1 (masked pixels)"] = psnr(got, to_uint8(theirs)[0], repaint)
    assert value >= 40


def test_generate_hands_over_to_a_refiner_image_by_image(tmp_path):
    """`generate --refiner`: the base runs the first part of the schedule, the refiner the rest, one image at a time
    with seed + k, so image k of a batch equals the same command run alone with seed + k."""
    base, refiner = tmp_path / "base", tmp_path / "refiner"
    build(BuildConfig(model="tiny-sdxl", random_weights=True, seed=0, out=base))
    build(BuildConfig(model="tiny-sdxl-refiner", random_weights=True, seed=1, out=refiner))
    manifest = json.loads((base / "ldm_export.json").read_text())  # as `ldm-export lora` records a fused LoRA
    manifest["weights"]["loras"] = [{"file": "style.safetensors", "scale": 0.8, "addnet_sha256": "ab" * 32}]
    (base / "ldm_export.json").write_text(json.dumps(manifest))
    common = ("--refiner", str(refiner), "--refiner-start", "0.75", "--steps", "4", "--sampler", "Euler")
    # the last seed: image 2 wraps to seed 0, as without a refiner
    # the prompt the base's own parameters write: its LoRA's tag, checked once against both models' LoRAs (the
    # refiner alone warned, once per image, that it was ignored)
    r = run_cli("generate", str(base), "a red circle <lora:style:0.8>", *common, "--seed", "4294967295",
                "--num-images", "2", "--out", str(tmp_path / "two.png"))
    assert r.returncode == 0, r.stderr
    assert "ignored" not in r.stderr, r.stderr
    alone = run_cli("generate", str(base), "a red circle", *common, "--seed", "0", "--out", str(tmp_path / "one.png"))
    assert alone.returncode == 0, alone.stderr
    second = Image.open(tmp_path / "two-2.png")
    assert "Seed: 0" in second.info["parameters"]
    assert second.info["parameters"].startswith("a red circle <lora:style:0.8>\n")  # the LoRA's scale, as A1111 writes it
    # A1111's infotext: the base is the Model (it named the refiner), its LoRAs, the refiner and the switch follow
    last = second.info["parameters"].splitlines()[-1]
    assert ', Model: tiny-sdxl, Lora hashes: "style: abababababab", Refiner: tiny-sdxl-refiner [' in last, last
    assert last.endswith("Refiner switch at: 0.75"), last
    assert last in alone.stdout  # printed as written: "[HASH]" is no console markup
    assert np.array_equal(np.asarray(second), np.asarray(Image.open(tmp_path / "one.png")))
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "two-1.png")), np.asarray(second))


def test_a_refiner_that_cannot_take_the_size_is_refused_before_the_base_runs(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from ldm_export.cli import cli

    base, refiner = tmp_path / "base", tmp_path / "refiner"
    build(BuildConfig(model="tiny-sdxl", random_weights=True, seed=0, out=base))
    build(BuildConfig(model="tiny-sdxl-refiner", random_weights=True, seed=1, out=refiner, static_shape=True))
    monkeypatch.setattr(Pipeline, "_generate", lambda *a: pytest.fail("the base ran before the refiner's size check"))
    r = CliRunner().invoke(cli, ["generate", str(base), "x", "--steps", "4", "--size", "128x128", "--refiner",
                                 str(refiner), "--out", str(tmp_path / "x.png")])
    assert r.exit_code == 2, r.output
    assert f"bundle {refiner} was built with static shapes for 64x64" in r.output.replace("\n", "")
    assert not (tmp_path / "x.png").exists()


def test_build_and_generate_print_paths_and_parameters_with_brackets_as_they_are(tmp_path):
    """Square brackets (an --out path, a refiner's "[HASH]") are text: they were read as console markup, which
    dropped them from the output or, for a closing tag, ended in a traceback after the bundle or image was written."""
    bundle = tmp_path / "b[/x]"
    r = run_cli("build", "--model", "tiny", "--random-weights", "--out", str(bundle))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    for name in ("x[red]y.png", "x[/red]y.png"):
        out = tmp_path / name
        r = run_cli("generate", str(bundle), "a red circle", "--steps", "1", "--seed", "1", "--out", str(out))
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
        assert f"wrote {out}" in r.stdout and out.exists()


def test_generate_refuses_to_write_over_its_own_inputs_and_odd_mask_blurs(demo_edit, tmp_path):
    """`--out` naming the --init-image or --mask replaced the input with the result; --mask-blur nan/inf was PIL's
    traceback."""
    from ldm_export.demo.edits import drawn, right_half_mask

    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    drawn("red", "circle", "left").save(init)
    right_half_mask().save(mask)
    before = init.read_bytes(), mask.read_bytes()
    edit = ("--init-image", str(init), "--mask", str(mask), "--steps", "2")
    assert "the --init-image file itself" in _cli_error(str(demo_edit), "x", *edit, "--out", str(init))
    assert "the --mask file itself" in _cli_error(str(demo_edit), "x", *edit, "--out", str(tmp_path / "." / "mask.png"))
    numbered = tmp_path / "m-2.png"  # image 2 of `--num-images 2 --out m.png`
    numbered.write_bytes(mask.read_bytes())
    assert "the --mask file itself" in _cli_error(str(demo_edit), "x", *edit[:2], "--mask", str(numbered), "--steps",
                                                  "2", "--num-images", "2", "--out", str(tmp_path / "m.png"))
    assert (init.read_bytes(), mask.read_bytes(), numbered.read_bytes()) == (*before, before[1])
    for blur in ("nan", "inf"):
        assert "mask blur must be a finite number of pixels" in _cli_error(str(demo_edit), "x", *edit, "--mask-blur",
                                                                           blur, "--out", str(tmp_path / "o.png"))


def test_a_refiner_of_another_kind_or_an_inpainting_unet_is_refused(demo_edit, tiny_bundle, inpaint_bundle, tmp_path):
    """An inpainting UNet as refiner got "give an init image and a mask", which --refiner refuses; a flow-matching base
    handed its latents to a noise-prediction refiner (same VAE) without a word."""
    err = _cli_error(str(tiny_bundle), "x", "--steps", "4", "--refiner", str(inpaint_bundle))
    assert "the refiner" in err and "is an inpainting UNet (9 input channels" in err
    from ldm_export.export.build import embedded_weights_path
    from ldm_export.zoo import get_model

    if not embedded_weights_path(get_model("demo-dit")).exists():
        pytest.skip("the demo DiT's weights are not installed")
    dit = tmp_path / "demo-dit"
    build(BuildConfig(model="demo-dit", out=dit))
    err = _cli_error(str(dit), "a red circle", "--steps", "4", "--refiner", str(demo_edit))
    assert "samples by flow matching but the refiner" in err and "by noise prediction" in err


def test_masks_with_transparency_or_a_palette_read_as_a1111_reads_them(tmp_path):
    """An RGBA/LA mask with transparency is read by its alpha (opaque = repaint), a palette or opaque one by its grey
    levels, as A1111 and `serve` read them; a hard mask resized with its image keeps a hard edge."""
    from ldm_export.runtime.editing import load_mask

    a = np.zeros((16, 16), np.uint8)
    a[:, 8:] = 255
    want = (a >= 128).astype(np.float32)
    rgba = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    rgba.putalpha(Image.fromarray(a))
    rgba.save(tmp_path / "rgba.png")
    Image.fromarray(a).convert("P").save(tmp_path / "p.png")
    Image.fromarray(a).convert("LA").save(tmp_path / "la.png")  # opaque: its grey levels
    for name in ("rgba", "p", "la"):
        assert np.array_equal(load_mask(tmp_path / f"{name}.png", (16, 16)), want), name
    grown = load_mask(tmp_path / "p.png", (32, 32), image_size=(16, 16))
    assert set(np.unique(grown).tolist()) == {0.0, 1.0}  # no ringing values at the edge


def test_out_folder_and_image_paths(tmp_path):
    from ldm_export.runtime.image import output_paths, read_parameters, save_image

    (tmp_path / "results").mkdir()
    assert output_paths(tmp_path / "results", 1) == [tmp_path / "results" / "image.png"]
    assert output_paths(f"{tmp_path}/new/", 2) == [tmp_path / "new" / "image-1.png", tmp_path / "new" / "image-2.png"]
    assert output_paths(".", 1) == [Path("image.png")] and output_paths("..", 1) == [Path("..") / "image.png"]
    with pytest.raises(LdmExportError, match="--out is empty"):
        output_paths("  ", 1)
    # a JPEG's EXIF holds 64 KB: longer parameters leave the image without them (and a warning), not a traceback
    save_image(Image.new("RGB", (8, 8)), tmp_path / "long.jpg", "x" * 40000)
    assert (tmp_path / "long.jpg").exists() and read_parameters(tmp_path / "long.jpg") is None
    save_image(Image.new("RGB", (8, 8)), tmp_path / "ok.jpg", "x" * 1000)
    assert read_parameters(tmp_path / "ok.jpg") == "x" * 1000


def test_strength_that_no_step_count_can_run_is_named_as_such():
    from ldm_export.runtime.editing import edit_plan

    with pytest.raises(LdmExportError, match=r"runs no step even at 500 steps.*at least 0\.002"):
        edit_plan({"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000}, 20, 1e-9)


def test_generate_into_a_folder_and_over_an_existing_image(tiny_bundle, tmp_path):
    """`--out FOLDER` writes image.png inside it (it wrote FOLDER.png beside it); an image written over says so."""
    (tmp_path / "results").mkdir()
    args = ("generate", str(tiny_bundle), "a cat", "--steps", "2", "--out", str(tmp_path / "results"))
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "results" / "image.png").is_file() and not (tmp_path / "results.png").exists()
    assert "replaced" not in r.stdout
    r = run_cli(*args)
    assert r.returncode == 0 and f"wrote {tmp_path / 'results' / 'image.png'} (replaced the file there)" in r.stdout
    # a folder that does not exist yet, written with a trailing /: image.png inside it, as output_paths promises (the
    # CLI's path type dropped the / before output_paths saw it, and wrote new.png)
    r = run_cli("generate", str(tiny_bundle), "a cat", "--steps", "2", "--out", f"{tmp_path}/new/")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "new" / "image.png").is_file() and not (tmp_path / "new.png").exists()
