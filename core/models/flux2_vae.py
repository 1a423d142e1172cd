"""The FLUX.2 autoencoder (``flux2-vae.safetensors``, diffusers ``AutoencoderKLFlux2``), shared by every FLUX.2 model.

It is the LDM KL autoencoder of ``core/models/vae.py`` (same encoder and decoder, reused here) with 32 latent
channels, plus what FLUX.2 adds around it:

* the 1x1 ``quant_conv`` (64 -> 64, on mean and log-variance) and ``post_quant_conv`` (32 -> 32) are stored
  INSIDE the encoder and decoder in BFL's file: ``encoder.quant_conv.*``, ``decoder.post_quant_conv.*``
  (diffusers' converter moves them to the top level);
* the model's latent space is the 32-channel latent patchified 2x2 into 128 channels (channel ``4c + 2i + j``
  holds pixel (i, j) of channel c's patch) at 1/16 of the image size, then normalised per channel by a
  BatchNorm's stored running statistics: ``(z - bn.running_mean) / sqrt(bn.running_var + 1e-4)``. Only the
  two buffers are used (``bn.num_batches_tracked`` is carried along; the norm has no affine weights).

Keys (full size; LDM names as in ``flux2-vae.safetensors``, 251 tensors)::

    encoder.conv_in [128, 3, 3, 3] ; encoder.down.{0..3}.block.{0,1}.* ; encoder.down.{0..2}.downsample.conv
    encoder.mid.{block_1, attn_1, block_2}.* ; encoder.norm_out ; encoder.conv_out [64, 512, 3, 3]
    encoder.quant_conv [64, 64, 1, 1]
    decoder.post_quant_conv [32, 32, 1, 1] ; decoder.conv_in [512, 32, 3, 3] ; decoder.mid.* ;
    decoder.up.{0..3}.block.{0,1,2}.* ; decoder.up.{1..3}.upsample.conv ; decoder.norm_out ; decoder.conv_out
    bn.running_mean [128] ; bn.running_var [128] ; bn.num_batches_tracked []

A variant with a smaller decoder (widths 96/192/384/384, same encoder) is read off ``decoder.conv_out``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import SimpleNamespace

import torch
from torch import nn

from core.errors import CheckpointError
from core.models import vae

PATCH = 2  # 2x2 patchify after the 8x VAE: 16 image pixels per latent cell along each side


@dataclass(frozen=True)
class Flux2VAEConfig:
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    decoder_ch: int = 128  # 96 in the small-decoder variant
    num_res_blocks: int = 2
    z_channels: int = 32
    in_channels: int = 3
    out_channels: int = 3
    use_quant_conv: bool = True
    batch_norm_eps: float = 1e-4

    @property
    def latent_channels(self) -> int:
        """Channels of the model-space latent the transformer sees (32 x 2 x 2 = 128)."""
        return self.z_channels * PATCH * PATCH

    @property
    def downscale(self) -> int:
        """Image pixels per model-space latent cell along each side (16)."""
        return 2 ** (len(self.ch_mult) - 1) * PATCH

    def encoder_config(self) -> vae.VAEConfig:
        return vae.VAEConfig(
            ch=self.ch,
            ch_mult=self.ch_mult,
            num_res_blocks=self.num_res_blocks,
            z_channels=self.z_channels,
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            use_quant_conv=False,  # ours live in Encoder/Decoder below
        )

    def decoder_config(self) -> vae.VAEConfig:
        return replace(self.encoder_config(), ch=self.decoder_ch)

    @classmethod
    def preset(cls, size: str = "full") -> Flux2VAEConfig:
        """The shipped VAE (``"full"``) or a tiny one with the same structure (four levels, so still 16x down)."""
        if size == "full":
            return cls()
        if size == "tiny":
            return cls(ch=32, ch_mult=(1, 1, 2, 2), decoder_ch=32, num_res_blocks=1)
        raise ValueError(f"size {size!r} is invalid; valid: tiny, full")

    @classmethod
    def from_state_dict(cls, shapes: Mapping[str, tuple[int, ...]]) -> Flux2VAEConfig:
        """Read the configuration off LDM-named keys (component prefix removed). Raises ``CheckpointError``."""
        shapes = {k: tuple(v) for k, v in shapes.items()}
        if "bn.running_mean" not in shapes:
            raise CheckpointError("FLUX.2 VAE weights", "they lack bn.running_mean, so this is not a FLUX.2 VAE")
        geometry = vae.ldm_geometry(shapes)
        z = geometry["z_channels"]
        if shapes["bn.running_mean"] != (z * PATCH * PATCH,):
            raise CheckpointError(
                "FLUX.2 VAE weights",
                f"bn.running_mean has shape {list(shapes['bn.running_mean'])}, not [{z * PATCH * PATCH}] "
                f"for {z} latent channels in 2x2 patches",
            )
        decoder_ch = shapes["decoder.conv_out.weight"][1]
        if decoder_ch % vae._NORM_GROUPS:
            raise CheckpointError("FLUX.2 VAE weights", f"decoder width {decoder_ch} is not a multiple of 32")
        return cls(
            ch=geometry["ch"],
            ch_mult=geometry["ch_mult"],
            decoder_ch=decoder_ch,
            num_res_blocks=geometry["num_res_blocks"],
            z_channels=z,
            in_channels=geometry["in_channels"],
            out_channels=geometry["out_channels"],
            use_quant_conv="encoder.quant_conv.weight" in shapes,
        )


class Encoder(vae.Encoder):
    """The LDM encoder with FLUX.2's ``quant_conv`` stored inside it; returns mean and log-variance (2z)."""

    def __init__(self, cfg: Flux2VAEConfig) -> None:
        super().__init__(cfg.encoder_config())
        z2 = 2 * cfg.z_channels
        self.quant_conv = nn.Conv2d(z2, z2, 1) if cfg.use_quant_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        moments = super().forward(x)
        return moments if self.quant_conv is None else self.quant_conv(moments)


