"""UNet: parity with diffusers' UNet2DConditionModel on the same weights, config reading, presets, attention."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

import core.accel.attention as attention_mod
from core.models.testing import random_state_dict
from core.models.unet import UNetConfig, UNetModel
from tests.reference import diffusers_unet_config

diffusers = pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint  # noqa: E402

CONFIGS = Path("/work/shared/data/model-configs")
PREFIX = "model.diffusion_model."
FAMILIES = ["sd15", "sd2", "sdxl", "sdxl_refiner"]
TIME_EMBED_DIM = 4  # diffusers' addition_time_embed_dim for the tiny SDXL references


def diffusers_config(cfg: UNetConfig) -> dict:
    return diffusers_unet_config(cfg, sdxl_time_embed_dim=TIME_EMBED_DIM)


def build_pair(cfg: UNetConfig, seed: int = 0) -> tuple[UNetModel, UNet2DConditionModel]:
    """Our UNet and diffusers' reference, loaded from one LDM-layout random state dict."""
    with torch.device("meta"):
        meta = UNetModel(cfg)
    ldm = random_state_dict(meta, seed=seed)
    ours = UNetModel(cfg)
    ours.load_state_dict(ldm, strict=True)

    dconfig = diffusers_config(cfg)
    ref = UNet2DConditionModel(**dconfig)
    converted = convert_ldm_unet_checkpoint({PREFIX + k: v for k, v in ldm.items()}, dconfig)
    missing, unexpected = ref.load_state_dict(converted, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return ours.eval(), ref.eval()


@functools.cache
def cached_pair(family: str) -> tuple[UNetModel, UNet2DConditionModel]:
    """Read-only pairs shared by the parity cases (building them dominates the test time)."""
    return build_pair(UNetConfig.preset(family, "tiny"))


def inputs(cfg: UNetConfig, batch: int, h: int, w: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, h, w, generator=g)
    t = torch.rand(batch, generator=g) * 999
    ctx = torch.randn(batch, 7, cfg.context_dim, generator=g)
    return x, t, ctx, g


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batch,h,w", [(1, 16, 16), (2, 16, 24), (2, 9, 13)])
def test_matches_diffusers(family: str, batch: int, h: int, w: int) -> None:
    cfg = UNetConfig.preset(family, "tiny")
    ours, ref = cached_pair(family)
    x, t, ctx, g = inputs(cfg, batch, h, w)
    kwargs = {}
    y = None
    if cfg.adm_in_channels is not None:
        # SDXL's y = [pooled text, Fourier features of the 6 (or 5) size numbers]; build it the way diffusers does.
        n_ids = 6 if family == "sdxl" else 5
        time_ids = torch.rand(batch, n_ids, generator=g) * 1024
        pooled = torch.randn(batch, cfg.adm_in_channels - n_ids * TIME_EMBED_DIM, generator=g)
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
        y = torch.cat([pooled, ref.add_time_proj(time_ids.flatten()).reshape(batch, -1)], dim=1)
    with torch.no_grad():
        got = ours(x, t, ctx, y)
        want = ref(x, t, ctx, return_dict=False, **kwargs)[0]
    assert got.shape == want.shape == x.shape
    assert rel_err(got, want) <= 1e-5


def test_parity_is_sensitive() -> None:
    """The comparison above detects a wrong weight: perturb one cross-attention key projection."""
    cfg = UNetConfig.preset("sd15", "tiny")
    ours, ref = build_pair(cfg)
    x, t, ctx, _ = inputs(cfg, 1, 16, 16)
    with torch.no_grad():
        ours.middle_block[1].transformer_blocks[0].attn2.to_k.weight.mul_(1.01)
        assert rel_err(ours(x, t, ctx), ref(x, t, ctx, return_dict=False)[0]) > 1e-5


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("size", ["tiny", "full"])
def test_from_state_dict_recovers_config(family: str, size: str) -> None:
    cfg = UNetConfig.preset(family, size)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in UNetModel(cfg).state_dict().items()}
    assert UNetConfig.from_state_dict(shapes) == cfg


def test_state_dict_keys_are_ldm_names() -> None:
    with torch.device("meta"):
        keys = set(UNetModel(UNetConfig.preset("sdxl", "full")).state_dict())
    # A sample of real SDXL base keys (relative to model.diffusion_model.).
    for key in [
        "time_embed.0.weight",
        "time_embed.2.bias",
        "label_emb.0.0.weight",
        "label_emb.0.2.bias",
        "input_blocks.0.0.weight",
        "input_blocks.1.0.in_layers.0.weight",
        "input_blocks.1.0.emb_layers.1.weight",
        "input_blocks.1.0.out_layers.3.weight",
        "input_blocks.3.0.op.weight",
        "input_blocks.4.0.skip_connection.weight",
        "input_blocks.4.1.proj_in.weight",
        "input_blocks.7.1.transformer_blocks.9.attn1.to_q.weight",
        "input_blocks.7.1.transformer_blocks.9.attn2.to_out.0.bias",
        "input_blocks.7.1.transformer_blocks.9.ff.net.0.proj.weight",
        "input_blocks.7.1.transformer_blocks.9.ff.net.2.weight",
        "input_blocks.7.1.transformer_blocks.9.norm3.weight",
        "middle_block.1.transformer_blocks.9.attn2.to_k.weight",
        "middle_block.2.out_layers.3.bias",
        "output_blocks.2.2.conv.weight",
        "output_blocks.5.2.conv.weight",
        "output_blocks.8.0.skip_connection.weight",
        "out.0.weight",
        "out.2.weight",
    ]:
        assert key in keys, key
    assert not any(k.startswith("input_blocks.1.1.") for k in keys)  # no attention at SDXL's first level
    assert "input_blocks.7.1.transformer_blocks.10.norm1.weight" not in keys


