"""Flux transformer: parity with diffusers' FluxTransformer2DModel on the same BFL-layout weights, config reading,
presets, latent packing and positions."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core.models.flux import (
    Flux,
    FluxConfig,
    img_ids,
    pack_latents,
    rope_axes,
    txt_ids,
    unpack_latents,
)
from core.models.testing import (
    random_flux_transformer_state_dict,
    random_state_dict,
    write_random_flux_transformer,
)

diffusers = pytest.importorskip("diffusers")
from diffusers import FluxTransformer2DModel  # noqa: E402
from diffusers.loaders import single_file_utils  # noqa: E402,F401

from tests.reference import bfl_to_diffusers  # noqa: E402
from tests.reference import diffusers_flux_config as diffusers_config  # noqa: E402

CONFIGS = Path("/work/shared/data/model-configs/black-forest-labs")


def build_pair(cfg: FluxConfig, seed: int = 0) -> tuple[Flux, FluxTransformer2DModel]:
    with torch.device("meta"):
        meta = Flux(cfg)
    bfl = random_state_dict(meta, seed=seed)
    ours = Flux(cfg)
    ours.load_state_dict(bfl, strict=True)
    ref = FluxTransformer2DModel(**diffusers_config(cfg))
    ref.load_state_dict(bfl_to_diffusers(bfl, cfg), strict=True)
    return ours.eval(), ref.eval()


@functools.cache
def cached_pair(variant: str) -> tuple[Flux, FluxTransformer2DModel]:
    return build_pair(FluxConfig.preset("flux", "tiny", variant))


def inputs(cfg: FluxConfig, batch: int, h: int, w: int, s: int, seed: int = 1) -> dict:
    """Inputs of one forward for an ``h`` x ``w`` latent and ``s`` text tokens."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, cfg.in_channels // 4, h, w, generator=g)
    return {
        "img": pack_latents(latents),
        "img_ids": img_ids(h, w, batch),
        "txt": torch.randn(batch, s, cfg.context_in_dim, generator=g),
        "txt_ids": txt_ids(s, batch),
        "timesteps": torch.rand(batch, generator=g),
        "y": torch.randn(batch, cfg.vec_in_dim, generator=g),
        "guidance": (1 + 4 * torch.rand(batch, generator=g)) if cfg.guidance_embed else None,
    }


def reference_forward(ref: FluxTransformer2DModel, x: dict) -> torch.Tensor:
    return ref(
        hidden_states=x["img"],
        encoder_hidden_states=x["txt"],
        pooled_projections=x["y"],
        timestep=x["timesteps"],
        img_ids=x["img_ids"][0],  # diffusers takes [N, 3], shared by the batch
        txt_ids=x["txt_ids"][0],
        guidance=x["guidance"],
        return_dict=False,
    )[0]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("variant", ["dev", "schnell"])
