"""Classifier-free guidance: closed-form cases, batch-2 vs sequential, diffusers' rescale, dtypes, call counts."""
from __future__ import annotations

import numpy as np
import pytest

from ldm_export.runtime.errors import LdmExportError
from ldm_export.runtime.guidance import guided_denoiser, rescale_noise_cfg

B, L, D, H, W = 2, 77, 8, 6, 5


class FakeUnet:
    """A nonlinear stand-in for the engine that records each call's feeds."""

    def __init__(self):
        self.calls = []

    def __call__(self, sample, timestep, encoder_hidden_states):
        self.calls.append((sample, timestep, encoder_hidden_states))
        assert timestep.shape == (sample.shape[0],) and timestep.dtype == np.float32
        ctx = encoder_hidden_states.astype(np.float64).mean(axis=(1, 2))[:, None, None, None]  # (N, 1, 1, 1)
        out = np.tanh(sample.astype(np.float64) * (1 + ctx) + 0.001 * timestep[:, None, None, None]) + ctx
        return out.astype(sample.dtype)


def const_unet(sample, timestep, encoder_hidden_states):
    """Returns each sample's first embedding value everywhere: CFG then has a closed form."""
    return np.broadcast_to(encoder_hidden_states[:, :1, :1, None], sample.shape).astype(sample.dtype)


@pytest.fixture
def emb():
    rng = np.random.default_rng(0)
    return rng.standard_normal((B, L, D)).astype(np.float32), rng.standard_normal((B, L, D)).astype(np.float32)


@pytest.fixture
def x():
    return np.random.default_rng(1).standard_normal((B, 4, H, W)).astype(np.float32)


def test_closed_form_guidance():
    cond = np.zeros((B, L, D), np.float32)
    uncond = np.zeros((B, L, D), np.float32)
    cond[:, 0, 0], uncond[:, 0, 0] = [1.0, 3.0], [0.5, -1.0]
    model = guided_denoiser(const_unet, cond, uncond, guidance_scale=7.5)
    out = model(np.zeros((B, 4, H, W), np.float32), 999)
    want = np.array([0.5 + 7.5 * (1.0 - 0.5), -1.0 + 7.5 * (3.0 + 1.0)], np.float32)
    np.testing.assert_allclose(out, np.broadcast_to(want[:, None, None, None], out.shape), rtol=1e-6)


@pytest.mark.parametrize("rescale", [0.0, 0.7])
def test_batch2_and_sequential_agree(emb, x, rescale):
    cond, uncond = emb
    unet_b, unet_s = FakeUnet(), FakeUnet()
    out_b = guided_denoiser(unet_b, cond, uncond, 7.5, rescale, "batch2")(x, 500.0)
    out_s = guided_denoiser(unet_s, cond, uncond, 7.5, rescale, "sequential")(x, 500.0)
    np.testing.assert_allclose(out_b, out_s, rtol=1e-6, atol=1e-6)
    assert [c[0].shape[0] for c in unet_b.calls] == [2 * B]
    assert [c[0].shape[0] for c in unet_s.calls] == [1] * (2 * B)
    # diffusers' order: the unconditional half first
    np.testing.assert_array_equal(unet_b.calls[0][2], np.concatenate([uncond, cond]))
    assert (unet_b.calls[0][1] == 500.0).all()


def test_rescale_matches_diffusers():
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg as ref

    rng = np.random.default_rng(2)
    cfg = rng.standard_normal((3, 4, 8, 8)) * 3.0
    text = rng.standard_normal((3, 4, 8, 8))
    for phi in (0.0, 0.3, 0.7, 1.0):
        want = ref(torch.from_numpy(cfg), torch.from_numpy(text), guidance_rescale=phi).numpy()
        np.testing.assert_allclose(rescale_noise_cfg(cfg, text, phi), want, rtol=1e-12, atol=1e-12)


def test_full_rescale_gives_the_conditional_std(emb, x):
    cond, uncond = emb
    unet = FakeUnet()
    out = guided_denoiser(unet, cond, uncond, 9.0, 1.0)(x, 10.0)
    text = FakeUnet()(x, np.full((B,), 10.0, np.float32), cond).astype(np.float64)
    np.testing.assert_allclose(out.std(axis=(1, 2, 3), ddof=1), text.std(axis=(1, 2, 3), ddof=1), rtol=1e-5)


@pytest.mark.parametrize("batch_mode, calls", [("batch2", [B]), ("sequential", [1] * B)])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_scale_at_most_one_skips_uncond(emb, x, batch_mode, calls, scale):
    cond, _ = emb
    unet = FakeUnet()
    out = guided_denoiser(unet, cond, None, scale, batch_mode=batch_mode)(x, 1.0)
    assert [c[0].shape[0] for c in unet.calls] == calls
    want = FakeUnet()(x, np.full((B,), 1.0, np.float32), cond)
    np.testing.assert_allclose(out, want, rtol=1e-6)


@pytest.mark.parametrize("batch_mode", ["batch2", "sequential"])
def test_float16_feeds_and_float32_or_64_results(emb, x, batch_mode):
    cond, uncond = emb
    unet = FakeUnet()
    model = guided_denoiser(unet, cond, uncond, 7.5, batch_mode=batch_mode, dtype=np.float16)
    out = model(x, 3.0)
    assert out.dtype == np.float32
    assert all(s.dtype == np.float16 and e.dtype == np.float16 for s, _, e in unet.calls)
    assert model(x.astype(np.float64), 3.0).dtype == np.float64
    # guidance itself is not done in float16: compare with float32 guidance over the same fp16 outputs
    ref = guided_denoiser(lambda s, t, e: FakeUnet()(s.astype(np.float16), t, e.astype(np.float16)).astype(np.float32),
                          cond, uncond, 7.5)(x, 3.0)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)


def test_single_embedding_broadcasts_over_batch(emb):
    cond, uncond = emb
    x3 = np.random.default_rng(3).standard_normal((3, 4, H, W)).astype(np.float32)
    out = guided_denoiser(FakeUnet(), cond[:1], uncond[:1], 5.0)(x3, 1.0)
    per = [guided_denoiser(FakeUnet(), cond[:1], uncond[:1], 5.0)(x3[i : i + 1], 1.0) for i in range(3)]
    np.testing.assert_allclose(out, np.concatenate(per), rtol=1e-6)


def test_bad_input_raises_ldm_export_error(emb, x):
    cond, uncond = emb
    with pytest.raises(LdmExportError, match="needs uncond_embeddings"):
        guided_denoiser(FakeUnet(), cond, None, 7.5)
    with pytest.raises(LdmExportError, match="batch_mode"):
        guided_denoiser(FakeUnet(), cond, uncond, 7.5, batch_mode="batch4")
    with pytest.raises(LdmExportError, match="differs from cond_embeddings"):
        guided_denoiser(FakeUnet(), cond, uncond[:, :10], 7.5)
    with pytest.raises(LdmExportError, match="guidance_rescale"):
        guided_denoiser(FakeUnet(), cond, uncond, 7.5, guidance_rescale=1.5)
    with pytest.raises(LdmExportError, match="cond_embeddings must be"):
        guided_denoiser(FakeUnet(), cond[0], uncond, 7.5)
    model = guided_denoiser(FakeUnet(), cond, uncond, 7.5)
    with pytest.raises(LdmExportError, match="latents batch 3"):
        model(np.zeros((3, 4, H, W), np.float32), 1.0)
    with pytest.raises(LdmExportError, match="latents must be"):
        model(x[0], 1.0)
