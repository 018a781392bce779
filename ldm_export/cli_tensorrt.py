"""`ldm-export engines`: build TensorRT engines into a bundle (the click command over ``export.tensorrt_build``)."""
from __future__ import annotations

import time
from pathlib import Path

import click

from ldm_export.cli_common import _guard


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--components", default=None, help="Comma-separated components to build (default: all of the bundle's).")
@click.option("--precision", type=click.Choice(["auto", "fp16"]), default="auto", show_default=True,
              help="auto: strongly typed, the graph's own types (fp16 bundles give fp16 engines); "
                   "fp16: TensorRT 10's FP16 builder flag on any bundle.")
@click.option("--workspace", type=float, default=None, help="Builder workspace limit in GB (default: TensorRT's).")
@click.option("--timing-cache", type=click.Path(path_type=Path), default=None,
              help="Tactic timing cache to reuse and extend (default: timing.cache in the engines folder).")
@click.option("--opt-level", type=click.IntRange(0, 5), default=3, show_default=True,
              help="TensorRT builder optimisation level (higher: longer builds, maybe faster engines).")
@_guard
def engines(bundle: Path, components: str | None, precision: str, workspace: float | None, timing_cache: Path | None,
            opt_level: int) -> None:
    """Build TensorRT engines for this GPU into BUNDLE/engines/<gpu>_sm<cc>_trt<version>/."""
    from rich.table import Table

    from ldm_export.cli_common import _human, console, out_console
    from ldm_export.export.tensorrt_build import EngineOptions, build_engines, engines_summary
    from ldm_export.runtime.engine_tensorrt import current_target, engines_root

    options = EngineOptions(precision=precision, optimization_level=opt_level, workspace_gb=workspace,
                            timing_cache=timing_cache)
    comps = [c.strip() for c in components.split(",") if c.strip()] if components else None
    from ldm_export.runtime.bundle import Bundle

    Bundle.open(bundle)  # a wrong path says so before TensorRT is looked for
    target = current_target()  # one line when TensorRT or the GPU is missing, before any work
    t0 = time.perf_counter()
    with console.status("building engines...", spinner="dots") as status:
        def progress(component: str, stage: str, detail: str) -> None:
            if stage == "done":
                console.print(f"  [green]✓[/green] {component} [dim]{detail}[/dim]")
            else:
                status.update(f"{component}: {stage} {detail} (minutes for a full-size UNet)")
        index = build_engines(bundle, comps, options, progress=progress, target=target)
    built = set(comps or index["engines"])
    t = Table(title=f"{engines_root(bundle) / target.dirname}  ({time.perf_counter() - t0:.1f} s)")
    for col in ("component", "plan", "size", "network", "flags", "dynamic dims", "build"):
        t.add_column(col)
    for row in engines_summary(index):
        t.add_row(row["component"] + ("" if row["component"] in built else " (earlier)"), row["file"], _human(row["size"]),
                  row["network"], row["flags"], row["dynamic"], f"{row['seconds']:.1f} s")
    t.caption = f"TensorRT {target.tensorrt_version} on {target.gpu_name} (sm{''.join(map(str, target.compute_capability))})"
    out_console.print(t)
