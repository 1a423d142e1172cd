"""The Flux.1 transformer (Black Forest Labs 2024): a rectified-flow DiT with double- and single-stream blocks.

Module and parameter names are BFL's (``black-forest-labs/flux src/flux/model.py``), exactly as
``flux1-dev.safetensors`` / ``flux1-schnell.safetensors`` store them (no prefix; combined ComfyUI files put them
under ``model.diffusion_model.``), so loading is ``load_state_dict(..., assign=True)`` with no renaming::

    img_in                      Linear  [hidden, 64]     packed 2x2 patches of the 16-channel latent
    txt_in                      Linear  [hidden, 4096]   T5-XXL hidden states
    time_in / guidance_in       MLPEmbedder (in_layer, SiLU, out_layer) of a 256-wide sinusoidal embedding;
                                guidance_in exists only in dev (guidance-distilled), not in schnell
    vector_in                   MLPEmbedder of CLIP-L's pooled vector [768]
    double_blocks.N             img/txt streams with their own weights, one joint attention
        {img,txt}_mod.lin       Linear [6*hidden, hidden]: shift, scale, gate for attention and MLP
        {img,txt}_attn.qkv      Linear [3*hidden, hidden]; .norm.{query,key}_norm.scale [head_dim]; .proj
        {img,txt}_mlp.{0,2}     Linear, GELU(tanh), Linear
    single_blocks.N             one stream over [txt; img]: linear1 = qkv + MLP-in fused, linear2 = out + MLP-out
        modulation.lin          Linear [3*hidden, hidden]; norm.{query,key}_norm.scale [head_dim]
    final_layer                 adaLN_modulation.1 (shift, scale) and linear [64, hidden]

Positions are 3-axis RoPE (axes 16/56/56 of the 128-wide head: a constant index, the latent row, the latent
column; text tokens are all at 0) applied to the RMS-normalised queries and keys before attention, which goes
through :func:`core.accel.attention.attention` (so Sage/xformers serve it on CUDA). Timesteps are in 0..1 (t = 1 is pure noise); the model scales
them by 1000 before the sinusoidal embedding, as does the distilled guidance.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.accel import attention as attention_backend
from core.accel import feature_cache

TIME_EMBED_DIM = 256  # width of the sinusoidal timestep / guidance embedding fed to time_in / guidance_in
VARIANTS = ("dev", "schnell")

# --------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class FluxConfig:
    """BFL's ``FluxParams``. ``in_channels`` counts packed channels (16 latent channels x 2x2 = 64)."""

    in_channels: int = 64
    out_channels: int = 64
    vec_in_dim: int = 768  # CLIP-L pooled
    context_in_dim: int = 4096  # T5-XXL width
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19  # double-stream blocks
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True  # dev: True, schnell: False

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden size {self.hidden_size} is not divisible by {self.num_heads} heads")
        if sum(self.axes_dim) != self.head_dim:
            raise ValueError(f"RoPE axes {self.axes_dim} do not add up to the head width {self.head_dim}")
        if any(d % 2 for d in self.axes_dim):
            raise ValueError(f"RoPE axes {self.axes_dim} must all be even")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        # BFL truncates; the epsilon keeps a ratio read off the shapes (m / hidden) from landing on m - 1.
        return int(self.hidden_size * self.mlp_ratio + 1e-6)

    @property
    def variant(self) -> str:
        return "dev" if self.guidance_embed else "schnell"

    @classmethod
    def preset(cls, family: str = "flux", size: str = "full", variant: str = "dev") -> FluxConfig:
        """FLUX.1 ``variant`` ("dev" or "schnell") at its real size (``"full"``) or a few-MB copy (``"tiny"``).

        The tiny model keeps the real in/out channels (16-channel latents, so the Flux VAE drives it) and
        shrinks everything else; its text widths match the tiny T5 (32) and CLIP-L (32) presets.
        """
        if family != "flux":
            raise ValueError(f"Flux transformer family {family!r} is unknown; valid: flux")
        if size not in ("tiny", "full"):
            raise ValueError(f"size {size!r} is invalid; valid: tiny, full")
        if variant not in VARIANTS:
            raise ValueError(f"Flux variant {variant!r} is unknown; valid: {', '.join(VARIANTS)}")
        # FLUX.1-dev / -schnell transformer/config.json: 19 + 38 blocks, 24 heads x 128, 4096 / 768 inputs.
        cfg = cls(guidance_embed=variant == "dev")
        if size == "tiny":
            cfg = replace(
                cfg,
                vec_in_dim=32,
                context_in_dim=32,
                hidden_size=64,
                num_heads=2,
                depth=2,
                depth_single_blocks=2,
                axes_dim=(4, 14, 14),
            )
        return cfg

    @classmethod
    def from_state_dict(cls, shapes: Mapping[str, tuple[int, ...]], family: str | None = None) -> FluxConfig:
        """Read the configuration off BFL-named keys and shapes (without ``model.diffusion_model.``); everything
        the config holds shows in the weights, so ``family`` (the loader passes it) changes nothing.

        Head width is the width of the QK-norm scales, so pruned or resized variants load; the RoPE split of the
        head is not in the weights: 128-wide heads use BFL's (16, 56, 56), others the same proportions.
        Raises ``ValueError`` naming the missing or inconsistent key; the loader adds the file name.
        """
        shapes = {k: tuple(v) for k, v in shapes.items()}

        def shape(key: str) -> tuple[int, ...]:
            if key not in shapes:
                raise ValueError(f"Flux transformer weights lack {key!r}; not a BFL-layout Flux model or truncated")
            return shapes[key]

        def block_ids(prefix: str) -> int:
            found = sorted({int(m.group(1)) for k in shapes if (m := re.match(rf"{prefix}\.(\d+)\.", k))})
            if found != list(range(len(found))):
                raise ValueError(f"Flux {prefix} are not numbered 0..n (found {found})")
            return len(found)

        hidden, in_channels = shape("img_in.weight")
        depth, depth_single = block_ids("double_blocks"), block_ids("single_blocks")
        if depth + depth_single == 0:
            raise ValueError("Flux transformer weights have neither double_blocks nor single_blocks")
        if depth:
            head_dim = shape("double_blocks.0.img_attn.norm.query_norm.scale")[0]
            mlp_hidden = shape("double_blocks.0.img_mlp.0.weight")[0]
            qkv_bias = "double_blocks.0.img_attn.qkv.bias" in shapes
        else:
            head_dim = shape("single_blocks.0.norm.query_norm.scale")[0]
            mlp_hidden = shape("single_blocks.0.linear1.weight")[0] - 3 * hidden
            qkv_bias = True  # single blocks' linear1 always has a bias
        if hidden % head_dim:
            raise ValueError(f"Flux hidden size {hidden} is not a multiple of the QK-norm width {head_dim}")
        time_dim = shape("time_in.in_layer.weight")[1]
        if time_dim != TIME_EMBED_DIM:
            raise ValueError(f"Flux time_in takes {time_dim} features; BFL's timestep embedding is {TIME_EMBED_DIM}")
        return cls(
            in_channels=in_channels,
            out_channels=shape("final_layer.linear.weight")[0],
            vec_in_dim=shape("vector_in.in_layer.weight")[1],
            context_in_dim=shape("txt_in.weight")[1],
            hidden_size=hidden,
            mlp_ratio=mlp_hidden / hidden,
            num_heads=hidden // head_dim,
            depth=depth,
            depth_single_blocks=depth_single,
            axes_dim=rope_axes(head_dim),
            qkv_bias=qkv_bias,
            guidance_embed="guidance_in.in_layer.weight" in shapes,
        )


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """RoPE widths of (index, row, column) in a head: BFL's 16/56/56 of 128, i.e. 1/8 then two equal halves."""
    first = max(2, head_dim // 8 // 2 * 2)
    rest = head_dim - first
    if rest <= 0 or rest % 4:
        raise ValueError(f"a {head_dim}-wide head cannot be split into three even RoPE axes like BFL's 16/56/56")
    return (first, rest // 2, rest // 2)


# --------------------------------------------------------------------------------------------------------------
# Latent packing and positions (the pipeline's side of the model's input)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] latents -> [B, (H/2)(W/2), C*4] tokens of 2x2 patches, channel-major (BFL's rearrange)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"Flux latents must have even height and width (images a multiple of 16), got {h}x{w}")
    x = latents.view(b, c, h // 2, 2, w // 2, 2)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents`: [B, (H/2)(W/2), C*4] -> [B, C, H, W] for latent ``height`` x ``width``."""
    b, n, d = tokens.shape
    h, w = height // 2, width // 2
    if height % 2 or width % 2 or n != h * w or d % 4:
        raise ValueError(f"{n} tokens of width {d} are not the 2x2 patches of a {height}x{width} latent")
    x = tokens.view(b, h, w, d // 4, 2, 2)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, height, width)


def img_ids(
    height: int, width: int, batch: int = 1, device: torch.device | str | None = None
) -> torch.Tensor:
    """Positions [B, (H/2)(W/2), 3] of the packed tokens of a ``height`` x ``width`` latent: (0, row, column)."""
    h, w = height // 2, width // 2
    ids = torch.zeros(h, w, 3, device=device)
    ids[..., 1] = torch.arange(h, device=device)[:, None]
    ids[..., 2] = torch.arange(w, device=device)[None, :]
    return ids.reshape(1, h * w, 3).expand(batch, -1, -1)


def txt_ids(length: int, batch: int = 1, device: torch.device | str | None = None) -> torch.Tensor:
    """Positions [B, S, 3] of the text tokens: all zero (T5's own relative positions already ordered them)."""
    return torch.zeros(batch, length, 3, device=device)


# --------------------------------------------------------------------------------------------------------------
# Embeddings


def timestep_embedding(t: torch.Tensor, dim: int = TIME_EMBED_DIM, max_period: float = 10_000.0) -> torch.Tensor:
    """[B] values in 0..1 -> [B, dim] = [cos, sin] of 1000*t at geometric frequencies (BFL, time_factor 1000)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (1000.0 * t.float())[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_frequencies(ids: torch.Tensor, axes_dim: tuple[int, ...], theta: int) -> torch.Tensor:
    """Unit complex rotations e^(i*angle) for positions ``ids`` [B, N, axes] -> complex64 [B, N, 1, head_dim/2].

    Angles are computed in float64 (as BFL and diffusers do: positions reach a few hundred and the slowest
    frequency is 1e-4, so fp32 would lose digits), on the CPU (the table is small; MPS has no float64), then
    stored as cos + i*sin in fp32 on ``ids``' device.
    """
    pos = ids.to("cpu", torch.float64)
    angles = []
    for axis, dim in enumerate(axes_dim):
        omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angles.append(pos[..., axis, None] * omega)  # [B, N, dim/2]
    angle = torch.cat(angles, dim=-1).unsqueeze(2)  # [B, N, 1, head_dim/2], broadcast over heads
    return torch.complex(angle.cos().float(), angle.sin().float()).to(ids.device)


def joint_rope(img_ids: torch.Tensor, txt_ids: torch.Tensor, axes_dim: tuple[int, ...], theta: int) -> torch.Tensor:
    """The rotations of the joint sequence [txt; img] (``rope_frequencies``): [B|1, S + L, 1, head_dim/2]; the ids
    are [B|1, N, axes] or [N, axes]. Flux.1 and FLUX.2 take it from their adapters: made on the CPU, it cannot
    be part of a CUDA graph (``core.accel.cuda_graphs``)."""
    img_ids = img_ids if img_ids.ndim == 3 else img_ids[None]
    txt_ids = txt_ids if txt_ids.ndim == 3 else txt_ids[None]
    n = max(img_ids.shape[0], txt_ids.shape[0])
    ids = torch.cat((txt_ids.expand(n, -1, -1), img_ids.expand(n, -1, -1)), dim=1)  # [B|1, S + L, axes]
    return rope_frequencies(ids, axes_dim, theta)


class LastTable:
    """An adapter's last RoPE table and the shape it was made for: a pass calls its network at one shape, and
    making the table every step is host work (and a CPU round trip of the positions)."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._table: torch.Tensor | tuple[torch.Tensor, ...] | None = None

    def get(self, key: tuple, make: Callable[[], torch.Tensor | tuple[torch.Tensor, ...]]) -> Any:
        if self._table is None or key != self._key:
            self._key, self._table = key, make()
        return self._table


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x[2i], x[2i+1]) of [B, N, H, D] by ``freqs``; computed in fp32 (BFL).

    The pair is read as the complex number x[2i] + i*x[2i+1], so the rotation is one complex multiply:
    (x0*cos - x1*sin, x0*sin + x1*cos), BFL's formula, in a single pass over the data (several times faster on
    CPU than the same arithmetic on strided real halves).
    """
    pairs = torch.view_as_complex(x.float().contiguous().unflatten(-1, (-1, 2)))  # [B, N, H, D/2]
    return torch.view_as_real(pairs * freqs).flatten(-2).to(x.dtype)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=bias)
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


# --------------------------------------------------------------------------------------------------------------
# Blocks


class RMSNorm(nn.Module):
    """RMS norm over the head width with a learned gain; normalised in fp32 as BFL does."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), eps=1e-6).to(x.dtype) * self.scale


class QKNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.query_norm(q).to(v.dtype), self.key_norm(k).to(v.dtype)


class SelfAttention(nn.Module):
    """The weights of one stream's attention; the joint attention itself runs in the block."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, proj_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, L, hidden] -> normalised q, k and v, each [B, L, H, D]."""
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, -1).unbind(2)
        q, k = self.norm(q, k, v)
        return q, k, v


class Modulation(nn.Module):
    """adaLN from the conditioning vector: (shift, scale, gate) once (single) or twice (double blocks)."""

    def __init__(self, dim: int, double: bool, bias: bool = True) -> None:
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=bias)

    def forward(self, vec: torch.Tensor) -> list[torch.Tensor]:
        # [B, hidden] -> multiplier tensors [B, 1, hidden], broadcast over tokens
        return self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)


