"""The KL autoencoder (LDM ``AutoencoderKL``) that maps images to latents and back.

Module names are exactly the LDM single-file ones (relative to ``first_stage_model.``), so a checkpoint's VAE
weights load with ``load_state_dict(..., assign=True)`` and no renaming. The Flux.1 VAE (``ae.safetensors``)
has the same encoder/decoder names, 16 latent channels and no ``quant_conv``/``post_quant_conv``.

Layout (SD: ch 128, ch_mult (1, 2, 4, 4), 2 res blocks, 8x downscale):

    encoder: conv_in -> down.{i}.block.{j} (+ down.{i}.downsample, all but the last level)
             -> mid.block_1 -> mid.attn_1 -> mid.block_2 -> norm_out -> SiLU -> conv_out (mean and logvar)
    decoder: conv_in -> mid.block_1 -> mid.attn_1 -> mid.block_2
             -> up.{k}.block.{j} for k = last..0 (+ up.{k}.upsample, all but k = 0) -> norm_out -> SiLU -> conv_out

Note ``decoder.up.{k}`` is indexed by resolution level (k = 0 is full resolution) and runs last-to-first,
which is why diffusers' ``up_blocks.{n-1-k}`` is the same block.

``encode`` returns and ``decode`` takes *model-space* latents, ``(z - shift) * scale``, the space the denoiser
and the previews work in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.accel.attention import attention
from core.errors import CheckpointError, RequestError

_NORM_GROUPS = 32  # fixed in LDM; every VAE width must be a multiple of it


@dataclass(frozen=True)
class VAEConfig:
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4  # latent channels
    in_channels: int = 3
    out_channels: int = 3
    use_quant_conv: bool = True  # SD VAEs have quant_conv/post_quant_conv; the Flux VAE has neither
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0

    def __post_init__(self) -> None:
        for mult in self.ch_mult:
            if self.ch * mult % _NORM_GROUPS:
                raise ValueError(f"VAE width {self.ch}*{mult} is not a multiple of {_NORM_GROUPS}")

    @property
    def latent_channels(self) -> int:
        return self.z_channels

    @property
    def downscale(self) -> int:
        """Image pixels per latent pixel along each side (8 for every real SD/Flux VAE)."""
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def preset(cls, family: str = "sd15", size: str = "full") -> VAEConfig:
        """The real VAE of ``family`` (``size="full"``) or a few-hundred-KB one with the same structure, as the
        family module gives it (scale and shift from its latent format)."""
        from core.models.families import FAMILIES

        known = [name for name, f in FAMILIES.items() if f.has("vae") and f.component("vae").presets]
        if family not in known:
            raise RequestError("model family", family, "one of " + ", ".join(known))
        presets = FAMILIES[family].component("vae").presets
        if size not in presets:
            raise RequestError("model size", size, "tiny or full")
        return cls(**presets[size])

    @classmethod
    def from_state_dict(
        cls, shapes: Mapping[str, tuple[int, ...]], family: str | None = None
    ) -> VAEConfig:
        """Read the configuration off a VAE's keys/shapes (LDM names, component prefix removed).

        Scale and shift are not in the weights: they come from ``family``'s latent format (the loader always
        passes it: SDXL's VAE has SD1.5's shapes but another scale). Without a family they are those of the
        first family in the registry with this many latent channels (4: SD1.x, 16: Flux.1).
        """
        shapes = {k: tuple(v) for k, v in shapes.items()}
        geometry = ldm_geometry(shapes)
        z_channels = geometry["z_channels"]
        fmt = _latent_format(family, z_channels)
        if fmt.channels != z_channels:
            raise CheckpointError(
                "VAE weights", f"they have {z_channels} latent channels but {family} uses {fmt.channels}"
            )
        return cls(
            **geometry,
            use_quant_conv="quant_conv.weight" in shapes,
            scaling_factor=fmt.scale,
            shift_factor=fmt.shift,
        )


def ldm_geometry(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """Widths, levels, res blocks and channel counts of an LDM-named encoder + decoder, read off the shapes
    (``VAEConfig`` fields; the FLUX.2 VAE reads its geometry the same way). Raises ``CheckpointError``."""
    if "encoder.conv_in.weight" not in shapes and "decoder.up_blocks.0.resnets.0.norm1.weight" in shapes:
        raise CheckpointError("VAE weights", "they use diffusers names, not the LDM single-file layout")
    for key in ("encoder.conv_in.weight", "decoder.conv_in.weight", "decoder.conv_out.weight"):
        if key not in shapes:
            raise CheckpointError("VAE weights", f"key {key} is missing, so this is not an LDM-layout VAE")
    ch, in_channels = shapes["encoder.conv_in.weight"][:2]
    z_channels = shapes["decoder.conv_in.weight"][1]
    out_channels = shapes["decoder.conv_out.weight"][0]
    levels = 0
    while f"encoder.down.{levels}.block.0.conv1.weight" in shapes:
        levels += 1
    blocks = 0
    while f"encoder.down.0.block.{blocks}.conv1.weight" in shapes:
        blocks += 1
    if levels == 0 or blocks == 0:
        raise CheckpointError("VAE weights", "no encoder.down.0.block.0 found, so this is not an LDM-layout VAE")
    widths = [shapes[f"encoder.down.{i}.block.0.conv2.weight"][0] for i in range(levels)]
    if any(width % ch or width % _NORM_GROUPS for width in widths):
        raise CheckpointError(
            "VAE weights", f"their widths {widths} are not multiples of both {ch} and {_NORM_GROUPS}"
        )
    ch_mult = tuple(width // ch for width in widths)
    return {
        "ch": ch,
        "ch_mult": ch_mult,
        "num_res_blocks": blocks,
        "z_channels": z_channels,
        "in_channels": in_channels,
        "out_channels": out_channels,
    }


def _latent_format(family: str | None, z_channels: int) -> Any:
    from core.models.families import FAMILIES, get_family

    if family is not None:
        fmt = get_family(family).latent
        if fmt is None:
            raise RequestError("model family", family, "a family with a known latent format")
        return fmt
    for f in FAMILIES.values():
        if f.latent is not None and f.latent.channels == z_channels:
            return f.latent
    raise CheckpointError("VAE weights", f"no model family has {z_channels} latent channels")


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(_NORM_GROUPS, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm -> SiLU -> conv3x3, twice, plus a (1x1-projected when widths differ) skip. No time embedding."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In-place SiLU on fresh norm outputs: at 1024 px one full-resolution activation is 0.5-1 GB in fp32.
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return h.add_(skip)


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels; q, k, v, proj_out are 1x1 convs as in the checkpoints."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        h = self.norm(x)
        # [B, C, H, W] -> [B, HW, C]. Contiguous matters: on CPU, SDPA only takes its fused (flash) kernel
        # for unit-stride channels and otherwise materialises the HW x HW scores (1 GB at a 128x128 latent).
        q, k, v = (proj(h).flatten(2).transpose(1, 2).contiguous() for proj in (self.q, self.k, self.v))
        h = attention(q, k, v, heads=1, layer=self)
        h = h.transpose(1, 2).reshape(b, c, height, width)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one pixel on the right and bottom only (LDM's asymmetric pad)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: ``block.{j}`` and optionally ``downsample`` (encoder) or ``upsample`` (decoder)."""

    def __init__(self, blocks: list[ResnetBlock], resample: nn.Module | None, name: str) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.resample_name = name if resample is not None else None
        if resample is not None:
            self.add_module(name, resample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        if self.resample_name is not None:
            x = getattr(self, self.resample_name)(x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = cfg.ch
        for i, width in enumerate(widths):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(block_in, width))
                block_in = width
            last = i == len(widths) - 1
            self.down.append(Level(blocks, None if last else Downsample(width), "downsample"))
        self.mid = MidBlock(block_in)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.z_channels, 3, padding=1)  # mean and logvar

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        block_in = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = MidBlock(block_in)
        levels: list[Level] = []
        for k in reversed(range(len(widths))):  # built coarse to fine, stored fine to coarse (LDM indexing)
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, widths[k]))
                block_in = widths[k]
            levels.insert(0, Level(blocks, Upsample(block_in) if k != 0 else None, "upsample"))
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))


