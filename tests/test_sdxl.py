"""SDXL family: zoo parameter counts, the export wrappers of its component kinds, weights loading."""
import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from ldm_export.export import onnx_export as X  # noqa: E402
from ldm_export.export.models import build_random, wrap  # noqa: E402
from ldm_export.runtime.kinds import penultimate_name  # noqa: E402
from ldm_export.zoo import MODELS  # noqa: E402

SDXL, SDXL_REFINER, TINY_SDXL = MODELS["sdxl"], MODELS["sdxl-refiner"], MODELS["tiny-sdxl"]


@pytest.mark.parametrize("spec", [SDXL, SDXL_REFINER, MODELS["sdxl-inpaint"]], ids=lambda s: s.name)
def test_zoo_reproduces_published_parameter_counts(spec):
    with torch.device("meta"):
        modules = build_random(spec)
    got = {k: round(sum(p.numel() for p in m.parameters()) / 1e6, 1) for k, m in modules.items()}
    assert got == spec.params_m


def test_sdxl_specs_use_optimums_names():
    specs = SDXL.component_specs()
    assert set(specs) == {"text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"}
    assert specs["text_encoder"].output_names == ["last_hidden_state", "pooler_output", "hidden_states.11"]
    assert specs["text_encoder_2"].output_names == ["text_embeds", "last_hidden_state", "hidden_states.31"]
    assert specs["unet"].input_names == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    unet = {t.name: t.shape for t in specs["unet"].inputs}
    assert unet["encoder_hidden_states"][2] == 2048 and unet["text_embeds"][1] == 1280 and unet["time_ids"][1] == 6
    assert {t.name: t.shape for t in SDXL_REFINER.component_specs()["unet"].inputs}["time_ids"][1] == 5
    assert specs["vae_encoder"].input_names == ["sample"] and specs["vae_encoder"].output_names == ["latent_parameters"]


@pytest.fixture(scope="module")
def tiny_modules():
    return build_random(TINY_SDXL, 0)


