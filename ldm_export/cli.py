"""The `ldm-export` command line. The only place that prints; errors become one line and an exit code."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import click
from rich.table import Table

from ldm_export.cli_bench import bench
from ldm_export.cli_common import _guard, _human, console, out_console
from ldm_export.cli_lora import lora
from ldm_export.cli_tensorrt import engines
from ldm_export.runtime.errors import LdmExportError

# diffusers warns at import about the optimum / optimum-onnx split distributions; users can't act on it
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log what each stage does.")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.version_option(package_name="ldm-export")
def cli(verbose: bool, debug: bool) -> None:
    """Export latent diffusion models to verified ONNX bundles, and run them."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if debug:
        os.environ["LDM_EXPORT_DEBUG"] = "1"


@cli.command()
@click.option("--model", "model", default=None, help="Model name from the zoo (default: the embedded demo model).")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option("--weights", type=click.Path(path_type=Path), default=None,
              help="A local diffusers folder or a single-file .safetensors checkpoint.")
@click.option("--random-weights", is_flag=True, help="The real architecture with random weights (exports, benchmarks).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --random-weights and verification inputs.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Bundle folder (default: MODEL-PRECISION).")
@click.option("--force", is_flag=True, help="Replace an existing --out.")
@click.option("--static-shape", is_flag=True, help="Fix batch and size to the model's defaults (faster on GPUs).")
@click.option("--target", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Which backend the graphs are for (cuda puts fused GPU kernels in).")
@click.option("--trust-pickle", is_flag=True, help="Allow .ckpt/.bin/.pt weights (loading them runs code).")
@click.option("--threads", type=int, default=None, help="CPU threads for export and verification.")
@click.option("--no-half-vae", is_flag=True, help="With --precision fp16: keep the VAE decoder in fp32 "
              "(for VAEs that overflow fp16 into NaN/black images, like SDXL's original one).")
@click.option("--vae-encoder", is_flag=True, help="Also export the VAE encoder, for image-to-image and inpainting.")
@click.option("--lora", "loras", multiple=True, metavar="FILE[:SCALE]",
              help="Fuse a LoRA (kohya/A1111 or diffusers/PEFT .safetensors) into the weights before export; repeatable.")
@_guard
def build(model, precision, weights, random_weights, seed, out, force, static_shape, target, trust_pickle, threads,
          no_half_vae, vae_encoder, loras):
    """Export a model's components to ONNX, verify each against PyTorch, and write a bundle."""
    from ldm_export.export.build import BuildConfig, build as run_build, validate
    from ldm_export.zoo import DEFAULT_MODEL

    cfg = BuildConfig(model=model or DEFAULT_MODEL, precision=precision, weights=weights, random_weights=random_weights,
                      seed=seed, out=out, force=force, static_shape=static_shape, target=target,
                      trust_pickle=trust_pickle, threads=threads, no_half_vae=no_half_vae,
                      loras=tuple(_parse_loras(loras)), vae_encoder=vae_encoder)
    validate(cfg)  # fail fast, before torch is imported
    t0 = time.perf_counter()
    last = [t0, None]

    def progress(component: str, stage: str, detail: str) -> None:
        now = time.perf_counter()
        if last[1] is not None:
            console.print(f"  [green]✓[/green] {last[1]} [dim]({now - last[0]:.1f} s)[/dim]")
        last[0], last[1] = now, f"{component}: {stage}" + (f" {detail}" if detail else "")
        if stage == "done" and component == "bundle":
            last[1] = None

    with console.status("building...", spinner="dots") as status:
        def shown(component, stage, detail=""):
            progress(component, stage, detail)
            status.update(f"{component}: {stage} {detail}")
        manifest = run_build(cfg, shown)
    _print_summary(cfg.resolved_out(), manifest, time.perf_counter() - t0)


def _parse_loras(loras):
    if not loras:
        return []
    from ldm_export.export.lora import parse_lora

    return [parse_lora(x) for x in loras]


def _print_summary(out: Path, manifest: dict, seconds: float) -> None:
    t = Table(title=f"bundle {out}  ({manifest['model']['name']}, {seconds:.1f} s)")
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
                 ("target", m.get("target")), ("static shape", str(m.get("static_shape"))), ("weights", str(m.get("weights"))),
                 ("created", m.get("created")), ("tools", ", ".join(f"{k} {v}" for k, v in m["tools"].items()))):
        head.add_row(k, str(v))
    out_console.print(head)
    t = Table(title="components")
    for col in ("component", "precision", "inputs", "outputs", "kernels", "verification"):
        t.add_column(col)
    for comp, info in m["components"].items():
        spec = b.spec(comp)
        io = lambda ts: "\n".join(f"{x.name} {x.dtype} {list(x.shape)}" for x in ts)  # noqa: E731
        ver = "\n".join(f"{p}: cos {min(v['cosine'] for v in r['outputs'].values()):.6f}" for p, r in info["verification"].items())
        t.add_row(comp, info["precision"], io(spec.inputs), io(spec.outputs), ", ".join(info.get("kernels") or []) or "-", ver)
    out_console.print(t)
    if no_hashes:
        return
    bad = b.check_hashes()
    if bad:
        raise LdmExportError(f"sha256 mismatch in {', '.join(bad)}; the bundle was changed or damaged, rebuild it", exit_code=1)
    out_console.print(f"[green]all {len(m['files'])} files match their sha256[/green]")


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
@click.option("--steps", type=int, default=20, show_default=True)
@click.option("--cfg", "cfg", type=float, default=7.5, show_default=True, help="Guidance scale (<= 1 skips the unconditional pass).")
@click.option("--sampler", default=None, help="Sampler (A1111 or diffusers name; `ldm-export samplers` lists them). Default: the bundle's.")
@click.option("--seed", type=int, default=None, help="Seed (default: random, printed and stored in the PNG).")
@click.option("--size", default=None, help="WIDTHxHEIGHT, multiples of 8 (default: the model's resolution).")
@click.option("--num-images", type=int, default=1, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=Path("image.png"), show_default=True,
              help="PNG path; with several images, -1, -2, ... are added before .png.")
