"""Fused kernels: numpy references against torch, export patches, graph rewrites, and fused vs unfused graphs.

CPU tests run ONNX Runtime's CPU kernels (MultiHeadAttention fp32), and whole cuda-target graphs on onnx's
reference evaluator with the CUDA-only ops backed by the numpy references (``tests/contrib_ref.py``). The CUDA
kernels themselves (GroupNorm, SkipGroupNorm, SkipLayerNormalization, BiasSplitGelu, fp16 attention) are checked
against the references where onnxruntime-gpu sees a GPU, and skipped elsewhere with that reason.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402

from ldm_export import kernels  # noqa: E402
from ldm_export.kernels import attention, fast_gelu, geglu, groupnorm, residual  # noqa: E402

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="GroupNorm/BiasSplitGelu/fp16 MultiHeadAttention have ONNX Runtime "
                                                     "CUDA kernels only; needs onnxruntime-gpu and a GPU")
CUDA = [("CUDAExecutionProvider", {"use_tf32": 0}), "CPUExecutionProvider"]


def _export(module, args, path, names=("x",)):
    with torch.inference_mode():
        torch.onnx.export(module, args, str(path), input_names=list(names), output_names=["y"], opset_version=17,
                          do_constant_folding=True, dynamo=False)
    return onnx.load(str(path))


@pytest.mark.parametrize("heads,s,l,d", [(1, 5, 5, 8), (4, 16, 7, 32), (8, 9, 77, 64)])
def test_attention_ref_matches_sdpa(heads, s, l, d):
    rng = np.random.default_rng(heads)
    q, k, v = (rng.standard_normal((2, n, d)).astype(np.float32) for n in (s, l, l))
    ref = attention.attention_ref(q, k, v, heads)
    t = lambda a: torch.from_numpy(a).view(2, -1, heads, d // heads).transpose(1, 2).double()  # noqa: E731
    want = torch.nn.functional.scaled_dot_product_attention(t(q), t(k), t(v)).transpose(1, 2).reshape(2, s, d)
    np.testing.assert_allclose(ref, want.numpy(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_ref_matches_torch(silu, channels_last):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 16, 5, 3)) * 3 + 1
    gamma, beta = rng.standard_normal(16), rng.standard_normal(16)
    want = torch.nn.functional.group_norm(torch.from_numpy(x), 4, torch.from_numpy(gamma), torch.from_numpy(beta), 1e-5)
    if silu:
        want = torch.nn.functional.silu(want)
    xin = x.transpose(0, 2, 3, 1) if channels_last else x
    got = groupnorm.group_norm_ref(xin, gamma, beta, 4, 1e-5, silu=silu, channels_last=channels_last)
    np.testing.assert_allclose(got.transpose(0, 3, 1, 2) if channels_last else got, want.numpy(), rtol=1e-9, atol=1e-9)


def test_bias_split_gelu_ref_matches_torch():
    rng = np.random.default_rng(2)
    x, bias = rng.standard_normal((2, 3, 10)), rng.standard_normal(10)
    a, g = (torch.from_numpy(x) + torch.from_numpy(bias)).chunk(2, -1)
    np.testing.assert_allclose(geglu.bias_split_gelu_ref(x, bias), (a * torch.nn.functional.gelu(g)).numpy(), rtol=1e-9, atol=1e-12)


def test_fast_gelu_ref_matches_torch():
    rng = np.random.default_rng(4)
    x, bias = rng.standard_normal((2, 3, 10)) * 3, rng.standard_normal(10)
    want = torch.nn.functional.gelu(torch.from_numpy(x) + torch.from_numpy(bias), approximate="tanh").numpy()
    np.testing.assert_allclose(fast_gelu.fast_gelu_ref(x, bias), want, rtol=1e-9, atol=1e-12)
    exact = torch.nn.functional.gelu(torch.from_numpy(x)).numpy()  # the erf GELU differs: the check can fail
    assert np.abs(fast_gelu.fast_gelu_ref(x) - exact).max() > 1e-5


class _FeedForwards(torch.nn.Module):
    """SD3/FLUX's tanh feed-forward (diffusers GELU with and without bias), FLUX's bare nn.GELU(tanh), and two
    GELUs the patch must leave alone (erf GELU module and nn.GELU())."""

    def __init__(self):
        super().__init__()
        from diffusers.models.activations import GELU

        self.ff = GELU(8, 24, approximate="tanh")
        self.ff_nobias = GELU(8, 24, approximate="tanh", bias=False)
        self.mlp, self.act = torch.nn.Linear(8, 24), torch.nn.GELU(approximate="tanh")
        self.erf_ff, self.erf_act = GELU(8, 24), torch.nn.GELU()

    def forward(self, x):
        return (self.ff(x) + self.ff_nobias(x) + self.act(self.mlp(x)) + self.erf_ff(x) + self.erf_act(self.mlp(x)))


def test_fast_gelu_export_fuses_tanh_gelus_only_and_matches_on_cpu(tmp_path):
    """FastGelu(x, bias) for a projection with bias, FastGelu(x) without; erf GELUs untouched; the graph, run by ONNX
    Runtime's CPU FastGelu kernel, equals the unpatched torch module; the modules get their own forward back."""

    torch.manual_seed(0)
    m = _FeedForwards().eval()
    x = torch.randn(2, 5, 8) * 2
    want = m(x).detach().numpy()
    saved = fast_gelu.install(m)
    try:
        assert {id(s) for s in saved} == {id(m.ff), id(m.ff_nobias), id(m.act)}
        np.testing.assert_allclose(m(x).detach().numpy(), want, rtol=1e-5, atol=1e-6)
        path = tmp_path / "ff.onnx"
        torch.onnx.export(m, (x,), str(path), input_names=["x"], output_names=["y"], opset_version=17, dynamo=False)
    finally:
        fast_gelu.uninstall(saved)
    assert "forward" not in vars(m.ff) and "forward" not in vars(m.act)
    model = onnx.load(str(path))
    fg = [n for n in model.graph.node if n.op_type == "FastGelu"]
    assert sorted(len(n.input) for n in fg) == [1, 1, 2] and all(n.domain == "com.microsoft" for n in fg)
    assert not [n for n in model.graph.node if n.op_type == "Tanh"] and [n for n in model.graph.node if n.op_type == "Erf"]
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