class Decoder(vae.Decoder):
    """The LDM decoder with FLUX.2's ``post_quant_conv`` stored inside it."""

    def __init__(self, cfg: Flux2VAEConfig) -> None:
        super().__init__(cfg.decoder_config())
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1) if cfg.use_quant_conv else None

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return super().forward(z if self.post_quant_conv is None else self.post_quant_conv(z))


def patchify(z: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, 4C, H/2, W/2], channel 4c + 2i + j = pixel (i, j) of each 2x2 patch of channel c."""
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, h // 2, w // 2)


def unpatchify(z: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    b, c, h, w = z.shape
    return z.view(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, 2 * h, 2 * w)


class Flux2AutoencoderKL(nn.Module):
    """``encode``: images in [-1, 1] -> model-space latents [B, 128, H/16, W/16]; ``decode``: the inverse."""

    def __init__(self, config: Flux2VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        # the stored statistics of the patchified latent; the norm itself never runs (no affine, no training)
        self.bn = nn.BatchNorm2d(config.latent_channels, eps=config.batch_norm_eps, affine=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.conv_in.weight.device

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(self.bn.running_var.view(1, -1, 1, 1) + self.config.batch_norm_eps).to(like.device, like.dtype)
        return mean, std

    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [-1, 1] ``[B, 3, H, W]`` -> raw 32-channel mean and log-variance ``[B, 32, H/8, W/8]``."""
        vae.check_shape(images, self.config.in_channels, self.config.downscale, "VAE input image shape")
        mean, logvar = self.encoder(images.to(device=self.device, dtype=self.dtype)).chunk(2, dim=1)
        return mean, logvar

    def _tiling_view(self, config: dict) -> SimpleNamespace:
        """What ``vae.AutoencoderKL``'s tiled encode/decode read off their VAE, for this one (one tiling code)."""
        return SimpleNamespace(config=SimpleNamespace(**config), device=self.device, dtype=self.dtype,
                               encode_moments=self.encode_moments, decode=self.decode)

    def encode(
        self, images: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True,
        tile: int | None = None,
    ) -> torch.Tensor:
        """Images -> normalised patchified latents. ``sample`` as ``vae.AutoencoderKL.encode`` (noise drawn in
        fp32 on the generator's device); ``sample=False`` takes the mean, as Flux2KleinPipeline does for
        reference images. ``tile`` (model-space latent cells) encodes in feathered tiles."""
        if tile is not None:
            cfg = self.config
            view = self._tiling_view({"in_channels": cfg.in_channels, "downscale": cfg.downscale // PATCH,
                                      "z_channels": cfg.z_channels})
            mean, logvar = vae.AutoencoderKL.encode_moments_tiled(  # in 8x cells: twice the tile
                view, images, PATCH * tile, overlap=PATCH * min(8, tile // 4))  # type: ignore[arg-type]
        else:
            mean, logvar = self.encode_moments(images)
        z = patchify(vae.sample_posterior(mean, logvar, generator) if sample else mean)
        bn_mean, bn_std = self._stats(z)
        return (z - bn_mean) / bn_std

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Model-space latents ``[B, 128, h, w]`` -> images ``[B, 3, 16h, 16w]``, nominally in [-1, 1] (unclamped)."""
        vae.check_shape(latents, self.config.latent_channels, 1, "VAE latent shape")
        z = latents.to(device=self.device, dtype=self.dtype)
        bn_mean, bn_std = self._stats(z)
        return self.decoder(unpatchify(z * bn_std + bn_mean))

    def decode_tiled(self, latents: torch.Tensor, tile: int = 64, overlap: int = 16) -> torch.Tensor:
        """``decode`` in feathered ``tile`` x ``tile`` pieces of model-space cells (``vae.AutoencoderKL.decode_tiled``)."""
        view = self._tiling_view({"z_channels": self.config.latent_channels, "downscale": self.config.downscale,
                                  "out_channels": self.config.out_channels})
        return vae.AutoencoderKL.decode_tiled(view, latents, tile, overlap)  # type: ignore[arg-type]
