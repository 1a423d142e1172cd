"""Z-Image LoRAs: kohya on ComfyUI's tree (fused ``attention.qkv``), ai-toolkit / musubi (diffusers module names
under ``diffusion_model.``) and diffusers' own naming, merged into our transformer, equal diffusers' reading of the
same file (``ZImageLoraLoaderMixin.lora_state_dict``) merged into ``ZImageTransformer2DModel``'s layers, compared
through diffusers' single-file converter; split q/k/v land on row blocks of our fused qkv."""

from __future__ import annotations

import math

import pytest
import torch

from core.lora.files import LoraFileCache
from core.lora.patch import LoraPatcher, activate
from core.lora.tags import LoraRef
from core.models.families import FAMILIES
from core.models.safetensors_writer import save_tensors
from core.models.testing import random_zimage_state_dict
from core.models.zimage import ZImageConfig, ZImageTransformer

pytest.importorskip("diffusers")
from tests.test_zimage import to_diffusers  # noqa: E402

CFG = ZImageConfig.preset("tiny")
D = CFG.dim
# what kohya-style trainers on ComfyUI's tree train: the blocks' attention, feed-forward and modulation
_KOHYA_LAYERS = (".attention.qkv", ".attention.out", ".feed_forward.w1", ".feed_forward.w2", ".feed_forward.w3",
                 ".adaLN_modulation.0")


@pytest.fixture(scope="module")
def base() -> dict[str, torch.Tensor]:
    return random_zimage_state_dict("tiny", seed=0, dtype=torch.float32)


@pytest.fixture(scope="module")
def diffusers_base(base) -> dict[str, torch.Tensor]:
    return to_diffusers(dict(base))


def _linear(weights: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k.removesuffix(".weight"): tuple(v.shape) for k, v in weights.items() if k.endswith(".weight") and v.ndim == 2}


def _lora(fmt: str, shapes: dict[str, tuple[int, ...]], seed: int, rank: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, (out_dim, in_dim) in shapes.items():
        r = min(rank, out_dim, in_dim)
        factor = math.sqrt(0.3 / math.sqrt(in_dim) / math.sqrt(r))
        down, up = torch.randn(r, in_dim, generator=g) * factor, torch.randn(out_dim, r, generator=g) * factor
        if fmt == "kohya":
            key = "lora_unet_" + name.replace(".", "_")
            out[key + ".lora_down.weight"], out[key + ".lora_up.weight"] = down, up
            out[key + ".alpha"] = torch.tensor(2.0)
        else:
            key = {"ai-toolkit": "diffusion_model.", "diffusers": "transformer."}[fmt] + name
            out[key + ".lora_A.weight"], out[key + ".lora_B.weight"] = down, up
    return out


def _merged(base, tensors, tmp_path, weight: float) -> tuple[dict[str, torch.Tensor], list[str]]:
    with torch.device("meta"):
        module = ZImageTransformer(CFG)
    module.load_state_dict({k: v.clone() for k, v in base.items()}, assign=True)
    path = save_tensors(tensors, tmp_path / "zimage_lora.safetensors")
    patcher = LoraPatcher({"unet": module}, FAMILIES["zimage"])
    warnings = activate(patcher, [LoraRef("zimage_lora", weight)], lambda name: path, LoraFileCache())
    return {k: v.clone() for k, v in module.state_dict().items()}, warnings


def _diffusers_merge(diffusers_base, tensors, weight: float) -> dict[str, torch.Tensor]:
    """diffusers' conversion of the file (alpha / rank baked into A and B), then ``W += weight * B @ A``."""
    from diffusers.loaders.lora_pipeline import ZImageLoraLoaderMixin

    state_dict = ZImageLoraLoaderMixin.lora_state_dict(dict(tensors))
    out = {k: v.clone() for k, v in diffusers_base.items()}
    for key in [k for k in state_dict if k.endswith(".lora_A.weight")]:
        name = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
        a, b = state_dict[key].double(), state_dict[key.replace("lora_A", "lora_B")].double()
        out[name + ".weight"] = (out[name + ".weight"].double() + weight * (b @ a)).float()
    return out


@pytest.mark.parametrize("fmt", ["kohya", "ai-toolkit", "diffusers"])
def test_each_naming_merges_as_diffusers_reads_it(base, diffusers_base, tmp_path, fmt):
    if fmt == "kohya":
        shapes = {k: v for k, v in _linear(base).items() if k.endswith(_KOHYA_LAYERS)}
    else:
        shapes = _linear(diffusers_base)  # every Linear of diffusers' model: split q/k/v, embedders, final layer
    tensors = _lora(fmt, shapes, seed=1)
    ours, warnings = _merged(base, tensors, tmp_path, 0.8)
    assert warnings == []  # every key found a layer
    expected = _diffusers_merge(diffusers_base, tensors, 0.8)
    got = to_diffusers(dict(ours))
    changed = {k for k in expected if not torch.equal(expected[k], diffusers_base[k])}
    assert changed and changed == {k for k in got if not torch.equal(got[k], diffusers_base[k])}
    for key in expected:
        assert torch.allclose(got[key], expected[key], rtol=1e-5, atol=1e-6), key
    if fmt != "kohya":
        assert len(changed) == len(shapes)


def test_split_to_k_lands_on_the_middle_rows_of_qkv(base, diffusers_base, tmp_path):
    name = "context_refiner.0.attention.to_k"
    tensors = _lora("ai-toolkit", {name: _linear(diffusers_base)[name]}, seed=2)
    ours, _ = _merged(base, tensors, tmp_path, 1.0)
    key = f"diffusion_model.{name}"
    delta = tensors[key + ".lora_B.weight"] @ tensors[key + ".lora_A.weight"]
    qkv = ours["context_refiner.0.attention.qkv.weight"] - base["context_refiner.0.attention.qkv.weight"]
    assert torch.allclose(qkv[D : 2 * D], delta, atol=1e-6) and not qkv[:D].any() and not qkv[2 * D :].any()


def test_a_zimage_lora_is_told_from_its_keys_and_refused_for_another_family(base, diffusers_base):
    from core.lora.detect import family_mismatch, lora_family

    for fmt, shapes in (("kohya", {"layers.0.attention.qkv": (3 * D, D)}),
                        ("ai-toolkit", {"noise_refiner.0.feed_forward.w1": (CFG.ffn_dim, D)}),
                        ("diffusers", {"context_refiner.1.attention.to_out.0": (D, D)})):
        found = {k: tuple(v.shape) for k, v in _lora(fmt, shapes, seed=3).items()}
        assert lora_family(found)[0] == "zimage", fmt
        error = family_mismatch(*lora_family(found), "flux", "zl", "zl.safetensors", "flux1-dev")
        assert error is not None and "is a Z-Image LoRA" in str(error)
    # a Qwen3 or SD LoRA is no Z-Image one
    assert lora_family({"lora_te_model_layers_0_self_attn_q_proj.lora_down.weight": (4, 32)})[0] != "zimage"
    assert lora_family({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320)})[0] != "zimage"
