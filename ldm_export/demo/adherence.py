"""Automatic prompt-adherence check for the demo model: read colour, shape and position back from an image.

The checker segments the object from the background (the dominant border colour), then reads:
colour = nearest palette colour of the object's core pixels; position = nearest anchor of the
object's centroid; shape = the best of three templates (circle, square, upright triangle as the data draws
them) with the object's own area and centroid, by soft IoU with the object's coverage; below
``SHAPE_MIN_IOU``, or when the object is not convex (``MIN_SOLIDITY``: the four-pointed stars that strong
guidance draws), the shape is unreadable (None, counted wrong). Area and centroid are what a blur keeps,
so a softened edge does not change the reading. The evaluation runs through any
``generate(prompts, guidance_scale, steps, seed) -> list[PIL.Image]`` callable, image ``i`` drawn from
``seed + i``, so the torch model and an exported bundle are measured the same way.
"""
from __future__ import annotations

import argparse
import json
import logging
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from ldm_export.demo.data import COLOURS, PALETTE, POSITION_ANCHORS, make_example, prompt_cases

log = logging.getLogger(__name__)

Generate = Callable[[Sequence[str], float, int, int], list]
GUIDANCE_SCALES = (1.0, 3.0, 5.0, 7.5, 10.0)

_PALETTE_RGB = np.array([PALETTE[c] for c in COLOURS], dtype=np.float32)
_ANCHORS = list(POSITION_ANCHORS.items())
_OBJECT_THRESHOLD = 40.0  # RGB distance from the background that counts as object (palette pairs are >= 80 apart)
# Below this IoU with the best template an object is no clean circle, square or triangle (a four-pointed star, a
# blob). The right template scores >= 0.98 on the training images, >= 0.80 on them blurred (Gaussian, 0.8 px) and
# >= 0.73 on the VAE's reconstructions of them (tests/test_demo.py, docs/demo_model.md).
SHAPE_MIN_IOU = 0.7
# Object area / convex hull area (pixels of coverage >= 0.5, hull over their corners). The three shapes are convex;
# pixel staircases put them at >= 0.87 on the training images and >= 0.82 on the VAE's reconstructions, while
# four-pointed stars measure 0.67-0.75.
MIN_SOLIDITY = 0.8
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class Reading:
    """What the checker sees in one image; colour/shape/position are None when no object was found."""

    colour: str | None
    shape: str | None
    position: str | None
    fill: float = 0.0
    bottom_heaviness: float = 0.0
    area_frac: float = 0.0
    shape_iou: dict | None = None  # soft IoU with each shape's template
    solidity: float = 0.0  # area / convex hull area


