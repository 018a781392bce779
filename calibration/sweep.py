"""The quality table of int8 per calibration method and quant level on one fp32 bundle (the embedded demo model by
default): UNet SQNR, image PSNR against fp32 from the same latents, and prompt adherence fp32 vs int8; one
capture shared by every row; JSON, a markdown table and a plot.

    python -m ldm_export.calibration.sweep --bundle demo-fp32 --out docs/img
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from ldm_export.runtime.errors import LdmExportError

from . import capture as C
from . import quantize as Q
from . import report as R

log = logging.getLogger(__name__)


def sweep(bundle: Path, methods: Sequence[str], levels: Sequence[float], size: int, steps: int, quality_prompts: int,
          adherence_prompts: int | None, fmt: str, threads: int | None = None, combine: str = "min",
          smoothquant: Sequence[float | None] = (None,)) -> dict:
    """One row per (SmoothQuant alpha or none, method, level): what int8 costs in quality against the same bundle's
    fp32 UNet."""
    import onnx

    from ldm_export.runtime.engine import OrtEngine
    from ldm_export.runtime.pipeline import Pipeline

    from . import smooth as S

    pipe = Pipeline.from_bundle(bundle, threads=threads)
    prompts = C.read_prompts(None, size)
    t0 = time.perf_counter()
    cap = C.capture_unet_inputs(pipe, prompts, steps, model_identity=C.model_identity(pipe.bundle))
    result = {"bundle": str(bundle), "model": pipe.bundle.model["name"], "calibration": cap.info, "format": fmt,
              "combine": combine, "capture_s": time.perf_counter() - t0, "rows": []}
    eval_prompts = C.read_prompts(None)[size:size + quality_prompts] or prompts[:quality_prompts]
    spec = pipe.bundle.spec("unet")
    fp32_adherence = None
    with tempfile.TemporaryDirectory(prefix=".sweep-") as tmp:
        work = Path(tmp)
        pre = work / "pre.onnx"
        Q.preprocess(Path(bundle) / "unet" / "model.onnx", pre, False)
        model = onnx.load(str(pre))
        top, _ = Q.select_nodes(model, max(levels))
        act = None  # per-channel activation statistics for SmoothQuant: one pass serves every alpha and level
        tables: dict = {}
        for alpha in smoothquant:
            for method in methods:
                for level in levels:
                    t2 = time.perf_counter()
                    nodes, counts = Q.select_nodes(model, level)
                    graph, smooth, key = pre, None, ("plain",)
                    if alpha is not None:
                        groups = S.groups_of(model, nodes)
                        if not groups:
                            log.info("level %g has no Linear layer to smooth: skipped for alpha %g", level, alpha)
                            continue
                        if act is None:
                            act = S.activation_amax(pre, cap, {g.tensor: g.channels for g in S.groups_of(model, top)},
                                                    work, False, threads)
                        smoothed = onnx.load(str(pre))
                        smooth = S.apply_smoothing(smoothed, S.groups_of(smoothed, nodes), act, alpha)
                        graph, key = work / f"smoothed-{alpha}-{level}.onnx", ("smooth", alpha, level)
                        onnx.save_model(smoothed, str(graph))
                        del smoothed
                    if (key, method) not in tables:
                        t1 = time.perf_counter()
                        # unsmoothed: one calibration per method, a level only chooses which layers get Q/DQ
                        g_model = onnx.load(str(graph))
                        tensors = Q.calibration_tensors(g_model, top if alpha is None else nodes)
                        del g_model
                        amax = Q.combine_steps(Q.step_amax(graph, cap, method, tensors, work, False), how=combine)
                        table = work / f"{method}-{len(tables)}.json"
                        Q.write_table(amax, method, table)
                        tables[(key, method)] = (table, time.perf_counter() - t1)
                    table, calib_s = tables[(key, method)]
                    path = work / f"unet-{method}-{level}-{alpha}.onnx"
                    Q.quantize_qdq(graph, path, table, method, nodes, fmt, "u8" if fmt == "onnxruntime" else "s8")
                    int8 = OrtEngine(path, spec, threads=threads)
                    pipe8 = Pipeline(pipe.bundle, {**pipe.engines, "unet": int8}, tokenizer=pipe.tokenizer)
                    row = {"method": method, "level": level, "smoothquant": smooth, "quantised_nodes": len(nodes),
                           "layers": counts, "calibration_s": calib_s,
                           "unet": R.unet_sqnr(pipe.engines["unet"], int8, cap),
                           "image": R.image_psnr(pipe, pipe8, eval_prompts, steps, seed=1000)}
                    if pipe.bundle.model["name"] == "demo" and adherence_prompts != 0:
                        adh = R.demo_adherence(pipe, pipe8, adherence_prompts, fp32_row=fp32_adherence)
                        fp32_adherence = adh["fp32"]
                        row["adherence"] = adh
                    row["seconds"] = time.perf_counter() - t2
                    log.info("%s level %g SmoothQuant %s: SQNR %.2f dB, PSNR %.2f dB", method, level,
                             "off" if alpha is None else f"{alpha:g}", row["unet"]["sqnr_db"], row["image"]["psnr_db_mean"])
                    result["rows"].append(row)
    return result


def table_markdown(result: dict) -> str:
    lines = ["| method | quant level | SmoothQuant | int8 layers | UNet SQNR dB | image PSNR dB (mean / min) | colour | shape "
             "| position | all three | within 5 points |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    fp32 = next((r["adherence"]["fp32"] for r in result["rows"] if "adherence" in r), None)
    if fp32:
        lines.append(f"| fp32 | — | — | 0 | — | — | {fp32['colour']:.1f} | {fp32['shape']:.1f} | {fp32['position']:.1f} | "
                     f"{fp32['all']:.1f} | — |")
    for r in result["rows"]:
        a = r.get("adherence")
        adh = (f"{a['int8']['colour']:.1f} | {a['int8']['shape']:.1f} | {a['int8']['position']:.1f} | {a['int8']['all']:.1f} | "
               f"{'yes' if a['within_tolerance'] else 'no'}") if a else "— | — | — | — | —"
        sq = r.get("smoothquant")
        lines.append(f"| {r['method']} | {r['level']:g} | {'off' if not sq else format(sq['alpha'], 'g')} | {r['quantised_nodes']} | {r['unet']['sqnr_db']:.2f} | "
                     f"{r['image']['psnr_db_mean']:.2f} / {r['image']['psnr_db_min']:.2f} | {adh} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True, help="an fp32 bundle (`ldm-export build --out DIR`)")
    p.add_argument("--out", default="docs/img")
    p.add_argument("--methods", default="minmax,percentile,entropy")
    p.add_argument("--levels", default="1,2,2.5,3")
    p.add_argument("--calib-size", type=int, default=32)
    p.add_argument("--calib-steps", type=int, default=20)
    p.add_argument("--quality-prompts", type=int, default=8)
    p.add_argument("--adherence-prompts", type=int, default=None, help="demo model: prompt cases (default all 120)")
    p.add_argument("--format", default="onnxruntime", choices=Q.FORMATS)
    p.add_argument("--combine", default="min", choices=("min", "max"), help="ranges over steps: min (TensorRT's) or max")
    p.add_argument("--smoothquant", default="off",
                   help="comma-separated SmoothQuant alphas (0 < alpha <= 1), 'off' for none: one set of rows each")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from .smooth import parse_alpha

    try:  # bad input: one line and exit code 2, as the ldm-export commands
        alphas = [None if x.strip() == "off" else parse_alpha(x) for x in a.smoothquant.split(",")]
        methods, levels = a.methods.split(","), [Q.parse_level(x) for x in a.levels.split(",")]
        unknown = [m for m in methods if m not in Q.METHODS]
        if unknown:  # before the capture, not after it
            raise LdmExportError(f"unknown calibration method {unknown[0]!r}; choose from: {', '.join(Q.METHODS)}")
        result = sweep(Path(a.bundle), methods, levels, a.calib_size, a.calib_steps, a.quality_prompts,
                       a.adherence_prompts, a.format, a.threads, a.combine, alphas)
    except LdmExportError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"int8_{result['model']}_{a.format}_{a.combine}" + ("" if alphas == [None] else "_smoothquant")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = table_markdown(result)
    (out / f"{stem}.md").write_text(md + "\n")
    if any("adherence" in r for r in result["rows"]):
        R.write_plot([{"method": r["method"] + (f" SQ {r['smoothquant']['alpha']:g}" if r.get("smoothquant") else ""),
                       "level": r["level"], "adherence": r["adherence"], "image": r["image"]}
                      for r in result["rows"]], out / f"{stem}.png",
                     f"{result['model']}: int8 ({a.format} QDQ, ranges {a.combine} over steps) vs fp32; calibration "
                     f"{a.calib_size} prompts x {a.calib_steps} steps; adherence at guidance 7.5, 20 steps")
    print(md)


if __name__ == "__main__":
    main()
