"""The `ldm-export` command line. The only place that prints; errors become one line and an exit code."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

from ldm_export.cli_bench import bench
from ldm_export.cli_common import OneLineErrors, _guard, _human, console, interrupted_within, out_console, signals_deferred
from ldm_export.cli_int8 import int8_config, int8_options, quantize
from ldm_export.cli_lora import lora
from ldm_export.cli_tensorrt import engines
from ldm_export.runtime.errors import LdmExportError, sigterm_as_interrupt
from ldm_export.serve.cli import loadtest, serve

# diffusers warns at import about the optimum / optimum-onnx split distributions; users can't act on it
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log what each stage does.")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.version_option(package_name="ldm-export")
def cli(verbose: bool, debug: bool) -> None:
    """Export latent diffusion models to verified ONNX bundles, and run them."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if debug:
        os.environ["LDM_EXPORT_DEBUG"] = "1"


@cli.command()
@click.option("--model", "model", default=None,
              help="Model name from the zoo, or 'auto': the architecture the --weights say (a diffusers folder's "
                   "configs, a .safetensors checkpoint's keys); the default with such --weights, else the embedded "
                   "demo model.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32", show_default=True,
              help="int8: the UNet as QDQ int8 calibrated on the sampler's own inputs (text encoder and VAE stay fp32).")
@click.option("--weights", type=click.Path(path_type=Path), default=None,
              help="A local diffusers folder or a single-file .safetensors checkpoint.")
@click.option("--random-weights", is_flag=True, help="The real architecture with random weights (exports, benchmarks).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --random-weights and verification inputs (-1: a random one, printed; with --random-weights recorded in the manifest).")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Bundle folder (default: MODEL-PRECISION).")
@click.option("--force", is_flag=True, help="Replace an existing --out.")
@click.option("--static-shape", is_flag=True, help="Fix batch and size to the model's defaults (faster on GPUs).")
@click.option("--sequential-cfg", is_flag=True,
              help="With --static-shape: the denoiser at batch 1, CFG as two calls a step (half its activation memory; "
                   "an SD3 transformer on --target cuda then gets the fused AdaLN modulation).")
@click.option("--fused-attention", is_flag=True,
              help="--target cpu: the UNet's attention as ONNX Runtime's MultiHeadAttention (no full score matrices: "
                   "the lowest memory with generate --low-memory; TensorRT cannot parse it).")
@click.option("--target", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu", show_default=True,
              help="Which backend the graphs are for (cuda puts ONNX Runtime's fused GPU kernels in; tensorrt keeps "
                   "standard ops in the patterns TensorRT fuses, for `ldm-export engines`).")
@click.option("--trust-pickle", is_flag=True, help="Allow .ckpt/.bin/.pt weights (loading them runs code).")
@click.option("--threads", type=int, default=None, help="CPU threads for export and verification.")
@click.option("--no-half-vae", is_flag=True, help="With --precision fp16: keep the VAE decoder in fp32 "
              "(for VAEs that overflow fp16 into NaN/black images, like SDXL's original one).")
@click.option("--vae-encoder", is_flag=True, help="Also export the VAE encoder, for image-to-image and inpainting "
              "(U-Net families; an inpainting UNet's bundle always has it).")
@click.option("--lora", "loras", multiple=True, metavar="FILE[:SCALE]",
              help="Fuse a LoRA (kohya/A1111 or diffusers/PEFT .safetensors) into the weights before export; repeatable.")