def _hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of (N, 2) integer points (Andrew's monotone chain, shoelace formula)."""
    pts = sorted(set(map(tuple, points.tolist())))
    if len(pts) < 3:
        return 0.0

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: list = []
    upper: list = []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    hull = np.array(lower[:-1] + upper[:-1], dtype=np.float64)
    return 0.5 * abs(float(np.dot(hull[:, 0], np.roll(hull[:, 1], 1)) - np.dot(hull[:, 1], np.roll(hull[:, 0], 1))))


def solidity(soft: np.ndarray) -> float:
    """Pixels with coverage >= 0.5 over the area of the convex hull of their corners (1 for a filled rectangle)."""
    ys, xs = np.nonzero(soft >= 0.5)
    if len(ys) == 0:
        return 0.0
    corners = np.concatenate([np.stack([xs + dx, ys + dy], axis=1) for dx in (0, 1) for dy in (0, 1)])
    return float(len(ys) / max(_hull_area(corners), 1e-6))


def shape_templates(h: int, w: int, cx: float, cy: float, area: float) -> dict[str, np.ndarray]:
    """Coverage in [0, 1] of a circle, a square and an upright triangle (base = height, as ``data.render`` draws
    them) of ``area`` px with centroid (cx, cy) in continuous pixel coordinates, on an (h, w) grid."""
    o = (np.arange(_SUPERSAMPLE) + 0.5) / _SUPERSAMPLE
    ys = (np.arange(h)[:, None] + o[None, :]).reshape(-1)  # sub-pixel centres
    xs = (np.arange(w)[:, None] + o[None, :]).reshape(-1)
    y, x = np.meshgrid(ys, xs, indexing="ij")
    r = np.sqrt(area / np.pi)
    half = np.sqrt(area) / 2
    base = np.sqrt(2 * area)  # triangle of base b and height b has area b^2 / 2 and its centroid 2b/3 below the apex
    apex = cy - 2 * base / 3
    inside = {"circle": (x - cx) ** 2 + (y - cy) ** 2 <= r * r,
              "square": (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half),
              "triangle": (y >= apex) & (y <= apex + base) & (np.abs(x - cx) <= (y - apex) / 2)}
    return {k: v.reshape(h, _SUPERSAMPLE, w, _SUPERSAMPLE).mean(axis=(1, 3)) for k, v in inside.items()}


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (BFS; images are small)."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    best, best_size, current = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        current += 1
        labels[y0, x0] = current
        queue, size = deque([(y0, x0)]), 0
        while queue:
            y, x = queue.popleft()
            size += 1
            for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not labels[yy, xx]:
                    labels[yy, xx] = current
                    queue.append((yy, xx))
        if size > best_size:
            best, best_size = current, size
    return labels == best if best else np.zeros_like(mask)


def _dilate(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def read_image(image) -> Reading:
    """Read colour, shape and position of the single object in ``image`` (PIL image or (H, W, 3) uint8)."""
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    h, w, _ = rgb.shape
    border = np.concatenate([rgb[:2].reshape(-1, 3), rgb[-2:].reshape(-1, 3),
                             rgb[:, :2].reshape(-1, 3), rgb[:, -2:].reshape(-1, 3)])
    background = np.median(border, axis=0)
    dist = np.linalg.norm(rgb - background, axis=-1)  # (H, W)
    hard = _largest_component(dist > _OBJECT_THRESHOLD)
    if hard.sum() < 4:
        return Reading(None, None, None)
    # core pixels (far from the background) give the object's colour; edge pixels are blends
    core = hard & (dist >= 0.8 * np.percentile(dist[hard], 90))
    obj_rgb = np.median(rgb[core], axis=0)
    colour = COLOURS[int(np.argmin(np.linalg.norm(_PALETTE_RGB - obj_rgb, axis=-1)))]
    # soft coverage: a pixel blended between background and object colour lies on the line between them
    full = max(float(np.linalg.norm(obj_rgb - background)), 1e-3)
    soft = np.clip(dist / full, 0.0, 1.0) * _dilate(_dilate(hard))
    area = float(soft.sum())
    ys, xs = np.mgrid[0:h, 0:w]
    cy, cx = float((soft * ys).sum() / area), float((soft * xs).sum() / area)
    position = min(_ANCHORS, key=lambda a: (a[1][0] * w - (cx + 0.5)) ** 2 + (a[1][1] * h - (cy + 0.5)) ** 2)[0]
    width, height = float(soft.sum(axis=1).max()), float(soft.sum(axis=0).max())
    fill = area / max(width * height, 1e-6)
    # vertical centre of mass relative to the rows the object spans: 0 for symmetric shapes, 1/6 for a triangle
    rows = np.nonzero(soft.sum(axis=1) > 0.5)[0]
    top, bottom = float(rows.min()), float(rows.max() + 1)
    bottom_heaviness = ((cy + 0.5) - 0.5 * (top + bottom)) / max(bottom - top, 1.0)
    templates = shape_templates(h, w, cx + 0.5, cy + 0.5, area)
    iou = {k: float(np.minimum(soft, t).sum() / np.maximum(soft, t).sum()) for k, t in templates.items()}
    best = max(iou, key=iou.get)
    convexity = solidity(soft)
    shape = best if iou[best] >= SHAPE_MIN_IOU and convexity >= MIN_SOLIDITY else None
    return Reading(colour, shape, position, fill, bottom_heaviness, area / (h * w), iou, convexity)


def score(readings: Sequence[Reading], cases: Sequence[tuple[str, str, str, str]]) -> dict[str, float]:
    """Percentages of images whose colour, shape, position, and all three, match the prompt."""
    n = len(cases)
    c = [r.colour == case[1] for r, case in zip(readings, cases)]
    s = [r.shape == case[2] for r, case in zip(readings, cases)]
    p = [r.position == case[3] for r, case in zip(readings, cases)]
    return {"colour": 100.0 * sum(c) / n, "shape": 100.0 * sum(s) / n, "position": 100.0 * sum(p) / n,
            "all": 100.0 * sum(a and b and d for a, b, d in zip(c, s, p)) / n}


def ground_truth_accuracy(n: int = 2000, seed: int = 1234, resolution: int = 64) -> dict[str, float]:
    """The checker's accuracy on generated training images, whose attributes are known."""
    readings, cases = [], []
    for i in range(n):
        image, _, scene = make_example(seed, i, resolution)
        readings.append(read_image(image))
        cases.append(("", scene.colour, scene.shape, scene.position))
    return score(readings, cases)


def evaluate(generate: Generate, guidance_scales: Sequence[float] = GUIDANCE_SCALES, steps: int = 20,
             seed: int = 0, cases: Sequence[tuple[str, str, str, str]] | None = None,
             batch_size: int = 40) -> dict:
    """Adherence table over the fixed prompt set: one row per guidance scale; image i uses seed + i."""
    cases = list(cases or prompt_cases())
    rows = []
    for g in guidance_scales:
        images = []
        for start in range(0, len(cases), batch_size):
            prompts = [c[0] for c in cases[start:start + batch_size]]
            images += generate(prompts, float(g), steps, seed + start)
        readings = [read_image(im) for im in images]
        row = {"guidance_scale": float(g), **score(readings, cases)}
        log.info("guidance %.1f: %s", g, row)
        rows.append(row)
    return {"steps": steps, "seed": seed, "n_prompts": len(cases), "rows": rows}


def table_markdown(result: dict) -> str:
    lines = ["| guidance | colour | shape | position | all three |", "|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['guidance_scale']:g} | {r['colour']:.1f} % | {r['shape']:.1f} % | "
                     f"{r['position']:.1f} % | {r['all']:.1f} % |")
    return "\n".join(lines)


def plot_adherence(result: dict, path: str | Path, title: str = "Demo model: prompt adherence vs guidance") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = [r["guidance_scale"] for r in result["rows"]]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for i, (key, label) in enumerate((("colour", "colour"), ("shape", "shape"), ("position", "position"),
                                      ("all", "all three"))):
        ax.plot(g, [r[key] for r in result["rows"]], marker="o", color=f"C{i}", label=f"{label} (torch)")
        if "bundle" in result:
            ax.plot(g, [r[key] for r in result["bundle"]["rows"]], marker="x", linestyle="--", color=f"C{i}",
                    label=f"{label} (ONNX bundle)")
    ax.set_xlabel("guidance scale (CFG)")
    ax.set_ylabel("adherence (%)")
    ax.set_ylim(0, 101)
    ax.set_xticks(g)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)
    ax.set_title(f"{title}\n{result['n_prompts']} prompts, {result['steps']} steps", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def readings_sheet(generate: Generate, path: str | Path, guidance_scale: float = 7.5, steps: int = 20,
                   seed: int = 0, batch_size: int = 40) -> None:
    """Every image of the evaluation at one guidance scale, labelled with the asked shape and what the checker
    read (red when wrong), so anyone can judge the checker's calls by eye."""
    from PIL import ImageDraw

    cases = prompt_cases()
    images = []
    for start in range(0, len(cases), batch_size):
        images += generate([c[0] for c in cases[start:start + batch_size]], float(guidance_scale), steps, seed + start)
    tile, label, cols = 96, 14, 12
    rows = (len(cases) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * (tile + 2), rows * (tile + label + 2)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (case, image) in enumerate(zip(cases, images)):
        r = read_image(image)
        x, y = (i % cols) * (tile + 2), (i // cols) * (tile + label + 2)
        sheet.paste(image.convert("RGB").resize((tile, tile), Image.Resampling.NEAREST), (x, y))
        ok = (r.colour, r.shape, r.position) == case[1:]
        draw.text((x + 2, y + tile + 1), f"{case[2][:3]}->{(r.shape or 'none')[:4]}", fill="black" if ok else "red")
    sheet.save(path)


GRID_PROMPTS = (
    "a red circle on the left", "a blue square at the top", "a yellow triangle in the center",
    "a green circle at the bottom", "a purple square on the right", "an orange triangle on the left",
    "a white circle in the middle, black background", "a black square on the right, yellow background",
    "a small red triangle at the top", "a large blue circle in the center", "green square, left",
    "a purple triangle at the bottom", "an orange circle at the top", "a yellow square at the bottom",
    "a white triangle on the right", "a black circle on the left, white background",
)


def sample_grid(generate: Generate, path: str | Path, guidance_scale: float = 7.5, steps: int = 20, seed: int = 0,
                prompts: Sequence[str] = GRID_PROMPTS, columns: int = 4) -> None:
    """A grid of samples with their prompts as titles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = generate(list(prompts), guidance_scale, steps, seed)
    rows = (len(images) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.45 * rows), dpi=110)
    for ax, im, p in zip(np.ravel(axes), images, prompts):
        ax.imshow(im, interpolation="nearest")
        ax.set_title(p, fontsize=6.5, wrap=True)
    for ax in np.ravel(axes):
        ax.axis("off")
    fig.suptitle(f"guidance {guidance_scale:g}, {steps} steps, seeds {seed}..{seed + len(images) - 1}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def initial_latents(n: int, seed: int, side: int = 8, channels: int = 4) -> np.ndarray:
    """(n, 4, side, side) float32 standard-normal latents, image i from ``seed + i``; numpy, so the torch
    model and an exported bundle start every image from the same noise."""
    return np.stack([np.random.default_rng(seed + i).standard_normal((channels, side, side)) for i in range(n)]
                    ).astype(np.float32)


def diffusers_generate(folder: str | Path, device: str = "cpu") -> Generate:
    """A ``generate`` callable over diffusers' StableDiffusionPipeline loaded from a diffusers folder."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False).to(device)
    pipe.set_progress_bar_config(disable=True)
    side = pipe.unet.config.sample_size

    def generate(prompts: Sequence[str], guidance_scale: float, steps: int, seed: int) -> list[Image.Image]:
        latents = torch.from_numpy(initial_latents(len(prompts), seed, side)).to(device)
        with torch.no_grad():
            return pipe(list(prompts), guidance_scale=guidance_scale, num_inference_steps=steps, latents=latents).images

    return generate


def runtime_generate(bundle: str | Path, provider: str = "cpu", sampler: str | None = None) -> Generate:
    """A ``generate`` callable over an exported bundle, through the numpy runtime (no torch); ``sampler``: a name from
    `ldm-export samplers` (default: the bundle's scheduler)."""
    from ldm_export.runtime.pipeline import Pipeline

    pipe = Pipeline.from_bundle(bundle, provider=provider)
    side = pipe.resolution // pipe.vae_scale_factor

    def generate(prompts: Sequence[str], guidance_scale: float, steps: int, seed: int) -> list[Image.Image]:
        return pipe(list(prompts), num_inference_steps=steps, guidance_scale=guidance_scale, seed=seed,
                    latents=initial_latents(len(prompts), seed, side), scheduler=sampler)

    return generate


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Prompt adherence of the demo model: the torch model (diffusers "
                                     "pipeline) and, with --bundle, the exported bundle through the numpy runtime.")
    parser.add_argument("--model", help="diffusers folder (default: the embedded demo weights)")
    parser.add_argument("--bundle", help="an exported bundle of the same weights (`ldm-export build --out B`) to "
                        "measure the same way, from the same initial latents")
    parser.add_argument("--out", default="docs/img", help="folder for adherence.json, the plot and the grid")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance", type=float, nargs="+", default=list(GUIDANCE_SCALES))
    parser.add_argument("--ground-truth", type=int, default=2000, help="images to validate the checker on (0: skip)")
    parser.add_argument("--bundle-only", action="store_true", help="measure the --bundle alone (a model with no "
                        "diffusers pipeline to compare with, such as the demo DiT)")
    parser.add_argument("--prefix", default="demo", help="file name prefix of the outputs (demo_dit for the DiT)")
    parser.add_argument("--samplers", help="comma-separated sampler names: the --bundle's adherence with each, at the "
                        "first --guidance, as one table (<prefix>_samplers.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {}
    if args.ground_truth:
        result["checker_on_ground_truth"] = {"n": args.ground_truth, **ground_truth_accuracy(args.ground_truth)}
        print("checker on ground truth:", result["checker_on_ground_truth"])
    if args.samplers:
        if not args.bundle:
            parser.error("--samplers needs --bundle")
        from ldm_export.runtime.schedulers import sampler_names

        names = [x.strip() for x in args.samplers.split(",") if x.strip()]
        unknown = [n for n in names if n not in sampler_names()]
        if unknown:
            parser.error(f"unknown sampler {unknown[0]!r}; `ldm-export samplers` lists them")
        rows = {}
        print(f"| sampler | colour % | shape % | position % | all three % |  (guidance {args.guidance[0]:g}, "
              f"{args.steps} steps)\n|---|---|---|---|---|")
        for name in names:
            row = evaluate(runtime_generate(args.bundle, sampler=name), args.guidance[:1], args.steps, args.seed)["rows"][0]
            rows[name] = row
            print(f"| {name} | {row['colour']:.1f} | {row['shape']:.1f} | {row['position']:.1f} | {row['all']:.1f} |")
        (out / f"{args.prefix}_samplers.json").write_text(json.dumps({**result, "steps": args.steps,
                                                                     "guidance_scale": args.guidance[0],
                                                                     "samplers": rows}, indent=2) + "\n")
        return
    if args.bundle_only:
        if not args.bundle:
            parser.error("--bundle-only needs --bundle")
        generate = runtime_generate(args.bundle)
        result |= evaluate(generate, args.guidance, args.steps, args.seed)
        print("bundle (ldm_export.runtime, ONNX Runtime CPU):")
        print(table_markdown(result))
        (out / f"{args.prefix}_adherence.json").write_text(json.dumps(result, indent=2) + "\n")
        plot_adherence(result, out / f"{args.prefix}_cfg_adherence.png", title="Demo DiT: prompt adherence vs guidance")
        sample_grid(generate, out / f"{args.prefix}_grid.png", steps=args.steps, seed=args.seed)
        return
    folder = args.model or str(Path(__file__).resolve().parent.parent / "assets" / "demo")
    generate = diffusers_generate(folder, args.device)
    result |= evaluate(generate, args.guidance, args.steps, args.seed)
    print("torch (diffusers StableDiffusionPipeline):")
    print(table_markdown(result))
    if args.bundle:
        result["bundle"] = evaluate(runtime_generate(args.bundle), args.guidance, args.steps, args.seed)
        print("bundle (ldm_export.runtime, ONNX Runtime CPU):")
        print(table_markdown(result["bundle"]))
    (out / "demo_adherence.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_adherence(result, out / "demo_cfg_adherence.png")
    sample_grid(generate, out / "demo_grid.png", steps=args.steps, seed=args.seed)
    readings_sheet(generate, out / "demo_readings_g7.5.png", steps=args.steps, seed=args.seed)


if __name__ == "__main__":
    main()
