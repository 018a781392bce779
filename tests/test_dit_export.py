"""DiT families, torch side: zoo configs against published parameter counts, every component kind of tiny-sd3 and
tiny-flux exported and verified through `build` (fp32 and fp16 by the kind's policy), the wrappers' contracts."""
import json

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from ldm_export.export import models as M  # noqa: E402
from ldm_export.export.build import BuildConfig, build  # noqa: E402
from ldm_export.runtime.errors import LdmExportError  # noqa: E402
from ldm_export.zoo import MODELS, get_model  # noqa: E402
from ldm_export.zoo_dit import PARAMS_WITH_BUFFERS  # noqa: E402

PUBLISHED_TOLERANCE = 0.02  # published figures are rounded ("2B", "11.9B", "695M")


def _count(module, with_buffers: bool) -> int:
    tensors = {id(p): p for p in module.parameters()}
    if with_buffers:
        tensors |= {id(b): b for b in module.buffers()}
    return sum(t.numel() for t in tensors.values())


def meta_counts(spec) -> dict[str, float]:
    got = {}
    for name in spec.params_m:
        with torch.device("meta"):
            module = M.build_module(spec, name)
        got[name] = _count(module, (spec.name, name) in PARAMS_WITH_BUFFERS) / 1e6
    return got


@pytest.mark.parametrize("name", ["sd3-medium", "sd35-medium", "flux-schnell", "flux-dev"])
def test_zoo_reproduces_published_parameter_counts(name):
    spec = get_model(name)
    assert spec.params_m, "every full-size DiT spec names its published counts"
    got = meta_counts(spec)
    for module, published in spec.params_m.items():
        assert abs(got[module] - published) <= PUBLISHED_TOLERANCE * published, (module, got[module], published)


def test_flux_dev_and_schnell_differ_by_the_guidance_embedder_only():
    with torch.device("meta"):
        dev = M.build_module(get_model("flux-dev"), "transformer")
        schnell = M.build_module(get_model("flux-schnell"), "transformer")
    extra = set(dev.state_dict()) - set(schnell.state_dict())
    assert extra and all(k.startswith("time_text_embed.guidance_embedder.") for k in extra)
    assert set(schnell.state_dict()) < set(dev.state_dict())


def test_text_lengths_and_io_names_are_optimums():
    sd3 = get_model("sd3-medium").component_specs()
    assert sd3["transformer"].input_names == ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"]
    assert sd3["transformer"].output_names == ["out_hidden_states"]
    assert sd3["transformer"].profile["text_sequence"][1] == 77 + 256  # the 333 text tokens of the H200 baseline
    assert sd3["text_encoder_2"].output_names == ["text_embeds", "last_hidden_state", "hidden_states.31"]
    assert sd3["text_encoder_3"].profile["sequence"] == (256, 256, 256)
    flux = get_model("flux-dev").component_specs()["transformer"]
    assert flux.input_names == ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep",
                                "img_ids", "txt_ids", "guidance"]
    assert flux.profile["text_sequence"][1] == 512 and flux.profile["image_sequence"][1] == 64 * 64
    assert "guidance" not in get_model("flux-schnell").component_specs()["transformer"].input_names
    assert get_model("demo-dit").component_specs()["transformer"].profile["text_sequence"][1] == 32


