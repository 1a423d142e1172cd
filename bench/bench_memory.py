"""Calibrate the activation formulas of ``core.accel.memory`` against measured peaks on the CPU.

Each family's real architecture (its full config) with the width scaled down, at two sizes and two batches;
the peak of live activation bytes of one forward is measured with ``LiveTensorBytes`` (a torch function mode that
counts every tensor created while it is alive) and divided by the formula's scale
``batch * width * positions * bytes``. A constant that stays the same across sizes and batches means the
formula is right for that architecture and carries to the full width (every activation is linear in both);
``_ACTIVATION`` holds these ratios rounded up. Runs in about a minute, one thread.

    python bench/bench_memory.py
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.accel.memory import _ACTIVATION, LiveTensorBytes  # noqa: E402
from core.models.flux import Flux, FluxConfig  # noqa: E402
from core.models.unet import UNetConfig, UNetModel  # noqa: E402
from core.models.vae import AutoencoderKL, VAEConfig  # noqa: E402


def peak(fn) -> int:  # noqa: ANN001
    with torch.inference_mode():
        meter = LiveTensorBytes()
        with meter:
            fn()
    return meter.peak


def unet_ratios(family: str, width: int) -> list[float]:
    cfg = dataclasses.replace(UNetConfig.preset(family, "full"), model_channels=width)
    if cfg.head_dim:
        cfg = dataclasses.replace(cfg, head_dim=16)
    net = UNetModel(cfg).eval()
    ratios = []
    for hw, b in ((16, 1), (32, 1), (16, 2)):
        x, t = torch.randn(b, 4, hw, hw), torch.full((b,), 500.0)
        ctx = torch.randn(b, 77, cfg.context_dim)
        y = torch.randn(b, cfg.adm_in_channels) if cfg.adm_in_channels else None
        ratios.append(peak(lambda: net(x, t, ctx, y)) / (b * width * hw * hw * 4))  # noqa: B023
    return ratios


def vae_ratios(stage: str) -> list[float]:
    cfg = dataclasses.replace(VAEConfig(), ch=32)
    vae = AutoencoderKL(cfg).eval()
    ratios = []
    for px, b in ((64, 1), (128, 1), (64, 2)):
        if stage == "vae_decode":
            z = torch.randn(b, 4, px // 8, px // 8)
            measured = peak(lambda: vae.decode(z))  # noqa: B023
        else:
            images = torch.rand(b, 3, px, px) * 2 - 1
            measured = peak(lambda: vae.encode(images, sample=False))  # noqa: B023
        ratios.append(measured / (b * cfg.ch * cfg.ch_mult[0] * px * px * 4))
    return ratios


def flux_ratios() -> list[float]:
    cfg = dataclasses.replace(FluxConfig(), hidden_size=256, num_heads=2, depth=2, depth_single_blocks=4,
                              context_in_dim=64, vec_in_dim=32)
    net = Flux(cfg).eval()
    ratios = []
    for hw, b, txt in ((16, 1, 32), (32, 1, 32), (16, 2, 32)):
        from core.models.flux import img_ids, pack_latents, txt_ids

        img = pack_latents(torch.randn(b, 16, hw, hw))
        ids = img_ids(hw, hw, b) if img_ids.__code__.co_argcount >= 3 else img_ids(hw, hw)
        args = (img, ids, torch.randn(b, txt, 64), txt_ids(txt, b), torch.full((b,), 0.5), torch.randn(b, 32),
                torch.full((b,), 3.5))
        tokens = (hw // 2) * (hw // 2) + txt
        ratios.append(peak(lambda: net(*args)) / (b * cfg.hidden_size * tokens * 4))  # noqa: B023
    return ratios


def zimage_ratios() -> list[float]:
    from core.models.zimage import ZImageConfig, ZImageTransformer

    cfg = dataclasses.replace(ZImageConfig(), dim=256, n_heads=2, ffn_dim=int(256 / 3 * 8), n_layers=2,
                              n_refiner_layers=1, cap_feat_dim=64)
    net = ZImageTransformer(cfg).eval()
    ratios = []
    for hw, b, txt in ((16, 1, 32), (32, 1, 32), (16, 2, 32)):
        x, caps = torch.randn(b, 16, hw, hw), [torch.randn(txt, 64) for _ in range(b)]
        tokens = (hw // 2) * (hw // 2) + txt
        ratios.append(peak(lambda: net(x, torch.full((b,), 0.5), caps)) / (b * cfg.dim * tokens * 4))  # noqa: B023
    return ratios


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    started = time.monotonic()
    rows = [
        ("unet:sd15", unet_ratios("sd15", 64)),
        ("unet:sd2", unet_ratios("sd2", 64)),
        ("unet:sdxl", unet_ratios("sdxl", 32)),
        ("vae_decode", vae_ratios("vae_decode")),
        ("vae_encode", vae_ratios("vae_encode")),
        ("flux", flux_ratios()),
        ("zimage", zimage_ratios()),
    ]
    print("stage        measured peak / scale (3 sizes/batches)   spread   constant in core.accel.memory")
    for name, ratios in rows:
        spread = max(ratios) / min(ratios) - 1
        print(f"{name:12} {'  '.join(f'{r:6.2f}' for r in ratios):40} {spread:6.1%}   {_ACTIVATION[name]}")
    print(f"({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
