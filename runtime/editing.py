"""Image-to-image and inpainting: the text-to-image sampler loop started from encoded latents at a later step.

Semantics are diffusers' (``StableDiffusionImg2ImgPipeline``, ``StableDiffusionInpaintPipeline`` and their SDXL
versions), for every sampler alike:

* ``strength`` picks the first step: ``t_start = n - min(int(n * strength), n)`` (``get_timesteps``); the sampler
  runs the steps from ``t_start`` on, over the schedule of all ``n`` steps.
* The encoded image latents are noised to the first step's level with the scheduler's ``add_noise``
  (k-diffusion samplers: ``x0 + sigma * noise``; DDIM/DDPM/PLMS/LCM: ``sqrt(a) x0 + sqrt(1 - a) noise``;
  flow matching: ``sigma * noise + (1 - sigma) x0``).
* Inpainting with an ordinary (4-channel) UNet blends after every step: outside the mask the latents are
  replaced by the image latents noised to the next step's level (the original latents after the last step).
  9-channel inpainting UNets get the mask and the masked image's latents as extra input channels instead.
* The decoded image keeps the original pixels outside the (blurred) mask, as AUTOMATIC1111 pastes them back.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any
import numpy as np

from . import samplers as S
from .errors import LdmExportError

log = logging.getLogger(__name__)

ALPHA_CLASSES = ("DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LCMScheduler")


def is_inpainting_unet(denoiser_spec, latent_channels: int) -> bool:
    """Whether a denoiser (its ComponentSpec) is a 9-channel inpainting UNet: its sample input takes the latents, the
    mask and the masked image's latents (2C + 1 channels)."""
    shape = denoiser_spec.inputs[0].shape
    return len(shape) == 4 and isinstance(shape[1], int) and shape[1] == 2 * int(latent_channels) + 1


def check_strength(strength) -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float, np.floating)) or not 0 < strength <= 1:
        raise LdmExportError(f"strength must be a number in (0, 1] (1 repaints everything), got {strength!r}")
    return float(strength)


def start_step(num_inference_steps: int, strength: float) -> int:
    """diffusers' ``get_timesteps``: the index of the first step that runs for ``strength``."""
    init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
    return max(num_inference_steps - init_timestep, 0)


def edit_plan(scheduler_config: dict, num_inference_steps: int, strength: float):
    """The schedule of ``num_inference_steps`` steps, cut to the steps ``strength`` runs; returns (plan, t_start)."""
    t_start = start_step(num_inference_steps, check_strength(strength))
    if t_start >= num_inference_steps:
        # the least steps, and the least strength (to 3 decimals), for which int(steps * strength) >= 1
        steps = math.ceil(1.0 / strength)
        steps += int(steps * strength) < 1
        from .pipeline import MAX_STEPS

        if steps > MAX_STEPS:  # no step count the runtime takes can run it
            raise LdmExportError(f"strength {strength:g} runs no step even at {MAX_STEPS} steps (it runs int(steps x "
                                 f"strength) of them); use a strength of at least {1 / MAX_STEPS:g}")
        least = math.ceil(1000 / num_inference_steps) / 1000
        least = min(1.0, least + 0.001 * (int(num_inference_steps * least) < 1))
        raise LdmExportError(f"strength {strength:g} with {num_inference_steps} step{'s' * (num_inference_steps > 1)} "
                             f"runs no step (it runs int(steps x strength) of them); use --steps {steps} or more, or "
                             f"a strength of at least {least:g}")
    return plan_range(scheduler_config, num_inference_steps, t_start), t_start


