"""Our Z-Image transformer against diffusers' ZImageTransformer2DModel on the same weights, loaded from a file
in ComfyUI's split diffusion-model layout through diffusers' own single-file converter."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core.models.testing import random_zimage_state_dict, write_random_zimage
from core.models.zimage import ZImageConfig, ZImageTransformer, rope_axes, zimage_state_dict
from tests.reference import rel_err, torch_threads

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers  # noqa: E402

TRANSFORMER_CONFIG = Path("/work/shared/data/model-configs/Tongyi-MAI/Z-Image-Turbo/transformer/config.json")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny networks run several times faster on one thread than on two contended ones."""
    with torch_threads(1):
        yield

def reference_model(cfg: ZImageConfig):
    return diffusers.ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=cfg.in_channels, dim=cfg.dim, n_layers=cfg.n_layers,
        n_refiner_layers=cfg.n_refiner_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_heads, norm_eps=cfg.norm_eps,
        qk_norm=True, cap_feat_dim=cfg.cap_feat_dim, rope_theta=cfg.rope_theta, t_scale=1000.0,
        axes_dims=list(cfg.axes_dims), axes_lens=[1536, 512, 512],
    )


def to_diffusers(weights: dict[str, torch.Tensor], prefix: str = "model.diffusion_model.") -> dict[str, torch.Tensor]:
    return convert_z_image_transformer_checkpoint_to_diffusers({prefix + k: v for k, v in weights.items()})


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path = write_random_zimage(tmp_path_factory.mktemp("zimage") / "z_image_turbo.safetensors", "tiny", seed=0,
                               dtype=torch.float32)
    weights = load_file(str(path))
    cfg = ZImageConfig.from_state_dict({k: tuple(v.shape) for k, v in weights.items()})
    assert cfg == ZImageConfig.preset("tiny")
    with torch.device("meta"):
        ours = ZImageTransformer(cfg)
    ours.load_state_dict(weights, strict=True, assign=True)
    ref = reference_model(cfg)
    ref.load_state_dict(to_diffusers(dict(weights)), strict=True)
    return ours.eval(), ref.eval()


def reference_forward(ref, x: torch.Tensor, t: torch.Tensor, caps: list[torch.Tensor]) -> torch.Tensor:
    """ZImagePipeline's call: latents as a list of [C, 1, H, W], t = 1 - sigma, caption features unpadded."""
    out = ref([xi.unsqueeze(1) for xi in x], t, caps, return_dict=False)[0]
    return torch.stack([o.squeeze(1) for o in out])


def test_matches_diffusers_on_a_ragged_batch(pair) -> None:
    ours, ref = pair
    g = torch.Generator().manual_seed(1)
    # 4 x 6 = 24 image tokens (8 x_pad_tokens), captions of 7 and 45 tokens (32 and 64 with cap_pad_tokens)
    x = torch.randn(2, 16, 8, 12, generator=g)
    t = torch.tensor([0.3, 0.8])
    caps = [torch.randn(7, 32, generator=g), torch.randn(45, 32, generator=g)]
    with torch.no_grad():
        want = reference_forward(ref, x, t, caps)
        got = ours(x, t, caps)
        assert got.shape == x.shape and want.std() > 0.1
        assert rel_err(got, want) <= 1e-5
        alone = ours(x[1:], t[1:], caps[1:])  # the batch mask keeps the short caption's padding out of the way
        assert rel_err(alone[0], got[1]) <= 1e-5
        assert rel_err(ours(x[1:], t[1:], [caps[0]])[0], got[1]) > 1e-2  # the caption matters
        assert rel_err(ours(x, torch.tensor([0.3, 0.1]), caps)[1], got[1]) > 1e-2  # and the timestep


def test_matches_diffusers_on_a_square_image_with_a_batched_caption_tensor(pair) -> None:
    ours, ref = pair
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 16, 16, 16, generator=g)  # 64 tokens: no image padding
    caps = torch.randn(1, 32, 32, generator=g)  # exactly 32: no caption padding
    t = torch.tensor([0.0])
    with torch.no_grad():
        assert rel_err(ours(x, t, caps), reference_forward(ref, x, t, list(caps))) <= 1e-5


def test_bf16_runs_close_to_fp32(pair) -> None:
    ours, ref = pair
    g = torch.Generator().manual_seed(3)
    x, t, caps = torch.randn(1, 16, 8, 8, generator=g), torch.tensor([0.5]), [torch.randn(5, 32, generator=g)]
    model = ZImageTransformer(ours.config)
    model.load_state_dict(ours.state_dict())
    with torch.no_grad():
        want = reference_forward(ref, x, t, caps)
        got = model.to(torch.bfloat16)(x, t, caps)
    assert got.dtype == torch.bfloat16 and rel_err(got, want) < 0.05


