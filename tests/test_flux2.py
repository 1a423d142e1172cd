"""FLUX.2: our transformer against diffusers' Flux2Transformer2DModel and our VAE against AutoencoderKLFlux2 on the
same BFL/LDM-layout weights, configs read from shapes, and the klein pipeline's empirical shift schedule."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core.errors import CheckpointError, DarkroomError
from core.models.flux2 import Flux2, Flux2Config, img_ids, pack_latents, txt_ids, unpack_latents
from core.models.flux2_vae import Flux2AutoencoderKL, Flux2VAEConfig, patchify, unpatchify
from core.models.testing import (
    random_flux2_transformer_state_dict,
    random_flux2_vae_state_dict,
    random_state_dict,
    write_random_flux2_transformer,
    write_random_flux2_vae,
)
from core.sampling.schedules import flux2_empirical_mu, flux2_sigmas
from tests.reference import diffusers_flux2_config, rel_err, torch_threads

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel  # noqa: E402
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_flux2_transformer_checkpoint_to_diffusers,
    convert_ldm_vae_checkpoint,
)
from diffusers.pipelines.flux2 import pipeline_flux2_klein  # noqa: E402
from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline  # noqa: E402

CONFIGS = Path("/work/shared/data/model-configs/black-forest-labs")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with torch_threads(1):
        yield


# --------------------------------------------------------------------------------------------------------------
# transformer


def build_pair(cfg: Flux2Config, seed: int = 0) -> tuple[Flux2, Flux2Transformer2DModel]:
    with torch.device("meta"):
        meta = Flux2(cfg)
    bfl = random_state_dict(meta, seed=seed)
    ours = Flux2(cfg)
    ours.load_state_dict(bfl, strict=True)
    ref = Flux2Transformer2DModel(**diffusers_flux2_config(cfg))
    # diffusers' own single-file converter (BFL -> diffusers names, qkv split, final shift/scale swapped)
    ref.load_state_dict(convert_flux2_transformer_checkpoint_to_diffusers(dict(bfl)), strict=True)
    return ours.eval(), ref.eval()


@functools.cache
def cached_pair(variant: str) -> tuple[Flux2, Flux2Transformer2DModel]:
    return build_pair(Flux2Config.preset("tiny", variant))


def inputs(cfg: Flux2Config, batch: int, h: int, w: int, s: int, seed: int = 1) -> dict:
    """One forward's inputs for an ``h`` x ``w`` grid of 128-channel tokens and ``s`` text tokens."""
    g = torch.Generator().manual_seed(seed)
    return {
        "img": pack_latents(torch.randn(batch, cfg.in_channels, h, w, generator=g)),
        "img_ids": img_ids(h, w, batch),
        "txt": torch.randn(batch, s, cfg.context_in_dim, generator=g),
        "txt_ids": txt_ids(s, batch),
        "timesteps": torch.rand(batch, generator=g),
        "guidance": (1 + 4 * torch.rand(batch, generator=g)) if cfg.guidance_embed else None,
    }


def reference_forward(ref: Flux2Transformer2DModel, x: dict) -> torch.Tensor:
    return ref(
        hidden_states=x["img"],
        encoder_hidden_states=x["txt"],
        timestep=x["timesteps"],  # the klein pipeline passes t / 1000 = sigma; the model scales by 1000
        img_ids=x["img_ids"],
        txt_ids=x["txt_ids"],
        guidance=x["guidance"],
        return_dict=False,
    )[0]


@pytest.mark.parametrize("variant", ["klein-4b", "dev"])
@pytest.mark.parametrize("batch,h,w,s", [(1, 4, 4, 7), (2, 3, 5, 5)])
def test_transformer_matches_diffusers(variant: str, batch: int, h: int, w: int, s: int) -> None:
    ours, ref = cached_pair(variant)
    x = inputs(ours.config, batch, h, w, s)
    with torch.no_grad():
        got = ours(**x)
        want = reference_forward(ref, x)
    assert got.shape == (batch, h * w, 128)
    assert rel_err(got, want) <= 1e-5
    assert want.std() > 0.1  # a real signal, not a vanishing one


