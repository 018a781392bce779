"""Samplers: parity with diffusers' own scheduler classes, analytic cases, config errors, name resolution.

Parity threshold: max relative error 1e-5. diffusers keeps betas / alphas_cumprod / sigmas and its scalar
coefficients as float32 tensors (and Euler-type steps cast the sample to float32), while the runtime uses the
same float32 tables with float64 step arithmetic; that leaves ~1e-6 after 10-20 steps (see
docs/sampler_parity.md). Any algorithmic slip (a wrong sigma, order or coefficient) is >= 1e-3: the negative
control below shows it.
"""
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from ldm_export.parity.samplers import (FLOW_BASE, SD15_BASE, NoiseSequence, compare,  # noqa: E402
                                              diffusers_reference, max_relative_error, reference, stand_in_model)
from ldm_export.runtime import LdmExportError, resolve_scheduler, sample, sampler_names  # noqa: E402
from ldm_export.runtime import schedules as sch  # noqa: E402
from ldm_export.runtime.schedulers import canonical_sampler, build_plan  # noqa: E402

# diffusers 0.35.2 code paths emit numpy 2 DeprecationWarnings by the thousand; they say nothing about us.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

TOL = 1e-5
STEPS = 10

A1111_NAMES = ["DDIM", "DDPM", "PLMS", "LMS", "LMS Karras", "Euler", "Euler Karras", "Euler a", "Heun",
               "Heun Karras", "DPM2", "DPM2 Karras", "DPM2 a", "DPM2 a Karras", "DPM++ 2M", "DPM++ 2M Karras",
               "DPM++ 2M SDE", "DPM++ 2M SDE Karras", "DPM++ 2S", "DPM++ 2S Karras", "DPM++ 2S a",
               "DPM++ 2S a Karras", "UniPC", "LCM"]


def config_for(name, base=SD15_BASE, **extra):
    return dict(resolve_scheduler(name, base), **extra)


def assert_parity(config, steps=STEPS, **kwargs):
    error = compare(config, steps, **kwargs)
    assert error < TOL, f"{config['_class_name']} {config}: max relative error {error:.2e} >= {TOL}"


# ---------------------------------------------------------------- parity with diffusers


@pytest.mark.parametrize("name", A1111_NAMES)
def test_parity_sd15_config(name):
    assert_parity(config_for(name), steps=4 if name == "LCM" else STEPS)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("name", ["DDIM", "DDPM", "PLMS", "LMS", "Euler", "Euler a", "Heun", "DPM2", "DPM2 a",
                                  "DPM++ 2M", "DPM++ 2M SDE", "DPM++ 2S", "DPM++ 2S a", "UniPC", "LCM"])
def test_parity_prediction_types(name, prediction_type):
    config = config_for(name, prediction_type=prediction_type)
    if prediction_type == "sample" and name in ("PLMS", "Euler a", "DPM2", "DPM2 a"):
        with pytest.raises(LdmExportError, match="prediction_type"):
            build_plan(config, STEPS)
        return
    assert_parity(config, steps=4 if name == "LCM" else STEPS)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("name", ["DDIM", "DDPM", "PLMS", "LMS", "Euler", "Euler a", "Heun", "DPM2", "DPM2 a",
                                  "DPM++ 2M", "DPM++ 2M SDE", "DPM++ 2S a", "UniPC"])
def test_parity_timestep_spacing(name, spacing):
    # 7 steps: 1000 is not a multiple, so diffusers' `t - T // n` quirk (DDIM, PLMS) shows for linspace/trailing.
    assert_parity(config_for(name, timestep_spacing=spacing), steps=7)


@pytest.mark.parametrize("sigma_kind", ["use_karras_sigmas", "use_exponential_sigmas"])
@pytest.mark.parametrize("name", ["LMS", "Euler", "Heun", "DPM2", "DPM2 a", "DPM++ 2M", "DPM++ 2M SDE",
                                  "DPM++ 2S", "UniPC"])
def test_parity_sigma_schedules(name, sigma_kind):
    assert_parity(config_for(name, **{sigma_kind: True}))


