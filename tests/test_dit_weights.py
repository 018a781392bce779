"""DiT weights: diffusers folders and Stability's single-file SD3 layout round-trip exactly; a U-Net checkpoint
given for a DiT model (and the reverse) fails with the first key that does not fit; missing parts are named."""
from __future__ import annotations

import json
import shutil

import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import save_file  # noqa: E402

from ldm_export.export.models import build_random  # noqa: E402
from ldm_export.export.dit_weights import load_dit_weights  # noqa: E402
from ldm_export.export.t5_tokenizer import write_standin_t5_tokenizer  # noqa: E402
from ldm_export.runtime.errors import LdmExportError  # noqa: E402
from ldm_export.runtime.tokenizer import write_tokenizer_files  # noqa: E402
from ldm_export.zoo import TINY  # noqa: E402
from ldm_export.zoo import get_model  # noqa: E402

from dit_layout import flux_transformer_to_bfl, to_sd3_single_file  # noqa: E402
from ldm_layout import to_ldm_checkpoint  # noqa: E402

SPEC = get_model("tiny-sd3")


def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message and message
    return message


def assert_same(expected: dict, got: dict) -> None:
    for name, module in expected.items():
        want, have = module.state_dict(), got[name].state_dict()
        assert want.keys() == have.keys(), name
        bad = [k for k in want if not torch.equal(want[k].float(), have[k])]
        assert not bad, (name, bad[:3])


@pytest.fixture(scope="module")
def modules():
    return build_random(SPEC, seed=5)


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory, modules):
    folder = tmp_path_factory.mktemp("pipe") / "tiny-sd3"
    for name, module in modules.items():
        module.save_pretrained(str(folder / name))
    write_tokenizer_files(folder / "tokenizer")
    write_tokenizer_files(folder / "tokenizer_2", pad_token="!")
    write_standin_t5_tokenizer(folder / "tokenizer_3", vocab_size=400)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    return folder


@pytest.fixture(scope="module")
def sd3_file(tmp_path_factory, modules):
    path = tmp_path_factory.mktemp("single") / "tiny-sd3.safetensors"
    save_file(to_sd3_single_file(modules, SPEC.configs["transformer"], SPEC.vae), str(path))
    return path


def test_diffusers_folder_round_trip(sd3_folder, modules):
    loaded = load_dit_weights(SPEC, sd3_folder)
    assert loaded.source == "diffusers"
    assert_same(modules, loaded.modules)
    assert set(loaded.tokenizer_dirs) == {"tokenizer", "tokenizer_2", "tokenizer_3"}
    assert loaded.tokenizer_dirs["tokenizer_3"].name == "tokenizer_3"
    assert "transformer/config.json" in loaded.files


def test_single_file_round_trip_through_diffusers_converters(sd3_file, modules):
    loaded = load_dit_weights(SPEC, sd3_file)
    assert loaded.source == "single-file" and len(loaded.sha256) == 64
    assert_same(modules, loaded.modules)


def test_missing_text_encoder_in_folder_is_named(sd3_folder, tmp_path):
    folder = shutil.copytree(sd3_folder, tmp_path / "pipe")
    shutil.rmtree(folder / "text_encoder_3")
    with pytest.raises(LdmExportError) as e:
        load_dit_weights(SPEC, folder)
    assert "has no text_encoder_3/ (T5 encoder)" in one_line(e)


def test_unet_folder_for_dit_model_is_refused(tmp_path):
    from ldm_export.export.models import build_random as build_unet_random

    folder = tmp_path / "sd1"
    for name, module in build_unet_random(TINY, 0).items():
        module.save_pretrained(str(folder / name))
    (folder / "model_index.json").write_text(json.dumps(TINY.model_index()))
    with pytest.raises(LdmExportError) as e:
        load_dit_weights(SPEC, folder)
    assert "holds a U-Net pipeline (unet/), not a DiT" in one_line(e)