def plan_range(scheduler_config: dict, num_inference_steps: int, start: int = 0, stop: int | None = None):
    """The plan of steps ``start`` to ``stop`` (exclusive) of the ``num_inference_steps`` schedule, as diffusers runs
    them after ``set_begin_index(start)`` (image-to-image, a refiner's ``denoising_start``) or with the timesteps cut
    at ``stop`` (a base model's ``denoising_end``)."""
    from .schedulers import build_plan

    plan = build_plan(scheduler_config, num_inference_steps)
    evals = len(plan.timesteps)  # PLMS evaluates once more than it has steps
    stop = evals if stop is None else stop
    if not 0 <= start < stop <= evals:
        raise LdmExportError(f"steps {start} to {stop} are not a range of the {num_inference_steps}-step schedule")
    if start == 0 and stop == evals:
        return plan
    options = dict(plan.options)
    cut_end = stop < evals
    if plan.class_name == "LMSDiscreteScheduler":  # LMS's order depends on the absolute index (see sample_lms)
        options["start"] = start
        return dataclasses.replace(plan, timesteps=plan.timesteps[:stop], options=options)
    for key in ("alphas_cumprod_prev", "alphas_cumprod_from"):
        if key in options:
            options[key] = np.asarray(options[key])[start:stop]
    if plan.class_name == "PNDMScheduler":
        options.update(_plms_targets(scheduler_config, num_inference_steps, plan.timesteps[start:stop]))
    if plan.class_name == "DPMSolverSinglestepScheduler":
        options.update(skipped=start, total=num_inference_steps)
    if plan.class_name == "DPMSolverMultistepScheduler":
        # diffusers tests `len(timesteps) < 15` and the last index on the whole schedule, not on the steps that run
        if num_inference_steps >= 15 or cut_end:
            options["lower_order_final"] = False
        if cut_end:
            options["euler_at_final"] = False
    if plan.class_name == "UniPCMultistepScheduler" and cut_end:
        options["lower_order_final"] = False
    if plan.class_name == "LCMScheduler" and cut_end:  # diffusers noises every step but the whole schedule's last
        options["renoise_last"] = True
    if plan.class_name == "HeunDiscreteScheduler" and cut_end:  # its last step's second evaluation would be past the cut
        options["euler_at_cut"] = True
    return dataclasses.replace(plan, levels=plan.levels[start:stop + 1], timesteps=plan.timesteps[start:stop],
                               options=options)


def cutoff_step(scheduler_config: dict, num_inference_steps: int, denoising_split: float) -> int:
    """Where a base model hands off to a refiner (diffusers' ``denoising_end`` / ``denoising_start``): the number of
    timesteps at or above ``round(T - split * T)``."""
    from .schedulers import build_plan

    if not 0.0 < denoising_split < 1.0:
        raise LdmExportError(f"the refiner's start must lie strictly between 0 and 1, got {denoising_split}")
    plan = build_plan(scheduler_config, num_inference_steps)
    T = int(scheduler_config.get("num_train_timesteps", 1000))
    cutoff = int(round(T - denoising_split * T))
    stop = int(np.sum(plan.timesteps >= cutoff))
    if not 0 < stop < len(plan.timesteps):
        raise LdmExportError(f"a hand-off at {denoising_split} with {num_inference_steps} steps leaves one model no "
                             "step; use more steps or another --refiner-start")
    return stop


def to_sampler_space(plan, x: np.ndarray, index: int = 0) -> np.ndarray:
    """diffusers' latents at level ``index`` -> the sampler's (DPM++/UniPC keep diffusers' variance-preserving
    latents but step in k-diffusion scaling)."""
    return x * math.sqrt(1.0 + plan.levels[index] ** 2) if plan.vp_io else x


def from_sampler_space(plan, x: np.ndarray, index: int = -1) -> np.ndarray:
    return x / math.sqrt(1.0 + plan.levels[index] ** 2) if plan.vp_io else x


def run_plan(model, x: np.ndarray, plan, noise: S.NoiseFn | None = None, on_step=None, half_step=None) -> np.ndarray:
    """Run ``plan``'s sampler from ``x`` (sampler space); ``on_step(i, n, x)`` may return a replacement for x;
    ``half_step(i, x)`` for the intermediate sample of a two-evaluation step (Heun, DPM2), where the sampler has one."""
    denoiser = S.FlowDenoiser(model, **plan.denoiser_kwargs) if plan.flow else S.Denoiser(model, **plan.denoiser_kwargs)
    extra = {"half_step": half_step} if half_step is not None and plan.class_name in TWO_EVALUATIONS else {}
    return plan.sampler(denoiser, x, plan.levels, plan.timesteps, noise=noise or S.default_noise(0), callback=on_step,
                        **plan.options, **extra)


