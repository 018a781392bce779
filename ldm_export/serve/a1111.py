"""AUTOMATIC1111's txt2img and img2img API: the request bodies, what of them we honour, and the response's ``info``.

Field names, types and defaults are stable-diffusion-webui's (``modules/api/models.py``:
``StableDiffusionTxt2ImgProcessingAPI`` and ``StableDiffusionImg2ImgProcessingAPI``, generated from
``modules/processing.py``'s ``StableDiffusionProcessing``, ``...Txt2Img`` and ``...Img2Img``); ``info`` is
``Processed.js()``. Fields we do not support are accepted and listed under ``info["ldm_export"]["ignored"]``, not
refused.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from typing import Any, Optional

from ldm_export.runtime.errors import LdmExportError

# (name, type, A1111's default): every txt2img field of A1111 1.10's API, in its order.
FIELDS: tuple[tuple[str, Any, Any], ...] = (
    ("prompt", str, ""), ("negative_prompt", str, ""), ("styles", list[str], None), ("seed", int, -1),
    ("subseed", int, -1), ("subseed_strength", float, 0.0), ("seed_resize_from_h", int, -1),
    ("seed_resize_from_w", int, -1), ("sampler_name", str, None), ("scheduler", str, None), ("batch_size", int, 1),
    ("n_iter", int, 1), ("steps", int, 50), ("cfg_scale", float, 7.0), ("width", int, None), ("height", int, None),
    ("restore_faces", bool, None), ("tiling", bool, None), ("do_not_save_samples", bool, False),
    ("do_not_save_grid", bool, False), ("eta", float, None), ("denoising_strength", float, None),
    ("s_min_uncond", float, None), ("s_churn", float, None), ("s_tmax", float, None), ("s_tmin", float, None),
    ("s_noise", float, None), ("override_settings", dict[str, Any], None),
    ("override_settings_restore_afterwards", bool, True), ("refiner_checkpoint", str, None),
    ("refiner_switch_at", float, None), ("disable_extra_networks", bool, False), ("firstpass_image", str, None),
    ("comments", dict[str, Any], None), ("enable_hr", bool, False), ("firstphase_width", int, 0),
    ("firstphase_height", int, 0), ("hr_scale", float, 2.0), ("hr_upscaler", str, None),
    ("hr_second_pass_steps", int, 0), ("hr_resize_x", int, 0), ("hr_resize_y", int, 0),
    ("hr_checkpoint_name", str, None), ("hr_sampler_name", str, None), ("hr_scheduler", str, None),
    ("hr_prompt", str, ""), ("hr_negative_prompt", str, ""), ("force_task_id", str, None),
    ("sampler_index", str, "Euler"), ("script_name", str, None), ("script_args", list, []),
    ("send_images", bool, True), ("save_images", bool, False), ("alwayson_scripts", dict[str, Any], {}),
    ("infotext", str, None),
)
# A1111 defaults width/height to 512; here an absent size is the bundle's own resolution (512 for SD 1.5).

# img2img's own fields (A1111 1.10), after the shared ones less the hires pass's; denoising_strength defaults to 0.75
IMG2IMG_FIELDS: tuple[tuple[str, Any, Any], ...] = (
    ("init_images", list[str], None), ("resize_mode", int, 0), ("image_cfg_scale", float, None),
    ("mask", str, None), ("mask_blur_x", int, 4), ("mask_blur_y", int, 4), ("mask_blur", int, None),
    ("mask_round", bool, True), ("inpainting_fill", int, 0), ("inpaint_full_res", bool, True),
    ("inpaint_full_res_padding", int, 0), ("inpainting_mask_invert", int, 0), ("initial_noise_multiplier", float, None),
    ("latent_mask", str, None), ("include_init_images", bool, False),
)
_TXT2IMG_ONLY = {"enable_hr", "firstphase_width", "firstphase_height", "hr_scale", "hr_upscaler",
                 "hr_second_pass_steps", "hr_resize_x", "hr_resize_y", "hr_checkpoint_name", "hr_sampler_name",
                 "hr_scheduler", "hr_prompt", "hr_negative_prompt", "firstpass_image"}
IMG2IMG_ALL: tuple[tuple[str, Any, Any], ...] = tuple(
    (n, t, 0.75 if n == "denoising_strength" else d) for n, t, d in FIELDS if n not in _TXT2IMG_ONLY) + IMG2IMG_FIELDS
# img2img fields honoured, or without effect here (image_cfg_scale is instruct-pix2pix's, a model this does not run)
_IMG2IMG_HANDLED = {"init_images", "mask", "mask_blur", "mask_blur_x", "mask_blur_y", "inpainting_mask_invert",
                    "include_init_images", "image_cfg_scale", "mask_round", "latent_mask"}
_IMG2IMG_NEUTRAL: dict[str, tuple] = {"resize_mode": (None, 0), "initial_noise_multiplier": (None, 1, 1.0),
                                      "inpaint_full_res_padding": (None, 0)}
# honoured with a mask only as these values: the masked region starts from the original image's latents ("original"),
# and the whole picture is inpainted ("Inpaint area: Whole picture")
_INPAINT_ONLY = {"inpainting_fill": (1,), "inpaint_full_res": (False, 0)}

# Values of unsupported fields that leave a txt2img result unchanged (A1111's option defaults), so a client that
# sends every field with its defaults (most do) sees nothing reported.
_NEUTRAL: dict[str, tuple] = {
    "styles": (None, []), "subseed_strength": (None, 0, 0.0), "restore_faces": (None, False), "tiling": (None, False),
    "s_min_uncond": (None, 0, 0.0), "s_churn": (None, 0, 0.0), "s_tmax": (None, 0, 0.0, float("inf")),
    "s_tmin": (None, 0, 0.0), "s_noise": (None, 1, 1.0), "refiner_checkpoint": (None, "", "None"),
    "disable_extra_networks": (None, False, True), "firstpass_image": (None, ""), "comments": (None, {}),
    "enable_hr": (None, False), "firstphase_width": (None, 0), "firstphase_height": (None, 0),
    "script_name": (None, "", "None"), "script_args": (None, []), "save_images": (None, False),
    "alwayson_scripts": (None, {}), "infotext": (None, ""), "seed_resize_from_h": (None,), "seed_resize_from_w": (None,),
}
# Fields honoured, or without effect on a server that saves nothing and has no progress API.
_HANDLED = {"prompt", "negative_prompt", "seed", "sampler_name", "sampler_index", "scheduler", "batch_size", "n_iter",
            "steps", "cfg_scale", "width", "height", "send_images", "do_not_save_samples", "do_not_save_grid",
            "force_task_id", "override_settings_restore_afterwards", "subseed", "eta", "denoising_strength",
            "override_settings", "refiner_switch_at"}
_HIRES = {"hr_scale", "hr_upscaler", "hr_second_pass_steps", "hr_resize_x", "hr_resize_y", "hr_checkpoint_name",
          "hr_sampler_name", "hr_scheduler", "hr_prompt", "hr_negative_prompt", "denoising_strength"}
_SCHEDULER_SUFFIX = {"karras": " Karras", "exponential": " Exponential"}  # A1111 1.9's separate scheduler field, as
# our combined names spell it


def request_model(img2img: bool = False):
    """The pydantic model of a txt2img (or img2img) body: A1111's fields and types, every one optional, unknown keys
    kept."""
    from pydantic import ConfigDict, Field, create_model

    fields = {name: (Optional[tp], Field(default=default)) for name, tp, default in (IMG2IMG_ALL if img2img else FIELDS)}
    name = "StableDiffusionImg2ImgProcessingAPI" if img2img else "StableDiffusionTxt2ImgProcessingAPI"
    return create_model(name, __config__=ConfigDict(extra="allow"), **fields)


@dataclass(frozen=True)
class Job:
    """One image to draw: what ``Pipeline.__call__`` takes for it."""

    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    cfg_scale: float
    sampler: str
    width: int | None
    height: int | None
    # img2img: the init image and mask as sent (PNG/JPEG/WebP bytes), the strength, the mask blur in pixels
    init_image: bytes | None = None
    mask: bytes | None = None
    strength: float | None = None
    mask_blur: float = 0.0
    invert_mask: bool = False
    round_mask: bool = True  # A1111's mask_round: an alpha mask rounded at 128
    whole_mask: bool = False  # an inpainting UNet without a mask: repaint everything (A1111's conditioning)

    def group_key(self) -> tuple:
        """Jobs with equal keys run as one UNet batch (one ``Pipeline`` call); an image edit runs alone."""
        if self.init_image is not None:
            return ("edit", self.seed, id(self))
        return (self.width, self.height, self.steps, self.sampler, self.cfg_scale)


def sampler_for(body: dict) -> tuple[str, dict]:
    """The sampler name from ``sampler_name`` (or ``sampler_index``) and A1111 1.9's ``scheduler``; what was ignored."""
    from ldm_export.runtime.schedulers import canonical_sampler

    name = canonical_sampler(body.get("sampler_name") or body.get("sampler_index") or "Euler")
    scheduler = body.get("scheduler")
    if scheduler is None or str(scheduler).lower() in ("", "automatic"):
        return name, {}
    from ldm_export.runtime.schedulers import sampler_names

    suffix = _SCHEDULER_SUFFIX.get(str(scheduler).lower())
    if suffix is not None and (name.endswith(suffix) or name + suffix in sampler_names()):
        return (name if name.endswith(suffix) else name + suffix), {}
    # a schedule this sampler does not take here ("Euler a" with Karras: diffusers' ancestral Euler has no Karras
    # sigmas): the plain sampler runs, the schedule reported, as for a schedule we have none of
    return name, {"scheduler": scheduler}


