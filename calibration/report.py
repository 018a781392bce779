"""The price of int8 in quality: UNet SQNR against fp32 per step, image PSNR against fp32 from the same latents,
and (the embedded demo model) prompt adherence read back by the project's checker, fp32 and int8 side by side."""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from ldm_export.runtime.errors import LdmExportError

log = logging.getLogger(__name__)

ADHERENCE_TOLERANCE = 5.0  # points: int8 may lose at most this much on colour, position and shape


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantisation-noise ratio, 10 log10(sum ref^2 / sum (test - ref)^2), in dB."""
    ref = np.asarray(reference, np.float64)
    err = np.asarray(test, np.float64) - ref
    noise = float((err * err).sum())
    return math.inf if noise == 0 else 10.0 * math.log10(float((ref * ref).sum()) / noise)


def psnr_db(image: np.ndarray, reference: np.ndarray) -> float:
    """PSNR of decoded images in [-1, 1] (mapped to [0, 1]) against the reference, in dB."""
    a = np.clip(np.asarray(image, np.float64), -1, 1)
    r = np.clip(np.asarray(reference, np.float64), -1, 1)
    mse = float(np.mean(((a - r) / 2.0) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def unet_sqnr(fp32_engine, int8_engine, capture, max_calls: int = 64) -> dict:
    """SQNR of the int8 UNet's output against the fp32 graph's on recorded calls, overall and by step."""
    per_step: dict[int, list[float]] = {}
    num = den = 0.0
    indices = capture.indices()
    stride = max(1, len(indices) // max_calls)
    for i in indices[::stride]:
        feeds = capture.feeds(i)
        ref = fp32_engine.run(feeds)["out_sample"].astype(np.float64)
        got = int8_engine.run(feeds)["out_sample"].astype(np.float64)
        num += float((ref * ref).sum())
        den += float(((got - ref) ** 2).sum())
        per_step.setdefault(int(capture.step[i]), []).append(sqnr_db(ref, got))
    return {"sqnr_db": math.inf if den == 0 else 10 * math.log10(num / den), "calls": len(indices[::stride]),
            "by_step_db": {s: float(np.mean(v)) for s, v in sorted(per_step.items())}}


def image_psnr(pipe_fp32, pipe_int8, prompts: Sequence[str], steps: int, seed: int = 0, guidance_scale: float = 7.5) -> dict:
    """Decoded images of the same prompts from the same initial latents (and noise), int8 against fp32."""
    psnrs = []
    for k, prompt in enumerate(prompts):
        images = []
        for pipe in (pipe_fp32, pipe_int8):
            latents = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance_scale, seed=seed + k,
                           return_latents=True)
            images.append(pipe.decode(np.asarray(latents, np.float32)))
        psnrs.append(psnr_db(images[1], images[0]))
    return {"psnr_db_mean": float(np.mean(psnrs)), "psnr_db_min": float(np.min(psnrs)), "images": len(psnrs),
            "steps": steps, "guidance_scale": guidance_scale, "seed": seed}


def demo_adherence(pipe_fp32, pipe_int8, n_prompts: int | None = None, steps: int = 20, guidance_scale: float = 7.5,
                   seed: int = 0, fp32_row: dict | None = None) -> dict:
    """The demo model's prompt adherence (ldm_export.demo.adherence) at fp32 and int8 on the same prompt cases and
    initial latents; ``n_prompts`` evenly spaced cases of the 120 (all by default); ``fp32_row`` reuses an fp32
    result of the same cases, steps, guidance and seed."""
    from ldm_export.demo.adherence import evaluate, initial_latents
    from ldm_export.demo.data import prompt_cases

    cases = prompt_cases()
    if n_prompts is not None and n_prompts < len(cases):
        cases = [cases[int(i)] for i in np.linspace(0, len(cases) - 1, max(1, n_prompts)).round()]

    def generate_with(pipe):
        side = pipe.resolution // pipe.vae_scale_factor

        def generate(prompts, g, n_steps, s):
            return pipe(list(prompts), num_inference_steps=n_steps, guidance_scale=g, seed=s,
                        latents=initial_latents(len(prompts), s, side))
        return generate

    out = {"fp32": fp32_row} if fp32_row is not None else {}
    for name, pipe in (("fp32", pipe_fp32), ("int8", pipe_int8)):
        if name in out:
            continue
        out[name] = evaluate(generate_with(pipe), [guidance_scale], steps, seed, cases)["rows"][0]
    delta = {k: out["int8"][k] - out["fp32"][k] for k in ("colour", "shape", "position", "all")}
    return {"prompts": len(cases), "steps": steps, "guidance_scale": guidance_scale, "seed": seed,
            "fp32": out["fp32"], "int8": out["int8"], "delta": delta,
            "within_tolerance": all(delta[k] >= -ADHERENCE_TOLERANCE for k in ("colour", "shape", "position")),
            "tolerance_points": ADHERENCE_TOLERANCE}


def quality_rows(manifest: dict) -> list[tuple[str, str]]:
    """(label, value) lines of an int8 bundle's quality report, for `inspect` (empty when there is none); one line
    naming what is missing when the manifest's int8 section is damaged."""
    q = manifest.get("int8")
    if not q:
        return []
    try:
        return _quality_rows(q)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        what = f"no {e}" if isinstance(e, KeyError) else (str(e).splitlines() or [type(e).__name__])[0]
        raise LdmExportError(f"the int8 section of the bundle's ldm_export.json is damaged ({what}); quantise the fp32 "
                             "bundle again (`ldm-export quantize FP32_BUNDLE --out DIR`)") from None