@pytest.mark.parametrize("name,extra", [
    ("DDIM", {"clip_sample": True, "clip_sample_range": 0.8}),
    ("DDIM", {"set_alpha_to_one": True}),
    ("DDIM", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}),
    ("DDIM", {"beta_schedule": "squaredcos_cap_v2"}),
    ("DDIM", {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}),
    ("DDIM", {"trained_betas": list(np.linspace(0.0009, 0.011, 1000))}),
    ("DDPM", {"clip_sample": True}),
    ("DDPM", {"variance_type": "fixed_large"}),
    ("DDPM", {"variance_type": "fixed_small_log"}),
    ("DDPM", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}),
    ("Heun", {"clip_sample": True, "prediction_type": "sample", "clip_sample_range": 0.5}),
    ("Euler", {"final_sigmas_type": "sigma_min"}),
    ("Euler", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}),
    ("Euler", {"timestep_type": "continuous", "prediction_type": "v_prediction"}),
    ("Euler Karras", {"sigma_min": 0.1, "sigma_max": 10.0}),
    ("Euler a", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}),
    ("DPM2", {"beta_schedule": "squaredcos_cap_v2"}),
    ("DPM++ 2M", {"solver_order": 3}),
    ("DPM++ 2M", {"solver_order": 1}),
    ("DPM++ 2M", {"solver_type": "heun"}),
    ("DPM++ 2M", {"euler_at_final": True}),
    ("DPM++ 2M", {"final_sigmas_type": "sigma_min"}),
    ("DPM++ 2M", {"final_sigmas_type": "sigma_min", "lower_order_final": False}),
    ("DPM++ 2M", {"lambda_min_clipped": -5.1}),
    ("DPM++ 2M", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}),
    ("DPM++ 2M", {"beta_schedule": "squaredcos_cap_v2"}),
    ("DPM++ 2M SDE", {"solver_order": 3}),
    ("DPM++ 2M SDE", {"solver_type": "heun"}),
    ("DPM++ 2S", {"algorithm_type": "sde-dpmsolver++"}),
    ("DPM++ 2S", {"solver_type": "heun"}),
    ("DPM++ 2S", {"solver_order": 1}),
    ("DPM++ 2S", {"final_sigmas_type": "sigma_min"}),
    ("UniPC", {"solver_order": 3}),
    # diffusers returns NaN for bh1 or predict_x0=False when the final sigma is 0, so these use sigma_min.
    ("UniPC", {"solver_type": "bh1", "final_sigmas_type": "sigma_min"}),
    ("UniPC", {"predict_x0": False, "final_sigmas_type": "sigma_min"}),
    ("UniPC", {"predict_x0": False, "solver_order": 3, "final_sigmas_type": "sigma_min"}),
    ("UniPC", {"disable_corrector": [0, 3]}),
    ("UniPC", {"lower_order_final": False, "final_sigmas_type": "sigma_min"}),
    ("UniPC", {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}),
    ("UniPC", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}),
    ("LCM", {"original_inference_steps": 30, "timestep_scaling": 5.0}),
    ("LCM", {"clip_sample": True}),
])
def test_parity_config_keys(name, extra):
    assert_parity(config_for(name, **extra), steps=4 if name == "LCM" else STEPS)


@pytest.mark.parametrize("steps", [16, 25])
@pytest.mark.parametrize("name", ["DPM++ 2M", "DPM++ 2M SDE", "DPM++ 2S", "UniPC", "PLMS", "LMS"])
def test_parity_long_runs(name, steps):
    # >= 15 steps switches off DPM-Solver's lower-order tail; odd counts change the singlestep order list.
    assert_parity(config_for(name), steps=steps)


@pytest.mark.parametrize("extra", [{}, {"shift": 1.0}, {"shift_terminal": 0.1}, {"use_karras_sigmas": True},
                                   {"use_exponential_sigmas": True}])
def test_parity_flow_match_euler(extra):
    assert_parity(dict(resolve_scheduler("Euler", FLOW_BASE), **extra))


def test_parity_single_step_and_batch():
    assert_parity(config_for("DPM++ 2M SDE"), steps=1)
    assert_parity(config_for("Euler a"), steps=3, shape=(2, 4, 6, 5))


def test_negative_control_detects_a_different_sampler():
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8))
    ours = sample(stand_in_model, latents, config_for("Euler"), STEPS)
    theirs = diffusers_reference(config_for("Heun"), STEPS, stand_in_model, latents, NoiseSequence(1))
    assert max_relative_error(ours, theirs) > 1e-3
    # and different noise for a stochastic sampler is caught too
    ours = sample(stand_in_model, latents, config_for("Euler a"), STEPS, noise=NoiseSequence(5))
    theirs = reference(config_for("Euler a"), STEPS, stand_in_model, latents, NoiseSequence(1))
    assert max_relative_error(ours, theirs) > 1e-3


