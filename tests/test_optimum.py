"""Interoperability: Optimum's ONNX Runtime Stable Diffusion pipeline loads and runs our bundles."""
import os

import numpy as np
import pytest

if os.environ.get("LDM_EXPORT_REQUIRE_INTEROP") != "1":  # .ci/run's interop environment sets it: there it must run
    pytest.importorskip("optimum.onnxruntime", reason="needs the [interop] extra (optimum-onnx 0.1.0 pins diffusers 0.35 "
                        "and transformers 4.57); .ci/run runs this test in its own environment")
torch = pytest.importorskip("torch")


def test_optimum_pipeline_loads_and_runs_bundle(tiny_bundle):
    from optimum.onnxruntime import ORTStableDiffusionPipeline

    pipe = ORTStableDiffusionPipeline.from_pretrained(str(tiny_bundle), provider="CPUExecutionProvider")
    out = pipe("a red circle on the left", num_inference_steps=2, guidance_scale=7.5, height=64, width=64,
               output_type="np", generator=torch.Generator().manual_seed(0))
    images = out.images
    assert images.shape == (1, 64, 64, 3)
    assert np.isfinite(images).all() and images.std() > 0
    # the tokenizer it loaded from the bundle is CLIP's, with SD 1.x padding
    ids = pipe.tokenizer("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert ids[:7] == [49406, 320, 1125, 539, 320, 2368, 49407] and len(ids) == 77


def test_optimum_and_our_runtime_agree_on_text_embeddings(tiny_bundle):
    from optimum.onnxruntime import ORTStableDiffusionPipeline

    from ldm_export.runtime.pipeline import Pipeline

    theirs = ORTStableDiffusionPipeline.from_pretrained(str(tiny_bundle), provider="CPUExecutionProvider")
    ours = Pipeline.from_bundle(tiny_bundle)
    prompt = "A small yellow triangle, in the CENTER!"
    ids = theirs.tokenizer([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
    np.testing.assert_array_equal(ids.astype(np.int32), ours.tokenize([prompt]))
    emb_theirs = theirs.text_encoder(input_ids=ids.astype(np.int32))
    emb_theirs = emb_theirs[0] if isinstance(emb_theirs, (tuple, list)) else emb_theirs.last_hidden_state
    np.testing.assert_allclose(np.asarray(emb_theirs), ours.encode_prompt([prompt]), rtol=1e-5, atol=1e-5)