def _layer_norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)  # elementwise_affine=False: modulation supplies the affine


def joint_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """RoPE on q, k [B, N, H, D], then attention over all N tokens; returns [B, N, H*D]."""
    heads = q.shape[2]
    q, k = apply_rope(q, pe), apply_rope(k, pe)
    return attention_backend.attention(q.flatten(2), k.flatten(2), v.flatten(2), heads)


class DoubleStreamBlock(nn.Module):
    """Image and text tokens keep separate weights but attend jointly over [txt; img]."""

    def __init__(self, cfg: FluxConfig) -> None:
        super().__init__()
        dim, mlp = cfg.hidden_size, cfg.mlp_hidden_dim
        self.img_mod = Modulation(dim, double=True)
        self.img_attn = SelfAttention(dim, cfg.num_heads, cfg.qkv_bias)
        self.img_mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(approximate="tanh"), nn.Linear(mlp, dim))
        self.txt_mod = Modulation(dim, double=True)
        self.txt_attn = SelfAttention(dim, cfg.num_heads, cfg.qkv_bias)
        self.txt_mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(approximate="tanh"), nn.Linear(mlp, dim))

    def forward(
        self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # img [B, L, hidden], txt [B, S, hidden], vec [B, hidden]; pe covers the S + L joint tokens
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = self.img_mod(vec)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = self.txt_mod(vec)

        img_q, img_k, img_v = self.img_attn.qkv_heads((1 + i_scale1) * _layer_norm(img) + i_shift1)
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads((1 + t_scale1) * _layer_norm(txt) + t_shift1)
        q = torch.cat((txt_q, img_q), dim=1)  # [B, S + L, H, D]
        k = torch.cat((txt_k, img_k), dim=1)
        v = torch.cat((txt_v, img_v), dim=1)
        attn = joint_attention(q, k, v, pe)  # [B, S + L, hidden]
        s = txt.shape[1]
        txt_attn, img_attn = attn[:, :s], attn[:, s:]

        img = img + i_gate1 * self.img_attn.proj(img_attn)
        img = img + i_gate2 * self.img_mlp((1 + i_scale2) * _layer_norm(img) + i_shift2)
        txt = txt + t_gate1 * self.txt_attn.proj(txt_attn)
        txt = txt + t_gate2 * self.txt_mlp((1 + t_scale2) * _layer_norm(txt) + t_shift2)
        return img, txt


class SingleStreamBlock(nn.Module):
    """One stream over [txt; img] with attention and MLP in parallel (Dehghani et al. 2023's ViT-22B block)."""

    def __init__(self, cfg: FluxConfig) -> None:
        super().__init__()
        dim = cfg.hidden_size
        self.hidden_size = dim
        self.num_heads = cfg.num_heads
        self.mlp_hidden_dim = cfg.mlp_hidden_dim
        # linear1 = q, k, v and the MLP's first layer in one matmul; linear2 = attention out + MLP out
        self.linear1 = nn.Linear(dim, dim * 3 + self.mlp_hidden_dim)
        self.linear2 = nn.Linear(dim + self.mlp_hidden_dim, dim)
        self.norm = QKNorm(cfg.head_dim)
        self.modulation = Modulation(dim, double=False)

    def forward(self, x: torch.Tensor, vec: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
        # x [B, S + L, hidden]
        shift, scale, gate = self.modulation(vec)
        b, n, _ = x.shape
        qkv, mlp = self.linear1((1 + scale) * _layer_norm(x) + shift).split(
            [3 * self.hidden_size, self.mlp_hidden_dim], dim=-1
        )
        q, k, v = qkv.view(b, n, 3, self.num_heads, -1).unbind(2)  # each [B, N, H, D]
        q, k = self.norm(q, k, v)
        attn = joint_attention(q, k, v, pe)
        out = self.linear2(torch.cat((attn, F.gelu(mlp, approximate="tanh")), dim=2))
        return x + gate * out


class LastLayer(nn.Module):
    """Output head; ``cfg`` needs ``hidden_size`` and ``out_channels`` (FLUX.2's config has them too)."""

    def __init__(self, cfg: FluxConfig, bias: bool = True) -> None:
        super().__init__()
        dim = cfg.hidden_size
        self.linear = nn.Linear(dim, cfg.out_channels, bias=bias)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim, bias=bias))

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)  # BFL order: shift first
        return self.linear((1 + scale) * _layer_norm(x) + shift)


