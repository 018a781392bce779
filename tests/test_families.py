"""Model families: the registry, the Conditioning record, and that zoo, export and runtime all read the family."""
import json

import numpy as np
import pytest

from ldm_export.runtime.errors import LdmExportError
from ldm_export.runtime.families import Conditioning, LatentFormat, family_names, get_family


def test_sd_families_are_registered_and_unknown_ones_refused():
    assert {"sd1", "sd2"} <= set(family_names())
    assert get_family("sd2").pad_token == "!" and get_family("sd1").pad_token == "<|endoftext|>"
    with pytest.raises(LdmExportError, match="unknown model family 'sd99'.*upgrade ldm-export"):
        get_family("sd99")


def test_conditioning_stacks_repeats_and_slices_every_field():
    a = Conditioning(np.zeros((1, 3, 4)), np.zeros((1, 2)), {"time_ids": np.zeros((1, 6))})
    b = Conditioning(np.ones((1, 3, 4)), np.ones((1, 2)), {"time_ids": np.ones((1, 6))})
    both = Conditioning.concat([a, b.repeat(2)])
    assert both.batch == 3 and both.pooled.shape == (3, 2) and both.extras["time_ids"].shape == (3, 6)
    assert both.rows(1, 3).context.min() == 1 and both.rows(0, 1).extras["time_ids"].max() == 0
    assert a.same_layout(b) and not a.same_layout(Conditioning(np.zeros((1, 3, 4))))
    assert both.astype(np.float16).pooled.dtype == np.float16


def test_latent_format_round_trips():
    lf = LatentFormat(16, 1.5305, 0.0609)
    z = np.random.default_rng(0).standard_normal((1, 16, 4, 4))
    np.testing.assert_allclose(lf.to_vae(lf.from_vae(z)), z, rtol=1e-12)


def test_zoo_specs_come_from_the_family():
    from ldm_export.zoo import get_model

    spec = get_model("demo")
    fam = spec.family_def
    assert spec.components == ("text_encoder", "unet", "vae_decoder")
    assert set(spec.components) <= set(spec.component_specs())  # and the optional VAE encoder
    assert fam.size_multiple(spec.configs) == 32  # 8 px per latent, the demo UNet halves twice
    assert spec.static_dims("vae_decoder")["batch"] == 1 and spec.static_dims("unet")["batch"] == 2
    index = spec.model_index()
    assert index["_class_name"] == "StableDiffusionPipeline" and index["unet"] == ["diffusers", "UNet2DConditionModel"]


def test_bundles_written_before_families_still_open(tiny_bundle, tmp_path):
    """A manifest with component-keyed ``configs`` (no ``modules``) gives the same module configs."""
    import shutil

    from ldm_export.runtime import Bundle, Pipeline

    old = tmp_path / "old"
    shutil.copytree(tiny_bundle, old)
    m = json.loads((old / "ldm_export.json").read_text())
    modules = m["model"].pop("modules")
    m["model"]["configs"] = {"text_encoder": modules["text_encoder"], "unet": modules["unet"],
                             "vae_decoder": modules["vae"]}
    del m["model"]["defaults"]  # sampling defaults came later too: such bundles sample as before
    (old / "ldm_export.json").write_text(json.dumps(m))
    assert Bundle.open(old).module_configs == modules
    assert Bundle.open(old).defaults == {"steps": 20, "guidance_scale": 7.5}
    new_img = Pipeline.from_bundle(tiny_bundle)("a cat", num_inference_steps=2, seed=3)[0]
    old_img = Pipeline.from_bundle(old)("a cat", num_inference_steps=2, seed=3)[0]
    assert np.array_equal(np.asarray(new_img), np.asarray(old_img))