@pytest.fixture(scope="module")
def fp16_bundles(tmp_path_factory):
    out = {}
    for name in ("tiny-sd3", "tiny-flux"):
        path = tmp_path_factory.mktemp("dit") / name
        build(BuildConfig(model=name, precision="fp16", random_weights=True, seed=0, out=path))
        out[name] = path
    return out


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_every_component_verifies_fp32_and_fp16(fp16_bundles, name):
    bundle = fp16_bundles[name]
    m = json.loads((bundle / "ldm_export.json").read_text())
    spec = get_model(name)
    assert list(m["components"]) == list(spec.components) and m["model"]["family"] == spec.family
    for component, info in m["components"].items():
        fp32 = info["verification"]["fp32"]
        assert fp32["passed"] and all(o["cosine"] >= 0.99999 for o in fp32["outputs"].values()), component
        graph = onnx.load(str(bundle / info["files"][0]), load_external_data=False).graph
        assert [i.name for i in graph.input] == [t["name"] for t in info["spec"]["inputs"]]
        assert [o.name for o in graph.output] == [t["name"] for t in info["spec"]["outputs"]]
        if component == "vae_decoder":  # force_upcast in the 16-channel VAE's config: diffusers keeps it fp32
            assert info["precision"] == "fp32" and "fp16" not in info["verification"]
            continue
        assert info["precision"] == "fp16", component
        fp16 = info["verification"]["fp16"]
        assert fp16["passed"] and all(o["cosine"] >= 0.999 for o in fp16["outputs"].values()), component
    transformer = {t["name"]: t["dtype"] for t in m["components"]["transformer"]["spec"]["inputs"]}
    assert transformer["hidden_states"] == transformer["timestep"] == "float32"  # latents fp32 at the boundary
    assert transformer["encoder_hidden_states"] == "float16"
    policy = m["components"]["transformer"]["fp16_policy"]
    assert "/time_text_embed/" in policy["keep_fp32_node_prefixes"] and "/norm1/linear/" in policy["keep_fp32_node_prefixes"]
    for rel in ("model_index.json", "scheduler/scheduler_config.json", "transformer/config.json", "tokenizer/vocab.json"):
        assert (bundle / rel).is_file(), rel
    t5 = "tokenizer_3" if name == "tiny-sd3" else "tokenizer_2"
    assert (bundle / t5 / "tokenizer.json").is_file()
    index = json.loads((bundle / "model_index.json").read_text())
    assert index["_class_name"] == ("StableDiffusion3Pipeline" if name == "tiny-sd3" else "FluxPipeline")
    assert index[t5] == ["transformers", "T5TokenizerFast"]


def test_t5_fp16_policy_keeps_wo_and_the_residual_stream_fp32(fp16_bundles):
    graph = onnx.load(str(fp16_bundles["tiny-sd3"] / "text_encoder_3" / "model.onnx")).graph
    fp32_inits = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    fp16_inits = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT16}
    wo = [n for n in graph.node if "/DenseReluDense/wo/" in n.name and n.op_type == "MatMul"]
    wi = [n for n in graph.node if "/DenseReluDense/wi_0/" in n.name and n.op_type == "MatMul"]
    assert wo and wi
    assert all(n.input[1] in fp32_inits for n in wo)  # wo's weights stay fp32
    assert all(n.input[1] in fp16_inits for n in wi)  # wi's run fp16


def test_clip_with_projection_wrapper_returns_sd3s_penultimate_layer():
    spec = get_model("tiny-sd3")
    modules = M.build_random(spec, 0)
    family = spec.family_def
    ids = torch.randint(0, 49406, (2, 77))
    with torch.no_grad():
        text_embeds, last, penultimate = M.wrap("text_encoder_2", modules, family)(ids.to(torch.int32))
        ref = modules["text_encoder_2"](ids, output_hidden_states=True)
    assert torch.equal(penultimate, ref.hidden_states[-2]) and not torch.equal(penultimate, last)
    assert torch.equal(text_embeds, ref.text_embeds)


def test_dit_models_are_in_the_zoo():
    assert {"sd3-medium", "sd35-medium", "flux-schnell", "flux-dev", "tiny-sd3", "tiny-flux", "demo-dit"} <= set(MODELS)
    with pytest.raises(LdmExportError, match="unknown model 'sd4'"):
        get_model("sd4")


