"""CLIP text encoder (Radford et al. 2021): the conditioning network of SD1.x (OpenAI CLIP ViT-L/14).

Module and parameter names are Hugging Face's, nested under ``text_model.`` exactly as single-file
checkpoints store them after the component prefix (``cond_stage_model.transformer.`` for SD1.x)::

    text_model.embeddings.token_embedding.weight        [vocab, width]
    text_model.embeddings.position_embedding.weight     [77, width]
    text_model.encoder.layers.N.self_attn.{q,k,v,out}_proj.{weight,bias}
    text_model.encoder.layers.N.layer_norm{1,2}.{weight,bias}
    text_model.encoder.layers.N.mlp.fc{1,2}.{weight,bias}
    text_model.final_layer_norm.{weight,bias}
    text_projection.weight                              [projection_dim, width] (only with a projection)

Real files also carry ``text_model.embeddings.position_ids``; here it is a non-persistent buffer, so it is not
in ``state_dict()`` and the loader drops it.

Clip skip follows A1111: ``clip_skip=1`` is the last layer's output, ``clip_skip=n`` the output of the layer
``n - 1`` before the last; ``final_layer_norm`` is applied in every case. diffusers' pipelines count from the
other side of the same list: their ``clip_skip=k`` (take ``hidden_states[-(k + 1)]``, then the final norm)
equals A1111 ``clip_skip=k + 1``, and diffusers' ``None`` equals A1111 1.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from core.accel.attention import attention
from core.errors import RequestError

ACTIVATIONS = ("quick_gelu", "gelu")


@dataclass(frozen=True)
class CLIPTextConfig:
    """Shape of a CLIP text transformer. ``projection_dim`` None = no ``text_projection`` layer (SD1.x files)."""

    vocab_size: int = 49408
    width: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 3072
    max_positions: int = 77
    activation: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = None

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by {self.heads} heads")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} is unknown; valid: {', '.join(ACTIVATIONS)}")

    @classmethod
    def preset(cls, family: str, size: str = "full", role: str = "text_encoder") -> CLIPTextConfig:
        """The real configuration (``"full"``) or a few-MB model with the same structure (``"tiny"``) of
        ``family``'s CLIP text encoder ``role``, as its family module gives it.

        The tiny model keeps the real vocabulary so the real tokenizer drives it.
        """
        if size not in ("tiny", "full"):
            raise ValueError(f"size {size!r} is invalid; valid: tiny, full")
        presets = _presets(size, role)
        if family not in presets:
            raise ValueError(f"CLIP text encoder family {family!r} is unknown; valid: {', '.join(presets)}")
        return presets[family]

    @classmethod
    def from_state_dict(cls, shapes: Mapping[str, tuple[int, ...]], family: str | None = None) -> CLIPTextConfig:
        """Read the configuration off HF-named keys (relative to the component prefix) and their shapes.

        Head count and activation are not visible in weights; they follow the family's CLIP configurations of
        the same width (``family``'s, else any family's: 768 is OpenAI CLIP-L, 12 heads, quick_gelu), else
        OpenCLIP's rule (64-wide heads, gelu). Raises ``ValueError`` naming the missing key; the loader adds
        the file name.
        """
        shapes = {k: tuple(v) for k, v in shapes.items()}

        def shape(key: str) -> tuple[int, ...]:
            if key not in shapes:
                raise ValueError(f"CLIP text encoder weights lack {key!r}; not an HF-named CLIP or truncated")
            return shapes[key]

        vocab_size, width = shape("text_model.embeddings.token_embedding.weight")
        max_positions = shape("text_model.embeddings.position_embedding.weight")[0]
        found = {
            int(m.group(1)) for k in shapes if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k))
        }
        if not found or found != set(range(len(found))):
            raise ValueError(f"CLIP encoder layers are not numbered 0..n (found {sorted(found)})")
        intermediate = shape("text_model.encoder.layers.0.mlp.fc1.weight")[0]
        projection = shapes.get("text_projection.weight")
        heads, activation = _heads_by_width(family).get(width, (max(1, width // 64), "gelu"))
        return cls(
            vocab_size=vocab_size,
            width=width,
            layers=len(found),
            heads=heads,
            intermediate=intermediate,
            max_positions=max_positions,
            activation=activation,
            projection_dim=projection[0] if projection else None,
        )


def _clip_components(family: str | None = None) -> list[tuple[str, Any]]:
    """(family name, component) of every text encoder the families store with these HF CLIP names."""
    from core.models.families import FAMILIES

    ref = f"{__name__}:CLIPTextConfig"
    chosen = [FAMILIES[family]] if family in FAMILIES else list(FAMILIES.values())
    return [(f.name, c) for f in chosen for c in f.components if c.config == ref and c.presets]


def _presets(size: str, role: str) -> dict[str, CLIPTextConfig]:
    return {name: CLIPTextConfig(**c.presets[size]) for name, c in _clip_components() if c.role == role}


def _heads_by_width(family: str | None) -> dict[int, tuple[int, str]]:
    """width -> (heads, activation) of the known CLIP configurations, ``family``'s first."""
    out: dict[int, tuple[int, str]] = {}
    for pick in ([family] if family else []) + [None]:
        for _, c in _clip_components(pick):
            for kwargs in c.presets.values():
                cfg = CLIPTextConfig(**kwargs)
                out.setdefault(cfg.width, (cfg.heads, cfg.activation))
    return out


