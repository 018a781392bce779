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
    # kohya text-encoder LoRAs often adapt q, k, v and out together (diffusers infers its layout from out_proj: a file
    # without it is tested below)
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
    (tmp_path / "loras").mkdir()  # a folder exists: it was reported as missing
    with pytest.raises(LdmExportError, match="is a folder; pass FILE"):
        parse_lora(f"{tmp_path / 'loras'}:0.5")
    odd = tmp_path / "style.safetensors:0.5"  # a file whose name ends in ':NUMBER' is that file, at scale 1
    save_file({"x.lora_A.weight": torch.zeros(1)}, str(odd))
    assert parse_lora(str(odd)) == LoraRef(odd, 1.0) and parse_lora(f"{odd}:0.8") == LoraRef(odd, 0.8)


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
    save_file({"transformer.blocks.0.lora_A.weight": torch.zeros(2, 2), "transformer.blocks.0.lora_B.weight":
               torch.zeros(2, 2)}, str(tmp_path / "c.safetensors"))
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


def test_a_built_in_lora_and_a_later_negative_one_are_both_recorded_and_cancel(tmp_path, tiny_bundle):
    """`build --lora` records its LoRA where `lora` appends (weights.loras: inspect shows it; it was a top-level key
    that inspect left out); the same file at -0.8 on top undoes it."""
    path = tmp_path / "style.safetensors"
    make_lora(path, "kohya")
    fresh, undone = tmp_path / "fresh", tmp_path / "undone"
    build(BuildConfig(model="tiny", precision="fp32", random_weights=True, out=fresh, loras=(LoraRef(path, 0.8),)))
    r = run_cli("inspect", str(fresh), "--no-hashes")
    assert r.returncode == 0 and "style.safetensors" in r.stdout, r.stdout
    manifest = lora_bundle(fresh, [LoraRef(path, -0.8)], undone)
    assert [(x["file"], x["scale"]) for x in manifest["weights"]["loras"]] == [("style.safetensors", 0.8),
                                                                              ("style.safetensors", -0.8)]
    assert "loras" not in manifest
    # A1111's infotext names them as it does ("Lora hashes": the stem and the first 12 hex digits of the sha256 of the
    # tensor data after the safetensors header), so civitai and A1111 users see which LoRA made an image
    import hashlib

    from ldm_export.runtime import Pipeline

    data = path.read_bytes()
    short = hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]
    image = Pipeline.from_bundle(undone)("a cat", num_inference_steps=1, seed=0)[0]
    assert f'Lora hashes: "style: {short}, style: {short}"' in image.info["parameters"], image.info["parameters"]
    assert "Lora hashes" not in Pipeline.from_bundle(tiny_bundle)("a cat", num_inference_steps=1, seed=0)[0].info["parameters"]
    from ldm_export.runtime.pipeline import lora_hashes

    # A1111 drops ':' and ',' from names (its parser splits on them); a bundle recorded before the short hash (its
    # whole-file sha256 is another value) writes none rather than a wrong one
    assert lora_hashes({"weights": {"loras": [{"file": "style, v2: final.safetensors", "addnet_sha256": "ab" * 32}]}}) \
        == "style v2 final: " + "ab" * 6
    assert lora_hashes({"weights": {"loras": [{"file": "old.safetensors", "sha256": "cd" * 32}]}}) is None
    for component in ("unet", "text_encoder"):
        plain, _ = _initializers(tiny_bundle, component)
        styled, _ = _initializers(fresh, component)
        back, _ = _initializers(undone, component)
        assert max(float(np.abs(styled[k] - plain[k]).max()) for k in plain) > 1e-2
        assert max(float(np.abs(back[k] - plain[k]).max()) for k in plain) < 1e-5


def test_a1111_lora_tags_in_prompts_are_taken_out_and_the_infotext_names_the_fused_scales(tmp_path, tiny_bundle, caplog):
    """A1111 takes its extra-network tags (<lora:NAME:SCALE>) out of a prompt before encoding; here they were encoded
    as words, so a prompt pasted from A1111 drew another image. A fused LoRA's scale was written nowhere in the image:
    the infotext's prompt now carries its tag, as A1111's does, and reading it back draws the same image."""
    from ldm_export.runtime import Pipeline
    from ldm_export.runtime.pipeline import fused_loras, lora_prompt, strip_extra_networks

    path = tmp_path / "style.safetensors"
    make_lora(path, "kohya")
    styled = tmp_path / "styled"
    lora_bundle(tiny_bundle, [LoraRef(path, 0.7)], styled)
    pipe = Pipeline.from_bundle(styled)

    def draw(prompt, negative=None):
        image = pipe(prompt, negative_prompt=negative, num_inference_steps=2, seed=3)[0]
        return np.asarray(image), image.info["parameters"]

    plain, text = draw("a red circle")
    assert text.startswith("a red circle <lora:style:0.7>\n"), text
    caplog.clear()
    with caplog.at_level("WARNING"):
        same, again = draw("a red circle <lora:style:0.7>")  # the infotext's own prompt, pasted back
    assert np.array_equal(same, plain) and again == text and "ignored" not in caplog.text
    with caplog.at_level("WARNING"):
        other, text = draw("a red <lora:style:0.2>  circle <hypernet:x:1>", negative="<lora:neg:1> blurry")
    assert "prompt tags <lora:style:0.2> <hypernet:x:1> <lora:neg:1> ignored" in caplog.text, caplog.text
    assert "this bundle's LoRAs are fused into it (<lora:style:0.7>)" in caplog.text
    assert np.array_equal(other, draw("a red circle", negative="blurry")[0])
    # the parameters say what drew the image: the fused scale, not the tag's; tags that did not act left out
    assert text.startswith("a red circle <lora:style:0.7>\nNegative prompt: blurry\n"), text
    # a file fused twice adds up; A1111's other tag forms (te / unet multipliers) read as it reads them
    manifest = {"weights": {"loras": [{"file": "a, b.safetensors", "scale": 0.5}, {"file": "a, b.safetensors", "scale": 0.25}]}}
    assert fused_loras(manifest) == {"a b": 0.75}
    assert lora_prompt("x", manifest) == "x <lora:a b:0.75>" and lora_prompt("x <lora:a b:1>", manifest) == "x <lora:a b:0.75>"
    assert lora_prompt("x <lora:other:1> y", manifest, {"loras": [{"file": "c.safetensors", "scale": 2}]}) == \
        "x y <lora:a b:0.75> <lora:c:2>"  # a refiner's LoRAs after the base's
    assert strip_extra_networks(["x <lora:a b:0.75:0.75>", "<lora:a b:te=0.75:unet=0.75>y"], manifest) == ["x", "y"]
    assert lora_prompt("x", {"weights": {"loras": [{"file": "a.safetensors", "scale": 1}, {"file": "a.safetensors",
                                                                                        "scale": -1}]}}) == "x"


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