@pytest.mark.parametrize("name", ["tiny-sd3", "demo-dit"])
def test_fused_joint_attention_equals_diffusers_and_exports_one_mha_per_block(name, tmp_path):
    """cuda target: SD3's joint attention as MultiHeadAttention; ONNX Runtime's CPU kernel runs it in fp32."""
    from ldm_export import kernels
    from ldm_export.export import onnx_export as X
    from ldm_export.export.dit_export import sample_inputs
    from ldm_export.export.dit_models import register_onnx_symbolics

    spec = get_model(name)
    modules = M.build_random(spec, 0)
    family = spec.family_def
    wrapper = M.wrap("transformer", modules, family)
    cspec = spec.component_specs()["transformer"]
    dims = spec.static_dims("transformer")
    feeds = sample_inputs("sd3_transformer", cspec, dims, 0, spec.configs["transformer"], family.latent_format(spec.configs))
    reference = X.torch_outputs(wrapper, cspec, feeds)
    register_onnx_symbolics(X.OPSET)
    with kernels.export_patches(wrapper, "transformer", "cuda"):
        fused_torch = X.torch_outputs(wrapper, cspec, feeds)
        model = X.export_onnx(wrapper, cspec, tmp_path, feeds)
    model = kernels.rewrite(model, "transformer", "cuda")
    blocks = spec.configs["transformer"]["num_layers"]
    # one FastGelu a feed-forward: the image stream's in every block, the text stream's in all but the last
    # (context_pre_only); no tanh GELU left unfused
    assert kernels.count_fused(model) == {"MultiHeadAttention": blocks, "FastGelu": 2 * blocks - 1}
    assert not [n for n in model.graph.node if n.op_type == "Tanh"]
    np.testing.assert_allclose(fused_torch[0], reference[0], atol=1e-5)
    path = tmp_path / "model.onnx"
    X.save_onnx(model, path)
    result = X.verify(path, cspec, feeds, reference, "fp32", provider="cpu")
    assert result.passed, result.outputs


def test_zoo_models_carry_their_pipelines_sampling_defaults():
    """generate without --steps/--cfg uses the model's own settings (diffusers' pipeline defaults), not SD 1.5's."""
    from ldm_export.runtime.bundle import GENERIC_DEFAULTS

    want = {"sd3-medium": (28, 7.0), "sd35-medium": (40, 4.5), "flux-schnell": (4, 0.0), "flux-dev": (28, 3.5),
            "sdxl": (30, 5.0), "demo-dit": (20, 5.0), "sd15": (20, 7.5), "demo": (20, 7.5)}
    for name, (steps, cfg) in want.items():
        got = {**GENERIC_DEFAULTS, **get_model(name).defaults}
        assert (got["steps"], got["guidance_scale"]) == (steps, cfg), name


@pytest.fixture(scope="module")
def flux_cuda_graph(tmp_path_factory):
    """tiny-flux's transformer exported for the cuda target (fused attention) beside its torch fp32 reference."""
    from ldm_export import kernels
    from ldm_export.export import onnx_export as X
    from ldm_export.export.dit_export import sample_inputs
    from ldm_export.export.dit_models import export_patches, register_onnx_symbolics

    spec = get_model("tiny-flux")
    family = spec.family_def
    wrapper = M.wrap("transformer", M.build_random(spec, 0), family)
    cspec = spec.component_specs()["transformer"]
    dims = spec.static_dims("transformer")
    feeds = sample_inputs("flux_transformer", cspec, dims, 0, spec.configs["transformer"], family.latent_format(spec.configs))
    reference = X.torch_outputs(wrapper, cspec, feeds)
    register_onnx_symbolics(X.OPSET)
    tmp = tmp_path_factory.mktemp("flux-cuda")
    with export_patches("flux_transformer"), kernels.export_patches(wrapper, "transformer", "cuda"):
        fused_torch = X.torch_outputs(wrapper, cspec, feeds)
        model = X.export_onnx(wrapper, cspec, tmp, feeds)
    model = kernels.rewrite(model, "transformer", "cuda")
    path = tmp / "model.onnx"
    X.save_onnx(model, path)
    return dict(spec=spec, wrapper=wrapper, cspec=cspec, feeds=feeds, reference=reference, fused_torch=fused_torch,
                model=model, path=path)


