"""`ldm-export serve`: A1111's API on Ray Serve over the demo bundle (one service for most tests, started as a user
would, in a child process), the request model, batching, limits, faults, shutdown and what the service exposes."""
from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli

pytest.importorskip("ray.serve", reason="needs the [serve] extra")
pytest.importorskip("fastapi", reason="needs the [serve] extra")
psutil = pytest.importorskip("psutil", reason="needs the [serve] extra")

from ldm_export.runtime.errors import LdmExportError  # noqa: E402
from ldm_export.serve import a1111  # noqa: E402
from ldm_export.serve.loadtest import REPLICA_TITLE, free_port, get, post, wait_healthy  # noqa: E402

AUTH = "user:s3cret"
PROMPT = "a red circle on the left"
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


@pytest.fixture(scope="module")
def demo_bundle(tmp_path_factory) -> Path:
    """The embedded demo model's bundle (64 px), built once for this module."""
    pytest.importorskip("torch")
    from ldm_export.export.build import BuildConfig, build

    out = tmp_path_factory.mktemp("serve") / "demo-fp32"
    build(BuildConfig(model="demo", precision="fp32", out=out, vae_encoder=True))  # the encoder: img2img
    return out


@pytest.fixture(scope="module")
def pipe(demo_bundle):
    from ldm_export.runtime.pipeline import Pipeline

    return Pipeline.from_bundle(demo_bundle)


def pixels(image_or_b64) -> np.ndarray:
    from PIL import Image

    if isinstance(image_or_b64, str):
        image_or_b64 = Image.open(io.BytesIO(base64.b64decode(image_or_b64)))
    return np.asarray(image_or_b64.convert("RGB"), dtype=np.int16)


def pipeline_error(pipe, **kw) -> str:
    """The message ``Pipeline`` (so ``generate``) gives for these arguments."""
    with pytest.raises(LdmExportError) as e:
        pipe(PROMPT, **kw)
    return str(e.value)


# -- the request model and the replica's batching, without Ray ------------------------------------------------------
def test_request_model_takes_every_a1111_field_and_reports_unsupported_ones():
    model = a1111.request_model()
    body = model.model_validate({"prompt": "p", "steps": "12", "width": 64, "enable_hr": False,
                                 "some_extension_field": {"x": 1}}).model_dump()
    assert body["steps"] == 12 and body["cfg_scale"] == 7.0 and body["sampler_index"] == "Euler"
    assert body["some_extension_field"] == {"x": 1}  # unknown fields are kept, not refused
    assert {name for name, _, _ in a1111.FIELDS} <= set(body)
    # what webuiapi sends for a plain call (its defaults): nothing is reported
    plain = {"enable_hr": False, "hr_scale": 2, "hr_upscaler": "Latent", "denoising_strength": 0.7, "styles": [],
             "seed": -1, "subseed": -1, "subseed_strength": 0.0, "seed_resize_from_h": 0, "seed_resize_from_w": 0,
             "restore_faces": False, "tiling": False, "eta": 1.0, "s_churn": 0, "s_tmax": 0, "s_tmin": 0, "s_noise": 1,
             "override_settings": {}, "script_args": [], "script_name": None, "send_images": True,
             "save_images": False, "alwayson_scripts": {}, "sampler_name": "Euler a", "scheduler": "automatic"}
    body = model.model_validate(plain).model_dump()
    sampler, ignored = a1111.sampler_for(body)
    assert sampler == "Euler a" and ignored == {}
    assert a1111.ignored_fields(body, sampler, {"demo"}) == {}
    # fields that would change A1111's image are reported with their values
    odd = model.model_validate({**plain, "enable_hr": True, "hr_scale": 1.5, "tiling": True, "subseed_strength": 0.3,
                                "override_settings": {"sd_model_checkpoint": "demo", "CLIP_stop_at_last_layers": 2},
                                "my_field": 3}).model_dump()
    ignored = a1111.ignored_fields(odd, "Euler a", {"demo"})
    assert ignored == {"enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent", "denoising_strength": 0.7, "tiling": True,
                       "subseed_strength": 0.3, "subseed": -1, "my_field": 3,
                       "override_settings": {"CLIP_stop_at_last_layers": 2}}
    assert a1111.ignored_fields({**body, "eta": 0.5}, "DDIM", set()) == {"eta": 0.5}  # eta matters to DDIM only
    assert a1111.ignored_fields({**body, "eta": 0.5}, "Euler", set()) == {}


def test_sampler_and_scheduler_fields_map_to_our_sampler_names():
    assert a1111.sampler_for({"sampler_name": "DPM++ 2M", "scheduler": "Karras"}) == ("DPM++ 2M Karras", {})
    assert a1111.sampler_for({"sampler_name": None, "sampler_index": "Heun"}) == ("Heun", {})
    assert a1111.sampler_for({}) == ("Euler", {})  # A1111's default
    assert a1111.sampler_for({"sampler_name": "euler a"}) == ("Euler a", {})  # any case, and A1111's k_ aliases
    assert a1111.sampler_for({"sampler_name": "k_dpmpp_2m", "scheduler": "Karras"}) == ("DPM++ 2M Karras", {})
    assert a1111.sampler_for({"sampler_name": "Euler", "scheduler": "SGM Uniform"}) == ("Euler", {"scheduler": "SGM Uniform"})
    # a schedule the sampler does not take here (diffusers' ancestral Euler has no Karras sigmas) is reported, not a 422
    assert a1111.sampler_for({"sampler_name": "Euler a", "scheduler": "Karras"}) == ("Euler a", {"scheduler": "Karras"})
    assert a1111.api_message("unknown sampler 'DPM++ SDE'; known: Euler, Euler a, " + "x, " * 1000) == \
        "unknown sampler_name 'DPM++ SDE'; GET /sdapi/v1/samplers lists the names this server runs"