@int8_options
@_guard
def build(model, precision, weights, random_weights, seed, out, force, static_shape, sequential_cfg, fused_attention, target,
          trust_pickle, threads, no_half_vae, vae_encoder, loras, **int8):
    """Export a model's components to ONNX, verify each against PyTorch, and write a bundle."""
    from ldm_export.export.build import BuildConfig, build as run_build, validate
    from ldm_export.zoo import AUTO_MODEL, DEFAULT_MODEL

    if model is None:  # weights say their own architecture (a folder's configs, a single file's keys); else the demo
        model = AUTO_MODEL if weights is not None else DEFAULT_MODEL
    cfg = BuildConfig(model=model, precision=precision, weights=weights, random_weights=random_weights,
                      seed=seed, out=out, force=force, static_shape=static_shape, target=target,
                      fused_attention=fused_attention, sequential_cfg=sequential_cfg,
                      trust_pickle=trust_pickle, threads=threads, no_half_vae=no_half_vae, int8=int8_config(**int8),
                      loras=tuple(_parse_loras(loras)), vae_encoder=vae_encoder)
    validate(cfg)  # fail fast, before torch is imported
    t0 = time.perf_counter()
    last = [t0, None]

    def progress(component: str, stage: str, detail: str) -> None:
        now = time.perf_counter()
        if last[1] is not None:
            console.print(f"  [green]✓[/green] {escape(last[1])} [dim]({now - last[0]:.1f} s)[/dim]")
        last[0], last[1] = now, f"{component}: {stage}" + (f" {detail}" if detail else "")
        if stage == "done" and component == "bundle":
            last[1] = None

    try:
        with console.status("building...", spinner="dots") as status:
            def shown(component, stage, detail=""):
                progress(component, stage, detail)
                status.update(escape(f"{component}: {stage} {detail}"))
            manifest = run_build(cfg, shown)
    except (KeyboardInterrupt, Exception) as e:  # Ctrl-C, or one that cut an import short (ImportError from it)
        if not interrupted_within(e):
            raise
        # the staging folder is gone by now (bundle_writer.staging)
        raise LdmExportError(f"interrupted: the build stopped; nothing was written to {cfg.resolved_out()}",
                             exit_code=130) from None
    _print_summary(cfg.resolved_out(), manifest, time.perf_counter() - t0)


def _parse_loras(loras):
    if not loras:
        return []
    from ldm_export.export.lora import parse_lora

    return [parse_lora(x) for x in loras]


def _print_summary(out: Path, manifest: dict, seconds: float) -> None:
    t = Table(title=escape(f"bundle {out}  ({manifest['model']['name']}, {seconds:.1f} s)"))
    for col in ("component", "precision", "files", "size", "verification (vs torch fp32)"):
        t.add_column(col)
    for comp, info in manifest["components"].items():
        size = sum(manifest["files"][f]["size"] for f in info["files"])
        ver = []
        for prec, rep in info["verification"].items():
            worst = min(v["cosine"] for v in rep["outputs"].values())
            mx = max(v["max_abs"] for v in rep["outputs"].values())
            ver.append(f"{prec}: cos {worst:.6f}, max|err| {mx:.2g} {'ok' if rep['passed'] else 'FAIL'}")
        t.add_row(comp, info["precision"], ", ".join(Path(f).name for f in info["files"]), _human(size), "; ".join(ver))
    total = sum(f["size"] for f in manifest["files"].values())
    t.caption = f"{len(manifest['files'])} files, {_human(total)} in all"
    out_console.print(t)
    _print_int8(manifest)


def _print_int8(manifest: dict) -> None:
    """The int8 section of a manifest (calibration, quant level, quality against fp32) as a table."""
    if "int8" not in manifest:
        return
    from ldm_export.calibration.report import quality_rows

    q = Table(show_header=False, title="int8 quality (against the fp32 graphs)")
    for label, value in quality_rows(manifest):
        q.add_row(label, value)
    out_console.print(q)


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--no-hashes", is_flag=True, help="Skip the sha256 check of every file.")
@_guard
def inspect(bundle: Path, no_hashes: bool) -> None:
    """Print a bundle's manifest as tables and check every file's sha256."""
    from ldm_export.runtime.bundle import Bundle

    b = Bundle.open(bundle)
    m = b.manifest
    head = Table(show_header=False, title=f"{bundle}")
    for k, v in (("model", f"{m['model']['name']} ({m['model']['description']})"), ("format", f"{m['format']} v{m['format_version']}"),
                 ("target", m.get("target")), ("static shape", str(m.get("static_shape"))),
                 ("created", m.get("created")), ("tools", ", ".join(f"{k} {v}" for k, v in m["tools"].items()))):
        head.add_row(k, str(v))
    out_console.print(head)
    out_console.print(_weights_table(m.get("weights") or {}))
    t = Table(title="components")
    for col in ("component", "precision", "inputs", "outputs", "kernels", "verification"):
        t.add_column(col)
    for comp, info in m["components"].items():
        spec = b.spec(comp)
        io = lambda ts: "\n".join(f"{x.name} {x.dtype} {list(x.shape)}" for x in ts)  # noqa: E731
        ver = "\n".join(f"{p}: cos {min(v['cosine'] for v in r['outputs'].values()):.6f}" for p, r in info["verification"].items())
        t.add_row(comp, info["precision"], io(spec.inputs), io(spec.outputs), ", ".join(info.get("kernels") or []) or "-", ver)
    out_console.print(t)
    _print_int8(m)
    if no_hashes:
        return
    bad = b.check_hashes()
    if bad:
        raise LdmExportError(f"sha256 mismatch in {', '.join(bad)}; the bundle was changed or damaged, rebuild it", exit_code=1)
    out_console.print(f"[green]all {len(m['files'])} files match their sha256[/green]")


