"""SDXL refiner: its networks and aesthetic-score conditioning against diffusers/transformers loaded from the same
random single file, and a base + refiner ``darkroom --batch`` job against ``StableDiffusionXLPipeline``
(``denoising_end``) followed by ``StableDiffusionXLImg2ImgPipeline`` (``denoising_start``) on the same latents."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from core.metadata import format_infotext, infotext_to_request
from core.models.checkpoint import inspect_checkpoint, load_checkpoint
from core.models.conditioning import EncoderSettings
from core.models.safetensors_header import read_header
from core.models.sdxl_conditioner import SDXLRefinerConditioner
from core.models.testing import write_random_checkpoint
from core.pipeline import RefinerError, RefinerSwitch, generate, load_model
from core.request import GenerationRequest
from core.sampling.denoisers import DiscreteSchedule

pytest.importorskip("diffusers")
from tests.reference import (  # noqa: E402
    psnr,
    reference_refiner_pipeline,
    reference_sdxl_components,
    reference_sdxl_pipeline,
    rel_err,
    torch_threads,
)

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a lighthouse at dusk, oil painting"
NEGATIVE = "blurry, lowres"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    write_random_checkpoint(root / "checkpoints" / "xl.safetensors", "sdxl", "tiny", seed=5)
    write_random_checkpoint(root / "checkpoints" / "xl_refiner.safetensors", "sdxl_refiner", "tiny", seed=6)
    write_random_checkpoint(root / "checkpoints" / "sd15.safetensors", "sd15", "tiny", seed=7)
    return root


@pytest.fixture(scope="module")
def refiner_file(models_dir) -> Path:
    return models_dir / "checkpoints" / "xl_refiner.safetensors"


@pytest.fixture(scope="module")
def pair(refiner_file):
    return load_checkpoint(refiner_file, dtype=torch.float32), reference_sdxl_components(refiner_file, refiner=True)


def test_refiner_file_has_the_real_key_names_and_is_detected_by_them(refiner_file):
    shapes = read_header(refiner_file).shapes
    assert "conditioner.embedders.0.model.transformer.resblocks.0.attn.in_proj_weight" in shapes
    assert "conditioner.embedders.0.model.logit_scale" in shapes
    assert not any(k.startswith("conditioner.embedders.1.") for k in shapes)
    assert shapes["model.diffusion_model.label_emb.0.0.weight"][1] == 128 + 5 * 8
    assert inspect_checkpoint(refiner_file).family == "sdxl_refiner"


def test_refiner_networks_match_the_references(pair):
    ours, ref = pair
    ids = torch.randint(1, 49406, (2, 77), generator=torch.Generator().manual_seed(0))
    ids[:, 0], ids[:, 12] = 49406, 49407
    ids[:, 13:] = 0
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 12, generator=g)
    t = torch.tensor([150.0, 20.0])
    context = torch.randn(2, 77, 128, generator=g)
    pooled = torch.randn(2, 128, generator=g)
    time_ids = torch.tensor([[96.0, 64, 0, 0, 6.0], [1024, 1024, 0, 0, 2.5]])
    y = torch.cat([pooled, ref["unet"].add_time_proj(time_ids.flatten()).reshape(2, -1)], dim=1)
    with torch.no_grad():
        g_ref = ref["text_encoder_2"](ids, output_hidden_states=True)
        out = ours.components["text_encoder_2"].encode(ids, layer_from_end=2, final_norm=False)
        assert rel_err(out.hidden, g_ref.hidden_states[-2]) <= 1e-5
        assert rel_err(out.pooled, g_ref.text_embeds) <= 1e-5
        want = ref["unet"](x, t, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        assert rel_err(ours.unet(x, t, context, y), want) <= 1e-5


def test_refiner_conditioning_matches_diffusers_with_aesthetic_scores(pair, refiner_file):
    ours, ref = pair
    pipe = reference_refiner_pipeline(refiner_file)
    with torch.no_grad():
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
            PROMPT, device="cpu", do_classifier_free_guidance=True, negative_prompt=NEGATIVE
        )
    conditioner = SDXLRefinerConditioner(ours.components)
    cond = conditioner.for_image(conditioner.encode(PROMPT, EncoderSettings()), PROMPT, 64, 96, negative=False)
    uncond = conditioner.for_image(conditioner.encode(NEGATIVE, EncoderSettings()), NEGATIVE, 64, 96, negative=True)
    assert rel_err(cond.context, embeds) <= 1e-5 and rel_err(uncond.context, neg) <= 1e-5
    ids, neg_ids = pipe._get_add_time_ids(
        (96, 64), (0, 0), (96, 64), 6.0, 2.5, (96, 64), (0, 0), (96, 64), dtype=torch.float32,
        text_encoder_projection_dim=128,
    )
    proj = ref["unet"].add_time_proj
    assert rel_err(cond.extras["y"], torch.cat([pooled, proj(ids.flatten()).reshape(1, -1)], 1)) <= 1e-5
    assert rel_err(uncond.extras["y"], torch.cat([neg_pooled, proj(neg_ids.flatten()).reshape(1, -1)], 1)) <= 1e-5


def test_switch_goes_by_timestep_like_a1111_and_diffusers():
    schedule = DiscreteSchedule(0.00085, 0.012, 1000, "scaled_linear")
    calls = []
    switch = RefinerSwitch(lambda x, s: calls.append("base") or x, lambda x, s: calls.append("refiner") or x,
                           schedule, 0.8)
    for t in (999, 500, 200, 199, 0):
        switch(torch.zeros(1), schedule.t_to_sigma(torch.tensor(float(t))))
    assert calls == ["base", "base", "base", "refiner", "refiner"] and switch.refined


def _diffusers_base_then_refiner(base_file, refiner_file, req: GenerationRequest) -> Image.Image:
    base, refiner = reference_sdxl_pipeline(base_file), reference_refiner_pipeline(refiner_file)
    common = dict(prompt=req.prompt, negative_prompt=req.negative_prompt or None, num_inference_steps=req.steps,
                  guidance_scale=req.cfg)
    latents = base(**common, width=req.width, height=req.height, denoising_end=req.refiner_switch,
                   output_type="latent", generator=torch.Generator().manual_seed(req.seed)).images
    return refiner(**common, image=latents, denoising_start=req.refiner_switch,
                   generator=torch.Generator().manual_seed(req.seed)).images[0]


def test_batch_cli_base_plus_refiner_matches_diffusers(models_dir, refiner_file, tmp_path):
    """10 Euler steps at linspace spacing: timesteps 999, 888, ..., 111, 0; at 0.8 the base takes the eight
    with t >= 200 and the refiner 111 and 0, in diffusers and here. Euler adds no noise, so diffusers' fresh
    generator for the refiner call changes nothing."""
    base_file = models_dir / "checkpoints" / "xl.safetensors"
    req = GenerationRequest(model="xl", prompt=PROMPT, negative_prompt=NEGATIVE, sampler="euler", schedule="normal",
                            steps=10, cfg=6.0, seed=21, width=64, height=96, refiner="xl_refiner")
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps(req.to_dict()))
    env = dict(os.environ, DARKROOM_HOME=str(tmp_path / "home"), OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", "--batch", str(jobs), "--models-dir", str(models_dir),
         "--output-dir", str(tmp_path / "out")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    (path,) = [Path(line) for line in done.stdout.splitlines()]
    ours = Image.open(path)
    assert "Refiner: xl_refiner, Refiner switch at: 0.8" in ours.text["parameters"]
    assert json.loads(ours.text["darkroom"])["refiner"] == "xl_refiner"
    value = psnr(ours.convert("RGB"), _diffusers_base_then_refiner(base_file, refiner_file, req))
    print(f"SDXL base + refiner --batch vs diffusers base(denoising_end) + img2img(denoising_start): {value:.1f} dB")
    assert value >= 40
    # the refiner changed the image: without it the same job differs
    alone = generate(load_model(base_file, compute_hash=False), req.replace(refiner=None))[0][0]
    assert psnr(ours.convert("RGB"), alone) < 40


def test_refiner_switch_1_never_runs_the_refiner(models_dir):
    base = load_model(models_dir / "checkpoints" / "xl.safetensors", compute_hash=False)
    refiner = load_model(models_dir / "checkpoints" / "xl_refiner.safetensors", compute_hash=False)
    req = GenerationRequest(model="xl", prompt=PROMPT, steps=3, seed=2, width=64, height=64)
    plain = generate(base, req)[0][0]
    same = generate(base, req.replace(refiner="xl_refiner", refiner_switch=1.0), refiner=refiner)[0][0]
    assert psnr(plain, same) == float("inf")


def test_a_refiner_of_another_latent_space_is_refused(models_dir):
    base = load_model(models_dir / "checkpoints" / "xl.safetensors", compute_hash=False)
    sd15 = load_model(models_dir / "checkpoints" / "sd15.safetensors", compute_hash=False)
    req = GenerationRequest(model="xl", prompt=PROMPT, steps=1, seed=2, width=64, height=64, refiner="sd15")
    with pytest.raises(RefinerError, match="latent space"):
        generate(base, req, refiner=sd15)


def test_refiner_fields_validate_and_round_trip_through_the_infotext():
    req = GenerationRequest(model="xl", prompt="p", refiner="refiners/sd_xl_refiner_1.0.safetensors",
                            refiner_switch=0.7, seed=1)
    text = format_infotext(req, 1)
    assert "Refiner: sd_xl_refiner_1.0, Refiner switch at: 0.7" in text
    back = infotext_to_request(text)
    assert (back.refiner, back.refiner_switch) == ("sd_xl_refiner_1.0", 0.7)
    a1111 = "p\nSteps: 20, Seed: 1, Model: xl, Refiner: sd_xl_refiner_1.0 [7440042bbd], Refiner switch at: 0.8"
    assert infotext_to_request(a1111).refiner == "sd_xl_refiner_1.0"
    assert "Refiner" not in format_infotext(req.replace(refiner=None), 1)
    assert GenerationRequest.from_dict({"model": "xl", "refiner_switch": 1}).refiner_switch == 1.0
    with pytest.raises(Exception, match="refiner_switch"):
        GenerationRequest(model="xl", refiner="r", refiner_switch=0.0)