def test_seeds_batches_and_limits_follow_a1111():
    body = {"prompt": "p", "steps": 5, "cfg_scale": 3.0, "batch_size": 3, "n_iter": 2, "width": 64, "height": 64}
    rows = a1111.jobs_for(body, "Euler", 10)
    assert [[j.seed for j in r] for r in rows] == [[10, 11, 12], [13, 14, 15]]  # image k gets seed + k
    assert [j.seed for r in a1111.jobs_for(body, "Euler", 2**32 - 2) for j in r] == [2**32 - 2, 2**32 - 1, 0, 1, 2, 3]
    assert len({j.seed for r in a1111.jobs_for(body, "Euler", -1) for j in r}) == 6
    with pytest.raises(LdmExportError, match="seed must be an integer"):
        a1111.jobs_for(body, "Euler", -5)
    assert 0 <= a1111.fixed_seed(-1) < 4294967294 and a1111.fixed_seed(7) == 7
    a1111.check_limits(body, max_images=6, max_side=(128, 128))
    with pytest.raises(LdmExportError, match="--max-images 4"):
        a1111.check_limits(body, max_images=4, max_side=(128, 128))
    with pytest.raises(LdmExportError, match="width 256 is larger than this server's --max-size 128x128"):
        a1111.check_limits({**body, "width": 256}, max_images=6, max_side=(128, 128))
    with pytest.raises(LdmExportError, match="batch_size must be at least 1"):
        a1111.check_limits({**body, "batch_size": 0}, max_images=6, max_side=(128, 128))


