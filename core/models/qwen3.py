"""Qwen3 (Qwen team 2025) as a text encoder: the decoder-only language model whose hidden states condition
Z-Image (Qwen3-4B) and FLUX.2 [klein] (Qwen3-4B for 4B, Qwen3-8B for 9B).

Parameter names are Hugging Face's ``Qwen3ForCausalLM`` names, as ComfyUI's ``qwen_3_4b.safetensors`` /
``qwen_3_8b*.safetensors`` store them (``model.`` prefix, no ``lm_head``); :func:`qwen3_key_map` also takes
files without the prefix (transformers' ``Qwen3Model``) and drops ``lm_head``. Shapes for Qwen3-4B (8B)::

    model.embed_tokens.weight                         [151936, H 2560 (4096)]
    model.layers.N.input_layernorm.weight             [H]         RMSNorm before attention
    model.layers.N.self_attn.q_proj.weight            [32*128, H] 32 query heads of 128 (4096 > H in the 4B)
    model.layers.N.self_attn.{k,v}_proj.weight        [8*128, H]  8 key/value heads (grouped-query attention)
    model.layers.N.self_attn.{q,k}_norm.weight        [128]       RMSNorm per head on queries and keys
    model.layers.N.self_attn.o_proj.weight            [H, 32*128]
    model.layers.N.post_attention_layernorm.weight    [H]
    model.layers.N.mlp.{gate,up}_proj.weight          [I 9728 (12288), H]   SwiGLU: down(silu(gate x) * up x)
    model.layers.N.mlp.down_proj.weight               [H, I]
    model.norm.weight                                 [H]         final RMSNorm
    36 layers, no biases, RMSNorm eps 1e-6, rotate-half RoPE with theta 1e6, causal attention.

The encoders need intermediate states, not logits: :meth:`Qwen3.forward` returns the requested entries of
transformers' ``output_hidden_states`` tuple (index 0 = embeddings, k = output of layer k-1, the last = the final
norm of the last layer) and runs only the layers those need. :func:`zimage_prompt_embeds` and
:func:`klein_prompt_embeds` are the two pipelines' encodings (``ZImagePipeline._encode_prompt`` and
``Flux2KleinPipeline._get_qwen3_prompt_embeds``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from core.accel.attention import attention

COMPUTE_DTYPES = (torch.float32, torch.bfloat16)
KLEIN_LAYERS = (9, 18, 27)  # Flux2KleinPipeline's hidden_states_layers
ZIMAGE_LAYER = -2  # ZImagePipeline: hidden_states[-2], the second-to-last layer's output before the final norm


@dataclass(frozen=True)
class Qwen3Config:
    """Shape of a Qwen3 decoder (the names of transformers' ``Qwen3Config``)."""

    vocab_size: int = 151936
    hidden_size: int = 2560
    intermediate_size: int = 9728
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"Qwen3's {self.num_attention_heads} query heads are not a multiple of its "
                f"{self.num_key_value_heads} key/value heads"
            )
        if self.head_dim % 2:
            raise ValueError(f"Qwen3 head width {self.head_dim} must be even for RoPE")

    @classmethod
    def preset(cls, size: str = "4b") -> Qwen3Config:
        """Qwen3-4B (``"4b"``: Z-Image, klein 4B), Qwen3-8B (``"8b"``: klein 9B), or the same structure at a
        few MB (``"tiny"``: real vocabulary so the real tokenizer drives it, 4 query / 2 key-value heads)."""
        if size == "4b":
            return cls()  # FLUX.2-klein-4B and Z-Image-Turbo text_encoder/config.json
        if size == "8b":
            return cls(hidden_size=4096, intermediate_size=12288)  # FLUX.2-klein-9B text_encoder/config.json
        if size == "tiny":
            return cls(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16)
        raise ValueError(f"Qwen3 size {size!r} is invalid; valid: 4b, 8b, tiny")

    @classmethod
    def from_state_dict(cls, shapes: Mapping[str, tuple[int, ...]]) -> Qwen3Config:
        """Read the configuration off HF-named Qwen3 keys and shapes (our names: see :func:`qwen3_key_map`).

        Head width is the width of the QK-norm weights (Qwen2.5 has none: refused by name). Raises
        ``ValueError`` naming the missing or inconsistent key; the loader adds the file name.
        """
        shapes = {k: tuple(v) for k, v in shapes.items()}

        def shape(key: str) -> tuple[int, ...]:
            if key not in shapes:
                raise ValueError(f"Qwen3 text encoder weights lack {key!r}; not an HF-named Qwen3 model or truncated")
            return shapes[key]

        vocab, hidden = shape("model.embed_tokens.weight")
        found = sorted({int(m.group(1)) for k in shapes if (m := re.match(r"model\.layers\.(\d+)\.", k))})
        if not found or found != list(range(len(found))):
            raise ValueError(f"Qwen3 layers are not numbered 0..n (found {found})")
        attn = "model.layers.0.self_attn."
        if attn + "q_norm.weight" not in shapes and attn + "q_proj.weight" in shapes:
            raise ValueError("these weights have no q_norm/k_norm: a Qwen2/Qwen2.5 model, not Qwen3")
        head_dim = shape(attn + "q_norm.weight")[0]
        q_rows, k_rows = shape(attn + "q_proj.weight")[0], shape(attn + "k_proj.weight")[0]
        if q_rows % head_dim or k_rows % head_dim:
            raise ValueError(f"Qwen3 q/k projections ({q_rows}, {k_rows} rows) are not whole {head_dim}-wide heads")
        return cls(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=shape("model.layers.0.mlp.gate_proj.weight")[0],
            num_hidden_layers=len(found),
            num_attention_heads=q_rows // head_dim,
            num_key_value_heads=k_rows // head_dim,
            head_dim=head_dim,
        )


