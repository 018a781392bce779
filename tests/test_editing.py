"""Image-to-image and inpainting math: diffusers' img2img/inpaint loops (scheduler level) for every sampler, and
the image helpers (masks, paste-back, bad input)."""
import sys

import numpy as np
import pytest
from PIL import Image

from ldm_export.runtime import LdmExportError, resolve_scheduler
from ldm_export.runtime import editing as E

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

TOL = 1e-5
NAMES = ["DDIM", "DDPM", "PLMS", "LMS", "LMS Karras", "Euler", "Euler Karras", "Euler a", "Heun", "DPM2", "DPM2 a",
         "DPM++ 2M", "DPM++ 2M Karras", "DPM++ 2M SDE", "DPM++ 2S", "UniPC", "LCM"]


def diffusers_edit(config, steps, strength, model, x0, eps, noise, mask=None, pure_noise=False):
    """diffusers' StableDiffusionImg2Img/Inpaint loop (get_timesteps, set_begin_index, add_noise, step, blend)."""
    import diffusers
    import torch

    from ldm_export.parity.samplers import _lms_scheduler_class, patched_randn

    cls = _lms_scheduler_class() if config["_class_name"] == "LMSDiscreteScheduler" else getattr(diffusers, config["_class_name"])
    scheduler = cls.from_config({k: v for k, v in config.items() if k != "_class_name"})
    scheduler.set_timesteps(steps)
    init_timestep = min(int(steps * strength), steps)
    t_start = max(steps - init_timestep, 0)
    timesteps = scheduler.timesteps[t_start * scheduler.order:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    X0, EPS = torch.from_numpy(x0), torch.from_numpy(eps)

    def add_noise(t):
        if hasattr(scheduler, "scale_noise"):
            return scheduler.scale_noise(X0, t, EPS)
        return scheduler.add_noise(X0, EPS, t)

    if pure_noise and strength == 1.0:
        x = EPS * scheduler.init_noise_sigma
    else:
        x = add_noise(timesteps[:1])
    with patched_randn(sys.modules[cls.__module__], noise):
        for i, t in enumerate(timesteps):
            x_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
            out = torch.from_numpy(np.asarray(model(x_in.numpy(), np.float64(t.item())), dtype=np.float64))
            x = scheduler.step(out, t, x).prev_sample
            if mask is not None:
                known = add_noise(timesteps[i + 1:i + 2]) if i < len(timesteps) - 1 else X0
                x = (1 - torch.from_numpy(mask)) * known + torch.from_numpy(mask) * x
    return x.numpy()


def mixing_model(x: np.ndarray, t) -> np.ndarray:
    """The stand-in model plus a term that mixes neighbouring pixels, as a UNet's convolutions do: with a pointwise
    model the kept latents never reach the repainted ones, so an inpainting blend at the wrong moment cannot show."""
    from ldm_export.parity.samplers import stand_in_model

    return stand_in_model(x, t) + 0.3 * np.tanh(np.roll(x, 1, axis=-1) + np.roll(x, -1, axis=-1))


def run_both(name, steps, strength, mask=None, pure_noise=False, seed=0):
    pytest.importorskip("diffusers")
    from ldm_export.parity.samplers import SD15_BASE, NoiseSequence, max_relative_error, stand_in_model

    if mask is not None:
        stand_in_model = mixing_model  # noqa: F811

    config = resolve_scheduler(name, SD15_BASE)
    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal((1, 4, 8, 8))
    eps = rng.standard_normal((1, 4, 8, 8))
    ours = E.sample_edit(stand_in_model, x0, eps, config, steps, strength, noise=NoiseSequence(seed + 1),
                         latent_mask=mask, pure_noise_at_full_strength=pure_noise)
    theirs = diffusers_edit(config, steps, strength, stand_in_model, x0, eps, NoiseSequence(seed + 1), mask, pure_noise)
    return max_relative_error(ours, theirs)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("steps,strength", [(10, 0.6), (20, 0.35), (10, 1.0)])
def test_img2img_matches_diffusers_for_every_sampler(name, steps, strength):
    if name == "LCM":
        steps = 4
    assert run_both(name, steps, strength) < TOL


# Heun and DPM2 take two model calls a step; diffusers blends after each of them (it blended once a step: 24-45 dB)
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("strength", [0.3, 0.7, 1.0])
def test_inpaint_latent_blend_matches_diffusers(name, strength):
    mask = np.zeros((1, 1, 8, 8))
    mask[..., 4:] = 1.0
    assert run_both(name, 4 if name == "LCM" else 10, strength, mask=mask, pure_noise=True) < TOL


def test_strength_picks_the_start_step_as_diffusers():
    assert E.start_step(50, 0.8) == 10 and E.start_step(20, 1.0) == 0 and E.start_step(10, 0.05) == 10
    assert E.start_step(100, 0.29) == 72  # int(28.999999999999996): diffusers' float truncation, kept
    euler = resolve_scheduler("Euler", {"_class_name": "EulerDiscreteScheduler"})
    with pytest.raises(LdmExportError, match="runs no step"):
        E.edit_plan(euler, 10, 0.05)
    # the advice is the exact way out: the least steps and the least strength that run a step
    for steps, strength, need, least in ((1, 0.5, 2, 1.0), (3, 0.01, 100, 0.334), (7, 0.1, 10, 0.143),
                                         (40, 0.02, 50, 0.025)):
        with pytest.raises(LdmExportError, match=f"use --steps {need} or more, or a strength of at least {least:g}$"):
            E.edit_plan(euler, steps, strength)
        assert E.start_step(need, strength) < need and E.start_step(need - 1, strength) == need - 1
        assert E.start_step(steps, least) < steps and E.start_step(steps, least - 0.001) == steps
    for bad in (0, -0.1, 1.5, float("nan"), "0.5", True):
        with pytest.raises(LdmExportError, match=r"strength must be a number in \(0, 1\]"):
            E.check_strength(bad)


def test_the_blend_keeps_unmasked_latents_exactly():
    from ldm_export.parity.samplers import SD15_BASE, stand_in_model

    x0 = np.random.default_rng(0).standard_normal((1, 4, 8, 8))
    mask = np.zeros((1, 1, 8, 8))
    mask[..., :, 5:] = 1
    out = E.sample_edit(stand_in_model, x0, np.ones_like(x0), resolve_scheduler("DPM++ 2M", SD15_BASE), 8, 0.9,
                        latent_mask=mask)
    np.testing.assert_array_equal(out[..., :5], x0[..., :5])
    assert np.abs(out[..., 5:] - x0[..., 5:]).max() > 0.1


# ---------------------------------------------------------------------------------------------- image helpers


def test_latent_mask_is_binarised_and_nearest_downsampled_like_torch():
    torch = pytest.importorskip("torch")
    mask = np.random.default_rng(0).uniform(size=(64, 48)).astype(np.float32)
    ours = E.latent_mask(mask, 8)
    binary = torch.from_numpy((mask >= 0.5).astype(np.float32))[None, None]
    theirs = torch.nn.functional.interpolate(binary, size=(8, 6)).numpy()
    np.testing.assert_array_equal(ours, theirs)


def test_paste_back_keeps_unmasked_pixels_exactly():
    rng = np.random.default_rng(0)
    orig = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    gen = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    hard = np.zeros((32, 32), np.float32)
    hard[:, 16:] = 1
    soft = E.mask_array(Image.fromarray((hard * 255).astype(np.uint8)), blur=2)
    out = np.asarray(E.paste_back(orig, gen, soft))
    zero = soft == 0
    assert zero[:, :8].all() and not zero[:, 14:18].any()  # the blur spreads a few pixels either side
    np.testing.assert_array_equal(out[zero], np.asarray(orig)[zero])
    np.testing.assert_array_equal(out[soft >= 0.5], np.asarray(gen)[soft >= 0.5])
    # A1111's own composite (processing.py: mask_for_overlay = clip(2 * mask), the original pasted through its
    # inverse, alpha-composited over the generated image), built with PIL as A1111 builds it
    from PIL import ImageOps

    level = np.rint(soft * 255).astype(np.uint8)
    overlay_mask = Image.fromarray(np.clip(level.astype(np.int32) * 2, 0, 255).astype(np.uint8))
    masked = Image.new("RGBa", orig.size)
    masked.paste(orig.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(overlay_mask))
    a1111 = gen.convert("RGBA")
    a1111.alpha_composite(masked.convert("RGBA"))
    diff = np.abs(out.astype(int) - np.asarray(a1111.convert("RGB"), dtype=int))
    assert diff.max() <= 2, diff.max()  # PIL's premultiplied-alpha rounding; a blend by the level alone: 100+


def test_image_bad_input_one_line_errors(tmp_path):
    rgb = tmp_path / "rgb.png"
    Image.new("RGB", (64, 48), (200, 10, 10)).save(rgb)
    for mode, word in (("L", "grayscale"), ("RGBA", "RGBA")):
        p = tmp_path / f"{mode}.png"
        Image.new(mode, (64, 48)).save(p)
        with pytest.raises(LdmExportError, match=word) as e:
            E.load_init_image(p, None, None, 8)
        assert "\n" not in str(e.value) and "RGB" in str(e.value)
    odd = tmp_path / "odd.png"
    Image.new("RGB", (60, 48)).save(odd)
    with pytest.raises(LdmExportError, match="multiples of 8"):
        E.load_init_image(odd, None, None, 8)
    arr, img = E.load_init_image(odd, 64, 48, 8)  # resized with a warning when a size is asked for
    assert arr.shape == (1, 3, 48, 64) and img.size == (64, 48)
    arr, _ = E.load_init_image(rgb, None, None, 8)
    assert arr.dtype == np.float32 and arr.min() >= -1 and arr.max() <= 1
    np.testing.assert_allclose(arr[0, :, 0, 0], [200 / 127.5 - 1, 10 / 127.5 - 1, 10 / 127.5 - 1], atol=1e-6)
    mask = tmp_path / "mask.png"
    Image.new("L", (32, 32), 255).save(mask)
    with pytest.raises(LdmExportError, match="mask .* is 32x32 but the image is 64x48"):
        E.load_mask(mask, (64, 48))
    with pytest.raises(LdmExportError, match="does not exist"):
        E.load_init_image(tmp_path / "none.png", None, None, 8)
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(LdmExportError, match="cannot read"):
        E.load_mask(tmp_path / "junk.png", (64, 48))



def test_an_animated_init_image_or_mask_is_read_as_its_first_frame_with_a_warning(tmp_path, caplog):
    frames = [Image.new("RGB", (16, 16), c) for c in ((200, 0, 0), (0, 200, 0), (0, 0, 200))]
    for ext in ("webp", "png", "gif"):
        path = tmp_path / f"anim.{ext}"
        frames[0].save(path, save_all=True, append_images=frames[1:], lossless=True)
        caplog.clear()
        with caplog.at_level("WARNING", logger="ldm_export.runtime.editing"):
            image = E._open(path, "init image")
        assert f"anim.{ext} is an animation of 3 frames; using its first frame" in caplog.text
        assert image.convert("RGB").getpixel((8, 8))[0] > 150  # the first (red) frame
    caplog.clear()
    with caplog.at_level("WARNING", logger="ldm_export.runtime.editing"):
        E.load_init_image(tmp_path / "anim.webp", None, None, 8)
        E._open(Image.new("RGB", (8, 8)), "init image")
        Image.new("RGB", (8, 8)).save(tmp_path / "still.webp")
        E.load_init_image(tmp_path / "still.webp", None, None, 8)
    assert caplog.text.count("animation") == 1


def test_exif_rotated_photos_are_read_upright(tmp_path):
    # a camera's JPEG: pixels stored turned, EXIF orientation 6 says "turn 90 degrees clockwise to show"
    upright = Image.new("RGB", (96, 64), (0, 0, 200))
    upright.paste((220, 0, 0), (0, 0, 32, 64))  # red on the left as shown
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    upright.rotate(90, expand=True).save(path, exif=exif, quality=95)
    assert Image.open(path).size == (64, 96)
    arr, image = E.load_init_image(path, None, None, 32)
    assert image.size == (96, 64) and arr.shape == (1, 3, 64, 96)
    assert arr[0, 0, :, :16].mean() > 0.5 and arr[0, 0, :, -16:].mean() < -0.5  # red on the left, not at the top
    mask = Image.new("L", (96, 64), 0)
    mask.paste(255, (48, 0, 96, 64))
    mask.rotate(90, expand=True).save(tmp_path / "mask.jpg", exif=exif, quality=95)
    m = E.load_mask(tmp_path / "mask.jpg", (96, 64))
    assert m[:, :40].max() < 0.1 and m[:, 56:].min() > 0.9


def test_16_bit_masks_keep_their_greys(tmp_path):
    values = np.zeros((16, 16), np.uint16)
    values[:, 8:] = 20000  # 31 % grey: kept, not repainted
    values[:4, :4] = 65535
    Image.fromarray(values).save(tmp_path / "m16.png")
    assert Image.open(tmp_path / "m16.png").mode.startswith("I")
    m = E.load_mask(tmp_path / "m16.png", (16, 16))
    np.testing.assert_allclose(m[0, 8:], round(20000 / 65535 * 255) / 255)
    assert m[0, 0] == 1.0 and m[8, 0] == 0.0
    assert E.latent_mask(m, 4)[0, 0, :, 2:].max() == 0  # PIL's own conversion made the grey white (repainted)
    Image.fromarray(np.where(values > 0, 255, 0).astype(np.uint16)).save(tmp_path / "m16_8bit_levels.png")
    with pytest.raises(LdmExportError, match=r"no pixel of 32768 or more of 65535 .* saved as 0 and 65535\)$"):
        E.load_mask(tmp_path / "m16_8bit_levels.png", (16, 16))  # 0/255 in a 16-bit file: in that file's levels
    Image.new("L", (16, 16), 100).save(tmp_path / "m8.png")
    with pytest.raises(LdmExportError, match=r"no pixel of 128 or more of 255 .* saved as 0 and 255\)$"):
        E.load_mask(tmp_path / "m8.png", (16, 16))


def test_mask_of_the_init_images_size_is_resized_with_it_and_an_empty_mask_is_refused(tmp_path, caplog):
    Image.new("RGB", (65, 63), (10, 100, 10)).save(tmp_path / "odd.png")
    mask = Image.new("L", (65, 63), 0)
    mask.paste(255, (33, 0, 65, 63))
    mask.save(tmp_path / "mask.png")
    source = E._open(tmp_path / "odd.png", "init image")
    _, image = E.fit_init_image(source, tmp_path / "odd.png", 64, 64, 8)
    with caplog.at_level("WARNING"):
        m = E.load_mask(tmp_path / "mask.png", image.size, image_size=source.size)
    assert m.shape == (64, 64) and m[:, :30].max() == 0 and m[:, 36:].min() == 1
    assert "resizing it with the image to 64x64" in caplog.text
    with pytest.raises(LdmExportError, match="is 65x63 but the image is 64x64"):
        E.load_mask(tmp_path / "mask.png", image.size)  # a mask of a third size stays refused
    for name, value in (("black.png", 0), ("ones.png", 1), ("grey.png", 127)):
        Image.new("L", (64, 64), value).save(tmp_path / name)
        with pytest.raises(LdmExportError, match="nothing would be repainted") as e:
            E.load_mask(tmp_path / name, (64, 64))
        assert "\n" not in str(e.value)
    Image.new("L", (64, 64), 128).save(tmp_path / "half.png")
    assert E.latent_mask(E.load_mask(tmp_path / "half.png", (64, 64)), 8).min() == 1



def test_an_image_too_large_for_pil_is_a_one_line_error(tmp_path, monkeypatch):
    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL refuses more than twice this: a "decompression bomb"
    for load in (lambda: E.load_init_image(tmp_path / "big.png", None, None, 8),
                 lambda: E.load_mask(tmp_path / "big.png", (64, 64))):
        with pytest.raises(LdmExportError, match="big.png is too large to read") as e:  # was a traceback
            load()
        assert "\n" not in str(e.value)


def diffusers_handoff(config, steps, split, model, latents, noise):
    """diffusers' base (denoising_end) then refiner (denoising_start) loops, each with its own scheduler."""
    import diffusers
    import torch

    from ldm_export.parity.samplers import _lms_scheduler_class, patched_randn

    cls = _lms_scheduler_class() if config["_class_name"] == "LMSDiscreteScheduler" else getattr(diffusers, config["_class_name"])
    make = lambda: cls.from_config({k: v for k, v in config.items() if k != "_class_name"})  # noqa: E731
    base, refiner = make(), make()
    base.set_timesteps(steps)
    cutoff = int(round(base.config.num_train_timesteps - split * base.config.num_train_timesteps))
    n_base = len([t for t in base.timesteps if t >= cutoff])
    x = torch.from_numpy(latents) * base.init_noise_sigma
    with patched_randn(sys.modules[cls.__module__], noise):
        for t in base.timesteps[:n_base]:
            x = base.step(torch.from_numpy(model(base.scale_model_input(x, t).numpy(), float(t))), t, x).prev_sample
        refiner.set_timesteps(steps)
        n_ref = int((refiner.timesteps < cutoff).sum())
        t_start = len(refiner.timesteps) - n_ref
        if refiner.order == 2:  # Heun's timesteps come in pairs after the first: start on the whole step at the cut
            t_start += 1  # (diffusers' img2img pipeline instead adds a pair before it and so re-runs the cut's step)
        if hasattr(refiner, "set_begin_index"):
            refiner.set_begin_index(t_start)
        for t in refiner.timesteps[t_start:]:
            x = refiner.step(torch.from_numpy(model(refiner.scale_model_input(x, t).numpy(), float(t))), t, x).prev_sample
    return x.numpy()


@pytest.mark.parametrize("name", ["Euler", "Euler a", "DDIM", "DPM++ 2M", "DPM++ 2M Karras", "UniPC", "LMS", "LCM", "Heun",
                                  "Heun Karras"])
@pytest.mark.parametrize("steps", [10, 30])
def test_base_refiner_handoff_matches_diffusers(name, steps):
    """Heun (2nd order; this crashed before): the base's loop keeps the evaluations at or above the cut, as diffusers'
    does, so its last step is Euler's half; the refiner goes on with whole Heun steps from the cut. LCM: the base's
    last step noises its estimate to the cut's timestep, as diffusers' (it handed over the clean estimate: 35 dB)."""
    pytest.importorskip("diffusers")
    from ldm_export.parity.samplers import SD15_BASE, NoiseSequence, max_relative_error, stand_in_model
    from ldm_export.runtime import sample

    config = resolve_scheduler(name, SD15_BASE)
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8))
    stop = E.cutoff_step(config, steps, 0.8)
    assert 0 < stop < steps
    noise = NoiseSequence(1)
    mid = E.sample_range(stand_in_model, latents, config, steps, 0, stop, noise=noise, initial_noise=True)
    ours = E.sample_range(stand_in_model, mid, config, steps, stop, noise=noise)
    theirs = diffusers_handoff(config, steps, 0.8, stand_in_model, latents, NoiseSequence(1))
    assert max_relative_error(ours, theirs) < TOL
    whole = E.sample_range(stand_in_model, latents, config, steps, noise=NoiseSequence(1), initial_noise=True)
    np.testing.assert_allclose(whole, sample(stand_in_model, latents, config, steps, noise=NoiseSequence(1)), rtol=1e-12)
