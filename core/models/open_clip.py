"""OpenCLIP text encoder (Cherti et al. 2023, LAION): SD2.x's ViT-H/14 and SDXL's ViT-bigG/14.

Module and parameter names are OpenCLIP's, exactly as single-file checkpoints store them after the component
prefix (``cond_stage_model.model.`` for SD2.x, ``conditioner.embedders.1.model.`` for SDXL base,
``conditioner.embedders.0.model.`` for the SDXL refiner)::

    token_embedding.weight                          [vocab, width]
    positional_embedding                            [77, width]
    transformer.resblocks.N.ln_1.{weight,bias}
    transformer.resblocks.N.attn.in_proj_{weight,bias}     [3 * width, width]: q, k, v stacked in that order
    transformer.resblocks.N.attn.out_proj.{weight,bias}
    transformer.resblocks.N.ln_2.{weight,bias}
    transformer.resblocks.N.mlp.c_fc.{weight,bias}          [4 * width, width]
    transformer.resblocks.N.mlp.c_proj.{weight,bias}
    ln_final.{weight,bias}
    text_projection                                 [width, projection]: used as ``x @ P`` (not a Linear weight)

Real files also carry ``logit_scale`` (the contrastive temperature, unused for conditioning), which the loader
drops. Heads are 64 wide in every released model (ViT-H 16 heads, bigG 20).

What each family takes from it (``encode``): SD2.x the penultimate layer's output after ``ln_final``; SDXL the
penultimate layer's raw output (no final norm), concatenated with CLIP-L's, plus the pooled vector: the last
layer after ``ln_final`` at each row's EOS token, projected by ``text_projection``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from core.accel.attention import attention
from core.models.clip import CLIPTextOutput

HEAD_DIM = 64

# Keys real files carry that are not part of the text network.
IGNORED_KEYS = ("logit_scale",)


@dataclass(frozen=True)
class OpenCLIPTextConfig:
    """Shape of an OpenCLIP text transformer (GELU MLP, causal attention, 64-wide heads)."""

    vocab_size: int = 49408
    width: int = 1280
    layers: int = 32
    intermediate: int = 5120
    max_positions: int = 77
    projection_dim: int = 1280
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.width % HEAD_DIM:
            raise ValueError(f"width {self.width} is not a multiple of the {HEAD_DIM}-wide heads")

    @property
    def heads(self) -> int:
        return self.width // HEAD_DIM

    @classmethod
    def preset(cls, family: str, size: str = "full") -> OpenCLIPTextConfig:
        """The released encoder of ``family`` (``sd2``: ViT-H, ``sdxl``/``sdxl_refiner``: bigG), or the same
        structure at a few MB (``size="tiny"``)."""
        if size not in ("tiny", "full"):
            raise ValueError(f"size {size!r} is invalid; valid: tiny, full")
        presets = _FULL if size == "full" else _TINY
        if family not in presets:
            raise ValueError(f"OpenCLIP text encoder family {family!r} is unknown; valid: {', '.join(presets)}")
        return presets[family]

    @classmethod
    def from_state_dict(
        cls, shapes: Mapping[str, tuple[int, ...]], family: str | None = None
    ) -> OpenCLIPTextConfig:
        """Read the configuration off OpenCLIP keys and shapes (keys relative to the component prefix).

        ``family`` is accepted for the loader's contract; every OpenCLIP setting shows in the shapes (heads are
        64 wide).
        """

        def shape(key: str) -> tuple[int, ...]:
            if key not in shapes:
                raise ValueError(f"OpenCLIP text encoder weights lack {key!r}")
            return tuple(shapes[key])

        vocab, width = shape("token_embedding.weight")
        blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))}
        if not blocks:
            raise ValueError("OpenCLIP text encoder weights have no transformer.resblocks.N.* keys")
        if blocks != set(range(len(blocks))):
            raise ValueError(f"transformer.resblocks are not numbered 0..{len(blocks) - 1}: {sorted(blocks)}")
        return cls(
            vocab_size=vocab,
            width=width,
            layers=len(blocks),
            intermediate=shape("transformer.resblocks.0.mlp.c_fc.weight")[0],
            max_positions=shape("positional_embedding")[0],
            projection_dim=shape("text_projection")[1],
        )


# stabilityai/stable-diffusion-2-1 text_encoder (24 blocks in the file; SD2.x stops one short of the last) and
# stable-diffusion-xl-base-1.0 text_encoder_2 (bigG, shared by the refiner).
_FULL = {
    "sd2": OpenCLIPTextConfig(width=1024, layers=24, intermediate=4096, projection_dim=1024),
    "sdxl": OpenCLIPTextConfig(),
    "sdxl_refiner": OpenCLIPTextConfig(),
}
_TINY = {
    "sd2": OpenCLIPTextConfig(width=64, layers=3, intermediate=96, projection_dim=64),
    "sdxl": OpenCLIPTextConfig(width=128, layers=3, intermediate=160, projection_dim=128),
    "sdxl_refiner": OpenCLIPTextConfig(width=128, layers=3, intermediate=160, projection_dim=128),
}


# ------------------------------------------------------------------------------------------------------------
# Network


class MultiheadSelfAttention(nn.Module):
    """``nn.MultiheadAttention``'s parameter layout (packed ``in_proj``), through our attention backend."""

    def __init__(self, cfg: OpenCLIPTextConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * cfg.width, cfg.width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * cfg.width))
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        return self.out_proj(attention(q, k, v, self.heads, causal=True))


