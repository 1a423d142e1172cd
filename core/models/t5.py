"""The T5 v1.1 encoder (Raffel et al. 2020; v1.1: gated-GELU, no parameter sharing), Flux.1's T5-XXL.

Parameter names are Hugging Face's, as ComfyUI's ``t5xxl_fp16.safetensors`` / ``t5xxl_fp8_e4m3fn.safetensors``
store them (no prefix; combined ComfyUI checkpoints put them under ``text_encoders.t5xxl.transformer.``)::

    shared.weight                                               [vocab 32128, d_model 4096]
    encoder.block.N.layer.0.layer_norm.weight                   [d_model]
    encoder.block.N.layer.0.SelfAttention.{q,k,v,o}.weight      [heads*d_kv, d_model] (o transposed), no bias
    encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight   [32 buckets, heads]; block 0 only,
                                                                 its bias is shared by every layer
    encoder.block.N.layer.1.layer_norm.weight
    encoder.block.N.layer.1.DenseReluDense.{wi_0,wi_1,wo}.weight   gelu(x wi_0) * (x wi_1) -> wo
    encoder.final_layer_norm.weight

Files that also (or only) carry the tied copy ``encoder.embed_tokens.weight`` and encoder-decoder files with
``decoder.*`` keys are mapped by :func:`t5_key_map`.

What makes T5 T5: RMS layer norm (no mean subtraction, no bias), pre-norm residual blocks, attention logits *not*
divided by sqrt(d_kv) (the scale is folded into the initialisation), a learned bias per head for bucketed
relative positions instead of position embeddings, and activations that overflow fp16 (hence bf16 or fp32 only).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from core.accel.attention import attention

COMPUTE_DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class T5Config:
    """Shape of a T5 v1.1 encoder (the names of transformers' ``T5Config``)."""

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    @classmethod
    def preset(cls, family: str = "t5xxl", size: str = "full") -> T5Config:
        """T5-XXL as Flux uses it (``"full"``) or the same structure at ~1M parameters (``"tiny"``, real
        vocabulary so the real tokenizer drives it)."""
        if family != "t5xxl":
            raise ValueError(f"T5 encoder family {family!r} is unknown; valid: t5xxl")
        if size == "full":
            return cls()  # FLUX.1-dev text_encoder_2/config.json (google/t5-v1_1-xxl)
        if size == "tiny":
            return cls(d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4)
        raise ValueError(f"size {size!r} is invalid; valid: tiny, full")

    @classmethod
    def from_state_dict(cls, shapes: Mapping[str, tuple[int, ...]], family: str | None = None) -> T5Config:
        """Read the configuration off HF-named T5 keys and shapes (prefix removed; see :func:`t5_key_map`);
        ``family`` (the loader passes it) changes nothing: every field shows in the weights.

        Raises ``ValueError`` naming the missing key; the loader adds the file name.
        """
        shapes = {k: tuple(v) for k, v in shapes.items()}

        def shape(key: str) -> tuple[int, ...]:
            if key not in shapes:
                raise ValueError(f"T5 encoder weights lack {key!r}; not an HF-named T5 encoder or truncated")
            return shapes[key]

        embedding = shapes.get("shared.weight") or shape("encoder.embed_tokens.weight")
        vocab_size, d_model = embedding
        found = sorted({int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.block\.(\d+)\.", k))})
        if not found or found != list(range(len(found))):
            raise ValueError(f"T5 encoder blocks are not numbered 0..n (found {found})")
        ff = "encoder.block.0.layer.1.DenseReluDense."
        if ff + "wi.weight" in shapes:
            raise ValueError("this is a T5 v1.0 encoder (ReLU feed-forward 'wi'); Flux uses T5 v1.1 (gated 'wi_0'/'wi_1')")
        buckets, heads = shape("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
        inner = shape("encoder.block.0.layer.0.SelfAttention.q.weight")[0]
        if inner % heads:
            raise ValueError(f"T5 attention width {inner} is not a multiple of its {heads} heads")
        return cls(
            vocab_size=vocab_size,
            d_model=d_model,
            d_kv=inner // heads,
            d_ff=shape(ff + "wi_0.weight")[0],
            num_layers=len(found),
            num_heads=heads,
            relative_attention_num_buckets=buckets,
        )


def t5_key_map(keys: Iterable[str]) -> dict[str, str]:
    """Our key -> the file's key for a T5 file's (prefix-stripped) keys.

    Drops ``decoder.*`` (full encoder-decoder checkpoints) and uses ``encoder.embed_tokens.weight`` (the tied
    copy some exports keep) as ``shared.weight`` when the latter is absent.
    """
    keys = [k for k in keys if not k.startswith("decoder.")]
    mapping = {k: k for k in keys if k != "encoder.embed_tokens.weight"}
    if "shared.weight" not in mapping and "encoder.embed_tokens.weight" in keys:
        mapping["shared.weight"] = "encoder.embed_tokens.weight"
    return mapping


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to run T5 in for weights stored as ``dtype``: fp16 (and fp8) files run in bf16, since T5's
    feed-forward activations exceed fp16's range (T5-XXL was trained in bf16)."""
    return dtype if dtype in COMPUTE_DTYPES else torch.bfloat16


def relative_position_bucket(
    relative_position: torch.Tensor, num_buckets: int = 32, max_distance: int = 128
) -> torch.Tensor:
    """Bidirectional buckets (Mesh TensorFlow): half for keys after the query, half before; in each half, exact
    buckets for distances < num_buckets/4, then logarithmic bins up to ``max_distance``, then the last bin."""
    half = num_buckets // 2
    buckets = (relative_position > 0).long() * half
    distance = relative_position.abs()
    exact = half // 2
    # clamp(min=1) only avoids log(0); those distances take the exact branch anyway
    log_ratio = torch.log(distance.clamp(min=1).float() / exact) / math.log(max_distance / exact)
    large = (exact + (log_ratio * (half - exact)).long()).clamp(max=half - 1)
    return buckets + torch.where(distance < exact, distance, large)


class T5LayerNorm(nn.Module):
    """RMS norm without mean subtraction or bias, accumulated in fp32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(self.weight.dtype)


class T5Attention(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool) -> None:
        super().__init__()
        self.cfg = cfg
        self.q = nn.Linear(cfg.d_model, cfg.inner_dim, bias=False)
        self.k = nn.Linear(cfg.d_model, cfg.inner_dim, bias=False)
        self.v = nn.Linear(cfg.d_model, cfg.inner_dim, bias=False)
        self.o = nn.Linear(cfg.inner_dim, cfg.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)

    def position_bias(self, length: int, device: torch.device) -> torch.Tensor:
        """[1, heads, length, length] additive logits for key position minus query position."""
        pos = torch.arange(length, dtype=torch.long, device=device)
        buckets = relative_position_bucket(
            pos[None, :] - pos[:, None],
            self.cfg.relative_attention_num_buckets,
            self.cfg.relative_attention_max_distance,
        )
        return self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        # x [B, L, d_model]; logits q.k (unscaled) + bias
        out = attention(self.q(x), self.k(x), self.v(x), self.cfg.num_heads, bias=bias, scale=1.0)
        return self.o(out)


class T5LayerSelfAttention(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool) -> None:
        super().__init__()
        self.SelfAttention = T5Attention(cfg, has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5DenseGatedActDense(nn.Module):
    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # "gelu_new" / "gelu_pytorch_tanh": the tanh approximation
        h = F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x)
        return self.wo(h.to(self.wo.weight.dtype))


class T5LayerFF(nn.Module):
    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(cfg)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    def __init__(self, cfg: T5Config, first: bool) -> None:
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(cfg, has_relative_attention_bias=first), T5LayerFF(cfg)])

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.layer[1](self.layer[0](x, bias))


class T5Stack(nn.Module):
    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.block = nn.ModuleList(T5Block(cfg, first=i == 0) for i in range(cfg.num_layers))
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)


class T5EncoderModel(nn.Module):
    """``forward(input_ids [B, L], attention_mask=None)`` -> last hidden state ``[B, L, d_model]``.

    Flux (BFL and diffusers' ``FluxPipeline``) encodes the padded ids with no attention mask, so the padding
    tokens are attended to; ``attention_mask`` (1 = token, 0 = padding) is there for models trained with one.
    """

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.config = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = T5Stack(cfg)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        dtype = self.encoder.final_layer_norm.weight.dtype  # not shared.weight: a packed table would be rebuilt
        if dtype not in COMPUTE_DTYPES:
            raise ValueError(
                f"T5 runs in bfloat16 or float32, not {str(dtype).removeprefix('torch.')} (its activations "
                "overflow float16); load the weights as core.models.t5.compute_dtype(file dtype)"
            )
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length], got {list(input_ids.shape)}")
        x = self.shared(input_ids)  # T5 does not scale embeddings by sqrt(d_model)
        first = self.encoder.block[0].layer[0].SelfAttention
        bias = first.position_bias(input_ids.shape[1], input_ids.device).float()  # [1, H, L, L]
        if attention_mask is not None:
            # padding keys get the most negative logit (not -inf: an all-padding row stays finite, as in HF)
            pad = (attention_mask[:, None, None, :] == 0).float() * torch.finfo(dtype).min
            bias = bias + pad  # [B, H, L, L]
        bias = bias.to(dtype)
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)