class _AttnBlock(torch.nn.Module):
    def __init__(self, cross: bool):
        super().__init__()
        from diffusers.models.attention_processor import Attention

        self.attn = Attention(32, cross_attention_dim=16 if cross else None, heads=4, dim_head=8)
        self.cross = cross

    def forward(self, x, ctx):
        return self.attn(x, encoder_hidden_states=ctx if self.cross else None)


@pytest.mark.parametrize("cross", [False, True])
def test_fused_attention_graph_matches_unfused_on_cpu(tmp_path, cross):
    torch.manual_seed(0)
    block = _AttnBlock(cross).eval()
    x, ctx = torch.randn(2, 24, 32), torch.randn(2, 7, 16)
    plain = _export(block, (x, ctx), tmp_path / "plain.onnx", ("x", "ctx"))
    saved = attention.install(block)
    try:
        fused = _export(block, (x, ctx), tmp_path / "fused.onnx", ("x", "ctx"))
    finally:
        attention.uninstall(saved)
    ops = [n.op_type for n in fused.graph.node]
    assert ops.count("MultiHeadAttention") == 1 and "Softmax" not in ops
    assert "Softmax" in [n.op_type for n in plain.graph.node]
    feeds = {"x": x.numpy(), "ctx": ctx.numpy()}
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(  # noqa: E731
        None, {i.name: feeds[i.name] for i in m.graph.input})[0]
    got, want = run(fused), run(plain)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        np.testing.assert_allclose(got, block(x, ctx).numpy(), rtol=1e-5, atol=1e-5)