@pytest.mark.parametrize("name", ["Euler a", "DDPM", "DPM2 a", "DPM++ 2M SDE", "DPM++ 2S a", "LCM"])
def test_noise_draws_match_diffusers_count(name):
    config = config_for(name)
    steps = 4 if name == "LCM" else STEPS
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8))
    ours, theirs = NoiseSequence(1), NoiseSequence(1)
    sample(stand_in_model, latents, config, steps, noise=ours)
    reference(config, steps, stand_in_model, latents, theirs)
    assert ours.calls == theirs.calls > 0


def test_default_noise_is_seeded_and_callback_reports_each_step():
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8))
    seen = []
    first = sample(stand_in_model, latents, config_for("Euler a"), 6, callback=lambda i, n, x: seen.append((i, n)))
    second = sample(stand_in_model, latents, config_for("Euler a"), 6)
    np.testing.assert_array_equal(first, second)
    assert seen == [(i, 6) for i in range(6)]


def test_callback_latents_match_diffusers_latents():
    config = config_for("DPM++ 2M")
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8))
    seen = {}
    final = sample(stand_in_model, latents, config, 5, callback=lambda i, n, x: seen.setdefault(i, x.copy()))
    np.testing.assert_array_equal(seen[4], final)
    assert max_relative_error(seen[2], diffusers_reference(config, 5, stand_in_model, latents, None)) > 1e-3


def test_model_receives_diffusers_timesteps():
    import diffusers

    for name in ("DDIM", "Euler", "DPM++ 2M Karras", "UniPC"):
        config = config_for(name)
        got = []
        sample(lambda x, t: (got.append(t), np.zeros_like(x))[1], np.zeros((1, 1, 2, 2)), config, STEPS)
        scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
        scheduler.set_timesteps(STEPS)
        np.testing.assert_array_equal(np.array(got), scheduler.timesteps.numpy().astype(np.float64))
        assert all(isinstance(t, np.floating) for t in got)


def test_float32_latents_keep_their_dtype():
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    assert sample(stand_in_model, latents, config_for("Euler"), 3).dtype == np.float32


# ---------------------------------------------------------------- analytic cases


def _point_mass(shape=(1, 4, 8, 8)):
    return np.random.default_rng(3).uniform(-0.9, 0.9, size=shape)


@pytest.mark.parametrize("name", ["DDIM", "DDPM", "LMS", "LMS Karras", "Euler", "Euler Karras", "Heun",
                                  "DPM++ 2M", "DPM++ 2M Karras", "DPM++ 2M SDE", "DPM++ 2S", "DPM++ 2S a", "UniPC"])
def test_exact_x0_model_lands_on_the_point_mass(name):
    """A model that predicts the exact x0 of a point-mass data distribution must end exactly on it."""
    target = _point_mass()
    latents = np.random.default_rng(0).standard_normal(target.shape)
    config = config_for(name, prediction_type="sample", set_alpha_to_one=True)  # DDIM: final alpha 1
    out = sample(lambda x, t: target, latents, config, 8)
    np.testing.assert_allclose(out, target, rtol=0, atol=1e-8)  # DDPM's clamped 1e-20 variance leaves 1e-10


def test_exact_epsilon_model_lands_on_the_point_mass_ddim():
    config = config_for("DDIM", set_alpha_to_one=True)
    alphas_cumprod = sch.alphas_cumprod_from_config(dict(config, rescale_betas_zero_snr=False)).astype(np.float64)
    target = _point_mass()

    def exact_eps(x, t):  # x = sqrt(a) x0 + sqrt(1-a) eps for the point mass x0 = target
        a = alphas_cumprod[int(t)]
        return (x - np.sqrt(a) * target) / np.sqrt(1 - a)

    out = sample(exact_eps, np.random.default_rng(0).standard_normal(target.shape), config, 8)
    np.testing.assert_allclose(out, target, rtol=0, atol=1e-9)


def test_exact_velocity_lands_on_the_point_mass_flow():
    target = _point_mass()
    model = lambda x, t: (x - target) / (t / 1000.0)  # noqa: E731  x = (1-s) x0 + s n, v = n - x0 = (x - x0)/s
    out = sample(model, np.random.default_rng(0).standard_normal(target.shape),
                 resolve_scheduler("Euler", FLOW_BASE), 6)
    np.testing.assert_allclose(out, target, rtol=0, atol=1e-9)