def _b64_png(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _edit_images():
    from ldm_export.demo.edits import drawn, right_half_mask

    return drawn("red", "circle", "left"), right_half_mask()


def test_img2img_request_model_and_what_it_reports():
    model = a1111.request_model(img2img=True)
    body = model.model_validate({"prompt": "p", "init_images": ["x"], "steps": 4}).model_dump()
    assert body["denoising_strength"] == 0.75 and body["mask_blur_x"] == 4 and body["inpainting_fill"] == 0
    assert "enable_hr" not in body and {n for n, _, _ in a1111.IMG2IMG_FIELDS} <= set(body)
    # what webuiapi's img2img sends by default: without a mask nothing is reported; with one, A1111's "fill" of the
    # masked region and its "only masked" crop, which we do not do (we inpaint from the original, whole picture)
    plain = {"resize_mode": 0, "denoising_strength": 0.75, "image_cfg_scale": 1.5, "mask_blur": 4,
             "inpainting_fill": 0, "inpaint_full_res": True, "inpaint_full_res_padding": 0,
             "inpainting_mask_invert": 0, "initial_noise_multiplier": 1, "styles": [], "seed": -1, "eta": 1.0,
             "include_init_images": False, "sampler_name": "Euler a", "init_images": ["x"]}
    body = model.model_validate(plain).model_dump()
    assert a1111.ignored_fields(body, "Euler a", set(), img2img=True) == {}
    masked = model.model_validate({**plain, "mask": "m"}).model_dump()
    assert a1111.ignored_fields(masked, "Euler a", set(), img2img=True) == {"inpainting_fill": 0, "inpaint_full_res": True}
    masked = model.model_validate({**plain, "mask": "m", "inpainting_fill": 1, "inpaint_full_res": False,
                                   "resize_mode": 2}).model_dump()
    assert a1111.ignored_fields(masked, "Euler a", set(), img2img=True) == {"resize_mode": 2}
    for bad, match in (([], "init_images must hold at least one"), (["bm90IGFuIGltYWdl"], r"init_images\[0\] is not a "
                       "base64-encoded image PIL can read"), ([None], "init_images.0. must be a base64-encoded image")):
        with pytest.raises(LdmExportError, match=match):
            a1111.edit_fields({"init_images": bad})
    init, mask = _edit_images()
    edit = a1111.edit_fields({"init_images": ["data:image/png;base64," + _b64_png(init)], "mask": _b64_png(mask),
                              "denoising_strength": 0.5, "mask_blur_x": 2, "mask_blur_y": 6, "inpainting_mask_invert": 1})
    assert edit["strength"] == 0.5 and edit["mask_blur"] == 6.0 and edit["invert_mask"] is True
    rows = a1111.jobs_for({"prompt": "p", "steps": 4, "cfg_scale": 7.0, "batch_size": 2}, "Euler", 5, edit)
    assert [j.seed for j in rows[0]] == [5, 6] and rows[0][0].init_image == rows[0][1].init_image
    assert rows[0][0].group_key() != rows[0][1].group_key()  # an edit runs alone


def test_img2img_and_inpainting_jobs_equal_generate(pipe):
    """A served edit is the image `generate --init-image/--mask` draws with the same seed; an inverted mask (white
    = keep) equals the complementary mask, and an RGBA mask is read by its alpha, as A1111 reads them."""
    from PIL import Image, ImageOps

    from ldm_export.serve.app import run_jobs

    init, mask = _edit_images()
    png = lambda im: base64.b64decode(_b64_png(im))  # noqa: E731
    job = a1111.Job("a blue circle on the left", "", 3, 8, 7.5, "Euler a", None, None, init_image=png(init), strength=0.6)
    inverted = a1111.Job("a green square on the right", "", 4, 8, 7.5, "Euler", None, None, init_image=png(init),
                         mask=png(ImageOps.invert(mask)), strength=1.0, mask_blur=2.0, invert_mask=True)
    rgba = Image.new("RGBA", mask.size, (0, 0, 0, 0))
    rgba.putalpha(mask)
    alpha = a1111.Job("a green square on the right", "", 4, 8, 7.5, "Euler", None, None, init_image=png(init),
                      mask=png(rgba), strength=1.0, mask_blur=2.0)
    served = [Image.open(io.BytesIO(r["png"])) for r in run_jobs(pipe, [job, inverted, alpha])]
    alone = pipe("a blue circle on the left", num_inference_steps=8, guidance_scale=7.5, seed=3, scheduler="Euler a",
                 init_image=init, strength=0.6)[0]
    assert np.array_equal(pixels(served[0]), pixels(alone))
    assert "Denoising strength: 0.6" in served[0].info["parameters"]
    painted = pipe("a green square on the right", num_inference_steps=8, guidance_scale=7.5, seed=4, scheduler="Euler",
                   init_image=init, strength=1.0, mask_image=mask, mask_blur=2.0)[0]
    assert np.array_equal(pixels(served[1]), pixels(painted)) and np.array_equal(pixels(served[2]), pixels(painted))
    assert np.array_equal(pixels(served[1])[:, :24], pixels(init)[:, :24])  # outside the mask: the original pixels
    bad = a1111.Job("x", "", 1, 4, 7.5, "Euler", None, None, init_image=png(init), mask=png(Image.new("L", (64, 64))),
                    strength=1.0)
    (error,) = run_jobs(pipe, [bad])
    assert error["error"].startswith("mask in the request has no pixel of 128 or more of 255"), error


def test_img2img_takes_what_a1111_takes(pipe, tmp_path):
    """RGBA, grayscale and palette init images are flattened on white (A1111's img2img background), as A1111 does,
    not refused as `generate` refuses them; an RGBA mask's alpha is rounded at 128 (mask_round); an inpainting UNet
    without a mask repaints the whole image."""
    from PIL import Image

    from ldm_export.export.build import BuildConfig, build
    from ldm_export.runtime.pipeline import Pipeline
    from ldm_export.serve.app import _flatten, run_jobs

    init, mask = _edit_images()
    png = lambda im: base64.b64decode(_b64_png(im))  # noqa: E731
    rgba = init.convert("RGBA")
    rgba.putalpha(128)
    flat = np.asarray(_flatten(rgba), dtype=np.int16)
    expected = (np.asarray(init, dtype=np.float32) * 128 + 255 * 127) / 255
    assert np.abs(flat - expected).max() <= 1
    for image in (rgba, init.convert("L"), init.convert("P")):
        job = a1111.Job("x", "", 1, 2, 7.5, "Euler", None, None, init_image=png(image), strength=0.5)
        (r,) = run_jobs(pipe, [job])
        assert "png" in r, r
    soft = Image.new("RGBA", mask.size, (0, 0, 0, 0))
    soft.putalpha(mask.point(lambda v: 200 if v else 60))  # alpha 200 where to repaint, 60 elsewhere
    hard = a1111.Job("x", "", 2, 4, 7.5, "Euler", None, None, init_image=png(init), mask=png(soft), strength=1.0)
    ref = a1111.Job("x", "", 2, 4, 7.5, "Euler", None, None, init_image=png(init), mask=png(mask), strength=1.0)
    a, b = (Image.open(io.BytesIO(r["png"])) for r in run_jobs(pipe, [hard, ref]))
    assert np.array_equal(pixels(a), pixels(b))
    inpaint = tmp_path / "inpaint"
    build(BuildConfig(model="tiny-inpaint", random_weights=True, seed=2, out=inpaint, vae_encoder=True))
    tiny = Pipeline.from_bundle(inpaint)
    square = Image.new("RGB", (64, 64), (200, 30, 30))
    job = a1111.Job("x", "", 3, 4, 7.5, "Euler", None, None, init_image=png(square), strength=0.8, whole_mask=True)
    (r,) = run_jobs(tiny, [job])
    alone = tiny("x", num_inference_steps=4, guidance_scale=7.5, seed=3, scheduler="Euler", init_image=square,
                 strength=0.8, mask_image=Image.new("L", (64, 64), 255))[0]
    assert np.array_equal(pixels(Image.open(io.BytesIO(r["png"]))), pixels(alone))


def test_img2img_reads_images_and_masks_as_a1111s_api_reads_them(pipe, tmp_path):
    """A cut-off JPEG passed the ingress (verify() reads no JPEG data) and failed in the replica: a 500 with a Ray
    traceback. A phone's JPEG (EXIF orientation) was edited sideways, as `generate` does not. A mask of another size
    was refused where A1111 resizes it to the image. Messages named command-line options a client cannot pass."""
    from PIL import Image

    from ldm_export.serve.app import run_jobs

    init, mask = _edit_images()
    buf = io.BytesIO()
    init.save(buf, "JPEG", quality=95)
    for field, body in (("init_images[0]", {"init_images": [base64.b64encode(buf.getvalue()[:600]).decode()]}),
                        ("mask", {"init_images": [_b64_png(init)], "mask": base64.b64encode(buf.getvalue()[:600]).decode()})):
        with pytest.raises(LdmExportError, match=rf"^{re.escape(field)} is not a base64-encoded image PIL can read "
                                                 r"\(OSError: .*\); send a whole PNG"):
            a1111.edit_fields(body)
    # stored sideways (64 wide, 32 high) with Orientation 6: shown, and read by generate, as 32 wide and 64 high
    tall = init.crop((16, 0, 48, 64))
    stored = tall.transpose(Image.Transpose.ROTATE_90)
    exif = stored.getexif()
    exif[0x0112] = 6
    phone = tmp_path / "phone.jpg"
    stored.save(phone, "JPEG", quality=95, exif=exif)
    upright_mask = mask.crop((16, 0, 48, 64))
    body = {"init_images": [base64.b64encode(phone.read_bytes()).decode()], "mask": _b64_png(upright_mask),
            "denoising_strength": 0.6, "mask_blur": 4}
    edit = a1111.edit_fields(body)
    (row,) = a1111.jobs_for({"prompt": "a blue circle", "steps": 4, "cfg_scale": 7.5}, "Euler", 3, edit)
    (r,) = run_jobs(pipe, row)
    assert (r["width"], r["height"]) == (32, 64), r
    alone = pipe("a blue circle", num_inference_steps=4, guidance_scale=7.5, seed=3, scheduler="Euler",
                 init_image=phone, strength=0.6, mask_image=upright_mask, mask_blur=4.0)[0]
    assert np.array_equal(pixels(Image.open(io.BytesIO(r["png"]))), pixels(alone))
    # a half-size mask: resized to the image as A1111 resizes it (LANCZOS), not refused
    half = mask.resize((32, 32), Image.NEAREST)
    png = lambda im: base64.b64decode(_b64_png(im))  # noqa: E731
    job = a1111.Job("x", "", 2, 4, 7.5, "Euler", None, None, init_image=png(init), mask=png(half), strength=1.0)
    (r,) = run_jobs(pipe, [job])
    assert "png" in r, r
    alone = pipe("x", num_inference_steps=4, guidance_scale=7.5, seed=2, scheduler="Euler", init_image=init,
                 strength=1.0, mask_image=half.resize((64, 64), Image.LANCZOS))[0]
    assert np.array_equal(pixels(Image.open(io.BytesIO(r["png"]))), pixels(alone))
    # the runtime's messages name the request's fields
    job = a1111.Job("x", "", 2, 4, 7.5, "Euler", None, None, init_image=png(init), strength=0.05)
    (r,) = run_jobs(pipe, [job])
    assert "use steps 20 or more, or a denoising_strength of at least 0.25" in r["error"] and "--" not in r["error"], r
    # an image past four times --max-size's pixels is refused from its header, before its pixels are decoded
    big = Image.new("RGB", (640, 480))
    buf = io.BytesIO()
    big.save(buf, "PNG")
    with pytest.raises(LdmExportError, match=r"^init_images\[0\] is 640x480, more pixels than this server takes "
                                             r"\(262144: four times its --max-size\); send a smaller image$"):
        a1111.edit_fields({"init_images": [base64.b64encode(buf.getvalue()).decode()]}, max_pixels=4 * 256 * 256)
    assert a1111.upright_size(Image.open(phone)) == (32, 64)  # from the EXIF tag, without decoding
    with pytest.raises(LdmExportError, match=r"^mask is not a base64-encoded image PIL can read "
                                             r"\(UnidentifiedImageError\); send a whole PNG"):  # no object address
        a1111.edit_fields({"init_images": [_b64_png(init)], "mask": base64.b64encode(b"not an image").decode()})
    assert a1111.api_message("use that size (--size 64x96 also resizes), or pass --size; --mask-blur 2, --mask m") == \
        "use that size (width 64 and height 96 also resizes), or send width and height; mask_blur 2, mask m"


def test_a_batched_image_equals_the_same_image_drawn_alone(pipe):
    from ldm_export.serve.app import run_jobs

    jobs = [a1111.Job(PROMPT, "", seed, 8, 7.5, "Euler a", 64, 64) for seed in (3, 4, 5)]
    jobs.append(a1111.Job("a blue square", "", 6, 8, 7.5, "Euler a", 64, 64))
    results = run_jobs(pipe, jobs)
    assert [r["unet_batch"] for r in results] == [4, 4, 4, 4]
    for job, r in zip(jobs, results):
        from PIL import Image

        served = Image.open(io.BytesIO(r["png"]))
        alone = pipe(job.prompt, num_inference_steps=8, guidance_scale=7.5, seed=job.seed, scheduler="Euler a")[0]
        assert np.abs(pixels(served) - pixels(alone)).max() <= 1, job  # batch-size rounding in ONNX Runtime at most
        assert served.info["parameters"] == r["infotext"] and f"Seed: {job.seed}," in r["infotext"]


def test_a_bad_request_in_a_batch_fails_alone_with_pipelines_message(pipe):
    from ldm_export.serve.app import run_jobs

    good = a1111.Job(PROMPT, "", 1, 4, 7.5, "Euler", 64, 64)
    bad = a1111.Job(PROMPT, "", 2, 0, 7.5, "Euler", 64, 64)  # zero steps
    bad_size = a1111.Job(PROMPT, "", 3, 4, 7.5, "Euler", 60, 64)
    out = run_jobs(pipe, [good, bad, bad_size, good])
    assert "png" in out[0] and "png" in out[3]
    assert out[1] == {"error": pipeline_error(pipe, num_inference_steps=0)}
    assert out[2] == {"error": pipeline_error(pipe, width=60, height=64)}


def test_serve_deploy_config_is_valid_for_ray_serve(demo_bundle, tmp_path):
    from ray.serve.schema import ServeDeploySchema

    import yaml

    path = tmp_path / "deploy.yaml"
    proc = run_cli("serve", str(demo_bundle), "--dry-run", "--serve-config", str(path), "--replicas", "3",
                   "--port", "8123", "--api-auth", "a:b", timeout=300)
    assert proc.returncode == 0, proc.stderr
    config = yaml.safe_load(path.read_text())
    schema = ServeDeploySchema.model_validate(config)  # Ray's own schema of `serve deploy` files
    app = schema.applications[0]
    assert app.import_path == "ldm_export.serve.app:build_app" and schema.http_options.port == 8123
    assert app.args["replicas"] == 3 and app.args["bundle"] == str(demo_bundle.resolve())
    assert "a:b" not in path.read_text()  # credentials are never written
    from ldm_export.serve.app import build_app

    assert type(build_app(app.args)).__name__ == "Application"
    # without --serve-config it goes into the bundle folder
    assert run_cli("serve", str(demo_bundle), "--dry-run", timeout=300).returncode == 0
    assert (demo_bundle / "serve.yaml").is_file()


def test_serve_refuses_what_cannot_work_with_one_line(demo_bundle, tmp_path):
    proc = run_cli("serve", str(tmp_path / "nothing"), timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "does not load: no bundle at" in proc.stderr
    broken = tmp_path / "broken"
    shutil.copytree(demo_bundle, broken)
    (broken / "unet" / "model.onnx").write_bytes(b"not onnx")
    proc = run_cli("serve", str(broken), timeout=120)
    assert proc.returncode == 1 and "does not load" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert "is not a readable ONNX graph" in proc.stderr and "the bundle is damaged, rebuild it" in proc.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_cli("serve", str(demo_bundle), "--port", str(port), "--serve-config", str(tmp_path / "c.yaml"),
                       timeout=120)
    assert proc.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in proc.stderr and "--port" in proc.stderr
    proc = run_cli("serve", str(demo_bundle), "--api-auth", "nopassword", timeout=60)
    assert proc.returncode == 2 and "--api-auth must be USER:PASS" in proc.stderr
    proc = run_cli("serve", str(demo_bundle), "--address", f"127.0.0.1:{port}", "--serve-config",
                   str(tmp_path / "c.yaml"), timeout=120)  # the port was closed with its socket above
    assert proc.returncode == 2 and f"no Ray cluster answers at 127.0.0.1:{port}" in proc.stderr, proc.stderr


def test_the_cli_does_not_import_ray_until_serve_runs():
    code = "import sys, ldm_export.cli, ldm_export.runtime; print(sorted(m for m in ('ray', 'fastapi') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr


# -- one running service ------------------------------------------------------------------------------------------
class Service:
    def __init__(self, url, proc, root):
        self.url, self.proc, self.root = url, proc, root
        self.home, self.cwd, self.tmp, self.logs = (root / n for n in ("home", "cwd", "tmp", "logs"))

    def processes(self):
        return [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]

    def replicas(self):
        return [p for p in self.processes()[1:] if REPLICA_TITLE in " ".join(p.cmdline())]


@pytest.fixture(scope="module")
def service(demo_bundle):
    # a short root: Ray's unix sockets live under its temp folder (108-byte limit)
    root = Path(tempfile.mkdtemp(prefix="ldmxt-"))
    for name in ("home", "cwd", "tmp", "logs"):
        (root / name).mkdir()
    port = free_port()
    env = {**os.environ, "HOME": str(root / "home"), "TMPDIR": str(root / "tmp")}
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ldm_export.cli", "serve", str(demo_bundle), "--port", str(port), "--api-auth", AUTH,
         "--max-batch", "4", "--max-queued", "4", "--max-images", "4", "--log-dir", str(root / "logs")],
        cwd=root / "cwd", env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", 300, proc)
    except LdmExportError:
        proc.kill()
        raise AssertionError((root / "server.log").read_text()[-3000:])
    yield Service(f"http://127.0.0.1:{port}", proc, root)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    shutil.rmtree(root, ignore_errors=True)


def txt2img(service, body, auth=AUTH, timeout=120):
    return post(service.url + "/sdapi/v1/txt2img", body, auth=auth, timeout=timeout)


def test_health_is_open_and_everything_else_needs_the_credentials(service):
    assert get(service.url + "/healthz")[0] == 200
    for path in ("/sdapi/v1/samplers", "/sdapi/v1/sd-models"):
        assert get(service.url + path)[0] == 401
        assert get(service.url + path, auth="user:wrong")[0] == 401
        assert get(service.url + path, auth=AUTH)[0] == 200
    status, body, headers = txt2img(service, {"prompt": PROMPT, "steps": 2}, auth="other:s3cret")
    assert status == 401 and {k.lower(): v for k, v in headers.items()}["www-authenticate"] == "Basic"


def test_an_unchanged_a1111_client_gets_images_with_a1111_metadata(service, pipe):
    webuiapi = pytest.importorskip("webuiapi")
    from ldm_export.runtime.image import parse_parameters

    user, password = AUTH.split(":")
    api = webuiapi.WebUIApi(host="127.0.0.1", port=int(service.url.rsplit(":", 1)[1]), username=user, password=password)
    result = api.txt2img(prompt=PROMPT, negative_prompt="blurry", seed=42, steps=10, cfg_scale=7.5, width=64,
                         height=64, sampler_name="Euler a", batch_size=2)
    assert len(result.images) == 2 and result.image.size == (64, 64)
    info = result.info
    assert info["all_seeds"] == [42, 43] and info["sampler_name"] == "Euler a" and info["sd_model_name"] == "demo"
    assert info["ldm_export"]["ignored"] == {}  # webuiapi's defaults change nothing
    assert result.parameters["prompt"] == PROMPT and result.parameters["steps"] == 10
    for k, image in enumerate(result.images):
        text = image.info["parameters"]
        assert text == info["infotexts"][k]
        parsed = parse_parameters(text)
        assert (parsed["prompt"], parsed["negative_prompt"], parsed["seed"], parsed["steps"]) == (PROMPT, "blurry", 42 + k, 10)
        alone = pipe(PROMPT, negative_prompt="blurry", num_inference_steps=10, guidance_scale=7.5, seed=42 + k,
                     scheduler="Euler a")[0]
        assert np.abs(pixels(image) - pixels(alone)).max() <= 1  # `generate --seed 42+k` draws this image
    assert [m["title"] for m in api.get_sd_models()] == [f"demo [{info['sd_model_hash']}]"]
    names = [s["name"] for s in api.get_samplers()]
    assert {"Euler", "Euler a", "DPM++ 2M Karras", "DDIM", "UniPC"} <= set(names)


def test_a1111_clients_find_the_model_options_and_progress_they_poll(service):
    """webuiapi's util_wait_for_ready (GET /progress), util_get_current_model and util_set_model (GET/POST /options)
    crashed on 404s, and util_set_model printed "model changed" for a 404; other routes A1111 has and this server
    does not answer one line naming those it has."""
    webuiapi = pytest.importorskip("webuiapi")
    user, password = AUTH.split(":")
    api = webuiapi.WebUIApi(host="127.0.0.1", port=int(service.url.rsplit(":", 1)[1]), username=user, password=password)
    title = api.get_sd_models()[0]["title"]
    assert api.util_get_current_model() == title
    api.util_wait_for_ready(check_interval=0.1)  # returns once job_count is 0 (it raised KeyError on the 404)
    assert get(service.url + "/sdapi/v1/progress", auth=AUTH)[1]["state"]["job_count"] == 0
    status, body, _ = post(service.url + "/sdapi/v1/options", {"sd_model_checkpoint": title, "CLIP_stop_at_last_layers": 2},
                           auth=AUTH)
    assert status == 200 and body == {"ignored": {"CLIP_stop_at_last_layers": 2}}, body
    status, body, _ = post(service.url + "/sdapi/v1/options", {"sd_model_checkpoint": "sdxl.safetensors"}, auth=AUTH)
    assert status == 422 and body["error"] == (f"this server serves one model, {title}; start another `ldm-export "
                                               "serve` for 'sdxl.safetensors'"), body
    assert [x["label"] for x in get(service.url + "/sdapi/v1/schedulers", auth=AUTH)[1]] == ["Automatic", "Karras",
                                                                                             "Exponential"]
    assert get(service.url + "/sdapi/v1/options")[0] == 401
    status, body, _ = post(service.url + "/sdapi/v1/interrupt", {}, auth=AUTH)
    assert status == 404 and body["error"].startswith("/sdapi/v1/interrupt is not served here; this server answers "
                                                      "/sdapi/v1/txt2img, img2img, options, progress"), body


def test_concurrent_requests_of_one_size_run_as_one_unet_batch(service):
    results = [None] * 4

    def client(k):
        results[k] = txt2img(service, {"prompt": PROMPT, "steps": 20, "seed": k, "width": 64, "height": 64})

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r[0] for r in results] == [200] * 4
    batches = [json.loads(r[1]["info"])["ldm_export"]["unet_batch"][0] for r in results]
    assert max(batches) > 1, batches


