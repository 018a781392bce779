"""`build --weights FOLDER` with no --model (or --model auto): the diffusers folder says its own architecture, so a
model outside the zoo builds and runs; a folder of a zoo architecture gives that model's spec; bad folders fail on
one line before any work."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import run_cli, torch_available
from ldm_export.export.build import BuildConfig, validate
from ldm_export.export.folder_spec import spec_from_folder
from ldm_export.runtime.errors import LdmExportError
from ldm_export.zoo import get_model

# a U-Net and a DiT family each, the SDXL base and refiner, FLUX with guidance, SD 2.x (pads with '!')
ZOO = ["tiny", "tiny-sdxl", "tiny-sdxl-refiner", "tiny-sd3", "tiny-flux", "sd15", "sd21", "sdxl", "sd3-medium",
       "sd35-medium"]
TRANSFORMERS_META = {"architectures": ["X"], "transformers_version": "4.57.0", "torch_dtype": "float32",
                     "model_type": "clip_text_model", "_name_or_path": "/somewhere/else"}


def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert message and "\n" not in message
    return message


def write_config_folder(spec, root: Path, drop: tuple[str, ...] = ()) -> Path:
    """What save_pretrained writes, configs only: model_index.json, each module's config.json with the libraries'
    own metadata keys, the tokenizer's pad token, the scheduler."""
    folder = root / spec.name
    family = spec.family_def
    index = spec.model_index()
    if family.name == "sdxl-refiner":
        index["text_encoder"] = [None, None]
    (folder / "scheduler").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({**spec.scheduler, "_diffusers_version": "0.35.2"}))
    for m in family.modules:
        if m.name in drop:
            continue
        meta = TRANSFORMERS_META if m.library == "transformers" else {"_class_name": m.class_name,
                                                                       "_diffusers_version": "0.35.2"}
        (folder / m.name).mkdir()
        (folder / m.name / "config.json").write_text(json.dumps({**meta, **spec.configs[m.name]}))
    for tok, pad in family.tokenizer_pads().items():
        if pad is not None:
            (folder / tok).mkdir()
            (folder / tok / "special_tokens_map.json").write_text(json.dumps({"pad_token": pad}))
    return folder


@pytest.mark.parametrize("name", ZOO)
def test_a_folder_of_a_zoo_architecture_gives_that_models_spec(tmp_path, name):
    zoo = get_model(name)
    spec = spec_from_folder(write_config_folder(zoo, tmp_path))
    assert spec.family == zoo.family and spec.name == name
    assert set(spec.configs) == set(zoo.configs)
    for module, config in zoo.configs.items():
        assert {k: spec.configs[module].get(k) for k in config} == config, module
        assert not set(TRANSFORMERS_META) & set(spec.configs[module]), module  # the files' metadata is not architecture
    assert spec.scheduler == zoo.scheduler
    assert spec.resolution == zoo.resolution
    assert spec.component_specs().keys() == zoo.component_specs().keys()
    if zoo.unet is not None:  # CLIP's count is in its config; T5's (SD3, FLUX) is the family reference's
        assert spec.max_length == zoo.max_length
        assert spec.component_specs() == zoo.component_specs()
    # what a folder cannot say (steps, guidance) is the family's published model's
    published = {"tiny": "sd15", "sd15": "sd15", "sd21": "sd21", "tiny-sdxl": "sdxl", "sdxl": "sdxl",
                 "tiny-sdxl-refiner": "sdxl-refiner", "tiny-sd3": "sd3-medium", "sd3-medium": "sd3-medium",
                 "sd35-medium": "sd35-medium", "tiny-flux": "flux-dev"}[name]
    assert spec.defaults == get_model(published).defaults


def test_missing_config_keys_come_from_the_family_reference(tmp_path):
    """SD 1.5's original vae/config.json predates scaling_factor: the SD 1.x value, as with --model sd15."""
    folder = write_config_folder(get_model("sd15"), tmp_path)
    vae = json.loads((folder / "vae" / "config.json").read_text())
    del vae["scaling_factor"]
    (folder / "vae" / "config.json").write_text(json.dumps(vae))
    assert spec_from_folder(folder).configs["vae"]["scaling_factor"] == 0.18215


@pytest.mark.parametrize("name,saved,decoder", [("tiny", True, "fp16"), ("tiny-sdxl", True, "fp32"),
                                                ("tiny-sdxl", False, "fp16")])
