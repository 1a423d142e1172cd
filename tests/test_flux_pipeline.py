"""Flux.1 end to end: ``darkroom --batch`` on a tiny combined checkpoint (ComfyUI layout) against diffusers'
``FluxPipeline`` built from the same weights (dev and schnell, same seed, steps and guidance), the flow sigma
schedule against ``FlowMatchEulerDiscreteScheduler``, the deterministic samplers on flow sigmas, the Flux
conditioner (T5 length per variant, unprojected CLIP-L pooled vector, A1111 weights ignored, T5 offload), and
the request field ``guidance`` through the infotext."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from core.errors import RequestError
from core.metadata import format_infotext, infotext_to_request, read_request
from core.models.conditioning import EncoderSettings
from core.models.family import DynamicShift
from core.models.flux import pack_latents
from core.models.flux_conditioner import FluxConditioner, plain_prompt
from core.models.testing import write_random_flux_checkpoint
from core.pipeline import PromptCache, generate, load_model
from core.request import GenerationRequest, family_problems, family_warnings, with_family_defaults
from core.sampling.noise import NoiseSampler
from core.sampling.samplers import sample
from core.sampling.schedules import FlowSchedule, get_sigmas

pytest.importorskip("diffusers")
from tests.batch_harness import run_jobs
from tests.reference import flux_scheduler, psnr, reference_flux_pipeline, torch_threads  # noqa: E402

PROMPT = "a lighthouse at dusk, oil painting"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    for variant, seed in (("dev", 3), ("schnell", 4)):
        write_random_flux_checkpoint(root / "checkpoints" / f"flux-{variant}.safetensors", variant, seed=seed)
    return root


@pytest.fixture(scope="module")
def models(models_dir):
    return {v: load_model(models_dir / "checkpoints" / f"flux-{v}.safetensors", compute_hash=False)
            for v in ("dev", "schnell")}


# ---- the sigma schedule -----------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["dev", "schnell"])
@pytest.mark.parametrize("width,height,steps", [(1024, 1024, 4), (512, 512, 4), (768, 1344, 20), (64, 64, 3)])
def test_flow_sigmas_match_flux_pipeline_scheduler(variant, width, height, steps):
    import numpy as np
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from core.models.families import get_family

    tokens = (height // 16) * (width // 16)
    scheduler = flux_scheduler(variant)
    mu = calculate_shift(tokens, 256, 4096, 0.5, 1.15)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)  # what FluxPipeline passes
    schedule = get_family("flux").sampling.flow_schedule(variant, tokens)
    ours = get_sigmas("normal", schedule, steps)
    assert torch.allclose(ours, scheduler.sigmas.float(), atol=1e-6), (ours, scheduler.sigmas)
    assert torch.equal(get_sigmas("simple", schedule, steps), ours)
    assert DynamicShift().mu(tokens) == mu
    if variant == "schnell" and steps == 4:
        assert ours.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]  # sampling.md's golden values
    if variant == "dev" and (width, height, steps) == (1024, 1024, 4):
        assert torch.allclose(ours, torch.tensor([1, 0.9045, 0.7595, 0.5128, 0]), atol=1e-4)


def test_table_schedules_run_on_flow_sigmas():
    schedule = FlowSchedule(mu=1.15)
    for name in ("karras", "exponential", "beta", "sgm_uniform", "ddim_uniform"):
        sigmas = get_sigmas(name, schedule, 8)
        assert len(sigmas) == 9 and sigmas[-1] == 0 and bool((sigmas[:-1] > 0).all()) and sigmas[0] <= 1
        assert bool((sigmas[:-1] > sigmas[1:]).all()), name
    with pytest.raises(RequestError, match="Align Your Steps"):
        get_sigmas("ays", schedule, 8, family="flux")


def _gaussian_flow_denoiser(a: float):
    """Exact x0 = E[x0 | x_t] for data ~ N(0, a^2) under x_t = (1 - t) x0 + t noise."""

    def denoise(x, sigma):
        t = float(sigma)
        return x * ((1 - t) * a * a / ((1 - t) ** 2 * a * a + t * t))

    return denoise


def test_deterministic_samplers_solve_the_flow_ode():
    """From pure noise the flow ODE of N(0, a^2) data ends at ``a * noise``; every sampler Flux takes gets
    there on Flux.1 dev's shifted sigmas (one loop per algorithm, unchanged for flow)."""
    from core.models.families import get_family

    noise = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigmas = FlowSchedule(mu=1.15).reference(40).double()
    def error(name: str) -> float:
        out = sample(name, _gaussian_flow_denoiser(0.5), noise.clone(), sigmas)
        return float((out - 0.5 * noise).norm() / (0.5 * noise).norm())

    for name in get_family("flux").sampling.samplers:
        first_order = name in ("euler", "ddim")  # ddim without noise is the Euler step
        assert error(name) < (0.1 if first_order else 0.02), (name, error(name))
    assert error("euler_ancestral") > 0.5  # variance-exploding noise on flow sigmas: why it is refused