def test_full_preset_is_the_real_config_and_the_comfyui_layout() -> None:
    real = json.loads(TRANSFORMER_CONFIG.read_text())
    cfg = ZImageConfig.preset("full")
    assert (cfg.in_channels, cfg.dim, cfg.n_layers, cfg.n_refiner_layers, cfg.n_heads, cfg.cap_feat_dim) == (
        real["in_channels"], real["dim"], real["n_layers"], real["n_refiner_layers"], real["n_heads"],
        real["cap_feat_dim"])
    assert (cfg.norm_eps, cfg.rope_theta, list(cfg.axes_dims)) == (real["norm_eps"], real["rope_theta"], real["axes_dims"])
    assert real["n_kv_heads"] == real["n_heads"] and real["all_patch_size"] == [2] and real["t_scale"] == 1000.0
    with torch.device("meta"):
        ours = ZImageTransformer(cfg).state_dict()
        ref = reference_model(cfg).state_dict()
    shapes = {k: tuple(v.shape) for k, v in ours.items()}
    assert len(shapes) == 453  # ComfyUI's z_image_turbo_bf16.safetensors
    assert shapes["layers.0.attention.qkv.weight"] == (11520, 3840)
    assert shapes["cap_embedder.1.weight"] == (3840, 2560) and shapes["t_embedder.mlp.0.weight"] == (1024, 256)
    assert shapes["noise_refiner.1.adaLN_modulation.0.weight"] == (15360, 256)
    assert not any(k.startswith("context_refiner.") and "adaLN" in k for k in shapes)
    converted = to_diffusers(dict(ours))  # diffusers' own converter takes our layout to its 521 tensors
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    assert ZImageConfig.from_state_dict(shapes) == cfg


def test_state_dict_from_diffusers_and_prefixed_files() -> None:
    weights = random_zimage_state_dict("tiny", seed=4, dtype=torch.float32)
    from_diffusers = zimage_state_dict(to_diffusers(dict(weights), prefix=""))
    assert set(from_diffusers) == set(weights) and all(torch.equal(from_diffusers[k], weights[k]) for k in weights)
    prefixed = {f"model.diffusion_model.{k}": v for k, v in weights.items()} | {"norm_final.weight": torch.ones(64)}
    assert zimage_state_dict(prefixed).keys() == weights.keys()
    broken = to_diffusers(dict(weights), prefix="")
    del broken["layers.1.attention.to_v.weight"]
    with pytest.raises(ValueError, match="layers.1.attention has only k/q"):
        zimage_state_dict(broken)


def test_from_state_dict_reports_bad_files() -> None:
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in ZImageTransformer(ZImageConfig.preset("tiny")).state_dict().items()}
    with pytest.raises(ValueError, match="x_embedder.weight"):
        ZImageConfig.from_state_dict({k: v for k, v in shapes.items() if not k.startswith("x_embedder")})
    with pytest.raises(ValueError, match="1 noise-refiner but 0 context-refiner"):
        ZImageConfig.from_state_dict({k: v for k, v in shapes.items() if not k.startswith("context_refiner")})
    gap = {k.replace("layers.1.", "layers.3."): v for k, v in shapes.items()}
    with pytest.raises(ValueError, match=r"layers blocks are not numbered 0..n \(found \[0, 3\]\)"):
        ZImageConfig.from_state_dict(gap)
    assert rope_axes(128) == (32, 48, 48)
    with pytest.raises(ValueError, match="multiple of 16"):
        rope_axes(72)
    smaller = dataclasses.replace(ZImageConfig.preset("tiny"), n_layers=3, ffn_dim=96, n_heads=2, axes_dims=(8, 12, 12))
    with torch.device("meta"):
        resized = {k: tuple(v.shape) for k, v in ZImageTransformer(smaller).state_dict().items()}
    assert ZImageConfig.from_state_dict(resized) == smaller


def test_bad_inputs_are_named(pair) -> None:
    ours, _ = pair
    x, t = torch.zeros(1, 16, 8, 8), torch.zeros(1)
    with pytest.raises(ValueError, match="even H, even W"):
        ours(torch.zeros(1, 16, 7, 8), t, [torch.zeros(3, 32)])
    with pytest.raises(ValueError, match=r"\[tokens >= 1, 32\]"):
        ours(x, t, [torch.zeros(3, 16)])
    with pytest.raises(ValueError, match="2 captions for 1 latents"):
        ours(x, t, [torch.zeros(3, 32)] * 2)
    with pytest.raises(ValueError, match="timesteps must be"):
        ours(x, torch.zeros(2), [torch.zeros(3, 32)])
