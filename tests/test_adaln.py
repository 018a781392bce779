"""The fused AdaLN modulation of SD3 transformers (kernels/adaln.py, ``build --sequential-cfg``): the patched forward
equals diffusers' at batch 1, its ONNX graph (LayerNormalization with runtime scale, SkipLayerNormalization with the
residual sum, q/k/v biases inside MultiHeadAttention) equals torch on ONNX Runtime's CPU provider, and a
``--sequential-cfg`` bundle draws the image a batch-2 bundle draws."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from ldm_export.kernels import adaln  # noqa: E402
from ldm_export.runtime.errors import LdmExportError  # noqa: E402


def _tiny(seed=0, **overrides):
    from diffusers import SD3Transformer2DModel

    from ldm_export.zoo import get_model

    cfg = {k: v for k, v in get_model("tiny-sd3").configs["transformer"].items() if not k.startswith("_")}
    cfg.update(overrides)
    torch.manual_seed(seed)
    m = SD3Transformer2DModel.from_config(cfg).eval()
    with torch.no_grad():  # every weight random, the modulation linears (zero in some inits) too
        for p in m.parameters():
            p.normal_(0.0, 0.1)
    return m


NAMES = ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"]


def _fused_export(m, x, path, **install):
    """``m``'s wrapped forward on ``x`` in torch (the reference), then exported with the fused AdaLN forward
    installed (``install``: adaln.install's options) and uninstalled after; returns (reference, ONNX model)."""
    import onnx

    from ldm_export.export.dit_models import SD3TransformerWrapper, register_onnx_symbolics
    from ldm_export.export.onnx_export import OPSET

    w = SD3TransformerWrapper(m)
    with torch.no_grad():
        ref = w(*x).numpy()
    register_onnx_symbolics(OPSET)
    saved = adaln.install(m, **install)
    try:
        torch.onnx.export(w, x, str(path), input_names=NAMES, output_names=["out_hidden_states"],
                          opset_version=OPSET, dynamo=False)
    finally:
        adaln.uninstall(saved)
    return ref, onnx.load(str(path))


def _run_on_cpu(path, x) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, dict(zip(NAMES, (a.numpy() for a in x))))[0]


def _inputs(m, batch=1, side=16, text=9):
    g = torch.Generator().manual_seed(3)
    c = m.config
    return (torch.randn(batch, c.in_channels, side, side, generator=g),
            torch.randn(batch, text, c.joint_attention_dim, generator=g),
            torch.randn(batch, c.pooled_projection_dim, generator=g), torch.tensor([412.0] * batch))


@pytest.mark.parametrize("bias_in_attention", [True, False])
@pytest.mark.parametrize("layers", [1, 3])
def test_fused_forward_equals_diffusers_at_batch_1(bias_in_attention, layers):
    m = _tiny(num_layers=layers)
    x = _inputs(m)
    with torch.no_grad():
        ref = m(*x, return_dict=False)[0]
        saved = adaln.install(m, bias_in_attention=bias_in_attention)
        got = m(*x, return_dict=False)[0]
        adaln.uninstall(saved)
        again = m(*x, return_dict=False)[0]
    assert got.shape == ref.shape
    assert float((got - ref).abs().max()) < 1e-4 * float(ref.abs().max())
    assert torch.equal(again, ref)  # uninstall puts every class forward back
    assert not any("forward" in vars(mod) for mod in m.modules())


def test_fused_forward_refuses_batch_2_and_uncovered_models():
    m = _tiny()
    saved = adaln.install(m)
    with pytest.raises(NotImplementedError, match="batch 1"):
        m(*_inputs(m, batch=2), return_dict=False)
    adaln.uninstall(saved)
    dual = _tiny(dual_attention_layers=[0])
    assert "dual attention" in adaln.coverable(dual)
    with pytest.raises(NotImplementedError, match="dual attention"):
        adaln.install(dual)
    assert adaln.coverable(torch.nn.Linear(2, 2)) == "Linear is not an SD3 MMDiT"


def test_default_keeps_biases_in_projections_where_qk_norms_need_them():
    m = _tiny(qk_norm="rms_norm")
    with pytest.raises(ValueError, match="q/k RMS norms"):  # moving them would skip the norms: refused
        adaln.install(m, bias_in_attention=True)
    assert not any("forward" in vars(mod) for mod in m.modules())
    saved = adaln.install(m)
    assert not m.transformer_blocks[0]._adaln_bias_in_attention
    x = _inputs(m)
    with torch.no_grad():
        got = m(*x, return_dict=False)[0]
    adaln.uninstall(saved)
    with torch.no_grad():
        ref = m(*x, return_dict=False)[0]
    assert float((got - ref).abs().max()) < 1e-4 * float(ref.abs().max())


