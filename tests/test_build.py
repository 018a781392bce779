"""The build: bundle layout, manifest, verification, fp16 policy, atomicity and every bad input."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import run_cli

torch = pytest.importorskip("torch")

from ldm_export.export import onnx_export  # noqa: E402
from ldm_export.export.build import BuildConfig, build  # noqa: E402
from ldm_export.runtime.bundle import Bundle  # noqa: E402
from ldm_export.runtime.errors import LdmExportError  # noqa: E402
from ldm_export.runtime.pipeline import Pipeline  # noqa: E402
from ldm_export.zoo import MODELS, SD15, SD15_INPAINT, SD21  # noqa: E402

OPTIMUM_FILES = ["model_index.json", "scheduler/scheduler_config.json", "text_encoder/model.onnx", "text_encoder/config.json",
                 "unet/model.onnx", "unet/config.json", "vae_decoder/model.onnx", "vae_decoder/config.json",
                 "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/tokenizer_config.json",
                 "tokenizer/special_tokens_map.json", "ldm_export.json"]


def no_leftovers(parent: Path, name: str) -> bool:
    return not (parent / name).exists() and not list(parent.glob(f".{name}.*"))


@pytest.mark.parametrize("spec", [SD15, SD21, SD15_INPAINT], ids=lambda s: s.name)
def test_zoo_reproduces_published_parameter_counts(spec):
    from ldm_export.export import models as M

    with torch.device("meta"):
        counts = {"text_encoder": M.build_text_encoder(spec), "unet": M.build_unet(spec), "vae": M.build_vae(spec)}
    got = {k: round(M.count_params(v) / 1e6, 1) for k, v in counts.items()}
    assert got == spec.params_m


def test_bundle_layout_and_manifest(tiny_bundle):
    for rel in OPTIMUM_FILES:
        assert (tiny_bundle / rel).is_file(), rel
    m = json.loads((tiny_bundle / "ldm_export.json").read_text())
    assert m["format_version"] == 1 and m["model"]["name"] == "tiny" and m["weights"]["source"] == "random"
    assert m["model"]["modules"]["unet"]["cross_attention_dim"] == 32 and m["model"]["modules"]["text_encoder"]["hidden_size"] == 32
    assert m["model"]["modules"]["vae"]["latent_channels"] == 4
    assert set(m["components"]) == {"text_encoder", "unet", "vae_decoder"}
    for comp, info in m["components"].items():
        ver = info["verification"]["fp32"]
        assert ver["passed"] and ver["cosine_threshold"] == 0.99999
        for out in ver["outputs"].values():
            assert out["cosine"] >= 0.99999 and out["max_abs"] < 1e-3
    assert {"torch", "onnx", "onnxruntime", "diffusers", "transformers", "ldm_export"} <= set(m["tools"])
    # every file is listed with its hash, and the manifest hashes match
    listed = set(m["files"])
    on_disk = {str(p.relative_to(tiny_bundle)) for p in tiny_bundle.rglob("*") if p.is_file()} - {"ldm_export.json"}
    assert listed == on_disk
    assert Bundle.open(tiny_bundle, verify=True).check_hashes() == []


def test_exported_graph_matches_spec(tiny_bundle):
    b = Bundle.open(tiny_bundle)
    for comp in b.components:
        g = onnx.load(str(b.model_path(comp)), load_external_data=False).graph
        spec = b.spec(comp)
        assert [i.name for i in g.input] == spec.input_names
        assert [o.name for o in g.output] == spec.output_names
        for i, t in zip(g.input, spec.inputs):
            dims = [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            assert dims == list(t.shape), (comp, i.name)


def test_fp16_build_keeps_policy_ops_fp32(tmp_path):
    out = tmp_path / "b16"
    m = build(BuildConfig(model="tiny", precision="fp16", random_weights=True, out=out))
    for comp, info in m["components"].items():
        assert info["precision"] == "fp16" and info["verification"]["fp16"]["passed"]
        assert info["verification"]["fp16"]["cosine_threshold"] == 0.999
    g = onnx.load(str(out / "vae_decoder" / "model.onnx"))
    dtypes = {i.name: i.data_type for i in g.graph.initializer}
    assert dtypes["vae.decoder.conv_out.weight"] == onnx.TensorProto.FLOAT16  # the whole decoder runs fp16 ...
    # ... but the mid-block attention's softmax, which reads a Cast to fp32
    casts = {n.output[0]: n.attribute[0].i for n in g.graph.node if n.op_type == "Cast"}
    softmax = [n for n in g.graph.node if n.op_type == "Softmax"]
    assert softmax and all(casts.get(n.input[0]) == onnx.TensorProto.FLOAT for n in softmax)
    unet = onnx.load(str(out / "unet" / "model.onnx"))
    types = {i.name: i.type.tensor_type.elem_type for i in unet.graph.input}
    # latents in and out stay float32 at the boundary (cast on the device); the text embeddings go in fp16
    assert types == {"sample": onnx.TensorProto.FLOAT, "timestep": onnx.TensorProto.FLOAT,
                     "encoder_hidden_states": onnx.TensorProto.FLOAT16}
    assert {o.name: o.type.tensor_type.elem_type for o in unet.graph.output} == {"out_sample": onnx.TensorProto.FLOAT}
    assert {t.name: t.type.tensor_type.elem_type for t in (*g.graph.input, *g.graph.output)} == {
        "latent_sample": onnx.TensorProto.FLOAT, "sample": onnx.TensorProto.FLOAT}
    norms = [n for n in unet.graph.node if n.op_type == "InstanceNormalization"]
    assert norms  # GroupNorm exports as InstanceNormalization; the policy keeps it fp32
    init16 = {i.name for i in unet.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16}
    for n in norms:
        assert not set(n.input) & init16


def test_no_half_vae_keeps_the_decoder_fp32(tmp_path):
    out = tmp_path / "b16"
    m = build(BuildConfig(model="tiny", precision="fp16", random_weights=True, out=out, no_half_vae=True))
    assert m["components"]["vae_decoder"]["precision"] == "fp32" and m["components"]["vae_decoder"]["fp16_policy"] is None
    assert m["components"]["unet"]["precision"] == "fp16"
    g = onnx.load(str(out / "vae_decoder" / "model.onnx"))
    assert {i.data_type for i in g.graph.initializer} == {onnx.TensorProto.FLOAT}
    b = Bundle.open(out)
    assert b.spec("vae_decoder").inputs[0].dtype == "float32" and b.spec("unet").inputs[2].dtype == "float16"
    images = Pipeline.from_bundle(out)("a red circle", num_inference_steps=2, seed=0)
    assert images[0].size == (64, 64)


def test_no_half_vae_needs_fp16(tmp_path):
    r = run_cli("build", "--model", "tiny", "--random-weights", "--no-half-vae", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == \
        "error: --no-half-vae keeps the VAE decoder in fp32 in an fp16 build; it needs --precision fp16"
    assert not (tmp_path / "x").exists()


def test_static_shape_build(tmp_path):
    out = tmp_path / "static"
    build(BuildConfig(model="tiny", precision="fp32", random_weights=True, out=out, static_shape=True))
    b = Bundle.open(out)
    assert b.spec("unet").inputs[0].shape == (2, 4, 8, 8)
    g = onnx.load(str(b.model_path("unet")), load_external_data=False).graph
    assert all(d.dim_value for i in g.input for d in i.type.tensor_type.shape.dim)


def test_tampered_export_fails_verification_and_leaves_nothing(tmp_path, monkeypatch):
    real = onnx_export.export_onnx

    def tampered(*args, **kwargs):
        model = real(*args, **kwargs)
        if args[1].name == "unet":  # scale the first large weight, as a broken export would
            init = max(model.graph.initializer, key=lambda t: len(t.raw_data))
            arr = onnx.numpy_helper.to_array(init) * 1.5 + 0.1
            init.CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float32), init.name))
        return model

    monkeypatch.setattr(onnx_export, "export_onnx", tampered)
    with pytest.raises(LdmExportError, match="verification failed: unet fp32"):
        build(BuildConfig(model="tiny", random_weights=True, out=tmp_path / "bad"))
    assert no_leftovers(tmp_path, "bad")


def test_disk_full_during_write_leaves_nothing(tmp_path, monkeypatch):
    import errno

    real = onnx_export.save_onnx

    def full(model, path):
        if path.parent.name == "unet":
            path.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(model, path)

    monkeypatch.setattr(onnx_export, "save_onnx", full)
    with pytest.raises(LdmExportError, match="disk full"):
        build(BuildConfig(model="tiny", random_weights=True, out=tmp_path / "full"))
    assert no_leftovers(tmp_path, "full")


def test_force_replaces_and_existing_out_is_refused(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(LdmExportError, match="already exists; pass --force"):
        build(BuildConfig(model="tiny", random_weights=True, out=out))
    assert (out / "keep.txt").read_text() == "mine"  # refused before touching anything
    with pytest.raises(LdmExportError, match="not an ldm-export bundle"):  # --force replaces only bundles
        build(BuildConfig(model="tiny", random_weights=True, out=out, force=True))
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()  # an empty folder may be replaced
    build(BuildConfig(model="tiny", random_weights=True, out=out, force=True))
    first = (out / "ldm_export.json").read_text()
    build(BuildConfig(model="tiny", random_weights=True, seed=1, out=out, force=True))  # and a bundle
    assert (out / "ldm_export.json").read_text() != first
    assert not list(tmp_path.glob(".o.*"))
    # a bundle that also holds the user's files (generate --out BUNDLE writes image.png into it) is not replaced
    (out / "image.png").write_bytes(b"png")
    (out / "unet" / "notes.txt").write_text("mine")
    (out / "engines").mkdir()
    (out / "engines" / "plan.bin").write_bytes(b"cache")  # what ldm-export keeps in a bundle may go
    (out / "serve.yaml").write_text("applications: []")
    second = (out / "ldm_export.json").read_text()
    with pytest.raises(LdmExportError, match=r"holds files it did not write \(image.png, unet/notes.txt\); --force "
                                             "replaces nothing else"):
        build(BuildConfig(model="tiny", random_weights=True, seed=2, out=out, force=True))
    assert (out / "image.png").read_bytes() == b"png" and (out / "ldm_export.json").read_text() == second
    (out / "image.png").unlink()
    (out / "unet" / "notes.txt").unlink()
    build(BuildConfig(model="tiny", random_weights=True, seed=2, out=out, force=True))
    assert not (out / "engines").exists() and not (out / "serve.yaml").exists()


def test_killed_build_leftover_is_removed_by_next_build(tmp_path):
    stale = tmp_path / ".k.partial-999999"  # a pid that does not exist
    stale.mkdir()
    (stale / "junk").write_text("x")
    build(BuildConfig(model="tiny", random_weights=True, out=tmp_path / "k"))
    assert not stale.exists() and (tmp_path / "k" / "ldm_export.json").is_file()


def test_ctrl_c_during_build_leaves_nothing(tmp_path):
    out = tmp_path / "int"
    proc = subprocess.Popen([sys.executable, "-m", "ldm_export.cli", "build", "--model", "tiny", "--random-weights",
                             "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # a terminal delivers Ctrl-C; a parent started in the background ignores SIGINT, and
                            # children inherit that, so give the build the default disposition a terminal has
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not list(tmp_path.glob(".int.partial-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the build finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    assert no_leftovers(tmp_path, "int")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders; the next test simulates it instead")
def test_read_only_out_dir(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    r = run_cli("build", "--model", "tiny", "--random-weights", "--out", str(ro / "b"))
    assert r.returncode == 2 and "permission denied" in r.stderr and "Traceback" not in r.stderr


def test_unwritable_out_dir_simulated(tmp_path, monkeypatch):
    import ldm_export.export.bundle_writer as bw

    monkeypatch.setattr(bw.os, "access", lambda p, mode: False)
    with pytest.raises(LdmExportError, match="permission denied"):
        build(BuildConfig(model="tiny", random_weights=True, out=tmp_path / "b"))
    assert no_leftovers(tmp_path, "b")


def _pickle_file(tmp_path):
    p = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}}, p)
    return p


@pytest.mark.parametrize("args,message", [
    (["--model", "sd99", "--random-weights"], "unknown model 'sd99'; known models: "),
    (["--model", "sd15"], "pass --weights PATH"),
    (["--model", "tiny", "--weights", "/nonexistent/w.safetensors"], "/nonexistent/w.safetensors"),
    (["--model", "tiny", "--random-weights", "--precision", "int4"], "Invalid value for '--precision'"),
    (["--model", "tiny", "--random-weights", "--seed", "-5"], "--seed must be an integer from 0 to 4294967295"),
    (["--model", "tiny-sd3", "--random-weights", "--seed", str(2**70)], "--seed must be an integer from 0 to"),
])
def test_bad_input_one_line_error(tmp_path, args, message):
    r = run_cli("build", *args, "--out", str(tmp_path / "x"))
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert no_leftovers(tmp_path, "x")


def test_bad_input_pickle_and_existing_out(tmp_path):
    r = run_cli("build", "--model", "tiny", "--weights", str(_pickle_file(tmp_path)), "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "--trust-pickle" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "y").mkdir()
    r = run_cli("build", "--model", "tiny", "--random-weights", "--out", str(tmp_path / "y"))
    assert r.returncode == 2 and "already exists; pass --force" in r.stderr


def test_cli_build_summary_and_inspect(tmp_path, tiny_bundle):
    r = run_cli("inspect", str(tiny_bundle))
    assert r.returncode == 0, r.stderr
    assert "all" in r.stdout and "match their sha256" in r.stdout and "unet" in r.stdout
    # a damaged file is reported with exit code 1
    copy = tmp_path / "copy"
    import shutil
    shutil.copytree(tiny_bundle, copy)
    with open(copy / "unet" / "config.json", "a") as f:
        f.write(" ")
    r = run_cli("inspect", str(copy))
    assert r.returncode == 1 and "sha256 mismatch in unet/config.json" in r.stderr


def test_all_zoo_models_have_consistent_specs():
    for spec in MODELS.values():
        if "unet" not in spec.configs or "text_encoder_2" in spec.configs:
            continue  # DiT families (tests/test_dit_export.py) and SDXL's two encoders (tests/test_sdxl.py)
        specs = spec.component_specs()
        # the cross-attention context is the family's text encoders' states side by side (SDXL: 768 + 1280)
        width = sum(spec.configs[te]["hidden_size"] for te in spec.family_def.text_encoders)
        assert specs["unet"].inputs[2].shape[-1] == spec.unet["cross_attention_dim"] == width, spec.name


def test_fp16_policy_per_target():
    from ldm_export.export.precision import fp16_policy

    assert "LayerNormalization" in fp16_policy("unet", "cpu").keep_op_types
    cuda = fp16_policy("unet", "cuda")
    assert "LayerNormalization" not in cuda.keep_op_types and "InstanceNormalization" in cuda.keep_op_types
    assert cuda.keep_fp32_io == ("timestep", "sample", "out_sample") and "on cuda" in cuda.reason
    assert fp16_policy("vae_decoder", "cuda").keep_fp32_io == ("latent_sample", "sample")
    assert fp16_policy("vae_decoder", "cuda").keep_name_prefixes == fp16_policy("vae_decoder", "cpu").keep_name_prefixes == ()
    assert "Softmax" in fp16_policy("vae_decoder", "cuda").keep_op_types


def test_default_build_is_the_embedded_demo_model(tmp_path):
    r = run_cli("build", "--out", str(tmp_path / "demo"))
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "demo" / "ldm_export.json").read_text())
    assert m["model"]["name"] == "demo" and m["weights"]["source"] == "embedded" and m["weights"]["path"] is None
    assert set(m["weights"]["files"]) >= {"unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"}
    assert all(c["verification"]["fp32"]["passed"] for c in m["components"].values())
    from ldm_export.demo import config

    assert m["model"]["latent_scale"] == pytest.approx(config.VAE["scaling_factor"])


def test_models_lists_every_zoo_model_and_auto():
    """Errors send users to `ldm-export models` for the names --model takes."""
    from ldm_export.zoo import MODELS

    r = run_cli("models")
    assert r.returncode == 0, r.stderr
    names = [line.split("\t")[0] for line in r.stdout.splitlines()]
    assert sorted(names) == sorted([*MODELS, "auto"])
    assert "sdxl\tsdxl\t1024 px\tneeds --weights or --random-weights" in r.stdout


def test_target_cuda_without_the_cuda_provider_is_refused_before_any_work(tmp_path):
    """It failed after loading the weights and exporting the first component."""
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine has ONNX Runtime's CUDA provider: the build would run")
    r = run_cli("build", "--model", "tiny", "--random-weights", "--target", "cuda", "--out", str(tmp_path / "b"))
    assert r.returncode == 2 and "needs onnxruntime-gpu" in r.stderr and "use --target cpu" in r.stderr, r.stderr
    assert "export" not in r.stdout + r.stderr.replace("ldm-export", "") and not (tmp_path / "b").exists()


def test_verification_names_an_fp16_overflow_and_broken_weights():
    import warnings

    from ldm_export.export.build import _check

    ref = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy RuntimeWarning on non-finite outputs
        overflow = onnx_export.compare("out", np.array([1.0, np.inf, 3.0]), ref)
        broken = onnx_export.compare("out", ref, np.array([1.0, np.nan, 3.0]))
    report = {"passed": False, "cosine_threshold": 0.999, "outputs": {"out_hidden_states": overflow}}
    with pytest.raises(LdmExportError) as e:
        _check(report, "transformer", "fp16")
    msg = str(e.value)
    assert "transformer overflows fp16 with these weights" in msg and "build with --precision fp32" in msg
    assert "the export is wrong" not in msg and "\n" not in msg
    with pytest.raises(LdmExportError, match="build with --no-half-vae"):
        _check(report, "vae_decoder", "fp16")
    with pytest.raises(LdmExportError, match="the export is wrong"):  # fp32 graph, finite reference: a wrong graph
        _check(report, "transformer", "fp32")
    report["outputs"] = {"out_hidden_states": broken}
    with pytest.raises(LdmExportError, match="the PyTorch model's own output 'out_hidden_states' holds NaN/Inf"):
        _check(report, "transformer", "fp32")


def _textual_inversion_folder(root: Path, embeds: int) -> tuple[Path, object, object]:
    """A tiny pipeline folder after diffusers' load_textual_inversion: two tokens added to the tokenizer, the text
    encoder's embeddings resized to ``embeds`` ids."""
    import transformers

    from ldm_export.export.models import build_random
    from ldm_export.runtime.tokenizer import write_tokenizer_files
    from ldm_export.zoo import TINY

    modules = build_random(TINY, seed=3)
    tok = transformers.CLIPTokenizer.from_pretrained(str(write_tokenizer_files(root / "tokenizer")))
    tok.add_tokens(["<cat-toy>", "<Dog>"])
    tok.save_pretrained(str(root / "tokenizer"))
    te = modules["text_encoder"]
    te.resize_token_embeddings(embeds, mean_resizing=False)
    with torch.no_grad():
        te.get_input_embeddings().weight[49408:] = 3 * torch.randn(embeds - 49408, te.config.hidden_size)
    for name, module in modules.items():
        module.save_pretrained(str(root / name))
    (root / "model_index.json").write_text(json.dumps(TINY.model_index()))
    return root, tok, te


