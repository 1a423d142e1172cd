"""The few-step LoRA presets: LCM-LoRA for SD1.5 and SDXL with the LCM sampler, and an SDXL-Lightning /
Hyper-SD style preset (Euler, trailing timesteps, CFG 1): they load, validate, name their LoRA, keep it when a
job adds its own, and the Lightning schedule is diffusers' "trailing" one."""

from __future__ import annotations

import pytest
import torch

from core.lora.tags import LoraRef
from core.models.families import FAMILIES
from core.presets import PresetError, apply_preset, find_preset, load_presets, validate_fields
from core.request import GenerationRequest

FEW_STEP = {"sd15-lcm-lora": ("sd15", "lcm-lora-sdv1-5"), "sdxl-lcm-lora": ("sdxl", "lcm-lora-sdxl"),
            "sdxl-lightning-4step": ("sdxl", "sdxl_lightning_4step_lora")}


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DARKROOM_HOME", str(tmp_path / "home"))


@pytest.mark.parametrize("name", sorted(FEW_STEP))
def test_few_step_presets_load_and_name_their_lora(name):
    presets, problems = load_presets()
    assert problems == []
    preset = find_preset(name, presets)
    family, lora = FEW_STEP[name]
    assert preset.builtin and preset.family == family and name in FAMILIES[family].presets
    request = GenerationRequest.from_dict(apply_preset(preset, {"model": "m", "prompt": "a fox"}))
    assert request.lora_refs() == (LoraRef(lora, 1.0),)
    assert request.steps == 4
    if "lcm" in name:
        assert (request.sampler, request.schedule, request.cfg) == ("lcm", "sgm_uniform", 1.5)
    else:
        assert (request.sampler, request.cfg) == ("euler", 1.0)
    # a job's own LoRA joins the preset's; the same name takes the job's weight
    joined = GenerationRequest.from_dict(apply_preset(preset, {"model": "m", "loras": [
        {"name": "style", "weight": 0.7}, {"name": lora, "weight": 0.5}]}))
    assert joined.lora_refs() == (LoraRef("style", 0.7), LoraRef(lora, 0.5))


def test_a_preset_lora_entry_is_checked():
    with pytest.raises(PresetError, match="loras"):
        validate_fields({"loras": {"name": "x"}})
    with pytest.raises(PresetError, match=r"loras\[0\]"):
        validate_fields({"loras": [{"name": "x", "strength": 1}]})


def test_the_lightning_schedule_is_trailing_timesteps():
    from diffusers import EulerDiscreteScheduler

    from core.sampling.schedules import get_sigmas

    preset = find_preset("sdxl-lightning-4step")
    schedule = FAMILIES["sdxl"].sampling.schedule()
    sigmas = get_sigmas(preset.fields["schedule"], schedule, preset.fields["steps"])
    ours = [round(float(t)) for t in schedule.sigma_to_t(sigmas[:-1])]
    reference = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="trailing")
    reference.set_timesteps(preset.fields["steps"])
    assert ours == [int(t) for t in reference.timesteps] == [999, 749, 499, 249]
    assert torch.allclose(sigmas[:-1].double(), reference.sigmas[:-1].double(), rtol=1e-4)