@pytest.mark.parametrize("component", ["text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder"])
def test_tiny_sdxl_component_exports_and_matches_torch(component, tiny_modules, tmp_path):
    spec = TINY_SDXL.component_specs()[component]
    wrapper = wrap(component, tiny_modules, TINY_SDXL.family_def)
    feeds = X.sample_inputs(spec, seed=1, latent_scale=TINY_SDXL.latent_scale)
    reference = X.torch_outputs(wrapper, spec, feeds)
    model = X.export_onnx(wrapper, spec, tmp_path, feeds)
    path = tmp_path / "model.onnx"
    X.save_onnx(model, path)
    graph = onnx.load(str(path)).graph
    assert [o.name for o in graph.output] == spec.output_names
    assert [i.name for i in graph.input] == spec.input_names
    report = X.verify(path, spec, feeds, reference, "fp32")
    assert report.passed, report.outputs
    if component.startswith("text_encoder"):  # the penultimate layer is what SDXL reads, not the last one
        out = dict(zip(spec.output_names, reference))
        pen = out[penultimate_name(TINY_SDXL.configs[component]["num_hidden_layers"])]
        assert not np.allclose(pen, out["last_hidden_state"])
    if component == "vae_encoder":  # mean and log-variance: diffusers' posterior parameters
        with torch.no_grad():
            dist = tiny_modules["vae"].encode(torch.from_numpy(feeds["sample"])).latent_dist
        np.testing.assert_allclose(reference[0][:, :4], dist.mean.numpy(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- weights


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


def test_loads_an_sdxl_diffusers_folder(tiny_modules, tmp_path):
    from ldm_export.export.weights_sdxl import load_sdxl_weights

    for name, module in tiny_modules.items():
        module.save_pretrained(tmp_path / name)
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    loaded = load_sdxl_weights(TINY_SDXL, tmp_path)
    assert loaded.source == "diffusers" and set(loaded.modules) == {"text_encoder", "text_encoder_2", "unet", "vae"}
    for name in tiny_modules:
        _same_weights(loaded.modules[name], tiny_modules[name])
    assert "text_encoder_2/model.safetensors" in loaded.files


def test_sdxl_folder_of_another_architecture_names_the_key(tiny_modules, tmp_path):
    from ldm_export.export.weights_sdxl import load_sdxl_weights
    from ldm_export.runtime.errors import LdmExportError

    for name, module in tiny_modules.items():
        module.save_pretrained(tmp_path / name)
    (tmp_path / "model_index.json").write_text("{}")
    cfg = (tmp_path / "text_encoder_2" / "config.json")
    cfg.write_text(cfg.read_text().replace('"num_hidden_layers": 5', '"num_hidden_layers": 4'))
    with pytest.raises(LdmExportError, match="text_encoder_2/config.json has num_hidden_layers=4"):
        load_sdxl_weights(TINY_SDXL, tmp_path)


def test_loads_an_sdxl_single_file_checkpoint_through_diffusers_converters(tiny_modules, tmp_path):
    from ldm_layout import sdxl_to_ldm_checkpoint
    from safetensors.torch import save_file

    from ldm_export.export.weights_sdxl import load_sdxl_weights
    from ldm_export.runtime.errors import LdmExportError

    state = sdxl_to_ldm_checkpoint(tiny_modules, TINY_SDXL.unet, TINY_SDXL.vae)
    assert any(k.startswith("model.diffusion_model.label_emb.0.0.") for k in state)
    path = tmp_path / "tiny-sdxl.safetensors"
    save_file(state, str(path))
    loaded = load_sdxl_weights(TINY_SDXL, path)
    assert loaded.source == "single-file" and loaded.sha256
    for name in tiny_modules:
        _same_weights(loaded.modules[name], tiny_modules[name])
    # an SD 1.x-style file (no conditioner.embedders) is refused, naming what is missing
    sd1 = {k: v for k, v in state.items() if not k.startswith("conditioner.")}
    save_file(sd1, str(tmp_path / "sd1.safetensors"))
    with pytest.raises(LdmExportError, match="no OpenCLIP bigG text encoder weights"):
        load_sdxl_weights(TINY_SDXL, tmp_path / "sd1.safetensors")
    # a missing tensor is named
    broken = dict(state)
    broken.pop("conditioner.embedders.1.model.ln_final.weight")
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(LdmExportError, match="text_encoder_2: the checkpoint lacks 'text_model.final_layer_norm.weight'"):
        load_sdxl_weights(TINY_SDXL, tmp_path / "broken.safetensors")


def test_tiny_sdxl_fp16_build_keeps_the_vae_fp32_and_the_time_ids_sinusoids(tmp_path):
    import json

    from ldm_export.export.build import BuildConfig, build
    from ldm_export.runtime.pipeline import Pipeline

    out = tmp_path / "xl16"
    build(BuildConfig(model="tiny-sdxl", precision="fp16", random_weights=True, out=out, vae_encoder=True))
    m = json.loads((out / "ldm_export.json").read_text())
    prec = {c: v["precision"] for c, v in m["components"].items()}
    assert prec == {"text_encoder": "fp16", "text_encoder_2": "fp16", "unet": "fp16", "vae_decoder": "fp32",
                    "vae_encoder": "fp32"}  # the SDXL VAE's force_upcast: its decoder overflows fp16
    assert "/model/add_time_proj/" in m["components"]["unet"]["fp16_policy"]["keep_fp32_node_prefixes"]
    g = onnx.shape_inference.infer_shapes(onnx.load(str(out / "unet" / "model.onnx"))).graph
    types = {v.name: v.type.tensor_type.elem_type for v in g.value_info}
    sin = [n for n in g.node if n.op_type in ("Sin", "Cos") and "add_time_proj" in n.name]
    assert sin and all(types[n.output[0]] == onnx.TensorProto.FLOAT for n in sin)  # fp32, not fp16
    linear = [n for n in g.node if n.op_type in ("MatMul", "Gemm") and "add_embedding" in n.name]
    assert linear and any(types.get(n.output[0]) == onnx.TensorProto.FLOAT16 for n in linear)  # the rest is fp16
    assert set(m["model"]["modules"]) == {"text_encoder", "text_encoder_2", "unet", "vae"}
    for tok, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        assert json.loads((out / tok / "special_tokens_map.json").read_text())["pad_token"] in (pad, {"content": pad})
    image = Pipeline.from_bundle(out)("a cat", num_inference_steps=3, seed=0)[0]
    assert image.size == (64, 64) and np.asarray(image).std() > 1