def test_unet_single_file_for_dit_model_names_the_key(tmp_path):
    from ldm_export.export.models import build_random as build_unet_random

    path = tmp_path / "sd1.safetensors"
    save_file(to_ldm_checkpoint(build_unet_random(TINY, 0), TINY.unet, TINY.vae), str(path))
    with pytest.raises(LdmExportError) as e:
        load_dit_weights(SPEC, path)
    msg = one_line(e)
    assert "holds a U-Net" in msg and "'model.diffusion_model.input_blocks." in msg


def test_dit_single_file_for_unet_model_names_the_key(sd3_file):
    from ldm_export.export.weights import load_weights

    # SDXL models said "has no OpenCLIP bigG text encoder weights" instead
    for model in (TINY, get_model("tiny-sdxl"), get_model("tiny-sdxl-refiner")):
        with pytest.raises(LdmExportError) as e:
            load_weights(model, sd3_file)
        msg = one_line(e)
        assert "SD3-class MMDiT" in msg and "'model.diffusion_model.joint_blocks." in msg and "not a U-Net" in msg
        assert msg.endswith("build it with --model tiny-sd3 (or --model auto)")  # the model its shapes say


def test_an_sd3_transformer_file_in_diffusers_key_layout_is_told_apart(tmp_path):
    """A lone SD3Transformer2DModel state dict (diffusers' keys) is SD3 in another layout, not 'not an SD3 checkpoint'."""
    from safetensors.torch import save_file

    from ldm_export.export.dit_weights import load_dit_weights
    from ldm_export.export.models import build_random

    state = {k: v.contiguous() for k, v in build_random(SPEC)["transformer"].state_dict().items()}
    path = tmp_path / "sd3_transformer_diffusers_keys.safetensors"
    save_file(state, str(path))
    with pytest.raises(LdmExportError) as e:
        load_dit_weights(SPEC, path)
    msg = one_line(e)
    assert "holds an SD3 transformer in diffusers' key layout ('transformer_blocks." in msg
    assert msg.endswith("and pass the folder")


def test_dit_folder_for_unet_model_is_refused(sd3_folder):
    from ldm_export.export.weights import load_weights

    # said "has no unet/ subfolder" (SD 1.x) or named a text encoder's config value (SDXL): now what the folder is
    for model in (TINY, get_model("tiny-sdxl")):
        with pytest.raises(LdmExportError) as e:
            load_weights(model, sd3_folder)
        assert f"holds a DiT pipeline (transformer/), not a U-Net: model '{model.name}' needs unet/" in one_line(e)


def test_wrong_architecture_names_the_first_mismatching_key(sd3_file, tmp_path):
    import dataclasses

    other = dataclasses.replace(SPEC, extra_configs={**SPEC.extra_configs, "transformer":
                                                      SPEC.extra_configs["transformer"] | {"num_layers": 3}})
    with pytest.raises(LdmExportError) as e:
        load_dit_weights(other, sd3_file)
    # a 2-layer checkpoint's last block is context-pre-only (6 -> 2 modulations); in 3 layers block 1 is not
    assert ("transformer: 'transformer_blocks.1.norm1_context.linear.weight' has shape (64, 32) in the checkpoint "
            "but model 'tiny-sd3' expects (192, 32)") in one_line(e)


def test_transformer_only_single_file_says_what_is_missing(modules, tmp_path):
    path = tmp_path / "bare.safetensors"
    save_file(to_sd3_single_file(modules, SPEC.configs["transformer"], SPEC.vae, text_encoders=()), str(path))
    with pytest.raises(LdmExportError) as e:
        load_dit_weights(SPEC, path)
    assert ("holds no text_encoder, text_encoder_2, text_encoder_3 weights (the transformer-only release); put it in "
            "the model's diffusers folder") in one_line(e)
    # Stability's sd3_medium_incl_clips.safetensors (both CLIPs and the VAE, no T5) was called transformer-only too
    clips = tmp_path / "incl_clips.safetensors"
    save_file(to_sd3_single_file(modules, SPEC.configs["transformer"], SPEC.vae,
                                 text_encoders=("text_encoder", "text_encoder_2")), str(clips))
    with pytest.raises(LdmExportError) as e:
        load_dit_weights(SPEC, clips)
    assert ("holds no text_encoder_3 weights (it holds text_encoder, text_encoder_2, transformer, vae: a release "
            "without T5, which ldm-export does not build); put it in the model's diffusers folder") in one_line(e)


