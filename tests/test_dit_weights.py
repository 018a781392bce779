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

from dit_layout import to_sd3_single_file  # noqa: E402
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

    with pytest.raises(LdmExportError) as e:
        load_weights(TINY, sd3_file)
    msg = one_line(e)
    assert "SD3-class MMDiT" in msg and "'model.diffusion_model.joint_blocks." in msg and "not a U-Net" in msg


def test_dit_folder_for_unet_model_is_refused(sd3_folder):
    from ldm_export.export.weights import load_weights

    with pytest.raises(LdmExportError) as e:
        load_weights(TINY, sd3_folder)
    assert "no text_encoder/" in one_line(e) or "no unet/" in one_line(e)


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
    assert "has no clip_l weights" in one_line(e)


def test_flux_single_file_is_refused_with_what_to_do(tmp_path):
    path = tmp_path / "flux.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(3, 3)}, str(path))
    with pytest.raises(LdmExportError) as e:
        load_dit_weights(get_model("tiny-flux"), path)
    assert "pass a diffusers folder" in one_line(e)
