"""Upscaler models in jobs: the hires fix's ``upscaler = "<model>"`` and the standalone upscale job, end to end
through ``--batch`` (in process, the real pipeline on a tiny SD1.5 checkpoint and a random ESRGAN), their infotext
read back, and the messages for a missing spandrel, an unknown upscaler and a typo of a built-in one."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from cli.batch import run_batch
from core.metadata import infotext_to_request, read_request
from core.models.testing import write_random_checkpoint, write_random_esrgan
from core.pipeline import decode, encode_images, generate, latents_to_images, load_model
from core.request import GenerationRequest, HiresFix
from core.upscale import UpscalerUnavailableError, load_upscaler, upscale_image
from tests.reference import torch_threads
from tests.spandrel_env import spandrel_imported


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def spandrel():
    with spandrel_imported() as module:
        yield module


@pytest.fixture(scope="module")
def models(tmp_path_factory, spandrel) -> Path:
    root = tmp_path_factory.mktemp("models")
    write_random_checkpoint(root / "checkpoints" / "tiny.safetensors", "sd15", "tiny", seed=0)
    write_random_esrgan(root / "upscale_models" / "4x-Tiny.safetensors", "esrgan", 4, filters=8)
    return root


def batch(tmp_path: Path, models: Path, jobs: str) -> tuple[int, list[str], str]:
    path = tmp_path / "jobs.toml"
    path.write_text(jobs)
    out, err = io.StringIO(), io.StringIO()
    code = run_batch(str(path), models_dirs=[models], output_dir=tmp_path / "out", db_path=tmp_path / "db",
                     stdout=out, stderr=err, rich_progress=False)
    return code, out.getvalue().split(), err.getvalue()


HIRES_JOB = """
[[job]]
model = "tiny"
prompt = "a lighthouse"
seed = 3
steps = 2
width = 64
height = 64
hires = { scale = 2, upscaler = "4x-Tiny", steps = 1, denoise = 0.4 }
"""


@pytest.fixture(scope="module")
def hires_image(models, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("hires")
    code, paths, err = batch(tmp, models, HIRES_JOB)
    assert code == 0, err
    (path,) = paths
    return Path(path)


def test_hires_fix_with_an_upscaler_model_through_batch_records_it(hires_image):
    with Image.open(hires_image) as image:
        assert image.size == (128, 128)
        text = image.info["parameters"]
    assert "Hires upscale: 2, Hires steps: 1, Hires upscaler: 4x-Tiny," in text
    assert infotext_to_request(text).hires == HiresFix(scale=2.0, upscaler="4x-Tiny", steps=1, denoise=0.4)
    assert read_request(hires_image).hires.upscaler == "4x-Tiny"


def test_the_hires_pass_starts_from_the_model_upscaled_image(models):
    """With hires denoise 0 the output is the first pass decoded, upscaled by the model (4x, then Lanczos to 2x),
    encoded and decoded: what A1111 does before its second pass, computed here step by step."""
    model = load_model(models / "checkpoints" / "tiny.safetensors", compute_hash=False)
    upscaler = load_upscaler(models / "upscale_models" / "4x-Tiny.safetensors")
    base = GenerationRequest(model="tiny", prompt="a lighthouse", seed=5, steps=2, width=64, height=64)
    with_model = base.replace(hires=HiresFix(scale=2.0, upscaler="4x-Tiny", steps=1, denoise=0.0))
    (got, _), = generate(model, with_model, upscaler=upscaler)
    (first, _), = generate(model, base)
    by_model = upscale_image(upscaler, first, 128, 128)
    noise = model.noise_sampler([5], 128, 128)
    pixels = torch.frombuffer(bytearray(by_model.tobytes()), dtype=torch.uint8).view(128, 128, 3)
    pixels = (pixels.permute(2, 0, 1)[None].float() / 127.5 - 1)
    (expected,) = latents_to_images(decode(model, encode_images(model, pixels, noise)))
    assert got.tobytes() == expected.tobytes()
    (lanczos, _), = generate(model, with_model.replace(hires=HiresFix(2.0, "image", 1, 0.0)))
    assert lanczos.tobytes() != got.tobytes()  # the model, not a resize, made it
    with pytest.raises(ValueError, match="upscaler model loaded"):
        generate(model, with_model)


def test_upscale_job_through_batch_keeps_the_source_parameters(hires_image, models, tmp_path):
    code, paths, err = batch(tmp_path, models, f'[[job]]\ninit_image = "{hires_image}"\nupscale = "4x-Tiny"\n')
    assert code == 0, err
    assert "upscale" in err and "step" not in err.split("upscale", 1)[0]
    (path,) = paths
    with Image.open(path) as image, Image.open(hires_image) as source:
        assert image.size == (512, 512)
        text = image.info["parameters"]
        assert text.startswith(source.info["parameters"].rsplit(", Version:", 1)[0] + ", Postprocess upscale by: 4,")
        upscaled = image.convert("RGB")
        src = source.convert("RGB")
    assert ", Postprocess upscale by: 4, Postprocess upscaler: 4x-Tiny, Version:" in text
    request = read_request(path)
    assert (request.model, request.seed, request.init_image, request.upscale.upscaler) == ("tiny", 3, None, "4x-Tiny")
    assert request.upscale.image == str(hires_image) and request.hires == read_request(hires_image).hires
    # the 128x128 source fits in one tile: spandrel's own call on the whole image, to rounding
    spandrel_model = load_upscaler(models / "upscale_models" / "4x-Tiny.safetensors").descriptor
    data = torch.frombuffer(bytearray(src.tobytes()), dtype=torch.uint8).view(128, 128, 3)
    reference = (spandrel_model(data.permute(2, 0, 1)[None].float() / 255)[0] * 255).round()
    ours = torch.frombuffer(bytearray(upscaled.tobytes()), dtype=torch.uint8).view(512, 512, 3).permute(2, 0, 1)
    assert float((ours.float() - reference).abs().max()) <= 1


def test_upscale_jobs_record_their_sources_not_the_defaults_of_the_sampled_jobs(hires_image, models, tmp_path):
    """A [defaults] model, seed and steps set up the file's sampled jobs; an upscale job's PNG keeps what its
    source records (a photo: nothing), where the defaults had replaced or overridden it."""
    photo = tmp_path / "photo.png"
    Image.effect_mandelbrot((40, 30), (-2, -1.2, 1, 1.2), 30).convert("RGB").save(photo)
    jobs = (f'[defaults]\nmodel = "tiny"\nseed = 11\nsteps = 9\n[[job]]\ninit_image = "{hires_image}"\n'
            f'upscale = "4x-Tiny"\n[[job]]\ninit_image = "{photo}"\nupscale = "4x-Tiny"\n')
    code, paths, err = batch(tmp_path, models, jobs)
    assert code == 0, err
    with Image.open(paths[0]) as image, Image.open(hires_image) as source:
        text = image.info["parameters"]
        assert text.startswith(source.info["parameters"].rsplit(", Version:", 1)[0] + ", Postprocess upscale by: 4,")
    assert (read_request(paths[0]).seed, read_request(paths[0]).steps) == (3, 2)
    with Image.open(paths[1]) as image:
        assert image.info["parameters"].startswith("Postprocess upscale by: 4, Postprocess upscaler: 4x-Tiny, Version:")


def test_upscale_job_of_a_photo_with_a_scale(models, tmp_path):
    photo = tmp_path / "photo.png"
    Image.effect_mandelbrot((40, 30), (-2, -1.2, 1, 1.2), 30).convert("RGB").save(photo)
    jobs = f'[[job]]\ninit_image = "{photo}"\nupscale = {{ upscaler = "4x-Tiny", scale = 2.5 }}\n'
    code, paths, err = batch(tmp_path, models, jobs)
    assert code == 0, err
    with Image.open(paths[0]) as image:
        assert image.size == (100, 75)
        text = image.info["parameters"]
    assert text.startswith("Postprocess upscale by: 2.5, Postprocess upscaler: 4x-Tiny, Version:")  # nothing else
    darkroom = json.loads(Image.open(paths[0]).info["darkroom"])
    assert darkroom["upscale"] == {"upscaler": "4x-Tiny", "image": str(photo), "scale": 2.5}
    assert darkroom["model"] == "" and darkroom["init_image"] is None


def test_unknown_upscaler_typo_and_missing_spandrel_are_one_message(models, tmp_path, monkeypatch):
    code, _, err = batch(tmp_path, models, HIRES_JOB.replace('"4x-Tiny"', '"4x-Tinny"'))
    assert code == 3 and "upscaler '4x-Tinny' not found" in err and "close matches: 4x-Tiny" in err
    code, _, err = batch(tmp_path, models, HIRES_JOB.replace('"4x-Tiny"', '"laten"'))
    assert code == 2 and "did you mean 'latent'?" in err
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "spandrel" else real(name, *a))
    code, paths, err = batch(tmp_path, models, HIRES_JOB)
    assert code == 3 and paths == [] and "pip install 'darkroom[upscale]'" in err and "Traceback" not in err


def test_the_runner_says_what_to_install_when_spandrel_does_not_import(models, monkeypatch):
    import sys

    from core.pipeline import PipelineRunner

    runner = PipelineRunner([models], previews=False)
    monkeypatch.setitem(sys.modules, "spandrel", None)
    with pytest.raises(UpscalerUnavailableError, match=r"model upscalers need spandrel.*pip install 'darkroom"):
        runner.ensure_upscaler("4x-Tiny")


def test_hires_upscaler_infotext_both_ways_and_request_checks():
    from core.errors import RequestError
    from core.metadata import format_infotext
    from core.request import Upscale

    hires = GenerationRequest(model="m", prompt="p", hires=HiresFix(2.0, "sub/4x-UltraSharp.pth", 0, 0.4))
    assert "Hires upscaler: 4x-UltraSharp," in format_infotext(hires, 1)
    line = "p\nSteps: 20, Sampler: Euler, Seed: 1, Size: 512x512, Model: m, Denoising strength: 0.4, Hires upscale: 2"
    for label, upscaler, kept in (("4x-UltraSharp", "4x-UltraSharp", None), ("Latent (nearest)", "latent", True),
                                  ("Lanczos", "image", None), ("Nearest", "image", True), ("None", "image", True)):
        request = infotext_to_request(f"{line}, Hires upscaler: {label}")
        assert request.hires.upscaler == upscaler and (request.extra.get("Hires upscaler") == label) == bool(kept)
    for value, hint in (("Latent", "did you mean 'latent'?"), ("imge", "did you mean 'image'?"), ("Lanczos", "did you mean 'image'?"),
                        ("Latent (nearest-exact)", "did you mean 'latent'?"),
                        ("", "latent, image or")):
        with pytest.raises(RequestError, match=hint):
            HiresFix(upscaler=value)
    with pytest.raises(RequestError, match="upscale.image"):
        GenerationRequest.from_dict({"upscale": {"upscaler": "4x-UltraSharp"}})
    with pytest.raises(RequestError, match="upscale.scale"):
        Upscale("4x-UltraSharp", "x.png", 0.5)
    with pytest.raises(RequestError, match="upscale.upscaler = 'latent' is invalid: the name of an upscaler model"):
        Upscale("latent", "x.png")
    with pytest.raises(RequestError, match="model"):  # only an upscale job may leave the model out
        GenerationRequest.from_dict({"prompt": "p"})
    job = GenerationRequest.from_dict({"upscale": {"upscaler": "4x-UltraSharp", "image": "x.png", "scale": 2}})
    assert job.model == "" and job.upscale == Upscale("4x-UltraSharp", "x.png", 2.0)
    assert GenerationRequest.from_dict(job.to_dict()) == job


def test_cancel_during_the_hires_upscale_stops_at_the_next_tile(models):
    from core.sampling import Cancelled

    model = load_model(models / "checkpoints" / "tiny.safetensors", compute_hash=False)
    upscaler = load_upscaler(models / "upscale_models" / "4x-Tiny.safetensors")
    upscaler.tile = 64  # the 64x64 first pass is one tile: cancelled right after it, before the hires pass
    def is_cancelled() -> bool:
        return upscaler.tiles_run > 0

    request = GenerationRequest(model="tiny", prompt="p", seed=1, steps=1, width=64, height=64,
                                hires=HiresFix(2.0, "4x-Tiny", 1, 0.5))
    with pytest.raises(Cancelled, match="while upscaling, after tile 1 of 1"):
        generate(model, request, upscaler=upscaler, is_cancelled=is_cancelled)
    assert upscaler.tiles_run == 1
