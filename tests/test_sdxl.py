"""SDXL family: zoo parameter counts, the export wrappers of its component kinds, weights loading."""
import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from ldm_export.export import onnx_export as X  # noqa: E402
from ldm_export.export import sdxl as XL  # noqa: E402
from ldm_export.runtime.kinds import penultimate_name  # noqa: E402
from ldm_export.zoo_sdxl import SDXL, SDXL_REFINER, TINY_SDXL  # noqa: E402


@pytest.mark.parametrize("spec", [SDXL, SDXL_REFINER], ids=lambda s: s.name)
def test_zoo_reproduces_published_parameter_counts(spec):
    with torch.device("meta"):
        modules = XL.build_modules(spec)
    got = {k: round(sum(p.numel() for p in m.parameters()) / 1e6, 1) for k, m in modules.items()}
    assert got == spec.params_m


def test_sdxl_specs_use_optimums_names():
    specs = SDXL.component_specs()
    assert list(specs) == ["text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"]
    assert specs["text_encoder"].output_names == ["last_hidden_state", "pooler_output", "hidden_states.11"]
    assert specs["text_encoder_2"].output_names == ["text_embeds", "last_hidden_state", "hidden_states.31"]
    assert specs["unet"].input_names == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    unet = {t.name: t.shape for t in specs["unet"].inputs}
    assert unet["encoder_hidden_states"][2] == 2048 and unet["text_embeds"][1] == 1280 and unet["time_ids"][1] == 6
    assert {t.name: t.shape for t in SDXL_REFINER.component_specs()["unet"].inputs}["time_ids"][1] == 5
    assert specs["vae_encoder"].input_names == ["sample"] and specs["vae_encoder"].output_names == ["latent_parameters"]


@pytest.fixture(scope="module")
def tiny_modules():
    torch.manual_seed(0)
    return XL.build_modules(TINY_SDXL)


@pytest.mark.parametrize("component", ["text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder"])
def test_tiny_sdxl_component_exports_and_matches_torch(component, tiny_modules, tmp_path):
    spec = TINY_SDXL.component_specs()[component]
    wrapper = XL.wrap(component, tiny_modules)
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
        pen = out[penultimate_name(TINY_SDXL.text_encoder["num_hidden_layers"])]
        assert not np.allclose(pen, out["last_hidden_state"])
    if component == "vae_encoder":  # mean and log-variance: diffusers' posterior parameters
        with torch.no_grad():
            dist = tiny_modules["vae"].encode(torch.from_numpy(feeds["sample"])).latent_dist
        np.testing.assert_allclose(reference[0][:, :4], dist.mean.numpy(), rtol=1e-5, atol=1e-5)