def test_lora_input_errors_are_one_line_and_say_what_is_wrong(tmp_path, caplog):
    from ldm_export.export.build import validate

    f = tmp_path / "a.safetensors"
    make_lora(f, "kohya")
    with pytest.raises(LdmExportError, match=r"LoRA scale 'abc' in .* is not a number"):  # not "does not exist"
        parse_lora(f"{f}:abc")
    with caplog.at_level("WARNING"):
        assert parse_lora(f"{f}:0").scale == 0
    assert "scale 0: it changes no weight" in caplog.text
    # files that are no kohya/PEFT LoRA are named for what they are, on one line (diffusers' own messages span lines)
    k = "lora_unet_mid_block_attentions_0_proj_in"
    for name, state, want in (
            ("alpha.safetensors", {f"{k}.alpha": torch.tensor(4.0)}, "diffusers cannot read its keys"),
            ("embedding.safetensors", {"emb_params": torch.zeros(2, 32)},
             r"holds no LoRA keys \(e\.g\. 'emb_params'\): it is not a LoRA"),
            ("loha.safetensors", {f"{k}.hada_w1_a": torch.zeros(16, 4), f"{k}.alpha": torch.tensor(4.0)},
             r"is a LyCORIS file \('lora_unet_mid_block_attentions_0_proj_in.hada_w1_a'"),
            ("lokr.safetensors", {f"{k}.lokr_w1": torch.zeros(4, 4)}, "is a LyCORIS file"),
            ("kohya_dora.safetensors", {f"{k}.lora_down.weight": torch.zeros(4, 16), f"{k}.lora_up.weight":
                                        torch.zeros(16, 4), f"{k}.dora_scale": torch.ones(1, 16)},
             r"is a DoRA in kohya's layout \('.*dora_scale'\), whose magnitudes diffusers' converter drops"),
            ("tucker.safetensors", {f"{k}.lora_down.weight": torch.zeros(4, 16, 1, 1), f"{k}.lora_up.weight":
                                    torch.zeros(16, 4, 1, 1), f"{k}.lora_mid.weight": torch.zeros(4, 4, 1, 1)},
             r"is a LyCORIS file \('.*lora_mid.weight': .*a LoCon with a Tucker core"),
            ("raw_peft.safetensors", {"base_model.model.mid_block.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 16),
                                      "base_model.model.mid_block.attentions.0.proj_in.lora_B.weight": torch.zeros(16, 4)},
             r"holds PEFT's raw keys \('base_model\.model\..*'\), .* rename the prefix 'base_model.model.' to 'unet.'")):
        save_file(state, str(tmp_path / name))
        with pytest.raises(LdmExportError, match=want) as e:
            apply_loras(tiny_modules(), [LoraRef(tmp_path / name)], "tiny")
        assert "\n" not in str(e.value)
    # a pickle renamed to .safetensors is named as one (never unpickled); a cut-off file is damaged, not a pickle
    pickled = tmp_path / "pickled.safetensors"
    torch.save({f"{k}.lora_down.weight": torch.zeros(4, 16)}, str(pickled))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(f.read_bytes()[:200])
    for path, want in ((pickled, r"is a pickle \(a \.pt/\.ckpt file renamed\), which ldm-export never unpickles"),
                       (cut, r"is not a readable safetensors file \(.*\): it is incomplete or damaged; download")):
        with pytest.raises(LdmExportError, match=want) as e:
            apply_loras(tiny_modules(), [LoraRef(path)], "tiny")
        assert "\n" not in str(e.value)
    # a safetensors file is told by its content, whatever its name
    named = tmp_path / "v1.0:final"
    named.write_bytes(f.read_bytes())
    assert parse_lora(str(named)) == LoraRef(named, 1.0) and parse_lora(f"{named}:0.5") == LoraRef(named, 0.5)
    # DiT models: refused before any work, not "diffusers cannot read its keys ('unet')"
    with pytest.raises(LdmExportError, match="model 'tiny-sd3' has no UNet"):
        validate(BuildConfig(model="tiny-sd3", random_weights=True, loras=(LoraRef(f),), out=tmp_path / "b"))


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


