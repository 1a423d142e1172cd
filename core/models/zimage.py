"""The Z-Image transformer (Tongyi-MAI 2025, "S3-DiT"): a single-stream DiT over [image tokens; caption tokens],
preceded by refiner blocks that see each stream alone, conditioned on Qwen3-4B hidden states.

Module and parameter names are those of ComfyUI's repackaged ``z_image_turbo_bf16.safetensors`` (the split
diffusion-model file users have; ``model.diffusion_model.`` prefix optional), so that file loads with no
renaming; :func:`zimage_state_dict` converts the diffusers folder's names (``Tongyi-MAI/Z-Image-Turbo``). Shapes
for Z-Image-Turbo (D = 3840, 30 heads x 128, FFN 10240)::

    x_embedder                    Linear [D, 64]      2x2 patches of the 16-channel Flux.1 VAE latent
    x_pad_token, cap_pad_token    [1, D]              fill image / caption tokens up to a multiple of 32
    t_embedder.mlp.{0,2}          Linear [1024, 256], Linear [256, 1024]   of a 256-wide sinusoid of 1000 t
    cap_embedder.{0,1}            RMSNorm [2560], Linear [D, 2560]         Qwen3-4B states -> D
    noise_refiner.N   (2)         modulated blocks on the image tokens alone
    context_refiner.N (2)         unmodulated blocks on the caption tokens alone
    layers.N          (30)        modulated blocks on [image; caption]
      attention.qkv               Linear [3D, D] (rows q | k | v), no bias; attention.out Linear [D, D]
      attention.{q,k}_norm        RMSNorm [128] per head, before RoPE
      feed_forward.{w1,w3} [F, D], w2 [D, F]      SwiGLU w2(silu(w1 x) * w3 x), no biases
      attention_norm{1,2}, ffn_norm{1,2}          RMSNorm [D] before and after attention / FFN (sandwich)
      adaLN_modulation.0          Linear [4D, 256] of the timestep vector (no SiLU): scale/gate for both
    final_layer.adaLN_modulation.1, .linear       Linear [D, 256] after SiLU (scale only), Linear [64, D]

Positions are 3-axis RoPE (32/48/48 of the 128-wide head, theta 256, adjacent pairs): caption token j at
(1 + j, 0, 0), image token at (caption length + 1, row, column), image padding at (0, 0, 0). Attention goes
through :func:`core.accel.attention.attention`. The model's output is the NEGATIVE flow velocity (the reference
pipelines use ``-out``); its timestep is ``1 - sigma``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from core.accel import attention as attention_backend
from core.models.flux import LastTable, apply_rope, timestep_embedding

PATCH = 2  # all_patch_size [2], all_f_patch_size [1]: the only patching the released models use
SEQ_MULTI_OF = 32  # both streams are padded to a multiple of 32 tokens
FREQUENCY_DIM = 256  # width of the sinusoidal timestep embedding
PREFIX = "model.diffusion_model."


@dataclass(frozen=True)
class ZImageConfig:
    """diffusers' ``ZImageTransformer2DModel`` config (Z-Image-Turbo values); ``t_scale`` is 1000 as in BFL's
    timestep embedding, ``axes_lens`` only bound the reference's lookup tables and are not needed here."""

    in_channels: int = 16
    dim: int = 3840
    n_layers: int = 30
    n_refiner_layers: int = 2
    n_heads: int = 30
    ffn_dim: int = 10240  # int(dim / 3 * 8)
    cap_feat_dim: int = 2560
    t_hidden: int = 1024  # t_embedder's inner width
    norm_eps: float = 1e-5
    rope_theta: float = 256.0
    axes_dims: tuple[int, ...] = (32, 48, 48)

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"Z-Image width {self.dim} is not divisible by {self.n_heads} heads")
        if sum(self.axes_dims) != self.head_dim or any(d % 2 for d in self.axes_dims):
            raise ValueError(f"RoPE axes {self.axes_dims} must be even and add up to the head width {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def adaln_dim(self) -> int:
        return min(self.dim, FREQUENCY_DIM)  # diffusers' min(dim, ADALN_EMBED_DIM)

    @classmethod
    def preset(cls, size: str = "full") -> ZImageConfig:
        """Z-Image (Turbo and Base share the architecture) at its real size, or a few-MB copy (``"tiny"``: the
        real 16 latent channels, caption width 32 = the tiny Qwen3's hidden size)."""
        if size == "full":
            return cls()  # Tongyi-MAI/Z-Image-Turbo transformer/config.json
        if size == "tiny":
            return cls(dim=64, n_layers=2, n_refiner_layers=1, n_heads=4, ffn_dim=int(64 / 3 * 8), cap_feat_dim=32,
                       axes_dims=rope_axes(16))
        raise ValueError(f"size {size!r} is invalid; valid: tiny, full")

    @classmethod
    def from_state_dict(cls, shapes: Mapping[str, tuple[int, ...]]) -> ZImageConfig:
        """Read the configuration off our (ComfyUI) keys and shapes, prefix removed (see :func:`zimage_state_dict`).

        Raises ``ValueError`` naming the missing or inconsistent key; the loader adds the file name.
        """
        shapes = {k: tuple(v) for k, v in shapes.items()}

        def shape(key: str) -> tuple[int, ...]:
            if key not in shapes:
                raise ValueError(f"Z-Image transformer weights lack {key!r}; not a Z-Image model or truncated")
            return shapes[key]

        def count(prefix: str) -> int:
            found = sorted({int(m.group(1)) for k in shapes if (m := re.match(rf"{prefix}\.(\d+)\.", k))})
            if found != list(range(len(found))):
                raise ValueError(f"Z-Image {prefix} blocks are not numbered 0..n (found {found})")
            return len(found)

        dim, patch = shape("x_embedder.weight")
        if patch % (PATCH * PATCH):
            raise ValueError(f"Z-Image x_embedder takes {patch} features, not whole 2x2 patches")
        n_layers, noise, context = count("layers"), count("noise_refiner"), count("context_refiner")
        if noise != context:
            raise ValueError(f"Z-Image has {noise} noise-refiner but {context} context-refiner blocks")
        if not n_layers:
            raise ValueError("Z-Image transformer weights have no layers.N blocks")
        head_dim = shape("layers.0.attention.q_norm.weight")[0]
        if dim % head_dim:
            raise ValueError(f"Z-Image width {dim} is not a multiple of the QK-norm width {head_dim}")
        if shape("layers.0.attention.qkv.weight") != (3 * dim, dim):
            raise ValueError(f"Z-Image layers.0.attention.qkv.weight is not [{3 * dim}, {dim}]")
        return cls(
            in_channels=patch // (PATCH * PATCH),
            dim=dim,
            n_layers=n_layers,
            n_refiner_layers=noise,
            n_heads=dim // head_dim,
            ffn_dim=shape("layers.0.feed_forward.w1.weight")[0],
            cap_feat_dim=shape("cap_embedder.1.weight")[1],
            t_hidden=shape("t_embedder.mlp.0.weight")[0],
            axes_dims=rope_axes(head_dim),
        )


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """RoPE widths of (sequence, row, column): Z-Image's 32/48/48 of 128, i.e. 1/4, 3/8, 3/8."""
    if head_dim % 16:
        raise ValueError(f"a {head_dim}-wide head cannot be split like Z-Image's 32/48/48 (needs a multiple of 16)")
    return (head_dim // 4, head_dim * 3 // 8, head_dim * 3 // 8)


def zimage_state_dict(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our (ComfyUI) layout from a ComfyUI file (``model.diffusion_model.`` optional) or from diffusers' names
    (``all_x_embedder.2-1``, ``attention.to_q/to_k/to_v``, ...: the q, k, v rows are concatenated); the unused
    ``norm_final.weight`` of Lumina-derived exports is dropped."""
    out: dict[str, torch.Tensor] = {}
    split: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in weights.items():
        key = key.removeprefix(PREFIX)
        if key == "norm_final.weight":
            continue
        key = key.replace("all_x_embedder.2-1.", "x_embedder.").replace("all_final_layer.2-1.", "final_layer.")
        key = key.replace(".attention.to_out.0.", ".attention.out.")
        key = key.replace(".attention.norm_q.", ".attention.q_norm.").replace(".attention.norm_k.", ".attention.k_norm.")
        m = re.fullmatch(r"(.*\.attention)\.to_([qkv])\.weight", key)
        if m:
            split.setdefault(m.group(1), {})[m.group(2)] = value
        else:
            out[key] = value
    for prefix, parts in split.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"Z-Image {prefix} has only {'/'.join(sorted(parts))} of to_q/to_k/to_v")
        out[f"{prefix}.qkv.weight"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def rope_frequencies(ids: torch.Tensor, cfg: ZImageConfig) -> torch.Tensor:
    """Unit complex rotations for integer positions ``ids`` [B, N, 3] -> complex64 [B, N, 1, head_dim/2].

    Angles are taken in float64 and rounded to float32 before cos/sin, the reference's table arithmetic
    (``RopeEmbedder.precompute_freqs_cis``), so the rotations are the trained ones to the last bit.
    """
    pos = ids.to("cpu", torch.float64)
    angles = []
    for axis, d in enumerate(cfg.axes_dims):
        omega = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        angles.append((pos[..., axis, None] * omega).float())
    angle = torch.cat(angles, dim=-1).unsqueeze(2)
    return torch.polar(torch.ones_like(angle), angle).to(ids.device)


def rope_tables(
    cfg: ZImageConfig, caption_tokens: Sequence[int], h: int, w: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, caption) rotations [B, image tokens padded, 1, head_dim/2], [B, longest caption padded, 1, ...] on
    ``device`` for a batch of captions of ``caption_tokens`` tokens over an ``h`` x ``w`` token grid (positions:
    see the module docstring). Made on the CPU (``rope_frequencies``), so ``LatentZImage`` makes them once per
    shape and hands them to the transformer: a CUDA graph cannot capture them (``core.accel.cuda_graphs``)."""
    cap_lens = [_pad_to(n) for n in caption_tokens]
    b, longest, n_img = len(cap_lens), max(cap_lens), h * w
    cap_ids = torch.zeros(b, longest, 3, dtype=torch.int64)
    cap_ids[..., 0] = torch.arange(1, longest + 1)
    img_ids = torch.zeros(b, _pad_to(n_img), 3, dtype=torch.int64)
    img_ids[:, :n_img, 0] = torch.tensor(cap_lens)[:, None] + 1
    img_ids[:, :n_img, 1] = torch.arange(h).repeat_interleave(w)
    img_ids[:, :n_img, 2] = torch.arange(w).repeat(h)
    return rope_frequencies(img_ids, cfg).to(device), rope_frequencies(cap_ids, cfg).to(device)


class RMSNorm(nn.Module):
    """RMS norm with a learned gain, normalised in fp32 (diffusers' ``RMSNorm``)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(self.weight.dtype) * self.weight


class Attention(nn.Module):
    def __init__(self, cfg: ZImageConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.out = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, 1e-5)  # the reference's QK-norm eps is 1e-5 whatever norm_eps is
        self.k_norm = RMSNorm(cfg.head_dim, 1e-5)

    def forward(self, x: torch.Tensor, freqs: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.n_heads, -1).unbind(2)  # each [B, N, H, D]
        q, k = apply_rope(self.q_norm(q), freqs), apply_rope(self.k_norm(k), freqs)
        out = attention_backend.attention(q.flatten(2), k.flatten(2), v.flatten(2), self.n_heads, mask=mask,
                                          layer=self)
        return self.out(out)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class ZImageBlock(nn.Module):
    """Sandwich-norm block; ``modulation`` (noise refiner and main layers): scale the normed input by 1 + s and
    gate each residual by tanh(g), all four from the timestep vector; the context refiner has neither."""

    def __init__(self, cfg: ZImageConfig, modulation: bool) -> None:
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim)
        self.attention_norm1 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm1 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention_norm2 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm2 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.modulation = modulation
        if modulation:
            self.adaLN_modulation = nn.Sequential(nn.Linear(cfg.adaln_dim, 4 * cfg.dim))

    def forward(
        self, x: torch.Tensor, freqs: torch.Tensor, mask: torch.Tensor | None, c: torch.Tensor | None = None
    ) -> torch.Tensor:
        if not self.modulation:
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), freqs, mask))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(c)[:, None, :].chunk(4, dim=-1)
        attn = self.attention(self.attention_norm1(x) * (1.0 + scale_msa), freqs, mask)
        x = x + gate_msa.tanh() * self.attention_norm2(attn)
        ffn = self.feed_forward(self.ffn_norm1(x) * (1.0 + scale_mlp))
        return x + gate_mlp.tanh() * self.ffn_norm2(ffn)


class TimestepEmbedder(nn.Module):
    def __init__(self, cfg: ZImageConfig) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQUENCY_DIM, cfg.t_hidden), nn.SiLU(), nn.Linear(cfg.t_hidden, cfg.adaln_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, FREQUENCY_DIM).to(self.mlp[0].weight.dtype))


class FinalLayer(nn.Module):
    def __init__(self, cfg: ZImageConfig) -> None:
        super().__init__()
        self.linear = nn.Linear(cfg.dim, PATCH * PATCH * cfg.in_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.adaln_dim, cfg.dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        scale = 1.0 + self.adaLN_modulation(c)[:, None, :]
        return self.linear(F.layer_norm(x, (x.shape[-1],), eps=1e-6) * scale)


def _pad_to(n: int) -> int:
    return -(-n // SEQ_MULTI_OF) * SEQ_MULTI_OF


class ZImageTransformer(nn.Module):
    """``forward(x [B, C, H, W], t [B], cap_feats)`` -> ``[B, C, H, W]``, the negative velocity.

    ``t`` is 1 - sigma (0 = pure noise). ``cap_feats``: one ``[tokens, cap_feat_dim]`` tensor per image (the
    prompt's Qwen3 states without padding, lengths may differ) or a ``[B, tokens, cap_feat_dim]`` tensor.
    H and W (latent) must be even. ``rope``: ``rope_tables`` of these captions and this size, where the caller
    has them (``LatentZImage``).
    """

    def __init__(self, cfg: ZImageConfig) -> None:
        super().__init__()
        self.config = cfg
        self.x_embedder = nn.Linear(PATCH * PATCH * cfg.in_channels, cfg.dim)
        self.x_pad_token = nn.Parameter(torch.zeros(1, cfg.dim))
        self.cap_pad_token = nn.Parameter(torch.zeros(1, cfg.dim))
        self.t_embedder = TimestepEmbedder(cfg)
        self.cap_embedder = nn.Sequential(RMSNorm(cfg.cap_feat_dim, cfg.norm_eps), nn.Linear(cfg.cap_feat_dim, cfg.dim))
        self.noise_refiner = nn.ModuleList(ZImageBlock(cfg, modulation=True) for _ in range(cfg.n_refiner_layers))
        self.context_refiner = nn.ModuleList(ZImageBlock(cfg, modulation=False) for _ in range(cfg.n_refiner_layers))
        self.layers = nn.ModuleList(ZImageBlock(cfg, modulation=True) for _ in range(cfg.n_layers))
        self.final_layer = FinalLayer(cfg)

    def _captions(self, cap_feats: torch.Tensor | Sequence[torch.Tensor], batch: int) -> list[torch.Tensor]:
        feats = list(cap_feats.unbind(0)) if isinstance(cap_feats, torch.Tensor) and cap_feats.ndim == 3 else list(cap_feats)
        if len(feats) != batch:
            raise ValueError(f"Z-Image got {len(feats)} captions for {batch} latents")
        for f in feats:
            if f.ndim != 2 or f.shape[1] != self.config.cap_feat_dim or f.shape[0] == 0:
                raise ValueError(f"Z-Image caption features must be [tokens >= 1, {self.config.cap_feat_dim}], "
                                 f"got {list(f.shape)}")
        return feats

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cap_feats: torch.Tensor | Sequence[torch.Tensor],
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels or x.shape[2] % PATCH or x.shape[3] % PATCH:
            raise ValueError(f"Z-Image latents must be [batch, {cfg.in_channels}, even H, even W], got {list(x.shape)}")
        b, c, height, width = x.shape
        if t.shape != (b,):
            raise ValueError(f"Z-Image timesteps must be [{b}], got {list(t.shape)}")
        feats = self._captions(cap_feats, b)
        dtype, device = self.x_embedder.weight.dtype, x.device
        vec = self.t_embedder(t).to(dtype)  # [B, adaln_dim]

        # image tokens: 2x2 patches, features ordered (row in patch, column in patch, channel)
        h, w = height // PATCH, width // PATCH
        n_img, n_img_pad = h * w, _pad_to(h * w)
        patches = x.to(dtype).view(b, c, h, PATCH, w, PATCH).permute(0, 2, 4, 3, 5, 1).reshape(b, n_img, -1)
        img = self.x_embedder(patches)
        img = torch.cat([img, self.x_pad_token.expand(b, n_img_pad - n_img, -1)], dim=1)

        # caption tokens, each padded to a multiple of 32 with cap_pad_token, then batched (key mask if ragged)
        cap_lens = [_pad_to(len(f)) for f in feats]
        longest = max(cap_lens)
        cap = torch.zeros(b, longest, cfg.dim, dtype=dtype, device=device)
        for i, f in enumerate(feats):
            cap[i, : len(f)] = self.cap_embedder(f.to(device, dtype))
            cap[i, len(f) : cap_lens[i]] = self.cap_pad_token
        cap_mask = None
        if any(n != longest for n in cap_lens):
            # filled on the device: a tensor of the lengths would be host data copied in (no CUDA graph takes it)
            cap_mask = torch.ones(b, longest, dtype=torch.bool, device=device)
            for i, n in enumerate(cap_lens):
                cap_mask[i, n:] = False

        img_freqs, cap_freqs = rope if rope is not None else rope_tables(cfg, [len(f) for f in feats], h, w, device)

        for block in self.noise_refiner:
            img = block(img, img_freqs, None, vec)
        key_mask = None if cap_mask is None else cap_mask[:, None, None, :]
        for block in self.context_refiner:
            cap = block(cap, cap_freqs, key_mask)

        # [image; caption]: the image part has the same length in every row, so batch padding stays at the end
        tokens = torch.cat([img, cap], dim=1)
        freqs = torch.cat([img_freqs, cap_freqs], dim=1)
        if cap_mask is not None:
            full = torch.ones(b, n_img_pad, dtype=torch.bool, device=device)
            key_mask = torch.cat([full, cap_mask], dim=1)[:, None, None, :]
        for block in self.layers:
            tokens = block(tokens, freqs, key_mask, vec)

        out = self.final_layer(tokens[:, :n_img], vec)  # [B, h*w, 4C]
        return out.view(b, h, w, PATCH, PATCH, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, height, width)


class LatentZImage:
    """The transformer seen from the sampler: ``(x [B, 16, h, w], sigma [B], context, cap_lens) -> velocity``.

    ``ZImagePipeline`` around ``ZImageTransformer2DModel``: the DiT's timestep is ``1 - sigma`` (0 = pure noise)
    and its output the negative velocity; each caption is cut back to its real length (``cap_lens``, see
    ``core.models.zimage_conditioner``), so a [cond; uncond] batch is the reference's ragged list.
    """

    def __init__(self, network: ZImageTransformer) -> None:
        self.network = network
        self.rope = LastTable()
        self._lengths_of: torch.Tensor | None = None  # the cap_lens tensor self._lengths were read from
        self._lengths: list[int] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, *, context: torch.Tensor, cap_lens: torch.Tensor) -> torch.Tensor:
        # A pass hands every step the same cap_lens tensor (CFGDenoiser batches once); reading it on the host is
        # a GPU sync, which would keep the CPU from queueing the next step's kernels: read it once per tensor.
        if cap_lens is not self._lengths_of:
            self._lengths_of, self._lengths = cap_lens, [int(n) for n in cap_lens.tolist()]
        lengths = self._lengths
        if len(lengths) != x.shape[0]:
            raise ValueError(f"Z-Image got {len(lengths)} caption lengths for {x.shape[0]} latents")
        captions = [context[i, :n] for i, n in enumerate(lengths)]
        h, w = x.shape[2] // PATCH, x.shape[3] // PATCH
        rope = self.rope.get((tuple(lengths), h, w, x.device),
                             lambda: rope_tables(self.network.config, lengths, h, w, x.device))
        return (-self.network(x, 1.0 - t, captions, rope)).to(x.dtype)
