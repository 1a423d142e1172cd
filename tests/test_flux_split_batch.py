"""Flux.1 from the files users keep: ``darkroom --batch`` on a ComfyUI split set (BFL transformer, CLIP-L,
T5-XXL, VAE in their own folders) gives the image the same weights give as one combined checkpoint (which
tests/test_flux_pipeline.py proves against diffusers' FluxPipeline); the parts it picked are said on stderr
and recorded in the image; a GGUF Q8_0 copy of the transformer, dequantised per layer, stays close to it."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from core.metadata import infotext_to_request, read_request
from core.models import testing
from core.models.safetensors_writer import save_tensors
from tests.batch_harness import run_jobs
from tests.reference import psnr, torch_threads

PROMPT = "a lighthouse at dusk, oil painting"
PREFIXES = {"model": "model.diffusion_model.", "clip_l": "text_encoders.clip_l.transformer.",
            "t5xxl": "text_encoders.t5xxl.transformer.", "vae": "vae."}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("ComfyUI")
    files = testing.write_random_flux_split_set(root, variant="dev", seed=3)
    # the same tensors as one combined checkpoint, as ComfyUI saves it
    combined = {PREFIXES[name] + k: v for name in PREFIXES for k, v in load_file(files[name]).items()}
    (root / "models" / "checkpoints").mkdir()
    save_tensors(combined, root / "models" / "checkpoints" / "flux1-dev-combined.safetensors")
    # and the transformer as a GGUF Q8_0 (norms, biases and small matrices F32, as converters keep them)
    flux = {k: v.float() for k, v in load_file(files["model"]).items()}
    types = {k: "Q8_0" for k, v in flux.items() if v.dim() == 2 and v.shape[-1] % 32 == 0}
    testing.write_random_gguf(root / "models" / "unet" / "flux1-dev-Q8_0.gguf", flux, types)
    return root / "models"


def test_split_set_generates_what_the_combined_file_does(models_dir, tmp_path, monkeypatch):
    job = {"prompt": PROMPT, "steps": 3, "seed": 21, "width": 64, "height": 64}
    jobs = [{"model": "flux1-dev", **job}, {"model": "flux1-dev-combined", **job}, {"model": "flux1-dev-Q8_0", **job}]
    (split, combined, gguf), said = run_jobs(jobs, models_dir, tmp_path, monkeypatch)

    # Auto-picked by detected type, said on stderr, recorded in the image (so it reproduces).
    assert "clip_l.safetensors" in said and "t5xxl_fp16.safetensors" in said, said
    info = Image.open(split).text["parameters"]
    assert "clip_l" in info and "t5xxl_fp16" in info, info
    assert read_request(split).text_encoders == ()  # the request as queued: nothing named, parts auto-picked
    # ... and the infotext names what was used, so A1111-style PNG Info / Darkroom's own reuse pick the same
    assert set(infotext_to_request(info).text_encoders) == {"clip_l.safetensors", "t5xxl_fp16.safetensors"}

    a, b = Image.open(split).convert("RGB"), Image.open(combined).convert("RGB")
    assert max(hi - lo for lo, hi in a.getextrema()) > 50  # an image, not a flat field
    assert a.tobytes() == b.tobytes()  # the same weights, from four files or one
    value = psnr(Image.open(gguf).convert("RGB"), a)
    print(f"Flux.1 dev, Q8_0 transformer vs bf16: {value:.1f} dB")
    assert value >= 30