def test_transformer_parity_at_real_head_width() -> None:
    """128-wide heads with the real 4 x 32 RoPE axes and theta 2000 at a small width, 2 + 1 blocks."""
    cfg = dataclasses.replace(
        Flux2Config.preset("tiny"), hidden_size=256, num_heads=2, axes_dim=(32, 32, 32, 32), depth=2,
        depth_single_blocks=1,
    )
    ours, ref = build_pair(cfg, seed=4)
    x = inputs(cfg, 1, 5, 6, 9, seed=2)
    # positions as large as a real job's: 512 text tokens' last indices, a reference image's t = 10
    x["txt_ids"] = x["txt_ids"] + torch.tensor([0.0, 0.0, 0.0, 500.0])
    x["img_ids"] = img_ids(5, 6, 1, t=10.0)
    with torch.no_grad():
        assert rel_err(ours(**x), reference_forward(ref, x)) <= 1e-5


def test_positions_and_packing_match_the_pipeline() -> None:
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 128, 3, 5, generator=g)
    tokens = pack_latents(latents)
    assert torch.equal(tokens, Flux2KleinPipeline._pack_latents(latents))
    assert torch.equal(unpack_latents(tokens, 3, 5), latents)
    assert torch.equal(img_ids(3, 5, 2), Flux2KleinPipeline._prepare_latent_ids(latents).float())
    text = torch.zeros(2, 6, 96)
    assert torch.equal(txt_ids(6, 2), Flux2KleinPipeline._prepare_text_ids(text).float())
    ref_ids = Flux2KleinPipeline._prepare_image_ids([latents[:1], latents[:1]])  # reference images: t = 10, 20
    assert torch.equal(torch.cat([img_ids(3, 5, 1, t=10.0), img_ids(3, 5, 1, t=20.0)], 1), ref_ids.float())
    with pytest.raises(ValueError, match="grid"):
        unpack_latents(tokens, 4, 4)


def test_modulation_is_shared_and_there_are_no_biases() -> None:
    ours, _ = cached_pair("klein-4b")
    names = [k for k, _ in ours.named_parameters()]
    assert not [k for k in names if k.endswith(".bias")]
    assert [k for k in names if "modulation" in k and "final_layer" not in k] == [
        "double_stream_modulation_img.lin.weight",
        "double_stream_modulation_txt.lin.weight",
        "single_stream_modulation.lin.weight",
    ]


@pytest.mark.parametrize("variant,folder", [("klein-4b", "FLUX.2-klein-4B"), ("klein-9b", "FLUX.2-klein-9B")])
def test_full_preset_is_the_shipped_config(variant: str, folder: str) -> None:
    real = json.loads((CONFIGS / folder / "transformer" / "config.json").read_text())
    cfg = Flux2Config.preset("full", variant)
    ours_cfg = diffusers_flux2_config(cfg)
    for key, value in ours_cfg.items():
        want = real[key] if real.get(key) is not None else real["in_channels"]  # out_channels: null = in
        assert (list(value) if isinstance(value, tuple) else value) == want, key
    assert real["patch_size"] == 1 and real["timestep_guidance_channels"] == 256 and real["eps"] == 1e-6
    with torch.device("meta"):
        ours = Flux2(cfg)
        ref = Flux2Transformer2DModel(**ours_cfg)
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    d = cfg.hidden_size
    assert shapes["img_in.weight"] == (d, 128) and shapes["txt_in.weight"] == (d, cfg.context_in_dim)
    assert shapes["single_blocks.0.linear1.weight"] == (9 * d, d)
    assert shapes["double_blocks.0.img_mlp.0.weight"] == (6 * d, d)
    assert len(shapes) == {"klein-4b": 149, "klein-9b": 201}[variant]  # 9 globals + 12/double + 4/single
    assert sum(v.numel() for v in ours.parameters()) == sum(v.numel() for v in ref.parameters())
    assert Flux2Config.from_state_dict(shapes) == cfg


