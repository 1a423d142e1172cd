"""TAESD: the tiny autoencoder for readable per-step previews (``madebyollin/taesd``, MIT).

A 1.2 M-parameter decoder that turns a model-space latent into an image at full resolution in a few
milliseconds per 64x64 latent, where the real VAE decoder takes seconds. Written from the architecture notes
in shared/reference/previews-and-metadata.md §3; the module layout equals the published ``.pth`` files so
their state dicts load by key (``1.weight``, ``3.conv.0.weight``, ``3.pool.1.bias``, ``19.bias``):

    0 Clamp (tanh(x/3)*3)   1 conv(latent->64)   2 ReLU   3-5 Block
    6 Upsample x2   7 conv(no bias)   8-10 Block   11 Upsample   12 conv   13-15 Block
    16 Upsample   17 conv   18 Block   19 conv(64->3)

``Block`` = conv-ReLU-conv-ReLU-conv plus a skip, summed, ReLU. taef2 (FLUX.2) adds to blocks 3-5 a residual
"pool" branch (1x1 conv to 4x width, GroupNorm(4), ReLU, 1x1 conv back) before the block.

Conventions (TAESD README): the decoder reads the **model-space** latent the denoiser works in (TAESD's
latent scale is 1: SD1.5's x0 = z*0.18215 goes in as is) and writes images in [0, 1]. FLUX.2's model space is
the 2x2-patchified 128-channel latent; taef2 reads its 32-channel unpatchified form (ComfyUI does the same
reshape before its preview decoder). ``latent_magnitude``/``latent_shift`` (3, 0.5) in TAESD and diffusers'
``AutoencoderTiny`` only map latents into [0, 1] for 8-bit storage; decoding never uses them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

# Which published decoder serves which family, and the latent channels it reads.
TAESD_NAMES: dict[str, str] = {"sd15": "taesd", "sd2": "taesd", "sdxl": "taesdxl", "flux": "taef1", "flux2": "taef2",
                               "zimage": "taef1"}  # Z-Image decodes with Flux.1's VAE: its latents are Flux.1's
LATENT_CHANNELS: dict[str, int] = {"taesd": 4, "taesdxl": 4, "taef1": 16, "taef2": 32}

_BLOCKS = (3, 4, 5, 8, 9, 10, 13, 14, 15, 18)
_MID_BLOCKS = (3, 4, 5)  # the only blocks that get taef2's GroupNorm branch
_CONVS = {1: True, 7: False, 12: False, 17: False, 19: True}  # index -> has bias


def _conv(n_in: int, n_out: int, bias: bool = True, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias, stride=stride)


class Clamp(nn.Module):
    """Soft clamp of the input latent to (-3, 3): keeps noisy early-step latents from blowing up."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    def __init__(self, n_in: int, n_out: int, midblock_gn: bool = False) -> None:
        super().__init__()
        self.conv = nn.Sequential(_conv(n_in, n_out), nn.ReLU(), _conv(n_out, n_out), nn.ReLU(), _conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()
        self.pool: nn.Sequential | None = None
        if midblock_gn:
            wide = n_in * 4
            self.pool = nn.Sequential(
                nn.Conv2d(n_in, wide, 1, bias=False), nn.GroupNorm(4, wide), nn.ReLU(), nn.Conv2d(wide, n_in, 1, bias=False)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + self.skip(x))


@dataclass(frozen=True)
class DecoderConfig:
    latent_channels: int = 4
    width: int = 64
    midblock_gn: bool = False  # taef2

    @property
    def name(self) -> str:
        if self.midblock_gn:
            return "taef2"
        return {4: "taesd", 16: "taef1"}.get(self.latent_channels, f"taesd-{self.latent_channels}ch")


class TAESDDecoder(nn.Sequential):
    """Model-space latent ``[B, C, h, w]`` -> image ``[B, 3, 8h, 8w]`` in about [0, 1]."""

    def __init__(self, config: DecoderConfig = DecoderConfig()) -> None:
        c, w = config.latent_channels, config.width
        layers: list[nn.Module] = []
        for i in range(20):
            if i == 0:
                layers.append(Clamp())
            elif i in _CONVS:
                layers.append(_conv(c if i == 1 else w, 3 if i == 19 else w, bias=_CONVS[i]))
            elif i in _BLOCKS:
                layers.append(Block(w, w, midblock_gn=config.midblock_gn and i in _MID_BLOCKS))
            elif i in (6, 11, 16):
                layers.append(nn.Upsample(scale_factor=2))
            else:  # 2
                layers.append(nn.ReLU())
        super().__init__(*layers)
        self.config = config

    def decode_preview(self, x0: torch.Tensor, family: str, max_size: int | None = None):
        """PIL RGB image of the first latent of a model-space batch (see ``decode_preview``)."""
        return decode_preview(self, x0, family, max_size)


class TAESDEncoder(nn.Sequential):
    """Image ``[B, 3, H, W]`` in [0, 1] -> model-space latent ``[B, C, H/8, W/8]`` (for tests and img2img tricks)."""

    def __init__(self, config: DecoderConfig = DecoderConfig()) -> None:
        c, w, gn = config.latent_channels, config.width, config.midblock_gn
        layers: list[nn.Module] = [_conv(3, w), Block(w, w)]
        for stage in range(3):
            layers.append(_conv(w, w, bias=False, stride=2))
            layers.extend(Block(w, w, midblock_gn=gn and stage == 2) for _ in range(3))
        layers.append(_conv(w, c))
        super().__init__(*layers)
        self.config = config


# ---------------------------------------------------------------------------------------------- state dicts

# Prefixes seen on decoder weights: a whole TAESD module's state dict, ComfyUI's TAESD-as-VAE files.
_PREFIXES = ("taesd_decoder.", "decoder.", "first_stage_model.taesd_decoder.")


def decoder_state_dict(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The decoder's weights in our layout, from the published ``.pth`` layout (``1.weight``), a prefixed one
    (``decoder.1.weight``) or diffusers' ``AutoencoderTiny`` layout (``decoder.layers.0.weight``, whose
    Sequential has no Clamp, so every index is ours minus one). Encoder keys are dropped."""
    if any(k.startswith("decoder.layers.") for k in tensors):
        out = {}
        for key, value in tensors.items():
            if key.startswith("decoder.layers."):
                index, rest = key.removeprefix("decoder.layers.").split(".", 1)
                out[f"{int(index) + 1}.{rest}"] = value
        return out
    for prefix in _PREFIXES:
        if any(k.startswith(prefix) for k in tensors):
            return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
    return {k: v for k, v in tensors.items() if k.split(".", 1)[0].isdigit()}


def decoder_config(shapes: Mapping[str, tuple[int, ...]]) -> DecoderConfig:
    """Read latent channels, width and the taef2 branch off the shapes; ``ValueError`` if it is no TAESD."""
    first = shapes.get("1.weight")
    last = shapes.get("19.weight")
    if first is None or last is None or len(first) != 4 or len(last) != 4 or last[0] != 3:
        raise ValueError("it has no TAESD decoder weights (expected 1.weight [64, C, 3, 3] ... 19.weight [3, 64, 3, 3])")
    return DecoderConfig(latent_channels=int(first[1]), width=int(first[0]), midblock_gn="3.pool.0.weight" in shapes)


def build_decoder(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> TAESDDecoder:
    """A decoder holding ``tensors`` (any layout ``decoder_state_dict`` knows); ``ValueError`` names what
    does not fit."""
    state = decoder_state_dict(tensors)
    config = decoder_config({k: tuple(v.shape) for k, v in state.items()})
    decoder = TAESDDecoder(config)
    expected = decoder.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}")
        for k in wrong[:3]:
            parts.append(f"{k} has shape {list(state[k].shape)}, expected {list(expected[k].shape)}")
        raise ValueError(f"its weights do not fit a {config.name} decoder: " + "; ".join(parts))
    decoder.load_state_dict({k: v.to(dtype) for k, v in state.items()})
    return decoder.to(dtype).eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------- previews


def decoder_input(x0: torch.Tensor, family: str) -> torch.Tensor:
    """Model-space latent -> what the family's TAESD reads. Only FLUX.2 differs: its 128 channels are 2x2
    patches of 32 (channel = 4*c + 2*ph + pw), unpatchified to 32 channels at twice the size."""
    if x0.dim() == 3:
        x0 = x0.unsqueeze(0)
    if family == "flux2" and x0.shape[1] == 128:
        b, _, h, w = x0.shape
        x0 = x0.reshape(b, 32, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, 32, 2 * h, 2 * w)
    return x0


@torch.inference_mode()
def decode_images(decoder: TAESDDecoder, x0: torch.Tensor, family: str) -> torch.Tensor:
    """Model-space latent(s) -> uint8 ``[B, H, W, 3]`` on the CPU."""
    z = decoder_input(x0, family)
    if z.shape[1] != decoder.config.latent_channels:
        raise ValueError(
            f"a {decoder.config.name} decoder reads {decoder.config.latent_channels}-channel latents, "
            f"but {family} previews have {z.shape[1]}"
        )
    param = decoder[1].weight
    # channels_last: oneDNN's (and cuDNN's) fast layout for these 64-channel convs, 2x on a CPU
    image = decoder(z.to(device=param.device, dtype=param.dtype).contiguous(memory_format=torch.channels_last))
    # [0, 1] -> uint8 in fp32: fp16 would round 255*x before clamping
    return image.float().clamp_(0, 1).mul_(255).round_().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def decode_preview(decoder: TAESDDecoder, x0: torch.Tensor, family: str, max_size: int | None = None):
    """PIL RGB image of the first model-space latent of ``x0`` at full resolution (8x the latent), shrunk so
    its longer side is at most ``max_size`` when given."""
    from PIL import Image

    from core.tensor_bytes import rgb_image

    first = x0[:1] if x0.dim() == 4 else x0
    image = rgb_image(decode_images(decoder, first, family)[0])
    if max_size is not None and max(image.size) > max_size:
        w, h = image.size
        ratio = max_size / max(w, h)
        image = image.resize((max(1, round(w * ratio)), max(1, round(h * ratio))), Image.Resampling.BILINEAR)
    return image