def test_bad_bodies_get_422_naming_the_field_or_generates_message(service, pipe):
    status, body, _ = txt2img(service, {"prompt": PROMPT, "steps": "many"})
    assert status == 422 and body["detail"][0]["loc"] == ["body", "steps"]
    status, body, _ = txt2img(service, {"prompt": ["a", "b"], "steps": 2})
    assert status == 422 and body["detail"][0]["loc"] == ["body", "prompt"]
    status, body, _ = txt2img(service, {"prompt": PROMPT, "steps": 2, "width": 60, "height": 64})
    assert status == 422 and body["detail"] == pipeline_error(pipe, width=60, height=64)
    status, body, _ = txt2img(service, {"prompt": PROMPT, "steps": 0})
    assert status == 422 and body["detail"] == pipeline_error(pipe, num_inference_steps=0)
    status, body, _ = txt2img(service, {"prompt": PROMPT, "steps": 2, "seed": 2**33})
    assert status == 422 and body["error"] == pipeline_error(pipe, num_inference_steps=2, seed=2**33)
    status, body, _ = txt2img(service, {"prompt": PROMPT, "steps": 2, "sampler_name": "Nope"})
    # the runtime's message, with the API's field and route in place of its list of every name
    assert status == 422 and body["detail"] == a1111.api_message(pipeline_error(pipe, num_inference_steps=2,
                                                                                 scheduler="Nope"))
    assert body["detail"] == "unknown sampler_name 'Nope'; GET /sdapi/v1/samplers lists the names this server runs"
    status, body, _ = txt2img(service, {"prompt": PROMPT, "steps": 2, "batch_size": 3, "n_iter": 2})
    assert status == 422 and "--max-images 4" in body["detail"]
    status, body, _ = txt2img(service, {"prompt": PROMPT, "steps": 2, "width": 1024, "height": 64})
    assert status == 422 and "--max-size 128x128" in body["detail"]
    req = __import__("urllib.request").request.Request(service.url + "/sdapi/v1/txt2img", data=b"{not json",
                                                      headers={"Authorization": "Basic " + base64.b64encode(AUTH.encode()).decode()})
    try:
        __import__("urllib.request").request.urlopen(req, timeout=30)
        raise AssertionError("accepted a body that is not JSON")
    except __import__("urllib.error").error.HTTPError as e:
        assert e.code == 422 and "not JSON" in json.loads(e.read())["detail"]