def _weights_table(weights: dict) -> Table:
    """The manifest's weights record as rows: source, model, path, seed, sha256, then one row per source file."""
    t = Table(title="weights", show_header=False)
    for key, value in weights.items():
        if key == "files" or value is None:
            continue
        t.add_row(key, str(value))
    for name, sha in (weights.get("files") or {}).items():
        t.add_row(f"  {name}", f"sha256 {sha[:16]}…")
    if not t.row_count:
        t.add_row("source", "not recorded")
    return t


def _parse_size(size: str | None) -> tuple[int | None, int | None]:
    if size is None:
        return None, None
    try:
        w, h = (int(x) for x in size.lower().split("x"))
    except ValueError:
        raise LdmExportError(f"--size must look like 512x512 (WIDTHxHEIGHT), got '{size}'") from None
    return w, h


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("prompt", type=str)
@click.option("--negative", "negative", default=None, help="Negative prompt.")
@click.option("--steps", type=int, default=None, help="Sampling steps (default: the model's; 20 for SD 1.x, 28 for SD3, 4 for FLUX-schnell).")
@click.option("--cfg", "cfg", type=float, default=None,
              help="Guidance scale, 0 to 100 (<= 1 skips the unconditional pass; default: the model's, 7.5 for SD 1.x, "
                   "5 for SDXL, 7 for SD3, 3.5 for FLUX-dev).")
@click.option("--sampler", default=None, help="Sampler (A1111 or diffusers name; `ldm-export samplers` lists them). Default: the bundle's.")
@click.option("--seed", type=int, default=None, help="Seed; image k gets SEED+k (default or -1: random, printed and stored in the image).")
@click.option("--size", default=None, help="WIDTHxHEIGHT (default: the init image's size, else the model's resolution; "
              "an init image of another size is resized); the multiple it must be comes from the model's denoiser.")
@click.option("--num-images", type=int, default=1, show_default=True,
              help="Images to make; each is saved as soon as its batch is done.")
@click.option("--out", type=click.Path(), default="image.png", show_default=True,  # text as typed: a trailing / means a folder
              help="Image path (.png, .jpg/.jpeg or .webp; A1111's parameters inside; a name without an extension "
                   "gets .png), or a folder (an existing one, or a name ending in /: image.png inside it); with several "
                   "images, -1, -2, ... are added before the extension.")
@click.option("--provider", type=click.Choice(["cpu", "cuda", "tensorrt", "nv-tensorrt-rtx", "tensorrt-native"]), default="cpu",
              show_default=True,
              help="ONNX Runtime on the CPU, CUDA, or its TensorRT / NvTensorRTRTX provider (caches in the bundle); "
                   "tensorrt-native runs the bundle's TensorRT engines (`ldm-export engines BUNDLE`).")
@click.option("--cudnn-search", type=click.Choice(["HEURISTIC", "DEFAULT", "EXHAUSTIVE"], case_sensitive=False),
              default=None, help="cuDNN's convolution algorithm search on --provider cuda (default: "
                                 "$LDM_EXPORT_CUDNN_SEARCH, else the runtime's; EXHAUSTIVE makes the first image slow).")
@click.option("--threads", type=int, default=None, help="CPU threads for ONNX Runtime (at most this machine's cores).")
@click.option("--cfg-mode", type=click.Choice(["batch2", "sequential"]), default="batch2", show_default=True,
              help="CFG as one batch-2 UNet run, or two batch-1 runs where memory is tight.")