def fitting_sampler(sampler: str, base_config: dict) -> tuple[str, dict]:
    """A sampler the model cannot run (a noise-prediction sampler such as A1111's default "Euler a" on a flow-matching
    SD3/FLUX model) becomes A1111's default "Euler" (which every model runs: on a flow-matching model its flow Euler),
    as Forge runs such a request instead of failing it; the name asked for is reported as ignored. An unknown name
    stays as it is (refused with the known names)."""
    from ldm_export.runtime.schedulers import resolve_scheduler

    try:
        resolve_scheduler(sampler, base_config)
    except LdmExportError as e:
        if "does not fit" not in str(e):
            return sampler, {}
        return "Euler", {"sampler_name": sampler}
    return sampler, {}


def sampling_defaults(body: dict, raw: dict, defaults: dict, distilled_guidance: bool) -> dict:
    """Steps and cfg_scale the client left out are the bundle's (its model's published settings, as `generate` takes
    them: FLUX-schnell 4 steps without guidance, FLUX-dev 28 at 3.5), not A1111's form defaults (50, 7.0). A
    guidance-distilled model (FLUX-dev) takes Forge's ``distilled_cfg_scale`` as its guidance (the bundle's when left
    out, as Forge's 3.5); its ``cfg_scale`` is true CFG in Forge, which it does not run: one other than 1 is returned
    as ignored (webuiapi always sends 7.0, which ran the distilled guidance at twice the model's)."""
    ignored = {}
    if raw.get("steps") is None:
        body["steps"] = int(defaults["steps"])
    if distilled_guidance:
        from ldm_export.runtime.checks import MAX_GUIDANCE

        value = raw.get("distilled_cfg_scale")
        try:  # an extra field (Forge's), which the request model does not type
            guidance = float(defaults["guidance_scale"] if value is None else value)
        except (TypeError, ValueError):
            guidance = None
        if guidance is None or isinstance(value, bool) or not 0 <= guidance <= MAX_GUIDANCE:  # NaN fails too
            raise LdmExportError(f"distilled_cfg_scale must be a number from 0 to {MAX_GUIDANCE:g}, got {value!r} "
                                 f"({float(defaults['guidance_scale']):g} is this model's default)")
        if raw.get("cfg_scale") is not None and body["cfg_scale"] != 1.0:
            ignored["cfg_scale"] = raw["cfg_scale"]
        body["cfg_scale"] = guidance
    elif raw.get("cfg_scale") is None:
        body["cfg_scale"] = float(defaults["guidance_scale"])
    return ignored