# ------------------------------------------------------------------------------------------ cuda-target bundles
# (module path, is a conv) adapted in the cuda-target tests: every LoRA target kind, each behind a fused kernel
# where the cuda target has one: q/k/v feed MultiHeadAttention, to_out's bias moves into SkipLayerNormalization,
# ff.net.0.proj feeds BiasSplitGelu, the convs sit between (Skip)GroupNorms
CUDA_TARGETS = {
    "unet": [f"down_blocks.0.attentions.0.transformer_blocks.0.{p}" for p in
             ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
              "ff.net.0.proj", "ff.net.2")]
            + ["down_blocks.0.attentions.0.proj_in", "down_blocks.0.attentions.0.proj_out", "down_blocks.0.resnets.0.conv1",
               "down_blocks.0.resnets.0.time_emb_proj", "mid_block.attentions.0.transformer_blocks.0.attn1.to_v",
               "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj"],
    "text_encoder": ["text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.0.self_attn.v_proj",
                     "text_model.encoder.layers.1.mlp.fc1"],
}


def make_peft_lora(path, targets=CUDA_TARGETS, rank=4, seed=1):
    """A diffusers/PEFT LoRA over ``targets`` of the tiny model, linear and conv layers (conv: k x k down, 1 x 1 up)."""
    g = torch.Generator().manual_seed(seed)
    modules, state = tiny_modules(), {}
    for component, paths in targets.items():
        layers = dict(modules[component].named_modules())
        for p in paths:
            w = layers[p].weight
            state[f"{component}.{p}.lora_A.weight"] = torch.randn(rank, *w.shape[1:], generator=g) * 0.2
            state[f"{component}.{p}.lora_B.weight"] = torch.randn(w.shape[0], rank, *([1] * (w.ndim - 2)), generator=g) * 0.2
    save_file(state, str(path))


def _toposorted(model):
    """The graph in topological order (onnx's reference evaluator runs nodes as listed; the fp16 converter appends
    its Casts at the end)."""
    from onnxruntime.transformers.onnx_model import OnnxModel

    OnnxModel(model).topological_sort()
    return model


def _unet_on_reference(bundle, feeds):
    """The bundle's UNet on onnx's reference evaluator, the fused contrib ops on their numpy references
    (ONNX Runtime's CPU provider has no GroupNorm, SkipGroupNorm or BiasSplitGelu kernel)."""
    from contrib_ref import run_reference

    m = json.loads((bundle / "ldm_export.json").read_text())
    model = _toposorted(onnx.load(str(bundle / m["components"]["unet"]["files"][0])))
    typed = {t["name"]: feeds[t["name"]].astype(t["dtype"]) for t in m["components"]["unet"]["spec"]["inputs"]}
    return run_reference(model, typed)[0].astype(np.float32)