# the samplers whose steps take two model calls, which diffusers' loop sees (and an inpainting blend follows) one by one
TWO_EVALUATIONS = ("HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler")


def sample_range(model, latents: np.ndarray, scheduler_config: dict, num_inference_steps: int, start: int = 0,
                 stop: int | None = None, noise: S.NoiseFn | None = None, callback=None,
                 initial_noise: bool = False) -> np.ndarray:
    """Steps ``start`` to ``stop`` of the schedule from ``latents`` as diffusers has them at step ``start`` (a
    refiner continuing a base model's latents), or from standard-normal ``latents`` with ``initial_noise`` (a base
    model's text-to-image start); returns diffusers' latents after step ``stop``."""
    plan = plan_range(scheduler_config, num_inference_steps, start, stop)
    x = np.asarray(latents, dtype=np.float64)
    x = x * plan.init_noise_sigma if initial_noise else x
    x = to_sampler_space(plan, x, 0)

    def on_step(i, n, x_k):
        if callback is not None:
            callback(i, n, from_sampler_space(plan, x_k, i + 1))

    return from_sampler_space(plan, run_plan(model, x, plan, noise, on_step), -1)


def _plms_targets(scheduler_config: dict, n: int, timesteps: np.ndarray) -> dict:
    """PNDM's from/to alphas over a cut schedule: its warm-up (evaluation 1 goes from t + T//n to t) restarts."""
    from . import schedules as sch
    from .schedulers import _merged_config

    _, c = _merged_config(scheduler_config)
    alphas_cumprod = sch.alphas_cumprod_from_config(c)
    final = 1.0 if c.get("set_alpha_to_one", True) else float(alphas_cumprod[0])
    r = c["num_train_timesteps"] // n

    def alpha(t: int) -> float:
        return float(alphas_cumprod[t]) if t >= 0 else final

    ts = [int(t) for t in timesteps]
    return {"alphas_cumprod_from": np.array([alpha(t + (r if k == 1 else 0)) for k, t in enumerate(ts)]),
            "alphas_cumprod_prev": np.array([alpha(t - (0 if k == 1 else r)) for k, t in enumerate(ts)])}


def is_alpha(plan) -> bool:
    return plan.class_name in ALPHA_CLASSES