@click.option("--guidance-rescale", type=float, default=0.0, show_default=True, help="0 to 1 (0.7 is the paper's value).")
@click.option("--verify", is_flag=True, help="Check every file's sha256 before loading.")
@click.option("--low-memory", is_flag=True, help="One component in memory at a time, sequential CFG, tiled VAE decode "
              "above 512 px (Jetson-class devices).")
@click.option("--init-image", type=click.Path(path_type=Path), default=None,
              help="Image-to-image from this RGB image (the bundle needs a VAE encoder: build --vae-encoder).")
@click.option("--strength", type=float, default=0.8, show_default=True,
              help="With --init-image: how much to repaint, in (0, 1]; it picks the first of --steps that runs.")
@click.option("--mask", "mask", type=click.Path(path_type=Path), default=None,
              help="Inpaint: white repaints, black keeps (black pixels stay exactly the original ones; grey ones are "
                   "blended by their level, as in A1111).")
@click.option("--mask-blur", type=float, default=0.0, show_default=True, help="Gaussian blur of the mask, in pixels.")
@click.option("--refiner", type=click.Path(path_type=Path), default=None,
              help="An SDXL refiner bundle that finishes the last steps (see --refiner-start).")
@click.option("--refiner-start", type=float, default=0.8, show_default=True,
              help="With --refiner: the fraction of the schedule the base runs before handing off.")
