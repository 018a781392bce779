"""`ldm-export bench`: the click command over ``ldm_export.bench.run``."""
from __future__ import annotations

import tempfile
from pathlib import Path

import click

from ldm_export.cli_common import _guard
from ldm_export.runtime.errors import sigterm_as_interrupt


@click.command()
@click.option("--model", default=None, help="Zoo model to build and bench when no --bundle is given (default: the embedded "
              "demo model; models without embedded weights get --random-weights).")
@click.option("--bundle", type=click.Path(path_type=Path), default=None,
              help="A bundle from `ldm-export build` (its model and weights are used by every backend). Default: --model "
                   "built into a temporary folder (fp32 on cpu; fp16, --target cuda, --static-shape on cuda).")
@click.option("--weights", type=click.Path(path_type=Path), default=None,
              help="The weights a --bundle was built from, for the PyTorch backends (bundles keep no build-machine paths).")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default="cuda", show_default=True)
@click.option("--backends", default="torch-eager,torch-compile,ort,tensorrt", show_default=True,
              help="Comma-separated: torch-eager, torch-compile, ort, ort-nhwc, ort-int8 (needs --int8-bundle), tensorrt. "
                   "An ort backend may carry its own CUDA provider options, so that variants run side by side: "
                   "ort-nhwc:fuse_conv_bias=1 or ort-nhwc:sdpa_kernel=1:fuse_conv_bias=1.")
@click.option("--lora", "loras", multiple=True, metavar="FILE[:SCALE]",
              help="A LoRA the --bundle holds (build --lora / ldm-export lora), for the PyTorch backends and the "
                   "fidelity reference; repeat in the bundle's order (a bundle keeps only their names).")
@click.option("--int8-bundle", type=click.Path(path_type=Path), default=None,
              help="An int8 bundle of the same model and weights as --bundle, for the ort-int8 backend.")