def test_an_unchanged_a1111_client_edits_images(service, pipe):
    """webuiapi's img2img, as A1111 users call it: image to image, then inpainting with its defaults but for the
    fill and area we implement (from the original, whole picture); each equals `generate` with the same seed."""
    webuiapi = pytest.importorskip("webuiapi")

    init, mask = _edit_images()
    user, password = AUTH.split(":")
    api = webuiapi.WebUIApi(host="127.0.0.1", port=int(service.url.rsplit(":", 1)[1]), username=user, password=password)
    result = api.img2img(images=[init], prompt="a blue circle on the left", denoising_strength=0.6, seed=7, steps=8,
                         cfg_scale=7.5, width=64, height=64, sampler_name="Euler a", batch_size=2)
    assert result.info["all_seeds"] == [7, 8] and result.info["denoising_strength"] == 0.6
    assert result.info["ldm_export"]["ignored"] == {} and result.parameters["init_images"] is None
    for k, image in enumerate(result.images):
        alone = pipe("a blue circle on the left", num_inference_steps=8, guidance_scale=7.5, seed=7 + k,
                     scheduler="Euler a", init_image=init, strength=0.6, width=64, height=64)[0]
        assert np.abs(pixels(image) - pixels(alone)).max() <= 1 and image.info["parameters"] == result.info["infotexts"][k]
    result = api.img2img(images=[init], mask_image=mask, prompt="a green square on the right", denoising_strength=1.0,
                         inpainting_fill=1, inpaint_full_res=False, mask_blur=2, seed=3, steps=8, cfg_scale=7.5,
                         width=64, height=64, sampler_name="Euler")
    painted = pipe("a green square on the right", num_inference_steps=8, guidance_scale=7.5, seed=3, scheduler="Euler",
                   init_image=init, strength=1.0, mask_image=mask, mask_blur=2.0, width=64, height=64)[0]
    assert np.array_equal(pixels(result.image), pixels(painted)) and result.info["ldm_export"]["ignored"] == {}
    status, body, _ = post(service.url + "/sdapi/v1/img2img", {"prompt": "x", "init_images": ["bm90"], "steps": 2},
                           auth=AUTH, timeout=60)
    assert status == 422 and body["detail"][0]["loc"] == ["body", "init_images"]
    status, body, _ = post(service.url + "/sdapi/v1/img2img", {"prompt": "x", "init_images": [_b64_png(init)],
                                                                "steps": 2, "denoising_strength": 0}, auth=AUTH, timeout=60)
    assert status == 422 and body["detail"][0]["loc"] == ["body", "denoising_strength"]
    assert "denoising_strength must be more than 0" in body["error"]


