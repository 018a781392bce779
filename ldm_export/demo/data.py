"""Generated training data for the demo model: one coloured shape on a plain background, with a caption.

Every image is a pure function of ``(seed, index)``, so a dataset is the same whether it is made in
one process or many. numpy and PIL only.
"""
from __future__ import annotations

import logging
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

log = logging.getLogger(__name__)

# Object colours (RGB). The checker reads an object's colour as the nearest of these.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (35, 65, 225),
    "yellow": (245, 220, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "purple": (140, 40, 185),
    "orange": (250, 135, 20),
}
COLOURS = tuple(PALETTE)
# Backgrounds: every object colour (never the object's own) and a grey that no object has.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {**PALETTE, "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right", "top", "bottom", "center")
SIZES = ("small", "large")
# Object centre as fractions of the side (x, y).
POSITION_ANCHORS: dict[str, tuple[float, float]] = {
    "left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75), "center": (0.5, 0.5),
}
# Half-size of the object as a fraction of the side.
SIZE_RANGES: dict[str, tuple[float, float]] = {"small": (0.09, 0.12), "large": (0.15, 0.18)}
POSITION_JITTER = 0.03
COLOUR_JITTER = 10  # per channel, uniform in [-J, J]
SUPERSAMPLE = 4  # draw at 4x and downsample, for anti-aliased edges

_SHAPE_WORDS = {"circle": ("circle", "circle", "disc"), "square": ("square", "square", "block"),
                "triangle": ("triangle",)}
_SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
_POSITION_PHRASES = {
    "left": ("on the left", "at the left", "on the left side", "to the left", "in the left part of the image"),
    "right": ("on the right", "at the right", "on the right side", "to the right", "in the right part of the image"),
    "top": ("at the top", "at the top of the picture", "near the top", "in the upper part of the image", "on top"),
    "bottom": ("at the bottom", "near the bottom", "at the bottom of the picture", "in the lower part of the image",
               "on the bottom"),
    "center": ("in the center", "in the middle", "in the centre", "in the middle of the picture", "at the center"),
}
_POSITION_WORDS = {"left": ("left",), "right": ("right",), "top": ("top",), "bottom": ("bottom",),
                   "center": ("center", "middle", "centre")}


@dataclass(frozen=True)
class Scene:
    """What one image shows: the attributes a caption names and the checker reads back."""

    colour: str
    shape: str
    position: str
    size: str
    background: str
    cx: float  # centre, fractions of the side
    cy: float
    half: float  # half-size, fraction of the side
    rgb: tuple[int, int, int]
    bg_rgb: tuple[int, int, int]


def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    j = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
    return tuple(int(v) for v in np.clip(np.asarray(rgb) + j, 0, 255))


def sample_scene(rng: np.random.Generator, colour: str | None = None, shape: str | None = None,
                 position: str | None = None, size: str | None = None, background: str | None = None) -> Scene:
    """Draw a scene; any attribute given is kept, the rest are uniform."""
    colour = colour or COLOURS[rng.integers(len(COLOURS))]
    shape = shape or SHAPES[rng.integers(len(SHAPES))]
    position = position or POSITIONS[rng.integers(len(POSITIONS))]
    size = size or SIZES[rng.integers(len(SIZES))]
    if background is None:
        choices = [b for b in BACKGROUNDS if b != colour]
        background = choices[rng.integers(len(choices))]
    if background == colour:
        raise ValueError(f"background '{background}' equals the object's colour")
    ax, ay = POSITION_ANCHORS[position]
    cx, cy = ax + rng.uniform(-POSITION_JITTER, POSITION_JITTER), ay + rng.uniform(-POSITION_JITTER, POSITION_JITTER)
    half = rng.uniform(*SIZE_RANGES[size])
    return Scene(colour, shape, position, size, background, float(cx), float(cy), float(half),
                 _jitter(rng, PALETTE[colour]), _jitter(rng, BACKGROUNDS[background]))