@pytest.mark.parametrize("bias_in_attention", [True, False])
def test_exported_graph_runs_the_fused_ops_and_matches_torch_on_cpu(tmp_path, bias_in_attention):
    import onnx

    layers = 3
    m = _tiny(num_layers=layers)
    x = _inputs(m)
    ref, model = _fused_export(m, x, tmp_path / "t.onnx", bias_in_attention=bias_in_attention)
    skip = [n for n in model.graph.node if n.op_type == adaln.SKIP_LAYER_NORM]
    # image stream: one after each attention, one entering each later block and norm_out; text: the same, less
    # the last (context_pre_only) block's two
    assert len(skip) == 4 * layers - 2
    # mean and inverse std of every node, and the residual sum of the last norm of each stream (norm_out's; the text
    # stream's into the last block, which ends it)
    assert adaln.clear_unused_outputs(model) == 2 * len(skip) + 2
    assert all(n.output[1] == n.output[2] == "" for n in skip) and sum(not n.output[3] for n in skip) == 2
    assert adaln.clear_unused_outputs(model) == 0
    ln = [n for n in model.graph.node if n.op_type == "LayerNormalization"]
    assert len(ln) == 2  # block 0's two modulated norms; every other norm is inside a SkipLayerNormalization
    init = {i.name for i in model.graph.initializer}
    assert all(n.input[1] not in init for n in ln)  # runtime scale: 1 + the modulation's scale
    mha = [n for n in model.graph.node if n.op_type == "MultiHeadAttention"]
    assert len(mha) == layers and all((len(n.input) == 4) == bias_in_attention for n in mha)
    onnx.save(model, str(tmp_path / "t.onnx"))
    got = _run_on_cpu(tmp_path / "t.onnx", x)
    assert np.abs(got - ref).max() < 1e-4 * np.abs(ref).max()


def test_sequential_cfg_build_and_image(tmp_path, monkeypatch):
    """``build --sequential-cfg`` on tiny-sd3: a batch-1 transformer with the fused modulation, verified, named in the
    manifest; its image matches the batch-2 bundle's (fp32, same weights and seed)."""
    from ldm_export.export.build import BuildConfig, build
    from ldm_export.runtime.pipeline import Pipeline

    monkeypatch.setenv("LDM_EXPORT_DISABLE_KERNELS", "groupnorm")  # the VAE's cuda GroupNorm has no CPU kernel
    common = dict(model="tiny-sd3", random_weights=True, target="cuda", verify_provider="cpu", static_shape=True)
    seq = build(BuildConfig(**common, sequential_cfg=True, out=tmp_path / "seq"))
    plain = build(BuildConfig(**common, out=tmp_path / "plain"))
    t = seq["components"]["transformer"]
    layers = 2  # tiny-sd3
    assert seq["sequential_cfg"] is True and "sequential_cfg" not in plain
    assert t["spec"]["inputs"][0]["shape"][0] == 1 and plain["components"]["transformer"]["spec"]["inputs"][0]["shape"][0] == 2
    assert f"SkipLayerNormalization x{4 * layers - 2}" in t["kernels"]
    assert not any("SkipLayerNormalization" in k for k in plain["components"]["transformer"]["kernels"])
    assert min(o["cosine"] for o in t["verification"]["fp32"]["outputs"].values()) > 0.99999
    images = []
    for b in ("seq", "plain"):
        pipe = Pipeline.from_bundle(tmp_path / b, provider="cpu")
        images.append(np.asarray(pipe("a red circle", num_inference_steps=3, seed=5, guidance_scale=5.0)[0], np.int16))
    assert np.abs(images[0] - images[1]).max() <= 1


def test_sequential_cfg_is_refused_where_it_does_nothing_or_without_static_shape(tmp_path):
    from ldm_export.export.build import BuildConfig, validate

    with pytest.raises(LdmExportError, match="--static-shape"):
        validate(BuildConfig(model="tiny-sd3", random_weights=True, sequential_cfg=True, out=tmp_path / "b"))
    with pytest.raises(LdmExportError, match="is a U-Net.*--cfg-mode sequential"):
        validate(BuildConfig(model="tiny", random_weights=True, static_shape=True, sequential_cfg=True, out=tmp_path / "u"))
    with pytest.raises(LdmExportError, match="batch 1 already"):
        validate(BuildConfig(model="tiny-flux", random_weights=True, static_shape=True, sequential_cfg=True,
                             out=tmp_path / "f"))