def pack_self_attention_qkv(model) -> int:
    """Test-only graph pass: each self-attention's q/k/v MatMuls become one MatMul over a packed (C, 3C) weight in
    ONNX Runtime's packed-QKV layout (interleaved per head: (C, N, 3, H)), then Reshape -> Split -> Reshape back.
    The LoRA path must find each weight as a slice of the packed initializer."""
    from onnx import helper

    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    inits = {i.name: i for i in g.initializer}
    dead, packed = set(), 0
    for mha in [n for n in g.node if n.op_type == "MultiHeadAttention"]:
        mms = [producer.get(x) for x in mha.input[:3]]
        if any(m is None or m.op_type != "MatMul" or m.input[1] not in inits for m in mms) or \
                len({m.input[0] for m in mms}) != 1:  # cross-attention: k and v come from the text
            continue
        heads = next(a.i for a in mha.attribute if a.name == "num_heads")
        ws = [numpy_helper.to_array(inits[m.input[1]]) for m in mms]  # each (C, D) = W.T
        c, d = ws[0].shape
        w = np.stack([x.reshape(c, heads, d // heads) for x in ws], axis=2).reshape(c, 3 * d)
        base = f"packed_qkv_{packed}"
        g.initializer.extend([numpy_helper.from_array(w, base + "_w"),
                              numpy_helper.from_array(np.array([0, 0, heads, 3, d // heads], np.int64), base + "_s5"),
                              numpy_helper.from_array(np.array([0, 0, d], np.int64), base + "_s3"),
                              numpy_helper.from_array(np.array([1, 1, 1], np.int64), base + "_split")])
        g.node.extend([helper.make_node("MatMul", [mms[0].input[0], base + "_w"], [base + "_y"], name=base + "_mm"),
                       helper.make_node("Reshape", [base + "_y", base + "_s5"], [base + "_y5"], name=base + "_r5"),
                       helper.make_node("Split", [base + "_y5", base + "_split"], [base + f"_{k}" for k in "qkv"],
                                        axis=3, name=base + "_split"),
                       *[helper.make_node("Reshape", [base + f"_{k}", base + "_s3"], [m.output[0]], name=base + f"_r{k}")
                         for k, m in zip("qkv", mms)]])
        dead.update(id(m) for m in mms)
        for m in mms:
            g.initializer.remove(inits[m.input[1]])
        packed += 1
    keep = [n for n in g.node if id(n) not in dead]
    del g.node[:]
    g.node.extend(keep)
    return packed


@pytest.fixture
def cuda_target_builds(monkeypatch):
    """``build --target cuda`` on this CPU: the build verifies cuda-target graphs on the CUDA provider, absent
    here, so that verification runs on onnx's reference evaluator with the contrib ops' numpy references (the same
    check, another runner); GEGLU is fused at the tiny model's widths too (ONNX Runtime's kernel takes SD's only),
    so BiasSplitGelu is in the graph."""
    import functools

    from contrib_ref import run_reference

    from ldm_export.export import onnx_export as X
    from ldm_export.kernels import geglu

    cpu_verify = X.verify

    def verify(path, spec, feeds, reference, precision, threads=None, provider="cpu"):
        if provider != "cuda":
            return cpu_verify(path, spec, feeds, reference, precision, threads, provider)
        outs = run_reference(_toposorted(onnx.load(str(path))), {t.name: feeds[t.name].astype(t.dtype) for t in spec.inputs})
        results = {n: X.compare(n, o, r) for n, o, r in zip(spec.output_names, outs, reference)}
        thr = X.COSINE_THRESHOLD[precision]
        return X.Verification(spec.name, precision, "onnx reference evaluator", results, thr,
                              all(v["cosine"] >= thr for v in results.values()))

    monkeypatch.setattr(X, "verify", verify)
    monkeypatch.setattr(X, "check_verify_provider", lambda provider: None)  # verify above needs no CUDA provider
    monkeypatch.setattr(geglu, "install", functools.partial(geglu.install, widths=(128, 256)))


@pytest.mark.parametrize("precision,packed", [("fp32", False), ("fp16", False), ("fp16", True)],
                         ids=["fp32", "fp16", "fp16-packed-qkv"])
def test_lora_on_a_cuda_bundle_equals_a_fresh_cuda_export(tmp_path, cuda_target_builds, monkeypatch, precision, packed):
    """``lora`` on a --target cuda bundle (fused attention, GroupNorm, BiasSplitGelu, residual folds; with packed
    q/k/v weights too) gives the initializers of a fresh cuda-target export with --lora. ONNX Runtime's CPU provider
    cannot run these graphs, so the comparison is per initializer (max abs difference) plus the UNet's output on
    onnx's reference evaluator."""
    from ldm_export import kernels

    if packed:
        rewrite = kernels.rewrite

        def rewrite_and_pack(model, component, target, batch=None):
            model = rewrite(model, component, target, batch)
            if component == "unet":
                assert pack_self_attention_qkv(model) == 4  # the tiny UNet's four self-attentions
            return model

        monkeypatch.setattr(kernels, "rewrite", rewrite_and_pack)
    path = tmp_path / "cuda.safetensors"
    make_peft_lora(path)
    kw = dict(model="tiny", precision=precision, random_weights=True, target="cuda", static_shape=True)
    plain, fresh, patched = tmp_path / "plain", tmp_path / "fresh", tmp_path / "patched"
    build(BuildConfig(out=plain, **kw))
    build(BuildConfig(out=fresh, loras=(LoraRef(path, 0.8),), **kw))
    lora_bundle(plain, [LoraRef(path, 0.8)], patched)

    m = json.loads((plain / "ldm_export.json").read_text())
    assert m["target"] == "cuda"
    fused = " ".join(m["components"]["unet"]["kernels"])
    for op in ("MultiHeadAttention", "BiasSplitGelu", "SkipLayerNormalization", "SkipGroupNorm"):
        assert op in fused
    mapping = m["components"]["unet"]["initializers"]
    slices = [k for k, v in mapping.items() if "view" in v]
    assert len(slices) == (12 if packed else 0)  # q, k and v of four self-attentions, each a slice
    tol = 1e-6 if precision == "fp32" else 2e-3  # fp16: base rounded, then the delta added, then rounded again
    for component in ("unet", "text_encoder"):
        a, _ = _initializers(patched, component)
        b, _ = _initializers(fresh, component)
        base, _ = _initializers(plain, component)
        assert a.keys() == b.keys()
        changed = sorted(k for k in a if not np.array_equal(a[k], base[k]))
        assert changed == sorted(k for k in b if not np.array_equal(b[k], base[k]))
        # with packed q/k/v, three adapted weights (attn1.to_q/k/v) share one initializer
        n = len(CUDA_TARGETS[component]) - (2 if packed and component == "unet" else 0)
        assert len(changed) == n
        worst = {k: float(np.abs(a[k].astype(np.float32) - b[k].astype(np.float32)).max()) for k in a}
        assert max(worst.values()) <= tol, max(worst.items(), key=lambda kv: kv[1])
    # and the UNet computes the same, with the LoRA's effect clearly larger than the difference
    from ldm_export.export import onnx_export as X
    from ldm_export.export.build import static_dims

    spec = TINY.component_specs()["unet"]
    feeds = X.sample_inputs(spec, static_dims(TINY, "unet"))
    out = {p.name: _unet_on_reference(p, feeds) for p in (patched, fresh, plain)}
    diff = np.abs(out["patched"] - out["fresh"]).max()
    effect = np.abs(out["patched"] - out["plain"]).max()
    assert diff <= (1e-5 if precision == "fp32" else 2e-2) * np.abs(out["fresh"]).max() and effect > 20 * diff, (diff, effect)


def test_packed_initializers_take_each_weights_delta_in_its_slice():
    """initializer_map finds linear weights inside packed initializers (per-head interleaved q/k/v, contiguous k/v
    blocks, blocks along the first axis), and add_delta writes each delta into its own slice: the packed graph run
    by ONNX Runtime gives x @ (W + dW).T for every piece."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from ldm_export.export.lora import add_delta, initializer_map

    unet = tiny_modules()["unet"]
    layers = dict(unet.named_modules())
    blk, mid = "down_blocks.0.attentions.0.transformer_blocks.0", "mid_block.attentions.0.transformer_blocks.0"
    names = {"q": f"{blk}.attn1.to_q", "k": f"{blk}.attn1.to_k", "v": f"{blk}.attn1.to_v",
             "k2": f"{blk}.attn2.to_k", "v2": f"{blk}.attn2.to_v", "k3": f"{mid}.attn2.to_k", "v3": f"{mid}.attn2.to_v"}
    wt = {n: layers[p].weight.detach().numpy().T.copy() for n, p in names.items()}  # (in, out), as MatMul holds it
    heads = layers[f"{blk}.attn1"].heads
    c = wt["q"].shape[0]
    packs = {
        "qkv": np.stack([wt[n].reshape(c, heads, -1) for n in "qkv"], axis=2).reshape(c, -1),  # (C, N, 3, H)
        "kv": np.concatenate([wt["k2"], wt["v2"]], axis=1),  # (Ctext, 2C): two blocks
        "kv_rows": np.concatenate([wt["k3"].T, wt["v3"].T], axis=0),  # (2C, Ctext): W itself, blocks on axis 0 (Gemm)
    }
    t_dim = packs["kv"].shape[0]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "qkv"], ["y_qkv"]), helper.make_node("MatMul", ["t", "kv"], ["y_kv"]),
         helper.make_node("Gemm", ["t", "kv_rows"], ["y_rows"], transB=1)], "packed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, c]),
         helper.make_tensor_value_info("t", TensorProto.FLOAT, [2, t_dim])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y_qkv", "y_kv", "y_rows")],
        [numpy_helper.from_array(a, n) for n, a in packs.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    mapping = initializer_map(unet, model)
    where = {n: mapping[f"{p}.weight"] for n, p in names.items()}
    assert {n: (w["initializer"], w["index"], w["transposed"]) for n, w in where.items()} == {
        "q": ("qkv", 0, True), "k": ("qkv", 1, True), "v": ("qkv", 2, True), "k2": ("kv", 0, True),
        "v2": ("kv", 1, True), "k3": ("kv_rows", 0, False), "v3": ("kv_rows", 1, False)}
    assert where["q"]["view"] == [c, heads, 3, c // heads] and where["k2"]["view"][1] == 1  # interleaved; blocks

    rng = np.random.default_rng(0)
    deltas = {n: rng.normal(size=wt[n].T.shape).astype(np.float32) for n in wt}  # torch layout (out, in)
    new = {k: v.copy() for k, v in packs.items()}
    for n, w in where.items():
        new[w["initializer"]] = add_delta(new[w["initializer"]], deltas[n], w)
    for i in model.graph.initializer:  # make_model copied the graph
        i.CopyFrom(numpy_helper.from_array(new[i.name], i.name))
    x = rng.normal(size=(2, c)).astype(np.float32)
    t = rng.normal(size=(2, t_dim)).astype(np.float32)
    y_qkv, y_kv, y_rows = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x, "t": t})
    got = {n: y_qkv.reshape(2, heads, 3, -1)[:, :, j].reshape(2, -1) for j, n in enumerate("qkv")}
    got |= dict(zip(("k2", "v2"), np.split(y_kv, 2, axis=1))) | dict(zip(("k3", "v3"), np.split(y_rows, 2, axis=1)))
    for n in names:
        np.testing.assert_allclose(got[n], (x if n in "qkv" else t) @ (wt[n] + deltas[n].T), rtol=1e-4, atol=1e-4,
                                   err_msg=n)
        assert np.abs(got[n] - (x if n in "qkv" else t) @ wt[n]).max() > 0.1  # the delta is there


def test_lora_names_a_weight_the_bundle_holds_in_no_initializer(tmp_path, tiny_bundle):
    """A weight the build-time map does not place (equal weights, or a layout it does not know): a one-line error
    naming it, and no new bundle."""
    import shutil

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    m = json.loads((bundle / "ldm_export.json").read_text())
    param = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    del m["components"]["unet"]["initializers"][param]
    (bundle / "ldm_export.json").write_text(json.dumps(m))
    path = tmp_path / "l.safetensors"
    make_lora(path, "peft")
    r = run_cli("lora", str(bundle), str(path), "--out", str(tmp_path / "new"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and not (tmp_path / "new").exists()
    line = r.stderr.strip()
    assert "\n" not in line and f"unet.{param}" in line and "build with --lora" in line


def test_bench_of_a_lora_bundle_runs_pytorch_with_the_same_loras(tmp_path, tiny_bundle):
    """A bundle keeps its LoRAs' names, not their files: the PyTorch backends and the fidelity reference ran the
    weights without them (without a word), so the bundle's images 'disagreed' with PyTorch."""
    path = tmp_path / "l.safetensors"
    make_lora(path, "peft")
    patched = tmp_path / "patched"
    assert run_cli("lora", str(tiny_bundle), f"{path}:0.8", "--out", str(patched)).returncode == 0
    args = ("bench", "--bundle", str(patched), "--device", "cpu", "--backends", "ort", "--steps", "2", "--repeats", "1",
            "--e2e-repeats", "1", "--warmup", "0", "--threads", "1")
    r = run_cli(*args, "--out", str(tmp_path / "without"))
    assert r.returncode == 0 and "holds LoRAs (l.safetensors x0.8)" in r.stderr, r.stderr
    without = json.loads((tmp_path / "without" / "bench_tiny_cpu.json").read_text())
    assert any("l.safetensors x0.8" in n for n in without["notes"])
    r = run_cli(*args, "--lora", f"{path}:0.8", "--out", str(tmp_path / "with"))
    assert r.returncode == 0 and "holds LoRAs" not in r.stderr, r.stderr
    with_ = json.loads((tmp_path / "with" / "bench_tiny_cpu.json").read_text())
    assert with_["backends"]["ort"]["fidelity"]["psnr_db"] > 60 > without["backends"]["ort"]["fidelity"]["psnr_db"]
    assert not any("LoRA" in n for n in with_["notes"])
    for bad, why in (((f"{path}:0.5",), "are not the LoRAs bundle"), ((f"{path}:0.8", f"{path}:0.8"), "are not the LoRAs")):
        r = run_cli(*args, *[x for b in bad for x in ("--lora", b)], "--out", str(tmp_path / "bad"))
        assert r.returncode == 2 and why in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = run_cli(*args[:2], str(tiny_bundle), *args[3:], "--lora", str(path), "--out", str(tmp_path / "plain"))
    assert r.returncode == 2 and "holds no LoRA" in r.stderr, r.stderr


@pytest.mark.parametrize("damage,match", [
    ("rank", r"has down \(4, \d+\) and up \(\d+, 8\); a Linear takes 2-D down and up matrices of one rank"),
    ("3d", r"has down \(4, \d+, 1\) and up .* a Linear takes 2-D down and up matrices"),
    ("inf", r"tensor '.*lora_up.weight' holds NaN or infinite values; the file is damaged"),
    ("nan-alpha", r"tensor '.*\.alpha' holds NaN or infinite values"),
    ("no-up", r"'.*\.lora_down\.weight' has no up matrix \('.*\.lora_up\.weight'\); the file is incomplete"),
    ("no-down", r"'.*\.lora_up\.weight' has no down matrix"),
    ("peft-no-A", r"'.*\.lora_B\.weight' has no down matrix \('.*\.lora_A\.weight'\)"),
])
def test_damaged_lora_files_are_named_on_one_line(tmp_path, damage, match):
    """Each of these was a traceback from PEFT's loader, a misleading "not a kohya LoRA", or (non-finite values) a
    bundle that made NaN images."""
    from safetensors.torch import load_file

    path = tmp_path / "l.safetensors"
    make_lora(path, "peft" if damage == "peft-no-A" else "kohya")
    state = load_file(str(path))
    key = sorted(k for k in state if k.endswith(("lora_up.weight", "lora_B.weight")))[0]
    down = key.replace("lora_up", "lora_down").replace("lora_B", "lora_A")
    if damage == "rank":
        state[key] = torch.zeros(state[key].shape[0], 8)
    elif damage == "3d":
        state[down] = state[down][..., None]
    elif damage == "inf":
        state[key][0, 0] = float("inf")
    elif damage == "nan-alpha":
        state[key.replace(".lora_up.weight", ".alpha")] = torch.tensor(float("nan"))
    elif damage == "no-up":
        del state[key]
    else:
        del state[down]
    save_file(state, str(path))
    with pytest.raises(LdmExportError, match=match) as e:
        apply_loras(tiny_modules(), [LoraRef(path)], "tiny")
    assert "\n" not in str(e.value)


def test_lora_and_quantize_refuse_an_out_that_holds_or_lies_in_the_source_bundle(tmp_path, tiny_bundle):
    """`lora SRC --out PARENT_OF_SRC --force` deleted the source bundle; --out inside it wrote into it."""
    import shutil

    src = tmp_path / "nest" / "src"
    shutil.copytree(tiny_bundle, src)
    path = tmp_path / "l.safetensors"
    make_lora(path, "peft")
    for out in (tmp_path / "nest", src / "sub"):
        r = run_cli("lora", str(src), str(path), "--out", str(out), "--force")
        assert r.returncode == 2 and "is the bundle being read, holds it or lies inside it" in r.stderr, r.stderr
        assert (src / "ldm_export.json").is_file() and not (src / "sub").exists()
    r = run_cli("quantize", str(src), "--out", str(tmp_path / "nest"), "--force")
    assert r.returncode == 2 and "is the bundle being read, holds it or lies inside it" in r.stderr, r.stderr
    assert (src / "ldm_export.json").is_file()


def test_diffusers_attention_processor_lora_files_still_fuse(tmp_path):
    """diffusers' older layouts (save_attn_procs: '...processor.to_q_lora.down.weight') are LoRAs its converter reads;
    the check for LoRA keys must not call them "not a LoRA"."""
    _, _, module, fan_in, fan_out = LAYERS[0]
    proc = module.replace(".attn1.to_q", ".attn1.processor.to_q_lora")
    g = torch.Generator().manual_seed(5)
    down, up = torch.randn(4, fan_in, generator=g) * 0.2, torch.randn(fan_out, 4, generator=g) * 0.2
    path = tmp_path / "procs.safetensors"
    save_file({f"unet.{proc}.down.weight": down, f"unet.{proc}.up.weight": up}, str(path))
    modules = tiny_modules()
    before = modules["unet"].state_dict()[f"{module}.weight"].clone()
    apply_loras(modules, [LoraRef(path)], "tiny")
    torch.testing.assert_close(modules["unet"].state_dict()[f"{module}.weight"] - before, up @ down, rtol=1e-5, atol=1e-6)


def test_dora_fuses_at_build_and_is_refused_by_the_bundle_patch(tmp_path, tiny_bundle):
    """A DoRA's merge rescales each weight column by its own norm: `ldm-export lora` (a delta added to the built
    weights, computed on a zero-weight copy) gave other weights than `build --lora`, silently. It is refused there;
    at build time PEFT merges it, and each adapted weight's per-output-row norms are the magnitudes."""
    g = torch.Generator().manual_seed(3)
    _, _, module, fan_in, fan_out = LAYERS[0]
    state = {f"unet.{module}.lora_A.weight": torch.randn(4, fan_in, generator=g) * 0.3,
             f"unet.{module}.lora_B.weight": torch.randn(fan_out, 4, generator=g) * 0.3,
             f"unet.{module}.lora_magnitude_vector": torch.full((fan_out,), 3.0)}
    path = tmp_path / "dora.safetensors"
    save_file(state, str(path))
    modules = tiny_modules()
    apply_loras(modules, [LoraRef(path)], "tiny")
    w = modules["unet"].state_dict()[f"{module}.weight"]
    torch.testing.assert_close(w.norm(dim=1), torch.full((fan_out,), 3.0), rtol=1e-5, atol=1e-5)
    r = run_cli("lora", str(tiny_bundle), f"{path}:0.8", "--out", str(tmp_path / "patched"))
    assert r.returncode == 2 and "is a DoRA ('unet." in r.stderr and "build with `ldm-export build ... --lora" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "patched").exists()
    # a magnitude of another shape failed inside PEFT's loader with a traceback: one line now
    save_file({**state, f"unet.{module}.lora_magnitude_vector": torch.ones(fan_out + 1)}, str(path))
    with pytest.raises(LdmExportError, match="does not load into model 'tiny'") as e:
        apply_loras(tiny_modules(), [LoraRef(path)], "tiny")
    assert "\n" not in str(e.value)


def test_lora_that_overflows_the_bundles_dtype_is_refused_and_writes_nothing(tmp_path):
    """A scale that pushes fp16 weights past 65504 is refused on one line, naming the LoRA and its scale, before
    anything is written (before: a bundle that could not run, reported with a tick)."""
    from ldm_export.export.build import BuildConfig, build

    build(BuildConfig(model="tiny", random_weights=True, precision="fp16", out=tmp_path / "fp16"))
    path = tmp_path / "big.safetensors"
    make_lora(path, "peft")
    r = run_cli("lora", str(tmp_path / "fp16"), f"{path}:1e6", "--out", str(tmp_path / "new"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "RuntimeWarning" not in r.stderr, r.stderr
    assert "big.safetensors x1e+06" in r.stderr and "past float16's range" in r.stderr and "lower the scale" in r.stderr
    assert "patch an fp32 bundle" in r.stderr
    assert not (tmp_path / "new").exists()
    # an fp32 bundle: lowering the scale is the one fix, so no other is offered
    build(BuildConfig(model="tiny", random_weights=True, precision="fp32", out=tmp_path / "fp32"))
    r = run_cli("lora", str(tmp_path / "fp32"), f"{path}:1e40", "--out", str(tmp_path / "new"))
    assert r.returncode == 2 and "past float32's range; lower the scale" in r.stderr, r.stderr
    assert "patch an fp32 bundle" not in r.stderr and not (tmp_path / "new").exists()


def test_kohya_text_encoder_lora_of_q_and_v_alone_fuses(tmp_path):
    """A kohya text-encoder LoRA adapting q and v but not out_proj (A1111 reads it) was refused: diffusers tells its
    old layout by an out_proj key. The deltas are the closed form's."""
    layers = [(f"lora_te_text_model_encoder_layers_0_self_attn_{p}", "text_encoder",
               f"text_model.encoder.layers.0.self_attn.{p}", 32, 32) for p in ("q_proj", "v_proj")]
    path = tmp_path / "qv.safetensors"
    expected = make_lora(path, "kohya", layers=layers)
    base = tiny_modules()
    before = {k: v.clone() for k, v in base["text_encoder"].state_dict().items()}
    report = apply_loras(base, [LoraRef(path, 1.0)], "tiny")
    assert report[0]["layers"]["text_encoder"] == 2 and not report[0]["layers"].get("unet")
    for (component, module), delta in expected.items():
        got = base[component].state_dict()[f"{module}.weight"] - before[f"{module}.weight"]
        torch.testing.assert_close(got, delta, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["kohya", "peft"])
def test_a_text_encoder_lora_of_the_mlp_alone_fuses(tmp_path, layout):
    """A LoRA adapting the text encoder's fc1/fc2 and no attention layer was refused as damaged: diffusers' loader
    renames only q/k/v/out_proj between PEFT's layout and its own, then could not infer the keys' type (diffusers'
    own loader fails on the PEFT file too). The deltas are the closed form's."""
    layers = [LAYERS[0], ("lora_te_text_model_encoder_layers_1_mlp_fc1", "text_encoder",
                          "text_model.encoder.layers.1.mlp.fc1", 32, 64),
              ("lora_te_text_model_encoder_layers_0_mlp_fc2", "text_encoder", "text_model.encoder.layers.0.mlp.fc2", 64, 32)]
    path = tmp_path / "mlp.safetensors"
    expected = make_lora(path, layout, layers=layers)
    base = tiny_modules()
    before = {c: {k: v.clone() for k, v in base[c].state_dict().items()} for c in ("unet", "text_encoder")}
    report = apply_loras(base, [LoraRef(path, 0.5)], "tiny")
    assert report[0]["layers"] == {"unet": 1, "text_encoder": 2}
    for (component, module), delta in expected.items():
        got = base[component].state_dict()[f"{module}.weight"] - before[component][f"{module}.weight"]
        torch.testing.assert_close(got, 0.5 * delta, rtol=1e-5, atol=1e-6)


def test_kohya_layers_without_an_alpha_have_scale_one_beside_layers_with_one(tmp_path):
    """A kohya file whose layers carry .alpha except some (merged or converted files): A1111 and kohya's scripts
    scale a layer without alpha by 1 (alpha = rank); diffusers gave it the file's most common alpha (here 1 / 4)."""
    from safetensors.torch import load_file

    with_alpha, without = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    expected = make_lora(with_alpha, "kohya", rank=4, alpha=1.0, layers=LAYERS[:2])
    plain = make_lora(without, "kohya", rank=2, alpha=2.0, seed=1, layers=LAYERS[2:3] + LAYERS[-1:])
    state = load_file(str(with_alpha)) | {k: v for k, v in load_file(str(without)).items() if not k.endswith(".alpha")}
    mixed = tmp_path / "mixed.safetensors"
    save_file(state, str(mixed))
    base = tiny_modules()
    before = {c: {k: v.clone() for k, v in base[c].state_dict().items()} for c in ("unet", "text_encoder")}
    apply_loras(base, [LoraRef(mixed)], "tiny")
    for (component, module), delta in (expected | plain).items():  # alpha 2 / rank 2: scale 1, as for no alpha
        got = base[component].state_dict()[f"{module}.weight"] - before[component][f"{module}.weight"]
        torch.testing.assert_close(got, delta, rtol=1e-5, atol=1e-6)


def test_a_peft_files_adapter_metadata_sets_its_alpha_as_diffusers_reads_it(tmp_path):
    """diffusers' save_lora_weights keeps each adapter's LoraConfig in the header (lora_adapter_metadata: r,
    lora_alpha, alpha_pattern, ...); diffusers scales by lora_alpha / r from it, and so must the fuse."""
    import json

    from safetensors.torch import load_file

    plain = tmp_path / "plain.safetensors"
    expected = make_lora(plain, "peft")
    unet_layers = [m for (c, m) in expected if c == "unet"]
    meta = {"unet.r": 4, "unet.lora_alpha": 16, "unet.target_modules": ["to_q", "to_k", "net.2"], "unet.rank_pattern": {},
            "unet.alpha_pattern": {unet_layers[-1]: 2},  # one layer's own alpha: 2 / 4
            "text_encoder.r": 4, "text_encoder.lora_alpha": 8, "text_encoder.target_modules": ["q_proj", "k_proj",
                                                                                                 "v_proj", "out_proj", "fc1"]}
    # (text_encoder's rank_pattern and alpha_pattern left out: LoraConfig's defaults, {})
    with_meta = tmp_path / "meta.safetensors"
    save_file(load_file(str(plain)), str(with_meta), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})
    base = tiny_modules()
    before = {c: {k: v.clone() for k, v in base[c].state_dict().items()} for c in ("unet", "text_encoder")}
    apply_loras(base, [LoraRef(with_meta, 0.5)], "tiny")
    for (component, module), delta in expected.items():
        factor = {"unet": 16 / 4, "text_encoder": 8 / 4}[component] if module != unet_layers[-1] else 2 / 4
        got = base[component].state_dict()[f"{module}.weight"] - before[component][f"{module}.weight"]
        torch.testing.assert_close(got, 0.5 * factor * delta, rtol=1e-5, atol=1e-6)
    # diffusers' own pipeline loader reads the same file the same way (its alpha / rank from the header)
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    _, _, read = StableDiffusionLoraLoaderMixin.lora_state_dict(str(tmp_path), weight_name=with_meta.name,
                                                                return_lora_metadata=True)
    assert read["unet.lora_alpha"] == 16 and read["text_encoder.lora_alpha"] == 8


def test_a_lora_diffusers_saved_with_its_adapter_config_fuses_as_diffusers_fuses_it(tmp_path):
    """A LoRA trained with PEFT (lora_alpha 16 over rank 4, one layer's own alpha by alpha_pattern) and saved by
    diffusers' save_lora_weights with its adapter metadata: the weights fused at build equal diffusers'
    load_lora_weights + fuse_lora on the same modules."""
    import diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from ldm_export.runtime.tokenizer import write_tokenizer_files

    trained = tiny_modules()
    unet_config = LoraConfig(r=4, lora_alpha=16, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                             alpha_pattern={"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": 2},
                             init_lora_weights=False)
    te_config = LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(0)
    trained["unet"].add_adapter(unet_config)
    trained["text_encoder"].add_adapter(te_config)
    diffusers.StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(trained["unet"]),
        text_encoder_lora_layers=get_peft_model_state_dict(trained["text_encoder"]),
        unet_lora_adapter_metadata=unet_config.to_dict(), text_encoder_lora_adapter_metadata=te_config.to_dict(),
        weight_name="trained.safetensors")
    ours = tiny_modules()
    apply_loras(ours, [LoraRef(tmp_path / "trained.safetensors", 0.5)], "tiny")
    m = tiny_modules()
    pipe = diffusers.StableDiffusionPipeline(
        vae=m["vae"], text_encoder=m["text_encoder"], unet=m["unet"], scheduler=diffusers.PNDMScheduler(),
        tokenizer=__import__("transformers").CLIPTokenizer.from_pretrained(str(write_tokenizer_files(tmp_path / "tok"))),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(tmp_path), weight_name="trained.safetensors")
    pipe.fuse_lora(lora_scale=0.5)
    pipe.unload_lora_weights()
    plain = tiny_modules()
    for name in ("unet", "text_encoder"):
        want, got, base = pipe.components[name].state_dict(), ours[name].state_dict(), plain[name].state_dict()
        changed = [k for k in base if not torch.equal(want[k], base[k])]
        assert changed and [k for k in base if not torch.equal(got[k], base[k])] == changed, name
        for k in changed:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
