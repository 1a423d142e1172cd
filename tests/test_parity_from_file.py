"""Our networks loaded from a random single-file checkpoint equal the references loaded from the same file.

The per-module tests compare the networks on in-memory weights; this one goes through the real file path on
both sides: ``write_random_checkpoint`` -> our ``load_checkpoint`` vs diffusers' single-file converters.
"""

from __future__ import annotations

import pytest
import torch

from core.models.checkpoint import load_checkpoint
from core.models.testing import write_random_checkpoint
from tests.reference import reference_components


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path = write_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", "sd15", "tiny",
                                   seed=3, dtype=torch.float32)
    return load_checkpoint(path), reference_components(path)


@pytest.mark.parametrize("batch,height,width", [(1, 8, 8), (2, 8, 12)])
def test_unet_from_file(pair, batch, height, width):
    ours, ref = pair
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 4, height, width, generator=g)
    t = torch.tensor([999.0, 10.5][:batch])
    context = torch.randn(batch, 77, ours.unet.config.context_dim, generator=g)
    with torch.no_grad():
        assert rel_err(ours.unet(x, t, context), ref["unet"](x, t, context).sample) <= 1e-5


def test_text_encoder_from_file(pair):
    ours, ref = pair
    ids = torch.randint(0, 49408, (2, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(ours.text_encoder(ids), ref["text_encoder"](ids).last_hidden_state) <= 1e-5


@pytest.mark.parametrize("batch,height,width", [(1, 32, 32), (2, 32, 48)])
def test_vae_from_file(pair, batch, height, width):
    ours, ref = pair
    images = torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(1)) * 2 - 1
    scale = ref["vae"].config.scaling_factor
    with torch.no_grad():
        latents = ours.vae.encode(images, sample=False)
        expected = ref["vae"].encode(images).latent_dist.mean * scale
        assert rel_err(latents, expected) <= 1e-5
        assert rel_err(ours.vae.decode(latents), ref["vae"].decode(latents / scale).sample) <= 1e-5
