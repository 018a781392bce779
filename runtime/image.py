"""Decoded images to PIL, and the AUTOMATIC1111 "parameters" PNG text chunk (format, parse, save).

The text format is stable-diffusion-webui's infotext (``modules/processing.py: create_infotext``,
``modules/infotext_utils.py: quote, unquote, parse_generation_parameters``): the prompt, a
``Negative prompt: ...`` line when there is one, then one line of ``Key: value`` pairs joined by
", ", a value JSON-quoted when it holds a comma, a colon or a newline.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .errors import LdmExportError, overflow_fix

logger = logging.getLogger(__name__)

# A1111's re_param_code and re_imagesize
_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_RE_IMAGESIZE = re.compile(r"^(\d+)x(\d+)$")
_RE_KEY = re.compile(r"^\w[\w \-/]+$")
# Our arguments -> A1111's keys, in A1111's order
_FIELDS = (("steps", "Steps"), ("sampler", "Sampler"), ("cfg_scale", "CFG scale"), ("seed", "Seed"),
           ("size", "Size"), ("model_hash", "Model hash"), ("model_name", "Model"))


def latents_to_images(decoded: np.ndarray) -> list:
    """(B, 3, H, W) VAE output in [-1, 1] to PIL images, as diffusers' ``VaeImageProcessor.postprocess`` does."""
    from PIL import Image

    if not isinstance(decoded, np.ndarray) or decoded.ndim != 4 or decoded.shape[1] != 3:
        got = f"shape {decoded.shape}" if isinstance(decoded, np.ndarray) else type(decoded).__name__
        raise LdmExportError(f"decoded images must be a (batch, 3, height, width) array, got {got}")
    images = decoded.astype(np.float32, copy=False)
    if not np.isfinite(images).all():
        raise LdmExportError("the decoded images hold NaN or Inf; the VAE decoder overflowed: " + overflow_fix("vae_decoder"))
    images = np.clip(images * 0.5 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)  # (B, H, W, 3)
    pixels = (images * 255).round().astype(np.uint8)
    return [Image.fromarray(np.ascontiguousarray(p)) for p in pixels]


def _number(x: float | int) -> str:
    """7 -> "7", 7.0 -> "7", 7.5 -> "7.5": how the webui's infotext shows CFG scale."""
    x = float(x)
    return str(int(x)) if x.is_integer() else repr(x)


def _quote(text: str) -> str:
    """A1111's ``quote``: JSON-quote a value that holds a comma, a newline or a colon."""
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def _unquote(text: str) -> str:
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def format_parameters(prompt: str, negative_prompt: str | None, steps: int, sampler: str, cfg_scale: float,
                      seed: int, width: int, height: int, model_hash: str | None, model_name: str | None = None,
                      extra: Mapping[str, Any] | None = None) -> str:
    """The AUTOMATIC1111 ``parameters`` text (``create_infotext``); ``extra`` pairs follow ``Model``."""
    for name, value in (("prompt", prompt), ("negative_prompt", negative_prompt or ""), ("sampler", sampler)):
        if not isinstance(value, str):
            raise LdmExportError(f"{name} must be a string, got {type(value).__name__}")
    values = {"steps": str(int(steps)), "sampler": sampler, "cfg_scale": _number(cfg_scale), "seed": str(int(seed)),
              "size": f"{int(width)}x{int(height)}", "model_hash": model_hash, "model_name": model_name}
    params = {key: values[arg] for arg, key in _FIELDS if values[arg] is not None}
    for key, value in (extra or {}).items():
        if not isinstance(key, str) or not _RE_KEY.match(key) or key.strip() != key:
            raise LdmExportError(f"extra parameter name {key!r} must be letters, digits, spaces, '-', '/' or '_'")
        if key in params or key in ("Negative prompt", "Prompt"):
            raise LdmExportError(f"extra parameter {key!r} repeats a named field; pass it by its argument")
        if value is not None:
            params[key] = value if isinstance(value, str) else _number(value) if isinstance(value, float) else str(value)
    line = ", ".join(f"{k}: {_quote(v)}" for k, v in params.items())
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{line}".strip()


def parse_parameters(text: str) -> dict:
    """Inverse of ``format_parameters`` (A1111's ``parse_generation_parameters``), keyed by its argument names.

    Fields absent from the text are left out; unknown ``Key: value`` pairs go to ``extra`` as strings.
    """
    if not isinstance(text, str):
        raise LdmExportError(f"parameters must be a string, got {type(text).__name__}")
    *lines, lastline = text.strip().split("\n")
    if len(_RE_PARAM.findall(lastline)) < 3:  # as A1111 decides whether the last line holds parameters
        lines.append(lastline)
        lastline = ""
    prompt, negative, done_with_prompt = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        (negative if done_with_prompt else prompt).append(line)
    out: dict[str, Any] = {"prompt": "\n".join(prompt), "negative_prompt": "\n".join(negative) or None}
    keys = {key: arg for arg, key in _FIELDS}
    extra: dict[str, str] = {}
    for key, value in _RE_PARAM.findall(lastline):
        value = _unquote(value)
        arg = keys.get(key)
        try:
            if arg == "size":
                m = _RE_IMAGESIZE.match(value)
                if m is None:
                    raise ValueError(value)
                out["width"], out["height"] = int(m.group(1)), int(m.group(2))
            elif arg in ("steps", "seed"):
                out[arg] = int(value)
            elif arg == "cfg_scale":
                out[arg] = float(value)
            elif arg is not None:
                out[arg] = value
            else:
                extra[key] = value
        except ValueError:
            raise LdmExportError(f"parameter {key!r} has the unreadable value {value!r}; expected A1111's format") from None
    if extra:
        out["extra"] = extra
    return out


def save_png(image, path: str | Path, parameters: str) -> Path:
    """Save ``image`` as PNG with a ``parameters`` text chunk (tEXt, or iTXt when the text is not Latin-1)."""
    from PIL import Image, PngImagePlugin

    if not isinstance(image, Image.Image):
        raise LdmExportError(f"image must be a PIL.Image, got {type(image).__name__}")
    if not isinstance(parameters, str):
        raise LdmExportError(f"parameters must be a string, got {type(parameters).__name__}")
    path = Path(path)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    try:
        image.save(path, format="PNG", pnginfo=info)
    except OSError as e:
        raise LdmExportError(f"cannot write {path}: {e}; check the folder exists and is writable") from e
    logger.debug("saved %s (%dx%d)", path, image.width, image.height)
    return path