def guidance_ignored(body: dict, raw: dict, uses_cfg: bool, takes_guidance: bool) -> dict:
    """What the model's guidance makes of the request, as generate warns it: a negative prompt without CFG (a scale of 1
    or less, or a guidance-distilled FLUX model) and a cfg_scale the client sent to a model that takes none (FLUX.1
    [schnell]) have no effect."""
    out = {}
    if body.get("negative_prompt") and not uses_cfg:
        out["negative_prompt"] = body["negative_prompt"]
    if "cfg_scale" in raw and not takes_guidance:
        out["cfg_scale"] = body["cfg_scale"]
    return out


def ignored_fields(body: dict, sampler: str, model_titles: set[str], img2img: bool = False) -> dict:
    """The request's fields that change A1111's result but not ours (unsupported), with their values."""
    defaults = {name: default for name, _, default in (IMG2IMG_ALL if img2img else FIELDS)}
    out = {}
    for key, value in body.items():
        if img2img and key in _IMG2IMG_HANDLED:
            continue
        if img2img and key in _INPAINT_ONLY:
            if body.get("mask") and value not in _INPAINT_ONLY[key]:
                out[key] = value
            continue
        if img2img and key in _IMG2IMG_NEUTRAL:
            if value not in _IMG2IMG_NEUTRAL[key]:
                out[key] = value
            continue
        if key in _HIRES:  # the hires pass's settings matter only when it is asked for
            if body.get("enable_hr") and value not in (None, defaults[key]):
                out[key] = value
            continue
        if key in _HANDLED:
            continue
        if key not in defaults:  # a field of a newer A1111, an extension or a fork
            if value is not None:
                out[key] = value
            continue
        if key in ("seed_resize_from_h", "seed_resize_from_w"):
            if value is not None and value > 0:
                out[key] = value
        elif value not in _NEUTRAL.get(key, (None,)):
            out[key] = value
    if (body.get("subseed_strength") or 0) != 0:
        out["subseed"] = body.get("subseed")
    eta = body.get("eta")  # our DDIM runs eta 0 and the ancestral samplers eta 1, as A1111's defaults
    if eta is not None and ((sampler == "DDIM" and eta != 0) or (" a " in f" {sampler} " and eta != 1)):
        out["eta"] = eta
    extra = {k: v for k, v in (body.get("override_settings") or {}).items()
             if not (k == "sd_model_checkpoint" and v in model_titles)}
    if extra:
        out["override_settings"] = extra
    return out


