"""SmoothQuant as graph glue: the scale formula and its guards, the float UNet unchanged by smoothing, alpha 1 making
every smoothed channel's max 1, LayerNorm folding only where it is safe, the int8 build and report with it, and bad
alphas refused in one line."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import run_cli

pytest.importorskip("torch")

from ldm_export.calibration import capture as C  # noqa: E402
from ldm_export.calibration import quantize as Q  # noqa: E402
from ldm_export.calibration import smooth as S  # noqa: E402
from ldm_export.calibration.int8 import Int8Config, quantize_bundle  # noqa: E402
from ldm_export.runtime.errors import LdmExportError  # noqa: E402
from ldm_export.runtime.pipeline import Pipeline  # noqa: E402


@pytest.fixture(scope="module")
def tiny_capture(tiny_bundle):
    pipe = Pipeline.from_bundle(tiny_bundle)
    return C.capture_unet_inputs(pipe, ["a red circle", "a blue square on the left"], num_inference_steps=3,
                                 scheduler="Euler", seed=3, model_identity=C.model_identity(pipe.bundle))


@pytest.fixture(scope="module")
def pre(tiny_bundle, tmp_path_factory):
    path = tmp_path_factory.mktemp("sq") / "pre.onnx"
    Q.preprocess(tiny_bundle / "unet" / "model.onnx", path, False)
    return path


def run_graph(path, capture):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return [sess.run(None, {k: capture.feeds(i)[k] for k in names})[0] for i in capture.indices()]


# ---------------------------------------------------------------- the scale and the alpha

def test_smoothing_scales_formula_and_guards():
    a = np.array([4.0, 9.0, 0.0, 1.0, 1e12])
    w = np.array([1.0, 4.0, 2.0, 0.0, 1e-12])
    s = S.smoothing_scales(a, w, 0.5)
    # sqrt(4)/sqrt(1), sqrt(9)/sqrt(4); a channel never seen or a dead weight row keeps 1; huge ratios are clipped
    np.testing.assert_allclose(s, [2.0, 1.5, 1.0, 1.0, S.SCALE_MAX], rtol=1e-6)
    np.testing.assert_allclose(S.smoothing_scales(a[:2], w[:2], 1.0), a[:2])  # alpha 1: s = max|X|
    assert S.smoothing_scales(a, w, 0.8).dtype == np.float32


@pytest.mark.parametrize("alpha", ["0", "-0.5", "1.5", "abc", "nan", None])
def test_bad_alpha_is_refused(alpha):
    with pytest.raises(LdmExportError, match="give alpha with 0 < alpha <= 1"):
        S.parse_alpha(alpha)


def test_good_alpha_parses():
    assert S.parse_alpha("0.8") == 0.8 and S.parse_alpha(1) == 1.0


# ---------------------------------------------------------------- the smoothed float graph

@pytest.mark.parametrize("alpha", [0.8, 1.0])
def test_smoothing_leaves_the_float_unet_unchanged(pre, tiny_capture, tmp_path, alpha):
    model = onnx.load(str(pre))
    nodes, _ = Q.select_nodes(model, 3.0)
    out = tmp_path / "smoothed.onnx"
    info = S.smooth_graph(pre, out, tiny_capture, nodes, alpha, tmp_path)
    # level 3 of the tiny UNet: 40 Linear layers; q/k/v of self-attention share norm1, k/v of every cross-attention
    # share encoder_hidden_states, each FFN input comes from norm3 (folded) or the GEGLU's product (a Mul)
    assert info["layers"] == 40 and info["folded_into_layernorm"] > 0 and info["mul_nodes"] > 0
    assert info["groups"] == info["folded_into_layernorm"] + info["mul_nodes"]
    smoothed = onnx.load(str(out))
    assert sum(n.op_type == "Mul" and n.name.endswith("/SmoothQuantMul") for n in smoothed.graph.node) == info["mul_nodes"]
    # not a no-op: the layers' weights moved
    before = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    after = {i.name: numpy_helper.to_array(i) for i in smoothed.graph.initializer}
    changed = [n for n in smoothed.graph.node if n.name in nodes and n.op_type == "MatMul"
               and not np.allclose(after[n.input[1]], before.get(n.input[1], after[n.input[1]] * 0), rtol=1e-2)]
    assert len(changed) == 40
    ref, got = run_graph(pre, tiny_capture), run_graph(out, tiny_capture)
    diff = max(float(np.abs(g - r).max()) for g, r in zip(got, ref))
    assert diff < 1e-5, diff  # the outputs' max |value| is about 1.7: rounding only


def test_alpha_one_makes_every_smoothed_channel_max_one(pre, tiny_capture, tmp_path):
    """With alpha 1, s_j = max|X_j| over the calibration calls: on those calls every smoothed activation channel's
    max |x| becomes exactly 1 (the closed form the statistic pass and the rewrite must both get right)."""
    model = onnx.load(str(pre))
    nodes, _ = Q.select_nodes(model, 3.0)
    out = tmp_path / "smoothed.onnx"
    S.smooth_graph(pre, out, tiny_capture, nodes, 1.0, tmp_path)
    groups = S.groups_of(onnx.load(str(out)), nodes)
    amax = S.activation_amax(out, tiny_capture, {g.tensor: g.channels for g in groups}, tmp_path, False)
    before = S.activation_amax(pre, tiny_capture, {g.tensor: g.channels for g in S.groups_of(model, nodes)}, tmp_path, False)
    assert len(amax) == 25
    for name, v in amax.items():
        np.testing.assert_allclose(v, 1.0, rtol=1e-5, err_msg=name)
    assert any(abs(float(v.max()) - 1.0) > 0.1 for v in before.values())  # it was not so before smoothing


def test_layernorm_is_folded_only_when_it_feeds_smoothed_layers_alone(pre, tiny_capture, tmp_path):
    """norm1 feeds to_q, to_k and to_v: smoothing to_q alone must not touch norm1 (to_k and to_v read it too), so a
    Mul goes before to_q; norm3 feeds the FFN's first Linear alone and is folded."""
    model = onnx.load(str(pre))
    block = "/model/down_blocks.0/attentions.0/transformer_blocks.0"
    to_q, ff0 = f"{block}/attn1/to_q/MatMul", f"{block}/ff/net.0/proj/MatMul"
    out = tmp_path / "smoothed.onnx"
    info = S.smooth_graph(pre, out, tiny_capture, [to_q, ff0], 0.8, tmp_path)
    assert info["groups"] == 2 and info["mul_nodes"] == 1 and info["folded_into_layernorm"] == 1
    smoothed = onnx.load(str(out))
    nodes = {n.name: n for n in smoothed.graph.node}
    assert nodes[to_q].input[0].endswith("_smoothquant")
    assert nodes[f"{block}/attn1/to_k/MatMul"].input[0] == nodes[f"{block}/norm1/LayerNormalization"].output[0]
    assert nodes[ff0].input[0] == nodes[f"{block}/norm3/LayerNormalization"].output[0]
    # norm3's gamma was shared with the other LayerNorms (random weights: all ones): it got its own copy
    assert nodes[f"{block}/norm3/LayerNormalization"].input[1] != nodes[f"{block}/norm1/LayerNormalization"].input[1]
    ref, got = run_graph(pre, tiny_capture), run_graph(out, tiny_capture)
    assert max(float(np.abs(g - r).max()) for g, r in zip(got, ref)) < 1e-5