def test_force_upcast_counts_where_the_pipeline_acts_on_it(tmp_path, name, saved, decoder):
    """diffusers writes force_upcast=true into every VAE config it saves; only the SDXL pipelines act on it (the
    fp16-fix SDXL VAE says false). An SD 1.x folder keeps its fp16 decoder, as with --model."""
    folder = write_config_folder(get_model(name), tmp_path)
    vae = json.loads((folder / "vae" / "config.json").read_text())
    (folder / "vae" / "config.json").write_text(json.dumps({**vae, "force_upcast": saved}))
    spec = spec_from_folder(folder)
    assert BuildConfig(precision="fp16").component_precision("vae_decoder", spec.configs["vae"]) == decoder


def test_sd2_is_told_by_the_text_encoder_width_without_tokenizer_files(tmp_path):
    folder = write_config_folder(get_model("sd21"), tmp_path)
    for f in (folder / "tokenizer").iterdir():
        f.unlink()
    assert spec_from_folder(folder).family == "sd2"


def test_sd35_large_like_folder_gets_sd35_sampling_defaults_not_sd3s(tmp_path):
    """SD 3.5 large: RMS q/k norms without dual attention; its model card's 28 steps at guidance 3.5, not SD3's 7.0."""
    zoo = get_model("tiny-sd3")
    large = replace(zoo, extra_configs={**zoo.extra_configs,
                                        "transformer": zoo.extra_configs["transformer"] | {"qk_norm": "rms_norm"}})
    assert spec_from_folder(write_config_folder(large, tmp_path)).defaults == {"steps": 28, "guidance_scale": 3.5}
    assert spec_from_folder(write_config_folder(zoo, tmp_path / "sd3")).defaults == get_model("sd3-medium").defaults


def test_flux_without_guidance_embedding_is_schnell_like(tmp_path):
    zoo = get_model("tiny-flux")
    spec = replace(zoo, extra_configs={**zoo.extra_configs,
                                       "transformer": zoo.extra_configs["transformer"] | {"guidance_embeds": False}})
    got = spec_from_folder(write_config_folder(spec, tmp_path))
    assert got.defaults == get_model("flux-schnell").defaults and got.max_length == 256
    assert spec_from_folder(write_config_folder(zoo, tmp_path / "dev")).max_length == 512


@pytest.mark.parametrize("case,match", [
    ("pipeline", "names the pipeline 'PixArtAlphaPipeline', which ldm-export does not export"),
    ("config", "has no transformer/; a StableDiffusion3Pipeline folder needs"),
    ("no-t5-folder", "has no text_encoder_3/ (the T5 encoder); a StableDiffusion3Pipeline folder needs text_encoder/, "
                     "text_encoder_2/, text_encoder_3/, transformer/, vae/ (each with config.json and weights): copy "
                     "text_encoder_3/ from the model's release"),
    ("config-only", "has no vae/config.json; a StableDiffusion3Pipeline folder needs"),
    ("json", "is not readable JSON"),
    ("not-a-folder", "tells a single file's model by its safetensors keys; for config.json pass the --model"),
    ("no-t5", "was saved without text_encoder_3 (StableDiffusion3Pipeline(..., text_encoder_3=None), model_index.json "
              "says null); ldm-export exports the whole pipeline"),
])
def test_bad_folders_fail_on_one_line(tmp_path, case, match):
    spec = get_model("tiny-sd3")
    folder = write_config_folder(spec, tmp_path, drop={"config": ("transformer",), "no-t5": ("text_encoder_3",),
                                                       "no-t5-folder": ("text_encoder_3",)}.get(case, ()))
    if case == "config-only":  # the folder is there, its config.json is not: a re-save writes it
        (folder / "vae" / "config.json").unlink()
    if case == "no-t5":  # diffusers' save_pretrained of a pipeline loaded with text_encoder_3=None
        index = json.loads((folder / "model_index.json").read_text())
        (folder / "model_index.json").write_text(json.dumps({**index, "text_encoder_3": [None, None]}))
    if case == "pipeline":
        (folder / "model_index.json").write_text(json.dumps({"_class_name": "PixArtAlphaPipeline"}))
    if case == "json":
        (folder / "vae" / "config.json").write_text("{not json")
    if case == "not-a-folder":
        folder = folder / "vae" / "config.json"
    with pytest.raises(LdmExportError) as e:
        validate(BuildConfig(model="auto", weights=folder, out=tmp_path / "out"))
    assert match in one_line(e)
    assert not (tmp_path / "out").exists()