def render(scene: Scene, resolution: int = 64) -> np.ndarray:
    """The scene as a (resolution, resolution, 3) uint8 image."""
    side = resolution * SUPERSAMPLE
    img = Image.new("RGB", (side, side), scene.bg_rgb)
    draw = ImageDraw.Draw(img)
    cx, cy, h = scene.cx * side, scene.cy * side, scene.half * side
    if scene.shape == "circle":
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=scene.rgb)
    elif scene.shape == "square":
        s = 0.9 * h  # a square of the same half-size looks larger than the circle; keep areas closer
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=scene.rgb)
    elif scene.shape == "triangle":
        # upright isosceles triangle in a 2h x 2h box, base at the bottom
        draw.polygon([(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)], fill=scene.rgb)
    else:
        raise ValueError(f"unknown shape '{scene.shape}'")
    return np.asarray(img.resize((resolution, resolution), Image.Resampling.BOX))


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """One of several caption templates, with synonyms; names colour, shape and position, sometimes size and background."""
    pick = lambda options: options[rng.integers(len(options))]  # noqa: E731
    shape = pick(_SHAPE_WORDS[scene.shape])
    pos = pick(_POSITION_PHRASES[scene.position])
    size = pick(_SIZE_WORDS[scene.size]) + " " if rng.random() < 0.5 else ""
    bg = scene.background
    template = rng.integers(8)
    if template == 0:
        text = f"a {size}{scene.colour} {shape} {pos}"
    elif template == 1:
        text = f"{scene.colour} {shape}, {pick(_POSITION_WORDS[scene.position])}"
    elif template == 2:
        text = f"a {size}{scene.colour} {shape} {pos}, {bg} background"
    elif template == 3:
        text = f"a {size}{scene.colour} {shape} on a {bg} background, {pos}"
    elif template == 4:
        text = f"{pos}, a {size}{scene.colour} {shape}"
    elif template == 5:
        text = f"a picture of a {size}{scene.colour} {shape} {pos}"
    elif template == 6:
        text = f"{size}{scene.colour} {shape} {pos} against a {bg} background"
    else:
        text = f"there is a {size}{scene.colour} {shape} {pos}"
    return text


@dataclass
class Dataset:
    images: np.ndarray  # (N, H, W, 3) uint8
    captions: list[str]
    scenes: list[Scene]


def make_example(seed: int, index: int, resolution: int = 64) -> tuple[np.ndarray, str, Scene]:
    """Example ``index`` of the dataset of ``seed``: image, caption, scene."""
    rng = np.random.default_rng([seed, index])
    scene = sample_scene(rng)
    return render(scene, resolution), caption(scene, rng), scene


def _chunk(args: tuple[int, int, int, int]) -> tuple[np.ndarray, list[str], list[Scene]]:
    seed, start, stop, resolution = args
    out = [make_example(seed, i, resolution) for i in range(start, stop)]
    return np.stack([o[0] for o in out]), [o[1] for o in out], [o[2] for o in out]


def make_dataset(n: int, seed: int = 0, resolution: int = 64, workers: int = 1) -> Dataset:
    """``n`` examples, identical for any number of ``workers``."""
    step = 2048
    jobs = [(seed, s, min(n, s + step), resolution) for s in range(0, n, step)]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(workers) as pool:
            parts = list(pool.map(_chunk, jobs))
    else:
        parts = [_chunk(j) for j in jobs]
    log.info("generated %d examples at %d px (seed %d)", n, resolution, seed)
    return Dataset(np.concatenate([p[0] for p in parts]), [c for p in parts for c in p[1]],
                   [s for p in parts for s in p[2]])


def prompt_cases() -> list[tuple[str, str, str, str]]:
    """The fixed adherence prompt set: every colour x shape x position, as (prompt, colour, shape, position)."""
    return [(f"a {c} {s} {_POSITION_PHRASES[p][0]}", c, s, p) for c in COLOURS for s in SHAPES for p in POSITIONS]