def noised(plan, index: int, image_latents: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """``image_latents`` noised to level ``index`` of ``plan``, in the sampler's own space (scheduler.add_noise)."""
    level = float(plan.levels[index])
    if is_alpha(plan):
        return math.sqrt(level) * image_latents + math.sqrt(1.0 - level) * noise
    if plan.flow:
        return level * noise + (1.0 - level) * image_latents
    return image_latents + level * noise  # k-diffusion space (DPM++/UniPC work in it too: vp_io)


def sample_edit(model, image_latents: np.ndarray, noise_latents: np.ndarray, scheduler_config: dict,
                num_inference_steps: int, strength: float = 1.0, noise: S.NoiseFn | None = None,
                callback=None, latent_mask: np.ndarray | None = None, pure_noise_at_full_strength: bool = False):
    """Run the sampler from ``image_latents`` (B, C, h, w) noised with ``noise_latents`` to the step ``strength``
    picks; with ``latent_mask`` (B or 1, 1, h, w; 1 = repaint) blend the known latents back after every step.

    ``pure_noise_at_full_strength``: at strength 1 start from noise alone (diffusers' inpainting pipelines);
    the image-to-image pipelines noise the image latents even then. Returns latents as diffusers' pipelines have
    them after the loop."""
    plan, t_start = edit_plan(scheduler_config, num_inference_steps, strength)
    x0 = np.asarray(image_latents, dtype=np.float64)
    eps = np.asarray(noise_latents, dtype=np.float64)
    if x0.shape != eps.shape:
        raise LdmExportError(f"noise latents {eps.shape} do not match the image latents {x0.shape}")
    if pure_noise_at_full_strength and t_start == 0:
        x = eps * plan.init_noise_sigma
        if plan.vp_io:
            x = x * math.sqrt(1.0 + plan.levels[0] ** 2)
    else:
        x = noised(plan, plan.options.get("start", 0), x0, eps)
    first = plan.options.get("start", 0)  # LMS keeps the whole schedule and starts inside it

    def blend(x_k: np.ndarray, known: np.ndarray) -> np.ndarray:  # the known latents outside the mask
        return (1.0 - latent_mask) * known + latent_mask * x_k

    def on_step(i: int, n: int, x_k: np.ndarray):
        if latent_mask is not None:
            # diffusers: the image latents noised to the next timestep; after the last step, the latents themselves
            x_k = blend(x_k, x0 if i == n - 1 else noised(plan, first + i + 1, x0, eps))
        if callback is not None:
            callback(i, n, from_sampler_space(plan, x_k, first + i + 1))
        return x_k

    def half_step(i: int, x_2: np.ndarray):  # diffusers blends after the first call too, to the same next level
        return blend(x_2, noised(plan, first + i + 1, x0, eps))

    log.debug("edit: %s from step %d of %d (strength %s)", plan.class_name, t_start, num_inference_steps, strength)
    x = run_plan(model, x, plan, noise, on_step, half_step if latent_mask is not None else None)
    return from_sampler_space(plan, x, -1)


# ---------------------------------------------------------------------------------------------------- images


def load_init_image(path: str | Path, width: int | None, height: int | None, multiple: int):
    """The init image as (1, 3, H, W) float32 in [-1, 1] and the PIL image; refuse non-RGB images, resize (with a
    warning) to ``width`` x ``height`` when given and different, refuse sizes that are not multiples of ``multiple``."""
    return fit_init_image(_open(path, "init image"), path, width, height, multiple)


def fit_init_image(image, path, width: int | None, height: int | None, multiple: int):
    """:func:`load_init_image` for an opened image."""
    from PIL import Image

    if image.mode != "RGB":
        what = {"L": "grayscale", "LA": "grayscale with alpha", "RGBA": "RGBA (with alpha)", "P": "a palette image",
                "1": "black-and-white", "CMYK": "CMYK", "I;16": "16-bit grayscale", "I;16B": "16-bit grayscale",
                "I;16L": "16-bit grayscale", "I": "32-bit grayscale", "F": "floating-point grayscale",
                "PA": "a palette image with alpha"}.get(image.mode, f"mode {image.mode}")
        raise LdmExportError(f"init image {path} is {what}; save it as an RGB image (flatten any alpha) and retry")
    if (width, height) != (None, None):
        w, h = width or image.width, height or image.height
        if (w, h) != image.size:
            log.warning("init image %s is %dx%d; resizing it to %dx%d", path, image.width, image.height, w, h)
            image = image.resize((w, h), Image.LANCZOS)
    if image.width % multiple or image.height % multiple:
        raise LdmExportError(f"init image {path} is {image.width}x{image.height}; width and height must be multiples "
                             f"of {multiple}: resize or crop it, or pass --size")
    return image_to_array(image), image


def image_to_array(image) -> np.ndarray:
    """PIL RGB image -> (1, 3, H, W) float32 in [-1, 1] (diffusers' VaeImageProcessor.preprocess)."""
    a = np.asarray(image, dtype=np.float32) / 255.0
    return (a.transpose(2, 0, 1)[None] * 2.0 - 1.0).astype(np.float32)


def load_mask(path: str | Path, size: tuple[int, int], blur: float = 0.0,
              image_size: tuple[int, int] | None = None) -> np.ndarray:
    """The mask (white = repaint) as (H, W) float32 in [0, 1], blurred by ``blur`` pixels (Gaussian, radius as
    A1111's mask blur); a mask of the init image's own size ``image_size`` is resized with it to ``size`` (with a
    warning); refuse a mask of another size, and one with nothing to repaint."""
    from PIL import Image

    image = _open(path, "mask")
    gray = mask_grayscale(image)
    if gray.size != tuple(size) and image_size is not None and gray.size == tuple(image_size):
        log.warning("mask %s is %dx%d, the init image's size; resizing it with the image to %dx%d", path, gray.width,
                    gray.height, *size)
        hard = set(np.unique(np.asarray(gray)).tolist()) <= {0, 255}  # a hard edge stays hard (no resampling ring)
        gray = gray.resize(tuple(size), Image.NEAREST if hard else Image.LANCZOS)
    if gray.size != tuple(size):
        raise LdmExportError(f"mask {path} is {gray.width}x{gray.height} but the image is {size[0]}x{size[1]}; "
                             "give a mask of the image's size")
    if not (np.asarray(gray) >= 128).any():  # diffusers binarises at 0.5
        top = 255 if transparency(image) is not None else _white_level(image)  # in the file's own levels
        raise LdmExportError(f"mask {path} has no pixel of {(top + 1) // 2} or more of {top} (white = repaint), so "
                             f"nothing would be repainted; paint the region white (a mask of 0 and 1 must be saved "
                             f"as 0 and {top})")
    return mask_array(gray, blur)


def has_alpha(image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)


def transparency(image):
    """The alpha channel (mode L) of an image that has transparent pixels, else None (no alpha, or all opaque)."""
    if not has_alpha(image):
        return None
    alpha = image.convert("RGBA").getchannel("A")
    return alpha if alpha.getextrema()[0] < 255 else None


def mask_grayscale(image):
    """A mask image as A1111 reads one, as mode L: by its alpha where it has transparency (opaque = repaint, as a
    painted stroke), else by its grey levels (palette and colour images converted, 16-bit scaled)."""
    alpha = transparency(image)
    if alpha is not None:
        return alpha
    if has_alpha(image):
        image = image.convert("RGBA").convert("RGB")  # fully opaque: the grey levels
    return _grayscale(image)


def _grayscale(image):
    """A mask image as mode L. 16-bit masks (PNG: I;16, or I in older Pillow) scale 0..65535 to 0..255; PIL's own
    conversion clips them at 255, which turns every grey above 255/65535 white."""
    from PIL import Image

    if image.mode.startswith("I"):
        a = np.asarray(image, dtype=np.float64)
        return Image.fromarray(np.clip(np.rint(a * (255.0 / _white_level(image))), 0, 255).astype(np.uint8), "L")
    return image.convert("L")


def _white_level(image) -> int:
    """White in a grey image's own levels: 65535 for 16-bit (PNG I;16, or mode I holding values past 255), else 255
    (mode I keeps 8-bit values as int32)."""
    if image.mode.startswith("I") and (image.mode.startswith("I;16") or np.asarray(image).max() > 255):
        return 65535
    return 255


def mask_array(mask_image, blur: float = 0.0) -> np.ndarray:
    from PIL import ImageFilter

    if not math.isfinite(blur) or blur < 0:
        raise LdmExportError(f"mask blur must be a finite number of pixels, 0 or more, got {blur}")
    if blur:
        mask_image = mask_image.filter(ImageFilter.GaussianBlur(blur))
    return np.asarray(mask_image, dtype=np.float32) / 255.0


def latent_mask(mask: np.ndarray, factor: int) -> np.ndarray:
    """(H, W) mask -> (1, 1, H/f, W/f) binary latent mask: binarised at 0.5 (diffusers' mask processor), then
    nearest-neighbour downsampling as ``torch.nn.functional.interpolate`` does (pixel f*i of each row/column)."""
    binary = (mask >= 0.5).astype(np.float32)
    return binary[::factor, ::factor][None, None]


def masked_image(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image with the repainted region zeroed (grey), as diffusers feeds 9-channel inpainting UNets."""
    return (image * (mask < 0.5)[None, None]).astype(np.float32)


def paste_back(original, generated, mask: np.ndarray):
    """Keep the original pixels where the (blurred) mask is 0 exactly and blend elsewhere as A1111's overlay does:
    by twice the mask's level (its ``mask_for_overlay`` is ``clip(2 * mask)``), so a level of 0.5 or more is wholly
    the generated pixel and the original does not bleed into the repainted side of a blurred edge."""
    from PIL import Image

    orig = np.asarray(original.convert("RGB"), dtype=np.float32)
    gen = np.asarray(generated.convert("RGB"), dtype=np.float32)
    m = mask[..., None]
    m2 = np.clip(2.0 * m, 0.0, 1.0)
    out = np.where(m == 0, orig, np.clip(np.rint(orig * (1.0 - m2) + gen * m2), 0, 255)).astype(np.uint8)
    result = Image.fromarray(out)
    result.info.update(generated.info)
    return result


def _open(path, what: str):
    from PIL import Image, UnidentifiedImageError

    if isinstance(path, Image.Image):
        return path
    from PIL import ImageOps

    try:
        image = Image.open(path)
        image.load()
    except FileNotFoundError:
        raise LdmExportError(f"{what} {path} does not exist") from None
    except Image.DecompressionBombError as e:  # not an OSError: it escaped as a traceback
        raise LdmExportError(f"{what} {path} is too large to read ({str(e).rstrip('.')}); shrink it to the size to "
                             "generate") from None
    except (UnidentifiedImageError, OSError) as e:
        raise LdmExportError(f"cannot read {what} {path} as an image ({e}); give a PNG or JPEG") from None
    # an animation (GIF, APNG, WebP) is read as its first frame, as diffusers' load_image does; a phone's MPO photo
    # holds more frames too (previews, depth), not an animation
    if getattr(image, "is_animated", False) and image.format in ("GIF", "PNG", "WEBP"):
        log.warning("%s %s is an animation of %d frames; using its first frame", what, path, image.n_frames)
    # upright as viewers show it (cameras store the turn in EXIF), as diffusers' load_image and A1111 read images
    return ImageOps.exif_transpose(image)



@dataclass
class EditInputs:
    """An editing request's image, its latents and mask, checked and ready for the sampler loop."""

    image: Any  # PIL RGB image at the output size (what the paste-back keeps)
    latents: np.ndarray  # (1, C, h, w) the image's latents in the model's format
    strength: float
    mask: np.ndarray | None = None  # (H, W) in [0, 1], blurred; 1 = repaint
    blend_mask: np.ndarray | None = None  # (1, 1, h, w) binary, for latent blending (4-channel UNets)
    unet_channels: np.ndarray | None = None  # (1, 1 + C, h, w) mask and masked-image latents (9-channel UNets)

    @property
    def width(self) -> int:
        return self.image.width

    @property
    def height(self) -> int:
        return self.image.height

    @classmethod
    def load(cls, pipe, init_image, strength: float, mask_image, mask_blur: float, width, height,
             inpaint_unet: bool, check_size=None) -> "EditInputs":
        """``check_size(width, height)``: the request's size checks, run on the image's size before it is encoded."""
        multiple = pipe.family.size_multiple(pipe.bundle.module_configs)
        source = _open(init_image, "init image")
        pixels, image = fit_init_image(source, init_image, width, height, multiple)
        mask = None if mask_image is None else load_mask(mask_image, image.size, mask_blur, image_size=source.size)
        if check_size is not None:
            check_size(image.width, image.height)
        latents = pipe.encode_image(pixels)
        if mask is None:
            return cls(image, latents, strength)
        lmask = latent_mask(mask, pipe.vae_scale_factor)
        if not lmask.any():  # a blur only shrinks what stays at or above the latents' 0.5 threshold
            sharp = mask_blur and latent_mask(load_mask(mask_image, image.size, 0.0, image_size=source.size),
                                              pipe.vae_scale_factor).any()
            if sharp:  # the region is wide enough: the blur alone keeps every latent pixel under half white
                log.warning("mask %s: blurred by %g px, its white region is under half white at every point of the "
                            "latent grid (every %d px), so the model repaints nothing there; lower --mask-blur",
                            mask_image, mask_blur, pipe.vae_scale_factor)
            else:
                log.warning("mask %s: its white region misses the latent grid (every %d px), so the model repaints "
                            "nothing there; widen the region to %d px or more", mask_image, pipe.vae_scale_factor,
                            pipe.vae_scale_factor)
        if not inpaint_unet:
            return cls(image, latents, strength, mask, blend_mask=lmask)
        masked = pipe.encode_image(masked_image(pixels, mask))  # diffusers: the image with the masked region zeroed
        return cls(image, latents, strength, mask, unet_channels=np.concatenate([lmask, masked], axis=1))

    def with_unet_channels(self, cond):
        """``cond`` with the inpainting UNet's extra input channels for each of its rows."""
        from .families.base import INPAINT, Conditioning

        return Conditioning(cond.context, cond.pooled,
                            {**cond.extras, INPAINT: np.repeat(self.unet_channels, cond.batch, axis=0)})