def test_auto_needs_a_folder_and_not_random_weights(tmp_path):
    with pytest.raises(LdmExportError, match="pass a diffusers pipeline folder or a single-file .safetensors checkpoint"):
        validate(BuildConfig(model="auto", out=tmp_path / "o"))
    with pytest.raises(LdmExportError, match="for random weights name a zoo model"):
        validate(BuildConfig(model="auto", random_weights=True, out=tmp_path / "o"))


def test_default_out_is_named_after_the_folder(tmp_path):
    folder = write_config_folder(get_model("tiny"), tmp_path)
    assert BuildConfig(model="auto", weights=folder, precision="fp16").resolved_out() == Path("tiny-fp16")


# ------------------------------------------------------------------------------------------ built and run (torch)

needs_torch = pytest.mark.skipif(not torch_available(), reason="needs torch and diffusers")


def _sd3_outside_the_zoo():
    """tiny-sd3's classes at sizes the zoo does not have: one block, 2 heads of 16, RMS q/k norms (SD 3.5 large's)."""
    base = get_model("tiny-sd3")
    transformer = base.extra_configs["transformer"] | {"num_layers": 1, "num_attention_heads": 2,
                                                       "attention_head_dim": 16, "qk_norm": "rms_norm"}
    return replace(base, name="my-sd3", extra_configs={**base.extra_configs, "transformer": transformer})


@needs_torch
def test_an_sd3_outside_the_zoo_builds_and_matches_diffusers(tmp_path):
    from ldm_export.export.build import build
    from ldm_export.parity.pipelines import PSNR_TARGET, compare_case, diffusers_folder
    from ldm_export.runtime.bundle import Bundle
    from ldm_export.zoo import spec_of_bundle

    variant = _sd3_outside_the_zoo()
    folder, modules = diffusers_folder(variant, tmp_path)
    cfg = BuildConfig(model="auto", weights=folder, out=tmp_path / "bundle")
    manifest = build(cfg)
    assert manifest["model"]["name"] == "pipe" and manifest["model"]["resolution"] == 64
    assert manifest["model"]["modules"]["transformer"]["num_layers"] == 1
    # diffusers' SD3 pipeline on the same weights and noise; T5 at the count the bundle uses (the reference's 256)
    r = compare_case(tmp_path / "bundle", folder, modules, replace(variant, max_length=manifest["model"]["max_length"]),
                     4.0, None)
    assert r["psnr_db"] >= PSNR_TARGET and r["latent_max_abs"] < 1e-4 * r["latent_ref_max"]
    spec = spec_of_bundle(Bundle.open(tmp_path / "bundle"))  # bench and lora rebuild the modules from the manifest
    assert spec.family == "sd3" and spec.configs["transformer"]["num_layers"] == 1
    from ldm_export.export.models import build_module

    assert {k: v.shape for k, v in build_module(spec, "transformer").state_dict().items()} == \
           {k: v.shape for k, v in modules["transformer"].state_dict().items()}