def test_from_state_dict_rejects_non_unet() -> None:
    with pytest.raises(ValueError, match="input_blocks.0.0.weight"):
        UNetConfig.from_state_dict({"conv_in.weight": (320, 4, 3, 3)})
    shapes = {k: tuple(v.shape) for k, v in UNetModel(UNetConfig.preset("sd15", "tiny")).state_dict().items()}
    del shapes["input_blocks.1.0.in_layers.2.weight"]
    with pytest.raises(ValueError, match="in_layers.2.weight"):
        UNetConfig.from_state_dict(shapes)


def _heads(value, levels: int) -> list[int]:
    return list(value) if isinstance(value, list) else [value] * levels


@pytest.mark.parametrize(
    "family,repo",
    [
        ("sd15", "runwayml/stable-diffusion-v1-5"),
        ("sd2", "stabilityai/stable-diffusion-2-1"),
        ("sdxl", "stabilityai/stable-diffusion-xl-base-1.0"),
        ("sdxl_refiner", "stabilityai/stable-diffusion-xl-refiner-1.0"),
    ],
)
def test_full_presets_match_published_configs(family: str, repo: str) -> None:
    path = CONFIGS / repo / "unet" / "config.json"
    if not path.exists():
        pytest.skip(f"published configs not available here ({path})")
    real = json.loads(path.read_text())
    ours = diffusers_config(UNetConfig.preset(family, "full"))
    levels = len(real["block_out_channels"])
    for field in [
        "in_channels",
        "out_channels",
        "block_out_channels",
        "layers_per_block",
        "down_block_types",
        "up_block_types",
        "cross_attention_dim",
    ]:
        assert ours[field] == real[field], field
    assert ours["attention_head_dim"] == _heads(real["attention_head_dim"], levels)
    assert ours["use_linear_projection"] == real.get("use_linear_projection", False)
    attn_levels = [i for i, b in enumerate(real["down_block_types"]) if b.startswith("CrossAttn")]
    real_depth = _heads(real.get("transformer_layers_per_block", 1), levels)
    assert [ours["transformer_layers_per_block"][i] for i in attn_levels] == [real_depth[i] for i in attn_levels]
    assert ours.get("projection_class_embeddings_input_dim") == real.get("projection_class_embeddings_input_dim")


def test_attention_goes_through_the_picker(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = attention_mod.attention

    def counting(q, k, v, heads, **kw):
        calls.append((q.shape, k.shape, heads))
        return original(q, k, v, heads, **kw)

    monkeypatch.setattr(attention_mod, "attention", counting)
    cfg = UNetConfig.preset("sd15", "tiny")
    model = UNetModel(cfg)
    x, t, ctx, _ = inputs(cfg, 2, 8, 8)
    with torch.no_grad():
        model(x, t, ctx)
    # Two attentions (self, cross) per transformer block; each SpatialTransformer here has depth 1.
    n_blocks = sum(1 for m in model.modules() if type(m).__name__ == "BasicTransformerBlock")
    assert n_blocks > 0 and len(calls) == 2 * n_blocks
    assert any(k[1] == 7 for _, k, _ in calls)  # cross-attention over the 7 context tokens
    assert all(h == 8 for _, _, h in calls)  # SD1.x: 8 heads at every level


def test_y_is_required_exactly_for_sdxl() -> None:
    cfg = UNetConfig.preset("sdxl", "tiny")
    model = UNetModel(cfg)
    x, t, ctx, _ = inputs(cfg, 1, 8, 8)
    with pytest.raises(ValueError, match="conditioning vector"):
        model(x, t, ctx)
    sd15 = UNetModel(UNetConfig.preset("sd15", "tiny"))
    with pytest.raises(ValueError, match="no y"):
        sd15(x, t, torch.randn(1, 7, 32), torch.zeros(1, 48))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("stride,h,w", [(1, 4, 4), (1, 3, 5), (2, 8, 8), (2, 7, 9)])
def test_wide_conv_im2col_path_equals_conv(
    stride: int, h: int, w: int, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The unfold+matmul route taken for wide convs on few positions computes the same conv (bf16: the
    precision ``--precision auto`` picks on a CPU with AMX)."""
    from core.models.unet import conv2d

    unfold, used = torch.nn.functional.unfold, []
    monkeypatch.setattr(torch.nn.functional, "unfold", lambda *a, **k: used.append(1) or unfold(*a, **k))
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(1024, 16, 3, stride=stride, padding=1).to(dtype)
    x = torch.randn(2, 1024, h, w, dtype=dtype)
    with torch.no_grad():
        got = conv2d(conv, x)
        want = torch.nn.functional.conv2d(x.float(), conv.weight.float(), conv.bias.float(), stride, 1)
    assert used, "the im2col route was not taken"
    assert got.shape == want.shape and got.dtype == dtype
    assert rel_err(got.float(), want) <= (1e-5 if dtype == torch.float32 else 1e-2)


def test_config_rejects_widths_that_do_not_split_into_heads() -> None:
    with pytest.raises(ValueError, match="head width 64"):
        UNetConfig(model_channels=96, channel_mult=(1,), transformer_depth=(1,), num_heads=None, head_dim=64)
    with pytest.raises(ValueError, match="norm groups"):
        UNetConfig(model_channels=40, channel_mult=(1,), transformer_depth=(1,), num_heads=8)