@_guard
def generate(bundle, prompt, negative, steps, cfg, sampler, seed, size, num_images, out, provider, cudnn_search, threads,
             cfg_mode, guidance_rescale, verify, low_memory, init_image, strength, mask, mask_blur, refiner, refiner_start):
    """Generate images from a bundle with the numpy runtime; each carries A1111's "parameters" metadata."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ldm_export.runtime.image import check_writable, output_paths, save_image
    from ldm_export.runtime.pipeline import Pipeline

    width, height = _parse_size(size)
    ctx = click.get_current_context()
    for option, needs, value in (("strength", "--init-image", init_image), ("mask_blur", "--mask", mask),
                                 ("refiner_start", "--refiner", refiner)):
        if value is None and ctx.get_parameter_source(option) is click.core.ParameterSource.COMMANDLINE:
            raise LdmExportError(f"--{option.replace('_', '-')} applies with {needs}; give {needs} too, or leave it out")
    if num_images < 1:
        raise LdmExportError(f"--num-images must be at least 1, got {num_images}")
    if low_memory and cfg_mode == "batch2" and ctx.get_parameter_source("cfg_mode") is click.core.ParameterSource.COMMANDLINE:
        logging.getLogger("ldm_export").warning("--low-memory runs CFG as two batch-1 UNet calls: --cfg-mode batch2 is ignored")
    paths = output_paths(out, num_images)
    for p in paths:  # before any work: a bad --out fails now, not after the images are made
        check_writable(p)
    for option, source in (("--init-image", init_image), ("--mask", mask)):
        hit = next((p for p in paths if source is not None and Path(os.path.realpath(p)) == Path(os.path.realpath(source))), None)
        if hit is not None:  # writing the image would replace the input it is made from
            raise LdmExportError(f"--out would write {hit}, the {option} file itself; choose another --out")
    if cudnn_search and provider != "cuda":
        raise LdmExportError("--cudnn-search applies to --provider cuda")
    t0 = time.perf_counter()
    pipe = Pipeline.from_bundle(bundle, provider=provider, verify=verify, threads=threads, cfg_mode=cfg_mode,
                                cudnn_search=cudnn_search.upper() if cudnn_search else None, low_memory=low_memory)
    t_load = time.perf_counter() - t0
    steps = pipe.bundle.defaults["steps"] if steps is None else steps  # the model's own defaults
    cfg = pipe.bundle.defaults["guidance_scale"] if cfg is None else cfg
    if init_image is None and mask is not None:
        raise LdmExportError("--mask needs --init-image (the image to inpaint)")
    if mask is not None and paths[0].suffix.lower() != ".png":
        console.print(f"[yellow]warning:[/yellow] {paths[0].suffix} is lossy: the pixels outside the mask stay the "
                      "original ones exactly only in a .png", soft_wrap=True)
    edit = dict(init_image=init_image, strength=strength, mask_image=mask, mask_blur=mask_blur) if init_image else {}
    # sampling runs: one per batch of images (a refiner hand-off goes image by image, each run in two parts)
    runs = len(paths) if refiner is not None else -(-len(paths) // pipe.images_per_batch(cfg))

    def tick(i, n, x):
        if i == 0 and refiner is None:  # n: the steps this run takes (fewer than --steps for img2img's strength)
            bar.update(task, total=n * runs)
        bar.advance(task)

    common = dict(negative_prompt=negative, num_inference_steps=steps, guidance_scale=cfg, width=width, height=height,
                  scheduler=sampler, guidance_rescale=guidance_rescale, callback=tick)
    if refiner is None:
        images = pipe.iter_images(prompt, seed=seed, num_images=num_images, **common, **edit)
    else:
        if edit:
            raise LdmExportError("--refiner hands text-to-image latents over; it does not take --init-image yet")
        refine = Pipeline.from_bundle(refiner, provider=provider, verify=verify, threads=threads, cfg_mode=cfg_mode,
                                      cudnn_search=cudnn_search.upper() if cudnn_search else None, low_memory=low_memory)
        _check_refiner(pipe, refine, width, height)
        images = _refined(pipe, refine, prompt, seed, num_images, refiner_start, common)
    written: list[Path] = []
    times: list[float] = []
    last = None
    try:
        # no bar where stderr is no terminal: rich ends a bar there with an empty line, before any error's one line
        with sigterm_as_interrupt(), Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                               TimeElapsedColumn(), console=console, transient=True,
                                               disable=not console.is_terminal) as bar:
            task = bar.add_task("sampling", total=steps * runs)
            t1 = time.perf_counter()
            for k, image in images:
                last = image.info["parameters"]
                replaced = paths[k].exists()  # --out names the file: replaced, as cp or curl -o would, and said so
                with signals_deferred():  # an interrupt between the rename and the count would misreport
                    paths[k].parent.mkdir(parents=True, exist_ok=True)  # made now: a refused run leaves no folder
                    save_image(image, paths[k], last)
                    written.append(paths[k])
                times.append(time.perf_counter() - t1)
                out_console.print(f"wrote {escape(str(paths[k]))}" + (" (replaced the file there)" if replaced else ""),
                                  soft_wrap=True)
    except KeyboardInterrupt:
        names = ", ".join(map(str, written)) if len(written) <= 3 else f"{written[0]} ... {written[-1]}"
        done = f"{len(written)} of {len(paths)} images were written ({names})" if written else "no image was written"
        raise LdmExportError(f"interrupted: {done}; each written image is complete", exit_code=130) from None
    out_console.print(escape(last.splitlines()[-1]), soft_wrap=True)  # "Refiner: NAME [HASH]" is no markup
    per_batch = 1 if refiner is not None else min(pipe.images_per_batch(cfg), len(paths))  # a refiner: image by image
    if len(times) == 1:
        console.print(f"[dim]load {t_load:.2f} s, generate {times[0]:.2f} s[/dim]")
    elif per_batch > 1:
        console.print(f"[dim]load {t_load:.2f} s, generate {times[-1]:.2f} s ({times[-1] / len(times):.2f} s per image, "
                      f"batches of {per_batch})[/dim]")
    else:  # one image a batch (static-shape bundles): the first carries the engines' warm-up, the others run warm
        per = (times[-1] - times[0]) / (len(times) - 1)
        console.print(f"[dim]load {t_load:.2f} s, first image {times[0]:.2f} s, then {per:.2f} s per image[/dim]")


def _check_refiner(pipe, refine, width, height) -> None:
    """A refiner continues the base's latents: refuse one that reads latents of another VAE (channels, scale, shift),
    or that cannot take the image's size (a static-shape bundle), before the base has run."""
    def latents(p):
        f = p.latent_format
        return (f"'{p.bundle.model.get('name')}' ({f.channels} latent channels, scale {f.scale:g}, shift {f.shift:g}, "
                f"{f.vae_scale_factor} px a latent)")

    if refine.latent_format != pipe.latent_format:
        raise LdmExportError(f"refiner {refine.bundle.path} is {latents(refine)} but the base {pipe.bundle.path} is "
                             f"{latents(pipe)}; a refiner must share the base's latents (sdxl-refiner for sdxl)")
    def flow(p):
        return p.bundle.scheduler_config.get("_class_name") == "FlowMatchEulerDiscreteScheduler"

    if flow(refine) != flow(pipe):  # mid-schedule latents differ: (1-s) x0 + s e against x0 + s e
        kinds = {True: "flow matching", False: "noise prediction"}
        raise LdmExportError(f"the base {pipe.bundle.path} samples by {kinds[flow(pipe)]} but the refiner "
                             f"{refine.bundle.path} by {kinds[flow(refine)]}; their latents mid-schedule differ, so "
                             "hand over between models of one kind (sdxl and sdxl-refiner)")
    from ldm_export.runtime.editing import is_inpainting_unet

    for p, role in ((refine, "refiner"), (pipe, "base")):
        spec = p.engines[p.family.denoiser].spec
        if is_inpainting_unet(spec, p.latent_channels):
            raise LdmExportError(f"the {role} {p.bundle.path} is an inpainting UNet ({spec.inputs[0].shape[1]} input "
                                 "channels: latents, mask, masked-image latents); a base + refiner hand-off runs "
                                 "text-to-image UNets (sdxl and sdxl-refiner)")
    refine._size(*pipe._size(width, height, warn=False), warn=False)  # the off-model warning comes with the image