def test_unsupported_fields_are_accepted_and_reported_in_info(service):
    status, body, _ = txt2img(service, {"prompt": PROMPT, "steps": 2, "restore_faces": True, "styles": ["s"],
                                        "scheduler": "Karras", "sampler_name": "DPM++ 2M", "controlnet_args": [1]})
    assert status == 200, body
    info = json.loads(body["info"])
    assert info["sampler_name"] == "DPM++ 2M Karras"
    assert info["ldm_export"]["ignored"] == {"restore_faces": True, "styles": ["s"], "controlnet_args": [1]}
    # the model's guidance, through the server: CFG 1 runs no unconditional pass, so the negative prompt changes nothing
    status, body, _ = txt2img(service, {"prompt": PROMPT, "steps": 1, "cfg_scale": 1, "negative_prompt": "dog"})
    assert status == 200 and json.loads(body["info"])["ldm_export"]["ignored"] == {"negative_prompt": "dog"}, body
    # a sampler this (noise-prediction) model cannot run runs as "Euler", reported; steps and CFG left out are the
    # bundle's defaults, not A1111's 50 / 7.0
    status, body, _ = txt2img(service, {"prompt": PROMPT, "sampler_name": "Euler (flow)", "width": 64, "height": 64})
    info = json.loads(body["info"]) if status == 200 else body
    assert status == 200 and info["ldm_export"]["ignored"] == {"sampler_name": "Euler (flow)"}, body
    assert (info["sampler_name"], info["steps"], info["cfg_scale"]) == ("Euler", 20, 7.5)
    assert "Steps: 20, Sampler: Euler, CFG scale: 7.5," in info["infotexts"][0]


