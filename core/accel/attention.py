"""The one place that picks the attention backend.

Order of preference: SageAttention, then xformers, then PyTorch's scaled_dot_product_attention (SDPA).
Sage and xformers are CUDA-only optional extras; they are imported lazily, checked against the call
(device, dtype, head dim) and, if a kernel raises, disabled for the rest of the process with a fall back to
SDPA. ``active_backend()`` reports what actually ran last, for the status bar.

All networks call :func:`attention` with q, k, v shaped ``[batch, tokens, heads * head_dim]``.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

BACKENDS = ("sage", "xformers", "sdpa")

_lock = threading.Lock()
_loaded: dict[str, Callable | None] = {}
_disabled: set[str] = set()
_last_used = "sdpa"
_forced: str | None = os.environ.get("DARKROOM_ATTENTION") or None


def _import_kernel(name: str) -> Callable | None:
    """Return the backend's kernel function, or None when its package is absent."""
    if name in _loaded:
        return _loaded[name]
    kernel = None
    try:
        if name == "sage":
            kernel = importlib.import_module("sageattention").sageattn
        elif name == "xformers":
            kernel = importlib.import_module("xformers.ops").memory_efficient_attention
    except Exception as exc:  # ImportError, or a broken build raising anything at import
        log.debug("attention backend %s unavailable: %s", name, exc)
        kernel = None
    _loaded[name] = kernel
    return kernel


def force_backend(name: str | None) -> None:
    """Prefer one backend (None = automatic). An unusable choice still falls back to SDPA."""
    global _forced
    if name is not None and name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is unknown; valid: {', '.join(BACKENDS)}")
    _forced = name


def reset() -> None:
    """Forget imports and failures (tests simulate packages appearing and disappearing)."""
    global _last_used
    with _lock:
        _loaded.clear()
        _disabled.clear()
        _last_used = "sdpa"


def available_backends(device: torch.device | str = "cuda") -> list[str]:
    """Backends usable on ``device``, best first."""
    device = torch.device(device)
    names = []
    for name in BACKENDS[:-1]:
        if device.type == "cuda" and name not in _disabled and _import_kernel(name) is not None:
            names.append(name)
    names.append("sdpa")
    return names


def active_backend() -> str:
    """The backend used by the most recent attention call."""
    return _last_used


def _candidates(q: torch.Tensor, head_dim: int) -> list[str]:
    order = list(BACKENDS)
    if _forced in order:
        order.remove(_forced)
        order.insert(0, _forced)
    usable = []
    for name in order:
        if name == "sdpa":
            usable.append(name)
            continue
        if name in _disabled or q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
            continue
        if name == "sage" and head_dim > 128:  # Sage pads up to 128 and rejects larger heads
            continue
        if _import_kernel(name) is not None:
            usable.append(name)
    return usable


def _run(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, inner = q.shape
    d = inner // heads
    if name == "sage":
        # [B, N, H*D] -> [B, H, N, D] ("HND" layout)
        qh, kh, vh = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
        out = _loaded["sage"](qh, kh, vh, tensor_layout="HND", is_causal=False)
        return out.transpose(1, 2).reshape(b, n, inner)
    if name == "xformers":
        # xformers takes [B, M, H, K]
        qh, kh, vh = (t.reshape(b, -1, heads, d) for t in (q, k, v))
        return _loaded["xformers"](qh, kh, vh).reshape(b, n, inner)
    qh, kh, vh = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qh, kh, vh)
    return out.transpose(1, 2).reshape(b, n, inner)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    *,
    causal: bool = False,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Multi-head attention over ``[B, N, heads*D]`` tensors; returns ``[B, N, heads*D]``.

    ``causal=True`` (CLIP's text transformer), an additive ``bias`` broadcastable to ``[B, heads, N, M]``
    (T5's relative positions) or a ``scale`` other than 1/sqrt(D) (T5 uses 1) always use SDPA: text encoders
    are a tiny share of the work.
    """
    global _last_used
    b, n, inner = q.shape
    d = inner // heads
    if causal or bias is not None or scale is not None:
        qh, kh, vh = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
        mask = None if bias is None else bias.to(q.dtype)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, is_causal=causal, scale=scale)
        return out.transpose(1, 2).reshape(b, n, inner)
    for name in _candidates(q, d):
        if name == "sdpa":
            _last_used = name
            return _run(name, q, k, v, heads)
        try:
            out = _run(name, q, k, v, heads)
        except Exception as exc:  # unsupported GPU arch, shape, build problem: fall back for good
            log.warning("attention backend %s failed (%s); falling back", name, exc)
            with _lock:
                _disabled.add(name)
            continue
        _last_used = name
        return out
    raise AssertionError("unreachable: sdpa is always a candidate")