# --------------------------------------------------------------------------------------------------------------
# The model


class Flux(nn.Module):
    """``forward(img, img_ids, txt, txt_ids, timesteps, y, guidance)`` -> velocity tokens [B, L, out_channels]."""

    def __init__(self, cfg: FluxConfig) -> None:
        super().__init__()
        self.config = cfg
        dim = cfg.hidden_size
        self.img_in = nn.Linear(cfg.in_channels, dim)
        self.time_in = MLPEmbedder(TIME_EMBED_DIM, dim)
        self.vector_in = MLPEmbedder(cfg.vec_in_dim, dim)
        if cfg.guidance_embed:
            self.guidance_in = MLPEmbedder(TIME_EMBED_DIM, dim)
        self.txt_in = nn.Linear(cfg.context_in_dim, dim)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(cfg) for _ in range(cfg.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(cfg) for _ in range(cfg.depth_single_blocks))
        self.final_layer = LastLayer(cfg)

    def _check(self, img, img_ids, txt, txt_ids, timesteps, y, guidance) -> None:
        cfg = self.config
        for name, tensor in (("img", img), ("txt", txt)):
            if tensor.ndim != 3:
                raise ValueError(f"Flux input {name} must be [batch, tokens, features], got {list(tensor.shape)}")
        b = img.shape[0]
        expected = {
            "img": (img, (b, None, cfg.in_channels)),
            "img_ids": (img_ids, (None, img.shape[1], 3)),
            "txt": (txt, (b, None, cfg.context_in_dim)),
            "txt_ids": (txt_ids, (None, txt.shape[1], 3)),
            "timesteps": (timesteps, (b,)),
            "y": (y, (b, cfg.vec_in_dim)),
        }
        if cfg.guidance_embed:
            if guidance is None:
                raise ValueError("this Flux model is guidance-distilled (dev): pass a guidance value per image")
            expected["guidance"] = (guidance, (b,))
        for name, (tensor, want) in expected.items():
            ok = tensor.ndim == len(want) and all(w is None or s == w for s, w in zip(tensor.shape, want))
            if name.endswith("_ids"):  # [B or 1, N, 3], or [N, 3]: the same positions for every image
                ok = tensor.ndim in (2, 3) and tuple(tensor.shape[-2:]) == want[1:] and (tensor.ndim == 2 or tensor.shape[0] in (1, b))
            if not ok:
                shown = ", ".join("*" if w is None else str(w) for w in want)
                if name.endswith("_ids"):
                    shown = f"{b} or 1, {want[1]}, 3] or [{want[1]}, 3"
                raise ValueError(f"Flux input {name} must be [{shown}], got {list(tensor.shape)}")

    def forward(
        self,
        img: torch.Tensor,
        img_ids: torch.Tensor,
        txt: torch.Tensor,
        txt_ids: torch.Tensor,
        timesteps: torch.Tensor,
        y: torch.Tensor,
        guidance: torch.Tensor | None = None,
        pe: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """img [B, L, 64] packed latents, img_ids [B, L, 3], txt [B, S, 4096] T5 states, txt_ids [B, S, 3],
        timesteps [B] in 0..1, y [B, 768] CLIP-L pooled, guidance [B] (dev; ignored by schnell) -> [B, L, 64].
        ``pe``: ``joint_rope`` of the ids, where the caller has it (``LatentFlux``).
        """
        self._check(img, img_ids, txt, txt_ids, timesteps, y, guidance)
        dtype = self.img_in.weight.dtype
        img = self.img_in(img.to(dtype))
        vec = self.time_in(timestep_embedding(timesteps).to(dtype))
        if self.config.guidance_embed:
            vec = vec + self.guidance_in(timestep_embedding(guidance).to(dtype))
        vec = vec + self.vector_in(y.to(dtype))
        txt = self.txt_in(txt.to(dtype))

        if pe is None:
            pe = joint_rope(img_ids, txt_ids, self.config.axes_dim, self.config.theta)

        cache = feature_cache.current()  # first-block cache of the running pass, if any
        img, txt = cache.flux(self, img, txt, vec, pe) if cache is not None else self.blocks(img, txt, vec, pe)
        return self.final_layer(img, vec)

    def blocks(
        self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, pe: torch.Tensor, start: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Double-stream blocks from ``start``, then the single-stream blocks -> (img, txt) hidden states."""
        for block in self.double_blocks[start:]:
            img, txt = block(img, txt, vec, pe)
        x = torch.cat((txt, img), dim=1)  # [B, S + L, hidden]
        for block in self.single_blocks:
            x = block(x, vec, pe)
        s = txt.shape[1]
        return x[:, s:], x[:, :s]


class LatentFlux:
    """The transformer seen from the sampler: ``(x [B, 16, h, w], t [B], context, y, guidance) -> velocity``.

    Packs the latents into 2x2 patches with their (0, row, column) positions, gives the T5 states positions 0,
    feeds the distilled ``guidance`` only to a model that has ``guidance_in`` (dev; schnell ignores it) and
    unpacks the prediction, as ``FluxPipeline`` does around ``FluxTransformer2DModel``.
    """

    def __init__(self, network: Flux) -> None:
        self.network = network
        self.rope = LastTable()

    def __call__(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        *,
        context: torch.Tensor,
        y: torch.Tensor,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        _, _, h, w = x.shape
        cfg = self.network.config
        guidance = guidance if cfg.guidance_embed else None
        image, text = img_ids(h, w, device=x.device), txt_ids(context.shape[1], device=x.device)
        pe = self.rope.get((h, w, context.shape[1], x.device),
                           lambda: joint_rope(image, text, cfg.axes_dim, cfg.theta))
        out = self.network(pack_latents(x), image, context, text, t, y, guidance, pe=pe)
        return unpack_latents(out, h, w).to(x.dtype)