def _tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Evenly spread tile offsets covering ``length``, neighbours overlapping by at least ``overlap``."""
    if length <= tile:
        return [0]
    count = math.ceil((length - overlap) / (tile - overlap))
    step = (length - tile) / (count - 1)  # <= tile - overlap by the choice of count
    return [round(i * step) for i in range(count)]


def _feather(size: int, ramp: int, ramp_start: bool, ramp_end: bool) -> torch.Tensor:
    """1-D tile weight: 1 inside, falling linearly towards 0 over ``ramp`` pixels at edges shared with a
    neighbour tile (image borders keep weight 1, nothing else covers them)."""
    w = torch.ones(size, dtype=torch.float32)
    ramp = min(ramp, size)
    if ramp > 0:
        # (i + 0.5) / ramp: strictly positive, and a falling ramp plus the neighbour's rising one sum to 1.
        rise = (torch.arange(ramp, dtype=torch.float32) + 0.5) / ramp
        if ramp_start:
            w[:ramp] = torch.minimum(w[:ramp], rise)
        if ramp_end:
            w[size - ramp :] = torch.minimum(w[size - ramp :], rise.flip(0))
    return w


def check_shape(x: torch.Tensor, channels: int, multiple: int, what: str) -> None:
    """``x`` must be ``[batch, channels, height, width]`` with both sides multiples of ``multiple``: one
    message naming ``what`` otherwise (images into an encoder, latents into a decoder)."""
    if x.dim() != 4 or x.shape[1] != channels or x.shape[2] % multiple or x.shape[3] % multiple:
        raise RequestError(
            what, tuple(x.shape), f"[batch, {channels}, height, width] with height and width multiples of {multiple}"
        )


def sample_posterior(mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """z = mean + std * noise of the encoder's diagonal Gaussian (diffusers' clamp of the log-variance); the noise
    is drawn in fp32 on the generator's device, so a seed gives the same latent on any device and dtype."""
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    noise_device = generator.device if generator is not None else mean.device
    noise = torch.randn(mean.shape, generator=generator, device=noise_device, dtype=torch.float32)
    return mean + std * noise.to(device=mean.device, dtype=mean.dtype)


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        if config.use_quant_conv:
            self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.z_channels, 1)
            self.post_quant_conv = nn.Conv2d(config.z_channels, config.z_channels, 1)
        else:
            self.quant_conv = None
            self.post_quant_conv = None

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.conv_in.weight.device

    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [-1, 1] ``[B, 3, H, W]`` -> raw latent mean and log-variance ``[B, C, H/8, W/8]``."""
        check_shape(images, self.config.in_channels, self.config.downscale, "VAE input image shape")
        moments = self.encoder(images.to(device=self.device, dtype=self.dtype))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar

    def encode_moments_tiled(
        self, images: torch.Tensor, tile: int, overlap: int = 8
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``encode_moments`` in overlapping pieces of ``tile`` latent pixels (``tile * 8`` image pixels), each
        piece's moments feathered into the others as ``decode_tiled`` does: memory is one piece's encode."""
        check_shape(images, self.config.in_channels, self.config.downscale, "VAE input image shape")
        f = self.config.downscale
        b, _, height, width = images.shape
        h, w = height // f, width // f
        ys, xs = _tile_starts(h, tile, overlap), _tile_starts(w, tile, overlap)
        if len(ys) == 1 and len(xs) == 1:
            return self.encode_moments(images)
        th, tw = min(tile, h), min(tile, w)
        c = self.config.z_channels
        mean = torch.zeros(b, c, h, w, dtype=torch.float32, device=self.device)
        logvar = torch.zeros_like(mean)
        total = torch.zeros(h, w, dtype=torch.float32, device=self.device)
        for y in ys:
            wy = _feather(th, overlap, y > 0, y + th < h)
            for x in xs:
                mask = (wy[:, None] * _feather(tw, overlap, x > 0, x + tw < w)[None, :]).to(self.device)
                m, lv = self.encode_moments(images[:, :, y * f : (y + th) * f, x * f : (x + tw) * f])
                mean[:, :, y : y + th, x : x + tw].addcmul_(m.float(), mask)
                logvar[:, :, y : y + th, x : x + tw].addcmul_(lv.float(), mask)
                total[y : y + th, x : x + tw].add_(mask)
        return mean.div_(total).to(self.dtype), logvar.div_(total).to(self.dtype)

    def encode(
        self, images: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True,
        tile: int | None = None,
    ) -> torch.Tensor:
        """Images in [-1, 1] -> model-space latents ``(z - shift) * scale``.

        ``sample=True`` draws z = mean + std * noise (noise from ``generator``, drawn in fp32 on the
        generator's device, so a seed gives the same latent on any device and dtype); ``sample=False``
        returns the mean. ``tile`` (latent pixels) encodes in feathered tiles (``encode_moments_tiled``).
        """
        if tile is not None:
            mean, logvar = self.encode_moments_tiled(images, tile, overlap=min(8, tile // 4))
        else:
            mean, logvar = self.encode_moments(images)
        z = sample_posterior(mean, logvar, generator) if sample else mean
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Model-space latents ``[B, C, h, w]`` -> images ``[B, 3, 8h, 8w]``, nominally in [-1, 1] (unclamped)."""
        check_shape(latents, self.config.z_channels, 1, "VAE latent shape")
        z = latents.to(device=self.device, dtype=self.dtype) / self.config.scaling_factor + self.config.shift_factor
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def decode_tiled(self, latents: torch.Tensor, tile: int = 64, overlap: int = 16) -> torch.Tensor:
        """``decode`` in overlapping ``tile``x``tile`` latent pieces, for images too large to decode at once.

        Neighbouring tiles overlap by at least ``overlap`` latent pixels. Each decoded tile is weighted by a
        separable feather mask that ramps linearly from ~0 to 1 over ``overlap * 8`` output pixels at every
        edge shared with another tile; the weighted tiles are summed and divided by the summed weights. So
        each pixel is a convex mix of the tiles covering it, and a tile's influence fades out continuously
        before its border, which is where the receptive field (and GroupNorm statistics) differ from a full
        decode: no visible seams. Memory is one tile's decode plus the fp32 output.
        """
        if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
            raise RequestError("VAE tile size", tile, "a positive number of latent pixels")
        if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap < tile:
            raise RequestError("VAE tile overlap", overlap, f"a whole number from 0 to {tile - 1} (below the tile size)")
        check_shape(latents, self.config.z_channels, 1, "VAE latent shape")
        b, _, h, w = latents.shape
        ys, xs = _tile_starts(h, tile, overlap), _tile_starts(w, tile, overlap)
        if len(ys) == 1 and len(xs) == 1:
            return self.decode(latents)
        f = self.config.downscale
        th, tw = min(tile, h), min(tile, w)
        out = torch.zeros(b, self.config.out_channels, h * f, w * f, dtype=torch.float32, device=self.device)
        total = torch.zeros(h * f, w * f, dtype=torch.float32, device=self.device)
        for y in ys:
            wy = _feather(th * f, overlap * f, y > 0, y + th < h)
            for x in xs:
                wx = _feather(tw * f, overlap * f, x > 0, x + tw < w)
                mask = (wy[:, None] * wx[None, :]).to(self.device)  # [th*f, tw*f]
                piece = self.decode(latents[:, :, y : y + th, x : x + tw])
                out[:, :, y * f : (y + th) * f, x * f : (x + tw) * f].addcmul_(piece.float(), mask)
                total[y * f : (y + th) * f, x * f : (x + tw) * f].add_(mask)
        return out.div_(total).to(self.dtype)