def test_ancestral_samplers_are_refused_for_flux_with_what_is_valid(models):
    problems = family_problems({"sampler": "euler_ancestral"}, "flux")
    assert len(problems) == 1 and problems[0].field == "sampler"
    assert "euler, heun" in str(problems[0]) and "Flux.1" in str(problems[0])
    assert family_problems({"sampler": "euler_ancestral"}, "sdxl") == []
    sizes = family_problems({"width": 72, "height": 64}, "flux")
    assert [(p.field, str(p)) for p in sizes] == [("width", "width = 72 is invalid: a multiple of 16 for Flux.1 models")]
    assert family_problems({"width": 72}, "sd15") == []
    request = GenerationRequest(model="x", sampler="dpmpp_2m_sde", steps=1, seed=1, width=64, height=64, cfg=1.0)
    with pytest.raises(RequestError, match="dpmpp_2m_sde"):
        generate(models["dev"], request)


def test_a_combined_file_with_t5s_tied_copy_and_a_clip_projection_loads_and_ignores_it(tmp_path):
    """transformers' T5EncoderModel.state_dict() also holds encoder.embed_tokens.weight (tied to shared.weight),
    and some CLIP-L exports keep text_projection: such a combined file loads, and vector_in still gets the
    unprojected pooled output."""
    from core.models.checkpoint import load_checkpoint
    from core.models.safetensors_writer import save_tensors
    from core.models.testing import iter_random_checkpoint

    tensors = dict(iter_random_checkpoint("flux", "tiny", seed=1))
    shared = tensors["text_encoders.t5xxl.transformer.shared.weight"]
    tensors["text_encoders.t5xxl.transformer.encoder.embed_tokens.weight"] = shared.clone()
    plain = load_checkpoint(save_tensors(tensors, tmp_path / "plain.safetensors"), dtype=torch.float32)
    tensors["text_encoders.clip_l.transformer.text_projection.weight"] = torch.randn(16, 32).half()
    loaded = load_checkpoint(save_tensors(tensors, tmp_path / "extras.safetensors"), dtype=torch.float32)
    assert torch.equal(loaded.components["text_encoder_2"].shared.weight, shared.float())
    assert loaded.components["text_encoder"].config.projection_dim == 16
    with_projection = FluxConditioner(loaded.components).encode(PROMPT, EncoderSettings())
    without = FluxConditioner(plain.components).encode(PROMPT, EncoderSettings())
    assert with_projection.pooled.shape == (1, 32) and torch.equal(with_projection.pooled, without.pooled)


# ---- the conditioner ----------------------------------------------------------------------------------------


def test_conditioner_t5_length_pooled_width_and_plain_prompt(models):
    for variant, length in (("dev", 512), ("schnell", 256)):
        cond = models[variant].conditioner.encode(PROMPT, EncoderSettings())
        assert cond.context.shape == (1, length, 32) and cond.pooled.shape == (1, 32)
        assert set(cond.model_kwargs()) == {"context", "y"}
    assert plain_prompt("a (red:1.3) [fox] BREAK (at night)") == "a red fox at night"
    conditioner = models["dev"].conditioner
    weighted = conditioner.encode("a (lighthouse:1.3) at dusk, ((oil painting))", EncoderSettings())
    plain = conditioner.encode("a lighthouse at dusk, oil painting", EncoderSettings())
    assert torch.equal(weighted.context, plain.context) and torch.equal(weighted.pooled, plain.pooled)
    warned = family_warnings(GenerationRequest(model="x", prompt="a (lighthouse:1.3)"), "flux")
    assert len(warned) == 1 and "ignored" in warned[0]
    assert family_warnings(GenerationRequest(model="x", prompt="a lighthouse"), "flux") == []
    assert family_warnings(GenerationRequest(model="x", prompt="a (lighthouse:1.3)"), "sdxl") == []


