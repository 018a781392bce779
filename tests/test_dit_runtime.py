"""DiT families, numpy side: FLUX packing and ids, flow matching with static and resolution-dependent shift
(parity with diffusers' FlowMatchEulerDiscreteScheduler), the T5 tokenizer against transformers' T5TokenizerFast."""
import logging

import numpy as np
import pytest

from ldm_export.runtime import flux
from ldm_export.runtime.errors import LdmExportError
from ldm_export.runtime.schedules import calculate_shift, flow_match_sigmas_shifted

torch = pytest.importorskip("torch")

from ldm_export.parity.samplers import (FLUX_DEV_BASE, FLUX_SCHNELL_BASE, TABLE_ROWS, compare,  # noqa: E402
                                        flux_schedule, row_schedule)
from ldm_export.runtime.schedulers import resolve_scheduler  # noqa: E402


# ------------------------------------------------------------------------------------------------ FLUX latents

@pytest.mark.parametrize("h,w", [(8, 8), (8, 12), (128, 128)])
def test_pack_unpack_and_ids_equal_fluxpipeline(h, w):
    from diffusers import FluxPipeline

    latents = np.random.default_rng(0).standard_normal((2, 16, h, w)).astype(np.float32)
    ref = FluxPipeline._pack_latents(torch.from_numpy(latents), 2, 16, h, w).numpy()
    packed = flux.pack_latents(latents)
    np.testing.assert_array_equal(packed, ref)
    # _unpack_latents takes the image size and the VAE scale factor (8): latents h x w are image 8h x 8w
    back = FluxPipeline._unpack_latents(torch.from_numpy(packed), 8 * h, 8 * w, 8).numpy()
    np.testing.assert_array_equal(flux.unpack_latents(packed, h, w), back)
    np.testing.assert_array_equal(back, latents)
    ids = FluxPipeline._prepare_latent_image_ids(2, h // 2, w // 2, "cpu", torch.float32).numpy()
    np.testing.assert_array_equal(flux.image_ids(h, w), ids)
    assert flux.text_ids(7).shape == (7, 3) and not flux.text_ids(7).any()


def test_odd_latent_size_is_refused():
    with pytest.raises(LdmExportError, match="multiple of 16"):
        flux.pack_latents(np.zeros((1, 16, 9, 8), np.float32))


# ------------------------------------------------------------------------------------------------ flow shift

@pytest.mark.parametrize("seq", [256, 1024, 4096, 6000])
def test_calculate_shift_equals_diffusers(seq):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift as ref

    keys = ("base_image_seq_len", "max_image_seq_len", "base_shift", "max_shift")
    assert calculate_shift(seq, *(FLUX_DEV_BASE[k] for k in keys)) == pytest.approx(ref(seq, *(FLUX_DEV_BASE[k] for k in keys)))
    assert calculate_shift(256) == pytest.approx(0.5) and calculate_shift(4096) == pytest.approx(1.15)


def test_dynamic_exponential_shift_equals_static_shift_exp_mu():
    s = np.linspace(1.0, 0.05, 20)
    mu = 0.9
    dyn = flow_match_sigmas_shifted(20, use_dynamic_shifting=True, mu=mu, sigmas=s)
    static = flow_match_sigmas_shifted(20, shift=float(np.exp(mu)), sigmas=s)
    np.testing.assert_allclose(dyn, static, rtol=1e-6)


FLOW_ROWS = [r for r in TABLE_ROWS if len(r) == 5]


@pytest.mark.parametrize("row", FLOW_ROWS, ids=lambda r: r[0])
def test_flow_shift_parity_with_diffusers(row):
    label, name, base, extra = row[:4]
    config = dict(resolve_scheduler(name, base), **extra)
    assert compare(config, 12, **row_schedule(config, 12, row)) < 2e-6


def test_mu_changes_the_result():
    """The parity above is not vacuous: another mu gives another image."""
    config = resolve_scheduler("Euler", FLUX_DEV_BASE)
    right = flux_schedule(config, 12, 4096)
    from ldm_export.parity.samplers import NoiseSequence, max_relative_error, reference, stand_in_model
    from ldm_export.runtime import sample

    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8))
    ours_wrong = sample(stand_in_model, latents, config, 12, mu=0.5, sigmas=right["sigmas"])
    theirs = reference(config, 12, stand_in_model, latents, NoiseSequence(1), **right)
    assert max_relative_error(ours_wrong, theirs) > 1e-3


