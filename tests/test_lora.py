"""LoRA: kohya and diffusers/PEFT files fused before export (closed-form check), `lora` on a built bundle against a
fresh export with --lora (fp32 and fp16), and bad LoRA files naming the first mismatch."""
import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import run_cli

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from safetensors.torch import save_file  # noqa: E402

from ldm_export.export.build import BuildConfig, build  # noqa: E402
from ldm_export.export.lora import LoraRef, apply_loras, lora_bundle, parse_lora  # noqa: E402
from ldm_export.runtime.errors import LdmExportError  # noqa: E402
from ldm_export.zoo import TINY  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

# (kohya name, diffusers module path, in, out) of layers in the tiny SD 1.x model
LAYERS = [
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", "unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 16, 16),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", "unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", 32, 16),
    ("lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_ff_net_2", "unet", "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2", 64, 16),
] + [
    # kohya text-encoder LoRAs adapt q, k, v and out together (diffusers infers the layout from out_proj)
    (f"lora_te_text_model_encoder_layers_0_self_attn_{p}", "text_encoder", f"text_model.encoder.layers.0.self_attn.{p}", 32, 32)
    for p in ("q_proj", "k_proj", "v_proj", "out_proj")
] + [
    ("lora_te_text_model_encoder_layers_1_mlp_fc1", "text_encoder", "text_model.encoder.layers.1.mlp.fc1", 32, 64),
]


def make_lora(path, layout="kohya", rank=4, alpha=2.0, seed=0, layers=LAYERS):
    """A LoRA file and the expected weight deltas {(component, module path): delta at scale 1}."""
    g = torch.Generator().manual_seed(seed)
    state, expected = {}, {}
    for kohya, component, module, fan_in, fan_out in layers:
        down = torch.randn(rank, fan_in, generator=g) * 0.2
        up = torch.randn(fan_out, rank, generator=g) * 0.2
        if layout == "kohya":
            state[f"{kohya}.lora_down.weight"] = down
            state[f"{kohya}.lora_up.weight"] = up
            state[f"{kohya}.alpha"] = torch.tensor(alpha)
            expected[(component, module)] = (alpha / rank) * (up @ down)
        else:  # diffusers/PEFT: lora_A/lora_B under the component's name; no alpha means alpha = rank
            state[f"{component}.{module}.lora_A.weight"] = down
            state[f"{component}.{module}.lora_B.weight"] = up
            expected[(component, module)] = up @ down
    save_file(state, str(path))
    return expected


def tiny_modules(seed=0):
    from ldm_export.export.models import build_random

    return build_random(TINY, seed)


@pytest.mark.parametrize("layout", ["kohya", "peft"])
def test_fused_weights_equal_the_closed_form(tmp_path, layout):
    path = tmp_path / f"{layout}.safetensors"
    expected = make_lora(path, layout)
    base = tiny_modules()
    before = {c: {k: v.clone() for k, v in base[c].state_dict().items()} for c in ("unet", "text_encoder")}
    report = apply_loras(base, [LoraRef(path, 0.7)], "tiny")
    assert report[0]["layers"] == {"unet": 3, "text_encoder": 5} and report[0]["scale"] == 0.7
    for (component, module), delta in expected.items():
        got = base[component].state_dict()[f"{module}.weight"] - before[component][f"{module}.weight"]
        torch.testing.assert_close(got, 0.7 * delta, rtol=1e-5, atol=1e-6)
    untouched = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.weight"
    assert torch.equal(base["unet"].state_dict()[untouched], before["unet"][untouched])
    assert not any("lora" in k for k in base["unet"].state_dict())  # plain modules again, ready to export


def test_parse_lora(tmp_path):
    f = tmp_path / "a.safetensors"
    f.write_bytes(b"x")
    assert parse_lora(str(f)) == LoraRef(f, 1.0) and parse_lora(f"{f}:0.5") == LoraRef(f, 0.5)
    with pytest.raises(LdmExportError, match="does not exist"):
        parse_lora(str(tmp_path / "none.safetensors:0.5"))
    (tmp_path / "b.ckpt").write_bytes(b"x")
    with pytest.raises(LdmExportError, match="not .safetensors"):
        parse_lora(str(tmp_path / "b.ckpt"))