def test_clip_pooled_vector_is_not_projected(models):
    """A CLIP-L file with a text_projection (as some clip_l exports have) still feeds vector_in the raw pooled
    output, as transformers' CLIPTextModel pooler_output."""
    clip = models["dev"].checkpoint.components["text_encoder"]
    ids = torch.tensor([[49406, 320, 49407] + [49407] * 74])
    out = clip.encode(ids, project=False)
    assert torch.equal(out.pooled, out.hidden[0, 2][None])  # the final-normed state at EOS, as is


def test_t5_leaves_the_gpu_after_encoding_and_a_repeated_prompt_is_free(models, monkeypatch):
    model = models["dev"]
    conditioner: FluxConditioner = model.conditioner
    moves: list[str] = []
    monkeypatch.setattr(conditioner, "device", torch.device("cuda"))  # a GPU model, simulated
    monkeypatch.setattr(conditioner.t5, "to", lambda *a, **k: moves.append(str(a[0])) or conditioner.t5)
    monkeypatch.setattr(torch.Tensor, "to", _cpu_only(torch.Tensor.to))
    cache = PromptCache()
    runs = conditioner.t5_runs
    cache.encode(model, "a quiet harbour", EncoderSettings())
    assert moves == ["cuda", "cpu"]  # on the GPU to encode, then back to the CPU
    cache.encode(model, "a quiet harbour", EncoderSettings())
    assert conditioner.t5_runs == runs + 1 and cache.hits == 1 and moves == ["cuda", "cpu"]


def _cpu_only(original):
    """Tensor.to with any cuda device read as the CPU (the simulated GPU of the test above)."""

    def to(self, *args, **kwargs):
        args = tuple("cpu" if getattr(a, "type", a) == "cuda" else a for a in args)
        if getattr(kwargs.get("device"), "type", kwargs.get("device")) == "cuda":
            kwargs["device"] = "cpu"
        return original(self, *args, **kwargs)

    return to


# ---- guidance, cfg and the infotext -------------------------------------------------------------------------


def test_cfg_1_encodes_no_negative_prompt(models):
    model = models["schnell"]
    runs = model.conditioner.t5_runs
    request = GenerationRequest(model="x", prompt="a red barn", negative_prompt="fog", steps=1, cfg=1.0, seed=1,
                                width=64, height=64)
    generate(model, request, cache=PromptCache())
    assert model.conditioner.t5_runs == runs + 1  # the prompt only: no negative pass, nothing to encode for it
    generate(model, request.replace(cfg=2.0), cache=PromptCache())
    assert model.conditioner.t5_runs == runs + 3


def test_img2img_and_hires_run_on_flow_sigmas(models, tmp_path):
    """The hires pass gets the schedule of its own size (dev's shift follows the token count); img2img
    truncates the flow schedule like any other."""
    from core.request import HiresFix

    model = models["dev"]
    assert model.sigma_schedule(torch.zeros(1, 16, 8, 8)).mu != model.sigma_schedule(torch.zeros(1, 16, 16, 16)).mu
    request = GenerationRequest(model="x", prompt="a red barn", steps=2, cfg=1.0, seed=1, width=64, height=64,
                                hires=HiresFix(scale=1.5, steps=2, denoise=0.5))
    (image, _seed), = generate(model, request)
    assert image.size == (96, 96)
    image.save(tmp_path / "init.png")
    (image, _seed), = generate(model, request.replace(hires=None, init_image=str(tmp_path / "init.png")))
    assert image.size == (64, 64)