def test_transformer_only_single_file_in_its_folder_takes_the_rest_from_the_folder(modules, sd3_folder, tmp_path):
    """A release's transformer-only file (SD3's sd3_medium.safetensors, SD 3.5's files) inside its diffusers folder:
    the transformer (and VAE) from the file, the text encoders and T5's tokenizer from the folder around it."""
    import shutil

    import torch

    folder = tmp_path / "pipe"
    shutil.copytree(sd3_folder, folder)
    import copy

    tuned = {**modules, "transformer": copy.deepcopy(modules["transformer"])}
    with torch.no_grad():
        next(tuned["transformer"].parameters()).add_(1.0)  # the file's transformer differs from the folder's
    path = folder / "finetune.safetensors"
    save_file(to_sd3_single_file(tuned, SPEC.configs["transformer"], SPEC.vae, text_encoders=()), str(path))
    loaded = load_dit_weights(SPEC, path)
    assert loaded.source == "single-file" and loaded.tokenizer_dirs["tokenizer_3"] == folder / "tokenizer_3"
    for name in ("transformer", "text_encoder_3"):
        got, want = loaded.modules[name].state_dict(), tuned[name].state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want), name


def test_flux_single_file_without_its_folder_says_what_to_do(tmp_path):
    path = tmp_path / "flux.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(3, 3)}, str(path))
    with pytest.raises(LdmExportError) as e:
        load_dit_weights(get_model("tiny-flux"), path)
    msg = one_line(e)
    assert "holds the FLUX.1 transformer alone" in msg and "beside model_index.json" in msg


# ------------------------------------------------------------------------------------------- FLUX single file

FLUX = get_model("tiny-flux")


@pytest.fixture(scope="module")
def flux_modules():
    return build_random(FLUX, seed=7)


@pytest.fixture(scope="module")
def flux_release(tmp_path_factory, flux_modules):
    """Black Forest Labs' release layout: flux1-dev.safetensors (the transformer, BFL keys) beside a diffusers folder
    that has every other module; its transformer/ holds a config only, so the weights can come from the file alone."""
    folder = tmp_path_factory.mktemp("flux") / "FLUX.1-dev"
    for name, module in flux_modules.items():
        if name == "transformer":
            module.save_config(str(folder / name))
        else:
            module.save_pretrained(str(folder / name))
    write_tokenizer_files(folder / "tokenizer")
    write_standin_t5_tokenizer(folder / "tokenizer_2", vocab_size=400)
    (folder / "model_index.json").write_text(json.dumps(FLUX.model_index()))
    save_file(flux_transformer_to_bfl(flux_modules["transformer"].state_dict()), str(folder / "flux1-dev.safetensors"))
    return folder


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_flux_single_file_round_trip_through_diffusers_converter(flux_release, flux_modules, prefix, tmp_path):
    path = flux_release / "flux1-dev.safetensors"
    if prefix:  # ComfyUI saves the same keys under model.diffusion_model.
        path = flux_release / "flux1-dev-comfy.safetensors"
        save_file(flux_transformer_to_bfl(flux_modules["transformer"].state_dict(), prefix), str(path))
    loaded = load_dit_weights(FLUX, path)
    assert loaded.source == "single-file" and len(loaded.sha256) == 64
    assert path.name in loaded.files and "text_encoder_2/config.json" in loaded.files
    assert not any(k.startswith("transformer/") for k in loaded.files)  # the transformer came from the file
    assert set(loaded.tokenizer_dirs) == {"tokenizer", "tokenizer_2"}
    assert_same(flux_modules, loaded.modules)