def _refined(pipe, refine, prompt, seed, num_images, start, common):
    """SDXL base then refiner, one image at a time (image k: seed + k): the base runs the first ``start`` of the
    schedule and hands its latents over (diffusers' denoising_end / denoising_start)."""
    from ldm_export.runtime.checks import resolve_seed
    from ldm_export.runtime.image import parse_parameters
    from ldm_export.runtime.pipeline import strip_extra_networks

    seed = resolve_seed(seed)
    # A1111's extra-network tags, checked once against the LoRAs of both models (each call alone warned, per image,
    # about the other model's LoRAs)
    negative = common.get("negative_prompt")
    prompt, stripped = strip_extra_networks([prompt, negative or ""], pipe.bundle.manifest, refine.bundle.manifest)
    if negative is not None:  # an absent negative prompt stays absent (SDXL encodes it as zeros)
        common = {**common, "negative_prompt": stripped}
    for k in range(num_images):
        s = (seed + k) % 2**32  # image k's seed wraps as Pipeline.iter_images wraps it
        latents = pipe(prompt, seed=s, denoising_end=start, return_latents=True, **common)
        image = refine(prompt, seed=s, latents=latents, denoising_start=start, **common)[0]
        # A1111's infotext of a refined image: the base as Model, the LoRAs of both (the base's first), then
        # "Refiner: NAME [HASH], Refiner switch at: F"
        p = parse_parameters(image.info["parameters"])
        extra = {key: v for key, v in p.get("extra", {}).items() if key != "Lora hashes"}
        extra.update({"Refiner": f"{refine.bundle.model.get('name')} [{refine.bundle.model_hash}]",
                      "Refiner switch at": start})
        image.info["parameters"] = pipe.infotext(prompt, p.get("negative_prompt"), steps=p["steps"], sampler=p["sampler"],
                                                 guidance_scale=p["cfg_scale"], seed=p["seed"], width=p["width"],
                                                 height=p["height"], extra=extra, also=(refine,))
        yield k, image


@cli.command()
def samplers() -> None:
    """List the sampler names `generate --sampler` takes."""
    from ldm_export.runtime.schedulers import sampler_names

    for name in sampler_names():
        out_console.print(name)


@cli.command()
def models() -> None:
    """List the zoo's models `build --model` takes: name, family, default size, weights, what it is (tab-separated)."""
    from ldm_export.zoo import DEFAULT_MODEL, MODELS

    for name, spec in sorted(MODELS.items()):
        weights = "embedded weights" if spec.embedded_weights is not None else "needs --weights or --random-weights"
        default = "(the default) " if name == DEFAULT_MODEL else ""
        click.echo(f"{name}\t{spec.family}\t{spec.resolution} px\t{weights}\t{default}{spec.description}")
    click.echo("auto\t(any)\t-\t--weights PATH\tthe architecture a diffusers folder or a .safetensors file says")


cli.add_command(bench)
cli.add_command(engines)
cli.add_command(serve)
cli.add_command(loadtest)
cli.add_command(quantize)
cli.add_command(lora)


def main() -> None:
    cli(prog_name="ldm-export")


if __name__ == "__main__":
    main()