def test_guidance_field_defaults_infotext_and_read_back(models):
    request = GenerationRequest(model="flux-dev", prompt=PROMPT, guidance=4)
    assert request.guidance == 4.0 and isinstance(request.guidance, int | float)
    with pytest.raises(RequestError, match="guidance"):
        GenerationRequest(model="x", guidance=-1.0)
    assert models["dev"].guidance_for(None) == 3.5 and models["dev"].guidance_for(2.0) == 2.0
    assert models["schnell"].guidance_for(2.0) is None  # schnell has no guidance embedding
    text = format_infotext(request.replace(guidance=None), 5, extra={"Distilled CFG Scale": 3.5})
    assert "CFG scale: 7, Distilled CFG Scale: 3.5, Seed: 5" in text
    assert infotext_to_request(text).guidance == 3.5
    assert "Distilled CFG Scale: 4" in format_infotext(request, 5)
    assert family_problems(request.to_dict(), "sdxl")[0].field == "guidance"
    assert family_problems(request.to_dict(), "flux") == []
    # cfg 1 for Flux unless the job set it
    assert with_family_defaults(GenerationRequest(model="x"), "flux").cfg == 1.0
    assert with_family_defaults(GenerationRequest(model="x", cfg=7.0), "flux", given={"cfg"}).cfg == 7.0
    assert with_family_defaults(GenerationRequest(model="x"), "sdxl").cfg == 7.0


# ---- the proof: darkroom --batch against FluxPipeline -------------------------------------------------------


def _reference_image(pipe, req: GenerationRequest, variant: str) -> Image.Image:
    """FluxPipeline fed our starting noise (NoiseSampler: per-image CPU generator, [16, h/8, w/8], packed)."""
    noise = NoiseSampler([req.seed], (16, req.height // 8, req.width // 8)).initial()
    true_cfg = req.cfg > 1
    return pipe(
        prompt=req.prompt, negative_prompt=req.negative_prompt if true_cfg else None,
        true_cfg_scale=req.cfg if true_cfg else 1.0, num_inference_steps=req.steps,
        guidance_scale=req.guidance if req.guidance is not None else 3.5, height=req.height, width=req.width,
        latents=pack_latents(noise), max_sequence_length=512 if variant == "dev" else 256,
    ).images[0]


def test_batch_cli_matches_diffusers_flux_pipeline(models_dir, tmp_path, monkeypatch):
    """Three jobs in one ``darkroom --batch``: dev at its defaults (cfg left out: 1, guidance 3.5), dev with
    real CFG 2 and a negative prompt and guidance 5, schnell; each against FluxPipeline, PSNR >= 40 dB."""
    jobs = [
        {"model": "flux-dev", "prompt": PROMPT, "steps": 4, "seed": 11, "width": 64, "height": 96},
        {"model": "flux-dev", "prompt": PROMPT, "negative_prompt": "blurry, lowres", "cfg": 2.0, "guidance": 5.0,
         "sampler": "euler", "schedule": "simple", "steps": 3, "seed": 12, "width": 80, "height": 64},
        {"model": "flux-schnell", "prompt": PROMPT, "steps": 4, "seed": 13, "width": 64, "height": 64},
    ]
    paths, err = run_jobs(jobs, models_dir, tmp_path, monkeypatch)
    assert len(paths) == 3, paths
    pipes = {v: reference_flux_pipeline(models_dir / "checkpoints" / f"flux-{v}.safetensors", v)
             for v in ("dev", "schnell")}
    for path, job in zip(paths, jobs):
        variant = job["model"].removeprefix("flux-")
        recorded = read_request(path)
        assert recorded.cfg == job.get("cfg", 1.0)  # Flux's cfg default when the job leaves it out
        req = recorded.replace(guidance=job.get("guidance"))
        ours = Image.open(path).convert("RGB")
        assert ours.size == (job["width"], job["height"])
        assert max(hi - lo for lo, hi in ours.getextrema()) > 50  # an image, not a flat field
        value = psnr(ours, _reference_image(pipes[variant], req, variant))
        print(f"Flux.1 {variant} --batch vs FluxPipeline (cfg {req.cfg}): {value:.1f} dB")
        assert value >= 40
        info = Image.open(path).text["parameters"]
        if variant == "dev":
            assert f"Distilled CFG Scale: {job.get('guidance', 3.5):g}" in info
        else:
            assert "Distilled CFG Scale" not in info
