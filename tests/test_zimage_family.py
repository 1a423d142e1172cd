"""Z-Image files are recognised by their keys (never by name) and told apart from Flux.1, SD3 and Lumina 2;
the family is registered and runnable, its text encoder and VAE coming from Qwen3-4B and Flux.1 VAE part files."""

from __future__ import annotations

import pytest
import torch

from core.errors import CheckpointError
from core.models.checkpoint import inspect_checkpoint, load_checkpoint
from core.models.detect import detect
from core.models.families import FAMILIES
from core.models.qwen3 import Qwen3, Qwen3Config
from core.models.testing import write_random_flux_transformer, write_random_zimage
from core.models.zimage import ZImageConfig, ZImageTransformer

FAMILY = FAMILIES["zimage"]


def shapes_of(module: torch.nn.Module, prefix: str = "") -> dict[str, tuple[int, ...]]:
    return {prefix + k: tuple(v.shape) for k, v in module.state_dict().items()}


def tiny_shapes(prefix: str = "") -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return shapes_of(ZImageTransformer(ZImageConfig.preset("tiny")), prefix)


def test_family_presets_are_the_modules_presets_and_it_is_runnable_from_parts() -> None:
    unet, text_encoder = FAMILY.component("unet"), FAMILY.component("text_encoder")
    for size in ("tiny", "full"):
        assert unet.config_class()(**unet.presets[size]) == ZImageConfig.preset(size)
    assert text_encoder.config_class()(**text_encoder.presets["tiny"]) == Qwen3Config.preset("tiny")
    assert text_encoder.config_class()(**text_encoder.presets["full"]) == Qwen3Config.preset("4b")
    assert FAMILY.latent.scale == 0.3611 and FAMILY.latent.shift == 0.1159 and FAMILY.latent.channels == 16
    assert FAMILY.runnable
    assert (text_encoder.part, FAMILY.component("vae").part) == ("qwen3_4b", "flux_vae")


def test_split_diffusion_model_file_is_zimage(tmp_path) -> None:
    info = inspect_checkpoint(write_random_zimage(tmp_path / "renamed.safetensors", "tiny"))
    assert (info.family, info.prefixes, info.prediction) == ("zimage", {"unet": ""}, "flow")
    assert "transformer only" in info.notes


def test_all_in_one_checkpoint_is_zimage_with_its_components() -> None:
    with torch.device("meta"):
        te = shapes_of(Qwen3(Qwen3Config.preset("tiny")), "text_encoders.qwen3_4b.transformer.")
    vae = {"vae.encoder.conv_in.weight": (32, 3, 3, 3), "vae.decoder.conv_in.weight": (512, 16, 3, 3)}
    info = detect("aio.safetensors", tiny_shapes("model.diffusion_model.") | te | vae, {})
    assert info.family == "zimage" and info.prediction == "flow"
    assert info.prefixes == {"unet": "model.diffusion_model.", "text_encoder": "text_encoders.qwen3_4b.transformer.",
                             "vae": "vae."}


def test_lumina2_flux_and_sd3_are_not_zimage(tmp_path) -> None:
    # Lumina 2 (NextDiT): caption embedder too, but the modulation Linear sits after a SiLU (adaLN_modulation.1)
    lumina = {k.replace("adaLN_modulation.0.", "adaLN_modulation.1."): v for k, v in tiny_shapes().items()}
    lumina["cap_embedder.1.weight"] = (2304, 2304)
    assert detect("lumina2.safetensors", lumina, {}).family != "zimage"
    prefixed = {f"model.diffusion_model.{k}": v for k, v in lumina.items()}
    assert detect("lumina2_aio.safetensors", prefixed, {}).family != "zimage"
    assert inspect_checkpoint(write_random_flux_transformer(tmp_path / "flux.safetensors")).family == "flux"
    sd3 = {f"model.diffusion_model.k{i}": (1,) for i in range(6)}
    sd3["model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight"] = (192, 64)
    assert detect("sd3.safetensors", sd3, {}).family == "sd3"
    # a hostile header: the caption embedder with a truncated shape is no Z-Image
    broken = tiny_shapes() | {"cap_embedder.1.weight": ()}
    assert detect("broken.safetensors", broken, {}).family != "zimage"


def test_loading_the_diffusion_model_alone_names_the_parts_it_needs(tmp_path) -> None:
    path = write_random_zimage(tmp_path / "z_image_turbo_bf16.safetensors", "tiny")
    with pytest.raises(CheckpointError, match=r"only the Z-Image diffusion model; its text encoder must come from a "
                       "separate file"):
        load_checkpoint(path)


def test_previews_are_flux1s(tmp_path) -> None:
    """Z-Image's latents are Flux.1's (its ae.safetensors): the latent2rgb preview is Flux.1's table, and TAEF1
    (ComfyUI's models/vae_approx/taef1_decoder) decodes its previews."""
    from core.models.latent_formats import latent_to_rgb
    from core.models.previews import find_preview_decoder

    x0 = torch.randn(16, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(latent_to_rgb(x0, "zimage"), latent_to_rgb(x0, "flux"))
    folder = tmp_path / "vae_approx"
    folder.mkdir()
    (folder / "taef1_decoder.pth").write_bytes(b"")
    (folder / "taesd_decoder.pth").write_bytes(b"")
    assert find_preview_decoder([tmp_path], "zimage") == folder / "taef1_decoder.pth"


def test_the_memory_estimate_holds_for_the_dit() -> None:
    """The calibrated constant (bench/bench_memory.py) bounds a forward at a width and size it did not see, with
    the 512 caption tokens the estimate allows for, batch 2 (a CFG call)."""
    import dataclasses

    from core.accel import memory
    from core.accel.memory import LiveTensorBytes

    torch.manual_seed(0)
    cfg = dataclasses.replace(ZImageConfig.preset("tiny"), n_heads=2, axes_dims=(8, 12, 12))
    net = ZImageTransformer(cfg).eval()
    x, caps = torch.randn(2, 16, 12, 12), [torch.randn(512, cfg.cap_feat_dim) for _ in range(2)]
    with torch.inference_mode(), LiveTensorBytes() as meter:
        net(x, torch.full((2,), 0.5), caps)
    estimate = memory.denoiser_activations(net, "zimage", (12, 12), 2, 4)
    assert meter.peak <= estimate <= 1.15 * meter.peak