def test_zero_model_euler_scales_noise_by_final_over_initial_sigma():
    """eps = 0 means D(x) = x: Euler leaves x unchanged, so latents come back times init_noise_sigma."""
    config = config_for("Euler", timestep_spacing="linspace")
    plan = build_plan(config, 5)
    latents = np.random.default_rng(0).standard_normal((1, 4, 4, 4))
    out = sample(lambda x, t: np.zeros_like(x), latents, config, 5)
    np.testing.assert_allclose(out, latents * plan.init_noise_sigma, rtol=1e-12)


# ---------------------------------------------------------------- schedules


def test_betas_and_alphas_cumprod_match_torch_to_float32_ulps():
    import torch

    for start, end, schedule in [(0.0001, 0.02, "linear"), (0.00085, 0.012, "scaled_linear")]:
        ours = sch.make_betas(1000, start, end, schedule)
        if schedule == "linear":
            theirs = torch.linspace(start, end, 1000, dtype=torch.float32).numpy()
        else:
            theirs = (torch.linspace(start ** 0.5, end ** 0.5, 1000, dtype=torch.float32) ** 2).numpy()
        assert ours.dtype == np.float32
        # torch's vectorised linspace rounds a few entries differently: at most a few float32 ulps.
        np.testing.assert_allclose(ours, theirs, rtol=5e-7, atol=0)
        # given the same betas, alphas_cumprod is bit-identical (torch accumulates float32 in float64)
        np.testing.assert_array_equal(sch.make_alphas_cumprod(theirs),
                                      torch.cumprod(1.0 - torch.from_numpy(theirs), 0).numpy())


def test_rescale_zero_snr_matches_diffusers():
    import torch
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr

    betas = sch.make_betas(1000, 0.00085, 0.012, "scaled_linear")
    ours = sch.make_alphas_cumprod(sch.rescale_betas_zero_snr(betas))
    theirs = torch.cumprod(1 - rescale_zero_terminal_snr(torch.from_numpy(betas)), 0).numpy()
    # torch's float32 sqrt differs from numpy's by an ulp on some entries; 1 - ratio then amplifies it in the
    # betas, so compare the alphas_cumprod that samplers use.
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-9)
    assert ours[-1] == 0.0


def test_karras_and_exponential_sigmas_endpoints_and_monotone():
    for sigmas in (sch.karras_sigmas(0.03, 14.6, 12), sch.exponential_sigmas(0.03, 14.6, 12)):
        assert sigmas[0] == pytest.approx(14.6) and sigmas[-1] == pytest.approx(0.03)
        assert np.all(np.diff(sigmas) < 0)


def test_sigma_to_t_inverts_the_training_table():
    table = sch.sigmas_from_alphas_cumprod(sch.make_alphas_cumprod(sch.make_betas(1000, 0.00085, 0.012,
                                                                                  "scaled_linear")))
    t = np.array([0, 1, 250, 731, 999])
    np.testing.assert_allclose(sch.sigma_to_t(table[t].astype(np.float64), np.log(table)), t, atol=1e-3)


@pytest.mark.parametrize("name", ["DDIM", "DDPM", "Euler", "Euler Karras", "Heun", "DPM2 Karras",
                                  "DPM++ 2M", "DPM++ 2M Karras", "DPM++ 2S", "UniPC", "LCM"])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_sigmas_and_timesteps_equal_diffusers(name, spacing):
    import diffusers

    config = config_for(name, timestep_spacing=spacing)
    steps = 4 if name == "LCM" else STEPS
    plan = build_plan(config, steps)
    scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps.numpy()
    if name in ("Heun", "DPM2 Karras"):
        timesteps = timesteps[::2]  # diffusers interleaves the second-order evaluations
    # Integer timesteps are equal; float ones and sigmas agree to float32 ulps (torch's linspace and sqrt round
    # a few entries of the beta/sigma tables differently from numpy's).
    np.testing.assert_allclose(plan.timesteps, timesteps.astype(np.float64), rtol=1e-6, atol=0)
    if timesteps.dtype == np.int64:
        np.testing.assert_array_equal(plan.timesteps, timesteps)
    if hasattr(scheduler, "sigmas") and name not in ("Heun", "DPM2 Karras", "DDIM", "DDPM", "LCM"):
        np.testing.assert_allclose(plan.levels, scheduler.sigmas.numpy().astype(np.float64), rtol=1e-6, atol=0)


