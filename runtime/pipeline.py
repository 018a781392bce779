"""Text-to-image from a bundle: tokenizer -> text encoder -> sampler loop with CFG -> VAE decoder -> PIL images."""
from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from . import checks
from .bundle import Bundle
from .engine import Engine, OrtEngine
from .errors import LdmExportError, all_finite, overflow_message
from .families import Conditioning, get_family
from .spec import ComponentSpec

log = logging.getLogger(__name__)

# half of SD's 1000 training timesteps: past it some samplers index beyond the table (DDIM, DDPM and PLMS with SD's
# steps_offset at 1000 steps, as diffusers' do) or divide by zero (DPM++ 2M, UniPC); A1111's own slider stops at 150
MAX_STEPS = 500
CFG_MODES = ("batch2", "sequential")
DYNAMIC_BATCH = 4  # images per batch on a dynamic-shape bundle: memory stays bounded for any --num-images
# cuDNN's convolution algorithm search on the CUDA engines; the first-image measurement on an H200
# (tools/gpu/first_image.sh) decides it
DEFAULT_CUDNN_SEARCH = "HEURISTIC"
GPU_MEMORY_CEILING = 192 * 2**30  # no GPU holds more (B200); ONNX Runtime does not say a device's memory


def _static_batch(spec: ComponentSpec, batched: Sequence[str]) -> int | None:
    """The batch size a static-shape spec fixes on its batched inputs (None where the batch is free)."""
    return next((t.shape[0] for t in spec.inputs if t.name in batched and t.shape and isinstance(t.shape[0], int)), None)


def run_batched(engine: Engine, feeds: Mapping[str, np.ndarray], batched: Sequence[str]) -> dict[str, np.ndarray]:
    """Run ``engine`` on ``feeds``, splitting/padding the inputs named in ``batched`` along axis 0 when the
    engine's spec fixes the batch size (static-shape builds); cast float feeds to the spec's dtypes."""
    spec = engine.spec
    typed = {t.name: np.asarray(feeds[t.name]).astype(t.dtype, copy=False) for t in spec.inputs}
    fixed = _static_batch(spec, batched)
    n = next(typed[b].shape[0] for b in batched)
    if fixed is None or fixed == n:
        return engine.run(typed)
    chunks = []
    for start in range(0, n, fixed):
        part = {}
        for k, v in typed.items():
            if k in batched:
                piece = v[start:start + fixed]
                if piece.shape[0] < fixed:  # pad the last chunk by repeating its last row
                    piece = np.concatenate([piece, np.repeat(piece[-1:], fixed - piece.shape[0], axis=0)])
                part[k] = piece
            else:
                part[k] = v
        chunks.append((min(fixed, n - start), engine.run(part)))
    return {k: np.concatenate([out[k][:m] for m, out in chunks]) for k in chunks[0][1]}


def _run_in_slots(engine, feeds: Mapping[str, np.ndarray], batched: Sequence[str],
                  step_inputs: Sequence[str] | None) -> dict[str, np.ndarray] | None:
    """A static engine that keeps its inputs on the device (``run_partial``): each chunk of its static batch in a
    slot of its own (chunk k in slot k), and with ``step_inputs`` (the engine holds this conditioning from the last
    call) only those are cast and copied. So a batch-1 engine that runs CFG as two calls keeps the negative's and
    the prompt's embeddings on the device, each in its slot, as a batch-2 engine keeps both in one. None where the
    feeds' batch is not a whole number of the engine's chunks within its slots (then: ``run_batched``)."""
    inputs = {t.name: t for t in engine.spec.inputs}
    fixed = _static_batch(engine.spec, batched)
    if fixed is None or fixed < 1:
        return None
    n = np.shape(feeds[batched[0]])[0]
    chunks, rest = divmod(n, fixed)
    slots = getattr(engine, "max_slots", 1)
    if rest or not 1 <= chunks <= slots:
        return None
    names = list(step_inputs) if step_inputs is not None else list(inputs)
    typed = {k: np.asarray(feeds[k]).astype(inputs[k].dtype, copy=False) for k in names}
    outs = []
    for k in range(chunks):
        part = {name: (a[k * fixed:(k + 1) * fixed] if name in batched else a) for name, a in typed.items()}
        if step_inputs is None:  # every input: the checks engine.run makes (names, dtypes, shapes)
            engine.spec.check_feeds(part)
        outs.append(engine.run_partial(part, slot=k) if k else engine.run_partial(part))
    if chunks == 1:
        return outs[0]
    return {name: np.concatenate([o[name] for o in outs]) for name in outs[0]}


def check_finite(component: str, outputs: Mapping[str, np.ndarray], where: str = "", precision: str | None = None) -> None:
    """Refuse NaN/Inf in ``component``'s outputs, with the fix that fits its ``precision`` (the bundle's)."""
    for name, a in outputs.items():
        if not all_finite(a):
            bad = "NaN" if np.isnan(a).any() else "Inf"
            raise LdmExportError(f"{component} produced {bad} in '{name}'{where}; " + overflow_message(component, precision))