def fixed_seed(seed) -> int:
    """A1111's ``get_fixed_seed``: -1 (or none) draws a random seed."""
    if seed is None or seed == -1:
        return int(random.randrange(4294967294))
    return int(seed)


def jobs_for(body: dict, sampler: str, seed, edit: dict | None = None) -> list[list[Job]]:
    """``n_iter`` batches of ``batch_size`` images; image k of the request gets seed + k, as A1111 and ``generate``
    do (the runtime's ``resolve_seed`` and ``image_seeds``: -1 draws a random seed, others are checked). ``edit``:
    img2img's init image, mask and their settings (``edit_fields``), the same for every image (A1111 cycles through
    several init images: image k takes init image k modulo their count)."""
    from ldm_export.runtime.checks import image_seeds, resolve_seed

    batch, n_iter = body.get("batch_size") or 1, body.get("n_iter") or 1
    seeds = iter(image_seeds(resolve_seed(seed), batch * n_iter))
    edit = edit or {}
    inits = edit.pop("init_images", None) or [None]
    count = iter(range(batch * n_iter))
    return [[Job(prompt=body.get("prompt") or "", negative_prompt=body.get("negative_prompt") or "", seed=next(seeds),
                 steps=body["steps"], cfg_scale=float(body["cfg_scale"]), sampler=sampler, width=body.get("width"),
                 height=body.get("height"), init_image=inits[next(count) % len(inits)], **edit)
             for _ in range(batch)] for _ in range(n_iter)]


