"""SDXL base: our networks and conditioner loaded from a random single-file checkpoint in the real SDXL layout
against diffusers/transformers loaded from the same file through diffusers' single-file converters, and
``darkroom --batch`` against ``StableDiffusionXLPipeline`` (same weights, seed, Euler steps)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from core.models.checkpoint import inspect_checkpoint, load_checkpoint
from core.models.conditioning import EncoderSettings
from core.models.safetensors_header import read_header
from core.models.sdxl_conditioner import SDXLConditioner
from core.models.testing import write_random_checkpoint
from core.pipeline import load_model
from core.request import GenerationRequest

pytest.importorskip("diffusers")
from tests.reference import (  # noqa: E402
    psnr,
    reference_sdxl_components,
    reference_sdxl_pipeline,
    rel_err,
    torch_threads,
)

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a (lighthouse:1.3) at dusk, oil painting"
NEGATIVE = "blurry, lowres"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    write_random_checkpoint(root / "checkpoints" / "xl.safetensors", "sdxl", "tiny", seed=5)  # fp16, as shipped
    return root


@pytest.fixture(scope="module")
def checkpoint(models_dir) -> Path:
    return models_dir / "checkpoints" / "xl.safetensors"


@pytest.fixture(scope="module")
def pair(checkpoint):
    return load_checkpoint(checkpoint, dtype=torch.float32), reference_sdxl_components(checkpoint)


@pytest.fixture(scope="module")
def pipe(checkpoint):
    return reference_sdxl_pipeline(checkpoint)


def test_file_has_the_real_sdxl_key_names_and_is_detected_by_them(checkpoint):
    shapes = read_header(checkpoint).shapes
    for key in (
        "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
        "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
        "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
        "conditioner.embedders.1.model.text_projection",
        "conditioner.embedders.1.model.logit_scale",
        "model.diffusion_model.label_emb.0.0.weight",
        "first_stage_model.decoder.conv_in.weight",
    ):
        assert key in shapes, key
    assert shapes["model.diffusion_model.label_emb.0.0.weight"][1] == 128 + 6 * 8
    renamed = checkpoint.with_name("model.safetensors")  # the name says nothing; the keys say SDXL
    renamed.write_bytes(checkpoint.read_bytes())
    try:
        info = inspect_checkpoint(renamed)
    finally:
        renamed.unlink()
    assert (info.family, info.variant, info.prediction) == ("sdxl", "base", "eps")


def test_text_encoders_match_transformers(pair):
    ours, ref = pair
    ids = torch.randint(1, 49406, (2, 77), generator=torch.Generator().manual_seed(0))
    ids[:, 0], ids[0, 9], ids[1, 30] = 49406, 49407, 49407
    ids[0, 10:], ids[1, 31:] = 0, 0  # tokenizer_2's "!" padding
    with torch.no_grad():
        l_ref = ref["text_encoder"](ids, output_hidden_states=True)
        assert rel_err(ours.text_encoder(ids, clip_skip=2, final_norm=False), l_ref.hidden_states[-2]) <= 1e-5
        g_ref = ref["text_encoder_2"](ids, output_hidden_states=True)
        g = ours.components["text_encoder_2"].encode(ids, layer_from_end=2, final_norm=False)
        assert rel_err(g.hidden, g_ref.hidden_states[-2]) <= 1e-5
        assert rel_err(g.pooled, g_ref.text_embeds) <= 1e-5


def test_unet_and_vae_match_diffusers(pair):
    ours, ref = pair
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 12, generator=g)
    t = torch.tensor([999.0, 10.5])
    context = torch.randn(2, 77, 160, generator=g)
    pooled = torch.randn(2, 128, generator=g)
    time_ids = torch.tensor([[96.0, 64, 0, 0, 96, 64], [1024, 768, 16, 32, 1024, 768]])
    y = torch.cat([pooled, ref["unet"].add_time_proj(time_ids.flatten()).reshape(2, -1)], dim=1)
    with torch.no_grad():
        want = ref["unet"](x, t, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        assert rel_err(ours.unet(x, t, context, y), want) <= 1e-5
        latents = torch.randn(1, 4, 6, 8, generator=g)
        scale = ours.vae.config.scaling_factor
        assert scale == 0.13025
        assert rel_err(ours.vae.decode(latents), ref["vae"].decode(latents / scale).sample) <= 1e-5
        images = torch.rand(1, 3, 32, 48, generator=g) * 2 - 1
        expected = ref["vae"].encode(images).latent_dist.mean * scale
        assert rel_err(ours.vae.encode(images, sample=False), expected) <= 1e-5


def test_conditioner_matches_diffusers_encode_prompt(pair, pipe):
    """Context (CLIP-L + bigG penultimate states, 2048 wide at full size) and pooled vector of one chunk, and
    the size vector y as diffusers builds it (add_time_ids through add_time_proj)."""
    ours, ref = pair
    plain = "a lighthouse at dusk, oil painting"
    with torch.no_grad():
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
            plain, device="cpu", do_classifier_free_guidance=True, negative_prompt=NEGATIVE
        )
    conditioner = SDXLConditioner(ours.components)
    cond = conditioner.encode(plain, EncoderSettings())
    uncond = conditioner.encode(NEGATIVE, EncoderSettings())
    assert cond.context.shape == (1, 77, 160)
    assert rel_err(cond.context, embeds) <= 1e-5 and rel_err(uncond.context, neg) <= 1e-5
    assert rel_err(cond.pooled, pooled) <= 1e-5 and rel_err(uncond.pooled, neg_pooled) <= 1e-5

    full = conditioner.for_image(cond, plain, 64, 96, negative=False)
    time_ids = pipe._get_add_time_ids((96, 64), (0, 0), (96, 64), dtype=torch.float32,
                                      text_encoder_projection_dim=128)
    want_y = torch.cat([pooled, ref["unet"].add_time_proj(time_ids.flatten()).reshape(1, -1)], dim=1)
    assert rel_err(full.extras["y"], want_y) <= 1e-5


def test_empty_negative_prompt_is_zeros_but_keeps_its_size_features(pair):
    """A1111/Forge force_zero_negative_prompt and diffusers' force_zeros_for_empty_prompt for SDXL."""
    ours, _ = pair
    conditioner = SDXLConditioner(ours.components)
    empty = conditioner.encode("", EncoderSettings())
    assert empty.context.abs().sum() > 0  # the empty prompt itself encodes to real states (padding chunks)
    neg = conditioner.for_image(empty, "", 64, 64, negative=True)
    assert not neg.context.any() and not neg.pooled.any()
    assert neg.extras["y"][:, :128].abs().sum() == 0 and neg.extras["y"][:, 128:].abs().sum() > 0
    pos = conditioner.for_image(empty, "", 64, 64, negative=False)  # an empty *prompt* is encoded
    assert torch.equal(pos.context, empty.context)


