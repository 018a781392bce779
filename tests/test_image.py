"""Decoded-image conversion (against diffusers' VaeImageProcessor) and the A1111 PNG "parameters" chunk."""
from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from ldm_export.runtime.errors import LdmExportError
from ldm_export.runtime.image import format_parameters, latents_to_images, parse_parameters, save_png

BASE = dict(prompt="a photo of a cat", negative_prompt="blurry", steps=20, sampler="Euler a", cfg_scale=7,
            seed=42, width=512, height=768, model_hash="abcdef1234", model_name="v1-5-pruned-emaonly")


def png_chunks(path):
    """(type, data) of every chunk, read by hand so the test does not lean on PIL's reader."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, out = 8, []
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n : pos + 12 + n])[0] == zlib.crc32(kind + body)
        out.append((kind.decode(), body))
        pos += 12 + n
    return out


def test_format_matches_a1111_layout():
    text = format_parameters(**BASE)
    assert text == ("a photo of a cat\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, CFG scale: 7, "
                    "Seed: 42, Size: 512x768, Model hash: abcdef1234, Model: v1-5-pruned-emaonly")
    no_neg = format_parameters(**{**BASE, "negative_prompt": "", "cfg_scale": 7.5, "model_name": None})
    assert no_neg == "a photo of a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 512x768, Model hash: abcdef1234"


@pytest.mark.parametrize("prompt, negative", [
    ("a photo of a cat", "blurry"),
    ("masterpiece, best quality, (cat:1.2), [dog], 1girl", "lowres, bad anatomy, text: none"),
    ("line one,\nline two\nline three: with colon", "neg line one\nneg, line two"),
    ("unicode café 🐱 日本語", None),
    ("", None),
])
def test_round_trip(prompt, negative):
    kwargs = {**BASE, "prompt": prompt, "negative_prompt": negative, "cfg_scale": 6.5,
              "model_name": "my model, v2: final", "extra": {"Schedule type": "Karras", "Clip skip": 2,
                                                             "Lora hashes": "a: 1, b: 2"}}
    parsed = parse_parameters(format_parameters(**kwargs))
    assert parsed == {**kwargs, "extra": {"Schedule type": "Karras", "Clip skip": "2", "Lora hashes": "a: 1, b: 2"}}
    assert format_parameters(**parsed) == format_parameters(**kwargs)


def test_values_with_commas_are_json_quoted():
    text = format_parameters(**{**BASE, "model_name": "a, b"})
    assert text.endswith('Model: "a, b"')


def test_parse_real_webui_text():
    # Shaped as stable-diffusion-webui writes it, with fields this module does not name.
    text = ('portrait of a woman, (freckles:1.1), studio light\nNegative prompt: ugly, deformed\n'
            'Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5.5, Seed: 1234567890, '
            'Size: 640x896, Model hash: 6ce0161689, Model: v1-5, Denoising strength: 0.4, '
            'Lora hashes: "detail: 0123abcd", Version: v1.10.1')
    p = parse_parameters(text)
    assert p["prompt"] == "portrait of a woman, (freckles:1.1), studio light"
    assert p["negative_prompt"] == "ugly, deformed"
    assert (p["steps"], p["sampler"], p["cfg_scale"], p["seed"]) == (30, "DPM++ 2M", 5.5, 1234567890)
    assert (p["width"], p["height"], p["model_hash"], p["model_name"]) == (640, 896, "6ce0161689", "v1-5")
    assert p["extra"] == {"Schedule type": "Karras", "Denoising strength": "0.4", "Lora hashes": "detail: 0123abcd",
                          "Version": "v1.10.1"}


@pytest.mark.parametrize("prompt, chunk", [("a photo of a cat, 8k", "tEXt"), ("a cat 🐱, 日本語", "iTXt")])
def test_save_png_writes_parameters_chunk(tmp_path, prompt, chunk):
    text = format_parameters(**{**BASE, "prompt": prompt})
    img = Image.fromarray(np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3))
    path = save_png(img, tmp_path / "out.png", text)
    with Image.open(path) as back:
        assert back.text["parameters"] == text
        np.testing.assert_array_equal(np.asarray(back), np.asarray(img))
    (body,) = [b for k, b in png_chunks(path) if k == chunk]
    assert body.startswith(b"parameters\x00")
    if chunk == "tEXt":
        assert body[len(b"parameters\x00"):].decode("latin-1") == text


def test_latents_to_images_match_diffusers():
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from diffusers.image_processor import VaeImageProcessor

    rng = np.random.default_rng(0)
    decoded = (rng.standard_normal((2, 3, 16, 24)) * 0.7).astype(np.float32)
    decoded[0, 0, 0, :4] = [-1.0, 1.0, -3.0, 3.0]
    decoded[0, 0, 1, :3] = [1 / 255 - 1, 0.5 / 255 * 2 - 1, 0.0]  # round-half boundaries
    ours = latents_to_images(decoded)
    want = VaeImageProcessor().postprocess(torch.from_numpy(decoded), output_type="pil")
    assert len(ours) == 2
    for a, b in zip(ours, want):
        assert a.mode == "RGB" and a.size == (24, 16)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_latents_to_images_closed_form():
    decoded = np.array([-2.0, -1.0, 0.0, 1.0, 2.0, 0.5], np.float32).reshape(1, 1, 1, 6).repeat(3, axis=1)
    (img,) = latents_to_images(decoded)
    assert np.asarray(img)[0, :, 0].tolist() == [0, 0, 128, 255, 255, 191]  # 127.5 -> 128, 191.25 -> 191


def test_bad_input_raises_ldm_export_error(tmp_path):
    with pytest.raises(LdmExportError, match="batch, 3, height, width"):
        latents_to_images(np.zeros((3, 8, 8), np.float32))
    with pytest.raises(LdmExportError, match="NaN or Inf"):
        latents_to_images(np.full((1, 3, 2, 2), np.nan, np.float32))
    with pytest.raises(LdmExportError, match="prompt must be a string, got int"):
        format_parameters(**{**BASE, "prompt": 3})
    with pytest.raises(LdmExportError, match="extra parameter name"):
        format_parameters(**{**BASE, "extra": {"bad: key": 1}})
    with pytest.raises(LdmExportError, match="image must be a PIL.Image"):
        save_png(np.zeros((2, 2, 3), np.uint8), tmp_path / "x.png", "p")
    with pytest.raises(LdmExportError, match="cannot write"):
        save_png(Image.new("RGB", (2, 2)), tmp_path / "missing" / "x.png", "p")
    with pytest.raises(LdmExportError, match="unreadable value"):
        parse_parameters("cat\nSteps: many, Sampler: Euler, Seed: 1")