def qwen3_key_map(keys: Iterable[str]) -> dict[str, str]:
    """Our key -> the file's key for a Qwen3 file's keys: ``model.``-prefixed (ComfyUI, ``Qwen3ForCausalLM``) or
    not (``Qwen3Model``); ``lm_head.weight`` (logits, unused by an encoder) is left out."""
    mapping = {}
    for key in keys:
        if key.startswith("lm_head."):
            continue
        ours = key if key.startswith("model.") else f"model.{key}"
        mapping[ours] = key
    return mapping


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to run Qwen3 in for weights stored as ``dtype``: fp32 stays, everything else (bf16 as shipped,
    fp16, fp8) runs in bf16, the dtype it was trained in; fp16 activations of the deep layers overflow."""
    return torch.float32 if dtype == torch.float32 else torch.bfloat16


class Qwen3RMSNorm(nn.Module):
    """RMS norm accumulated in fp32, cast back, then the gain (transformers' order, which matters in bf16)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """cos, sin [L, head_dim] for rotate-half RoPE, computed in fp32 as transformers does (the trained model's
    arithmetic: positions times fp32 inverse frequencies), then cast to ``dtype``."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float()
                                / head_dim))
    angles = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half (GPT-NeoX) RoPE on x [B, L, heads, D]: pairs (i, i + D/2) rotate together."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class Qwen3Attention(nn.Module):
    def __init__(self, cfg: Qwen3Config) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_attention_heads * d, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_key_value_heads * d, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_key_value_heads * d, bias=False)
        self.o_proj = nn.Linear(cfg.num_attention_heads * d, cfg.hidden_size, bias=False)
        self.q_norm = Qwen3RMSNorm(d, cfg.rms_norm_eps)
        self.k_norm = Qwen3RMSNorm(d, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        cfg = self.cfg
        b, n, _ = x.shape
        q = apply_rope(self.q_norm(self.q_proj(x).view(b, n, cfg.num_attention_heads, cfg.head_dim)), cos, sin)
        k = apply_rope(self.k_norm(self.k_proj(x).view(b, n, cfg.num_key_value_heads, cfg.head_dim)), cos, sin)
        v = self.v_proj(x).view(b, n, cfg.num_key_value_heads, cfg.head_dim)
        groups = cfg.num_attention_heads // cfg.num_key_value_heads
        if groups > 1:  # query head h reads key/value head h // groups
            k = k.repeat_interleave(groups, dim=2)
            v = v.repeat_interleave(groups, dim=2)
        out = attention(q.flatten(2), k.flatten(2), v.flatten(2), cfg.num_attention_heads,
                        causal=mask is None, mask=mask, layer=self)
        return self.o_proj(out)


class Qwen3MLP(nn.Module):
    def __init__(self, cfg: Qwen3Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen3Config) -> None:
        super().__init__()
        self.input_layernorm = Qwen3RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Qwen3Attention(cfg)
        self.post_attention_layernorm = Qwen3RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = Qwen3MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3Model(nn.Module):
    """The decoder stack (transformers' ``Qwen3Model``): embeddings, layers, final norm."""

    def __init__(self, cfg: Qwen3Config) -> None:
        super().__init__()
        # Weights always come from a file: an uninitialised table skips normal_(), which on the meta device (how
        # the loader builds models) goes through torch's decompositions and costs seconds on first use.
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(Qwen3DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = Qwen3RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen3(nn.Module):
    """``forward(input_ids [B, L], attention_mask [B, L] or None, layers)`` -> hidden states ``[B, L, H]``.

    ``layers`` index transformers' ``hidden_states`` tuple of ``num_hidden_layers + 1`` entries (negative from the
    end). ``attention_mask`` (1 = token, 0 = padding; right padding as the tokenizer gives) masks padding keys on
    top of the causal mask, as transformers does; padding positions still get states (klein uses them).
    """

    def __init__(self, cfg: Qwen3Config) -> None:
        super().__init__()
        self.config = cfg
        self.model = Qwen3Model(cfg)

    def _indices(self, layers: Sequence[int]) -> list[int]:
        count = self.config.num_hidden_layers + 1
        if not layers:
            raise ValueError("Qwen3 was asked for no hidden states; name at least one layer")
        out = []
        for i in layers:
            if not -count <= i < count:
                raise ValueError(f"Qwen3 hidden state {i} does not exist; this model has {count} (0..{count - 1})")
            out.append(i % count)
        return out

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, layers: Sequence[int] = (-1,)
    ) -> list[torch.Tensor]:
        dtype = self.model.embed_tokens.weight.dtype
        if dtype not in COMPUTE_DTYPES:
            raise ValueError(
                f"Qwen3 runs in bfloat16 or float32, not {str(dtype).removeprefix('torch.')}; load the weights as "
                "core.models.qwen3.compute_dtype(file dtype)"
            )
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length], got {list(input_ids.shape)}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {list(attention_mask.shape)} does not match input_ids {list(input_ids.shape)}")
        wanted = self._indices(layers)
        last = self.config.num_hidden_layers
        n = input_ids.shape[1]
        mask = None
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            causal = torch.ones(n, n, dtype=torch.bool, device=input_ids.device).tril()
            mask = causal[None, None] & attention_mask.bool()[:, None, None, :]  # [B, 1, L, L], True = attend
        positions = torch.arange(n, device=input_ids.device)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, dtype)

        states: dict[int, torch.Tensor] = {}
        x = self.model.embed_tokens(input_ids)
        if 0 in wanted:
            states[0] = x
        for i, layer in enumerate(self.model.layers[: min(max(wanted), last)]):
            x = layer(x, cos, sin, mask)
            states[i + 1] = x
        if last in wanted:
            states[last] = self.model.norm(x)  # transformers' last entry is the normed output
        return [states[i] for i in wanted]


