"""The Ray Serve application: a FastAPI ingress speaking A1111's API in front of ``Generator`` replicas.

``Generator`` holds one ``Pipeline`` per replica and batches images with Ray Serve's ``@serve.batch``: images of
the same size, steps, sampler and guidance that arrive together run as one ``Pipeline`` call, so one UNet batch.
The ingress owns HTTP: auth, the body's types (422), the server's limits, and turning a full queue (Ray Serve's
``max_queued_requests``) into 503 + Retry-After and a dead replica into a clear 503, never a hang.

``build_app(args)`` is the application builder ``serve deploy`` reads from the config ``ldm-export serve`` writes.
"""

import asyncio
import base64
import binascii
import io
import logging
import secrets
from dataclasses import asdict
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from ldm_export.runtime.editing import has_alpha, mask_grayscale, transparency
from ldm_export.runtime.errors import LdmExportError

from . import a1111
from .config import APP_NAME, ServeConfig

logger = logging.getLogger(__name__)


# -- the replicas -----------------------------------------------------------------------------------------
def _png(image, parameters: str | None = None) -> bytes:
    """``image`` as PNG bytes, with A1111's ``parameters`` text chunk when given."""
    from PIL import PngImagePlugin

    meta = PngImagePlugin.PngInfo()
    if parameters is not None:
        meta.add_text("parameters", parameters)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=meta)
    return buf.getvalue()