class Pipeline:
    """Stable Diffusion text-to-image over a bundle's engines, numpy only."""

    def __init__(self, bundle: Bundle, engines: Mapping[str, Engine], tokenizer=None, cfg_mode: str = "batch2"):
        if cfg_mode not in CFG_MODES:
            raise LdmExportError(f"unknown cfg mode '{cfg_mode}'; choose one of: {', '.join(CFG_MODES)}")
        self.bundle = bundle
        self.engines = dict(engines)
        model = bundle.model
        self.family = get_family(model.get("family", "sd1"))
        # one tokenizer per text encoder, from the bundle's folders (``tokenizer`` replaces the first)
        self.tokenizers = {name: self.family.load_tokenizer(bundle, name) if k or tokenizer is None else tokenizer
                           for k, name in enumerate(self.family.tokenizers)}
        self.tokenizer = self.tokenizers[self.family.tokenizers[0]]
        self.cfg_mode = cfg_mode
        self.low_memory = False
        self.latent_format = self.family.latent_format(bundle.module_configs)
        self.latent_scale = self.latent_format.scale
        self.vae_scale_factor = self.latent_format.vae_scale_factor
        self.latent_channels = self.latent_format.channels
        self.resolution = int(model["resolution"])

    @classmethod
    def from_bundle(cls, path: str | Path, provider: str = "cpu", verify: bool = False, threads: int | None = None,
                    cfg_mode: str = "batch2", cudnn_search: str | None = None, low_memory: bool = False) -> "Pipeline":
        """Open a bundle and create one engine per component (``provider``: cpu, cuda or tensorrt); ``cudnn_search``
        picks cuDNN's convolution algorithm search on cuda (see ``cudnn_search``). ``low_memory``: one component in
        memory at a time, sequential CFG, tiled VAE decode (runtime/lowmem.py)."""
        if cfg_mode not in CFG_MODES:  # before the engines load
            raise LdmExportError(f"unknown cfg mode '{cfg_mode}'; choose one of: {', '.join(CFG_MODES)}")
        search = resolve_cudnn_search(cudnn_search)
        threads = checks.cap_threads(threads)
        bundle = Bundle.open(path, verify=verify)
        if low_memory:
            from .lowmem import low_memory_engines

            pipe = cls(bundle, low_memory_engines(bundle, provider, threads), cfg_mode="sequential")
            pipe.low_memory = True  # one image per batch: each UNet call at batch 1, whatever --num-images
            return pipe
        engines = {c: make_engine(bundle, c, provider, threads, cudnn_search=search) for c in bundle.components}
        return cls(bundle, engines, cfg_mode=cfg_mode)

    # -- stages ---------------------------------------------------------------------------------------
    def _precision(self, component: str) -> str | None:
        """The precision the bundle's manifest gives ``component`` (None where it says none)."""
        return self.bundle.manifest.get("components", {}).get(component, {}).get("precision")

    def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        """CLIP token ids, (B, 77) int32."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise LdmExportError("tokenize takes a list of strings")
        return self.tokenizer(list(prompts))

    def run_component(self, component: str, feeds: Mapping[str, np.ndarray], batched: Sequence[str]) -> dict:
        """Run one component (static-batch aware, see run_batched) and refuse NaN/Inf in what it returns."""
        out = run_batched(self.engines[component], feeds, batched)
        check_finite(component, out, precision=self._precision(component))
        return out

    def encode(self, prompts: Sequence[str]) -> Conditioning:
        """The family's conditioning for ``prompts`` (text embeddings, pooled vectors, extras), float32. A prompt cut
        by two CLIP tokenizers alike (SDXL, SD3) is warned about once."""
        from .tokenizer import one_warning_per_prompt

        with one_warning_per_prompt():
            return self.family.encode(self, list(prompts))

    def encode_prompt(self, prompts: Sequence[str]) -> np.ndarray:
        """Text embeddings (B, 77, D) float32: the cross-attention context of :meth:`encode`."""
        return self.encode(prompts).context

    def denoise(self, sample: np.ndarray, timestep, cond: Conditioning, bound: bool = False) -> np.ndarray:
        """One denoiser evaluation: (N, C, h, w) latents at ``timestep`` under ``cond`` (N rows) -> (N, C, h, w)
        prediction (float32).

        ``bound``: the engine already holds this ``cond`` from the previous call (the sampler loop passes the same
        record every step); an engine that keeps its inputs on the device (``run_partial``, static shapes) then
        copies only the family's per-step inputs (latents and timestep).
        """
        family = self.family
        engine = self.engines[family.denoiser]
        t = np.asarray(timestep, dtype=np.float64).reshape(-1)[0]
        feeds = family.denoiser_feeds(sample, np.full((sample.shape[0],), t), cond)
        inputs = {x.name: x for x in engine.spec.inputs}
        scalar = [n for n, x in inputs.items() if not x.shape and n in feeds]  # a scalar timestep, as Optimum has it
        for n in scalar:
            feeds[n] = np.asarray(np.asarray(feeds[n]).reshape(-1)[0])
        batched = [n for n, x in inputs.items() if n not in scalar and x.shape and n not in family.unbatched_inputs]
        if getattr(engine, "static", False) and hasattr(engine, "run_partial"):
            out = _run_in_slots(engine, feeds, batched, family.step_inputs if bound else None)
            if out is not None:
                return family.prediction(out, sample).astype(np.float32)
        return family.prediction(run_batched(engine, feeds, batched), sample).astype(np.float32)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Latents (B, C, h, w) as the sampler returns them -> images (B, 3, H, W) in [-1, 1]."""
        out = self.run_component(self.family.decoder, {"latent_sample": self.latent_format.to_vae(latents)},
                                 ["latent_sample"])
        return out["sample"].astype(np.float32)

    # -- text to image --------------------------------------------------------------------------------
    def __call__(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None, seed: int | None = None,
                 latents: np.ndarray | None = None, width: int | None = None, height: int | None = None,
                 scheduler: str | Mapping | None = None, num_images: int = 1,
                 callback: Callable[[int, int, np.ndarray], None] | None = None, guidance_rescale: float = 0.0,
                 noise: Callable[[tuple], np.ndarray] | None = None, return_latents: bool = False,
                 batch_size: int | None = None,
                 init_image=None, strength: float = 0.8, mask_image=None, mask_blur: float = 0.0,
                 keep_unmasked: bool = True, denoising_start: float | None = None,
                 denoising_end: float | None = None):
        """Generate ``num_images`` images per prompt; returns a list of PIL images with A1111 metadata in
        ``image.info["parameters"]`` (or the final latents with ``return_latents``). Steps and guidance default to
        the model's (``Bundle.defaults``: 20 / 7.5 for SD 1.x, 28 / 7.0 for SD3, 4 / 0 for FLUX-schnell, ...). Image k gets seed ``seed + k``
        (``seed`` None or -1: random); they run in batches of ``batch_size`` images (default: what one call of a
        static-shape UNet takes, see ``images_per_batch``). Given ``latents`` (or ``return_latents``), all run as
        one batch.

        Editing (diffusers' semantics, ``runtime/editing.py``): ``init_image`` (a path or an RGB PIL image) with
        ``strength`` in (0, 1] is image-to-image; ``mask_image`` (white = repaint), blurred by ``mask_blur`` pixels,
        inpaints (latent blending each step, or a 9-channel inpainting UNet's extra inputs), and with
        ``keep_unmasked`` the pixels outside the mask are the original ones. A base model hands off to a refiner
        with ``denoising_end`` (and ``return_latents``); the refiner takes those ``latents`` with
        ``denoising_start``."""
        req = self._request(prompt, negative_prompt, num_inference_steps, guidance_scale, seed, width, height,
                            scheduler, num_images, guidance_rescale, latents, batch_size,
                            _Edit(init_image, strength, mask_image, mask_blur, keep_unmasked, denoising_start,
                                  denoising_end))
        if latents is not None or return_latents:
            return self._generate(req, range(len(req.prompts)), callback, latents, noise, return_latents)
        return [image for _, image in self._iter(req, callback, noise)]

    def iter_images(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None,
                    num_inference_steps: int | None = None, guidance_scale: float | None = None,
                    seed: int | None = None, width: int | None = None, height: int | None = None, scheduler: str | Mapping | None = None,
                    num_images: int = 1, callback: Callable[[int, int, np.ndarray], None] | None = None,
                    guidance_rescale: float = 0.0, batch_size: int | None = None, init_image=None,
                    strength: float = 0.8, mask_image=None, mask_blur: float = 0.0, keep_unmasked: bool = True):
        """Like ``__call__``, but yields ``(k, image)`` as each batch is decoded, so a caller saves every image as it
        is done and memory holds one batch, however many images are asked for. Everything is checked first."""
        req = self._request(prompt, negative_prompt, num_inference_steps, guidance_scale, seed, width, height,
                            scheduler, num_images, guidance_rescale, None, batch_size,
                            _Edit(init_image, strength, mask_image, mask_blur, keep_unmasked))
        return self._iter(req, callback, None)

    def images_per_batch(self, guidance_scale: float | None = None) -> int:
        """Images one UNet call takes: a static-shape UNet's batch (halved for batch-2 CFG), else DYNAMIC_BATCH (1 in
        low-memory mode, whose UNet calls are batch 1). Larger requests run in batches of this size through the same
        warm engines, at the static batch's speed."""
        dim = self.engines[self.family.denoiser].spec.inputs[0].shape[0]
        if not isinstance(dim, int):
            return 1 if self.low_memory else DYNAMIC_BATCH
        if guidance_scale is None:
            guidance_scale = self.bundle.defaults["guidance_scale"]
        halves = 2 if self.family.uses_cfg(guidance_scale) and self.cfg_mode == "batch2" else 1
        return max(1, dim // halves)

    def _iter(self, req: "_Request", callback, noise):
        for start in range(0, len(req.prompts), req.batch_size):
            ks = range(start, min(start + req.batch_size, len(req.prompts)))
            for k, image in zip(ks, self._generate(req, ks, callback, None, noise, False)):
                yield k, image

    def _request(self, prompt, negative_prompt, num_inference_steps, guidance_scale, seed, width, height, scheduler,
                 num_images, guidance_rescale, latents, batch_size, edit_args: "_Edit | None" = None) -> "_Request":
        """Check everything a request asks before any work (checks.py); expand prompts x num_images; load and check
        the init image and mask of an edit."""
        from .schedulers import a1111_name, a1111_names, canonical_sampler, resolve_scheduler

        if num_inference_steps is None:
            num_inference_steps = self.bundle.defaults["steps"]
        if guidance_scale is None:
            guidance_scale = self.bundle.defaults["guidance_scale"]
        prompts = _as_prompts(prompt, "prompt")
        negatives = _as_prompts("" if negative_prompt is None else negative_prompt, "negative_prompt")
        if len(negatives) == 1 and len(prompts) > 1:
            negatives = negatives * len(prompts)
        if len(negatives) != len(prompts):
            raise LdmExportError(f"got {len(prompts)} prompts but {len(negatives)} negative prompts; give one or as many")
        checks.check_text(prompts, "prompt")
        checks.check_text(negatives, "negative prompt")
        if isinstance(num_images, bool) or not isinstance(num_images, (int, np.integer)) or num_images < 1:
            raise LdmExportError(f"num_images must be a positive integer, got {num_images!r}")
        if not isinstance(num_inference_steps, (int, np.integer)) or not 1 <= num_inference_steps <= MAX_STEPS:
            raise LdmExportError(f"steps must be an integer from 1 to {MAX_STEPS}, got {num_inference_steps!r}")
        guidance_scale, guidance_rescale = checks.check_guidance(guidance_scale, guidance_rescale,
                                                                 self.bundle.defaults["guidance_scale"])
        if not self.family.uses_cfg(guidance_scale):
            why = (f"guidance scale {guidance_scale:g} (1 or less) runs no unconditional pass"
                   if self.family.uses_cfg(2.0) else f"the {self.family.name} family is guidance-distilled (no "
                   "unconditional pass)")
            if any(negatives):
                log.warning("the negative prompt has no effect: %s", why)
            if guidance_rescale:
                log.warning("the guidance rescale has no effect: %s", why)
                guidance_rescale = 0.0  # nor does the image's metadata claim it
        denoiser_inputs = [x.name for x in self.engines[self.family.denoiser].spec.inputs]
        if guidance_scale != self.bundle.defaults["guidance_scale"] and not self.family.takes_guidance(denoiser_inputs):
            log.warning("the guidance scale has no effect: this %s model takes no guidance (timestep-distilled, as "
                        "FLUX.1 [schnell]); leave it at the model's default", self.family.name)
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
                                       or batch_size < 1):
            raise LdmExportError(f"batch_size must be a positive integer, got {batch_size!r}")
        n_images = len(prompts) * num_images
        per_batch = n_images if latents is not None else min(n_images, batch_size or self.images_per_batch(guidance_scale))
        cfg_batch = per_batch * (2 if self.family.uses_cfg(guidance_scale) and self.cfg_mode == "batch2" else 1)

        def sized(w, h) -> tuple[int, int]:
            w, h = self._size(w, h, warn=False)
            checks.check_memory(self.bundle.model, self.bundle.module_configs, w, h, cfg_batch, self._fused_attention(),
                                *self._memory())
            checks.warn_off_model(w, h, self.bundle.model)  # after the refusals: a refused size gets its error alone
            return w, h

        edit_args = edit_args or _Edit()
        if edit_args.init_image is not None and width is not None and height is not None:
            sized(width, height)  # before the init image is resized to it
        # the size checks run again on the init image's own size before the VAE encoder sees it
        edit = self._edit_inputs(edit_args.init_image, edit_args.strength, edit_args.mask_image, edit_args.mask_blur,
                                 width, height, edit_args.denoising_start, sized)
        if edit is not None:
            width, height = edit.width, edit.height
        width, height = sized(width, height)
        seed = checks.resolve_seed(seed)

        base = self.bundle.scheduler_config
        if scheduler is None:
            sched_cfg, sampler_name = base, a1111_name(base)
        elif isinstance(scheduler, str):
            sched_cfg, sampler_name = resolve_scheduler(scheduler, base), canonical_sampler(scheduler)
            if sampler_name not in a1111_names() or sched_cfg["_class_name"] == "FlowMatchEulerDiscreteScheduler":
                sampler_name = a1111_name(sched_cfg)  # a class name, or "Euler (flow)": what A1111 calls it
        else:
            sched_cfg = dict(scheduler)
            sampler_name = a1111_name(sched_cfg)

        handoff = edit_args.denoising_start is not None or edit_args.denoising_end is not None
        shape = (1, self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if handoff and self.family.schedule_arguments(sched_cfg, int(num_inference_steps), shape):
            raise LdmExportError(f"the {self.family.name} family does not hand latents between models "
                                 "(denoising_start / denoising_end, --refiner): its sampler takes arguments from the "
                                 "image (FLUX's size-dependent shift); run the model alone")
        prompts = [p for p in prompts for _ in range(num_images)]
        negatives = [p for p in negatives for _ in range(num_images)]
        stripped = strip_extra_networks(prompts + negatives, self.bundle.manifest)  # one warning a request
        prompts, negatives = stripped[:len(prompts)], stripped[len(prompts):]
        return _Request(prompts, negatives, checks.image_seeds(seed, len(prompts)), int(num_inference_steps),
                        guidance_scale, guidance_rescale, width, height, sched_cfg, sampler_name, per_batch,
                        negative_prompt is not None, edit, edit_args)

    def _generate(self, req: "_Request", ks: Sequence[int], callback, latents, noise, return_latents):
        """One batch: images ``ks`` of ``req`` through encode -> sampler with CFG -> decode. A prompt cut by a
        tokenizer is warned about once a request (``req.cuts``), not once a batch or once an encoder."""
        from .tokenizer import one_warning_per_prompt

        with one_warning_per_prompt(req.cuts):
            return self._generate_batch(req, ks, callback, latents, noise, return_latents)

    def _generate_batch(self, req: "_Request", ks: Sequence[int], callback, latents, noise, return_latents):
        from . import sample
        from .guidance import guided_denoiser
        from .image import latents_to_images
        from .tokenizer import prompt_role

        prompts = [req.prompts[k] for k in ks]
        negatives = [req.negatives[k] for k in ks]
        seeds = [req.seeds[k] for k in ks]
        num_inference_steps, guidance_scale = req.steps, req.guidance_scale
        shape = (len(ks), self.latent_channels, req.height // self.vae_scale_factor, req.width // self.vae_scale_factor)
        rngs = [np.random.default_rng(s) for s in seeds]
        if latents is None:
            latents = np.stack([rng.standard_normal(shape[1:]) for rng in rngs])
        else:
            latents = np.asarray(latents, dtype=np.float64)
            if latents.shape != shape:
                raise LdmExportError(f"latents must have shape {shape}, got {latents.shape}")
        if noise is None:
            noise = _per_image_noise(rngs)  # the stochastic samplers' draws: image k's from its own seed

        family = self.family
        sched_cfg = family.scheduler_config(req.scheduler_config, width=req.width, height=req.height)
        do_cfg = family.uses_cfg(guidance_scale)

        def conditioning(texts: list[str]) -> Conditioning:
            return family.prepare(self.encode(texts), width=req.width, height=req.height, guidance_scale=guidance_scale)

        cond = conditioning(prompts)
        uncond = None
        if do_cfg:
            with prompt_role("negative prompt"):  # a cut negative prompt is warned about as one
                negative = family.encode_negative(self, negatives, cond, req.negative_given)
            uncond = family.prepare_negative(negative, width=req.width, height=req.height, guidance_scale=guidance_scale)
        edit, args = req.edit, req.edit_args
        if edit is not None and edit.unet_channels is not None:  # 9-channel inpainting UNet: mask + masked latents
            cond, uncond = (None if c is None else edit.with_unet_channels(c) for c in (cond, uncond))
        step = {"i": 0}
        bound = {"cond": None}  # the conditioning the denoiser engine was last fed (guided_denoiser reuses one)
        denoiser = self.family.denoiser

        def unet_fn(sample_, timestep, c):
            out = self.denoise(sample_, timestep, c, bound=c is bound["cond"])
            bound["cond"] = c
            check_finite(denoiser, {self.family.denoiser_output: out}, f" at step {step['i'] + 1} of {num_inference_steps}",
                         self._precision(denoiser))
            return out

        model = guided_denoiser(unet_fn, cond, uncond, guidance_scale if do_cfg else 1.0,
                                guidance_rescale=req.guidance_rescale,
                                batch_mode=self.cfg_mode)

        def on_step(i, n, x):
            step["i"] = i + 1
            if callback is not None:
                callback(i, n, x)

        if edit is not None and edit.image is not None:
            from .editing import sample_edit

            final = sample_edit(model, np.repeat(edit.latents, len(ks), axis=0), latents, sched_cfg,
                                num_inference_steps, edit.strength, noise=noise, callback=on_step,
                                latent_mask=edit.blend_mask, pure_noise_at_full_strength=edit.mask is not None)
        elif args.denoising_start is not None or args.denoising_end is not None:
            from .editing import cutoff_step, sample_range

            denoising_start, denoising_end = args.denoising_start, args.denoising_end

            start = 0 if denoising_start is None else cutoff_step(sched_cfg, num_inference_steps, denoising_start)
            stop = None if denoising_end is None else cutoff_step(sched_cfg, num_inference_steps, denoising_end)
            final = sample_range(model, latents, sched_cfg, num_inference_steps, start, stop, noise=noise,
                                 callback=on_step, initial_noise=denoising_start is None)
        else:
            final = sample(model, latents, sched_cfg, num_inference_steps, noise=noise, callback=on_step,
                           **family.schedule_arguments(sched_cfg, num_inference_steps, np.shape(latents)))
        if return_latents:
            return final
        images = latents_to_images(self.decode(np.asarray(final, dtype=np.float32)))
        if edit is not None and edit.mask is not None and args.keep_unmasked:
            from .editing import paste_back

            images = [paste_back(edit.image, img, edit.mask) for img in images]
        for img, prompt, negative, seed in zip(images, prompts, negatives, seeds):
            img.info["parameters"] = self._parameters(req, prompt, negative, seed)
        return images

    def _parameters(self, req: "_Request", prompt: str, negative: str, seed: int) -> str:
        extra = {}
        if req.edit is not None and req.edit.image is not None:
            extra["Denoising strength"] = req.edit.strength
            if req.edit.mask is not None and req.edit_args.mask_blur:
                extra["Mask blur"] = req.edit_args.mask_blur
        return self.infotext(prompt, negative, steps=req.steps, sampler=req.sampler_name,
                             guidance_scale=req.guidance_scale, seed=seed, width=req.width, height=req.height,
                             guidance_rescale=req.guidance_rescale, extra=extra)

    def infotext(self, prompt: str, negative: str | None, *, steps: int, sampler: str, guidance_scale: float,
                 seed: int, width: int, height: int, guidance_rescale: float = 0.0, extra: Mapping | None = None,
                 also: Sequence["Pipeline"] = ()) -> str:
        """A1111's ``parameters`` of an image this pipeline drew (``generate``, ``serve`` and a refiner's hand-off
        write them all here): the guidance that drew it (:meth:`recorded_guidance`), the fused LoRAs as prompt tags
        and "Lora hashes" (also those of the pipelines ``also``: a refiner), then ``extra``. Extra-network tags that
        did not act are left out of both prompts."""
        from .image import format_parameters

        cfg, negative, fields = self.recorded_guidance(guidance_scale, _without_tags(negative or ""))
        if guidance_rescale:
            fields["CFG Rescale φ"] = guidance_rescale  # the A1111 extension's key
        manifests = [self.bundle.manifest, *(p.bundle.manifest for p in also)]
        if loras := lora_hashes(*manifests):
            fields["Lora hashes"] = loras
        fields.update(extra or {})
        return format_parameters(lora_prompt(prompt, *manifests), negative or None, steps, sampler, cfg, seed,
                                 width, height, self.bundle.model_hash, model_name=self.bundle.model.get("name"),
                                 extra=fields or None)

    def recorded_guidance(self, guidance_scale: float, negative: str) -> tuple[float, str, dict]:
        """The CFG scale, negative prompt and extra fields an image's parameters record, as what drew it
        (``Family.recorded_guidance``)."""
        inputs = [x.name for x in self.engines[self.family.denoiser].spec.inputs]
        return self.family.recorded_guidance(guidance_scale, negative, inputs)

    def _fused_attention(self) -> bool:
        kernels = self.bundle.manifest["components"].get(self.family.denoiser, {}).get("kernels") or []
        return any("Attention" in k for k in kernels)

    def _memory(self) -> tuple[int | None, str]:
        """Memory a request may plan for, and where: host RAM for CPU engines, the largest GPU's for the others."""
        on_host = all(getattr(e, "providers", [None])[0] == "CPUExecutionProvider" for e in self.engines.values())
        if on_host:
            return checks.available_memory(), "on this machine"
        return GPU_MEMORY_CEILING, "on any GPU"

    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        """Images (B, 3, H, W) in [-1, 1] -> latents (B, C, H/f, W/f): the VAE posterior's mean, in the model's
        latent format (diffusers' ``retrieve_latents`` in ``argmax`` mode: no sampling noise)."""
        encoder = self.family.encoder
        if not any(c.name == encoder for c in self.family.components):
            raise LdmExportError(f"bundle {self.bundle.path} is of the {self.family.name} family, which does not edit "
                                 "images yet (no VAE encoder); image-to-image and inpainting run on the U-Net families "
                                 "(SD 1.x/2.x, SDXL)")
        if encoder not in self.engines:
            raise LdmExportError(f"bundle {self.bundle.path} has no {encoder} to encode images; rebuild it with "
                                 "`ldm-export build --vae-encoder` to edit images")
        params = self.run_component(encoder, {"sample": pixels.astype(np.float32)}, ["sample"])["latent_parameters"]
        return self.latent_format.from_vae(params[:, :self.latent_channels].astype(np.float64))

    def _edit_inputs(self, init_image, strength, mask_image, mask_blur, width, height, denoising_start, check_size=None):
        """Load and check the init image and mask of an editing request; None for text to image."""
        from .editing import EditInputs, check_strength, is_inpainting_unet

        inpaint_unet = is_inpainting_unet(self.engines[self.family.denoiser].spec, self.latent_channels)
        if init_image is None:
            if mask_image is not None:
                raise LdmExportError("a mask needs an init image to inpaint: give --init-image too")
            if inpaint_unet:
                raise LdmExportError("this bundle's UNet is an inpainting UNet (9 input channels): give an init "
                                     "image and a mask (--init-image, --mask)")
            return None
        if denoising_start is not None:
            raise LdmExportError("give either an init image or latents to continue (denoising_start), not both")
        if inpaint_unet and mask_image is None:
            raise LdmExportError("this bundle's UNet is an inpainting UNet (9 input channels): give a mask (--mask)")
        return EditInputs.load(self, init_image, check_strength(strength), mask_image, mask_blur, width, height,
                               inpaint_unet, check_size)

    def _size(self, width, height, warn: bool = True) -> tuple[int, int]:
        width = self.resolution if width is None else width
        height = self.resolution if height is None else height
        f = self.vae_scale_factor
        # the first (N, C, h, w) latent input that fixes its size: the UNet's sample, else the VAE decoder's latents
        # (FLUX's transformer takes packed (N, hw/4, C*4) tokens)
        for component in (self.family.denoiser, self.family.decoder):
            spec: ComponentSpec = self.engines[component].spec
            sample_shape = spec.inputs[0].shape
            if len(sample_shape) == 4 and isinstance(sample_shape[2], int) and isinstance(sample_shape[3], int):
                if (width, height) != (sample_shape[3] * f, sample_shape[2] * f):
                    raise LdmExportError(f"bundle {self.bundle.path} was built with static shapes for {sample_shape[3] * f}x"
                                         f"{sample_shape[2] * f}; use that size (--size {sample_shape[3] * f}x"
                                         f"{sample_shape[2] * f} also resizes an init image to it) or rebuild without "
                                         "--static-shape")
                break
        configs = self.bundle.module_configs
        return checks.check_size(width, height, self.bundle.model, self.family.size_multiple(configs),
                                 self.family.largest_side(configs), warn=warn)


# AUTOMATIC1111's extra-network tags in a prompt (modules/extra_networks.py): <lora:NAME:SCALE>, <hypernet:...>, ...
EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")


def _loras(manifest: Mapping) -> list[tuple[str, Mapping]]:
    """The LoRAs fused into a bundle as (A1111's name for it: the file's stem without ':' and ',', its record)."""
    loras = (manifest.get("weights") or {}).get("loras") or manifest.get("loras") or []
    clean = str.maketrans("", "", ":,")
    return [(Path(x["file"]).stem.translate(clean), x) for x in loras]


def fused_loras(*manifests: Mapping) -> dict[str, float]:
    """The LoRAs fused into the bundles of ``manifests`` by A1111's name, each with its total scale (a file fused
    twice adds up)."""
    total: dict[str, float] = {}
    for manifest in manifests:
        for name, x in _loras(manifest):
            total[name] = total.get(name, 0.0) + float(x.get("scale", 1.0))
    return total


def _tag_scale(args: str) -> tuple[str, float | None]:
    """A ``<lora:...>`` tag's name and scale (A1111: NAME[:TE[:UNET]], or te=/unet= by name; 1 when absent);
    scale None when the text encoder's and the UNet's differ or one is not a number."""
    name, *rest = args.split(":")
    named = {k.strip(): v for k, _, v in (r.partition("=") for r in rest if "=" in r)}
    plain = [r for r in rest if "=" not in r]
    try:
        te = float(named.get("te", plain[0] if plain else 1.0))
        unet = float(named.get("unet", plain[1] if len(plain) > 1 else te))
    except ValueError:
        return name.strip(), None
    return name.strip(), te if math.isclose(te, unet) else None


def _without_tags(text: str) -> str:
    return " ".join(EXTRA_NETWORK.sub("", text).split()) if EXTRA_NETWORK.search(text) else text


def strip_extra_networks(texts: Sequence[str], *manifests: Mapping) -> list[str]:
    """``texts`` without A1111's extra-network tags, which A1111 takes out of a prompt before encoding it (they would
    be encoded as words here). A ``<lora:NAME:SCALE>`` of a LoRA fused into the bundle(s) of ``manifests`` at that
    scale says what the bundle is; any other tag is warned about once: LoRAs are fused into a bundle, not applied per
    prompt."""
    fused = fused_loras(*manifests)
    ignored = []
    for text in texts:
        for m in EXTRA_NETWORK.finditer(text):
            if m[1] == "lora":
                name, scale = _tag_scale(m[2])
                if name in fused and scale is not None and math.isclose(scale, fused[name], abs_tol=1e-6):
                    continue
            if m[0] not in ignored:
                ignored.append(m[0])
    if ignored:
        have = ", ".join(f"<lora:{n}:{v:g}>" for n, v in fused.items()) or "none"
        log.warning("prompt tag%s %s ignored: this bundle's LoRAs are fused into it (%s); fuse others with "
                    "`ldm-export lora BUNDLE FILE:SCALE --out NEW` or `build --lora FILE:SCALE`",
                    "s" if len(ignored) > 1 else "", " ".join(ignored), have)
    return [_without_tags(t) for t in texts]


def lora_prompt(prompt: str, *manifests: Mapping) -> str:
    """``prompt`` as A1111's infotext writes it for what drew the image: the extra-network tags that did not act taken
    out, and a ``<lora:NAME:SCALE>`` tag for each LoRA fused into the bundle(s) of ``manifests``, at its fused scale,
    so that the parameters say the scale and A1111's "send to txt2img" redraws it on the base model."""
    tags = [f"<lora:{name}:{scale:g}>" for name, scale in fused_loras(*manifests).items()
            if not math.isclose(scale, 0.0, abs_tol=1e-9)]
    return " ".join([_without_tags(prompt), *tags]) if tags else _without_tags(prompt)


def lora_hashes(*manifests: Mapping) -> str | None:
    """A1111's "Lora hashes" of the LoRAs fused into the bundle(s) of ``manifests``: "name: short hash" (A1111's name,
    the first 12 hex digits of its tensor data's sha256), or None. Bundles built before the hash was recorded have none
    (their whole-file sha256 is another value): nothing is written for them."""
    hashes = []
    for manifest in manifests:
        loras = _loras(manifest)
        if loras and all(x.get("addnet_sha256") for _, x in loras):
            hashes += [f"{name}: {x['addnet_sha256'][:12]}" for name, x in loras]
    return ", ".join(hashes) or None


@dataclass(frozen=True)
class _Request:
    """One checked request: per-image prompts and seeds, and what every batch shares."""

    prompts: list[str]
    negatives: list[str]
    seeds: list[int]
    steps: int
    guidance_scale: float
    guidance_rescale: float
    width: int
    height: int
    scheduler_config: dict
    sampler_name: str
    batch_size: int
    negative_given: bool = True  # a negative prompt was given (SDXL encodes an absent one as zeros)
    edit: object | None = None  # editing.EditInputs of an image-to-image or inpainting request
    edit_args: "_Edit | None" = None
    cuts: set = field(default_factory=set, compare=False)  # the prompt cuts warned about in this request's batches


@dataclass(frozen=True)
class _Edit:
    """What a request asks of editing (see ``Pipeline.__call__``)."""

    init_image: object = None
    strength: float = 0.8
    mask_image: object = None
    mask_blur: float = 0.0
    keep_unmasked: bool = True
    denoising_start: float | None = None
    denoising_end: float | None = None


def _per_image_noise(rngs: Sequence[np.random.Generator]) -> Callable[[tuple], np.ndarray]:
    """Noise of shape (B, ...) whose row k comes from image k's generator: a batch draws what each image alone would."""
    def noise(shape):
        if len(shape) and shape[0] == len(rngs):
            return np.stack([rng.standard_normal(tuple(shape[1:])) for rng in rngs])
        return rngs[0].standard_normal(shape)
    return noise


def _as_prompts(p, what: str) -> list[str]:
    if isinstance(p, str):
        return [p]
    if isinstance(p, (list, tuple)) and p and all(isinstance(x, str) for x in p):
        return list(p)
    raise LdmExportError(f"{what} must be a string or a list of strings, got {type(p).__name__}")


CONVOLUTIONAL = ("unet", "vae_decoder")  # components that run NHWC on the CUDA engine


def resolve_cudnn_search(search: str | None = None) -> str:
    """cuDNN's convolution algorithm search for the CUDA engines: ``search``, else $LDM_EXPORT_CUDNN_SEARCH, else
    DEFAULT_CUDNN_SEARCH. EXHAUSTIVE times every algorithm of every convolution on the first run (8 to 18 s before the
    first SD 1.5 image on an H100/H200); HEURISTIC asks cuDNN's heuristics and runs at once; DEFAULT takes ONNX
    Runtime's fixed choice. ``tools/gpu/first_image.sh`` measures the three side by side."""
    from .engine_cuda import CONV_ALGO_SEARCH

    value = search if search is not None else os.environ.get("LDM_EXPORT_CUDNN_SEARCH") or DEFAULT_CUDNN_SEARCH
    if value.upper() not in CONV_ALGO_SEARCH:
        raise LdmExportError(f"cuDNN search must be one of {', '.join(CONV_ALGO_SEARCH)}, got {value!r}"
                             + (" (from LDM_EXPORT_CUDNN_SEARCH)" if search is None else ""))
    return value.upper()


def cuda_engine(bundle: Bundle, component: str, tuned: bool = True, extra_options: Mapping[str, str] | None = None,
                cudnn_search: str | None = None):
    """The CUDA engine for one component. ``tuned`` (the runtime's choice) runs the UNet and VAE decoder
    channels-last: on an H100 that took the SD 1.5 UNet step from 12.3 to 8.8 ms (docs/gpu.md). The text encoder runs
    once an image and keeps a few nodes on the CPU, so it gets no CUDA graph. A DiT's transformer (static shapes) runs
    as a CUDA graph too (a step is many small kernels, which a graph launches without the host),
    falling back to none, with a warning, where ONNX Runtime cannot capture it. ``extra_options`` adds CUDA provider options;
    ``cudnn_search`` see ``resolve_cudnn_search``."""
    from .engine_cuda import CudaEngine

    conv = component in CONVOLUTIONAL
    graph = conv or component == bundle.family.denoiser
    spec = bundle.spec(component)
    # No cuDNN conv+bias runtime fusion by default: its kernels are compiled at first use, which made the first SD 1.5
    # image of a process 17.7 s (6.3 s with a warm CUDA JIT cache) against 5.2 s (1.9 s) without it, for 1.4 ms a
    # decode (docs/gpu.md: first image on an H200). ``extra_options={"fuse_conv_bias": "1"}`` turns it back on.
    options = dict(extra_options or {})
    if "cudnn_conv_algo_search" in options:  # ONNX Runtime's name for it (bench --cuda-option) is accepted too
        cudnn_search = options.pop("cudnn_conv_algo_search")
    return CudaEngine(bundle.model_path(component), spec, prefer_nhwc=tuned and conv, precision=bundle.precision(component),
                      cuda_graph=None if graph else False, graph_fallback=graph and not conv, provider_options=options,
                      conv_algo_search=resolve_cudnn_search(cudnn_search))


def make_engine(bundle: Bundle, component: str, provider: str = "cpu", threads: int | None = None,
                cudnn_search: str | None = None) -> Engine:
    """The engine for one component: ONNX Runtime on ``provider``, or the bundle's native TensorRT plan for this
    GPU with ``provider="tensorrt-native"`` (``"tensorrt"`` stays ONNX Runtime's TensorRT provider)."""
    if provider == "tensorrt-native":
        from .engine_tensorrt import load_tensorrt_engine

        return load_tensorrt_engine(bundle, component)
    if provider in ("tensorrt", "nv-tensorrt-rtx"):  # ONNX Runtime's TensorRT providers, caches in the bundle
        from .engine_ort_trt import ort_tensorrt_engine

        return ort_tensorrt_engine(bundle, component, provider, threads)
    if provider == "cuda":
        from .engine_cuda import cuda_available

        if cuda_available():  # IOBinding on device buffers, CUDA graphs for static-shape bundles
            return cuda_engine(bundle, component, cudnn_search=cudnn_search)
    return OrtEngine(bundle.model_path(component), bundle.spec(component), provider=provider, threads=threads)