def test_from_state_dict_round_trip_and_errors() -> None:
    base = Flux2Config.preset("tiny")
    for cfg in (
        base,
        Flux2Config.preset("tiny", "dev"),
        dataclasses.replace(base, depth=1, depth_single_blocks=3),
        dataclasses.replace(base, depth=0, depth_single_blocks=2),
        dataclasses.replace(base, mlp_ratio=2.0, context_in_dim=48),
    ):
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in Flux2(cfg).state_dict().items()}
        assert Flux2Config.from_state_dict(shapes) == cfg
    with pytest.raises(ValueError, match="img_in.weight"):
        Flux2Config.from_state_dict({"txt_in.weight": (3072, 7680)})
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Flux2(base).state_dict().items()}
    flux1_like = {k: v for k, v in shapes.items() if not k.startswith("single_stream_modulation")}
    with pytest.raises(ValueError, match="single_stream_modulation"):
        Flux2Config.from_state_dict(flux1_like)
    gap = {k.replace("single_blocks.1.", "single_blocks.4."): v for k, v in shapes.items()}
    with pytest.raises(ValueError, match=r"single_blocks are not numbered 0..n \(found \[0, 4\]\)"):
        Flux2Config.from_state_dict(gap)
    with pytest.raises(ValueError, match="RoPE"):
        dataclasses.replace(base, axes_dim=(8, 8))
    with pytest.raises(ValueError, match="unknown"):
        Flux2Config.preset("tiny", "klein-2b")


def test_written_file_loads_with_assign_and_checks_inputs(tmp_path) -> None:
    """The loader's path for a BFL / ComfyUI file: shapes -> config -> model on meta -> assign (bf16 stays)."""
    path = write_random_flux2_transformer(tmp_path / "flux-2-klein-4b.safetensors", seed=3)
    weights = load_file(str(path))
    assert weights["img_in.weight"].dtype == torch.bfloat16 and "time_in.in_layer.weight" in weights
    assert torch.equal(weights["img_in.weight"], random_flux2_transformer_state_dict(seed=3)["img_in.weight"])
    combined = load_file(str(write_random_flux2_transformer(tmp_path / "c.safetensors", prefix="model.diffusion_model.")))
    assert set(combined) == {"model.diffusion_model." + k for k in weights}
    cfg = Flux2Config.from_state_dict({k: tuple(v.shape) for k, v in weights.items()})
    with torch.device("meta"):
        model = Flux2(cfg)
    model.load_state_dict(weights, strict=True, assign=True)
    x = inputs(cfg, 2, 2, 3, 4)
    with torch.no_grad():
        out = model(**x)
        shared = model(**{**x, "img_ids": x["img_ids"][0], "txt_ids": x["txt_ids"][0]})
    assert out.dtype == torch.bfloat16 and out.shape == (2, 6, 128) and torch.isfinite(out).all()
    assert torch.equal(out, shared)
    with pytest.raises(ValueError, match="txt must be"):
        model(**{**x, "txt": x["txt"][..., :-1]})
    with pytest.raises(ValueError, match="img_ids must be"):
        model(**{**x, "img_ids": x["img_ids"][..., :3]})
    dev, _ = cached_pair("dev")
    with pytest.raises(ValueError, match="guidance"):
        dev(**{**inputs(dev.config, 1, 2, 2, 3), "guidance": None})


def test_fp16_streams_are_clipped_like_diffusers() -> None:
    """In fp16 a residual that passes 65504 saturates instead of becoming inf (diffusers clips the text stream
    after each double block and the joint stream after each single block)."""
    from core.models.flux import rope_frequencies
    from core.models.flux2 import DoubleStreamBlock, SingleStreamBlock

    cfg = Flux2Config.preset("tiny")
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # the blocks' default init
    double, single = DoubleStreamBlock(cfg).half(), SingleStreamBlock(cfg).half()
    img = torch.randn(1, 4, cfg.hidden_size, generator=g).half()
    txt = (6e4 + 100 * torch.randn(1, 3, cfg.hidden_size, generator=g)).half()  # near fp16's largest value
    zero, big = torch.zeros(1, 1, cfg.hidden_size).half(), torch.full((1, 1, cfg.hidden_size), 3e4).half()
    pe = rope_frequencies(torch.cat([txt_ids(3), img_ids(2, 2)], 1), cfg.axes_dim, cfg.theta)
    with torch.no_grad():
        _, txt_out = double(img, txt, (zero,) * 6, (zero, zero, zero, zero, zero, big), pe)
        joint = single(torch.cat([txt, img], 1), (zero, zero, big), pe)
    for out in (txt_out, joint):
        assert torch.isfinite(out).all() and out.abs().max() == 65504