# ---------------------------------------------------------------- config errors


@pytest.mark.parametrize("config,fragment", [
    ({"_class_name": "EulerDiscreteScheduler", "beta_shedule": "linear"}, "beta_shedule"),
    ({"_class_name": "DDIMScheduler", "thresholding": True}, "thresholding"),
    ({"_class_name": "PNDMScheduler", "skip_prk_steps": False}, "skip_prk_steps"),
    ({"_class_name": "PNDMScheduler"}, "skip_prk_steps"),
    ({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver",
      "final_sigmas_type": "sigma_min"}, "algorithm_type"),
    ({"_class_name": "DPMSolverSinglestepScheduler", "solver_order": 3}, "solver_order"),
    ({"_class_name": "EulerDiscreteScheduler", "use_beta_sigmas": True}, "use_beta_sigmas"),
    ({"_class_name": "EulerDiscreteScheduler", "interpolation_type": "log_linear"}, "interpolation_type"),
    ({"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": True, "use_exponential_sigmas": True},
     "use_exponential_sigmas"),
    ({"_class_name": "DDPMScheduler", "variance_type": "learned_range"}, "variance_type"),
    ({"_class_name": "UniPCMultistepScheduler", "use_flow_sigmas": True}, "use_flow_sigmas"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True}, "use_dynamic_shifting"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "stochastic_sampling": True}, "stochastic_sampling"),
    ({"_class_name": "EulerDiscreteScheduler", "beta_schedule": "sigmoid"}, "beta_schedule"),
    ({"_class_name": "EulerDiscreteScheduler", "timestep_spacing": "uniform"}, "timestep_spacing"),
    ({"_class_name": "EulerDiscreteScheduler", "final_sigmas_type": "one"}, "final_sigmas_type"),
    ({"_class_name": "DPMSolverSDEScheduler"}, "DPMSolverSDEScheduler"),
    ({}, "_class_name"),
])
def test_config_errors_name_the_key(config, fragment):
    with pytest.raises(LdmExportError, match=fragment):
        sample(stand_in_model, np.zeros((1, 4, 4, 4)), config, 5)


def test_error_messages_are_one_line():
    with pytest.raises(LdmExportError) as info:
        build_plan({"_class_name": "DDIMScheduler", "foo": 1}, 5)
    assert "\n" not in str(info.value) and "foo" in str(info.value)


def test_metadata_and_other_class_keys_are_accepted_without_changing_numerics():
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8))
    plain = config_for("DDIM")
    noisy = dict(plain, _diffusers_version="0.35.2", skip_prk_steps=True, use_karras_sigmas=True, solver_order=3)
    np.testing.assert_array_equal(sample(stand_in_model, latents, plain, 5),
                                  sample(stand_in_model, latents, noisy, 5))


def test_too_many_steps_for_lcm_is_an_error():
    with pytest.raises(LdmExportError, match="original_inference_steps"):
        build_plan(config_for("LCM"), 60)


# ---------------------------------------------------------------- names


def test_sampler_names_cover_the_a1111_list():
    names = sampler_names()
    for name in A1111_NAMES + ["EulerDiscreteScheduler", "FlowMatchEulerDiscreteScheduler"]:
        assert name in names


@pytest.mark.parametrize("name,class_name,karras", [
    ("Euler", "EulerDiscreteScheduler", False), ("Euler Karras", "EulerDiscreteScheduler", True),
    ("Euler a", "EulerAncestralDiscreteScheduler", None), ("DPM2 a", "KDPM2AncestralDiscreteScheduler", False),
    ("DPM++ 2M SDE Karras", "DPMSolverMultistepScheduler", True), ("LMS Karras", "LMSDiscreteScheduler", True),
    ("PLMS", "PNDMScheduler", None), ("UniPCMultistepScheduler", "UniPCMultistepScheduler", None),
])
def test_resolve_scheduler(name, class_name, karras):
    config = resolve_scheduler(name, SD15_BASE)
    assert config["_class_name"] == class_name
    assert config.get("use_karras_sigmas", False) == bool(karras)
    assert config["beta_schedule"] == "scaled_linear" and config["beta_start"] == 0.00085
    build_plan(config, 5)


