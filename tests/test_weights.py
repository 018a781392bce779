"""Loading weights for export: random, diffusers folders, single-file LDM checkpoints, pickle, errors."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from ldm_export.export.models import build_random  # noqa: E402
from ldm_export.export.weights import LoadedWeights, load_modules, load_weights  # noqa: E402
from ldm_export.runtime.errors import LdmExportError  # noqa: E402
from ldm_export.zoo import TINY  # noqa: E402

from ldm_layout import CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX, to_ldm_checkpoint  # noqa: E402

# SD 2.x classes at tiny size: OpenCLIP text tower (gelu), linear proj_in/proj_out in the UNet
TINY_SD2 = dataclasses.replace(
    TINY, name="tiny-sd2", family="sd2", text_encoder=TINY.text_encoder | {"hidden_act": "gelu"},
    unet=TINY.unet | {"use_linear_projection": True})


def assert_same_weights(expected: dict, got: dict) -> None:
    for name in ("text_encoder", "unet", "vae"):
        want, have = expected[name].state_dict(), got[name].state_dict()
        assert want.keys() == have.keys(), name
        for key in want:
            assert have[key].dtype == torch.float32, (name, key)
            assert torch.equal(want[key].float(), have[key]), (name, key)


def raises_one_line(match: str):
    return pytest.raises(LdmExportError, match=match)


def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message and message
    return message


@pytest.fixture(scope="module")
def tiny_modules():
    return build_random(TINY, seed=7)


@pytest.fixture(scope="module")
def ldm_state(tiny_modules):
    return to_ldm_checkpoint(tiny_modules, TINY.unet, TINY.vae)


@pytest.fixture(scope="module")
def ldm_file(tmp_path_factory, ldm_state):
    path = tmp_path_factory.mktemp("single") / "tiny.safetensors"
    save_file(ldm_state, str(path))
    return path


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory, tiny_modules):
    folder = tmp_path_factory.mktemp("pipe") / "tiny"
    for name, module in tiny_modules.items():
        module.save_pretrained(str(folder / name))
    (folder / "model_index.json").write_text(json.dumps(TINY.model_index()))
    return folder


def copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---- random weights ----------------------------------------------------------------------------------------


def test_random_weights_real_classes_eval_fp32():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    loaded = load_weights(TINY, None, random_weights=True, seed=1)
    assert isinstance(loaded, LoadedWeights) and loaded.source == "random" and loaded.seed == 1
    assert loaded.sha256 is None
    modules = loaded.modules
    assert isinstance(modules["text_encoder"], CLIPTextModel)
    assert isinstance(modules["unet"], UNet2DConditionModel)
    assert isinstance(modules["vae"], AutoencoderKL)
    assert modules["unet"].config.cross_attention_dim == TINY.unet["cross_attention_dim"]
    for module in modules.values():
        assert not module.training
        assert all(p.dtype == torch.float32 for p in module.parameters())


def test_random_weights_deterministic_in_seed():
    a = load_modules(TINY, None, random_weights=True, seed=3)
    b = load_modules(TINY, None, random_weights=True, seed=3)
    c = load_modules(TINY, None, random_weights=True, seed=4)
    assert_same_weights(a, b)
    for name in a:
        weights_a = dict(a[name].named_parameters())
        weights_c = dict(c[name].named_parameters())
        differ = [k for k in weights_a if not torch.equal(weights_a[k], weights_c[k])]
        assert differ, f"{name}: seeds 3 and 4 gave identical weights"


def test_neither_weights_nor_random_names_both_options():
    with raises_one_line("--weights PATH") as e:
        load_modules(TINY, None)
    assert "--random-weights" in one_line(e)


def test_both_weights_and_random_refused(ldm_file):
    with raises_one_line("only one"):
        load_modules(TINY, ldm_file, random_weights=True)


# ---- diffusers folder --------------------------------------------------------------------------------------


def test_diffusers_folder_round_trip(diffusers_folder, tiny_modules):
    loaded = load_weights(TINY, diffusers_folder)
    assert loaded.source == "diffusers" and loaded.sha256 is None
    assert_same_weights(tiny_modules, loaded.modules)
    assert all(not m.training for m in loaded.modules.values())
    weights_file = diffusers_folder / "unet" / "diffusion_pytorch_model.safetensors"
    assert loaded.files["unet/diffusion_pytorch_model.safetensors"] == hashlib.sha256(
        weights_file.read_bytes()).hexdigest()
    assert {"model_index.json", "text_encoder/model.safetensors", "vae/diffusion_pytorch_model.safetensors"} <= set(
        loaded.files)


@pytest.mark.parametrize("component", ["text_encoder", "unet", "vae"])
def test_diffusers_folder_missing_component(diffusers_folder, tmp_path, component):
    folder = copy_folder(diffusers_folder, tmp_path / "pipe")
    shutil.rmtree(folder / component)
    with raises_one_line(f"no {component}/ subfolder") as e:
        load_modules(TINY, folder)
    one_line(e)


def test_a_release_folder_whose_weights_are_one_file_beside_points_at_that_file(diffusers_folder, tmp_path):
    """FLUX's and SD3's releases ship transformer/config.json without weights and the weights as one file beside
    model_index.json: the folder is not the thing to pass, the file is."""
    folder = copy_folder(diffusers_folder, tmp_path / "release")
    for f in (folder / "unet").glob("*.safetensors"):
        f.unlink()
    with raises_one_line(r"unet has no weights \(no .safetensors file\); re-save it with save_pretrained$"):
        load_modules(TINY, folder)
    save_file({"x": torch.zeros(1000)}, str(folder / "tiny-release.safetensors"))
    save_file({"x": torch.zeros(1)}, str(folder / "ae.safetensors"))  # FLUX's VAE beside it: not the one to name
    with raises_one_line(r"and release/ holds tiny-release.safetensors: pass that file as --weights") as e:
        load_modules(TINY, folder)
    one_line(e)


@pytest.mark.parametrize("component,key,value", [
    ("unet", "cross_attention_dim", 48),
    ("unet", "block_out_channels", [16, 48]),
    ("vae", "latent_channels", 8),
    ("text_encoder", "hidden_size", 64),
])
def test_diffusers_folder_config_of_other_architecture(diffusers_folder, tmp_path, component, key, value):
    folder = copy_folder(diffusers_folder, tmp_path / "pipe")
    config_path = folder / component / "config.json"
    config = json.loads(config_path.read_text())
    config[key] = value
    config_path.write_text(json.dumps(config))
    with raises_one_line(f"{component}/config.json has {key}=") as e:
        load_modules(TINY, folder)
    assert "--model" in one_line(e)


def test_diffusers_folder_weights_missing_a_key(diffusers_folder, tmp_path):
    folder = copy_folder(diffusers_folder, tmp_path / "pipe")
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    del state["decoder.conv_out.weight"]
    save_file(state, str(weights))
    with raises_one_line("decoder.conv_out.weight"):
        load_modules(TINY, folder)


def test_diffusers_folder_of_another_spec_caught_by_structure(diffusers_folder, tmp_path):
    # the folder's configs list only what the spec lists; a UNet with a class embedding differs in weights
    folder = copy_folder(diffusers_folder, tmp_path / "pipe")
    from diffusers import UNet2DConditionModel

    shutil.rmtree(folder / "unet")
    UNet2DConditionModel(**TINY.unet, class_embed_type="timestep").save_pretrained(str(folder / "unet"))
    with raises_one_line("unexpected 'class_embedding"):
        load_modules(TINY, folder)


def test_diffusers_folder_pickle_weights_need_trust(diffusers_folder, tmp_path, tiny_modules):
    folder = copy_folder(diffusers_folder, tmp_path / "pipe")
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(tiny_modules["vae"].state_dict(), folder / "vae" / "diffusion_pytorch_model.bin")
    with raises_one_line("--trust-pickle"):
        load_modules(TINY, folder)
    modules = load_modules(TINY, folder, trust_pickle=True)
    assert_same_weights(tiny_modules, modules)


def test_directory_without_model_index(tmp_path):
    (tmp_path / "unet").mkdir()
    with raises_one_line("without model_index.json") as e:
        load_modules(TINY, tmp_path)
    one_line(e)


# ---- single-file LDM checkpoints ---------------------------------------------------------------------------


def test_single_file_ldm_round_trip_sd1(ldm_file, tiny_modules):
    loaded = load_weights(TINY, ldm_file)
    assert loaded.source == "single-file"
    assert loaded.sha256 == hashlib.sha256(ldm_file.read_bytes()).hexdigest()
    assert loaded.files == {ldm_file.name: loaded.sha256}
    assert_same_weights(tiny_modules, loaded.modules)
    for module in loaded.modules.values():
        assert not module.training
        assert not any(t.is_meta for t in [*module.parameters(), *module.buffers()])
    ids = torch.tensor([[TINY.text_encoder["bos_token_id"], 5, 6, TINY.text_encoder["eos_token_id"]]])
    with torch.no_grad():
        want = tiny_modules["text_encoder"](ids).last_hidden_state
        got = loaded.modules["text_encoder"](ids).last_hidden_state
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_single_file_ldm_keys_are_the_original_layout(ldm_state):
    # guard on the helper itself: names as in CompVis' v1-5 checkpoint
    for key in ("model.diffusion_model.input_blocks.0.0.weight",
                "model.diffusion_model.input_blocks.1.0.in_layers.0.weight",
                "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
                "model.diffusion_model.input_blocks.2.0.op.weight",
                "model.diffusion_model.middle_block.1.proj_in.weight",
                "model.diffusion_model.output_blocks.1.1.conv.weight",
                "model.diffusion_model.output_blocks.3.1.norm.weight",
                "model.diffusion_model.out.2.bias",
                "first_stage_model.encoder.down.0.block.0.conv1.weight",
                "first_stage_model.encoder.down.0.downsample.conv.weight",
                "first_stage_model.decoder.up.3.upsample.conv.weight",
                "first_stage_model.decoder.up.0.block.1.conv2.weight",
                "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight",
                "first_stage_model.decoder.mid.attn_1.q.weight",
                "first_stage_model.encoder.norm_out.weight",
                "first_stage_model.quant_conv.weight",
                "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"):
        assert key in ldm_state, key
    assert ldm_state["first_stage_model.decoder.mid.attn_1.q.weight"].ndim == 4


def test_single_file_ldm_round_trip_sd2_open_clip(tmp_path):
    modules = build_random(TINY_SD2, seed=11)
    state = to_ldm_checkpoint(modules, TINY_SD2.unet, TINY_SD2.vae, text_layout="open_clip")
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in state
    assert "cond_stage_model.model.transformer.resblocks.2.attn.in_proj_weight" in state  # the unused last layer
    path = tmp_path / "tiny_sd2.safetensors"
    save_file(state, str(path))
    loaded = load_modules(TINY_SD2, path)
    assert_same_weights(modules, loaded)


def test_single_file_fp16_loads_as_fp32(tmp_path, ldm_state, tiny_modules):
    path = tmp_path / "half.safetensors"
    save_file({k: v.half() for k, v in ldm_state.items()}, str(path))
    loaded = load_modules(TINY, path)
    half = {name: m.state_dict() for name, m in tiny_modules.items()}
    for name, module in loaded.items():
        for key, value in module.state_dict().items():
            assert value.dtype == torch.float32
            assert torch.equal(value, half[name][key].half().float()), (name, key)


def save_tampered(tmp_path: Path, state: dict, name: str = "tampered.safetensors") -> Path:
    path = tmp_path / name
    save_file(state, str(path))
    return path


def test_single_file_missing_key_named(tmp_path, ldm_state):
    state = dict(ldm_state)
    del state[UNET_PREFIX + "input_blocks.1.0.in_layers.2.weight"]
    with raises_one_line("lacks 'down_blocks.0.resnets.0.conv1.weight'") as e:
        load_modules(TINY, save_tampered(tmp_path, state))
    assert one_line(e).startswith("unet:")


def test_single_file_unexpected_key_named(tmp_path, ldm_state):
    state = dict(ldm_state)
    state[UNET_PREFIX + "input_blocks.1.0.extra.weight"] = torch.zeros(3)
    with raises_one_line("unexpected 'down_blocks.0.resnets.0.extra.weight'"):
        load_modules(TINY, save_tampered(tmp_path, state))


def test_single_file_wrong_shape_names_expected_and_got(tmp_path, ldm_state):
    state = dict(ldm_state)
    key = VAE_PREFIX + "decoder.conv_in.weight"
    want = tuple(state[key].shape)
    state[key] = torch.zeros(want[0], want[1] + 1, *want[2:])
    with raises_one_line("'decoder.conv_in.weight' has shape") as e:
        load_modules(TINY, save_tampered(tmp_path, state))
    message = one_line(e)
    assert f"expects {want}" in message and str((want[0], want[1] + 1, *want[2:])) in message


def test_single_file_of_other_architecture(tmp_path, ldm_file):
    # an SD 1.x-layout checkpoint (conv proj_in) against an SD 2.x-style spec (linear proj_in)
    with raises_one_line(r"proj_in.weight' has shape \(16, 16, 1, 1\).*expects \(16, 16\)"):
        load_modules(TINY_SD2, ldm_file)
    wider = dataclasses.replace(TINY, name="tiny-wide", unet=TINY.unet | {"cross_attention_dim": 48})
    with raises_one_line("attn2.to_k.weight' has shape"):
        load_modules(wider, ldm_file)


def test_single_file_without_text_encoder(tmp_path, ldm_state):
    state = {k: v for k, v in ldm_state.items() if not k.startswith(CLIP_PREFIX)}
    with raises_one_line("no text encoder weights"):
        load_modules(TINY, save_tampered(tmp_path, state))


def test_safetensors_not_in_ldm_layout(tmp_path, tiny_modules):
    path = save_tampered(tmp_path, dict(tiny_modules["unet"].state_dict()), "diffusers_unet.safetensors")
    with raises_one_line("no UNet weights .*model.diffusion_model."):
        load_modules(TINY, path)


# ---- pickle -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".ckpt", ".bin", ".pt", ".pth"])
def test_pickle_refused_without_trust(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    # a pickle that would run code on load: refusing must not unpickle it
    path.write_bytes(b"\x80\x04cos\nsystem\n(Vtouch " + str(tmp_path / "ran").encode() + b"\ntR.")
    with raises_one_line("runs code") as e:
        load_modules(TINY, path)
    assert "--trust-pickle" in one_line(e)
    assert not (tmp_path / "ran").exists()


def test_pickle_accepted_with_trust(tmp_path, ldm_state, tiny_modules):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": ldm_state, "global_step": 470000, "epoch": 5}, path)
    loaded = load_weights(TINY, path, trust_pickle=True)
    assert loaded.source == "single-file"
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert_same_weights(tiny_modules, loaded.modules)


# ---- unreadable inputs ------------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with raises_one_line("does not exist") as e:
        load_modules(TINY, tmp_path / "nope.safetensors")
    one_line(e)


def test_corrupt_safetensors_header(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\xff" * 8 + b"not a header at all")
    with raises_one_line("not a readable safetensors file") as e:
        load_modules(TINY, path)
    one_line(e)


def test_truncated_safetensors(tmp_path, ldm_file):
    path = tmp_path / "truncated.safetensors"
    data = ldm_file.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(LdmExportError) as e:
        load_modules(TINY, path)
    one_line(e)


def test_unknown_suffix(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    with raises_one_line("unknown weights format '.gguf'"):
        load_modules(TINY, path)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads files without permission")
def test_unreadable_file(tmp_path, ldm_file):
    path = tmp_path / "locked.safetensors"
    shutil.copy(ldm_file, path)
    path.chmod(0)
    try:
        with raises_one_line("permission denied"):
            load_modules(TINY, path)
    finally:
        path.chmod(0o644)


# ---- full-size key mapping, on the meta device (no memory) --------------------------------------------------


class _MetaCheckpoint:
    """A checkpoint of meta tensors with the interface load_weights reads single files through."""

    def __init__(self, state):
        self._state = dict(state)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def keys(self):
        return list(self._state)

    def take(self, prefixes):
        return {k: self._state.pop(k) for k in list(self._state) if k.startswith(prefixes)}


@pytest.mark.parametrize("model,text_layout", [("sd15", "clip"), ("sd21", "open_clip")])
def test_single_file_conversion_at_full_size_on_meta(model, text_layout):
    """Every key and shape of a real-size SD 1.5 / 2.1 LDM checkpoint converts and fits the zoo spec."""
    from ldm_export.export import weights
    from ldm_export.zoo import get_model

    spec = get_model(model)
    with weights._parameters_on_meta():
        reference = {name: weights._BUILDERS[name](spec) for name in ("text_encoder", "unet", "vae")}
    state = to_ldm_checkpoint(reference, spec.unet, spec.vae, text_layout=text_layout)
    assert all(t.is_meta for t in state.values())
    if text_layout == "open_clip":
        # ViT-H carries 24 layers; SD 2.x uses 23 (diffusers' SD_2_TEXT_ENCODER_KEYS_TO_IGNORE)
        assert "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight" in state
    modules = weights._convert_single_file(spec, Path(f"{model}.safetensors"), _MetaCheckpoint(state))
    for name, module in modules.items():
        got = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        assert got == {k: tuple(v.shape) for k, v in reference[name].state_dict().items()}, name


@pytest.mark.parametrize("damage", ["zeros", "truncated", "empty"])
def test_diffusers_folder_corrupt_weights(diffusers_folder, tmp_path, damage):
    """A damaged weights file inside a folder is named, with what to do (as a damaged single file is)."""
    folder = copy_folder(diffusers_folder, tmp_path / "pipe")
    f = folder / "unet" / "diffusion_pytorch_model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"zeros": b"\x00" * 16, "truncated": data[:len(data) // 2], "empty": b""}[damage])
    with raises_one_line("unet/diffusion_pytorch_model.safetensors is not a readable safetensors file .*check that "
                         "the download is complete") as e:
        load_modules(TINY, folder)
    one_line(e)


def test_a_named_model_built_from_a_folder_samples_as_the_folders_scheduler_says(diffusers_folder, tmp_path, caplog):
    """`build --model tiny --weights FOLDER` whose scheduler says v-prediction: the bundle samples with
    v-prediction, as diffusers and `--model auto` do, and one warning names the difference."""
    import logging

    from ldm_export.export.build import BuildConfig, build
    from ldm_export.runtime.pipeline import Pipeline

    folder = copy_folder(diffusers_folder, tmp_path / "vpred")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {**TINY.scheduler, "prediction_type": "v_prediction", "_diffusers_version": "0.35.2"}))
    with caplog.at_level(logging.WARNING):
        build(BuildConfig(model="tiny", weights=folder, out=tmp_path / "named"))
    warned = [r.getMessage() for r in caplog.records if "its scheduler says" in r.getMessage()]
    assert len(warned) == 1 and "prediction_type 'v_prediction' where tiny's says 'epsilon'" in warned[0]
    build(BuildConfig(model="auto", weights=folder, out=tmp_path / "auto"))
    build(BuildConfig(model="tiny", weights=diffusers_folder, out=tmp_path / "plain"))

    def prediction(b):
        return json.loads((tmp_path / b / "scheduler" / "scheduler_config.json").read_text()).get("prediction_type",
                                                                                                  "epsilon")

    assert prediction("named") == prediction("auto") == "v_prediction" and prediction("plain") == "epsilon"
    draw = {b: Pipeline.from_bundle(tmp_path / b)("a red circle", num_inference_steps=3, seed=2, return_latents=True)
            for b in ("named", "auto", "plain")}
    np.testing.assert_allclose(draw["named"], draw["auto"], rtol=1e-5, atol=1e-6)
    assert np.abs(draw["named"] - draw["plain"]).max() > 1e-3


def test_a_named_model_that_is_not_the_folders_is_said_before_the_memory_refusal(diffusers_folder, tmp_path,
                                                                                  monkeypatch):
    """`build --model sd15 --weights TINY_FOLDER` on a small machine was refused for memory (sd15's 1.07 B
    parameters), which sent the user to a bigger machine; the folder's own configs say the named model is the
    mistake. A folder that is the named model still gets the memory refusal."""
    from ldm_export.export.build import BuildConfig, build
    from ldm_export.runtime import checks as runtime_checks

    monkeypatch.setattr(runtime_checks, "available_memory", lambda: 200_000_000)  # 200 MB: tiny fits, sd15 not
    monkeypatch.setattr(runtime_checks, "available_swap", lambda: 0)
    with raises_one_line(r"--model sd15 \(1\.07 B parameters\) is not the model in .*tiny, whose configs describe "
                         r"0\.\d+ B parameters \(sd1 family\): pass the --model these weights belong to, or --model auto"):
        build(BuildConfig(model="sd15", weights=diffusers_folder, out=tmp_path / "b"))
    monkeypatch.setattr(runtime_checks, "available_memory", lambda: 2_000_000)  # 2 MB: the folder's model does not fit
    with raises_one_line(r"sd15 has 1\.07 B parameters: .* build on a machine with more memory"):
        build(BuildConfig(model="sd15", weights=diffusers_folder, out=tmp_path / "b"))
    assert not (tmp_path / "b").exists()