def _check_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    if input_ids.shape != attention_mask.shape or input_ids.ndim != 2:
        raise ValueError(f"input_ids {list(input_ids.shape)} and attention_mask {list(attention_mask.shape)} must "
                         "both be [batch, length]")


def zimage_prompt_embeds(model: Qwen3, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
    """Z-Image's caption features: ``hidden_states[-2]`` at the unpadded positions, one ``[tokens, H]`` per prompt.

    Tokens are right-padded and attention is causal, so a real token never sees the padding behind it: the
    padding columns are cut off before running (512 -> the longest prompt), which changes no kept value.
    """
    _check_tokens(input_ids, attention_mask)
    keep = attention_mask.bool()
    length = max(int(keep.sum(dim=1).max()), 1)
    (hidden,) = model(input_ids[:, :length], attention_mask[:, :length], layers=(ZIMAGE_LAYER,))
    return [hidden[i][keep[i, :length]] for i in range(hidden.shape[0])]


def klein_prompt_embeds(
    model: Qwen3, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers: Sequence[int] = KLEIN_LAYERS
) -> torch.Tensor:
    """FLUX.2 [klein]'s text features ``[B, L, len(layers) * H]``: per token the states of ``layers`` side by
    side (``[h9 | h18 | h27]``), every position kept, padding included (the DiT sees all 512)."""
    _check_tokens(input_ids, attention_mask)
    return torch.cat(model(input_ids, attention_mask, layers=layers), dim=-1)

