"""Parity with diffusers' own pipelines, same weights and noise: tiny-sdxl text-to-image, image-to-image and
inpainting (StableDiffusionXL{,Img2Img,Inpaint}Pipeline), tiny SD 1.x and the demo model (StableDiffusion{Img2Img,
Inpaint}Pipeline). PSNR over the image (inpainting: over the repainted pixels) must be >= 40 dB.

The runtime encodes images with the VAE posterior's mean; diffusers samples it by default, so the reference runs
with its own ``retrieve_latents`` in ``argmax`` mode (the mean). The noise diffusers draws from its generator is
given to the runtime as its ``latents``.
"""
import json

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from ldm_export.export.build import BuildConfig, build  # noqa: E402
from ldm_export.export.models import build_random  # noqa: E402
from ldm_export.runtime.pipeline import Pipeline  # noqa: E402
from ldm_export.zoo import MODELS  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
PSNR_MIN = 40.0
PARITY: dict = {}  # test id -> PSNR, printed at the end (the closing note's table)


def psnr(a: np.ndarray, b: np.ndarray, where: np.ndarray | None = None) -> float:
    a, b = np.asarray(a, np.float64) / 255.0, np.asarray(b, np.float64) / 255.0
    d = (a - b) ** 2 if where is None else ((a - b) ** 2)[where]
    mse = float(d.mean())
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def argmax_latents(monkeypatch, module_name):
    """diffusers' retrieve_latents in 'argmax' mode (the posterior mean), as the runtime encodes."""
    import importlib

    module = importlib.import_module(module_name)
    monkeypatch.setattr(module, "retrieve_latents", lambda out, generator=None, sample_mode="sample": out.latent_dist.mode())


def to_uint8(images: np.ndarray) -> np.ndarray:
    """diffusers' output_type='np' -> uint8 the way its PIL conversion rounds."""
    return (images * 255).round().astype(np.uint8)