def test_past_max_queued_requests_get_503_with_retry_after(service):
    statuses = [None] * 24

    def client(k):
        statuses[k] = txt2img(service, {"prompt": PROMPT, "steps": 40, "seed": k}, timeout=300)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(24)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    assert get(service.url + "/healthz")[0] == 200  # busy is not unhealthy
    for t in threads:
        t.join()
    counts = Counter(s[0] for s in statuses)
    assert set(counts) == {200, 503} and counts[200] >= 4, counts  # 4 running + about 4 queued; the rest refused
    busy = next(s for s in statuses if s[0] == 503)
    assert {k.lower(): v for k, v in busy[2].items()}["retry-after"] == "2" and "--max-queued 4" in busy[1]["detail"]


def test_nothing_listens_beyond_loopback(service):
    listening = []
    for p in service.processes():
        for c in p.net_connections(kind="inet"):
            if c.status == psutil.CONN_LISTEN or (c.type == socket.SOCK_DGRAM and c.laddr):
                listening.append((p.name(), c.laddr.ip, c.laddr.port))
    assert any(port == int(service.url.rsplit(":", 1)[1]) for _, _, port in listening)  # the HTTP port is seen
    assert len(listening) > 5, listening  # Ray's own servers are seen too
    assert {ip for _, ip, _ in listening} <= LOOPBACK, [x for x in listening if x[1] not in LOOPBACK]


def test_a_dead_replica_fails_its_request_clearly_and_is_replaced(service):
    (replica,) = service.replicas()
    out = {}

    def client():
        # a long request (4 rows of the most steps), so that the replica dies in the middle of it
        out["r"] = txt2img(service, {"prompt": PROMPT, "steps": 500, "n_iter": 4, "seed": 1}, timeout=120)

    t = threading.Thread(target=client)
    t.start()
    time.sleep(2.0)
    replica.kill()
    t.join(90)
    assert not t.is_alive(), "the request hung after its replica died"
    status, body, headers = out["r"]
    assert status == 503 and "replica" in body["detail"] and "died" in body["detail"], body
    t_end = time.monotonic() + 120
    while time.monotonic() < t_end:
        if txt2img(service, {"prompt": PROMPT, "steps": 2})[0] == 200:
            break
        time.sleep(1)
    else:
        raise AssertionError("no replica answered within 120 s of the death")
    (new,) = service.replicas()
    assert new.pid != replica.pid