def test_export_patches_restore_modules_and_cpu_target_is_plain():
    from ldm_export.export import models as M
    from ldm_export.zoo import get_model

    unet = M.build_unet(get_model("tiny"))
    procs = [type(m.processor) for m in unet.modules() if hasattr(m, "processor")]
    with kernels.export_patches(unet, "unet", "cpu"):
        assert [type(m.processor) for m in unet.modules() if hasattr(m, "processor")] == procs
        assert not any("forward" in vars(m) for m in unet.modules())
    with kernels.export_patches(unet, "unet", "cuda"):
        assert all(isinstance(m.processor, attention.FusedAttnProcessor) for m in unet.modules() if hasattr(m, "processor"))
        assert any("forward" in vars(m) for m in unet.modules() if isinstance(m, torch.nn.GroupNorm))
    assert [type(m.processor) for m in unet.modules() if hasattr(m, "processor")] == procs
    assert not any("forward" in vars(m) for m in unet.modules())
    with pytest.raises(NotImplementedError, match="rocm"):
        with kernels.export_patches(unet, "unet", "rocm"):
            pass


@pytest.fixture(scope="module")
def tiny_cuda_graphs(tmp_path_factory):
    """The tiny model's UNet and VAE decoder exported plain and for target cuda, with feeds and torch outputs."""
    from ldm_export.export import models as M
    from ldm_export.export import onnx_export as X
    from ldm_export.export.build import static_dims
    from ldm_export.zoo import get_model

    torch.set_grad_enabled(False)
    spec = get_model("tiny")
    modules = M.build_random(spec, 0)
    specs = spec.component_specs()
    out = {}
    tmp = tmp_path_factory.mktemp("kernels")
    for comp in ("unet", "vae_decoder"):
        dims = static_dims(spec, comp)
        cs = specs[comp].static(dims)
        w = M.wrap(comp, modules)
        feeds = X.sample_inputs(cs, dims, latent_scale=spec.latent_scale)
        ref = X.torch_outputs(w, cs, feeds)
        plain = X.export_onnx(w, cs, tmp, feeds, static=True)
        with kernels.export_patches(w, comp, "cuda"):
            patched_ref = X.torch_outputs(w, cs, feeds)
            fused = X.export_onnx(w, cs, tmp, feeds, static=True)
        fused = kernels.rewrite(fused, comp, "cuda")
        out[comp] = dict(plain=plain, fused=fused, feeds=feeds, ref=ref[0], patched_ref=patched_ref[0],
                         describe=kernels.describe(comp, "cuda"))
    return out


def test_tiny_unet_rewrite_counts(tiny_cuda_graphs):
    g = tiny_cuda_graphs["unet"]
    ops = [n.op_type for n in g["fused"].graph.node]
    # tiny UNet: 4 transformer blocks x (self + cross); 21 GroupNorms, 17 followed by SiLU; no GEGLU of a CUDA width
    assert ops.count("MultiHeadAttention") == 8
    # 21 norms: 15 take the Add before them (8 time-embedding adds, 7 residual streams), 6 do not
    assert ops.count("GroupNorm") == 6 and ops.count("SkipGroupNorm") == 15
    # 4 blocks x 2 residual adds before a LayerNorm (after self- and cross-attention); the first norm has none
    assert ops.count("SkipLayerNormalization") == 8 and ops.count("LayerNormalization") == 4
    assert "InstanceNormalization" not in ops and "Softmax" not in ops
    plain_ops = [n.op_type for n in g["plain"].graph.node]
    assert plain_ops.count("Sigmoid") - ops.count("Sigmoid") == 17  # the SiLUs after norms; the time embedding's stays
    # the adds above, the to_out biases, and the 21 GroupNorm beta adds of the plain export
    assert plain_ops.count("Add") - ops.count("Add") == 8 + 7 + 8 + 8 + 21
    assert g["describe"] == ["GroupNorm x6", "MultiHeadAttention x8", "SkipGroupNorm x15", "SkipLayerNormalization x8",
                             "GroupNorm+SiLU x17"]
    assert kernels.needs_gpu_verification(g["fused"]) and not kernels.needs_gpu_verification(g["plain"])
    np.testing.assert_array_equal(g["patched_ref"], g["ref"])  # the patched torch forward computes the same