def scene(colour=(220, 30, 30), side=64, left=True):
    img = np.full((side, side, 3), 128, np.uint8)
    yy, xx = np.mgrid[0:side, 0:side]
    cx = side // 4 if left else 3 * side // 4
    img[(yy - side // 2) ** 2 + (xx - cx) ** 2 <= (side // 6) ** 2] = colour
    return Image.fromarray(img)


def right_half_mask(side=64):
    m = np.zeros((side, side), np.uint8)
    m[:, side // 2:] = 255
    return Image.fromarray(m)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """tiny-sdxl: a bundle with a VAE encoder, and diffusers' three SDXL pipelines on the same weights."""
    from transformers import CLIPTokenizer

    spec = MODELS["tiny-sdxl"]
    out = tmp_path_factory.mktemp("parity") / "tiny-sdxl"
    build(BuildConfig(model="tiny-sdxl", random_weights=True, seed=3, out=out, vae_encoder=True))
    m = build_random(spec, 3)
    parts = dict(vae=m["vae"], text_encoder=m["text_encoder"], text_encoder_2=m["text_encoder_2"], unet=m["unet"],
                 tokenizer=CLIPTokenizer.from_pretrained(str(out / "tokenizer")),
                 tokenizer_2=CLIPTokenizer.from_pretrained(str(out / "tokenizer_2")),
                 scheduler=diffusers.EulerDiscreteScheduler.from_config(json.loads((out / "scheduler/scheduler_config.json").read_text())))
    pipes = {"t2i": diffusers.StableDiffusionXLPipeline(**parts),
             "i2i": diffusers.StableDiffusionXLImg2ImgPipeline(**parts, requires_aesthetics_score=False),
             "inpaint": diffusers.StableDiffusionXLInpaintPipeline(**parts, requires_aesthetics_score=False)}
    for p in pipes.values():
        p.set_progress_bar_config(disable=True)
    return Pipeline.from_bundle(out), pipes


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """The tiny SD 1.x model and the embedded demo model (its own weights) with diffusers' SD pipelines."""
    from transformers import CLIPTokenizer

    out = {}
    root = tmp_path_factory.mktemp("parity-sd1")
    for name in ("tiny", "demo"):
        bundle = root / name
        build(BuildConfig(model=name, random_weights=name == "tiny", seed=5, out=bundle, vae_encoder=True))
        if name == "demo":
            from ldm_export.export.build import embedded_weights_path

            folder = str(embedded_weights_path(MODELS["demo"]))
            i2i = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
        else:
            m = build_random(MODELS["tiny"], 5)
            sched = diffusers.PNDMScheduler.from_config(json.loads((bundle / "scheduler/scheduler_config.json").read_text()))
            i2i = diffusers.StableDiffusionImg2ImgPipeline(
                vae=m["vae"], text_encoder=m["text_encoder"], unet=m["unet"], scheduler=sched,
                tokenizer=CLIPTokenizer.from_pretrained(str(bundle / "tokenizer")), safety_checker=None,
                feature_extractor=None, requires_safety_checker=False)
        inpaint = diffusers.StableDiffusionInpaintPipeline(**i2i.components)
        for p in (i2i, inpaint):
            p.set_progress_bar_config(disable=True)
        out[name] = (Pipeline.from_bundle(bundle), {"i2i": i2i, "inpaint": inpaint})
    return out


def _noise(seed, shape=(1, 4, 8, 8)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_tiny_sdxl_text_to_image_matches_diffusers(sdxl):
    ours, pipes = sdxl
    noise = _noise(0)
    theirs = pipes["t2i"]("a red cube", num_inference_steps=8, guidance_scale=5.0, latents=noise.clone(),
                          height=64, width=64, output_type="np").images
    got = np.asarray(ours("a red cube", num_inference_steps=8, guidance_scale=5.0, latents=noise.numpy())[0])
    value = PARITY["tiny-sdxl text-to-image (Euler, 8 steps)"] = psnr(got, to_uint8(theirs)[0])
    assert value >= PSNR_MIN
    # negative control: other noise gives another image (the comparison can fail)
    other = np.asarray(ours("a red cube", num_inference_steps=8, guidance_scale=5.0, latents=_noise(1).numpy())[0])
    assert psnr(other, to_uint8(theirs)[0]) < 25
    # and with a negative prompt (encoded, not zeros) and another sampler
    theirs = pipes["t2i"]("a red cube", negative_prompt="blurry", num_inference_steps=6, guidance_scale=3.0,
                          latents=noise.clone() * 1.0, height=64, width=64, output_type="np").images
    got = np.asarray(ours("a red cube", negative_prompt="blurry", num_inference_steps=6, guidance_scale=3.0,
                          latents=noise.numpy())[0])
    value = PARITY["tiny-sdxl text-to-image, negative prompt"] = psnr(got, to_uint8(theirs)[0])
    assert value >= PSNR_MIN
    # an empty negative prompt is zeros, as A1111 makes it (and as diffusers makes an absent one): the image of "" is
    # the image of no negative prompt, which is what its parameters say and what A1111's API asks with ""
    # an image's own: batched beside a real negative prompt, the empty one is still zeros
    absent = np.asarray(ours("a red cube", num_inference_steps=4, guidance_scale=5.0, latents=noise.numpy())[0])
    assert np.array_equal(np.asarray(ours("a red cube", negative_prompt="", num_inference_steps=4, guidance_scale=5.0,
                                          latents=noise.numpy())[0]), absent)
    pair = ours(["a red cube"] * 2, negative_prompt=["", "blurry"], num_inference_steps=4, guidance_scale=5.0,
                latents=np.concatenate([noise.numpy()] * 2))
    blurry = np.asarray(ours("a red cube", negative_prompt="blurry", num_inference_steps=4, guidance_scale=5.0,
                             latents=noise.numpy())[0])
    assert np.array_equal(np.asarray(pair[0]), absent) and np.array_equal(np.asarray(pair[1]), blurry)
    assert not np.array_equal(blurry, absent)


@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_tiny_sdxl_img2img_matches_diffusers(sdxl, monkeypatch, strength):
    ours, pipes = sdxl
    argmax_latents(monkeypatch, "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img")
    init = scene()
    theirs = pipes["i2i"]("a blue circle", image=init, strength=strength, num_inference_steps=10, guidance_scale=5.0,
                          generator=torch.Generator().manual_seed(7), output_type="np").images
    got = np.asarray(ours("a blue circle", init_image=init, strength=strength, num_inference_steps=10,
                          guidance_scale=5.0, latents=_noise(7).numpy())[0])
    value = PARITY[f"tiny-sdxl img2img, strength {strength}"] = psnr(got, to_uint8(theirs)[0])
    assert value >= PSNR_MIN


@pytest.mark.parametrize("strength", [0.7, 1.0])
def test_tiny_sdxl_inpaint_matches_diffusers(sdxl, monkeypatch, strength):
    ours, pipes = sdxl
    argmax_latents(monkeypatch, "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_inpaint")
    init, mask = scene(), right_half_mask()
    theirs = pipes["inpaint"]("a green square", image=init, mask_image=mask, strength=strength, num_inference_steps=10,
                              guidance_scale=5.0, height=64, width=64, generator=torch.Generator().manual_seed(9),
                              output_type="np").images
    raw = np.asarray(ours("a green square", init_image=init, mask_image=mask, strength=strength,
                          num_inference_steps=10, guidance_scale=5.0, latents=_noise(9).numpy(), keep_unmasked=False)[0])
    got = np.asarray(ours("a green square", init_image=init, mask_image=mask, strength=strength,
                          num_inference_steps=10, guidance_scale=5.0, latents=_noise(9).numpy())[0])
    repaint = np.asarray(mask)[..., None].repeat(3, -1) > 0
    value = PARITY[f"tiny-sdxl inpaint, strength {strength} (masked pixels)"] = psnr(got, to_uint8(theirs)[0], repaint)
    assert value >= PSNR_MIN
    assert psnr(raw, to_uint8(theirs)[0]) >= PSNR_MIN  # without the paste-back: the whole image
    np.testing.assert_array_equal(got[~repaint], np.asarray(init)[~repaint])  # the kept half, pixel-exact


def test_tiny_sdxl_nine_channel_inpaint_matches_diffusers(tmp_path, monkeypatch):
    """An SDXL inpainting UNet (9 input channels: latents, mask, masked-image latents) against diffusers'
    StableDiffusionXLInpaintPipeline on the same weights and noise."""
    from transformers import CLIPTokenizer

    spec = MODELS["tiny-sdxl-inpaint"]
    out = tmp_path / "tiny-sdxl-inpaint"
    build(BuildConfig(model="tiny-sdxl-inpaint", random_weights=True, seed=4, out=out))
    m = build_random(spec, 4)
    ref = diffusers.StableDiffusionXLInpaintPipeline(
        vae=m["vae"], text_encoder=m["text_encoder"], text_encoder_2=m["text_encoder_2"], unet=m["unet"],
        tokenizer=CLIPTokenizer.from_pretrained(str(out / "tokenizer")),
        tokenizer_2=CLIPTokenizer.from_pretrained(str(out / "tokenizer_2")), requires_aesthetics_score=False,
        scheduler=diffusers.EulerDiscreteScheduler.from_config(json.loads((out / "scheduler/scheduler_config.json").read_text())))
    ref.set_progress_bar_config(disable=True)
    argmax_latents(monkeypatch, "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_inpaint")
    init, mask = scene(), right_half_mask()
    theirs = ref("a green square", image=init, mask_image=mask, strength=1.0, num_inference_steps=10, guidance_scale=5.0,
                 height=64, width=64, generator=torch.Generator().manual_seed(6), output_type="np").images
    got = np.asarray(Pipeline.from_bundle(out)("a green square", init_image=init, mask_image=mask, strength=1.0,
                                               num_inference_steps=10, guidance_scale=5.0, latents=_noise(6).numpy())[0])
    repaint = np.asarray(mask)[..., None].repeat(3, -1) > 0
    value = PARITY["tiny-sdxl-inpaint (9-channel UNet), strength 1 (masked pixels)"] = psnr(got, to_uint8(theirs)[0], repaint)
    assert value >= PSNR_MIN
    assert np.abs(got[repaint].astype(int) - np.asarray(init)[repaint]).mean() > 5  # it did repaint
    np.testing.assert_array_equal(got[~repaint], np.asarray(init)[~repaint])


@pytest.mark.parametrize("model", ["tiny", "demo"])
def test_sd1_img2img_and_inpaint_match_diffusers(sd1, monkeypatch, model):
    ours, pipes = sd1[model]
    for module in ("pipeline_stable_diffusion_img2img", "pipeline_stable_diffusion_inpaint"):
        argmax_latents(monkeypatch, f"diffusers.pipelines.stable_diffusion.{module}")
    init, mask = scene(), right_half_mask()
    theirs = pipes["i2i"]("a blue circle on the left", image=init, strength=0.6, num_inference_steps=20,
                          guidance_scale=7.5, generator=torch.Generator().manual_seed(2), output_type="np").images
    got = np.asarray(ours("a blue circle on the left", init_image=init, strength=0.6, num_inference_steps=20,
                          latents=_noise(2).numpy())[0])
    value = PARITY[f"{model} img2img, strength 0.6 ({ours.bundle.scheduler_config['_class_name']})"] = psnr(got, to_uint8(theirs)[0])
    assert value >= PSNR_MIN
    theirs = pipes["inpaint"]("a green square on the right", image=init, mask_image=mask, strength=1.0,
                              num_inference_steps=20, guidance_scale=7.5, height=64, width=64,
                              generator=torch.Generator().manual_seed(4), output_type="np").images
    got = np.asarray(ours("a green square on the right", init_image=init, mask_image=mask, strength=1.0,
                          num_inference_steps=20, latents=_noise(4).numpy())[0])
    repaint = np.asarray(mask)[..., None].repeat(3, -1) > 0
    value = PARITY[f"{model} inpaint, strength 1 (masked pixels)"] = psnr(got, to_uint8(theirs)[0], repaint)
    assert value >= PSNR_MIN
    np.testing.assert_array_equal(got[~repaint], np.asarray(init)[~repaint])


def test_tiny_sdxl_base_refiner_handoff_matches_diffusers(sdxl, tmp_path):
    from transformers import CLIPTokenizer

    ours, pipes = sdxl
    out = tmp_path / "refiner"
    build(BuildConfig(model="tiny-sdxl-refiner", random_weights=True, seed=4, out=out))
    m = build_random(MODELS["tiny-sdxl-refiner"], 4)
    refiner = diffusers.StableDiffusionXLImg2ImgPipeline(
        vae=m["vae"], text_encoder=None, text_encoder_2=m["text_encoder_2"], tokenizer=None,
        tokenizer_2=CLIPTokenizer.from_pretrained(str(out / "tokenizer_2")), unet=m["unet"],
        scheduler=diffusers.EulerDiscreteScheduler.from_config(pipes["t2i"].scheduler.config),
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    refiner.set_progress_bar_config(disable=True)
    noise = _noise(11)
    latents = pipes["t2i"]("a red cube", num_inference_steps=10, guidance_scale=5.0, latents=noise.clone(), height=64,
                           width=64, denoising_end=0.8, output_type="latent").images
    theirs = refiner("a red cube", image=latents, num_inference_steps=10, guidance_scale=5.0, denoising_start=0.8,
                     output_type="np").images
    refine = Pipeline.from_bundle(out)
    mid = ours("a red cube", num_inference_steps=10, guidance_scale=5.0, latents=noise.numpy(), denoising_end=0.8,
               return_latents=True)
    np.testing.assert_allclose(mid, latents.numpy(), rtol=1e-3, atol=1e-3)
    got = np.asarray(refine("a red cube", num_inference_steps=10, guidance_scale=5.0, latents=mid, denoising_start=0.8)[0])
    value = PARITY["tiny-sdxl base 0.8 + refiner (Euler, 10 steps)"] = psnr(got, to_uint8(theirs)[0])
    assert value >= PSNR_MIN


def test_zz_print_parity_table(capsys):
    with capsys.disabled():
        print("\n| case | PSNR (dB) |\n|---|---|")
        for k, v in PARITY.items():
            print(f"| {k} | {v:.1f} |")