def test_ctrl_c_lets_inflight_requests_finish_then_stops_everything(service):
    processes = service.processes()
    out = {}

    def client():
        out["r"] = txt2img(service, {"prompt": PROMPT, "steps": 300, "seed": 1}, timeout=120)

    t = threading.Thread(target=client)
    t.start()
    time.sleep(1.5)
    os.killpg(service.proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends: the whole process group
    time.sleep(0.5)
    assert txt2img(service, {"prompt": PROMPT, "steps": 2})[0] in (0, 503)  # new work is refused while draining
    t.join(120)
    assert out["r"][0] == 200, out["r"][1]
    assert service.proc.wait(90) == 0
    time.sleep(3)
    alive = [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert alive == [], [(p.pid, p.name()) for p in alive]
    # nothing written outside the bundle, the log folder and the temp folder (which is removed)
    assert list(service.home.rglob("*")) == [], list(service.home.rglob("*"))
    assert list(service.cwd.rglob("*")) == []
    assert list(service.tmp.iterdir()) == [], list(service.tmp.iterdir())
    assert any(service.logs.rglob("*.log"))


def test_loadtest_command_bounded(demo_bundle, tmp_path):
    out = tmp_path / "load.json"
    proc = run_cli("loadtest", str(demo_bundle), "--clients", "1,2", "--requests", "4", "--steps", "4",
                   "--out", str(out), timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())
    assert [r["clients"] for r in rows] == [1, 2]
    for r in rows:
        assert r["ok"] == 4 and r["errors"] == {} and 0 < r["p50_s"] <= r["p99_s"] and r["requests_per_s"] > 0
        assert len(r["rss_before_mb"]) == 1 and len(r["rss_after_mb"]) == 1 and r["rss_before_mb"][0] > 50
    assert "p50 s" in proc.stdout and "replica RSS" in proc.stdout


def test_guidance_the_model_does_not_use_is_listed_as_ignored():
    """generate warns that a negative prompt without CFG, and a scale sent to FLUX.1 [schnell], change nothing; the
    server says so in info.ldm_export.ignored instead of writing them into the infotext as if they had counted."""
    body = {"negative_prompt": "dog", "cfg_scale": 5.0}
    assert a1111.guidance_ignored(body, body, uses_cfg=True, takes_guidance=True) == {}
    assert a1111.guidance_ignored(body, body, uses_cfg=False, takes_guidance=True) == {"negative_prompt": "dog"}  # FLUX-dev
    assert a1111.guidance_ignored(body, body, uses_cfg=False, takes_guidance=False) == body  # FLUX-schnell
    # A1111's default cfg_scale, not sent by the client, is not reported; an empty negative prompt is nothing to ignore
    assert a1111.guidance_ignored({"negative_prompt": "", "cfg_scale": 7.0}, {}, uses_cfg=False, takes_guidance=False) == {}
    assert a1111.guidance_ignored({"negative_prompt": "x", "cfg_scale": 1.0}, {"cfg_scale": 1.0}, uses_cfg=False,
                                  takes_guidance=True) == {"negative_prompt": "x"}  # scale 1: no unconditional pass


def test_health_poll_survives_a_port_that_speaks_no_http():
    """Ray's gRPC server once held the port the loadtest had picked: the health poll raised BadStatusLine (a
    traceback) instead of waiting. A non-HTTP answer is 'not ready'; the port comes from outside Ray's ranges."""
    import socket
    import threading

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    port = srv.getsockname()[1]

    def answer_binary():
        for _ in range(2):
            conn, _ = srv.accept()
            conn.recv(1024)
            conn.sendall(b"\x00\x00\x06\x04\x00\x00\x00\x00\x00\x00\x05\x00\x00@\x00\r\n\r\n")  # an HTTP/2 frame
            conn.close()

    t = threading.Thread(target=answer_binary, daemon=True)
    t.start()
    try:
        assert get(f"http://127.0.0.1:{port}/healthz", timeout=5) == (0, None)
        status, payload, _ = post(f"http://127.0.0.1:{port}/sdapi/v1/txt2img", {"prompt": "x"}, timeout=5)
        assert status == 0 and payload["error"]
    finally:
        t.join(timeout=10)
        srv.close()
    p = free_port()
    assert 20000 <= p < 32000
    with socket.socket() as s:
        s.bind(("127.0.0.1", p))  # free: it can be bound


def test_a_sampler_the_model_cannot_run_becomes_its_own_and_is_reported():
    """webuiapi sends A1111's "Euler a" unless told otherwise; a flow-matching SD3/FLUX model runs its own Euler
    instead of refusing every such request (as Forge runs it), and says so in info.ldm_export.ignored."""
    flow = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, "num_train_timesteps": 1000}
    assert a1111.fitting_sampler("Euler a", flow) == ("Euler", {"sampler_name": "Euler a"})
    assert a1111.fitting_sampler("DPM++ 2M Karras", flow) == ("Euler", {"sampler_name": "DPM++ 2M Karras"})
    assert a1111.fitting_sampler("Euler", flow) == ("Euler", {})
    assert a1111.fitting_sampler("Nope", flow) == ("Nope", {})  # unknown: refused later with the known names
    eps = {"_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
           "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "skip_prk_steps": True}
    assert a1111.fitting_sampler("Euler a", eps) == ("Euler a", {})


@pytest.mark.parametrize("raw,distilled,want,ignored", [
    ({}, False, (4, 0.0), {}),  # FLUX-schnell's own 4 steps, not A1111's 50
    ({"steps": 8, "cfg_scale": 2.0}, False, (8, 2.0), {}),
    ({}, True, (4, 0.0), {}),
    ({"cfg_scale": 7.0}, True, (4, 0.0), {"cfg_scale": 7.0}),  # webuiapi's default: Forge's true CFG, not run
    ({"cfg_scale": 1}, True, (4, 0.0), {}),  # Forge's FLUX setting without distilled_cfg_scale: the bundle's guidance
    ({"cfg_scale": 1, "distilled_cfg_scale": 3.5}, True, (4, 3.5), {}),  # Forge's FLUX fields
    ({"cfg_scale": 6, "distilled_cfg_scale": 2.5}, True, (4, 2.5), {"cfg_scale": 6}),  # true CFG: not run
    ({"distilled_cfg_scale": 3.5}, False, (4, 0.0), {}),  # a model without a guidance input: reported elsewhere
    ({"cfg_scale": "1", "distilled_cfg_scale": "2.5"}, True, (4, 2.5), {}),  # strings as pydantic reads them
])
def test_steps_and_guidance_the_client_left_out_are_the_bundles(raw, distilled, want, ignored):
    body = a1111.request_model().model_validate({"prompt": "p", **raw}).model_dump()
    got = a1111.sampling_defaults(body, raw, {"steps": 4, "guidance_scale": 0.0}, distilled)
    assert (body["steps"], body["cfg_scale"]) == want and got == ignored


def test_a_distilled_cfg_scale_that_is_not_a_number_is_refused_in_one_line():
    body = a1111.request_model().model_validate({"prompt": "p"}).model_dump()
    # out of range, NaN and booleans too: they reached the replica, whose message named no field
    for value in ("abc", [1], 500, float("nan"), -1, True):
        with pytest.raises(LdmExportError, match=r"^distilled_cfg_scale must be a number from 0 to 100, got .* "
                                                 r"\(3\.5 is this model's default\)$"):
            a1111.sampling_defaults(body, {"distilled_cfg_scale": value}, {"steps": 4, "guidance_scale": 3.5}, True)