# ------------------------------------------------------------------------------------------------------------
# Network


class CLIPAttention(nn.Module):
    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Causal: token i only sees tokens <= i, which is why padding after EOS never changes earlier tokens.
        out = attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, causal=True, layer=self)
        return self.out_proj(out)


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.quick = cfg.activation == "quick_gelu"
        self.fc1 = nn.Linear(cfg.width, cfg.intermediate)
        self.fc2 = nn.Linear(cfg.intermediate, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        # OpenAI CLIP was trained with the sigmoid approximation of GELU; OpenCLIP with the exact one.
        h = h * torch.sigmoid(1.702 * h) if self.quick else F.gelu(h)
        return self.fc2(h)


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.layers))


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width)
        # Kept for name parity with HF; forward slices the table instead, so a model built on the meta device
        # and loaded with assign=True needs no buffer re-materialisation.
        self.register_buffer("position_ids", torch.arange(cfg.max_positions)[None], persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        n = input_ids.shape[1]
        return self.token_embedding(input_ids) + self.position_embedding.weight[:n]


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)


class CLIPTextOutput(NamedTuple):
    hidden: torch.Tensor  # [B, N, width]: the conditioning (after clip skip)
    pooled: torch.Tensor  # [B, width or projection_dim]: final layer at each row's EOS (highest id)


class CLIPTextModel(nn.Module):
    """``forward(ids, clip_skip)`` -> hidden states ``[B, N, width]``; ``encode`` also returns the pooled vector."""

    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.config = cfg
        self.text_model = CLIPTextTransformer(cfg)
        if cfg.projection_dim is not None:
            self.text_projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False)

    def _check(self, input_ids: torch.Tensor, clip_skip: int) -> None:
        cfg = self.config
        if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not 1 <= clip_skip <= cfg.layers:
            raise RequestError(
                "clip_skip", clip_skip, f"an integer from 1 to {cfg.layers} for this text encoder"
            )
        if input_ids.ndim != 2 or input_ids.shape[1] > cfg.max_positions:
            raise ValueError(
                f"input_ids must be [batch, <= {cfg.max_positions}], got {list(input_ids.shape)}"
            )

    def _run(
        self, input_ids: torch.Tensor, clip_skip: int, keep_last: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden state ``clip_skip`` layers from the end, last layer output); the latter only if asked."""
        self._check(input_ids, clip_skip)
        tm = self.text_model
        x = tm.embeddings(input_ids)
        stop = self.config.layers - clip_skip + 1  # number of layers whose output we need
        layers = tm.encoder.layers if keep_last else tm.encoder.layers[:stop]
        skipped = x
        for i, layer in enumerate(layers):
            x = layer(x)
            if i + 1 == stop:
                skipped = x
        return skipped, x

    def forward(self, input_ids: torch.Tensor, clip_skip: int = 1, final_norm: bool = True) -> torch.Tensor:
        """Hidden states of ``input_ids`` ``[B, N]`` (N <= 77) with A1111 clip skip; ``[B, N, width]``.

        ``final_norm=False`` returns the raw layer output (SDXL's OpenCLIP bigG penultimate layer is used so).
        """
        hidden, _ = self._run(input_ids, clip_skip, keep_last=False)
        return self.text_model.final_layer_norm(hidden) if final_norm else hidden

    def encode(
        self, input_ids: torch.Tensor, clip_skip: int = 1, final_norm: bool = True, project: bool = True
    ) -> CLIPTextOutput:
        """Hidden states as ``forward`` plus the pooled vector, which always comes from the last layer.

        ``project=False`` keeps the pooled vector at the encoder's width even when the file carries a
        ``text_projection`` (Flux feeds ``vector_in`` transformers' ``CLIPTextModel`` pooler output, unprojected).
        """
        hidden, last = self._run(input_ids, clip_skip, keep_last=True)
        norm = self.text_model.final_layer_norm
        last = norm(last)
        # EOS has the highest id in the vocabulary, so argmax finds it (what HF does for eos_token_id == 2).
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        pooled = last[rows, input_ids.argmax(dim=-1)]
        if project and self.config.projection_dim is not None:
            pooled = self.text_projection(pooled)
        return CLIPTextOutput(norm(hidden) if final_norm else hidden, pooled)
