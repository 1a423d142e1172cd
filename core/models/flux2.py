"""The FLUX.2 transformer (Black Forest Labs 2025; [klein] 4B / 9B, and dev's shapes): a rectified-flow DiT.

Parameter names are BFL's (``black-forest-labs/flux2 src/flux2/model.py``), as ``flux-2-klein-4b.safetensors``
and the Comfy-Org repackage store them (no prefix; combined files put them under ``model.diffusion_model.``),
so loading is ``load_state_dict(..., assign=True)`` with no renaming. Shapes for klein 4B (D = 3072, 24 heads x
128, MLP 9216; 9B: D = 4096, 32 heads, MLP 12288, 8 + 24 blocks)::

    img_in.weight                               [D, 128]    patchified 32-channel latent (2x2 -> 128), one token
    txt_in.weight                               [D, 7680]   Qwen3 hidden states of 3 layers, concatenated (9B: 12288)
    time_in.{in,out}_layer.weight               [D, 256] / [D, D]   (guidance_in.*: dev only, not klein)
    double_stream_modulation_{img,txt}.lin.weight   [6D, D]  SHARED by every double block (one per stream)
    single_stream_modulation.lin.weight             [3D, D]  SHARED by every single block
    double_blocks.N  (5 in 4B)
        {img,txt}_attn.qkv.weight               [3D, D]     rows q | k | v
        {img,txt}_attn.norm.{query,key}_norm.scale  [128]
        {img,txt}_attn.proj.weight              [D, D]
        {img,txt}_mlp.0.weight                  [2*3D, D]   SwiGLU: silu(first half) * second half
        {img,txt}_mlp.2.weight                  [D, 3D]
    single_blocks.N  (20 in 4B)
        linear1.weight                          [3D + 2*3D, D]  q | k | v | mlp gate | mlp up
        linear2.weight                          [D, D + 3D]     attention out + MLP out
        norm.{query,key}_norm.scale             [128]
    final_layer.adaLN_modulation.1.weight       [2D, D]     rows shift | scale
    final_layer.linear.weight                   [128, D]

No tensor has a bias. Against Flux.1 (``core/models/flux.py``, whose pieces this module reuses: QK-norm
attention, RoPE, the timestep embedding, modulation and output layer) the differences are the shared
modulation, SwiGLU instead of GELU MLPs, no CLIP vector, and 4-axis RoPE (32 dims each of the 128-wide head,
theta 2000) on positions ``(t, h, w, l)``: text token i at ``(0, 0, 0, i)``, latent cell (r, c) at
``(0, r, c, 0)``. Timesteps are sigma in 0..1 (the model scales by 1000). The output is the velocity.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from core.models.flux import (
    TIME_EMBED_DIM,
    LastLayer,
    LastTable,
    MLPEmbedder,
    Modulation,
    QKNorm,
    SelfAttention,
    _layer_norm,
    joint_attention,
    joint_rope,
    timestep_embedding,
)

VARIANTS = ("klein-4b", "klein-9b", "dev")
ROPE_AXES = 4  # (t, h, w, l)

# --------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class Flux2Config:
    """diffusers' ``Flux2Transformer2DModel`` config in BFL's terms (``in_channels`` counts the 128 patchified
    channels; ``context_in_dim`` is 3 x the Qwen3 width)."""

    in_channels: int = 128
    out_channels: int = 128
    context_in_dim: int = 7680
    hidden_size: int = 3072
    mlp_ratio: float = 3.0
    num_heads: int = 24
    depth: int = 5  # double-stream blocks
    depth_single_blocks: int = 20
    axes_dim: tuple[int, ...] = (32, 32, 32, 32)
    theta: int = 2000
    guidance_embed: bool = False  # FLUX.2-dev only

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden size {self.hidden_size} is not divisible by {self.num_heads} heads")
        if len(self.axes_dim) != ROPE_AXES or sum(self.axes_dim) != self.head_dim:
            raise ValueError(f"RoPE axes {self.axes_dim} must be 4 widths adding up to the head width {self.head_dim}")
        if any(d % 2 for d in self.axes_dim):
            raise ValueError(f"RoPE axes {self.axes_dim} must all be even")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        # diffusers truncates int(D * ratio); the epsilon keeps a ratio read off the shapes from landing on m - 1.
        return int(self.hidden_size * self.mlp_ratio + 1e-6)

    @classmethod
    def preset(cls, size: str = "full", variant: str = "klein-4b") -> Flux2Config:
        """``variant`` at its real size (``"full"``, the shipped ``transformer/config.json``) or a tiny copy.

        The tiny model keeps the real 128 in/out channels (so the FLUX.2 VAE layout drives it) and 4 x 4-wide RoPE
        axes of a 16-wide head; its text width 96 = 3 x a 32-wide Qwen3.
        """
        if size not in ("tiny", "full"):
            raise ValueError(f"size {size!r} is invalid; valid: tiny, full")
        if variant not in VARIANTS:
            raise ValueError(f"FLUX.2 variant {variant!r} is unknown; valid: {', '.join(VARIANTS)}")
        if variant == "klein-4b":
            cfg = cls()
        elif variant == "klein-9b":
            cfg = cls(context_in_dim=12288, hidden_size=4096, num_heads=32, depth=8, depth_single_blocks=24)
        else:  # FLUX.2-dev: Mistral Small 3.1 text features (3 x 5120), guidance-distilled
            cfg = cls(context_in_dim=15360, hidden_size=6144, num_heads=48, depth=8, depth_single_blocks=48,
                      guidance_embed=True)
        if size == "tiny":
            cfg = replace(cfg, context_in_dim=96, hidden_size=64, num_heads=4, depth=2, depth_single_blocks=2,
                          axes_dim=(4, 4, 4, 4))
        return cfg

    @classmethod
    def from_state_dict(cls, shapes: Mapping[str, tuple[int, ...]]) -> Flux2Config:
        """Read the configuration off BFL-named keys and shapes (without ``model.diffusion_model.``).

        Head width is the width of the QK-norm scales; RoPE gives each of the 4 axes a quarter of it (BFL's
        32/32/32/32 of 128). Raises ``ValueError`` naming the missing or inconsistent key.
        """
        shapes = {k: tuple(v) for k, v in shapes.items()}

        def shape(key: str) -> tuple[int, ...]:
            if key not in shapes:
                raise ValueError(f"FLUX.2 transformer weights lack {key!r}; not a BFL-layout FLUX.2 model or truncated")
            return shapes[key]

        def block_ids(prefix: str) -> int:
            found = sorted({int(m.group(1)) for k in shapes if (m := re.match(rf"{prefix}\.(\d+)\.", k))})
            if found != list(range(len(found))):
                raise ValueError(f"FLUX.2 {prefix} are not numbered 0..n (found {found})")
            return len(found)

        hidden, in_channels = shape("img_in.weight")
        shape("single_stream_modulation.lin.weight")  # the FLUX.2 marker: no per-block modulation
        depth, depth_single = block_ids("double_blocks"), block_ids("single_blocks")
        if depth + depth_single == 0:
            raise ValueError("FLUX.2 transformer weights have neither double_blocks nor single_blocks")
        if depth:
            head_dim = shape("double_blocks.0.img_attn.norm.query_norm.scale")[0]
            mlp_hidden = shape("double_blocks.0.img_mlp.0.weight")[0] // 2
        else:
            head_dim = shape("single_blocks.0.norm.query_norm.scale")[0]
            mlp_hidden = (shape("single_blocks.0.linear1.weight")[0] - 3 * hidden) // 2
        if hidden % head_dim or head_dim % (2 * ROPE_AXES):
            raise ValueError(
                f"FLUX.2 hidden size {hidden} and QK-norm width {head_dim}: the head must divide the hidden size "
                f"and split into {ROPE_AXES} even RoPE axes"
            )
        time_dim = shape("time_in.in_layer.weight")[1]
        if time_dim != TIME_EMBED_DIM:
            raise ValueError(f"FLUX.2 time_in takes {time_dim} features; the timestep embedding is {TIME_EMBED_DIM}")
        return cls(
            in_channels=in_channels,
            out_channels=shape("final_layer.linear.weight")[0],
            context_in_dim=shape("txt_in.weight")[1],
            hidden_size=hidden,
            mlp_ratio=mlp_hidden / hidden,
            num_heads=hidden // head_dim,
            depth=depth,
            depth_single_blocks=depth_single,
            axes_dim=(head_dim // ROPE_AXES,) * ROPE_AXES,
            guidance_embed="guidance_in.in_layer.weight" in shapes,
        )


# --------------------------------------------------------------------------------------------------------------
# Tokens and positions (the pipeline's side of the model's input)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, 128, h, w] patchified latents -> [B, h*w, 128] tokens, row-major (diffusers ``_pack_latents``)."""
    if latents.ndim != 4:
        raise ValueError(f"FLUX.2 latents must be [batch, channels, height, width], got {list(latents.shape)}")
    return latents.flatten(2).transpose(1, 2)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for a ``height`` x ``width`` token grid."""
    b, n, c = tokens.shape
    if n != height * width:
        raise ValueError(f"{n} tokens are not a {height}x{width} grid")
    return tokens.transpose(1, 2).reshape(b, c, height, width)


def img_ids(
    height: int, width: int, batch: int = 1, t: float = 0.0, device: torch.device | str | None = None
) -> torch.Tensor:
    """Positions [B, h*w, 4] of a ``height`` x ``width`` token grid: (t, row, column, 0). ``t`` is 0 for the
    image being made, 10 + 10k for the k-th reference image (edit mode)."""
    ids = torch.zeros(height, width, ROPE_AXES, device=device)
    ids[..., 0] = t
    ids[..., 1] = torch.arange(height, device=device)[:, None]
    ids[..., 2] = torch.arange(width, device=device)[None, :]
    return ids.reshape(1, height * width, ROPE_AXES).expand(batch, -1, -1)


def txt_ids(length: int, batch: int = 1, device: torch.device | str | None = None) -> torch.Tensor:
    """Positions [B, S, 4] of the text tokens: (0, 0, 0, i) (Qwen3 features carry no position of their own)."""
    ids = torch.zeros(length, ROPE_AXES, device=device)
    ids[:, 3] = torch.arange(length, device=device)
    return ids[None].expand(batch, -1, -1)


# --------------------------------------------------------------------------------------------------------------
# Blocks


class SiLUGate(nn.Module):
    """SwiGLU's activation with the two projections fused into the preceding linear: silu(a) * b."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=-1)
        return F.silu(a) * b