def run_group(pipe, jobs: list[a1111.Job]) -> list[dict]:
    """Draw one group of jobs (equal ``group_key``) as one ``Pipeline`` call; each image from its own seed.

    Image k's initial latents and the stochastic samplers' noise come from ``default_rng(seed_k)`` in the order
    ``Pipeline`` draws them for one image, so an image is the same alone or batched with others. One job alone
    goes to ``Pipeline`` with its seed as given, which validates it; a batch that ``Pipeline`` refuses is re-run one
    job at a time so only the bad request fails, with ``Pipeline``'s own message."""
    import numpy as np

    from ldm_export.runtime.checks import resolve_seed
    from ldm_export.runtime.image import parse_parameters

    def done(job, image, batch):
        w, h = image.size
        if job.init_image is not None:  # the edit's own infotext (denoising strength, mask blur), drawn alone
            text = image.info["parameters"]
        else:  # a batched image's own seed, which Pipeline's infotext (the batch's first seed + k) does not know
            text = pipe.infotext(job.prompt, job.negative_prompt, steps=job.steps, sampler=job.sampler,
                                 guidance_scale=job.cfg_scale, seed=job.seed, width=w, height=h)
        p = parse_parameters(text)  # what the image's parameters say drew it, for the response's info
        recorded = {"cfg_scale": p["cfg_scale"], "negative_prompt": p.get("negative_prompt") or "",
                    "extra": p.get("extra", {})}
        return {"png": _png(image, text), "infotext": text, "width": w, "height": h, "unet_batch": batch,
                "recorded": recorded}

    def call(js, **kw):
        j = js[0]
        return pipe([x.prompt for x in js], negative_prompt=[x.negative_prompt for x in js],
                    num_inference_steps=j.steps, guidance_scale=j.cfg_scale, width=j.width, height=j.height,
                    scheduler=j.sampler, **kw, **_edit_arguments(j))

    if len(jobs) == 1:
        try:
            return [done(jobs[0], call(jobs, seed=jobs[0].seed)[0], 1)]
        except (LdmExportError, ValueError) as e:  # ValueError: numpy refusing a seed Pipeline passed on
            return [{"error": a1111.api_message(str(e))}]
    try:
        f = pipe.vae_scale_factor
        w, h = jobs[0].width or pipe.resolution, jobs[0].height or pipe.resolution
        rngs = [np.random.default_rng(resolve_seed(j.seed)) for j in jobs]  # checked as Pipeline checks its seed
        latents = np.concatenate([r.standard_normal((1, pipe.latent_channels, h // f, w // f)) for r in rngs])

        def noise(shape):  # (B, C, h, w): row k from image k's generator
            return np.concatenate([r.standard_normal((1, *shape[1:])) for r in rngs])

        images = call(jobs, seed=jobs[0].seed, latents=latents, noise=noise)
    except (LdmExportError, ValueError, TypeError):
        return [r for j in jobs for r in run_group(pipe, [j])]
    return [done(j, im, len(jobs)) for j, im in zip(jobs, images)]


class _Sent(io.BytesIO):
    """An image of the request as ``Pipeline`` opens it: its messages name it by where it came from."""

    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self.label = name

    def __str__(self) -> str:
        return self.label

    __repr__ = __str__


def _edit_arguments(job: a1111.Job) -> dict:
    """``Pipeline``'s editing arguments for an img2img job; none for txt2img. The mask as A1111 reads one: an
    RGBA or LA mask with transparency by its alpha, else its grey levels; inverted for ``inpainting_mask_invert``."""
    if job.init_image is None:
        return {}
    from PIL import Image, ImageOps

    init = _flatten(a1111.open_upright(job.init_image))
    out = {"init_image": _Sent(_png(init), "in the request"), "strength": job.strength}
    mask = None
    if job.mask is not None:
        mask = a1111.open_upright(job.mask)
        alpha = transparency(mask)
        if alpha is not None and job.round_mask:  # A1111's create_binary_mask: the alpha, rounded at 128 by mask_round
            mask = alpha.point(lambda x: 255 if x > 128 else 0)
        else:  # the alpha where it has transparency, else the grey levels (as generate reads it)
            mask = mask_grayscale(mask)
        if job.invert_mask:
            mask = ImageOps.invert(mask.convert("L"))
    elif job.whole_mask:  # an inpainting UNet without a mask repaints the whole image, as A1111 conditions it
        mask = Image.new("L", init.size, 255)
    if mask is not None and mask.size != init.size:  # A1111 resizes the mask to the image's size (resize_image)
        mask = mask.convert("L").resize(init.size, Image.LANCZOS)
    if mask is not None:
        out.update(mask_image=_Sent(_png(mask), "in the request"), mask_blur=job.mask_blur)
    return out


def _flatten(image):
    """An init image as A1111 takes it: RGB, any transparency composited on white (its default img2img background),
    16-bit grey scaled to 8 bits."""
    import numpy as np
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L"):
        return Image.fromarray((np.asarray(image, dtype=np.int64).clip(0, 65535) >> 8).astype(np.uint8)).convert("RGB")
    if has_alpha(image):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def run_jobs(pipe, jobs: list[a1111.Job]) -> list[dict]:
    """Split a Serve batch into groups of equal size/steps/sampler/guidance and run each as one call."""
    groups: dict[tuple, list[int]] = {}
    for i, j in enumerate(jobs):
        groups.setdefault(j.group_key(), []).append(i)
    out: list[dict] = [{}] * len(jobs)
    for idx in groups.values():
        for i, r in zip(idx, run_group(pipe, [jobs[i] for i in idx])):
            out[i] = r
    return out


@serve.deployment(name="Generator", ray_actor_options={"num_cpus": 0}, graceful_shutdown_wait_loop_s=0.5)
class Generator:
    """One ``Pipeline`` per replica; images arriving together are batched (Ray Serve ``@serve.batch``)."""

    def __init__(self, bundle: str, provider: str, threads: int | None, max_batch: int, batch_wait_s: float):
        from ldm_export.runtime.pipeline import Pipeline

        self.pipe = Pipeline.from_bundle(bundle, provider=provider, threads=threads)
        self.generate.set_max_batch_size(max_batch)
        self.generate.set_batch_wait_timeout_s(batch_wait_s)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def generate(self, jobs: list[a1111.Job]) -> list[dict]:
        # a thread keeps the replica's event loop free for Serve's health checks while ONNX Runtime computes
        return await asyncio.to_thread(run_jobs, self.pipe, jobs)


# -- the HTTP ingress -------------------------------------------------------------------------------------
api = FastAPI(title="ldm-export (AUTOMATIC1111 API)", docs_url=None, redoc_url=None, openapi_url=None)
Txt2ImgRequest = a1111.request_model()
Img2ImgRequest = a1111.request_model(img2img=True)


def _parse_auth(spec: str | None) -> dict[str, str]:
    creds = {}
    for pair in (spec or "").split(","):
        if pair:
            user, _, password = pair.partition(":")
            creds[user] = password
    return creds


def _unauthorized() -> JSONResponse:
    return JSONResponse({"detail": "Incorrect username or password"}, status_code=401,
                        headers={"WWW-Authenticate": "Basic"})


def _error(status: int, message: str, field_name: str | None = None, headers: dict | None = None) -> JSONResponse:
    detail = [{"loc": ["body", field_name], "msg": message, "type": "value_error"}] if field_name else message
    return JSONResponse({"detail": detail, "error": message}, status_code=status, headers=headers)


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000,
                  graceful_shutdown_wait_loop_s=0.5)
@serve.ingress(api)
class Ingress:
    """A1111's routes over the ``Generator`` deployment."""

    def __init__(self, generator, config: dict):
        from ldm_export.runtime.bundle import Bundle
        from ldm_export.runtime.editing import is_inpainting_unet
        from ldm_export.runtime.schedulers import resolve_scheduler, sampler_names
        from ldm_export.runtime.schedulers import DEFAULTS

        self.generator = generator
        self.cfg = ServeConfig(**config)
        self.inflight = 0  # txt2img requests being answered
        self.draining = False
        self.credentials = _parse_auth(self.cfg.api_auth)
        bundle = Bundle.open(self.cfg.bundle)
        self.model_name = str(bundle.model.get("name") or Path(self.cfg.bundle).name)
        self.model_hash = bundle.model_hash
        self.model_sha256 = next((f["sha256"] for f in bundle.manifest["files"].values()
                                  if f["sha256"].startswith(self.model_hash)), None)
        self.model_title = f"{self.model_name} [{self.model_hash}]"
        self.inpainting_unet = is_inpainting_unet(bundle.spec(bundle.family.denoiser), bundle.model["latent_channels"])
        self.edits = bundle.family.encoder in bundle.components  # a VAE encoder: the bundle edits images
        self.family_edits = any(c.name == bundle.family.encoder for c in bundle.family.components)
        self.family = bundle.family
        self.takes_guidance = bundle.family.takes_guidance([x.name for x in bundle.spec(bundle.family.denoiser).inputs])
        res = int(bundle.model["resolution"])
        largest = bundle.family.largest_side(bundle.module_configs) or 2 * res  # a DiT's position table
        self.max_size = tuple(self.cfg.max_size or (min(2 * res, largest), min(2 * res, largest)))
        base = self.scheduler_config = bundle.scheduler_config
        self.defaults = bundle.defaults
        self.sampler_list = []
        for name in sampler_names():
            if name in DEFAULTS:
                continue
            try:
                cls = resolve_scheduler(name, base)["_class_name"]
            except LdmExportError:
                continue  # does not fit this model (flow vs noise prediction)
            self.sampler_list.append({"name": name, "aliases": [cls], "options": {}})

    def _authorized(self, request: Request) -> bool:
        if not self.credentials:
            return True
        header = request.headers.get("authorization", "")
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(encoded, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        expected = self.credentials.get(user)
        return expected is not None and secrets.compare_digest(password.encode(), expected.encode())

    @api.get("/healthz")
    async def healthz(self):
        """200 while at least one model replica runs (asked of Serve's controller, not through the request queue,
        so a busy server stays healthy); 503 while none does (starting, or every replica died)."""
        def running() -> int:
            app = serve.status().applications.get(APP_NAME)
            deployment = app.deployments.get("Generator") if app else None
            return sum(n for state, n in (deployment.replica_states if deployment else {}).items()
                       if str(getattr(state, "value", state)) == "RUNNING")

        try:
            replicas = await asyncio.wait_for(asyncio.to_thread(running), timeout=10)
        except Exception as e:
            replicas, error = 0, f"{type(e).__name__}: {e}"
        else:
            error = "no model replica is running"
        if replicas == 0:
            return JSONResponse({"status": "unavailable", "detail": error}, status_code=503,
                                headers={"Retry-After": str(self.cfg.retry_after_s)})
        return {"status": "ok", "model": self.model_title, "replicas": replicas}

    @api.get("/sdapi/v1/samplers")
    async def samplers(self, request: Request):
        if not self._authorized(request):
            return _unauthorized()
        return self.sampler_list

    @api.get("/sdapi/v1/sd-models")
    async def sd_models(self, request: Request):
        if not self._authorized(request):
            return _unauthorized()
        return [{"title": self.model_title, "model_name": self.model_name, "hash": self.model_hash,
                 "sha256": self.model_sha256, "filename": str(Path(self.cfg.bundle).resolve()), "config": None}]

    @api.get("/sdapi/v1/scripts")
    async def scripts(self, request: Request):
        if not self._authorized(request):
            return _unauthorized()
        return {"txt2img": [], "img2img": []}  # no scripts; clients probe this for extensions

    @api.get("/sdapi/v1/options")
    async def options(self, request: Request):
        """A1111's settings as far as this server has them: the one model it serves (clients read
        ``sd_model_checkpoint`` to know it) and its hash."""
        if not self._authorized(request):
            return _unauthorized()
        return {"sd_model_checkpoint": self.model_title, "sd_checkpoint_hash": self.model_sha256,
                "samples_format": "png", "CLIP_stop_at_last_layers": 1}

    @api.post("/sdapi/v1/options")
    async def set_options(self, request: Request):
        """Settings A1111 clients send: the model this server serves is accepted (webuiapi's util_set_model), another
        one is a 422 naming this one; any other setting changes nothing here and is listed under ``ignored``."""
        if not self._authorized(request):
            return _unauthorized()
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return _error(422, "the request body must be a JSON object of A1111 settings")
        wanted = body.get("sd_model_checkpoint")
        if wanted is not None and str(wanted) not in (self.model_title, self.model_name, self.model_hash):
            return _error(422, f"this server serves one model, {self.model_title}; start another `ldm-export serve` "
                               f"for {wanted!r}", "sd_model_checkpoint")
        return {"ignored": {k: v for k, v in body.items() if k != "sd_model_checkpoint"}}

    @api.get("/sdapi/v1/progress")
    async def progress(self, request: Request):
        """A1111's progress, as far as this server follows it: the requests in flight (``state.job_count``; clients
        such as webuiapi's util_wait_for_ready wait for 0), no per-step progress and no preview image."""
        if not self._authorized(request):
            return _unauthorized()
        return {"progress": 0.0, "eta_relative": 0.0, "current_image": None, "textinfo": None,
                "state": {"skipped": False, "interrupted": False, "job": "", "job_count": self.inflight,
                          "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}}

    @api.get("/sdapi/v1/schedulers")
    async def schedulers(self, request: Request):
        """A1111 1.9's schedulers that this server applies (``scheduler`` of a request): Automatic (the sampler's own),
        Karras and Exponential, for the samplers that have them."""
        if not self._authorized(request):
            return _unauthorized()
        return [{"name": n.lower(), "label": n, "aliases": None, "default_rho": -1, "need_inner_model": False}
                for n in ("Automatic", "Karras", "Exponential")]

    async def drain(self, timeout_s: float) -> int:
        """Refuse new txt2img requests (503) and wait up to ``timeout_s`` for those in flight; how many are left.

        Called by ``ldm-export serve`` on SIGINT/SIGTERM before ``serve.shutdown()``, which would drop them."""
        self.draining = True
        t_end = asyncio.get_running_loop().time() + timeout_s
        while self.inflight and asyncio.get_running_loop().time() < t_end:
            await asyncio.sleep(0.1)
        return self.inflight

    @api.post("/sdapi/v1/txt2img")
    async def txt2img(self, request: Request):
        return await self._answer(request, img2img=False)

    @api.post("/sdapi/v1/img2img")
    async def img2img(self, request: Request):
        """A1111's img2img: init_images with denoising_strength (image to image), and a mask (white, or opaque, =
        repaint; inpainting_mask_invert) with mask_blur for inpainting, as `generate --init-image/--mask` runs them."""
        return await self._answer(request, img2img=True)

    @api.api_route("/sdapi/v1/{route:path}", methods=["GET", "POST"])
    async def unknown(self, route: str, request: Request):
        """A route of A1111's API this server does not have: one line naming the ones it has (registered last, so the
        routes above match first)."""
        if not self._authorized(request):
            return _unauthorized()
        return _error(404, f"/sdapi/v1/{route} is not served here; this server answers /sdapi/v1/txt2img, img2img, "
                           "options, progress, samplers, schedulers, sd-models and scripts")

    async def _answer(self, request: Request, img2img: bool):
        if not self._authorized(request):
            return _unauthorized()
        if self.draining:
            return _error(503, "the server is shutting down; retry on another one", headers={"Retry-After": "10"})
        self.inflight += 1
        try:
            return await self._generate(request, img2img)
        finally:
            self.inflight -= 1

    async def _generate(self, request: Request, img2img: bool):
        from pydantic import ValidationError

        route = "img2img" if img2img else "txt2img"
        try:
            raw = await request.json()
        except ValueError:
            return _error(422, f"the request body is not JSON; send A1111's {route} fields as a JSON object")
        if not isinstance(raw, dict):
            return _error(422, f"the request body must be a JSON object, got {type(raw).__name__}")
        try:
            body = (Img2ImgRequest if img2img else Txt2ImgRequest).model_validate(raw).model_dump()
        except ValidationError as e:
            errors = [{"loc": ["body", *map(str, err["loc"])], "msg": err["msg"], "type": err["type"]}
                      for err in e.errors()]
            return JSONResponse({"detail": errors, "error": "; ".join(f"{x['loc'][-1]}: {x['msg']}" for x in errors)},
                                status_code=422)
        try:
            a1111.check_limits(body, self.cfg.max_images, self.max_size)
        except LdmExportError as e:
            return _error(422, str(e))
        distilled = self.takes_guidance and self.family.guidance_is_input()  # FLUX-dev
        try:
            defaults_ignored = a1111.sampling_defaults(body, raw, self.defaults, distilled)
        except LdmExportError as e:
            return _error(422, str(e), "distilled_cfg_scale")
        sampler, ignored = a1111.sampler_for(body)
        sampler, unfit = a1111.fitting_sampler(sampler, self.scheduler_config)
        ignored.update(a1111.ignored_fields(body, sampler, {self.model_title, self.model_name}, img2img))
        if distilled and raw.get("distilled_cfg_scale") is not None:
            ignored.pop("distilled_cfg_scale", None)  # honoured: the guidance
        ignored.update(unfit)
        ignored.update(defaults_ignored)
        ignored.update(a1111.guidance_ignored(body, raw, self.family.uses_cfg(float(body["cfg_scale"])),
                                              self.takes_guidance))
        edit = None
        if img2img:
            if not self.edits:
                why = ("rebuild it with `ldm-export build ... --vae-encoder`" if self.family_edits else
                       f"the {self.family.name} family does not edit images yet (img2img runs on SD 1.x/2.x and SDXL)")
                return _error(422, f"this bundle ({self.model_name}) has no VAE encoder, so it does not edit images; "
                                   f"{why}")
            try:
                edit = a1111.edit_fields(body, whole_mask=self.inpainting_unet,
                                         max_pixels=4 * self.max_size[0] * self.max_size[1])
                if body.get("width") is None or body.get("height") is None:  # the image's own size: the same limits
                    from PIL import Image

                    for k, data in enumerate(edit["init_images"]):
                        w, h = a1111.upright_size(Image.open(io.BytesIO(data)))
                        a1111.check_limits({"width": body.get("width") or w, "height": body.get("height") or h},
                                           self.cfg.max_images, self.max_size, f"init_images[{k}] ")
            except LdmExportError as e:
                field = next((f for f in ("mask", "denoising_strength") if str(e).startswith(f)), "init_images")
                return _error(422, str(e), field)
        try:
            rows = a1111.jobs_for(body, sampler, body.get("seed"), edit)
        except LdmExportError as e:  # a seed generate refuses, with its message
            return _error(422, str(e), "seed")
        jobs = [j for row in rows for j in row]
        try:
            # n_iter rows run one after another, as A1111 does; the images of a row go to the batcher together
            results = []
            for row in rows:
                calls = [self.generator.generate.remote(j) for j in row]
                results += await asyncio.wait_for(asyncio.gather(*calls), timeout=self.cfg.request_timeout_s)
        except Exception as e:
            return self._failure(e)
        bad = next((r["error"] for r in results if "error" in r), None)
        if bad is not None:
            return _error(422, bad)
        infotexts = [r["infotext"] for r in results]
        extra = {"ignored": ignored, "unet_batch": [r["unet_batch"] for r in results]}
        info = a1111.info_json(body, jobs, infotexts, self.model_name, self.model_hash, results[0]["width"],
                               results[0]["height"], extra, inpainting=img2img and self.inpainting_unet,
                               recorded=results[0].get("recorded"))
        images = [base64.b64encode(r["png"]).decode("ascii") for r in results] if body.get("send_images", True) else []
        if img2img and not body.get("include_init_images"):  # A1111 answers without the images it was sent
            body = {**body, "init_images": None, "mask": None}
        return {"images": images, "parameters": body, "info": info}

    def _failure(self, e: Exception) -> JSONResponse:
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
        from ray.serve.exceptions import BackPressureError

        retry = {"Retry-After": str(self.cfg.retry_after_s)}
        if isinstance(e, BackPressureError):
            return _error(503, f"the server is busy: more than --max-queued {self.cfg.max_queued} images are waiting; "
                               f"retry after {self.cfg.retry_after_s} s", headers=retry)
        if isinstance(e, (ActorDiedError, ActorUnavailableError, RayActorError)):
            return _error(503, "the model replica running this request died (it is being replaced); retry the request",
                          headers=retry)
        if isinstance(e, asyncio.TimeoutError):
            return _error(504, f"generation took longer than {self.cfg.request_timeout_s:g} s; "
                               "ask for fewer steps or images")
        logger.exception("generation failed")
        return _error(500, f"generation failed: {type(e).__name__}: {e}")


def build_app(args: dict):
    """The application (``serve deploy`` builder): ``args`` are ``ServeConfig``'s fields."""
    cfg = ServeConfig(**args)
    actor = {"num_cpus": 0, "num_gpus": cfg.gpus_per_replica}
    generator = Generator.options(
        num_replicas=cfg.replicas, max_ongoing_requests=cfg.max_batch, max_queued_requests=cfg.max_queued,
        ray_actor_options=actor, graceful_shutdown_timeout_s=cfg.grace_s,
    ).bind(cfg.bundle, cfg.provider, cfg.threads, cfg.max_batch, cfg.batch_wait_s)
    return Ingress.options(graceful_shutdown_timeout_s=cfg.grace_s).bind(generator, asdict(cfg))