@needs_torch
def test_cli_builds_a_unet_folder_outside_the_zoo_without_model_and_names_auto_on_mismatch(tmp_path):
    from ldm_export.parity.pipelines import diffusers_folder

    base = get_model("tiny")
    variant = replace(base, name="my-sd", unet=base.unet | {
        "block_out_channels": [16, 24], "layers_per_block": 2, "sample_size": 16})
    folder, _ = diffusers_folder(variant, tmp_path)
    (folder / "model_index.json").write_text(json.dumps(variant.model_index()))
    named = run_cli("build", "--model", "tiny", "--weights", str(folder), "--out", str(tmp_path / "named"))
    assert named.returncode != 0 and "or --model auto to build the folder's own architecture" in named.stderr
    assert "Traceback" not in named.stdout + named.stderr and not (tmp_path / "named").exists()
    r = run_cli("build", "--weights", str(folder), "--precision", "fp16", "--out", str(tmp_path / "b"))
    assert r.returncode == 0, r.stdout + r.stderr
    manifest = json.loads((tmp_path / "b" / "ldm_export.json").read_text())
    assert manifest["model"]["family"] == "sd1" and manifest["model"]["resolution"] == 128
    assert manifest["components"]["vae_decoder"]["precision"] == "fp16"
    # a folder named like a zoo model keeps its own architecture in the commands that rebuild it from the bundle
    import shutil

    from ldm_export.export.build import build
    from ldm_export.runtime.bundle import Bundle
    from ldm_export.zoo import MODELS, spec_of_bundle

    named = shutil.copytree(folder, tmp_path / "tiny")
    build(BuildConfig(model="auto", weights=named, out=tmp_path / "named-bundle"))
    spec = spec_of_bundle(Bundle.open(tmp_path / "named-bundle"))
    assert spec.name == "tiny" and spec is not MODELS["tiny"] and spec.unet["block_out_channels"] == [16, 24]
    assert spec_of_bundle(Bundle.open(tmp_path / "b")).unet["layers_per_block"] == 2
    g = run_cli("generate", str(tmp_path / "b"), "a red circle", "--steps", "2", "--out", str(tmp_path / "x.png"))
    assert g.returncode == 0, g.stdout + g.stderr
    from PIL import Image
    import numpy as np

    image = np.asarray(Image.open(tmp_path / "x.png"))
    assert image.shape == (128, 128, 3) and image.std() > 0


@needs_torch
def test_a_folder_whose_model_fails_in_torch_fails_on_one_line(tmp_path):
    """A config diffusers accepts but whose forward pass cannot run (2 heads of 8 against a 32-wide caption
    projection): the build names the component and the error, and leaves nothing."""
    from ldm_export.export.build import build
    from ldm_export.parity.pipelines import diffusers_folder

    base = get_model("tiny-sd3")
    broken = replace(base, extra_configs={**base.extra_configs, "transformer": base.extra_configs["transformer"] | {
        "num_attention_heads": 2}})
    folder, _ = diffusers_folder(broken, tmp_path)
    with pytest.raises(LdmExportError) as e:
        build(BuildConfig(model="auto", weights=folder, out=tmp_path / "b"))
    assert one_line(e).startswith("transformer: the PyTorch model fails on sample inputs of its own spec (RuntimeError")
    assert not (tmp_path / "b").exists()


# ------------------------------------------------------------------------------------------ single files

def _single_file_state(name: str, meta: bool):
    """``name``'s modules (random, or on the meta device for the full-size ones) in its single-file layout."""
    import torch

    from ldm_layout import sdxl_to_ldm_checkpoint, to_ldm_checkpoint
    from dit_layout import flux_transformer_to_bfl, to_sd3_single_file
    from ldm_export.export.models import build_random

    spec = get_model(name)
    if meta:
        with torch.device("meta"):
            modules = build_random(spec)
    else:
        modules = build_random(spec, seed=1)
    if spec.family in ("sd1", "sd2"):
        return to_ldm_checkpoint(modules, spec.unet, spec.vae, "clip" if spec.family == "sd1" else "open_clip")
    if spec.family.startswith("sdxl"):
        return sdxl_to_ldm_checkpoint(modules, spec.unet, spec.vae)
    if spec.family == "sd3":
        return to_sd3_single_file(modules, spec.extra_configs["transformer"], spec.vae)
    return flux_transformer_to_bfl(modules["transformer"].state_dict())


def _write_header(path: Path, state) -> Path:
    """A safetensors header of ``state``'s keys and shapes, no data: what the detection reads of a file."""
    import struct

    header = json.dumps({k: {"dtype": "F32", "shape": list(v.shape), "data_offsets": [0, 0]} for k, v in state.items()})
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode())
    return path


@needs_torch
@pytest.mark.parametrize("name", ["sd15", "sd15-inpaint", "sd21", "sdxl", "sdxl-inpaint", "sdxl-refiner", "sd3-medium",
                                  "sd35-medium", "flux-dev", "flux-schnell", "tiny", "tiny-inpaint", "tiny-sdxl",
                                  "tiny-sdxl-refiner", "tiny-sd3", "tiny-flux"])
def test_a_single_file_names_its_zoo_model_by_keys_and_shapes(tmp_path, name):
    """The full-size layouts are built on the meta device and written as headers alone (the detection reads nothing
    else); SD 2.x files say no prediction type, so they build as sd21 with a warning."""
    from ldm_export.export.folder_spec import model_of_checkpoint

    path = _write_header(tmp_path / f"{name}.safetensors", _single_file_state(name, meta=True))
    assert model_of_checkpoint(path) == name


