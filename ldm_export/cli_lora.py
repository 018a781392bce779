"""`ldm-export lora`: a new bundle with LoRA weights added to the ONNX initializers (no re-export)."""
from __future__ import annotations

import time
from pathlib import Path

import click

from ldm_export.cli_common import _guard


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("loras", nargs=-1, required=True, metavar="FILE[:SCALE]...")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="The new bundle's folder.")
@click.option("--force", is_flag=True, help="Replace an existing --out.")
@_guard
def lora(bundle: Path, loras: tuple[str, ...], out: Path, force: bool) -> None:
    """Write BUNDLE with each LoRA (kohya/A1111 or diffusers/PEFT .safetensors) fused in as a new bundle at --out."""
    from rich.markup import escape

    from ldm_export.cli_common import console
    from ldm_export.export.lora import lora_bundle, parse_lora

    refs = [parse_lora(x) for x in loras]
    t0 = time.perf_counter()
    with console.status("fusing LoRA weights into the bundle...", spinner="dots"):
        manifest = lora_bundle(bundle, refs, out, force)
    fused = ", ".join(f"{x['file']} x{x['scale']:g} ({sum(x['layers'].values())} layers)"
                      for x in manifest["weights"]["loras"][-len(refs):])
    console.print(f"[green]✓[/green] {escape(f'{out}: {fused}')} [dim]({time.perf_counter() - t0:.1f} s)[/dim]")
