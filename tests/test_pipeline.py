"""The generation pipeline against diffusers' pipelines on the same random checkpoint, and its own behaviour."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from core.models.testing import write_random_checkpoint
from core.pipeline import InitImageError, PipelineRunner, PromptCache, generate, load_model
from core.request import GenerationRequest, HiresFix
from core.sampling import Cancelled
from tests.reference import psnr, reference_pipeline

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a lighthouse at dusk, oil painting"
NEGATIVE = "blurry, lowres"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    """A ComfyUI-style models folder with a tiny fp16 checkpoint (as real files are stored) and a second one."""
    root = tmp_path_factory.mktemp("models")
    write_random_checkpoint(root / "checkpoints" / "tiny.safetensors", "sd15", "tiny", seed=0)
    write_random_checkpoint(root / "checkpoints" / "other.safetensors", "sd15", "tiny", seed=1)
    return root


@pytest.fixture(scope="module")
def checkpoint(models_dir) -> Path:
    return models_dir / "checkpoints" / "tiny.safetensors"


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_model(checkpoint, compute_hash=False)


def request(**changes) -> GenerationRequest:
    base = GenerationRequest(
        model="tiny", prompt=PROMPT, negative_prompt=NEGATIVE, sampler="euler", schedule="normal",
        steps=4, cfg=7.0, seed=42, width=64, height=64,
    )
    return base.replace(**changes)


def _diffusers_txt2img(checkpoint, req: GenerationRequest) -> Image.Image:
    pipe = reference_pipeline(checkpoint)
    return pipe(
        prompt=req.prompt, negative_prompt=req.negative_prompt, num_inference_steps=req.steps,
        guidance_scale=req.cfg, generator=torch.Generator().manual_seed(req.seed),
        width=req.width, height=req.height,
    ).images[0]


def _diffusers_img2img(checkpoint, req: GenerationRequest, full_steps: int) -> Image.Image:
    pipe = reference_pipeline(checkpoint, img2img=True)
    return pipe(
        prompt=req.prompt, negative_prompt=req.negative_prompt, image=Image.open(req.init_image),
        strength=req.denoise, num_inference_steps=full_steps, guidance_scale=req.cfg,
        generator=torch.Generator().manual_seed(req.seed),
    ).images[0]


def test_batch_cli_matches_diffusers_txt2img_and_img2img(models_dir, checkpoint, tmp_path):
    """``darkroom --batch`` in a real subprocess; its PNGs against diffusers' pipelines (Euler, same seed).

    10 steps because diffusers' "linspace" spacing then lands on whole timesteps (999 = 9 x 111), where its
    linear sigma interpolation and our log-sigma one agree exactly. For img2img, diffusers runs
    ``strength x steps`` steps of the full schedule; we express the same sigmas as 5 steps at denoise 0.5.
    """
    init = tmp_path / "init.png"
    Image.effect_mandelbrot((64, 96), (-2, -1.2, 1, 1.2), 40).convert("RGB").save(init)
    txt = request(steps=10, width=64, height=96)
    img = request(steps=5, width=64, height=96, denoise=0.5, init_image=str(init), seed=7)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join(json.dumps(r.to_dict()) for r in (txt, img)))
    env = dict(os.environ, DARKROOM_HOME=str(tmp_path / "home"))
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", "--batch", str(jobs), "--models-dir", str(models_dir),
         "--output-dir", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    paths = [Path(line) for line in done.stdout.splitlines()]
    assert len(paths) == 2 and all(p.is_file() for p in paths), done.stdout

    assert psnr(Image.open(paths[0]).convert("RGB"), _diffusers_txt2img(checkpoint, txt)) >= 40
    assert psnr(Image.open(paths[1]).convert("RGB"), _diffusers_img2img(checkpoint, img, full_steps=10)) >= 40


def test_a_different_seed_gives_a_different_image(model):
    a = generate(model, request())[0][0]
    b = generate(model, request(seed=43))[0][0]
    assert psnr(a, b) < 30


def test_batch_images_equal_single_runs_with_seed_plus_index(model):
    """Image i of a job uses seed + i and does not depend on the batch it was made in."""
    batch = generate(model, request(batch_size=2, batch_count=2, steps=2))
    assert [seed for _, seed in batch] == [42, 43, 44, 45]
    single = generate(model, request(seed=44, steps=2))[0][0]
    assert psnr(batch[2][0], single) > 60


def test_prompt_cache_skips_the_text_encoder_on_repeat(model):
    cache = PromptCache()
    calls = []
    handle = model.checkpoint.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        generate(model, request(steps=1), cache=cache)
        first = len(calls)
        generate(model, request(steps=1, seed=5), cache=cache)
    finally:
        handle.remove()
    assert first == 2 and len(calls) == first  # prompt and negative once, then nothing
    assert cache.hits == 2


def test_cfg_one_runs_only_the_conditional_pass(model):
    batches = []
    handle = model.checkpoint.unet.register_forward_hook(lambda m, args, out: batches.append(args[0].shape[0]))
    try:
        generate(model, request(cfg=1.0, steps=2))
        generate(model, request(cfg=5.0, steps=2))
    finally:
        handle.remove()
    assert batches == [1, 1, 2, 2]


def test_steps_report_progress_and_cancel_stops_within_one_step(model):
    seen = []

    def on_step(step, total, x0):
        seen.append((step, total, tuple(x0.shape)))

    with pytest.raises(Cancelled):
        generate(model, request(steps=6), on_step=on_step, is_cancelled=lambda: len(seen) >= 2)
    assert seen == [(1, 6, (1, 4, 8, 8)), (2, 6, (1, 4, 8, 8))]


@pytest.mark.parametrize("upscaler", ["latent", "image"])
def test_hires_fix_doubles_the_size_and_counts_both_passes(model, upscaler):
    steps = []
    hires = HiresFix(scale=2.0, upscaler=upscaler, steps=2, denoise=0.5)
    images = generate(model, request(steps=3, hires=hires), on_step=lambda s, t, x: steps.append((s, t)))
    assert images[0][0].size == (128, 128)
    assert steps == [(i, 5) for i in range(1, 6)]
    plain = generate(model, request(steps=3))[0][0].resize((128, 128))
    assert psnr(images[0][0], plain) < 40  # the second pass changed the image


def test_missing_init_image_is_a_clear_error(model, tmp_path):
    with pytest.raises(InitImageError, match="init_image .*does not exist"):
        generate(model, request(init_image=str(tmp_path / "nope.png"), denoise=0.5))


def test_runner_keeps_the_model_and_switches_checkpoints(models_dir):
    runner = PipelineRunner([models_dir])
    first = runner.ensure_model(request())
    assert runner.ensure_model(request()) is first
    second = runner.ensure_model(request(model="other"))
    assert second is not first and runner.loaded_model == "other"
    assert not any(p.data_ptr() == q.data_ptr() for p in first.checkpoint.unet.parameters()
                   for q in list(second.checkpoint.unet.parameters())[:3])


class _Ctx:
    job_id = 1

    def is_cancelled(self) -> bool:
        return False

    def check_cancelled(self) -> None:
        pass

    def step(self, step, total, preview=None, image_index=0) -> None:
        pass

    def set_activity(self, text: str) -> None:
        pass


def test_a_job_from_an_image_made_with_another_file_of_its_model_warns(models_dir, checkpoint, caplog):
    """The request carries the image's model hash (``extra.made_with``, from its infotext); the runner hashes the
    model it loads anyway and says when the two differ, as the job's warning (a JobWarning)."""
    import logging
    from types import SimpleNamespace

    from core.models.hashes import model_hash

    runner = PipelineRunner([models_dir], previews=False)
    ours = model_hash(checkpoint)

    def warnings_of(made_with) -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="core"):
            runner.run(SimpleNamespace(id=1, request=request(steps=1, extra={"made_with": made_with})), _Ctx())
        return [m for m in caplog.messages if "model hash" in m]

    assert warnings_of({"model": "tiny", "hash": "0123456789"}) == [
        f"the image was made with model hash 0123456789; your tiny.safetensors is {ours}: a different file, the "
        "image will not reproduce exactly"]
    assert warnings_of({"model": "tiny", "hash": ours}) == []
    assert warnings_of({"model": "other", "hash": "0123456789"}) == []  # the hash of another model than the job's