def test_bad_lora_files_name_the_first_mismatch(tmp_path):
    wrong_layer = [("lora_unet_down_blocks_3_attentions_0_transformer_blocks_0_attn1_to_q", "unet",
                    "down_blocks.3.attentions.0.transformer_blocks.0.attn1.to_q", 16, 16)]
    make_lora(tmp_path / "a.safetensors", "peft", layers=wrong_layer)
    with pytest.raises(LdmExportError, match=r"adapts 'unet\.down_blocks\.3\.attentions\.0.*which model 'tiny' does not have"):
        apply_loras(tiny_modules(), [LoraRef(tmp_path / "a.safetensors")], "tiny")
    wrong_shape = [(LAYERS[0][0], "unet", LAYERS[0][2], 320, 320)]  # an SD 1.5 LoRA on the tiny model
    make_lora(tmp_path / "b.safetensors", "kohya", layers=wrong_shape)
    with pytest.raises(LdmExportError, match=r"attn1\.to_q' has down \(4, 320\) and up \(320, 4\) but the layer maps 16 to 16"):
        apply_loras(tiny_modules(), [LoraRef(tmp_path / "b.safetensors")], "tiny")
    save_file({"transformer.blocks.0.lora_A.weight": torch.zeros(2, 2)}, str(tmp_path / "c.safetensors"))
    with pytest.raises(LdmExportError, match="is for no component of model 'tiny'"):
        apply_loras(tiny_modules(), [LoraRef(tmp_path / "c.safetensors")], "tiny")


def _initializers(bundle, component):
    m = json.loads((bundle / "ldm_export.json").read_text())
    model = onnx.load(str(bundle / m["components"][component]["files"][0]))
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}, m


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_lora_on_a_bundle_equals_a_fresh_export_with_lora(tmp_path, precision):
    path = tmp_path / "style.safetensors"
    make_lora(path, "kohya")
    plain = tmp_path / "plain"
    build(BuildConfig(model="tiny", precision=precision, random_weights=True, out=plain))
    fresh = tmp_path / "fresh"
    build(BuildConfig(model="tiny", precision=precision, random_weights=True, out=fresh, loras=(LoraRef(path, 0.8),)))
    patched = tmp_path / "patched"
    manifest = lora_bundle(plain, [LoraRef(path, 0.8)], patched)
    assert manifest["weights"]["loras"][0]["scale"] == 0.8
    from ldm_export.runtime.bundle import Bundle

    assert Bundle.open(patched, verify=True).check_hashes() == []
    for component in ("unet", "text_encoder"):
        a, m = _initializers(patched, component)
        b, _ = _initializers(fresh, component)
        base, _ = _initializers(plain, component)
        assert a.keys() == b.keys()
        changed = [k for k in a if not np.array_equal(a[k], base[k])]
        assert len(changed) == (3 if component == "unet" else 5)
        tol = 1e-6 if precision == "fp32" else 2e-3  # fp16: base rounded, then the delta added, then rounded again
        for k in a:
            np.testing.assert_allclose(a[k].astype(np.float32), b[k].astype(np.float32), atol=tol, rtol=tol, err_msg=k)
    # the same image from both bundles
    from ldm_export.runtime.pipeline import Pipeline

    images = [np.asarray(Pipeline.from_bundle(p)("a cat", num_inference_steps=3, seed=1)[0], dtype=np.float32)
              for p in (patched, fresh, plain)]
    assert np.abs(images[0] - images[1]).max() <= (1 if precision == "fp32" else 4)
    assert np.abs(images[0] - images[2]).max() > 4  # the LoRA changes the image


def test_lora_cli_refuses_to_overwrite_and_names_bad_input(tmp_path, tiny_bundle):
    path = tmp_path / "l.safetensors"
    make_lora(path, "peft")
    r = run_cli("lora", str(tiny_bundle), f"{path}:0.5", "--out", str(tiny_bundle))
    assert r.returncode == 2 and "must be a new folder" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("lora", str(tiny_bundle), str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "does not exist" in r.stderr and not (tmp_path / "x").exists()
    r = run_cli("lora", str(tiny_bundle), f"{path}:0.5", "--out", str(tmp_path / "new"))
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "new" / "ldm_export.json").read_text())["weights"]["loras"][0]["file"] == "l.safetensors"


def test_sdxl_lora_reaches_both_text_encoders_and_the_unet(tmp_path):
    from ldm_export.export.models import build_random
    from ldm_export.zoo import MODELS

    layers = [(f"lora_te{k}_text_model_encoder_layers_0_self_attn_{p}", f"text_encoder{'' if k == 1 else '_2'}",
               f"text_model.encoder.layers.0.self_attn.{p}", 32, 32)
              for k in (1, 2) for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
    # SDXL kohya files name UNet blocks the sgm way: input_blocks.4.1 is down_blocks.1.attentions.0 of tiny-sdxl
    layers.append(("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", "unet",
                   "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", 64, 64))
    path = tmp_path / "xl.safetensors"
    expected = make_lora(path, "kohya", layers=layers)
    modules = build_random(MODELS["tiny-sdxl"], 1)
    before = {c: {k: v.clone() for k, v in modules[c].state_dict().items()} for c in ("unet", "text_encoder", "text_encoder_2")}
    report = apply_loras(modules, [LoraRef(path, 1.0)], "tiny-sdxl")
    assert report[0]["layers"] == {"unet": 1, "text_encoder": 4, "text_encoder_2": 4}
    for (component, module), delta in expected.items():
        got = modules[component].state_dict()[f"{module}.weight"] - before[component][f"{module}.weight"]
        torch.testing.assert_close(got, delta, rtol=1e-5, atol=1e-6)