@needs_torch
def test_build_without_model_takes_a_single_files_model_and_names_the_bundle_after_it(tmp_path):
    from safetensors.torch import save_file

    from ldm_export.export.t5_tokenizer import write_standin_t5_tokenizer

    path = tmp_path / "my-sd3-finetune.safetensors"
    save_file(_single_file_state("tiny-sd3", meta=False), str(path))
    # real T5 weights without their tokenizer would condition on made-up ids: refused before any export
    r = run_cli("build", "--weights", str(path), cwd=tmp_path)
    assert r.returncode == 2 and "bring no T5 tokenizer (tokenizer_3/)" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "my-sd3-finetune-fp32").exists()
    write_standin_t5_tokenizer(tmp_path / "tokenizer_3", vocab_size=200)  # as the model's release has it beside
    r = run_cli("build", "--weights", str(path), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "my-sd3-finetune-fp32"
    manifest = json.loads((out / "ldm_export.json").read_text())
    assert manifest["model"]["name"] == "tiny-sd3" and manifest["weights"]["source"] == "single-file"
    assert (out / "tokenizer_3" / "tokenizer.json").read_bytes() == (tmp_path / "tokenizer_3" / "tokenizer.json").read_bytes()


@needs_torch
@pytest.mark.parametrize("case,match", [
    ("lora", "holds a LoRA, not a model: pass it as --lora FILE"),
    ("other", "is no checkpoint layout ldm-export reads"),
    ("sizes", r"is a Stable Diffusion 1.x checkpoint \(in_channels 4, block_out_channels\[0\] 24, text width 32\) that "
              "no zoo model matches"),
    ("ckpt", "tells a single file's model by its safetensors keys; for x.ckpt pass the --model"),
    ("truncated", "is not a readable safetensors file"),
])
def test_single_files_no_zoo_model_fits_fail_on_one_line(tmp_path, case, match):
    import torch

    from ldm_export.export.models import build_random
    from ldm_layout import to_ldm_checkpoint

    path = tmp_path / ("x.ckpt" if case == "ckpt" else "x.safetensors")
    if case == "lora":
        _write_header(path, {"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
                             "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4)})
    elif case == "other":
        _write_header(path, {"encoder.layer.0.weight": torch.zeros(2, 2)})
    elif case == "sizes":  # the tiny classes at a width no zoo model has
        base = get_model("tiny")
        spec = replace(base, unet=base.unet | {"block_out_channels": [24, 32]})
        with torch.device("meta"):
            modules = build_random(spec)
        _write_header(path, to_ldm_checkpoint(modules, spec.unet, spec.vae))
    elif case == "truncated":
        path.write_bytes(b"\x10")
    else:
        path.write_bytes(b"not read")
    with pytest.raises(LdmExportError, match=match) as e:
        validate(BuildConfig(model="auto", weights=path, out=tmp_path / "out"))
    one_line(e)
    if case == "sizes":  # the same file inside a diffusers folder: the folder says its architecture
        (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
        with pytest.raises(LdmExportError, match=r"pass the diffusers folder it sits in \(--weights "):
            validate(BuildConfig(model="auto", weights=path, out=tmp_path / "out"))


@needs_torch
def test_a_t5_tokenizer_folder_without_its_fast_file_is_refused_before_any_export(tmp_path):
    """A tokenizer_3/ with T5's SentencePiece model only was named after every component had been exported (17
    minutes for sd3-medium); it is refused first, with the command that writes the file."""
    from safetensors.torch import save_file

    path = tmp_path / "sd3.safetensors"
    save_file(_single_file_state("tiny-sd3", meta=False), str(path))
    (tmp_path / "tokenizer_3").mkdir()
    (tmp_path / "tokenizer_3" / "spiece.model").write_bytes(b"\0")
    r = run_cli("build", "--weights", str(path), "--out", str(tmp_path / "b"), cwd=tmp_path)
    assert r.returncode == 2 and "has no tokenizer.json" in r.stderr and "save_pretrained" in r.stderr, r.stderr
    assert "export" not in r.stdout.lower() and not (tmp_path / "b").exists()