def test_weighting_and_chunks_apply_to_both_encoders(pair):
    ours, _ = pair
    conditioner = SDXLConditioner(ours.components)
    plain = conditioner.encode("a lighthouse at dusk", EncoderSettings())
    weighted = conditioner.encode("a (lighthouse:1.5) at dusk", EncoderSettings())
    # the emphasis changes both halves of the context (CLIP-L's 32 and bigG's 128 columns), not the pooled vector
    assert not torch.allclose(plain.context[..., :32], weighted.context[..., :32])
    assert not torch.allclose(plain.context[..., 32:], weighted.context[..., 32:])
    assert torch.equal(plain.pooled, weighted.pooled)
    long = conditioner.encode(", ".join(["a red lighthouse"] * 30), EncoderSettings())
    first = conditioner.encode(", ".join(["a red lighthouse"] * 30) + " BREAK x", EncoderSettings())
    assert long.tokens == 77 * 2 and first.tokens == 77 * 3
    assert torch.equal(long.pooled, first.pooled)  # the pooled vector comes from the first chunk


def test_size_vector_follows_the_image_size(pair):
    ours, _ = pair
    conditioner = SDXLConditioner(ours.components)
    cond = conditioner.encode("x", EncoderSettings())
    a = conditioner.for_image(cond, "x", 64, 96, negative=False).extras["y"]
    b = conditioner.for_image(cond, "x", 96, 64, negative=False).extras["y"]
    assert a.shape == (1, 176) and not torch.equal(a, b)


def _diffusers_txt2img(pipe, req: GenerationRequest) -> Image.Image:
    return pipe(
        prompt=req.prompt, negative_prompt=req.negative_prompt or None, num_inference_steps=req.steps,
        guidance_scale=req.cfg, generator=torch.Generator().manual_seed(req.seed),
        width=req.width, height=req.height,
    ).images[0]


