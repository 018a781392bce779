"""DiT families, torch side: zoo configs against published parameter counts, each component kind exported and
verified (fp32 and fp16 by its policy), the wrappers' contracts."""
import tempfile
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ldm_export.export import dit_models as M  # noqa: E402
from ldm_export.export.dit_export import export_component  # noqa: E402
from ldm_export.runtime.errors import LdmExportError  # noqa: E402
from ldm_export.zoo_dit import DIT_MODELS  # noqa: E402

PUBLISHED_TOLERANCE = 0.02  # published figures are rounded ("2B", "11.9B", "695M")


def _count(module, with_buffers: bool) -> int:
    tensors = {id(p): p for p in module.parameters()}
    if with_buffers:
        tensors |= {id(b): b for b in module.buffers()}
    return sum(t.numel() for t in tensors.values())


@pytest.mark.parametrize("name", ["sd3-medium", "sd35-medium", "flux-schnell", "flux-dev"])
def test_zoo_reproduces_published_parameter_counts(name):
    spec = DIT_MODELS[name]
    assert spec.params_m, "every full-size DiT spec names its published counts"
    got = {}
    for component, build in M.builders(spec).items():
        if component not in spec.params_m:
            continue
        with torch.device("meta"):
            module = build()
        got[component] = _count(module, component in spec.params_with_buffers) / 1e6
    assert set(got) == set(spec.params_m)
    for component, published in spec.params_m.items():
        assert abs(got[component] - published) <= PUBLISHED_TOLERANCE * published, (component, got[component], published)


def test_flux_dev_and_schnell_differ_by_the_guidance_embedder_only():
    with torch.device("meta"):
        dev = M.build_transformer(DIT_MODELS["flux-dev"])
        schnell = M.build_transformer(DIT_MODELS["flux-schnell"])
    extra = set(dev.state_dict()) - set(schnell.state_dict())
    assert extra and all(k.startswith("time_text_embed.guidance_embedder.") for k in extra)
    assert set(schnell.state_dict()) < set(dev.state_dict())


def test_sd3_text_length_joins_clip_and_t5():
    assert DIT_MODELS["sd3-medium"].text_length == 77 + 256  # the 333 text tokens of the H200 baseline
    assert DIT_MODELS["flux-dev"].text_length == 512 and DIT_MODELS["flux-schnell"].text_length == 256
    assert DIT_MODELS["demo-dit"].text_length == 32


@pytest.fixture(scope="module")
def tiny_modules():
    torch.set_grad_enabled(False)
    return {name: M.build_random(DIT_MODELS[name], 0) for name in ("tiny-sd3", "tiny-flux")}


CASES = [("tiny-sd3", c) for c in DIT_MODELS["tiny-sd3"].components] + \
        [("tiny-flux", c) for c in DIT_MODELS["tiny-flux"].components if c != "text_encoder"]


@pytest.mark.parametrize("name,component", CASES, ids=lambda x: x)
def test_component_exports_and_verifies_fp32_and_fp16(tiny_modules, name, component, tmp_path):
    spec = DIT_MODELS[name]
    folder = tmp_path / component
    folder.mkdir()
    cspec, files, report = export_component(spec, component, tiny_modules[name], folder, tmp_path, "fp16")
    assert files == [folder / "model.onnx"]
    assert report["fp32"]["passed"] and all(o["cosine"] >= 0.99999 for o in report["fp32"]["outputs"].values())
    if component == "vae_decoder":  # force_upcast in the 16-channel VAE's config: diffusers keeps it fp32
        assert report["precision"] == "fp32" and "fp16" not in report
        return
    assert report["fp16"]["passed"] and all(o["cosine"] >= 0.999 for o in report["fp16"]["outputs"].values())
    policy = report["fp16_policy"]
    assert policy["keep_fp32_op_types"] and policy["reason"]
    if component in ("transformer", "text_encoder_3", "text_encoder_2") and "clip" not in report["kind"]:
        assert policy["keep_fp32_node_prefixes"]  # T5's wo/residual scopes, the transformer's timestep/modulation
    # the graph's I/O names are the spec's (Optimum's)
    import onnx

    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    assert [i.name for i in graph.input] == cspec.input_names
    assert [o.name for o in graph.output] == cspec.output_names
    if component == "transformer":
        float_io = {t.name: t.dtype for t in (*cspec.inputs, *cspec.outputs)}
        assert float_io["hidden_states"] == float_io["out_hidden_states"] == "float32"  # latents fp32 at the boundary
        assert float_io["encoder_hidden_states"] == "float16"


def test_transformer_io_names_are_optimums():
    sd3 = DIT_MODELS["sd3-medium"].component_specs()["transformer"]
    assert sd3.input_names == ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"]
    assert sd3.output_names == ["out_hidden_states"]
    flux = DIT_MODELS["flux-dev"].component_specs()["transformer"]
    assert flux.input_names == ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep",
                                "img_ids", "txt_ids", "guidance"]
    assert "guidance" not in DIT_MODELS["flux-schnell"].component_specs()["transformer"].input_names
    te2 = DIT_MODELS["sd3-medium"].component_specs()["text_encoder_2"]
    assert te2.output_names == ["text_embeds", "last_hidden_state", "hidden_states.31"]


def test_clip_with_projection_wrapper_returns_sd3s_penultimate_layer(tiny_modules):
    spec = DIT_MODELS["tiny-sd3"]
    model = tiny_modules["tiny-sd3"]["text_encoder_2"]
    ids = torch.randint(0, 49406, (2, 77))
    text_embeds, last, penultimate = M.wrap("text_encoder_2", spec, tiny_modules["tiny-sd3"])(ids.to(torch.int32))
    ref = model(ids, output_hidden_states=True)
    assert torch.equal(penultimate, ref.hidden_states[-2]) and not torch.equal(penultimate, last)
    assert torch.equal(text_embeds, ref.text_embeds)


def test_t5_fp16_policy_keeps_the_feed_forward_output_and_residual_stream_fp32(tiny_modules, tmp_path):
    import onnx

    spec = DIT_MODELS["tiny-sd3"]
    folder = tmp_path / "text_encoder_3"
    folder.mkdir()
    export_component(spec, "text_encoder_3", tiny_modules["tiny-sd3"], folder, tmp_path, "fp16")
    graph = onnx.load(str(folder / "model.onnx")).graph
    fp32_inits = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    fp16_inits = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT16}
    wo = [n for n in graph.node if "/DenseReluDense/wo/" in n.name and n.op_type == "MatMul"]
    wi = [n for n in graph.node if "/DenseReluDense/wi_0/" in n.name and n.op_type == "MatMul"]
    assert wo and wi
    assert all(n.input[1] in fp32_inits for n in wo)  # wo's weights stay fp32
    assert all(n.input[1] in fp16_inits for n in wi)  # wi's run fp16


def test_unknown_dit_model_is_one_line_error():
    from ldm_export.zoo_dit import get_dit_model

    with pytest.raises(LdmExportError, match="unknown DiT model 'sd4'; known: .*sd3-medium"):
        get_dit_model("sd4")
