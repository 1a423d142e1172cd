"""The fp16 VAE overflow (the original SDXL VAE's): a float16 decode giving NaN/inf is redone in float32 and
that VAE stays in float32; a VAE broken in float32 too still fails the job with NonFiniteOutputError.

Simulated on the CPU in float16: one decoder weight scaled so its activations pass fp16's 65504 while float32
handles them (the group norms right after scale them back)."""

from __future__ import annotations

import pytest
import torch

import core.pipeline as pipeline
from core.models.testing import write_random_checkpoint
from core.pipeline import NonFiniteOutputError, decode, encode_images, generate, load_model
from core.request import GenerationRequest
from core.sampling.noise import NoiseSampler

BLOW_UP = 2.0**15  # a power of two: the scaled weights are exact in fp16 and fp32 alike


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "xl.safetensors", "sdxl", "tiny", seed=2)


@pytest.fixture(autouse=True)
def fresh_memory(monkeypatch):
    monkeypatch.setattr(pipeline, "_FP32_VAES", set())


def _overflowing(checkpoint, dtype=torch.float16, part="decoder"):
    model = load_model(checkpoint, dtype=dtype, compute_hash=False)
    with torch.no_grad():
        getattr(model.checkpoint.vae, part).conv_in.weight.mul_(BLOW_UP)
    return model


def _latents(dtype=torch.float16):
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).to(dtype)


def test_the_simulated_vae_overflows_in_fp16_and_not_in_fp32(checkpoint):
    half = _overflowing(checkpoint).checkpoint.vae
    full = _overflowing(checkpoint, torch.float32).checkpoint.vae
    with torch.inference_mode():
        assert not torch.isfinite(half.decode(_latents())).all()
        out = full.decode(_latents(torch.float32))
    assert torch.isfinite(out).all() and out.abs().max() < 100


def test_overflowing_fp16_decode_is_redone_in_fp32_and_remembered(checkpoint, monkeypatch):
    model = _overflowing(checkpoint)
    reference = _overflowing(checkpoint, torch.float32).checkpoint.vae
    calls = []
    original = pipeline._decode
    monkeypatch.setattr(pipeline, "_decode", lambda vae, z, tile=None: calls.append(vae.dtype) or original(vae, z, tile))

    pixels = decode(model, _latents())
    assert calls == [torch.float16, torch.float32]
    assert torch.isfinite(pixels).all() and model.checkpoint.vae.dtype == torch.float32
    with torch.inference_mode():
        assert torch.allclose(pixels, reference.decode(_latents().float()), atol=1e-5)

    calls.clear()
    decode(model, _latents())  # the same VAE: straight to fp32
    assert calls == [torch.float32]
    again = _overflowing(checkpoint)  # the same VAE file loaded again (a model switch and back)
    assert again.checkpoint.vae.dtype == torch.float16
    calls.clear()
    decode(again, _latents())
    assert calls == [torch.float32] and again.checkpoint.vae.dtype == torch.float32


def test_a_job_with_the_overflowing_vae_saves_an_image_and_the_unet_stays_fp16(checkpoint):
    model = _overflowing(checkpoint)
    request = GenerationRequest(model="xl", prompt="a lighthouse", steps=2, seed=1, width=64, height=64)
    (image, seed), = generate(model, request)
    assert image.size == (64, 64) and seed == 1
    assert model.checkpoint.vae.dtype == torch.float32 and model.checkpoint.unet.out[2].weight.dtype == torch.float16
    # img2img through the fp32 VAE hands the fp16 UNet fp16 latents
    path = checkpoint.parent / "init.png"
    image.save(path)
    (out, _), = generate(model, request.replace(init_image=str(path), denoise=0.5))
    assert out.size == (64, 64)


def test_a_vae_broken_in_fp32_too_still_fails_the_job(checkpoint):
    model = load_model(checkpoint, dtype=torch.float16, compute_hash=False)
    with torch.no_grad():
        model.checkpoint.vae.decoder.conv_in.bias.fill_(float("nan"))
    request = GenerationRequest(model="xl", prompt="a lighthouse", steps=1, seed=1, width=64, height=64)
    with pytest.raises(NonFiniteOutputError, match="VAE produced NaN"):
        generate(model, request)
    assert model.checkpoint.vae.dtype == torch.float32  # it was retried in fp32 before giving up


def test_overflowing_fp16_encode_is_redone_in_fp32_from_the_same_noise(checkpoint):
    """The SDXL VAE's encoder overflows in fp16 too (diffusers#7188): img2img, hires fix and inpainting got NaN
    latents and failed as if the weights were broken. Redone in fp32, each image's posterior draw is the one
    an fp32 encode makes from its seed."""
    model = _overflowing(checkpoint, part="encoder")
    reference = _overflowing(checkpoint, torch.float32, part="encoder").checkpoint.vae
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = encode_images(model, images.half(), NoiseSampler([5, 6], (4, 8, 8)))
    assert latents.dtype == torch.float16 and torch.isfinite(latents).all()
    assert model.checkpoint.vae.dtype == torch.float32
    with torch.inference_mode():
        expected = torch.cat([reference.encode(image[None].half().float(), generator=torch.Generator().manual_seed(s))
                              for image, s in zip(images, (5, 6))])
    assert torch.allclose(latents.float(), expected, atol=2e-3)
