"""The latent-diffusion UNet (Rombach et al. 2022) for SD1.x, SD2.x and SDXL.

One module, configured by :class:`UNetConfig`. Module and parameter names follow the single-file (LDM/SGM)
checkpoints, so ``UNetModel(cfg).state_dict()`` keys equal the checkpoint keys with ``model.diffusion_model.``
removed and loading needs no renaming::

    time_embed.{0,2}                 timestep MLP            label_emb.0.{0,2}   SDXL size/pooled-text MLP
    input_blocks.N.M                 ResBlock / SpatialTransformer / Downsample (``op``)
    middle_block.{0,1,2}             ResBlock, SpatialTransformer, ResBlock
    output_blocks.N.M                ResBlock / SpatialTransformer / Upsample (``conv``)
    out.{0,2}                        GroupNorm, conv to latent channels

The families differ only in configuration: SD1.x has 1x1-conv ``proj_in``/``proj_out`` and 8 heads per
attention; SD2.x and SDXL use Linear projections and 64-wide heads; SDXL drops attention at the first level,
stacks 2 and 10 transformer blocks deeper down and adds ``label_emb`` for its extra conditioning vector.

Attention goes through :func:`core.accel.attention.attention`, the single backend picker.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from core.accel import attention as attention_backend
from core.accel import feature_cache

# --------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class UNetConfig:
    """Everything that shapes the network. ``num_heads`` and ``head_dim`` are exclusive, as in LDM."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    # Transformer blocks per SpatialTransformer at each resolution level (0 = no attention there).
    transformer_depth: tuple[int, ...] = (1, 1, 1, 0)
    transformer_depth_middle: int = 1
    context_dim: int = 768
    num_heads: int | None = 8  # fixed head count (SD1.x) ...
    head_dim: int | None = None  # ... or fixed head width (SD2.x, SDXL)
    use_linear_in_transformer: bool = False  # Linear (SD2.x/SDXL) or 1x1 conv (SD1.x) proj_in/proj_out
    adm_in_channels: int | None = None  # SDXL: width of the ``y`` vector fed to label_emb
    num_groups: int = 32

    def __post_init__(self) -> None:
        if len(self.transformer_depth) != len(self.channel_mult):
            raise ValueError(
                f"transformer_depth has {len(self.transformer_depth)} levels but channel_mult has "
                f"{len(self.channel_mult)}; give one depth per level"
            )
        if (self.num_heads is None) == (self.head_dim is None):
            raise ValueError("set exactly one of num_heads and head_dim")
        last = len(self.channel_mult) - 1
        for level, (mult, depth) in enumerate(zip(self.channel_mult, self.transformer_depth)):
            ch = self.model_channels * mult
            if ch % self.num_groups:
                raise ValueError(f"level width {ch} is not divisible by the {self.num_groups} norm groups")
            if depth or (level == last and self.transformer_depth_middle):
                self.heads_for(ch)  # raises when the width does not split into the heads

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * 4

    def heads_for(self, channels: int) -> tuple[int, int]:
        """(heads, head width) of the attention at a level ``channels`` wide."""
        if self.num_heads is not None:
            if channels % self.num_heads:
                raise ValueError(f"width {channels} is not divisible by {self.num_heads} heads")
            return self.num_heads, channels // self.num_heads
        assert self.head_dim is not None
        if channels % self.head_dim:
            raise ValueError(f"width {channels} is not divisible by head width {self.head_dim}")
        return channels // self.head_dim, self.head_dim

    # ----------------------------------------------------------------------------------------------------------
    @classmethod
    def preset(cls, family: str, size: str = "full") -> UNetConfig:
        """The real configuration (``size="full"``) or the same structure at a few MB (``"tiny"``), as the
        family module (``core/models/families/<family>.py``) gives it."""
        from core.models.families import FAMILIES

        if size not in ("tiny", "full"):
            raise ValueError(f"size {size!r} is invalid; valid: tiny, full")
        known = [name for name, f in FAMILIES.items() if f.has("unet") and f.component("unet").presets]
        if family not in known:
            raise ValueError(f"UNet family {family!r} is unknown; valid: {', '.join(known)}")
        return cls(**FAMILIES[family].component("unet").presets[size])

    @classmethod
    def from_state_dict(cls, shapes: Mapping[str, tuple[int, ...]], family: str | None = None) -> UNetConfig:
        """Read the configuration off LDM/SGM keys and shapes (keys without ``model.diffusion_model.``).

        Head layout cannot be seen in the weights: ``family``'s real configuration gives it; without a family,
        1x1-conv projections mean SD1.x (8 heads), Linear projections SD2.x/SDXL (64-wide heads). Raises
        ``ValueError`` naming the missing or inconsistent key; the loader adds the file name.
        """
        shapes = {k: tuple(v) for k, v in shapes.items()}

        def shape(key: str) -> tuple[int, ...]:
            if key not in shapes:
                raise ValueError(f"UNet weights lack {key!r}; not an LDM/SGM UNet or truncated")
            return shapes[key]

        model_channels, in_channels = shape("input_blocks.0.0.weight")[:2]
        out_channels = shape("out.2.weight")[0]

        def block_ids(prefix: str) -> list[int]:
            found = {int(m.group(1)) for k in shapes if (m := re.match(rf"{prefix}\.(\d+)\.", k))}
            return sorted(found)

        inputs = block_ids("input_blocks")
        if inputs != list(range(len(inputs))):
            raise ValueError(f"UNet input_blocks are not numbered 0..n (found {inputs})")
        downsample_at = [i for i in inputs if f"input_blocks.{i}.0.op.weight" in shapes]
        levels = len(downsample_at) + 1
        num_res_blocks = (downsample_at[0] - 1) if downsample_at else len(inputs) - 1
        if num_res_blocks < 1 or len(inputs) != 1 + levels * num_res_blocks + (levels - 1):
            raise ValueError(
                f"UNet has {len(inputs)} input blocks and downsamplers at {downsample_at}, "
                "which is not an LDM level layout"
            )

        def depth(prefix: str) -> int:
            return len({int(m.group(1)) for k in shapes if (m := re.match(rf"{prefix}\.transformer_blocks\.(\d+)\.", k))})

        channel_mult, transformer_depth = [], []
        for level in range(levels):
            first = 1 + level * (num_res_blocks + 1)
            width = shape(f"input_blocks.{first}.0.in_layers.2.weight")[0]
            if width % model_channels:
                raise ValueError(f"UNet level {level} width {width} is not a multiple of {model_channels}")
            channel_mult.append(width // model_channels)
            transformer_depth.append(depth(f"input_blocks.{first}.1"))
        depth_middle = depth("middle_block.1")

        # Output blocks mirror the input levels; refuse variants with pruned blocks rather than misbuild them.
        outputs = block_ids("output_blocks")
        if len(outputs) != levels * (num_res_blocks + 1):
            raise ValueError(
                f"UNet has {len(outputs)} output blocks where {levels} levels of {num_res_blocks} ResBlocks need "
                f"{levels * (num_res_blocks + 1)}"
            )
        for level in range(levels):
            first = (levels - 1 - level) * (num_res_blocks + 1)
            if depth(f"output_blocks.{first}.1") != transformer_depth[level]:
                raise ValueError(
                    f"UNet output_blocks.{first} has a different transformer depth than input level {level}; "
                    "this pruned layout is not supported"
                )

        attn2 = next((k for k in shapes if k.endswith("transformer_blocks.0.attn2.to_k.weight")), None)
        proj_in = next((k for k in shapes if k.endswith(".proj_in.weight")), None)
        if attn2 is None or proj_in is None:
            raise ValueError("UNet weights have no cross-attention (attn2.to_k / proj_in); not a text-to-image UNet")
        context_dim = shapes[attn2][1]
        linear = len(shapes[proj_in]) == 2
        num_heads, head_dim = (None, 64) if linear else (8, None)
        if family is not None:
            full = cls.preset(family, "full")
            num_heads, head_dim = full.num_heads, full.head_dim
        adm = shapes["label_emb.0.0.weight"][1] if "label_emb.0.0.weight" in shapes else None
        return cls(
            in_channels=in_channels,
            out_channels=out_channels,
            model_channels=model_channels,
            channel_mult=tuple(channel_mult),
            num_res_blocks=num_res_blocks,
            transformer_depth=tuple(transformer_depth),
            transformer_depth_middle=depth_middle,
            context_dim=context_dim,
            num_heads=num_heads,
            head_dim=head_dim,
            use_linear_in_transformer=linear,
            adm_in_channels=adm,
        )


# --------------------------------------------------------------------------------------------------------------
# Building blocks


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [B] -> [B, dim], cosines first (the LDM order)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def conv2d(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)``, computed as im2col + one matmul for wide convs over few positions on the CPU.

    Measured (bench/bench_unet.py, oneDNN in torch 2.13): a 1280-channel 3x3 conv on 2x8x8 or 2x4x4 positions
    runs 1.3-2.5x faster as unfold + matmul in fp32, while at 640 channels or 512+ positions the library conv
    wins. SD1.5 spends its two lowest levels in exactly that regime; the result is the same to fp32 rounding.
    The batch is folded into the matmul's columns: one [C_out, K] x [K, B*P] product, so the weight is never
    broadcast over the batch (a batched matmul copies it per call; in bf16 that copy cost more than the convs).
    """
    b, c, h, w = x.shape
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    ph, pw = conv.padding
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    if x.device.type != "cpu" or c < 1024 or b * ho * wo > 128 or conv.groups != 1 or kh * kw == 1:
        return conv(x)
    cols = F.unfold(x, conv.kernel_size, padding=conv.padding, stride=conv.stride)  # [B, K=C*kh*kw, P=Ho*Wo]
    cols = cols.transpose(0, 1).reshape(cols.shape[1], b * ho * wo)  # [K, B*P]
    out = (conv.weight.flatten(1) @ cols).view(-1, b, ho * wo).transpose(0, 1)  # [B, C_out, P]
    if conv.bias is not None:
        out = out + conv.bias[:, None]
    return out.reshape(b, -1, ho, wo)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the timestep embedding added in between, plus a skip."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int = 32) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(groups, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(groups, out_channels),
            nn.SiLU(),
            nn.Dropout(0.0),  # index kept so the conv is ``out_layers.3`` as in the checkpoints
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # x [B, C, H, W], emb [B, E]
        norm_in, _, conv_in = self.in_layers
        h = conv2d(conv_in, F.silu(norm_in(x)))  # [B, C', H, W]
        h = h + self.emb_layers[1](F.silu(emb))[:, :, None, None]
        norm_out, _, _, conv_out = self.out_layers
        h = conv2d(conv_out, F.silu(norm_out(h)))
        return self.skip_connection(x) + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv: [B, C, H, W] -> [B, C, ceil(H/2), ceil(W/2)]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv2d(self.op, x)


class Upsample(nn.Module):
    """Nearest x2 then 3x3 conv. ``size`` forces the skip's size when a latent side was odd on the way down."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None or tuple(size) == (x.shape[-2] * 2, x.shape[-1] * 2):
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return conv2d(self.conv, x)


class CrossAttention(nn.Module):
    """Multi-head attention of ``x`` [B, N, query_dim] over ``context`` [B, T, context_dim] (or itself)."""

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)  # [B, N|T, heads*dim_head]
        out = attention_backend.attention(q, k, v, self.heads, layer=self)
        return self.to_out[0](out)


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): one projection to twice the width, half of it gates the other half."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU MLP with 4x expansion; ``net.1`` is the (inactive) dropout slot of the checkpoints."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the text, GEGLU feed-forward; each residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Transformer over the H*W positions of a feature map, conditioned on the text context."""

    def __init__(
        self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int, linear: bool, groups: int = 32
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        self.linear = linear
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth)
        )
        self.proj_out = nn.Linear(inner, channels) if linear else nn.Conv2d(inner, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        h_ = self.norm(x)
        if not self.linear:
            h_ = self.proj_in(h_)
        h_ = h_.permute(0, 2, 3, 1).reshape(b, h * w, -1)  # [B, H*W, inner]
        if self.linear:
            h_ = self.proj_in(h_)
        for block in self.transformer_blocks:
            h_ = block(h_, context)
        if self.linear:
            h_ = self.proj_out(h_)
        else:
            # A 1x1 conv is a Linear over channels: apply it while tokens are rows, skipping a layout round trip.
            h_ = F.linear(h_, self.proj_out.weight.flatten(1), self.proj_out.bias)
        # [B, H*W, C] -> [B, C, H, W]; x first so the sum comes out in x's (contiguous NCHW) layout.
        return x + h_.reshape(b, h, w, c).permute(0, 3, 1, 2)


class TimestepEmbedSequential(nn.Sequential):
    """One UNet block: hands each layer what it needs (emb to ResBlocks, context to transformers)."""

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        emb: torch.Tensor,
        context: torch.Tensor,
        upsample_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, upsample_size)
            else:
                x = layer(x)
        return x


# --------------------------------------------------------------------------------------------------------------
# The network


class UNetModel(nn.Module):
    """Noise (or v) predictor: latents [B, C, H, W], timesteps [B], text [B, T, D] (+ SDXL y) -> [B, C, H, W]."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = cfg = config
        mc, ted, groups = cfg.model_channels, cfg.time_embed_dim, cfg.num_groups

        self.time_embed = nn.Sequential(nn.Linear(mc, ted), nn.SiLU(), nn.Linear(ted, ted))
        if cfg.adm_in_channels is not None:
            self.label_emb = nn.Sequential(
                nn.Sequential(nn.Linear(cfg.adm_in_channels, ted), nn.SiLU(), nn.Linear(ted, ted))
            )

        def transformer(ch: int, depth: int) -> SpatialTransformer:
            heads, dim_head = cfg.heads_for(ch)
            return SpatialTransformer(
                ch, heads, dim_head, depth, cfg.context_dim, cfg.use_linear_in_transformer, groups
            )

        # Down path: remember each block's width, the up path concatenates them back as skips.
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))]
        )
        skip_channels = [mc]
        ch = mc
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, ted, mc * mult, groups)]
                ch = mc * mult
                if cfg.transformer_depth[level]:
                    layers.append(transformer(ch, cfg.transformer_depth[level]))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)

        middle: list[nn.Module] = [ResBlock(ch, ted, ch, groups)]
        if cfg.transformer_depth_middle:
            middle.append(transformer(ch, cfg.transformer_depth_middle))
        middle.append(ResBlock(ch, ted, ch, groups))
        self.middle_block = TimestepEmbedSequential(*middle)

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), ted, mc * mult, groups)]
                ch = mc * mult
                if cfg.transformer_depth[level]:
                    layers.append(transformer(ch, cfg.transformer_depth[level]))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            nn.GroupNorm(groups, ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1)
        )

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        cfg = self.config
        if (y is None) != (cfg.adm_in_channels is None):
            raise ValueError(
                "this UNet needs the SDXL conditioning vector y" if y is None else "this UNet takes no y vector"
            )
        timesteps = timesteps.to(x.device).expand(x.shape[0]) if timesteps.ndim == 0 else timesteps
        emb = self.time_embed(timestep_embedding(timesteps, cfg.model_channels).to(x.dtype))  # [B, 4*mc]
        if y is not None:
            emb = emb + self.label_emb(y.to(x.dtype))
        context = context.to(x.dtype)

        cache = feature_cache.current()  # DeepCache / first-block cache of the running pass, if any
        h = cache.unet(self, x, emb, context) if cache is not None else self.blocks(x, emb, context)
        norm, _, conv = self.out
        return conv(F.silu(norm(h)))

    def blocks(
        self,
        x: torch.Tensor,
        emb: torch.Tensor,
        context: torch.Tensor,
        start: int = 0,
        skips: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Input, middle and output blocks (all but ``out``). ``start`` > 0 resumes the down path at that input
        block with ``skips`` the outputs of the blocks before it (the last one is its input)."""
        skips = list(skips or [])
        h = skips[-1] if start else x
        for block in self.input_blocks[start:]:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for index in range(len(self.output_blocks)):
            h = self.up_block(index, h, skips, emb, context)
        return h

    def up_block(
        self, index: int, h: torch.Tensor, skips: list[torch.Tensor], emb: torch.Tensor, context: torch.Tensor
    ) -> torch.Tensor:
        """Output block ``index`` on ``h`` and the skip it takes (popped from ``skips``)."""
        h = torch.cat([h, skips.pop()], dim=1)
        # The upsampler must land on the size of the skip the next block concatenates.
        size = tuple(skips[-1].shape[-2:]) if skips else None
        return self.output_blocks[index](h, emb, context, size)