def test_resolve_keeps_model_keys_and_drops_sampler_keys():
    base = dict(SD15_BASE, _class_name="DPMSolverMultistepScheduler", use_karras_sigmas=True,
                algorithm_type="sde-dpmsolver++", prediction_type="v_prediction", timestep_spacing="trailing")
    config = resolve_scheduler("Euler", base)
    assert "use_karras_sigmas" not in config and "algorithm_type" not in config
    assert config["prediction_type"] == "v_prediction" and config["timestep_spacing"] == "trailing"
    assert config["steps_offset"] == 1
    assert resolve_scheduler("DPM++ 2M SDE", base)["algorithm_type"] == "sde-dpmsolver++"
    assert resolve_scheduler("PLMS", base)["skip_prk_steps"] is True
    # the class name, as `ldm-export samplers` lists it, is PNDM as Stable Diffusion's configs set it (it was refused)
    assert resolve_scheduler("PNDMScheduler", base) == resolve_scheduler("PLMS", base)


def test_resolve_unknown_name_lists_known_ones():
    with pytest.raises(LdmExportError, match="unknown sampler 'Euler b'.*DPM\\+\\+ 2M Karras"):
        resolve_scheduler("Euler b", SD15_BASE)


def test_sampler_names_ignore_case_and_spacing_and_take_a1111_aliases():
    for given, known in (("euler a", "Euler a"), ("dpm++ 2m  karras", "DPM++ 2M Karras"), ("k_euler_a", "Euler a"),
                         ("K_DPMPP_2M", "DPM++ 2M"), ("eulerdiscretescheduler", "EulerDiscreteScheduler"),
                         ("ddim", "DDIM")):
        assert canonical_sampler(given) == known
        assert resolve_scheduler(given, SD15_BASE) == resolve_scheduler(known, SD15_BASE)
    assert canonical_sampler("Euler b") == "Euler b"  # unknown names stay as given, for the error to name


def test_resolve_flow_models():
    assert resolve_scheduler("Euler", FLOW_BASE)["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert resolve_scheduler("Euler", FLOW_BASE)["shift"] == 3.0
    with pytest.raises(LdmExportError, match="flow-matching"):
        resolve_scheduler("DDIM", FLOW_BASE)
    with pytest.raises(LdmExportError, match="noise-prediction"):
        resolve_scheduler("Euler (flow)", SD15_BASE)


@pytest.mark.parametrize("name,key", [("Euler Karras", "use_karras_sigmas"), ("Euler Exponential", "use_exponential_sigmas")])
def test_flow_models_take_euler_karras_and_exponential_as_diffusers_flow_scheduler_options(name, key):
    """Forge and ComfyUI run Karras and exponential schedules on SD3/FLUX; diffusers' FlowMatchEulerDiscreteScheduler
    has them as options. The runtime's plan had them, but no sampler name reached them ("use Euler"), and the
    metadata named flow Euler "Euler (flow)", which no A1111 or Forge knows."""
    diffusers = pytest.importorskip("diffusers")
    from ldm_export.runtime.schedulers import a1111_name, build_plan

    config = resolve_scheduler(name, FLOW_BASE)
    assert config["_class_name"] == "FlowMatchEulerDiscreteScheduler" and config[key] and config["shift"] == 3.0
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, **{key: True})
    ref.set_timesteps(12)
    np.testing.assert_allclose(build_plan(config, 12).levels, ref.sigmas.numpy(), rtol=1e-6, atol=1e-7)
    assert a1111_name(config) == name and a1111_name(resolve_scheduler("Euler", FLOW_BASE)) == "Euler"
    assert a1111_name(resolve_scheduler("Euler (flow)", FLOW_BASE)) == "Euler"  # the old name is still taken
    with pytest.raises(LdmExportError, match="flow-matching"):
        resolve_scheduler("Euler a", FLOW_BASE)


@pytest.mark.parametrize("name", ["Euler", "Euler a", "DPM++ 2M Karras", "DPM++ 2M SDE", "PLMS", "DDIM", "LMS Karras",
                                  "UniPC", "DPM++ 2S a"])
def test_a1111_name_inverts_resolve_scheduler(name):
    from ldm_export.runtime.schedulers import a1111_name, resolve_scheduler

    base = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "num_train_timesteps": 1000, "steps_offset": 1, "skip_prk_steps": True}
    assert a1111_name(resolve_scheduler(name, base)) == name


def test_a1111_name_falls_back_to_the_class_name():
    from ldm_export.runtime.schedulers import a1111_name

    assert a1111_name({"_class_name": "DPMSolverMultistepScheduler", "solver_order": 3}) == "DPMSolverMultistepScheduler"