def _swiglu_mlp(dim: int, hidden: int) -> nn.Sequential:
    # indices 0 and 2 as in the checkpoints (img_mlp.0, img_mlp.2)
    return nn.Sequential(nn.Linear(dim, 2 * hidden, bias=False), SiLUGate(), nn.Linear(hidden, dim, bias=False))


Mod = tuple[torch.Tensor, ...]  # modulation chunks, each [B, 1, D]


class DoubleStreamBlock(nn.Module):
    """Image and text tokens keep separate weights but attend jointly over [txt; img]; modulation comes in."""

    def __init__(self, cfg: Flux2Config) -> None:
        super().__init__()
        dim, mlp = cfg.hidden_size, cfg.mlp_hidden_dim
        self.img_attn = SelfAttention(dim, cfg.num_heads, qkv_bias=False, proj_bias=False)
        self.img_mlp = _swiglu_mlp(dim, mlp)
        self.txt_attn = SelfAttention(dim, cfg.num_heads, qkv_bias=False, proj_bias=False)
        self.txt_mlp = _swiglu_mlp(dim, mlp)

    def forward(
        self, img: torch.Tensor, txt: torch.Tensor, img_mod: Mod, txt_mod: Mod, pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # img [B, L, D], txt [B, S, D]; each mod = (shift, scale, gate) for attention, then for the MLP
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = img_mod
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = txt_mod

        img_q, img_k, img_v = self.img_attn.qkv_heads((1 + i_scale1) * _layer_norm(img) + i_shift1)
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads((1 + t_scale1) * _layer_norm(txt) + t_shift1)
        q = torch.cat((txt_q, img_q), dim=1)  # [B, S + L, H, head_dim]
        k = torch.cat((txt_k, img_k), dim=1)
        v = torch.cat((txt_v, img_v), dim=1)
        attn = joint_attention(q, k, v, pe)  # [B, S + L, D]
        s = txt.shape[1]
        txt_attn, img_attn = attn[:, :s], attn[:, s:]

        img = img + i_gate1 * self.img_attn.proj(img_attn)
        img = img + i_gate2 * self.img_mlp((1 + i_scale2) * _layer_norm(img) + i_shift2)
        txt = txt + t_gate1 * self.txt_attn.proj(txt_attn)
        txt = txt + t_gate2 * self.txt_mlp((1 + t_scale2) * _layer_norm(txt) + t_shift2)
        if txt.dtype == torch.float16:  # the text stream outgrows fp16 in real weights (diffusers clips alike)
            txt = txt.clamp(-65504, 65504)
        return img, txt


class SingleStreamBlock(nn.Module):
    """One stream over [txt; img], attention and SwiGLU MLP in parallel (ViT-22B block), modulation comes in."""

    def __init__(self, cfg: Flux2Config) -> None:
        super().__init__()
        dim = cfg.hidden_size
        self.hidden_size = dim
        self.num_heads = cfg.num_heads
        self.mlp_hidden_dim = cfg.mlp_hidden_dim
        self.linear1 = nn.Linear(dim, 3 * dim + 2 * self.mlp_hidden_dim, bias=False)  # q|k|v|gate|up
        self.linear2 = nn.Linear(dim + self.mlp_hidden_dim, dim, bias=False)
        self.norm = QKNorm(cfg.head_dim)
        self.gate = SiLUGate()

    def forward(self, x: torch.Tensor, mod: Mod, pe: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = mod
        b, n, _ = x.shape
        qkv, mlp = self.linear1((1 + scale) * _layer_norm(x) + shift).split(
            [3 * self.hidden_size, 2 * self.mlp_hidden_dim], dim=-1
        )
        q, k, v = qkv.view(b, n, 3, self.num_heads, -1).unbind(2)  # each [B, N, H, head_dim]
        q, k = self.norm(q, k, v)
        attn = joint_attention(q, k, v, pe)
        x = x + gate * self.linear2(torch.cat((attn, self.gate(mlp)), dim=2))
        return x.clamp(-65504, 65504) if x.dtype == torch.float16 else x


# --------------------------------------------------------------------------------------------------------------
# The model


class Flux2(nn.Module):
    """``forward(img, img_ids, txt, txt_ids, timesteps, guidance)`` -> velocity tokens [B, L, out_channels]."""

    def __init__(self, cfg: Flux2Config) -> None:
        super().__init__()
        self.config = cfg
        dim = cfg.hidden_size
        self.img_in = nn.Linear(cfg.in_channels, dim, bias=False)
        self.txt_in = nn.Linear(cfg.context_in_dim, dim, bias=False)
        self.time_in = MLPEmbedder(TIME_EMBED_DIM, dim, bias=False)
        if cfg.guidance_embed:
            self.guidance_in = MLPEmbedder(TIME_EMBED_DIM, dim, bias=False)
        self.double_stream_modulation_img = Modulation(dim, double=True, bias=False)
        self.double_stream_modulation_txt = Modulation(dim, double=True, bias=False)
        self.single_stream_modulation = Modulation(dim, double=False, bias=False)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(cfg) for _ in range(cfg.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(cfg) for _ in range(cfg.depth_single_blocks))
        self.final_layer = LastLayer(cfg, bias=False)

    def _check(self, img, img_ids, txt, txt_ids, timesteps, guidance) -> None:
        cfg = self.config
        for name, tensor, width in (("img", img, cfg.in_channels), ("txt", txt, cfg.context_in_dim)):
            if tensor.ndim != 3 or tensor.shape[2] != width or tensor.shape[0] != img.shape[0]:
                raise ValueError(f"FLUX.2 input {name} must be [{img.shape[0]}, *, {width}], got {list(tensor.shape)}")
        b = img.shape[0]
        for name, ids, n in (("img_ids", img_ids, img.shape[1]), ("txt_ids", txt_ids, txt.shape[1])):
            ok = tuple(ids.shape[-2:]) == (n, ROPE_AXES) and (ids.ndim == 2 or ids.ndim == 3 and ids.shape[0] in (1, b))
            if not ok:
                raise ValueError(f"FLUX.2 input {name} must be [{b} or 1, {n}, 4] or [{n}, 4], got {list(ids.shape)}")
        if tuple(timesteps.shape) != (b,):
            raise ValueError(f"FLUX.2 input timesteps must be [{b}], got {list(timesteps.shape)}")
        if cfg.guidance_embed and (guidance is None or tuple(guidance.shape) != (b,)):
            raise ValueError("this FLUX.2 model is guidance-distilled (dev): pass a guidance value per image")

    def forward(
        self,
        img: torch.Tensor,
        img_ids: torch.Tensor,
        txt: torch.Tensor,
        txt_ids: torch.Tensor,
        timesteps: torch.Tensor,
        guidance: torch.Tensor | None = None,
        pe: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """img [B, L, 128] packed latents, img_ids [B, L, 4], txt [B, S, 3*H_qwen] Qwen3 features, txt_ids [B, S, 4],
        timesteps [B] sigma in 0..1, guidance [B] (dev only; ignored by klein) -> velocity [B, L, 128].
        ``pe``: ``core.models.flux.joint_rope`` of the ids, where the caller has it (``LatentFlux2``)."""
        self._check(img, img_ids, txt, txt_ids, timesteps, guidance)
        dtype = self.img_in.weight.dtype
        img = self.img_in(img.to(dtype))
        txt = self.txt_in(txt.to(dtype))
        vec = self.time_in(timestep_embedding(timesteps).to(dtype))
        if self.config.guidance_embed:
            vec = vec + self.guidance_in(timestep_embedding(guidance).to(dtype))
        # computed once per step, shared by all blocks of a kind (FLUX.2's "global modulation")
        img_mod = self.double_stream_modulation_img(vec)
        txt_mod = self.double_stream_modulation_txt(vec)
        single_mod = self.single_stream_modulation(vec)

        if pe is None:
            pe = joint_rope(img_ids, txt_ids, self.config.axes_dim, self.config.theta)

        for block in self.double_blocks:
            img, txt = block(img, txt, img_mod, txt_mod, pe)
        x = torch.cat((txt, img), dim=1)  # [B, S + L, D]
        for block in self.single_blocks:
            x = block(x, single_mod, pe)
        return self.final_layer(x[:, txt.shape[1] :], vec)


class LatentFlux2:
    """The transformer seen from the sampler: ``(x [B, 128, h, w], t [B], context) -> velocity [B, 128, h, w]``.

    The model-space latent is already one token per cell (the VAE patchified it), so packing is a reshape; the
    image gets (0, row, column, 0) positions and the Qwen3 features (0, 0, 0, i), as ``Flux2KleinPipeline``
    prepares them around ``Flux2Transformer2DModel``. ``guidance`` reaches only a model with a guidance embedding
    (dev); klein has none.
    """

    def __init__(self, network: Flux2) -> None:
        self.network = network
        self.rope = LastTable()

    def __call__(
        self, x: torch.Tensor, t: torch.Tensor, *, context: torch.Tensor, guidance: torch.Tensor | None = None
    ) -> torch.Tensor:
        b, _, h, w = x.shape
        cfg = self.network.config
        guidance = guidance if cfg.guidance_embed else None
        image, text = img_ids(h, w, b, device=x.device), txt_ids(context.shape[1], b, device=x.device)
        pe = self.rope.get((b, h, w, context.shape[1], x.device),
                           lambda: joint_rope(image, text, cfg.axes_dim, cfg.theta))
        out = self.network(pack_latents(x), image, context, text, t, guidance, pe=pe)
        return unpack_latents(out, h, w).to(x.dtype)