def test_disabling_attention_or_gelu_leaves_the_fused_adaln_out(monkeypatch):
    from ldm_export import kernels

    assert kernels.plan("transformer", "cuda", 1) == ("attention", "gelu", "adaln")
    assert kernels.plan("transformer", "cuda", 2) == ("attention", "gelu")
    for off, left in (("attention", ("gelu",)), ("gelu", ("attention",)), ("adaln", ("attention", "gelu"))):
        monkeypatch.setenv("LDM_EXPORT_DISABLE_KERNELS", off)
        assert kernels.plan("transformer", "cuda", 1) == left


def test_spec_with_batch_unfixes_axis_0_but_not_unbatched_inputs():
    from ldm_export.runtime.spec import ComponentSpec, TensorSpec

    spec = ComponentSpec("t", (TensorSpec("x", "float32", (1, 4, 8, 8)), TensorSpec("ids", "float32", (16, 3))),
                         (TensorSpec("y", "float32", (1, 4, 8, 8)),))
    dyn = spec.with_batch("batch", skip=("ids",))
    assert [t.shape for t in dyn.inputs] == [("batch", 4, 8, 8), (16, 3)] and dyn.outputs[0].shape[0] == "batch"
    assert not dyn.is_static and spec.is_static
    assert dyn.profile == {"batch": (1, 2, 8)}  # a profile entry for the new symbolic dim


def test_packed_qkv_is_one_gemm_a_stream_and_the_same_numbers(tmp_path):
    """``pack_qkv`` (the probe's adaln-packed): each stream's q, k, v projections as one MatMul, 4 fewer a block;
    the graph on ONNX Runtime's CPU provider equals torch as the unpacked one does."""
    from ldm_export.export.dit_models import SD3TransformerWrapper

    layers = 3
    m = _tiny(num_layers=layers)
    x = _inputs(m)
    matmuls = {}
    for pack in (False, True):
        path = tmp_path / f"{pack}.onnx"
        ref, model = _fused_export(m, x, path, pack_qkv=pack)
        assert not any("_adaln_pack_qkv" in vars(mod) for mod in m.modules())
        saved = adaln.install(m, pack_qkv=pack)  # the patched torch forward too
        try:
            with torch.no_grad():
                patched = SD3TransformerWrapper(m)(*x).numpy()
        finally:
            adaln.uninstall(saved)
        assert np.abs(patched - ref).max() < 1e-4 * np.abs(ref).max()
        matmuls[pack] = sum(n.op_type == "MatMul" for n in model.graph.node)
        assert np.abs(_run_on_cpu(path, x) - ref).max() < 1e-4 * np.abs(ref).max()
    assert matmuls[False] - matmuls[True] == 4 * layers


def test_fp16_sequential_cfg_build_verifies_and_draws_the_batch2_image(tmp_path, monkeypatch):
    """An fp16 ``--sequential-cfg --target cuda`` build of tiny-sd3, verified on ONNX Runtime's CPU provider (it has
    fp16 kernels for MultiHeadAttention, FastGelu and SkipLayerNormalization): the fp32 modulation linears feed the
    fp16 fused norms, every graph passes, and its image is the fp16 batch-2 bundle's within a few 8-bit levels."""
    from ldm_export.export.build import BuildConfig, build
    from ldm_export.runtime.pipeline import Pipeline

    monkeypatch.setenv("LDM_EXPORT_DISABLE_KERNELS", "groupnorm")  # the VAE's cuda GroupNorm has no CPU kernel
    common = dict(model="tiny-sd3", random_weights=True, precision="fp16", target="cuda", verify_provider="cpu",
                  static_shape=True)
    seq = build(BuildConfig(**common, sequential_cfg=True, out=tmp_path / "seq"))
    build(BuildConfig(**common, out=tmp_path / "plain"))
    t = seq["components"]["transformer"]
    assert seq["sequential_cfg"] is True and t["precision"] == "fp16"
    assert any("SkipLayerNormalization" in k for k in t["kernels"]) and any("MultiHeadAttention" in k for k in t["kernels"])
    assert t["verification"]["fp16"]["provider"] == "CPUExecutionProvider" and t["verification"]["fp16"]["passed"]
    assert min(o["cosine"] for o in t["verification"]["fp16"]["outputs"].values()) > 0.999
    images = []
    for b in ("seq", "plain"):
        pipe = Pipeline.from_bundle(tmp_path / b, provider="cpu")
        images.append(np.asarray(pipe("a red circle", num_inference_steps=3, seed=5, guidance_scale=5.0)[0], np.int16))
    assert np.abs(images[0] - images[1]).max() <= 4