def test_tiny_vae_keeps_attention_and_odd_groups_unfused(tiny_cuda_graphs):
    from ldm_export.export import models as M
    from ldm_export.zoo import get_model

    norms = [m for m in M.build_vae(get_model("tiny")).decoder.modules() if isinstance(m, torch.nn.GroupNorm)]
    even = sum((m.num_channels // m.num_groups) % 2 == 0 for m in norms)
    assert 0 < even < len(norms)  # the tiny VAE has 8-channel norms in 8 groups: one channel a group
    ops = [n.op_type for n in tiny_cuda_graphs["vae_decoder"]["fused"].graph.node]
    assert "MultiHeadAttention" not in ops and "Softmax" in ops
    assert ops.count("GroupNorm") == even and ops.count("InstanceNormalization") == len(norms) - even
    assert "SkipGroupNorm" not in ops  # no residual folds in the decoder: slower there on an H100


@pytest.mark.parametrize("comp", ["unet", "vae_decoder"])
def test_cuda_target_graph_matches_plain_on_the_reference_evaluator(tiny_cuda_graphs, comp):
    """The whole rewritten graph (every fused op, the residual folds included) computes what the plain one does:
    the fused ops run on their numpy references, the plain graph on ONNX Runtime's CPU provider."""
    from contrib_ref import run_reference

    g = tiny_cuda_graphs[comp]
    want = ort.InferenceSession(g["plain"].SerializeToString(), providers=["CPUExecutionProvider"]).run(None, g["feeds"])[0]
    got = run_reference(g["fused"], g["feeds"])[0]
    assert got.shape == want.shape
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5


def test_reference_evaluator_sees_a_broken_fused_graph(tiny_cuda_graphs):
    """The check above can fail: the same graph with one SkipGroupNorm's SiLU switched off differs."""
    from contrib_ref import run_reference

    g = tiny_cuda_graphs["unet"]
    broken = onnx.ModelProto()
    broken.CopyFrom(g["fused"])
    node = next(n for n in broken.graph.node if n.op_type == "SkipGroupNorm"
                and any(a.name == "activation" and a.i == 1 for a in n.attribute))
    next(a for a in node.attribute if a.name == "activation").i = 0
    want = run_reference(g["fused"], g["feeds"])[0]
    got = run_reference(broken, g["feeds"])[0]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) > 1e-3


def test_residual_refs_match_torch():
    rng = np.random.default_rng(0)
    x, skip = rng.standard_normal((2, 4, 4, 16)), rng.standard_normal((2, 16))
    gamma, beta, bias = rng.standard_normal(16), rng.standard_normal(16), rng.standard_normal(16)
    y, s = residual.skip_group_norm_ref(x, gamma, beta, skip, 4, silu=True, bias=bias)
    ts = torch.tensor(x) + torch.tensor(skip)[:, None, None, :] + torch.tensor(bias)
    ty = torch.nn.functional.silu(torch.nn.functional.group_norm(ts.permute(0, 3, 1, 2), 4, torch.tensor(gamma),
                                                                 torch.tensor(beta), 1e-5)).permute(0, 2, 3, 1)
    np.testing.assert_allclose(s, ts.numpy(), rtol=1e-12)
    np.testing.assert_allclose(y, ty.numpy(), rtol=1e-9, atol=1e-12)
    x3, skip3 = rng.standard_normal((2, 5, 16)), rng.standard_normal((2, 5, 16))
    y, s = residual.skip_layer_norm_ref(x3, skip3, gamma, beta, bias)
    ts = torch.tensor(x3) + torch.tensor(skip3) + torch.tensor(bias)
    ty = torch.nn.functional.layer_norm(ts, (16,), torch.tensor(gamma), torch.tensor(beta), 1e-5)
    np.testing.assert_allclose(y, ty.numpy(), rtol=1e-9, atol=1e-12)


def test_residual_fusion_on_a_dynamic_shape_export(tmp_path):
    """Dynamic batch and size (a build without --static-shape): the folds still find which input is the skip."""
    from ldm_export.export import models as M
    from ldm_export.export import onnx_export as X
    from ldm_export.export.build import static_dims
    from ldm_export.zoo import get_model

    spec = get_model("tiny")
    modules = M.build_random(spec, 0)
    cs = spec.component_specs()["unet"]
    w = M.wrap("unet", modules)
    feeds = X.sample_inputs(cs, static_dims(spec, "unet"), latent_scale=spec.latent_scale)
    with torch.inference_mode(), kernels.export_patches(w, "unet", "cuda"):
        m = X.export_onnx(w, cs, tmp_path, feeds, static=False)
    m = kernels.rewrite(m, "unet", "cuda")
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("SkipGroupNorm") == 15 and ops.count("SkipLayerNormalization") == 8


def test_disabled_kernels_env(monkeypatch):
    from ldm_export.runtime.errors import LdmExportError

    monkeypatch.setenv("LDM_EXPORT_DISABLE_KERNELS", "residual, geglu")
    assert kernels.plan("unet", "cuda") == ("attention", "groupnorm")
    assert kernels.plan("vae_decoder", "cuda") == ("groupnorm",)
    monkeypatch.setenv("LDM_EXPORT_DISABLE_KERNELS", "residuals")
    with pytest.raises(LdmExportError, match="unknown kernel kinds.*residuals"):
        kernels.plan("unet", "cuda")


def _gn_graph(extra_consumer: bool):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 2, 2])
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 3, 1]),
             helper.make_node("GroupNorm", ["xt", "g", "b"], ["yt"], domain="com.microsoft", groups=2, epsilon=1e-5,
                              activation=0, channels_last=1),
             helper.make_node("Transpose", ["yt"], ["y"], perm=[0, 3, 1, 2]),
             helper.make_node("Sigmoid", ["y"], ["s"]),
             helper.make_node("Mul", ["y", "s"], ["z"])]
    outs = [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 8, 2, 2])]
    if extra_consumer:
        nodes.append(helper.make_node("Neg", ["y"], ["n"]))
        outs.append(helper.make_tensor_value_info("n", TensorProto.FLOAT, [1, 8, 2, 2]))
    inits = [helper.make_tensor("g", TensorProto.FLOAT, [8], np.ones(8)), helper.make_tensor("b", TensorProto.FLOAT, [8], np.zeros(8))]
    return helper.make_model(helper.make_graph(nodes, "gn", [x], outs, inits),
                             opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def test_fuse_silu_folds_sigmoid_mul():
    m = _gn_graph(extra_consumer=False)
    assert groupnorm.fuse_silu(m) == 1
    ops = [n.op_type for n in m.graph.node]
    assert "Sigmoid" not in ops and "Mul" not in ops and ops[-1] == "Identity"
    gn = next(n for n in m.graph.node if n.op_type == "GroupNorm")
    assert next(a.i for a in gn.attribute if a.name == "activation") == 1
    onnx.checker.check_model(m)


def test_fuse_silu_leaves_shared_output_alone():
    m = _gn_graph(extra_consumer=True)
    assert groupnorm.fuse_silu(m) == 0
    assert "Sigmoid" in [n.op_type for n in m.graph.node]


def test_dedupe_nodes_drops_repeated_casts_and_renames_clashes():
    n = lambda name, i, o: helper.make_node("Cast", [i], [o], to=1, name=name)  # noqa: E731
    g = helper.make_graph([n("c", "x", "y"), n("c", "x", "y"), n("d", "x", "z"), n("d", "y", "w")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2])],
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, [2]) for o in ("y", "z", "w")])
    m = helper.make_model(g)
    assert kernels.dedupe_nodes(m) == 2
    assert [x.name for x in m.graph.node] == ["c", "d", "d_1"]
    onnx.checker.check_model(m)