def test_batch_cli_matches_diffusers_sdxl_pipeline(models_dir, pipe, tmp_path):
    """``darkroom --batch`` in a subprocess against ``StableDiffusionXLPipeline``, Euler, 10 steps (whole
    timesteps under "linspace" spacing, see test_pipeline). An empty negative prompt is passed to diffusers as
    ``None`` so its ``force_zeros_for_empty_prompt`` zeroes it, as A1111 and we do; a non-empty one is encoded
    on both sides."""
    plain = "a lighthouse at dusk, oil painting"  # diffusers has no A1111 weighting
    base = GenerationRequest(model="xl", prompt=plain, negative_prompt=NEGATIVE, sampler="euler",
                             schedule="normal", steps=10, cfg=6.0, seed=11, width=64, height=96)
    jobs = [base, base.replace(negative_prompt="", seed=12)]
    job_file = tmp_path / "jobs.jsonl"
    job_file.write_text("\n".join(json.dumps(r.to_dict()) for r in jobs))
    env = dict(os.environ, DARKROOM_HOME=str(tmp_path / "home"), OMP_NUM_THREADS="1")
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", "--batch", str(job_file), "--models-dir", str(models_dir),
         "--output-dir", str(tmp_path / "out")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    print(f"darkroom --batch: {time.monotonic() - started:.1f} s")
    paths = [Path(line) for line in done.stdout.splitlines()]
    assert len(paths) == 2, done.stdout
    for path, req in zip(paths, jobs):
        ours = Image.open(path).convert("RGB")
        assert ours.size == (64, 96)
        started = time.monotonic()
        value = psnr(ours, _diffusers_txt2img(pipe, req))
        print(f"diffusers: {time.monotonic() - started:.1f} s")
        print(f"SDXL --batch vs StableDiffusionXLPipeline (negative {req.negative_prompt!r}): {value:.1f} dB")
        assert value >= 40


def test_prompt_weighting_changes_the_image(checkpoint):
    from core.pipeline import generate

    model = load_model(checkpoint, compute_hash=False)
    req = GenerationRequest(model="xl", prompt="a lighthouse at dusk", steps=2, seed=3, width=64, height=64)
    a = generate(model, req)[0][0]
    b = generate(model, req.replace(prompt=PROMPT))[0][0]
    assert psnr(a, b) < 60


CONFIGS = Path("/work/shared/data/model-configs/stabilityai")


@pytest.mark.parametrize("family,repo", [("sdxl", "stable-diffusion-xl-base-1.0"),
                                         ("sdxl_refiner", "stable-diffusion-xl-refiner-1.0")])
def test_full_size_layouts_are_the_released_models(family, repo):
    """testing.py's full-size files (built on meta here, no memory) have the released encoders' shapes."""
    from core.models.families import get_family

    folder = CONFIGS / repo
    if not folder.is_dir():
        pytest.skip("shared model configs not available")
    spec = get_family(family)
    # the refiner's diffusers repo (as copied here) keeps its one encoder, bigG, in text_encoder/
    subs = {"text_encoder_2": "text_encoder"} if family == "sdxl_refiner" else {r: r for r in
                                                                                ("text_encoder", "text_encoder_2")}
    for role, sub in subs.items():
        component = spec.component(role)
        real = json.loads((folder / sub / "config.json").read_text())
        cfg = component.config_class()(**component.presets["full"])
        assert (cfg.width, cfg.layers, cfg.intermediate, cfg.max_positions, cfg.vocab_size) == (
            real["hidden_size"], real["num_hidden_layers"], real["intermediate_size"],
            real["max_position_embeddings"], real["vocab_size"],
        )
        assert cfg.heads == real["num_attention_heads"]
    unet = json.loads((folder / "unet" / "config.json").read_text())
    with torch.device("meta"):
        shapes = {c.prefix + k: tuple(v.shape) for c in spec.components
                  for k, v in c.network_class()(c.config_class()(**c.presets["full"])).state_dict().items()}
    assert shapes["model.diffusion_model.label_emb.0.0.weight"] == (
        unet["block_out_channels"][0] * 4, unet["projection_class_embeddings_input_dim"]
    )
    big_g = spec.component("text_encoder_2").prefix
    assert shapes[big_g + "transformer.resblocks.31.attn.in_proj_weight"] == (3840, 1280)
    assert shapes[big_g + "text_projection"] == (1280, 1280)
    params = sum(torch.Size(s).numel() for s in shapes.values())
    # the released fp16 files: 6.94 GB (base), 6.08 GB (refiner)
    assert params == pytest.approx(3.47e9 if family == "sdxl" else 3.04e9, rel=0.01)


def test_hires_pass_is_conditioned_on_its_own_size(checkpoint, monkeypatch):
    """A1111 builds the second pass's SDXL conditioning for the upscaled size."""
    from core.pipeline import generate
    from core.request import HiresFix

    model = load_model(checkpoint, compute_hash=False)
    sizes = []
    original = type(model.conditioner).for_image

    def spy(self, cond, text, width, height, *, negative):
        sizes.append((width, height, negative))
        return original(self, cond, text, width, height, negative=negative)

    monkeypatch.setattr(type(model.conditioner), "for_image", spy)
    req = GenerationRequest(model="xl", prompt="a lighthouse", steps=1, seed=3, width=64, height=64,
                            hires=HiresFix(scale=1.5, upscaler="latent", steps=1, denoise=0.5))
    (image, _), = generate(model, req)
    assert image.size == (96, 96)
    assert sizes == [(64, 64, False), (64, 64, True), (96, 96, False), (96, 96, True)]