def _quality_rows(q: dict) -> list[tuple[str, str]]:
    rows = [("calibration", f"{q['quantisation']['method']}, {len(q['calibration']['prompts'])} prompt{'s' if len(q['calibration']['prompts']) != 1 else ''} x "
                            f"{q['calibration']['num_inference_steps']} steps ({q['calibration']['sampler']}, seed "
                            f"{q['calibration']['seed']}), ranges {q['quantisation']['combine']}"),
            ("quant level", f"{q['quantisation']['level']:g} ({q['quantisation']['quantised_nodes']} layers int8, "
                            f"format {q['quantisation']['format']}, activations {q['quantisation']['activations']})")]
    sq = q["quantisation"].get("smoothquant")
    rows.append(("SmoothQuant", "off" if not sq else
                 f"alpha {sq['alpha']:g} on {sq['layers']} Linear layers ({sq['groups']} inputs: {sq['folded_into_layernorm']} "
                 f"folded into LayerNorm, {sq['mul_nodes']} Mul; s from {sq['scale_range'][0]:.3g} to {sq['scale_range'][1]:.3g})"))
    for comp, r in q["quality"]["components"].items():
        rows.append((f"{comp} SQNR vs fp32", "fp32 (not quantised)" if r.get("precision") != "int8"
                     else f"{r['sqnr_db']:.2f} dB over {r['calls']} recorded calls"))
    img = q["quality"].get("image")
    if img:
        rows.append(("image PSNR vs fp32", f"{img['psnr_db_mean']:.2f} dB mean, {img['psnr_db_min']:.2f} min "
                                           f"({img['images']} image{'s' if img['images'] != 1 else ''}, {img['steps']} steps, same latents)"))
    adh = q["quality"].get("adherence")
    if adh:
        f, i = adh["fp32"], adh["int8"]
        rows.append(("adherence fp32 -> int8", ", ".join(f"{k} {f[k]:.1f} -> {i[k]:.1f}" for k in ("colour", "shape", "position", "all"))
                     + f" % ({adh['prompts']} prompts; {'within' if adh['within_tolerance'] else 'OUTSIDE'} "
                     f"{adh['tolerance_points']:g} points)"))
    return rows


def write_plot(rows: Sequence[dict], path: str | Path, title: str) -> None:
    """Adherence (colour, shape, position, all three) and image PSNR by quant level, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({r["method"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for mi, method in enumerate(methods):
        rs = sorted((r for r in rows if r["method"] == method), key=lambda r: r["level"])
        levels = [r["level"] for r in rs]
        style = ("-", "--", ":")[mi % 3]
        for ki, key in enumerate(("colour", "shape", "position", "all")):
            axes[0].plot(levels, [r["adherence"]["int8"][key] for r in rs], marker="o", linestyle=style, color=f"C{ki}",
                         label=f"{key} ({method})")
        axes[1].plot(levels, [r["image"]["psnr_db_mean"] for r in rs], marker="o", linestyle=style, color="k", label=method)
    if rows:
        ref = rows[0]["adherence"]["fp32"]
        for ki, key in enumerate(("colour", "shape", "position", "all")):
            axes[0].axhline(ref[key], color=f"C{ki}", alpha=0.35, linewidth=3)
    axes[0].set_xlabel("quant level")
    axes[0].set_ylabel("adherence at int8 (%); thick lines: fp32")
    axes[0].legend(fontsize=6, ncol=2)
    axes[1].set_xlabel("quant level")
    axes[1].set_ylabel("image PSNR vs fp32, same latents (dB)")
    axes[1].legend(fontsize=7)
    for ax in axes:
        ax.set_xticks([1, 2, 2.5, 3])
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
