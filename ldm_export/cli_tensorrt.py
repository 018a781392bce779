"""`ldm-export engines`: build TensorRT engines into a bundle (the click command over ``export.tensorrt_build``)."""
from __future__ import annotations

import time
from pathlib import Path

import click

from ldm_export.cli_common import _guard
from ldm_export.runtime.errors import LdmExportError


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--components", default=None, help="Comma-separated components to build (default: all of the bundle's).")
@click.option("--precision", type=click.Choice(["auto", "fp16"]), default="auto", show_default=True,
              help="auto: strongly typed, the graph's own types (fp16 bundles give fp16 engines); "
                   "fp16: TensorRT 10's FP16 builder flag on any bundle.")
@click.option("--workspace", type=float, default=None, help="Builder workspace limit in GB (default: TensorRT's).")
@click.option("--timing-cache", type=click.Path(path_type=Path), default=None,
              help="Full TensorRT: tactic timing cache to reuse and extend (default: timing.cache in the engines "
                   "folder). TensorRT-RTX keeps none and ignores it, with a warning.")
@click.option("--opt-level", type=click.IntRange(0, 5), default=3, show_default=True,
              help="TensorRT builder optimisation level (higher: longer builds, maybe faster engines).")
@click.option("--compute-capability", default=None,
              help="TensorRT-RTX only: build for GPUs of this compute capability (8.0, 8.6, 8.9, 12.0) without a GPU here.")
@click.option("--refit", is_flag=True, help="Build refittable engines (weights can be replaced without a rebuild).")
@click.option("--builder", type=click.Choice(["auto", "tensorrt", "tensorrt-rtx"]), default="auto", show_default=True,
              help="auto: full TensorRT where installed, else TensorRT-RTX.")
@_guard
def engines(bundle: Path, components: str | None, precision: str, workspace: float | None, timing_cache: Path | None,
            opt_level: int, compute_capability: str | None, refit: bool, builder: str) -> None:
    """Build TensorRT engines into BUNDLE/engines/<gpu>_sm<cc>_<trt|trtrtx><version>/."""
    from rich.markup import escape
    from rich.table import Table

    from ldm_export.cli_common import _human, console, out_console
    from ldm_export.export.tensorrt_build import EngineOptions, build_engines, engines_summary
    from ldm_export.runtime.engine_tensorrt import current_target, engines_root

    from ldm_export.runtime.engine_tensorrt import require_tensorrt

    options = EngineOptions(precision=precision, optimization_level=opt_level, workspace_gb=workspace,
                            timing_cache=timing_cache, compute_capability=compute_capability, refit=refit)
    comps = [c.strip() for c in components.split(",") if c.strip()] if components is not None else None
    if comps == []:
        raise LdmExportError(f"--components {components!r} names no component; give e.g. --components unet, or leave "
                             "it out for all of the bundle's")
    from ldm_export.runtime.bundle import Bundle

    manifest = Bundle.open(bundle).manifest  # a wrong path says so before TensorRT is looked for
    trt = require_tensorrt(None if builder == "auto" else builder)  # one line when TensorRT is missing
    target = current_target(trt, compute_capability=compute_capability, building=True)  # and when there is no GPU
    t0 = time.perf_counter()
    with console.status("building engines...", spinner="dots") as status:
        def progress(component: str, stage: str, detail: str) -> None:
            if stage == "done":
                console.print(f"  [green]✓[/green] {component} [dim]{escape(detail)}[/dim]")
            else:
                status.update(escape(f"{component}: {stage} {detail} (minutes for a full-size UNet)"))
        from ldm_export.export.tensorrt_build import _serialize

        index = build_engines(bundle, comps, options, progress=progress, target=target, serialize=_serialize,
                              trt=trt)
    built = set(comps or index["engines"])
    t = Table(title=escape(f"{engines_root(bundle) / target.dirname}  ({time.perf_counter() - t0:.1f} s)"))
    for col in ("component", "plan", "size", "network", "flags", "dynamic dims", "build"):
        t.add_column(col)
    rows = engines_summary(index, manifest)
    for row in rows:
        label = "" if row["component"] in built else " (earlier, STALE)" if row["stale"] else " (earlier)"
        t.add_row(row["component"] + label, row["file"], _human(row["size"]), row["network"], row["flags"], row["dynamic"],
                  f"{row['seconds']:.1f} s")
    t.caption = target.describe()
    out_console.print(t)
    stale = [r["component"] for r in rows if r["stale"]]
    if stale:  # e.g. a bundle remade with `ldm-export lora` around an engines folder copied in
        console.print(f"[yellow]warning:[/yellow] the {', '.join(stale)} engine{'s were' if len(stale) > 1 else ' was'} built "
                      f"from another model.onnx than this bundle's and will not load; rebuild with `ldm-export engines "
                      f"{escape(str(bundle))} --components {','.join(stale)}" + (f" --compute-capability {compute_capability}`"
                                                                     if compute_capability else "`"), soft_wrap=True)
