"""The int8 options of `ldm-export build` (calibration data, method, quant level) and their config."""
from __future__ import annotations

from pathlib import Path

import click

from ldm_export.cli_common import _guard


def int8_options(f):
    """Add the int8 build options to a click command (each None unless given, so a stray one is caught)."""
    options = [
        click.option("--calib-prompts", type=click.Path(path_type=Path), default=None,
                     help="int8: calibration prompts, one a line (default: the file shipped for the demo model)."),
        click.option("--calib-size", type=int, default=None, help="int8: how many prompts of the file to calibrate on [32]."),
        click.option("--calib-steps", type=int, default=None,
                     help="int8: sampler steps per prompt; every step's UNet inputs are recorded [20]."),
        click.option("--calib-method", type=click.Choice(["minmax", "percentile", "entropy"]), default=None,
                     help="int8: ONNX Runtime calibrator for each step's ranges; steps combine by their minimum [percentile]."),
        click.option("--quant-level", default=None,
                     help="int8: 1 convolutions; 2 + feed-forward; 2.5 + attention Q/K/V; 3 every Linear [2.5]."),
        click.option("--smoothquant", "smoothquant", default=None, metavar="ALPHA",
                     help="int8: SmoothQuant on the int8 Linear layers with migration strength 0 < ALPHA <= 1 "
                          "(TensorRT's recipe: 0.8-1.0) [off]."),
        click.option("--calib-cache", type=click.Path(path_type=Path), default=None,
                     help="int8: folder keeping the captured UNet inputs; a later build of the same model reuses them."),
        click.option("--int8-format", type=click.Choice(["onnxruntime", "tensorrt"]), default=None,
                     help="int8: QDQ for ONNX Runtime's CPU kernels (int32 biases) or for TensorRT (float biases) [onnxruntime]."),
        click.option("--int8-activations", type=click.Choice(["u8", "s8"]), default=None,
                     help="int8: activation type; TensorRT takes s8 only [u8 for onnxruntime, s8 for tensorrt]."),
        click.option("--int8-components", default=None, help="int8: comma-separated components to quantise [unet]."),
        click.option("--quality-prompts", type=int, default=None, help="int8: images for the PSNR against fp32 [4]."),
        click.option("--adherence-prompts", type=int, default=None,
                     help="int8, demo model: prompt cases for the adherence check, 0 to skip [all 120]."),
    ]
    for opt in reversed(options):
        f = opt(f)
    return f


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for the int8 bundle.")
@click.option("--force", is_flag=True, help="Replace an existing --out.")
@click.option("--threads", type=int, default=None, help="CPU threads for ONNX Runtime.")
@int8_options
@_guard
def quantize(bundle, out, force, threads, **int8):
    """int8 bundle from an fp32 bundle (no re-export): the calibration and quantisation of `build --precision int8`."""
    import time

    from rich.markup import escape

    from ldm_export.calibration.int8 import Int8Config, quantize_bundle
    from ldm_export.cli import _print_summary
    from ldm_export.cli_common import console

    cfg = int8_config(**int8) or Int8Config()
    t0 = time.perf_counter()
    with console.status("quantising...", spinner="dots") as status:
        def shown(component, stage, detail=""):
            console.print(escape(f"  {component}: {stage} {detail}"))
            status.update(escape(f"{component}: {stage} {detail}"))
        manifest = quantize_bundle(bundle, out, cfg, force, shown, threads)
    _print_summary(out, manifest, time.perf_counter() - t0)


def int8_config(calib_prompts=None, calib_size=None, calib_steps=None, calib_method=None, quant_level=None,
                calib_cache=None, int8_format=None, int8_activations=None, int8_components=None, quality_prompts=None, adherence_prompts=None,
                smoothquant=None):
    """An Int8Config from the options given, or None when none was."""
    given = {k: v for k, v in dict(prompts=calib_prompts, size=calib_size, steps=calib_steps, method=calib_method,
                                   level=quant_level, cache=calib_cache, format=int8_format, activation_type=int8_activations,
                                   quality_prompts=quality_prompts, adherence_prompts=adherence_prompts,
                                   smoothquant=smoothquant).items()
             if v is not None}
    if calib_size is not None:
        given["size_given"] = True
    if int8_components is not None:
        given["components"] = tuple(c.strip() for c in int8_components.split(",") if c.strip())
    if not given:
        return None
    from ldm_export.calibration.int8 import Int8Config

    return Int8Config(**given)