def test_rewrite_refuses_a_cuda_export_without_fused_ops():
    m = _gn_graph(extra_consumer=False)
    del m.graph.node[1:3]
    m.graph.node[0].output[0] = "y"
    with pytest.raises(RuntimeError, match="no fused kernel"):
        kernels.rewrite(m, "unet", "cuda")


# ------------------------------------------------------------------ GPU: the CUDA-only kernels against the references

@needs_cuda
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("c,silu", [(320, True), (1920, True), (128, False)])
def test_cuda_group_norm_matches_reference(dtype, c, silu):
    rng = np.random.default_rng(c)
    x = (rng.standard_normal((2, 8, 8, c)) * 2 + 0.5).astype(dtype)  # NHWC
    gamma, beta = rng.standard_normal(c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
    t = TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16
    node = helper.make_node("GroupNorm", ["x", "g", "b"], ["y"], domain="com.microsoft", groups=32, epsilon=1e-5,
                            activation=int(silu), channels_last=1)
    graph = helper.make_graph([node], "gn", [helper.make_tensor_value_info("x", t, list(x.shape))],
                              [helper.make_tensor_value_info("y", t, list(x.shape))],
                              [helper.make_tensor("g", TensorProto.FLOAT, [c], gamma), helper.make_tensor("b", TensorProto.FLOAT, [c], beta)])
    m = helper.make_model(graph, ir_version=9, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    got = ort.InferenceSession(m.SerializeToString(), providers=CUDA).run(None, {"x": x})[0]
    want = groupnorm.group_norm_ref(x, gamma, beta, 32, silu=silu, channels_last=True)
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert err < (1e-5 if dtype == np.float32 else 2e-3), err


@needs_cuda
def test_cuda_bias_split_gelu_matches_reference():
    rng = np.random.default_rng(3)
    x, bias = rng.standard_normal((2, 16, 2560)).astype(np.float16), rng.standard_normal(2560).astype(np.float16)
    node = helper.make_node("BiasSplitGelu", ["x", "b"], ["y"], domain="com.microsoft")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2, 16, 1280])],
                              [helper.make_tensor("b", TensorProto.FLOAT16, [2560], bias.view(np.uint16).tolist())])
    graph.initializer[0].ClearField("int32_data")
    graph.initializer[0].raw_data = bias.tobytes()
    m = helper.make_model(graph, ir_version=9, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    got = ort.InferenceSession(m.SerializeToString(), providers=CUDA).run(None, {"x": x})[0]
    want = geglu.bias_split_gelu_ref(x, bias)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 2e-3


@needs_cuda
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_cuda_fast_gelu_matches_reference(dtype):
    rng = np.random.default_rng(5)
    x, bias = (rng.standard_normal((2, 16, 6144)) * 3).astype(dtype), rng.standard_normal(6144).astype(dtype)
    t = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    b = helper.make_tensor("b", t, [6144], vals=bias.tobytes(), raw=True)
    graph = helper.make_graph([helper.make_node("FastGelu", ["x", "b"], ["y"], domain="com.microsoft")], "g",
                              [helper.make_tensor_value_info("x", t, list(x.shape))],
                              [helper.make_tensor_value_info("y", t, list(x.shape))], [b])
    m = helper.make_model(graph, ir_version=9, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    got = ort.InferenceSession(m.SerializeToString(), providers=CUDA).run(None, {"x": x})[0].astype(np.float64)
    want = fast_gelu.fast_gelu_ref(x, bias)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < (2e-3 if dtype == np.float16 else 1e-6)


def _model(nodes, inputs, outputs, inits=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(g, ir_version=9, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def _init(name, a):
    from onnx import numpy_helper

    return numpy_helper.from_array(a, name)


@needs_cuda
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("skip_shape,silu", [("nc", True), ("nhwc", False)])
def test_cuda_skip_group_norm_matches_reference(dtype, skip_shape, silu):
    rng = np.random.default_rng(7)
    c = 320
    x = (rng.standard_normal((2, 8, 8, c)) * 2 + 0.5).astype(dtype)
    skip = rng.standard_normal((2, c) if skip_shape == "nc" else (2, 8, 8, c)).astype(dtype)
    gamma, beta = rng.standard_normal(c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
    t = TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16
    node = helper.make_node("SkipGroupNorm", ["x", "g", "b", "skip"], ["y", "s"], domain="com.microsoft", groups=32,
                            epsilon=1e-5, activation=int(silu), channels_last=1)
    m = _model([node], [helper.make_tensor_value_info("x", t, list(x.shape)), helper.make_tensor_value_info("skip", t, list(skip.shape))],
               [helper.make_tensor_value_info("y", t, list(x.shape)), helper.make_tensor_value_info("s", t, list(x.shape))],
               [_init("g", gamma), _init("b", beta)])
    y, s = ort.InferenceSession(m.SerializeToString(), providers=CUDA).run(None, {"x": x, "skip": skip})
    want_y, want_s = residual.skip_group_norm_ref(x, gamma, beta, skip, 32, silu=silu)
    tol = 1e-5 if dtype == np.float32 else 2e-3
    assert np.linalg.norm(y - want_y) / np.linalg.norm(want_y) < tol
    assert np.linalg.norm(s - want_s) / np.linalg.norm(want_s) < tol


@needs_cuda
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_cuda_skip_layer_norm_matches_reference(dtype):
    rng = np.random.default_rng(8)
    d = 320
    x, skip = rng.standard_normal((2, 64, d)).astype(dtype), rng.standard_normal((2, 64, d)).astype(dtype)
    gamma, beta, bias = (rng.standard_normal(d).astype(dtype) for _ in range(3))
    t = TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16
    node = helper.make_node("SkipLayerNormalization", ["x", "skip", "g", "b", "bias"], ["y", "", "", "s"],
                            domain="com.microsoft", epsilon=1e-5)
    m = _model([node], [helper.make_tensor_value_info("x", t, list(x.shape)), helper.make_tensor_value_info("skip", t, list(x.shape))],
               [helper.make_tensor_value_info("y", t, list(x.shape)), helper.make_tensor_value_info("s", t, list(x.shape))],
               [_init("g", gamma), _init("b", beta), _init("bias", bias)])
    y, s = ort.InferenceSession(m.SerializeToString(), providers=CUDA).run(None, {"x": x, "skip": skip})
    want_y, want_s = residual.skip_layer_norm_ref(x, skip, gamma, beta, bias)
    tol = 1e-5 if dtype == np.float32 else 2e-3
    assert np.linalg.norm(y - want_y) / np.linalg.norm(want_y) < tol
    assert np.linalg.norm(s - want_s) / np.linalg.norm(want_s) < tol


@needs_cuda
@pytest.mark.parametrize("comp", ["unet", "vae_decoder"])
def test_cuda_fused_graph_matches_unfused(tiny_cuda_graphs, comp):
    g = tiny_cuda_graphs[comp]
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=CUDA).run(None, g["feeds"])[0]  # noqa: E731
    got, want = run(g["fused"]), run(g["plain"])
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5
    assert np.linalg.norm(got - g["ref"]) / np.linalg.norm(g["ref"]) < 1e-5