@click.option("--steps", type=int, default=50, show_default=True, help="Sampler steps end to end.")
@click.option("--repeats", type=int, default=20, show_default=True, help="Timed runs per component after warm-up.")
@click.option("--e2e-repeats", type=int, default=3, show_default=True, help="Timed end-to-end runs after one warm-up.")
@click.option("--warmup", type=int, default=3, show_default=True, help="Untimed runs per component before timing.")
@click.option("--guidance-scale", type=float, default=None,
              help="Guidance scale. Default: 7.5 for U-Net models (timed as CFG's batch of 2); a DiT bundle's own "
                   "default (SD3 7.0, FLUX-dev 3.5, FLUX-schnell 0: no CFG).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=None, help="CPU threads (cpu device).")
@click.option("--profile", is_flag=True, help="Add a GPU kernel profile (device time by kind of kernel) of the UNet or DiT transformer and the VAE decoder (cuda, static-shape bundles).")
@click.option("--cuda-option", "cuda_options", multiple=True, metavar="KEY=VALUE",
              help="An ONNX Runtime CUDA provider option for the ort backends (repeatable), e.g. fuse_conv_bias=1.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("bench-out"), show_default=True,
              help="Folder for bench_<model>_<device>.json/.md/.png.")
@_guard
def bench(model, bundle, loras, int8_bundle, weights, device, backends, steps, repeats, e2e_repeats, warmup, guidance_scale, seed,
          threads, profile, cuda_options, out):
    """Time text encoder, UNet step, VAE decode and end to end on each backend; write JSON, markdown and a chart."""
    from ldm_export.cli_common import console
    from ldm_export.bench.run import parse_backend
    from ldm_export.runtime.errors import LdmExportError

    names = tuple(b.strip() for b in backends.split(",") if b.strip())
    if not names:
        raise LdmExportError("--backends names no backend; e.g. --backends torch-eager,ort")
    bases = [parse_backend(b)[0] for b in names]  # an unknown name or a malformed option fails here, before any work
    if int8_bundle is not None and "ort-int8" not in bases:  # it would be ignored, and no int8 row come out
        raise LdmExportError("--int8-bundle is timed by the ort-int8 backend: add it to --backends "
                             "(e.g. --backends ort,ort-int8), or leave --int8-bundle out")
    if steps < 1 or repeats < 1 or e2e_repeats < 1:
        raise LdmExportError("--steps, --repeats and --e2e-repeats must be at least 1")
    if warmup < 0:
        raise LdmExportError(f"--warmup must be 0 or more runs, got {warmup}")
    if threads is not None and threads < 1:
        raise LdmExportError(f"--threads must be a positive integer, got {threads}")
    if bundle is not None and model is not None:  # one would be ignored
        raise LdmExportError("--model names the zoo model to build for a bench without --bundle; with --bundle the "
                             "bundle's own model is timed: pass one of them")
    from ldm_export.runtime.checks import refuse_out_under_a_file

    refuse_out_under_a_file(out)  # before any timing: the reports are written at the end
    if out.exists() and not out.is_dir():
        raise LdmExportError(f"--out {out} is a file; the bench writes its reports into a folder: pass a folder")
    if bundle is None and loras:  # before the build: a bundle made here holds none
        raise LdmExportError("--lora names the LoRAs a --bundle holds; build one with `ldm-export build --lora ...` "
                             "and pass --bundle DIR")
    bad = [o for o in cuda_options if "=" not in o or not o.split("=", 1)[0].strip()]
    if bad:
        raise LdmExportError(f"--cuda-option takes KEY=VALUE (an ONNX Runtime CUDA provider option), got {bad[0]!r}")
    from ldm_export.bench.run import check_device_options

    check_device_options(device, cuda_options, profile, names)  # before any bundle is built for the bench
    if bundle is None and device == "cuda":  # the default: its bundle would be a cuda-target build
        from ldm_export.runtime.engine_cuda import cuda_available

        if not cuda_available():
            raise LdmExportError("bench runs on --device cuda by default, and this machine has no CUDA provider "
                                 "(a GPU with onnxruntime-gpu): pass --device cpu")
    made = [p for p in (out, *out.parents) if not p.exists()]  # what mkdir adds: removed again if the run fails
    try:  # before any timing: the reports come at the end
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LdmExportError(f"cannot write the reports into --out {out}: {e.strerror or e}; pass a writable folder") from None
    try:
        if bundle is None:  # SIGTERM unwinds as Ctrl-C does: the temporary bundle goes with the folder
            with sigterm_as_interrupt(), tempfile.TemporaryDirectory(prefix="ldm-export-bench-") as tmp:
                bundle = _build_for_bench(model, device, seed, Path(tmp) / "bundle", console)
                _run(model, bundle, int8_bundle, weights, device, names, steps, repeats, e2e_repeats, warmup,
                     guidance_scale, seed, threads, profile, cuda_options, out, loras)
            return
        _run(model, bundle, int8_bundle, weights, device, names, steps, repeats, e2e_repeats, warmup, guidance_scale,
             seed, threads, profile, cuda_options, out, loras)
    except BaseException:  # a refused or failed run leaves no empty folder behind
        for p in made:
            try:
                p.rmdir()  # only while empty
            except OSError:
                break
        raise


def _build_for_bench(model, device, seed, out: Path, console) -> Path:
    """Build ``model`` (default: the embedded demo model) the way the device runs it best, for a bench without --bundle."""
    from ldm_export.export.build import BuildConfig, build
    from ldm_export.zoo import DEFAULT_MODEL, get_model

    spec = get_model(model or DEFAULT_MODEL)
    gpu = device == "cuda"
    cfg = BuildConfig(model=spec.name, precision="fp16" if gpu else "fp32", random_weights=spec.embedded_weights is None,
                      seed=seed, out=out, static_shape=gpu, target="cuda" if gpu else "cpu")
    with console.status(f"no --bundle: building {spec.name} ({cfg.precision}, target {cfg.target}) into a temporary folder",
                        spinner="dots"):
        build(cfg)
    console.print(f"  built {spec.name} ({cfg.precision}, target {cfg.target}) into a temporary folder; "
                  f"keep one with `ldm-export build --model {spec.name} --out DIR` and pass --bundle DIR")
    return out


def _run(model, bundle, int8_bundle, weights, device, names, steps, repeats, e2e_repeats, warmup, guidance_scale, seed,
         threads, profile, cuda_options, out, loras=()):
    from rich.markup import escape

    from ldm_export.bench.run import BenchConfig, markdown, run_bench
    from ldm_export.cli_common import console, out_console
    from ldm_export.runtime.errors import LdmExportError
    from ldm_export.zoo import DEFAULT_MODEL

    cfg = BenchConfig(model=model or DEFAULT_MODEL, bundle=bundle, weights=weights, device=device, backends=names, steps=steps, repeats=repeats,
                      e2e_repeats=e2e_repeats, warmup=warmup, guidance_scale=guidance_scale, seed=seed, threads=threads,
                      profile=profile, out=out, int8_bundle=int8_bundle, loras=tuple(loras),
                      cuda_options={k.strip(): v.strip() for k, v in (o.split("=", 1) for o in cuda_options)})
    with console.status("benchmarking...", spinner="dots") as status:
        result = run_bench(cfg, lambda s: (status.update(escape(s)), console.print(f"  {escape(s)}")))
    out_console.print(markdown(result), soft_wrap=True)
    console.print(escape(f"wrote {out}/bench_{result['model']}_{result['device']}.json, .md, .png"), soft_wrap=True)
    failed = {n: e["error"] for n, e in result["backends"].items() if "error" in e}
    if failed:  # the others' numbers are in the report; the command still says it did not all work
        name, error = next(iter(failed.items()))
        raise LdmExportError(f"backend {name} failed: {error}" + (f" (and {len(failed) - 1} more)" if len(failed) > 1
                                                                   else "") + "; the report holds the other backends")