def test_gemm_and_matmul_sharing_one_input_share_one_scale(tmp_path):
    """A hand-made graph: x feeds a MatMul (W1 [4, 3]) and a Gemm with transB (W2 [5, 4]); both are smoothed with one
    s from max|x_j| and the larger of their weights' rows, and the outputs are unchanged."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(4, 3)).astype(np.float32)
    w2 = rng.normal(size=(5, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["y1"], name="a/MatMul"),
         helper.make_node("Gemm", ["x", "w2"], ["y2"], name="b/Gemm", transB=1)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y1", TensorProto.FLOAT, [2, 3]), helper.make_tensor_value_info("y2", TensorProto.FLOAT, [2, 5])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    src = tmp_path / "g.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))

    class Cap:
        xs = [rng.normal(size=(2, 4)).astype(np.float32) * np.array([1, 10, 100, 0.1], np.float32) for _ in range(3)]

        def indices(self):
            return list(range(len(self.xs)))

        def feeds(self, i):
            return {"x": self.xs[i]}

    cap = Cap()
    out = tmp_path / "s.onnx"
    info = S.smooth_graph(src, out, cap, ["a/MatMul", "b/Gemm"], 0.5, tmp_path)
    assert info["groups"] == 1 and info["layers"] == 2 and info["mul_nodes"] == 1
    x_amax = np.max(np.abs(np.stack(cap.xs)), axis=(0, 1))
    w_amax = np.maximum(np.abs(w1).max(axis=1), np.abs(w2).max(axis=0))
    expect = np.sqrt(x_amax) / np.sqrt(w_amax)
    m = onnx.load(str(out))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    np.testing.assert_allclose(1.0 / inits["x_smoothquant_inv_scale"], expect, rtol=1e-5)
    np.testing.assert_allclose(inits["w1"], w1 * expect[:, None], rtol=1e-5)
    np.testing.assert_allclose(inits["w2"], w2 * expect[None, :], rtol=1e-5)
    import onnxruntime as ort

    a, b = ort.InferenceSession(str(src)), ort.InferenceSession(str(out))
    for x in cap.xs:
        for r, g in zip(a.run(None, {"x": x}), b.run(None, {"x": x})):
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_smoothing_an_external_data_unet(pre, tiny_capture, tmp_path):
    """A UNet over 2 GB (SD 1.5) is stored with external data: the smoothed graph is written the same way, same outputs."""
    src = tmp_path / "ext.onnx"
    onnx.save_model(onnx.load(str(pre)), str(src), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.onnx.data", size_threshold=0)
    nodes, _ = Q.select_nodes(onnx.load(str(pre)), 2.5)
    out = tmp_path / "out" / "smoothed.onnx"
    out.parent.mkdir()
    S.smooth_graph(src, out, tiny_capture, nodes, 0.8, tmp_path, external=True)
    assert (out.parent / "smoothed.onnx.data").is_file()
    ref, got = run_graph(pre, tiny_capture), run_graph(out, tiny_capture)
    assert max(float(np.abs(g - r).max()) for g, r in zip(got, ref)) < 1e-5


def test_int8_of_an_external_data_unet_with_smoothquant(tiny_bundle, tiny_capture, tmp_path):
    """quantize_unet on a UNet stored as model.onnx + model.onnx_data: smoothing, calibration and QDQ all go through
    external data, and give the same int8 graph as the single-file UNet."""
    from onnx.external_data_helper import uses_external_data

    folder = tmp_path / "ext"
    folder.mkdir()
    onnx.save_model(onnx.load(str(tiny_bundle / "unet" / "model.onnx")), str(folder / "model.onnx"),
                    save_as_external_data=True, all_tensors_to_one_file=True, location="model.onnx_data", size_threshold=0)
    results = {}
    for name, src in (("ext", folder / "model.onnx"), ("plain", tiny_bundle / "unet" / "model.onnx")):
        out = tmp_path / f"{name}-out" / "int8.onnx"
        out.parent.mkdir()
        info = Q.quantize_unet(src, out, tiny_capture, "minmax", 3, "onnxruntime", "u8", smoothquant=0.8)
        assert info["smoothquant"]["layers"] == 40
        results[name] = run_graph(out, tiny_capture)
        if name == "ext":
            assert any(uses_external_data(t) for t in onnx.load(str(out), load_external_data=False).graph.initializer)
    for a, b in zip(results["ext"], results["plain"]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the int8 build

def test_int8_bundle_with_smoothquant_records_it_and_inspect_shows_it(tiny_bundle, tmp_path):
    out = tmp_path / "sq-int8"
    manifest = quantize_bundle(tiny_bundle, out, Int8Config(size=2, steps=3, quality_prompts=1, adherence_prompts=0,
                                                            method="minmax", level=3, smoothquant="0.8"))
    q = manifest["int8"]
    assert q["config"]["smoothquant"] == 0.8
    sq = q["quantisation"]["smoothquant"]
    assert sq["alpha"] == 0.8 and sq["layers"] == 40 and sq["mul_nodes"] > 0
    assert np.isfinite(q["quality"]["components"]["unet"]["sqnr_db"]) and q["quality"]["components"]["unet"]["sqnr_db"] > 5
    graph = onnx.load(str(out / "unet" / "model.onnx"))
    muls = [n for n in graph.graph.node if n.name.endswith("/SmoothQuantMul")]
    assert len(muls) == sq["mul_nodes"]
    # the smoothed activation is what gets quantised: the Mul's output feeds a QuantizeLinear
    q_inputs = {n.input[0] for n in graph.graph.node if n.op_type == "QuantizeLinear"}
    assert all(m.output[0] in q_inputs for m in muls)
    r = run_cli("inspect", str(out), "--no-hashes", timeout=120)
    assert r.returncode == 0, r.stderr
    assert "SmoothQuant" in r.stdout and "alpha 0.8 on 40 Linear layers" in r.stdout
    images = Pipeline.from_bundle(out)("a red circle", num_inference_steps=3, seed=1)
    assert np.asarray(images[0]).std() > 0


def test_inspect_says_smoothquant_off(tiny_bundle, tmp_path):
    from ldm_export.calibration.report import quality_rows

    out = tmp_path / "plain-int8"
    manifest = quantize_bundle(tiny_bundle, out, Int8Config(size=2, steps=2, quality_prompts=0, adherence_prompts=0))
    assert manifest["int8"]["quantisation"]["smoothquant"] is None and manifest["int8"]["config"]["smoothquant"] is None
    assert ("SmoothQuant", "off") in quality_rows(manifest)


def test_tensorrt_parses_and_builds_the_smoothed_graph(tiny_bundle, tiny_capture, tmp_path):
    pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX is not installed (pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings)")
    from ldm_export.calibration.tensorrt_check import parse_and_build, unet_profile
    from ldm_export.runtime.bundle import Bundle

    out = tmp_path / "trt.onnx"
    info = Q.quantize_unet(tiny_bundle / "unet" / "model.onnx", out, tiny_capture, "minmax", 3, "tensorrt", smoothquant=0.8)
    assert info["smoothquant"]["mul_nodes"] > 0
    result = parse_and_build(out, unet_profile(Bundle.open(tiny_bundle).spec("unet"), side=8))
    assert result["parsed"] and result["built"], result["errors"]


# ---------------------------------------------------------------- bad input: one line, nothing written

@pytest.mark.parametrize("extra,text", [
    (["--smoothquant", "1.5"], "--smoothquant '1.5' is not a migration strength; give alpha with 0 < alpha <= 1"),
    (["--smoothquant", "0"], "give alpha with 0 < alpha <= 1"),
    (["--smoothquant", "strong"], "give alpha with 0 < alpha <= 1"),
    (["--smoothquant", "0.8", "--quant-level", "1"], "quant level 1 quantises convolutions only"),
])
def test_bad_smoothquant_is_one_line_and_writes_nothing(tmp_path, extra, text):
    out = tmp_path / "b"
    r = run_cli("build", "--model", "tiny", "--random-weights", "--precision", "int8", "--out", str(out), *extra, timeout=300)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and text in lines[0], r.stderr
    assert not out.exists() and not list(tmp_path.glob(".b.*"))


def test_smoothquant_needs_int8(tmp_path):
    r = run_cli("build", "--model", "tiny", "--random-weights", "--smoothquant", "0.8", "--out", str(tmp_path / "b"))
    assert r.returncode == 2 and "add --precision int8" in r.stderr, r.stderr
    assert not (tmp_path / "b").exists()


def test_sweep_gives_rows_with_and_without_smoothquant(tiny_bundle):
    from ldm_export.calibration.sweep import sweep, table_markdown

    r = sweep(tiny_bundle, ["minmax"], [1.0, 3.0], size=1, steps=2, quality_prompts=1, adherence_prompts=0,
              fmt="onnxruntime", smoothquant=(None, 0.8))
    got = [(row["level"], row["smoothquant"] and row["smoothquant"]["alpha"]) for row in r["rows"]]
    assert got == [(1.0, None), (3.0, None), (3.0, 0.8)]  # level 1 has no Linear layer to smooth: no row
    assert all(np.isfinite(row["unet"]["sqnr_db"]) for row in r["rows"])
    assert r["rows"][2]["smoothquant"]["layers"] == 40
    assert "| minmax | 3 | 0.8 |" in table_markdown(r)