@click.option("--provider", type=click.Choice(["cpu", "cuda", "tensorrt", "tensorrt-native"]), default="cpu", show_default=True,
              help="ONNX Runtime on the CPU, CUDA or its TensorRT provider; tensorrt-native runs the bundle's TensorRT engines "
                   "(`ldm-export engines BUNDLE`).")
@click.option("--threads", type=int, default=None, help="CPU threads for ONNX Runtime.")
@click.option("--cfg-mode", type=click.Choice(["batch2", "sequential"]), default="batch2", show_default=True,
              help="CFG as one batch-2 UNet run, or two batch-1 runs where memory is tight.")
@click.option("--guidance-rescale", type=float, default=0.0, show_default=True)
@click.option("--verify", is_flag=True, help="Check every file's sha256 before loading.")
@click.option("--init-image", type=click.Path(path_type=Path), default=None,
              help="Image-to-image from this RGB image (the bundle needs a VAE encoder: build --vae-encoder).")
@click.option("--strength", type=float, default=0.8, show_default=True,
              help="With --init-image: how much to repaint, in (0, 1]; it picks the first of --steps that runs.")
@click.option("--mask", "mask", type=click.Path(path_type=Path), default=None,
              help="Inpaint: white repaints, black keeps (pixels outside the mask stay exactly the original ones).")
@click.option("--mask-blur", type=float, default=0.0, show_default=True, help="Gaussian blur of the mask, in pixels.")
@click.option("--refiner", type=click.Path(path_type=Path), default=None,
              help="An SDXL refiner bundle that finishes the last steps (see --refiner-start).")
@click.option("--refiner-start", type=float, default=0.8, show_default=True,
              help="With --refiner: the fraction of the schedule the base runs before handing off.")
@_guard
def generate(bundle, prompt, negative, steps, cfg, sampler, seed, size, num_images, out, provider, threads, cfg_mode,
             guidance_rescale, verify, init_image, strength, mask, mask_blur, refiner, refiner_start):
    """Generate images from a bundle with the numpy runtime; PNGs carry A1111 "parameters" metadata."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ldm_export.runtime.image import save_png
    from ldm_export.runtime.pipeline import Pipeline

    width, height = _parse_size(size)
    t0 = time.perf_counter()
    pipe = Pipeline.from_bundle(bundle, provider=provider, verify=verify, threads=threads, cfg_mode=cfg_mode)
    t_load = time.perf_counter() - t0
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("sampling", total=steps)
        t1 = time.perf_counter()
        common = dict(negative_prompt=negative, num_inference_steps=steps, guidance_scale=cfg, seed=seed, width=width,
                      height=height, scheduler=sampler, num_images=num_images, guidance_rescale=guidance_rescale,
                      callback=lambda i, n, x: bar.update(task, advance=1))
        if init_image is None and mask is not None:
            raise LdmExportError("--mask needs --init-image (the image to inpaint)")
        edit = dict(init_image=init_image, strength=strength, mask_image=mask, mask_blur=mask_blur) if init_image else {}
        if refiner is None:
            images = pipe(prompt, **common, **edit)
        else:
            if edit:
                raise LdmExportError("--refiner hands text-to-image latents over; it does not take --init-image yet")
            refine = Pipeline.from_bundle(refiner, provider=provider, verify=verify, threads=threads, cfg_mode=cfg_mode)
            if seed is None:
                import numpy as np

                common["seed"] = seed = int(np.random.default_rng().integers(0, 2**32 - 1))
            latents = pipe(prompt, **common, denoising_end=refiner_start, return_latents=True)
            images = refine(prompt, **common, latents=latents, denoising_start=refiner_start)
        t_gen = time.perf_counter() - t1
    out.parent.mkdir(parents=True, exist_ok=True) if str(out.parent) else None
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}-{k + 1}{out.suffix or '.png'}") for k in range(len(images))]
    for img, p in zip(images, paths):
        try:
            save_png(img, p, img.info["parameters"])
        except OSError as e:
            raise LdmExportError(f"cannot write {p}: {e.strerror}; choose another --out") from None
        out_console.print(f"wrote {p}")
    out_console.print(images[0].info["parameters"].splitlines()[-1], soft_wrap=True)
    console.print(f"[dim]load {t_load:.2f} s, generate {t_gen:.2f} s ({t_gen / len(images):.2f} s per image)[/dim]")


@cli.command()
def samplers() -> None:
    """List the sampler names `generate --sampler` takes."""
    from ldm_export.runtime.schedulers import sampler_names

    for name in sampler_names():
        out_console.print(name)


cli.add_command(bench)
cli.add_command(engines)
cli.add_command(lora)


def main() -> None:
    cli(prog_name="ldm-export")


if __name__ == "__main__":
    main()