def test_dynamic_shift_without_mu_is_one_line_error():
    from ldm_export.runtime import sample

    with pytest.raises(LdmExportError, match="needs mu"):
        sample(lambda x, t: x, np.zeros((1, 4, 8, 8)), resolve_scheduler("Euler", FLUX_DEV_BASE), 4)


def test_custom_sigmas_refused_for_noise_prediction_samplers():
    from ldm_export.parity.samplers import SD15_BASE
    from ldm_export.runtime import sample

    with pytest.raises(LdmExportError, match="flow matching only"):
        sample(lambda x, t: x, np.zeros((1, 4, 8, 8)), resolve_scheduler("Euler", SD15_BASE), 4, sigmas=np.ones(4))


def test_schnell_config_carries_through_resolve_scheduler():
    config = resolve_scheduler("Euler", FLUX_SCHNELL_BASE)
    assert config["use_dynamic_shifting"] is False and config["shift"] == 1.0
    assert resolve_scheduler("Euler", FLUX_DEV_BASE)["use_dynamic_shifting"] is True


# ------------------------------------------------------------------------------------------------ T5 tokenizer

@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory):
    from ldm_export.export.t5_tokenizer import write_standin_t5_tokenizer

    return write_standin_t5_tokenizer(tmp_path_factory.mktemp("t5tok"), vocab_size=600)


PROMPTS = ["a red circle on the left", "A  Photograph of an Astronaut riding a horse, 4k!", "", "ünïcödé ﬁne text",
           "there is a small purple triangle in the lower part of the image against a gray background"]


@pytest.mark.parametrize("max_length", [8, 16, 64])
def test_t5_ids_equal_t5tokenizerfast(t5_folder, max_length):
    from transformers import T5TokenizerFast

    from ldm_export.runtime.tokenizer_t5 import T5Tokenizer

    ours = T5Tokenizer(t5_folder, max_length=max_length)(PROMPTS)
    ref = T5TokenizerFast.from_pretrained(str(t5_folder))(PROMPTS, padding="max_length", max_length=max_length,
                                                          truncation=True, add_special_tokens=True).input_ids
    np.testing.assert_array_equal(ours, np.array(ref, dtype=np.int32))
    assert ours.dtype == np.int32 and ours.shape == (len(PROMPTS), max_length)
    assert (ours == 1).sum(axis=1).min() == 1  # every row ends its prompt with </s>


def test_t5_truncation_warns_with_the_cut_text(t5_folder, caplog):
    from ldm_export.runtime.tokenizer_t5 import T5Tokenizer

    tok = T5Tokenizer(t5_folder, max_length=6)
    with caplog.at_level(logging.WARNING, logger="ldm_export.runtime.tokenizer_t5"):
        ids = tok(["a red circle on the left of a blue square"])
    assert ids[0, -1] == tok.eos_id
    msg = caplog.text
    assert "truncated" in msg and "square" in msg and "T5 takes at most 6 tokens" in msg
    # a batch repeats each prompt per image and holds the negative prompts too: one warning per prompt, named by
    # its start (it said "prompt 0" for a negative prompt, once per image)
    caplog.clear()
    long_negative = "blurry low quality picture of many things " * 3
    with caplog.at_level(logging.WARNING, logger="ldm_export.runtime.tokenizer_t5"):
        tok([long_negative] * 3)
    assert len(caplog.records) == 1
    assert caplog.records[0].getMessage().startswith("the prompt 'blurry low quality picture of many ...' was truncated")


def test_t5_tokenizer_missing_file_is_one_line_error(tmp_path):
    from ldm_export.runtime.tokenizer_t5 import T5Tokenizer

    with pytest.raises(LdmExportError, match="tokenizer.json is missing"):
        T5Tokenizer(tmp_path)


def test_the_standin_t5_tokenizer_is_the_same_file_every_time(tmp_path):
    """Two random-weights builds of one seed drew different images: the stand-in tokenizer was trained by
    `tokenizers`' Unigram trainer, whose result changes from run to run. Its vocabulary is built now."""
    from ldm_export.export.t5_tokenizer import write_standin_t5_tokenizer
    from ldm_export.runtime.tokenizer_t5 import T5Tokenizer

    a = write_standin_t5_tokenizer(tmp_path / "a", vocab_size=300)
    b = write_standin_t5_tokenizer(tmp_path / "b", vocab_size=300)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    ids = T5Tokenizer(a, max_length=12)(["a red circle on the left", "zebra"])
    assert ids[0, :7].tolist() == [*ids[0, :6].tolist(), 1] and 2 not in ids[0]  # six word pieces, then </s>
    assert 2 not in ids[1] and (ids[1] > 0).sum() == 7  # an unknown word splits into the mark and its letters
