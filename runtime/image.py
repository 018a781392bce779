"""Decoded images to PIL, and the AUTOMATIC1111 "parameters" PNG text chunk (format, parse, save).

The text format is stable-diffusion-webui's infotext (``modules/processing.py: create_infotext``,
``modules/infotext_utils.py: quote, unquote, parse_generation_parameters``): the prompt, a
``Negative prompt: ...`` line when there is one, then one line of ``Key: value`` pairs joined by
", ", a value JSON-quoted when it holds a comma, a colon or a newline.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .checks import refuse_out_under_a_file
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


# Formats by file extension. JPEG and WebP carry the parameters where A1111 writes them: the EXIF UserComment,
# "UNICODE\0" + UTF-16-BE (piexif.helper.UserComment.dump(..., encoding="unicode"), modules/images.py: save_image).
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
QUALITY = 80  # A1111's default jpeg_quality, used for JPEG and lossy WebP
_EXIF_IFD, _USER_COMMENT = 0x8769, 0x9286
_UNICODE_PREFIX = b"UNICODE\0"


def user_comment_exif(comment: bytes) -> bytes:
    """EXIF holding only ``comment`` as the Exif IFD's UserComment, typed UNDEFINED as the EXIF standard and piexif
    (A1111's writer and reader) type it: Pillow types raw bytes as BYTE, which piexif reads back as a tuple of ints
    that A1111's "PNG info" cannot decode. Big-endian TIFF, as piexif.dump writes: IFD0 with one pointer to the Exif
    IFD, whose one entry points at the comment."""
    import struct

    exif_ifd = 8 + 2 + 12 + 4  # after the header and IFD0's one entry
    data = exif_ifd + 2 + 12 + 4
    tiff = (b"MM\x00\x2a" + struct.pack(">I", 8)
            + struct.pack(">H", 1) + struct.pack(">HHII", _EXIF_IFD, 4, 1, exif_ifd) + struct.pack(">I", 0)
            + struct.pack(">H", 1) + struct.pack(">HHII", _USER_COMMENT, 7, len(comment), data) + struct.pack(">I", 0))
    return b"Exif\x00\x00" + tiff + comment


def image_format(path: str | Path) -> str:
    """The format ``path``'s extension names (PNG, JPEG or WEBP); refuse any other extension."""
    ext = Path(path).suffix.lower()
    if ext not in IMAGE_FORMATS:
        raise LdmExportError(f"cannot write {Path(path).name}: the extension {ext or '(none)'} names no format this "
                             f"writes; use {', '.join(IMAGE_FORMATS)}")
    return IMAGE_FORMATS[ext]


def _partial(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial-{os.getpid()}")


def check_writable(path: str | Path) -> Path:
    """Check before any work that an image can be written at ``path`` (format, folder, permission) by creating and
    removing its temporary file; a missing parent folder is not made here (a command that then fails would leave it
    behind) but its nearest existing folder must be writable: the caller makes it before its first save."""
    path = Path(path)
    image_format(path)
    if path.is_dir():
        raise LdmExportError(f"{path} is a folder; give a file name such as {path / 'image.png'}")
    refuse_out_under_a_file(path)
    try:
        if path.parent.is_dir():
            probe = _partial(path)
            probe.touch()
            probe.unlink()
        else:
            existing = next(p for p in path.parent.parents if p.exists())
            if not os.access(existing, os.W_OK | os.X_OK):
                raise PermissionError(13, "Permission denied")
    except OSError as e:
        raise LdmExportError(f"cannot write {path}: {e.strerror or e}; choose another --out") from None
    return path


_JPEG_EXIF_MAX = 65533  # bytes of EXIF in a JPEG's APP1 segment (a 16-bit length, less its own 2 bytes)


def save_image(image, path: str | Path, parameters: str) -> Path:
    """Save ``image`` in the format its extension names with A1111's ``parameters`` (PNG text chunk; EXIF
    UserComment for JPEG/WebP), atomically: a temporary file renamed into place, so an interrupted save leaves
    the old file (or none), never a truncated one."""
    from PIL import Image, PngImagePlugin

    if not isinstance(image, Image.Image):
        raise LdmExportError(f"image must be a PIL.Image, got {type(image).__name__}")
    if not isinstance(parameters, str):
        raise LdmExportError(f"parameters must be a string, got {type(parameters).__name__}")
    path = Path(path)
    fmt = image_format(path)
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", parameters)
        kwargs = {"pnginfo": info}
    else:
        kwargs = {"exif": user_comment_exif(_UNICODE_PREFIX + parameters.encode("utf-16-be")), "quality": QUALITY}
        if fmt == "JPEG" and len(kwargs["exif"]) > _JPEG_EXIF_MAX:  # one APP1 segment: Pillow refuses more
            logger.warning("%s: the generation parameters (%d characters) are too long for a JPEG's EXIF, so the "
                           "image is saved without them; write a .png or .webp to keep them", path, len(parameters))
            kwargs = {"quality": QUALITY}
    tmp = _partial(path)
    try:
        image.save(tmp, format=fmt, **kwargs)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise LdmExportError(f"cannot write {path}: {e.strerror or e}; check the folder exists and is writable") from None
    except BaseException:  # Ctrl-C, SIGTERM: the old file stays as it was
        tmp.unlink(missing_ok=True)
        raise
    logger.debug("saved %s (%dx%d, %s)", path, image.width, image.height, fmt)
    return path


def save_png(image, path: str | Path, parameters: str) -> Path:
    """Save ``image`` as PNG with a ``parameters`` text chunk (tEXt, or iTXt when the text is not Latin-1), atomically."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise LdmExportError(f"save_png writes PNG but {path.name} names another format; use save_image")
    return save_image(image, path, parameters)


def read_parameters(path: str | Path) -> str | None:
    """The A1111 ``parameters`` text of a PNG, JPEG or WebP written by ``save_image`` (None when absent)."""
    from PIL import Image

    with Image.open(path) as im:
        if im.format == "PNG":
            return im.info.get("parameters")
        comment = im.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    if not comment:
        return None
    if comment.startswith(_UNICODE_PREFIX):
        return comment[len(_UNICODE_PREFIX):].decode("utf-16-be")
    return comment[8:].decode("utf-8", errors="ignore")


def output_paths(out: str | Path, n: int) -> list[Path]:
    """Where ``n`` images go: ``out`` for one; ``NAME-1.EXT``, ``NAME-2.EXT``, ... for several. A folder (one that
    exists, or a name ending in a separator, ``.`` or ``..``) gets ``image.png`` inside it."""
    text = str(out)
    if not text.strip():
        raise LdmExportError("--out is empty; give an image file name such as image.png, or a folder")
    out = Path(out)
    if out.is_dir() or text.endswith(("/", os.sep)) or out.name in ("", ".", ".."):
        out = out / "image.png"
    if not out.suffix:
        out = out.with_suffix(".png")
    return [out] if n == 1 else [out.with_name(f"{out.stem}-{k + 1}{out.suffix}") for k in range(n)]