@pytest.mark.parametrize("batch,h,w,s", [(1, 8, 8, 7), (2, 6, 10, 5), (1, 4, 12, 16)])
def test_matches_diffusers(variant: str, batch: int, h: int, w: int, s: int) -> None:
    ours, ref = cached_pair(variant)
    x = inputs(ours.config, batch, h, w, s)
    with torch.no_grad():
        got = ours(**x)
        want = reference_forward(ref, x)
    assert got.shape == (batch, (h // 2) * (w // 2), 64)
    assert rel_err(got, want) <= 1e-5
    assert want.std() > 0.1  # a real signal, not a vanishing one


def test_parity_at_real_head_width_with_pruned_stacks() -> None:
    """128-wide heads (the real RoPE split 16/56/56), 3 double and 1 single block, 4.0 MLP at a small width."""
    cfg = dataclasses.replace(
        FluxConfig.preset("flux", "tiny", "dev"), hidden_size=256, num_heads=2, axes_dim=(16, 56, 56), depth=3,
        depth_single_blocks=1,
    )
    ours, ref = build_pair(cfg, seed=4)
    x = inputs(cfg, 1, 6, 8, 9, seed=2)
    with torch.no_grad():
        assert rel_err(ours(**x), reference_forward(ref, x)) <= 1e-5


def test_guidance_changes_dev_only() -> None:
    dev, _ = cached_pair("dev")
    schnell, _ = cached_pair("schnell")
    x = inputs(dev.config, 1, 4, 4, 3)
    with torch.no_grad():
        a = dev(**x)
        b = dev(**{**x, "guidance": x["guidance"] + 1})
        assert rel_err(a, b) > 1e-3
        xs = inputs(schnell.config, 1, 4, 4, 3)
        assert torch.equal(schnell(**xs), schnell(**{**xs, "guidance": torch.tensor([7.0])}))
    with pytest.raises(ValueError, match="guidance"):
        dev(**{**x, "guidance": None})


def test_ids_without_batch_dimension_and_bad_shapes() -> None:
    ours, _ = cached_pair("schnell")
    x = inputs(ours.config, 2, 4, 6, 5)
    with torch.no_grad():
        full = ours(**x)
        shared = ours(**{**x, "img_ids": x["img_ids"][0], "txt_ids": x["txt_ids"][0]})
    assert torch.equal(full, shared)
    with pytest.raises(ValueError, match="txt must be"):
        ours(**{**x, "txt": x["txt"][..., :-1]})
    with pytest.raises(ValueError, match="img_ids must be"):
        ours(**{**x, "img_ids": x["img_ids"][:, :-1]})


def test_pack_unpack_round_trip_and_matches_diffusers_packing() -> None:
    from diffusers import FluxPipeline

    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 16, 6, 10, generator=g)
    tokens = pack_latents(z)
    assert tokens.shape == (2, 15, 64)
    assert torch.equal(tokens, FluxPipeline._pack_latents(z, 2, 16, 6, 10))
    assert torch.equal(unpack_latents(tokens, 6, 10), z)
    # diffusers' unpack takes pixel sizes and the VAE factor 8
    assert torch.equal(FluxPipeline._unpack_latents(tokens, 48, 80, 8), z)
    ids = img_ids(6, 10, batch=2)
    ref_ids = FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32)
    assert ids.shape == (2, 15, 3) and torch.equal(ids[1], ref_ids)
    assert torch.equal(txt_ids(4, 2), torch.zeros(2, 4, 3))
    with pytest.raises(ValueError, match="even"):
        pack_latents(torch.zeros(1, 16, 5, 6))
    with pytest.raises(ValueError, match="2x2 patches"):
        unpack_latents(tokens, 6, 8)


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_full_preset_is_the_real_config_and_keys_match_diffusers(variant: str) -> None:
    real = json.loads((CONFIGS / f"FLUX.1-{variant}" / "transformer" / "config.json").read_text())
    cfg = FluxConfig.preset("flux", "full", variant)
    assert cfg.variant == variant
    assert diffusers_config(cfg) == {
        **{k: v for k, v in real.items() if not k.startswith("_") and k != "patch_size"},
        "out_channels": 64,
        "axes_dims_rope": (16, 56, 56),
    }
    with torch.device("meta"):
        ours = Flux(cfg)
        ref = FluxTransformer2DModel(**diffusers_config(cfg))
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert shapes["img_in.weight"] == (3072, 64)
    assert shapes["txt_in.weight"] == (3072, 4096)
    assert shapes["vector_in.in_layer.weight"] == (3072, 768)
    assert shapes["final_layer.linear.weight"] == (64, 3072)
    assert ("guidance_in.in_layer.weight" in shapes) == (variant == "dev")
    assert sum(v.numel() for v in ours.parameters()) == sum(v.numel() for v in ref.parameters())
    # every diffusers tensor is some BFL tensor (or a slice of one) under the converter's mapping
    assert FluxConfig.from_state_dict(shapes) == cfg