class MLP(nn.Module):
    def __init__(self, cfg: OpenCLIPTextConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.width, cfg.intermediate)
        self.c_proj = nn.Linear(cfg.intermediate, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block (OpenCLIP's name)."""

    def __init__(self, cfg: OpenCLIPTextConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = MultiheadSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, cfg: OpenCLIPTextConfig) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(cfg) for _ in range(cfg.layers))


class OpenCLIPTextModel(nn.Module):
    """``encode(ids, layer_from_end, final_norm)`` -> hidden states ``[B, N, width]`` and pooled ``[B, proj]``."""

    def __init__(self, cfg: OpenCLIPTextConfig) -> None:
        super().__init__()
        self.config = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.max_positions, cfg.width))
        self.transformer = Transformer(cfg)
        self.ln_final = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, cfg.projection_dim))

    def _check(self, input_ids: torch.Tensor, layer_from_end: int) -> None:
        cfg = self.config
        if not 1 <= layer_from_end <= cfg.layers:
            raise ValueError(f"layer_from_end must be 1..{cfg.layers}, got {layer_from_end}")
        if input_ids.ndim != 2 or input_ids.shape[1] > cfg.max_positions:
            raise ValueError(f"input_ids must be [batch, <= {cfg.max_positions}], got {list(input_ids.shape)}")

    def encode(
        self, input_ids: torch.Tensor, layer_from_end: int = 1, *, final_norm: bool = True, pooled: bool = True
    ) -> CLIPTextOutput:
        """Hidden states of the layer ``layer_from_end`` from the end (1 = last, 2 = penultimate), after
        ``ln_final`` when ``final_norm``; the pooled vector always comes from the last layer (``pooled=False``
        skips the remaining layers and returns an empty pooled tensor: SD2.x needs no pooled vector)."""
        self._check(input_ids, layer_from_end)
        x = self.token_embedding(input_ids) + self.positional_embedding[: input_ids.shape[1]]
        blocks = self.transformer.resblocks
        stop = len(blocks) - layer_from_end + 1  # blocks whose output the hidden state needs
        hidden = x
        for i, block in enumerate(blocks if pooled else blocks[:stop]):
            x = block(x)
            if i + 1 == stop:
                hidden = x
        if final_norm:
            hidden = self.ln_final(hidden)
        if not pooled:
            return CLIPTextOutput(hidden, x.new_empty(x.shape[0], 0))
        last = self.ln_final(x)
        # EOS has the highest id in the vocabulary (49407), so argmax finds it, as OpenCLIP's text pooling does.
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        return CLIPTextOutput(hidden, last[rows, input_ids.argmax(dim=-1)] @ self.text_projection)

    def forward(self, input_ids: torch.Tensor, layer_from_end: int = 1, final_norm: bool = True) -> torch.Tensor:
        return self.encode(input_ids, layer_from_end, final_norm=final_norm, pooled=False).hidden