def test_a_folders_added_tokens_reach_the_bundle_and_embed_as_in_transformers(tmp_path):
    import onnxruntime as ort

    from ldm_export.runtime.tokenizer import ClipTokenizer

    folder, ref_tok, te = _textual_inversion_folder(tmp_path / "ti", embeds=49410)
    build(BuildConfig(model="auto", weights=str(folder), out=tmp_path / "b"))
    added = json.loads((tmp_path / "b" / "tokenizer" / "added_tokens.json").read_text())
    assert added == {"<cat-toy>": 49408, "<Dog>": 49409}
    bundle = Bundle.open(tmp_path / "b")
    assert "tokenizer/added_tokens.json" in bundle.manifest["files"] and bundle.check_hashes() == []
    prompt = "a <cat-toy> beside a <Dog> on the left"
    ids = ClipTokenizer(tmp_path / "b" / "tokenizer")([prompt])
    want_ids = ref_tok([prompt], padding="max_length", max_length=77).input_ids
    assert ids.tolist() == want_ids and 49408 in want_ids[0] and 49409 in want_ids[0]
    sess = ort.InferenceSession(str(tmp_path / "b" / "text_encoder" / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: ids.astype(np.int32)})[0]
    with torch.no_grad():
        want = te(torch.tensor(want_ids)).last_hidden_state.numpy()
    assert np.abs(got - want).max() < 1e-4


def test_added_tokens_past_the_text_encoders_embeddings_are_refused(tmp_path):
    folder, _, _ = _textual_inversion_folder(tmp_path / "ti", embeds=49409)  # one token short
    r = run_cli("build", "--model", "auto", "--weights", str(folder), "--out", str(tmp_path / "b"))
    assert r.returncode == 2 and "adds 2 tokens (<cat-toy>, <Dog>) but the text encoder embeds 49409 ids" in r.stderr
    assert no_leftovers(tmp_path, "b") and "Traceback" not in r.stderr


def test_seed_minus_one_builds_with_a_random_seed_it_records(tmp_path):
    r = run_cli("build", "--model", "tiny", "--random-weights", "--seed", "-1", "--out", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    seed = Bundle.open(tmp_path / "b").manifest["weights"]["seed"]
    assert isinstance(seed, int) and 0 <= seed < 2**32 and f"--seed -1: building with seed {seed}" in r.stderr
