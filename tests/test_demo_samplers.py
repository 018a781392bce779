"""Every sampler that applies to the demo model draws the prompt's colour and position (the adherence checker)."""
from __future__ import annotations

import json
import logging

import pytest

from ldm_export.runtime.errors import LdmExportError
from ldm_export.runtime.schedulers import _A1111, DEFAULTS, resolve_scheduler, sampler_names

pytestmark = pytest.mark.skipif(not __import__("conftest").torch_available(), reason="building the demo bundle needs torch")

FLOW = "FlowMatchEulerDiscreteScheduler"
# Every A1111 name that applies to an epsilon model (the class names select the same samplers).
SAMPLERS = [n for n in sampler_names() if n not in DEFAULTS and _A1111[n][0] != FLOW]
# What each sampler needs on this model: 20 steps at guidance 3 (the demo's best adherence), except PLMS's 4th-order
# extrapolation (50 steps) and LCM, which samples non-distilled models at few steps and low guidance.
NEEDS = {"PLMS": (50, 3.0), "LCM": (4, 1.5)}


def _cases():
    from ldm_export.demo.data import prompt_cases

    return prompt_cases()[::30]  # 4 prompts: 4 colours, 4 shapes, 4 positions


@pytest.fixture(scope="module")
def demo_pipe(demo_bundle):
    from ldm_export.runtime.pipeline import Pipeline

    return Pipeline.from_bundle(demo_bundle)


def test_every_applicable_sampler_is_tested():
    assert len(SAMPLERS) == 32 and "Euler (flow)" not in SAMPLERS and {"DDIM", "DDPM", "PLMS", "LCM"} <= set(SAMPLERS)


@pytest.mark.parametrize("name", SAMPLERS)
def test_sampler_draws_the_prompts_colour_and_position(demo_pipe, name):
    from ldm_export.demo.adherence import initial_latents, read_image, score

    cases = _cases()
    steps, guidance = NEEDS.get(name, (20, 3.0))
    images = demo_pipe([c[0] for c in cases], num_inference_steps=steps, guidance_scale=guidance, seed=0,
                       scheduler=name, latents=initial_latents(len(cases), 0))
    readings = [read_image(im) for im in images]
    acc = score(readings, cases)
    assert acc["colour"] == 100.0 and acc["position"] == 100.0, (name, acc, [(r.colour, r.position) for r in readings])


def test_bundle_scheduler_config_carries_the_full_schedule(demo_bundle):
    config = json.loads((demo_bundle / "scheduler" / "scheduler_config.json").read_text())
    assert {k: config.get(k) for k in ("clip_sample", "set_alpha_to_one", "skip_prk_steps", "steps_offset")} == {
        "clip_sample": False, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1}


@pytest.mark.parametrize("model", ["demo", "sd15", "sd21", "tiny"])
def test_every_zoo_schedule_names_the_keys_other_samplers_read(model):
    from ldm_export.zoo import get_model

    config = get_model(model).scheduler
    for key in ("clip_sample", "set_alpha_to_one", "skip_prk_steps", "steps_offset", "timestep_spacing",
                "beta_schedule", "beta_start", "beta_end", "prediction_type"):
        if key == "timestep_spacing" and config["_class_name"] == "PNDMScheduler":
            continue  # PNDM's own default ("leading") is SD's
        assert key in config or key in DEFAULTS[config["_class_name"]], (model, key)
    for key in ("clip_sample", "set_alpha_to_one", "skip_prk_steps"):
        assert key in config, (model, key)


def test_flow_matching_is_refused_on_an_epsilon_model_in_one_line(demo_pipe):
    with pytest.raises(LdmExportError, match="does not fit a noise-prediction model") as e:
        demo_pipe("a red circle", num_inference_steps=2, scheduler="Euler (flow)")
    assert "\n" not in str(e.value)


def test_lcm_warns_once_on_a_model_not_distilled_for_it(demo_pipe, caplog):
    from ldm_export.runtime import schedulers

    schedulers._WARNED.discard("lcm")
    with caplog.at_level(logging.WARNING, logger="ldm_export.runtime.schedulers"):
        demo_pipe("a red circle", num_inference_steps=2, scheduler="LCM")
        demo_pipe("a red circle", num_inference_steps=2, scheduler="LCM")
    lcm = [r for r in caplog.records if "distilled" in r.getMessage()]
    assert len(lcm) == 1
    caplog.clear()
    schedulers._WARNED.discard("lcm")
    with caplog.at_level(logging.WARNING, logger="ldm_export.runtime.schedulers"):
        resolve_scheduler("LCM", {"_class_name": "LCMScheduler"})
    assert not caplog.records