def upright_size(image) -> tuple[int, int]:
    """An opened image's (width, height) as shown, by its EXIF orientation (5-8 turn it a quarter), not decoding it."""
    w, h = image.size
    try:
        turned = image.getexif().get(0x0112) in (5, 6, 7, 8)
    except Exception:  # damaged EXIF: PIL shows it as stored
        turned = False
    return (h, w) if turned else (w, h)


def decode_image(data: str, field: str, max_pixels: int | None = None) -> bytes:
    """An image field of a request (base64, optionally a ``data:image/...;base64,`` URL) as the file's bytes; a
    one-line error naming the field when it is not base64 of an image PIL reads, or (``max_pixels``) when it is
    larger than that: refused from its header, before its pixels are decoded."""
    import base64
    import binascii
    import io

    from PIL import Image, UnidentifiedImageError

    if not isinstance(data, str) or not data:
        raise LdmExportError(f"{field} must be a base64-encoded image")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=False)
        with Image.open(io.BytesIO(raw)) as image:
            w, h = upright_size(image)
            if max_pixels is not None and w * h > max_pixels:
                raise LdmExportError(f"{field} is {w}x{h}, more pixels than this server takes ({max_pixels}: four "
                                     "times its --max-size); send a smaller image")
            image.load()  # decoded whole: verify() reads no JPEG data, and a cut-off JPEG then failed in the worker
    except (binascii.Error, ValueError, UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        why = "" if isinstance(e, UnidentifiedImageError) else " ".join(str(e).split())[:80]  # its text: an address
        raise LdmExportError(f"{field} is not a base64-encoded image PIL can read ({type(e).__name__}"
                             f"{': ' + why if why else ''}); send a whole PNG, JPEG or WebP") from None
    return raw


def open_upright(raw: bytes):
    """A request's image as A1111's API reads one (``images.read``: turned upright by its EXIF orientation, as a
    phone's JPEG is shown)."""
    import io

    from PIL import Image, ImageOps

    return ImageOps.exif_transpose(Image.open(io.BytesIO(raw)))


# the command line's options, named in Pipeline's messages, as the API fields that set the same thing
_API_FIELDS = ((r"--size (\d+)x(\d+)", r"width \1 and height \2"), (r"pass --size\b", "send width and height"),
               (r"--size\b", "width and height"), (r"--steps\b", "steps"), (r"\ba strength of", "a denoising_strength of"),
               (r"--strength\b", "denoising_strength"), (r"--mask-blur\b", "mask_blur"), (r"--guidance\b", "cfg_scale"),
               (r"--num-images\b", "n_iter"), (r"--sampler\b", "sampler_name"), (r"--negative-prompt\b", "negative_prompt"),
               (r"--init-image\b", "init_images"), (r"--mask\b", "mask"), (r"--seed\b", "seed"))


def api_message(message: str) -> str:
    """A message of the runtime as an API client reads it: the command-line options it names are the request's
    fields ("use --steps 20 or more" -> "use steps 20 or more"), which a client can change."""
    import re

    for pattern, field in _API_FIELDS:
        message = re.sub(pattern, field, message)
    # the runtime lists every name it knows (thousands of characters); the API has a route for them
    return re.sub(r"^unknown sampler ('.*?'); known: .*$", r"unknown sampler_name \1; GET /sdapi/v1/samplers lists the "
                  "names this server runs", message)


def edit_fields(body: dict, whole_mask: bool = False, max_pixels: int | None = None) -> dict:
    """img2img's inputs as ``Job`` fields: the init images and mask decoded, the strength, the mask blur (A1111's
    ``mask_blur`` sets both axes; ours is one radius, the larger), the inversion and rounding; ``whole_mask``: the
    bundle's UNet is an inpainting one, which repaints the whole image when no mask is sent."""
    inits = body.get("init_images") or []
    if not inits:
        raise LdmExportError("init_images must hold at least one base64-encoded image")
    images = [decode_image(x, f"init_images[{k}]", max_pixels) for k, x in enumerate(inits)]
    mask = decode_image(body["mask"], "mask", max_pixels) if body.get("mask") else None
    strength = body.get("denoising_strength")
    strength = 0.75 if strength is None else float(strength)
    if not 0.0 < strength <= 1.0:  # NaN fails too
        raise LdmExportError(f"denoising_strength must be more than 0 and at most 1, got {strength} (at 0 nothing would "
                             "change: the result is the init image)")
    blur = body.get("mask_blur")
    if blur is None:
        blur = max(body.get("mask_blur_x") or 0, body.get("mask_blur_y") or 0)
    return {"init_images": images, "mask": mask, "strength": strength,
            "mask_blur": float(blur) if mask is not None else 0.0,
            "invert_mask": bool(body.get("inpainting_mask_invert")) and mask is not None,
            "round_mask": body.get("mask_round") is not False, "whole_mask": whole_mask and mask is None}


def check_limits(body: dict, max_images: int, max_side: tuple[int, int], what: str = "") -> None:
    """The server's own limits on a request: images per request and image size (``--max-images``, ``--max-size``)."""
    batch, n_iter = body.get("batch_size"), body.get("n_iter")
    for name, value in (("batch_size", batch), ("n_iter", n_iter)):
        if value is not None and value < 1:
            raise LdmExportError(f"{name} must be at least 1, got {value}")
    total = (batch or 1) * (n_iter or 1)
    if total > max_images:
        raise LdmExportError(f"batch_size × n_iter = {total} images is more than this server's --max-images "
                             f"{max_images}; send fewer images per request")
    for name, value, limit in (("width", body.get("width"), max_side[0]), ("height", body.get("height"), max_side[1])):
        if value is not None and value > limit:
            raise LdmExportError(f"{what}{name} {value} is larger than this server's --max-size {max_side[0]}x{max_side[1]}")


def info_json(body: dict, jobs: list[Job], infotexts: list[str], model_name: str, model_hash: str,
              width: int, height: int, extra: dict, inpainting: bool = False, recorded: dict | None = None) -> str:
    """The response's ``info``: ``Processed.js()`` of stable-diffusion-webui (``modules/processing.py``).
    ``recorded``: the CFG scale, negative prompt and extra fields that the first image's parameters say drew it
    (FLUX-dev: CFG 1 and its Distilled CFG Scale; no negative prompt where none acted)."""
    first = jobs[0]
    recorded = recorded or {}
    subseed = fixed_seed(body.get("subseed"))
    obj = {
        "prompt": first.prompt, "all_prompts": [j.prompt for j in jobs],
        "negative_prompt": recorded.get("negative_prompt", first.negative_prompt),
        "all_negative_prompts": [recorded.get("negative_prompt", j.negative_prompt) for j in jobs],
        "seed": first.seed, "all_seeds": [j.seed for j in jobs],
        "subseed": subseed, "all_subseeds": [subseed + k for k in range(len(jobs))],
        "subseed_strength": body.get("subseed_strength") or 0, "width": width, "height": height,
        "sampler_name": first.sampler, "cfg_scale": recorded.get("cfg_scale", first.cfg_scale), "steps": first.steps,
        "batch_size": body.get("batch_size") or 1, "restore_faces": body.get("restore_faces"),
        "face_restoration_model": None, "sd_model_name": model_name, "sd_model_hash": model_hash,
        "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": body.get("seed_resize_from_w", -1),
        "seed_resize_from_h": body.get("seed_resize_from_h", -1), "denoising_strength": body.get("denoising_strength"),
        "extra_generation_params": recorded.get("extra", {}), "index_of_first_image": 0, "infotexts": infotexts,
        "styles": body.get("styles") or [], "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": 1,
        "is_using_inpainting_conditioning": inpainting, "version": "ldm-export",
        "ldm_export": extra,
    }
    return json.dumps(obj)