@pytest.mark.parametrize("variant", ["dev", "schnell"])
@pytest.mark.parametrize("size", ["tiny", "full"])
def test_from_state_dict_round_trip(variant: str, size: str) -> None:
    base = FluxConfig.preset("flux", size, variant)
    for cfg in (
        base,
        dataclasses.replace(base, depth=1, depth_single_blocks=3),  # pruned
        dataclasses.replace(base, depth=0, depth_single_blocks=2),  # single-stream only
        dataclasses.replace(base, in_channels=384 if size == "full" else 96),  # Flux Fill (image + mask channels)
        dataclasses.replace(base, mlp_ratio=3.0, qkv_bias=False),
    ):
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in Flux(cfg).state_dict().items()}
        got = FluxConfig.from_state_dict(shapes)
        if cfg.depth == 0:
            cfg = dataclasses.replace(cfg, qkv_bias=True)  # only double blocks carry the qkv bias choice
        assert got == cfg


def test_from_state_dict_reports_missing_and_misnumbered_keys() -> None:
    with pytest.raises(ValueError, match="img_in.weight"):
        FluxConfig.from_state_dict({"txt_in.weight": (3072, 4096)})
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Flux(FluxConfig.preset("flux", "tiny")).state_dict().items()}
    gap = {k.replace("double_blocks.1.", "double_blocks.5."): v for k, v in shapes.items()}
    with pytest.raises(ValueError, match=r"double_blocks are not numbered 0..n \(found \[0, 5\]\)"):
        FluxConfig.from_state_dict(gap)


def test_rope_axes_and_config_checks() -> None:
    assert rope_axes(128) == (16, 56, 56)
    assert rope_axes(32) == (4, 14, 14)
    with pytest.raises(ValueError, match="RoPE"):
        rope_axes(12)
    with pytest.raises(ValueError, match="divisible"):
        dataclasses.replace(FluxConfig(), num_heads=7)
    with pytest.raises(ValueError, match="unknown"):
        FluxConfig.preset("flux", "tiny", "pro")


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_written_file_loads_on_meta_with_assign_and_pruned_variant_runs(tmp_path, variant: str) -> None:
    """The loader's path for a BFL file: shapes -> config -> model on meta -> assign (bf16 stays bf16)."""
    path = write_random_flux_transformer(tmp_path / f"flux1-{variant}.safetensors", variant, "tiny", seed=3)
    weights = load_file(str(path))
    assert weights["img_in.weight"].dtype == torch.bfloat16
    assert ("guidance_in.in_layer.weight" in weights) == (variant == "dev")
    # prune: drop the last double block and the first single block, renumbering the rest
    pruned = {k: v for k, v in weights.items() if not k.startswith(("double_blocks.1.", "single_blocks.0."))}
    pruned = {k.replace("single_blocks.1.", "single_blocks.0."): v for k, v in pruned.items()}
    for state in (weights, pruned):
        cfg = FluxConfig.from_state_dict({k: tuple(v.shape) for k, v in state.items()})
        with torch.device("meta"):
            model = Flux(cfg)
        model.load_state_dict(state, strict=True, assign=True)
        assert model.img_in.weight.dtype == torch.bfloat16
        x = inputs(cfg, 1, 4, 4, 3)
        with torch.no_grad():
            out = model(**x)
        assert out.dtype == torch.bfloat16 and out.shape == (1, 4, 64) and torch.isfinite(out).all()
    assert (cfg.depth, cfg.depth_single_blocks) == (1, 1)
    # the same weights as the generator gives in memory
    assert torch.equal(random_flux_transformer_state_dict(variant, "tiny", seed=3)["img_in.weight"],
                       weights["img_in.weight"])


def test_attention_goes_through_the_picker(monkeypatch: pytest.MonkeyPatch) -> None:
    import core.accel.attention as attention_mod

    calls = []
    original = attention_mod.attention

    def counting(q, k, v, heads, **kw):
        calls.append((tuple(q.shape), heads, kw))
        return original(q, k, v, heads, **kw)

    monkeypatch.setattr(attention_mod, "attention", counting)
    ours, _ = cached_pair("dev")
    cfg = ours.config
    with torch.no_grad():
        ours(**inputs(cfg, 1, 4, 6, 5))
    # one joint attention per block over the 5 text + 6 image tokens, no bias or mask
    assert calls == [((1, 11, cfg.hidden_size), cfg.num_heads, {})] * (cfg.depth + cfg.depth_single_blocks)
