"""End-to-end parity of the DiT families with diffusers' own pipelines: ``python -m ldm_export.parity.pipelines``.

Builds tiny-sd3 and tiny-flux (and a FLUX-schnell variant) from diffusers folders with random weights, runs each
bundle through the numpy runtime's ``Pipeline`` and the same weights through diffusers' StableDiffusion3Pipeline /
FluxPipeline with the same tokenizer files and initial noise, and prints (and writes docs/dit_parity.md) the final
latents' max error and the decoded images' PSNR. The helpers are also used by tests/test_dit_pipeline.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import tempfile
from pathlib import Path

import numpy as np

from ldm_export.zoo import MODELS, get_model

PROMPT = "a red circle on the left"
STEPS = 6
PSNR_TARGET = 40.0
# FLUX.1 [schnell] at tiny size: no guidance embedding, static shift 1
TINY_SCHNELL = dataclasses.replace(
    get_model("tiny-flux"), name="tiny-flux-schnell",
    extra_configs={**get_model("tiny-flux").extra_configs,
                   "transformer": get_model("tiny-flux").extra_configs["transformer"] | {"guidance_embeds": False}},
    scheduler=get_model("flux-schnell").scheduler)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of two images in [-1, 1] (peak-to-peak 2)."""
    mse = float(np.mean((np.clip(a, -1, 1) - np.clip(b, -1, 1)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(4.0 / mse)


def diffusers_folder(spec, root, seed: int = 11):
    """A diffusers folder of ``spec`` with random weights and tokenizers (CLIP's BPE, a stand-in T5)."""
    from ldm_export.export.models import build_random
    from ldm_export.export.t5_tokenizer import write_standin_t5_tokenizer
    from ldm_export.runtime.tokenizer import write_tokenizer_files

    modules = build_random(spec, seed)
    folder = root / "pipe"
    for name, module in modules.items():
        module.save_pretrained(str(folder / name))
    family = spec.family_def
    for name, cls, pad in zip(family.tokenizers, family.tokenizer_classes, family.pad_tokens):
        if cls == "T5TokenizerFast":
            write_standin_t5_tokenizer(folder / name, vocab_size=800)
        else:
            write_tokenizer_files(folder / name, pad_token=pad)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": family.pipeline_class}))
    return folder, modules


def diffusers_pipeline(spec, folder, modules):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline
    from transformers import CLIPTokenizer, T5TokenizerFast

    scheduler = FlowMatchEulerDiscreteScheduler.from_config({k: v for k, v in spec.scheduler.items() if k != "_class_name"})
    parts = {"transformer": modules["transformer"], "scheduler": scheduler, "vae": modules["vae"]}
    for enc, tok, cls in zip(spec.family_def.text_encoders, spec.family_def.tokenizers, spec.family_def.tokenizer_classes):
        parts[enc] = modules[enc]
        parts[tok] = (T5TokenizerFast if cls == "T5TokenizerFast" else CLIPTokenizer).from_pretrained(str(folder / tok))
    cls = StableDiffusion3Pipeline if spec.family == "sd3" else FluxPipeline
    pipe = cls(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference(spec, folder, modules, latents: np.ndarray, guidance: float, negative: str | None = None):
    """diffusers' pipeline on the same weights and noise: final latents (B, 16, h, w) and the decoded image."""
    import torch

    pipe = diffusers_pipeline(spec, folder, modules)
    side = latents.shape[-1] * 8
    with torch.no_grad():
        if spec.family == "sd3":
            out = pipe(PROMPT, negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=guidance,
                       latents=torch.from_numpy(latents), height=side, width=side,
                       max_sequence_length=spec.max_length, output_type="latent").images
        else:
            from diffusers import FluxPipeline

            packed = FluxPipeline._pack_latents(torch.from_numpy(latents), *latents.shape)
            out = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=guidance, latents=packed, height=side,
                       width=side, max_sequence_length=spec.max_length, output_type="latent").images
            out = FluxPipeline._unpack_latents(out, side, side, 8)
        image = pipe.vae.decode(out / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor).sample
    return out.numpy(), image.numpy()



CASES = [("tiny-sd3", 4.0, None), ("tiny-sd3", 5.0, "blurry, a square"), ("tiny-flux", 3.5, None),
         ("tiny-flux-schnell", 0.0, None)]


def build_case(spec, root: Path) -> tuple[Path, Path, dict]:
    """A diffusers folder of ``spec`` and the fp32 bundle built from it."""
    from ldm_export.export.build import BuildConfig, build

    folder, modules = diffusers_folder(spec, root)
    registered = spec.name in MODELS
    MODELS[spec.name] = spec  # the schnell variant is not in the zoo
    try:
        build(BuildConfig(model=spec.name, precision="fp32", weights=folder, out=root / "bundle"))
    finally:
        if not registered:
            del MODELS[spec.name]
    return root / "bundle", folder, modules


def compare_case(bundle: Path, folder: Path, modules: dict, spec, guidance: float, negative: str | None,
                 seed: int = 0) -> dict:
    from ldm_export.runtime import Pipeline

    latents = np.random.default_rng(seed).standard_normal((1, 16, 8, 8)).astype(np.float32)
    pipe = Pipeline.from_bundle(bundle)
    ours = pipe(PROMPT, negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=guidance, latents=latents,
                return_latents=True)
    image = pipe.decode(np.asarray(ours, np.float32))
    ref_latents, ref_image = reference(spec, folder, modules, latents, guidance, negative)
    return {"latent_max_abs": float(np.abs(ours - ref_latents).max()), "latent_ref_max": float(np.abs(ref_latents).max()),
            "psnr_db": psnr(image, ref_image)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "docs" / "dit_parity.md"))
    args = parser.parse_args(argv)
    import diffusers
    import torch

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        built = {}
        for name, guidance, negative in CASES:
            spec = TINY_SCHNELL if name == "tiny-flux-schnell" else get_model(name)
            if name not in built:
                built[name] = build_case(spec, Path(tmp) / name)
            r = compare_case(*built[name], spec, guidance, negative)
            rows.append((name, spec.family_def.pipeline_class, guidance, negative, r))
            print(f"{name:18s} guidance {guidance:4.1f} negative {negative!r:22s} latents max abs "
                  f"{r['latent_max_abs']:.2e} (of {r['latent_ref_max']:.2f})  PSNR {r['psnr_db']:.1f} dB")
    lines = ["# End-to-end parity of the DiT families with diffusers", "",
             "Command: `python -m ldm_export.parity.pipelines`  ",
             f"Machine: a 2-core CPU (Python {platform.python_version()}, torch {torch.__version__}, diffusers "
             f"{diffusers.__version__}, ONNX Runtime CPU).", "",
             f"Each row: a tiny model with random weights saved as a diffusers folder, built into an fp32 bundle, run by "
             f"`ldm_export.runtime.Pipeline` and by diffusers' own pipeline on the same weights, tokenizer files and "
             f"initial latents, {STEPS} steps, prompt {PROMPT!r}. Target: PSNR >= {PSNR_TARGET:.0f} dB of the decoded "
             "images ([-1, 1] range, peak-to-peak 2).", "",
             "| model | diffusers pipeline | guidance | negative prompt | final latents max abs error | image PSNR dB |",
             "|---|---|---:|---|---:|---:|"]
    for name, cls, guidance, negative, r in rows:
        lines.append(f"| {name} | {cls} | {guidance:g} | {negative or ''} | {r['latent_max_abs']:.1e} "
                     f"(latents up to {r['latent_ref_max']:.2f}) | {r['psnr_db']:.1f} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