def test_fused_flux_attention_equals_diffusers_and_exports_one_mha_per_attention(flux_cuda_graph):
    """cuda target: every FLUX attention (double- and single-stream) as one MultiHeadAttention after the rotary
    embedding; ONNX Runtime's CPU kernel of MultiHeadAttention runs the graph in fp32 against torch."""
    from ldm_export import kernels
    from ldm_export.export import onnx_export as X

    g = flux_cuda_graph
    cfg = g["spec"].configs["transformer"]
    blocks = cfg["num_layers"] + cfg["num_single_layers"]
    gelus = 2 * cfg["num_layers"] + cfg["num_single_layers"]  # double blocks: ff, ff_context; single: act_mlp
    assert kernels.count_fused(g["model"]) == {"FastGelu": gelus, "MultiHeadAttention": blocks}
    assert kernels.describe("transformer", "cuda") == [f"FastGelu x{gelus}", f"MultiHeadAttention x{blocks}"]
    assert not [n for n in g["model"].graph.node if n.op_type == "Tanh"]
    mha = [n for n in g["model"].graph.node if n.op_type == "MultiHeadAttention"]
    assert all(n.domain == "com.microsoft" and len(n.input) == 3 for n in mha)  # q, k, v (B, S, D): nothing packed
    assert not [n for n in g["model"].graph.node if n.op_type == "Softmax"]  # no unfused attention left
    np.testing.assert_allclose(g["fused_torch"][0], g["reference"][0], atol=1e-5)
    result = X.verify(g["path"], g["cspec"], g["feeds"], g["reference"], "fp32", provider="cpu")
    assert result.passed and all(o["cosine"] >= 0.99999 for o in result.to_json()["outputs"].values()), result.outputs


def test_fused_flux_graph_runs_other_image_and_text_lengths(flux_cuda_graph):
    """The fused graph is traced at one size; the rotary embedding and MultiHeadAttention take any token count."""
    import onnxruntime as ort

    from ldm_export.export import onnx_export as X
    from ldm_export.export.dit_export import sample_inputs
    from ldm_export.runtime.flux import image_ids

    g = flux_cuda_graph
    spec = g["spec"]
    dims = dict(spec.static_dims("transformer"))
    side = int(dims["height"]) + 2  # packed tokens (side/2)^2 and 3 more text tokens than traced
    dims["height"] = dims["width"] = side
    dims["image_sequence"] = (side // 2) ** 2
    dims["text_sequence"] = int(dims["text_sequence"]) + 3
    feeds = sample_inputs("flux_transformer", g["cspec"], dims, 3, spec.configs["transformer"],
                          spec.family_def.latent_format(spec.configs))
    assert feeds["img_ids"].shape == image_ids(side, side).shape != g["feeds"]["img_ids"].shape
    reference = X.torch_outputs(g["wrapper"], g["cspec"], feeds)
    sess = ort.InferenceSession(str(g["path"]), providers=["CPUExecutionProvider"])
    got = sess.run(None, feeds)[0]
    cos = float(np.dot(got.ravel(), reference[0].ravel()) / np.linalg.norm(got) / np.linalg.norm(reference[0]))
    assert cos >= 0.99999, cos


def test_cuda_target_flux_build_names_the_fused_attention_in_its_manifest(tmp_path, monkeypatch):
    """``build --target cuda``: the transformer's kernels list names MultiHeadAttention, as SD3's does; verified on
    ONNX Runtime's CPU provider (GroupNorm, the VAE's cuda kernel, has no CPU kernel, so it is left out here)."""
    monkeypatch.setenv("LDM_EXPORT_DISABLE_KERNELS", "groupnorm")
    m = build(BuildConfig(model="tiny-flux", random_weights=True, target="cuda", verify_provider="cpu",
                          out=tmp_path / "b"))
    cfg = get_model("tiny-flux").configs["transformer"]
    info = m["components"]["transformer"]
    assert info["kernels"] == [f"FastGelu x{2 * cfg['num_layers'] + cfg['num_single_layers']}",
                               f"MultiHeadAttention x{cfg['num_layers'] + cfg['num_single_layers']}"]
    assert all(o["cosine"] >= 0.99999 for o in info["verification"]["fp32"]["outputs"].values())