def test_attention_goes_through_the_picker(monkeypatch: pytest.MonkeyPatch) -> None:
    import core.accel.attention as attention_mod

    calls = []
    original = attention_mod.attention

    def counting(q, k, v, heads, **kw):
        calls.append((tuple(q.shape), heads, kw))
        return original(q, k, v, heads, **kw)

    monkeypatch.setattr(attention_mod, "attention", counting)
    ours, _ = cached_pair("klein-4b")
    cfg = ours.config
    with torch.no_grad():
        ours(**inputs(cfg, 1, 2, 3, 5))
    # one joint attention per block over 5 text + 6 image tokens, no mask
    assert calls == [((1, 11, cfg.hidden_size), cfg.num_heads, {})] * (cfg.depth + cfg.depth_single_blocks)


# --------------------------------------------------------------------------------------------------------------
# VAE


def reference_vae(weights: dict[str, torch.Tensor], cfg: Flux2VAEConfig) -> AutoencoderKLFlux2:
    """AutoencoderKLFlux2 loaded from our LDM-layout weights: diffusers' LDM VAE converter after moving the quant
    convs to the top level (what diffusers' FLUX.2 conversion script does), ``bn.*`` unchanged."""
    ref = AutoencoderKLFlux2(
        block_out_channels=[cfg.ch * m for m in cfg.ch_mult],
        decoder_block_out_channels=[cfg.decoder_ch * m for m in cfg.ch_mult],
        layers_per_block=cfg.num_res_blocks,
        latent_channels=cfg.z_channels,
    )
    ldm = {
        k.replace("encoder.quant_conv.", "quant_conv.").replace("decoder.post_quant_conv.", "post_quant_conv."): v
        for k, v in weights.items()
    }
    converted = convert_ldm_vae_checkpoint(ldm, dict(ref.config))
    converted.update({k: v for k, v in weights.items() if k.startswith("bn.")})
    ref.load_state_dict(converted, strict=True)
    return ref.eval()


@functools.cache
def vae_pair(decoder_ch: int = 32) -> tuple[Flux2AutoencoderKL, AutoencoderKLFlux2]:
    weights = random_flux2_vae_state_dict("tiny", seed=0)
    if decoder_ch != 32:  # the small-decoder variant's shape: its own decoder widths, same encoder
        cfg = dataclasses.replace(Flux2VAEConfig.preset("tiny"), decoder_ch=decoder_ch)
        with torch.device("meta"):
            meta = Flux2AutoencoderKL(cfg)
        decoder = random_state_dict(meta, seed=5)
        weights = {**weights, **{k: v for k, v in decoder.items() if k.startswith("decoder.")}}
    cfg = Flux2VAEConfig.from_state_dict({k: tuple(v.shape) for k, v in weights.items()})
    ours = Flux2AutoencoderKL(cfg)
    ours.load_state_dict(weights, strict=True)
    return ours.eval(), reference_vae(weights, cfg)


def pipeline_encode(ref: AutoencoderKLFlux2, images: torch.Tensor) -> torch.Tensor:
    """Flux2KleinPipeline._encode_vae_image (mode of the posterior, patchify, bn normalisation)."""
    pipe = Flux2KleinPipeline.__new__(Flux2KleinPipeline)  # only the methods; no components registered
    object.__setattr__(pipe, "vae", ref)
    return pipe._encode_vae_image(images, generator=None)


def pipeline_decode(ref: AutoencoderKLFlux2, latents: torch.Tensor) -> torch.Tensor:
    """The decode at the end of Flux2KleinPipeline.__call__ (bn de-normalisation, unpatchify, vae.decode)."""
    mean = ref.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(ref.bn.running_var.view(1, -1, 1, 1) + ref.config.batch_norm_eps)
    return ref.decode(Flux2KleinPipeline._unpatchify_latents(latents * std + mean), return_dict=False)[0]


