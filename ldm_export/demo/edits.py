"""Editing on the demo model: image-to-image and inpainting of drawn shapes, read back by the adherence checker.

``python -m ldm_export.demo.edits --bundle DEMO_BUNDLE --out docs/img`` (the bundle built with ``--vae-encoder``):
img2img turns a drawn red circle on the left into "a blue circle on the left" at strength 0.6; inpainting the right
half of a drawn red circle on the right (blue background) with "a green square on the right" repaints that half and
keeps the left half pixel-exact. Prints each image's reading and writes a sheet (init, mask, results) per edit.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ldm_export.demo.adherence import read_image
from ldm_export.demo.data import render, sample_scene

IMG2IMG_PROMPT = "a blue circle on the left"
INPAINT_PROMPT = "a green square on the right"


def drawn(colour: str, shape: str, position: str, seed: int = 0, background: str = "gray") -> Image.Image:
    """A training-style image of one shape (large, on a plain background)."""
    scene = sample_scene(np.random.default_rng(seed), colour=colour, shape=shape, position=position, size="large",
                         background=background)
    return Image.fromarray(render(scene, 64))


def right_half_mask(side: int = 64) -> Image.Image:
    m = np.zeros((side, side), np.uint8)
    m[:, side // 2:] = 255
    return Image.fromarray(m)


def img2img(pipe, seeds: Sequence[int], strength: float = 0.6):
    init = drawn("red", "circle", "left")
    return init, [pipe(IMG2IMG_PROMPT, init_image=init, strength=strength, seed=s)[0] for s in seeds]


def inpaint(pipe, seeds: Sequence[int], strength: float = 1.0):
    init, mask = drawn("red", "circle", "right", background="blue"), right_half_mask()
    return init, mask, [pipe(INPAINT_PROMPT, init_image=init, mask_image=mask, strength=strength, seed=s)[0]
                        for s in seeds]


def read_inpainted(image: Image.Image, init: Image.Image, mask: Image.Image):
    """The checker's reading of what was painted in the mask (the kept half filled with the background), and whether
    every pixel outside the mask equals the init image's."""
    keep = np.asarray(mask) == 0
    painted = np.asarray(image).copy()
    painted[keep] = np.median(np.asarray(init)[keep], axis=0)
    exact = bool((np.asarray(image)[keep] == np.asarray(init)[keep]).all())
    return read_image(Image.fromarray(painted)), exact


def sheet(images: Sequence[Image.Image], path: Path, scale: int = 4) -> None:
    w, h = images[0].size
    out = Image.new("RGB", (len(images) * (w * scale + 4) - 4, h * scale), (255, 255, 255))
    for k, im in enumerate(images):
        out.paste(im.convert("RGB").resize((w * scale, h * scale), Image.NEAREST), (k * (w * scale + 4), 0))
    out.save(path)


def main(argv: Sequence[str] | None = None) -> None:
    from ldm_export.runtime.pipeline import Pipeline

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--out", default="docs/img")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    args = ap.parse_args(argv)
    pipe = Pipeline.from_bundle(args.bundle)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    init, results = img2img(pipe, args.seeds)
    print(f"img2img '{IMG2IMG_PROMPT}', strength 0.6, from {read_image(init).colour} {read_image(init).shape} "
          f"{read_image(init).position}:")
    for s, im in zip(args.seeds, results):
        r = read_image(im)
        print(f"  seed {s}: {r.colour} {r.shape} {r.position}")
    sheet([init, *results], out / "edit_img2img.png")
    init, mask, results = inpaint(pipe, args.seeds)
    print(f"inpaint right half '{INPAINT_PROMPT}', strength 1:")
    for s, im in zip(args.seeds, results):
        r, exact = read_inpainted(im, init, mask)
        print(f"  seed {s}: right half reads {r.colour} {r.shape} {r.position}; left half pixel-exact: {exact}")
    sheet([init, mask.convert("RGB"), *results], out / "edit_inpaint.png")
    print(f"wrote {out / 'edit_img2img.png'} and {out / 'edit_inpaint.png'}")


if __name__ == "__main__":
    main()