def test_flux_single_file_builds_a_bundle_equal_to_the_original(flux_release, flux_modules, tmp_path):
    """The bundle built from the BFL file: its transformer graph gives the original diffusers model's output."""
    import numpy as np
    import onnxruntime as ort

    from ldm_export.export import models as M
    from ldm_export.export import onnx_export as X
    from ldm_export.export.build import BuildConfig, build
    from ldm_export.export.dit_export import sample_inputs

    out = tmp_path / "bundle"
    manifest = build(BuildConfig(model="tiny-flux", weights=flux_release / "flux1-dev.safetensors", out=out))
    assert manifest["weights"]["source"] == "single-file" and manifest["weights"]["path"] == "flux1-dev.safetensors"
    assert manifest["components"]["transformer"]["verification"]["fp32"]["passed"]
    cspec = FLUX.component_specs()["transformer"]
    dims = dict(FLUX.static_dims("transformer"))
    feeds = sample_inputs("flux_transformer", cspec, dims, 11, FLUX.configs["transformer"],
                          FLUX.family_def.latent_format(FLUX.configs))
    original = X.torch_outputs(M.wrap("transformer", flux_modules, FLUX.family_def), cspec, feeds)[0]
    got = ort.InferenceSession(str(out / "transformer" / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    cos = float(np.dot(got.ravel(), original.ravel()) / np.linalg.norm(got) / np.linalg.norm(original))
    assert cos >= 0.99999 and np.abs(got - original).max() < 1e-4, cos


def test_flux_single_file_of_another_architecture_names_the_first_mismatching_key(flux_release, tmp_path):
    import dataclasses

    other = dataclasses.replace(FLUX, extra_configs={**FLUX.extra_configs, "transformer":
                                                      FLUX.extra_configs["transformer"] | {"num_single_layers": 3}})
    with pytest.raises(LdmExportError) as e:
        load_dit_weights(other, flux_release / "flux1-dev.safetensors")
    assert ("transformer: the checkpoint lacks 'single_transformer_blocks.2.norm.linear.weight' (expected shape "
            "(96, 32))") in one_line(e)
    schnell = dataclasses.replace(FLUX, extra_configs={**FLUX.extra_configs, "transformer":
                                                        FLUX.extra_configs["transformer"] | {"guidance_embeds": False}})
    with pytest.raises(LdmExportError) as e:
        load_dit_weights(schnell, flux_release / "flux1-dev.safetensors")
    assert "has unexpected 'time_text_embed.guidance_embedder.linear_1.weight'" in one_line(e)


def test_flux_single_file_missing_a_key_names_it(flux_release, flux_modules):
    state = flux_transformer_to_bfl(flux_modules["transformer"].state_dict())
    del state["double_blocks.0.img_attn.qkv.bias"]
    path = flux_release / "flux1-broken.safetensors"
    save_file(state, str(path))
    with pytest.raises(LdmExportError) as e:
        load_dit_weights(FLUX, path)
    assert "cannot convert the transformer weights (KeyError: 'double_blocks.0.img_attn.qkv.bias')" in one_line(e)


def test_flux_single_file_of_another_width_names_its_key(flux_release, tmp_path):
    import dataclasses

    wide = dataclasses.replace(FLUX, extra_configs={**FLUX.extra_configs, "transformer":
                                                     FLUX.extra_configs["transformer"] | {"num_attention_heads": 3}})
    path = flux_release / "flux1-dev.safetensors"
    with pytest.raises(LdmExportError) as e:
        load_dit_weights(wide, path)
    assert "'single_blocks.0.linear1." in one_line(e) and "model 'tiny-flux' expects" in one_line(e)


def test_sd3_single_file_for_flux_model_names_its_key(modules, tmp_path):
    path = tmp_path / "sd3.safetensors"
    save_file(to_sd3_single_file(modules, SPEC.configs["transformer"], SPEC.vae), str(path))
    with pytest.raises(LdmExportError) as e:
        load_dit_weights(FLUX, path)
    msg = one_line(e)
    assert "not a FLUX.1 transformer checkpoint" in msg and "'model.diffusion_model.joint_blocks." in msg


@pytest.mark.parametrize("damage,match", [
    ("vocab", r"tokenizer_3/tokenizer.json has 1522 tokens but text_encoder_3's vocabulary holds 1000"),
    ("tokenizer", r"cannot load .*tokenizer_3/tokenizer.json"),
    ("nan", r"the transformer weights hold NaN or infinite values \(first: '.*'\); the checkpoint is damaged"),
    ("flux-index", r"holds a FluxPipeline \(its model_index.json\), not the StableDiffusion3Pipeline of model "
                   r"'tiny-sd3'; pass the --model it belongs to \(flux-dev or flux-schnell\) or --model auto"),
])
def test_folder_damage_is_named_before_any_export(sd3_folder, modules, tmp_path, damage, match):
    """Each built a bundle that failed at its first generate (a traceback from ONNX Runtime's Gather, or an
    unreadable tokenizer), failed verification as if the export were wrong (NaN weights), or advised adding a text
    encoder to a FLUX folder."""
    from ldm_export.export.build import BuildConfig, build

    folder = tmp_path / "w"
    shutil.copytree(sd3_folder, folder)
    if damage == "vocab":  # an mT5-sized tokenizer beside the T5 encoder: ids past its embedding table
        from tokenizers import Tokenizer

        path = folder / "tokenizer_3" / "tokenizer.json"
        tok = Tokenizer.from_file(str(path))
        tok.add_tokens([f"piece{k}" for k in range(1522 - tok.get_vocab_size())])
        tok.save(str(path))
    elif damage == "tokenizer":
        (folder / "tokenizer_3" / "tokenizer.json").write_text('{"bad": 1')
    elif damage == "nan":
        broken = type(modules["transformer"]).from_pretrained(str(folder / "transformer"))
        with torch.no_grad():
            next(iter(broken.parameters()))[0] = float("nan")
        broken.save_pretrained(str(folder / "transformer"))
    else:
        (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(LdmExportError, match=match) as e:
        build(BuildConfig(model="tiny-sd3", weights=folder, out=tmp_path / "b"))
    one_line(e)
    assert not (tmp_path / "b").exists()


def test_a_saved_sd3_scheduler_warns_only_about_what_takes_effect(tmp_path, caplog):
    """save_pretrained writes FlowMatchEulerDiscreteScheduler's dynamic-shift keys (base_shift, max_shift, ...) into
    every config, SD3's too; they act only with use_dynamic_shifting, so a folder that differs only in them gets no
    warning, and one whose dynamic shifting is on names it."""
    import logging

    from diffusers import FlowMatchEulerDiscreteScheduler

    from ldm_export.export.folder_spec import with_folder_scheduler

    def folder_with(**config):
        folder = tmp_path / f"f{len(list(tmp_path.iterdir()))}"
        FlowMatchEulerDiscreteScheduler(**{k: v for k, v in SPEC.scheduler.items() if not k.startswith("_")},
                                        **config).save_pretrained(str(folder / "scheduler"))
        return folder

    with caplog.at_level(logging.WARNING):
        spec = with_folder_scheduler(SPEC, folder_with())
    assert spec.scheduler["base_shift"] == 0.5 and "its scheduler says" not in caplog.text
    with caplog.at_level(logging.WARNING):
        with_folder_scheduler(SPEC, folder_with(use_dynamic_shifting=True))
    assert "its scheduler says use_dynamic_shifting True where tiny-sd3's says False" in caplog.text


def test_a_folder_of_another_pipeline_is_refused_without_a_scheduler_warning(sd3_folder, tmp_path, caplog):
    import logging

    from ldm_export.export.build import BuildConfig, build

    import shutil

    from diffusers import FlowMatchEulerDiscreteScheduler

    folder = shutil.copytree(sd3_folder, tmp_path / "sd3")
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(str(folder / "scheduler"))  # differs from tiny's DDIM
    with caplog.at_level(logging.WARNING), pytest.raises(LdmExportError, match="holds a DiT pipeline"):
        build(BuildConfig(model="tiny", weights=folder, out=tmp_path / "b"))
    assert "its scheduler says" not in caplog.text and not (tmp_path / "b").exists()