@pytest.mark.parametrize("decoder_ch", [32, 64])  # 64: a decoder of its own widths, like the small-decoder variant
def test_vae_matches_diffusers(decoder_ch: int) -> None:
    ours, ref = vae_pair(decoder_ch)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 32, 48, generator=g) * 2 - 1
    latents = torch.randn(1, 128, 2, 3, generator=g)
    with torch.no_grad():
        z = ours.encode(images, sample=False)
        want_z = pipeline_encode(ref, images)
        decoded = ours.decode(latents)
        want_images = pipeline_decode(ref, latents)
    assert z.shape == (2, 128, 2, 3) and decoded.shape == (1, 3, 32, 48)
    assert rel_err(z, want_z) <= 1e-5
    assert rel_err(decoded, want_images) <= 1e-5
    assert want_z.std() > 0.1 and want_images.std() > 0.01


def test_vae_sampling_patchify_and_shape_errors() -> None:
    ours, _ = vae_pair()
    images = torch.rand(1, 3, 16, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        a = ours.encode(images, generator=torch.Generator().manual_seed(7))
        b = ours.encode(images, generator=torch.Generator().manual_seed(7))
        mode = ours.encode(images, sample=False)
    assert torch.equal(a, b) and not torch.equal(a, mode)
    z = torch.randn(2, 32, 6, 4)
    assert torch.equal(patchify(z), Flux2KleinPipeline._patchify_latents(z))
    assert torch.equal(unpatchify(patchify(z)), z)
    with pytest.raises(DarkroomError, match="multiples of 16"):
        ours.encode(torch.zeros(1, 3, 40, 32))
    with pytest.raises(DarkroomError, match="128"):
        ours.decode(torch.zeros(1, 32, 4, 4))


def test_vae_file_layout_full_config_and_detection_errors(tmp_path) -> None:
    path = write_random_flux2_vae(tmp_path / "flux2-vae.safetensors")
    weights = load_file(str(path))
    assert weights["bn.num_batches_tracked"].dtype == torch.int64 and (weights["bn.running_var"] > 0).all()
    assert "encoder.quant_conv.weight" in weights and "decoder.post_quant_conv.weight" in weights
    assert Flux2VAEConfig.from_state_dict({k: tuple(v.shape) for k, v in weights.items()}) == Flux2VAEConfig.preset("tiny")
    real = json.loads((CONFIGS / "FLUX.2-klein-4B" / "vae" / "config.json").read_text())
    with torch.device("meta"):
        full = Flux2AutoencoderKL(Flux2VAEConfig.preset("full"))
        # the shipped config has force_upcast, which AutoencoderKLFlux2 does not take
        ref = AutoencoderKLFlux2(**{k: v for k, v in real.items() if not k.startswith("_") and k != "force_upcast"})
    shapes = {k: tuple(v.shape) for k, v in full.state_dict().items()}
    assert len(shapes) == len(ref.state_dict()) == 251
    assert sum(v.numel() for v in full.parameters()) == sum(v.numel() for v in ref.parameters())
    assert shapes["decoder.conv_in.weight"] == (512, 32, 3, 3) and shapes["bn.running_mean"] == (128,)
    assert Flux2VAEConfig.from_state_dict(shapes) == Flux2VAEConfig.preset("full")
    assert full.config.downscale == 16 and full.config.latent_channels == 128
    flux1 = {k: v for k, v in shapes.items() if not k.startswith("bn.")}
    with pytest.raises(CheckpointError, match="bn.running_mean"):
        Flux2VAEConfig.from_state_dict(flux1)
    with pytest.raises(CheckpointError, match="not \\[128\\]"):
        Flux2VAEConfig.from_state_dict({**shapes, "bn.running_mean": (64,)})


# --------------------------------------------------------------------------------------------------------------
# schedule


@pytest.mark.parametrize("steps", [1, 4, 8, 50])
def test_sigmas_match_the_klein_pipeline(steps: int) -> None:
    """The pipeline's own computation: its sigmas, compute_empirical_mu and the shipped scheduler config."""
    import numpy as np

    config = json.loads((CONFIGS / "FLUX.2-klein-4B" / "scheduler" / "scheduler_config.json").read_text())
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    for width, height in ((512, 512), (1024, 1024), (1344, 768), (1088, 1088), (256, 64)):
        seq = (height // 16) * (width // 16)  # the packed latents' length in Flux2KleinPipeline
        mu = pipeline_flux2_klein.compute_empirical_mu(image_seq_len=seq, num_steps=steps)
        assert flux2_empirical_mu(seq, steps) == mu
        sigmas = np.linspace(1.0, 1 / steps, steps)  # what __call__ passes
        pipeline_flux2_klein.retrieve_timesteps(scheduler, steps, "cpu", sigmas=sigmas, mu=mu)
        ours = flux2_sigmas(steps, seq)
        assert ours.dtype == scheduler.sigmas.dtype and ours.shape == (steps + 1,)
        torch.testing.assert_close(ours, scheduler.sigmas, rtol=0, atol=2e-7)
        assert ours[0] == 1.0 and ours[-1] == 0.0 and (ours.diff() < 0).all()


def test_shift_grows_with_size_and_rejects_bad_input() -> None:
    small, large = flux2_sigmas(4, 256), flux2_sigmas(4, 4096)
    assert (large[1:-1] > small[1:-1]).all()  # more tokens: more time at high noise
    assert flux2_empirical_mu(5000, 4) == flux2_empirical_mu(5000, 50)  # above 4300 tokens: steps don't matter
    with pytest.raises(DarkroomError, match="steps"):
        flux2_sigmas(0, 256)
    with pytest.raises(DarkroomError, match="image size"):
        flux2_sigmas(4, 0)


# --------------------------------------------------------------------------------------------------------------
# detection


def _shapes(variant: str, size: str = "full", prefix: str = "") -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = Flux2(Flux2Config.preset(size, variant))
    return {prefix + k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("variant", ["klein-4b", "klein-9b", "dev"])
def test_detected_by_keys_and_told_apart_from_flux1(variant: str) -> None:
    from core.models.detect import detect

    bare = detect("any-name.safetensors", _shapes(variant), {})
    assert (bare.family, bare.variant, bare.prefixes) == ("flux2", variant, {"unet": ""})
    combined = detect("flux1-dev.safetensors", _shapes(variant, prefix="model.diffusion_model."), {})
    assert (combined.family, combined.variant, combined.prediction) == ("flux2", variant, "flow")
    assert "double_blocks.0.img_attn.norm.key_norm.scale" in _shapes(variant)  # Flux.1's marker is there too


def test_other_families_are_not_flux2() -> None:
    from core.models.detect import detect
    from core.models.flux import Flux, FluxConfig

    with torch.device("meta"):
        flux1 = {k: tuple(v.shape) for k, v in Flux(FluxConfig.preset("flux", "tiny", "schnell")).state_dict().items()}
    assert detect("flux-2-klein-4b.safetensors", flux1, {}).family == "flux"
    u = "model.diffusion_model."
    zimage = {u + "cap_embedder.1.weight": (3840, 2560), u + "layers.0.adaLN_modulation.0.weight": (15360, 256),
              u + "noise_refiner.0.attention.k_norm.weight": (128,), u + "x_pad_token": (1, 3840),
              u + "cap_pad_token": (1, 3840), u + "final_layer.linear.weight": (64, 3840)}
    assert detect("flux2.safetensors", zimage, {}).family != "flux2"
    sd3 = {u + f"joint_blocks.{i}.context_block.attn.qkv.weight": (4608, 1536) for i in range(6)}
    assert detect("flux2.safetensors", sd3, {}).family == "sd3"
    vae_shapes = {k: tuple(v.shape) for k, v in random_flux2_vae_state_dict().items()}
    assert (detect("ae.safetensors", vae_shapes, {}).family, detect("ae.safetensors", vae_shapes, {}).variant) == (
        "vae", "flux2")


def test_flux2_transformer_alone_names_the_parts_it_needs(tmp_path) -> None:
    from core.models.checkpoint import load_checkpoint
    from core.models.families import FAMILIES

    assert FAMILIES["flux2"].runnable
    path = write_random_flux2_transformer(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="only the FLUX.2 diffusion model; its text encoder must come from a"):
        load_checkpoint(path)
