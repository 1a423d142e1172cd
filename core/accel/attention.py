"""The one place that picks the attention backend: SageAttention, then xformers, then PyTorch SDPA.

Networks call :func:`attention` with q, k, v shaped ``[batch, tokens, heads * head_dim]``. Inside
``with dispatcher.active():`` (the runner wraps each job in it) the call goes to that
:class:`AttentionDispatcher`; outside one (networks used on their own, parity tests), inside a
``torch.compile`` region and under ``torch.jit.trace`` (Stable-Fast) it is plain SDPA.

The dispatcher chooses per call from the device (type and CUDA capability), dtype, head dim, sequence lengths,
causal flag and mask, by the rules in :data:`KERNEL_RULES` (what each kernel's own code accepts). A kernel that
raises on a shape is never tried again for that shape (other shapes keep using it), with one warning naming the
backend and the shape. Each layer's latest backend is recorded for the status line (``sage 20 / sdpa 13``).

There is no process-wide state: one dispatcher per runner, found through a context variable, so two workers
(or a test) never see each other's choices or failures.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import logging
import math
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from core.accel.attention_mode import BACKENDS, MODES, check_mode
from core.text import visible

log = logging.getLogger(__name__)

__all__ = ["BACKENDS", "KERNEL_RULES", "MODES", "SAGE1_RULE", "AttentionDispatcher", "CallShape", "DeviceInfo", "KernelRule",
           "attention", "current_dispatcher", "probe_device", "sdpa"]

_HALF = frozenset({torch.float16, torch.bfloat16})
# torch >= 2.5 has torch.OutOfMemoryError; running out of memory is not a kernel incompatibility: it propagates
# (the memory policy's retry needs to see it) and never disables a kernel.
_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def _compiling_probe(compiler: Any = torch.compiler, utils: Any = torch._utils) -> Callable[[], bool]:
    """torch.compiler.is_compiling arrived in torch 2.3; Darkroom declares torch>=2.2, which has torch._utils'."""
    return getattr(compiler, "is_compiling", None) or utils.is_compiling


_is_compiling = _compiling_probe()


@dataclass(frozen=True)
class DeviceInfo:
    """What the rules need to know about a device. ``capability``: CUDA (major, minor), None elsewhere."""

    type: str
    capability: tuple[int, int] | None = None


def probe_device(device: torch.device) -> DeviceInfo:
    """The real probe (tests inject another to pretend to be a GPU while tensors stay on the CPU)."""
    if device.type == "cuda":
        return DeviceInfo("cuda", tuple(torch.cuda.get_device_capability(device)))  # type: ignore[arg-type]
    return DeviceInfo(device.type)


@dataclass(frozen=True)
class CallShape:
    """Everything about one call that a kernel may accept or reject; also the key of the per-shape fallback."""

    device: str
    dtype: torch.dtype
    heads: int
    head_dim: int
    q_len: int
    kv_len: int
    causal: bool = False
    masked: bool = False
    scaled: bool = False  # a logit scale other than 1/sqrt(head_dim)

    def describe(self) -> str:
        parts = [f"{self.device} {str(self.dtype).removeprefix('torch.')}", f"{self.heads} heads x {self.head_dim}",
                 f"{self.q_len} x {self.kv_len} tokens"]
        if self.causal:
            parts.append("causal")
        if self.masked:
            parts.append("masked")
        if self.scaled:
            parts.append("own scale")
        return ", ".join(parts)


@dataclass(frozen=True)
class KernelRule:
    """What one kernel accepts, as its own code checks it. ``refusal`` says why a call is out, or None."""

    name: str
    package: str  # what to install, for messages
    devices: frozenset[str]
    dtypes: frozenset[torch.dtype]
    # Exact CUDA architectures the kernel dispatches on (None: any at or above min_capability).
    capabilities: frozenset[tuple[int, int]] | None = None
    min_capability: tuple[int, int] | None = None
    dtype_min_capability: Mapping[torch.dtype, tuple[int, int]] = field(default_factory=dict)
    max_head_dim: int | None = None
    head_dims: frozenset[int] | None = None  # the only head dims it takes (None: any up to max_head_dim)
    causal: bool = True
    causal_needs_equal_lengths: bool = False
    mask: bool = False

    def refusal(self, shape: CallShape, device: DeviceInfo) -> str | None:
        if device.type not in self.devices:
            return f"it runs on {'/'.join(sorted(self.devices))} only, not {device.type}"
        if shape.dtype not in self.dtypes:
            names = "/".join(sorted(str(d).removeprefix("torch.") for d in self.dtypes))
            return f"it takes {names}, not {str(shape.dtype).removeprefix('torch.')}"
        cap = device.capability
        if cap is not None:
            if self.capabilities is not None and cap not in self.capabilities:
                archs = ", ".join(f"sm{a}{b}" for a, b in sorted(self.capabilities))
                return f"it supports {archs}, not sm{cap[0]}{cap[1]}"
            if self.min_capability is not None and cap < self.min_capability:
                return f"it needs sm{self.min_capability[0]}{self.min_capability[1]} or newer"
            need = self.dtype_min_capability.get(shape.dtype)
            if need is not None and cap < need:
                return f"{str(shape.dtype).removeprefix('torch.')} needs sm{need[0]}{need[1]} or newer"
        if self.max_head_dim is not None and shape.head_dim > self.max_head_dim:
            return f"head dim {shape.head_dim} is above its maximum {self.max_head_dim}"
        if self.head_dims is not None and shape.head_dim not in self.head_dims:
            return f"it takes head dims {'/'.join(map(str, sorted(self.head_dims)))}, not {shape.head_dim}"
        if shape.causal and not self.causal:
            return "it has no causal mode"
        if shape.causal and self.causal_needs_equal_lengths and shape.q_len != shape.kv_len:
            return "its causal mode needs as many queries as keys"
        if shape.masked and not self.mask:
            return "it takes no attention mask"
        return None


KERNEL_RULES: dict[str, KernelRule] = {
    # sageattention 2.x sageattn() (thu-ml/SageAttention sageattention/core.py): dispatches on
    # sm80/86/89/90/120/121 and raises "Unsupported CUDA architecture" otherwise; asserts fp16/bf16; pads head
    # dims to 64 or 128 and raises ValueError above 128; is_causal only "when qo_len == kv_len"; no mask
    # argument; sm_scale for the scale. 1.x is SAGE1_RULE.
    "sage": KernelRule(
        "sage", "sageattention", frozenset({"cuda"}), _HALF,
        capabilities=frozenset({(8, 0), (8, 6), (8, 9), (9, 0), (12, 0), (12, 1)}),
        max_head_dim=128, causal=True, causal_needs_equal_lengths=True, mask=False,
    ),
    # xformers memory_efficient_attention: the CUTLASS kernel runs fp32/fp16 from sm60 (P100), bf16 from sm80,
    # any head dim; LowerTriangularMask for causal, a tensor attn_bias for masks; CPU tensors are refused.
    "xformers": KernelRule(
        "xformers", "xformers", frozenset({"cuda"}), frozenset({torch.float16, torch.bfloat16, torch.float32}),
        min_capability=(6, 0), dtype_min_capability={torch.bfloat16: (8, 0)},
        causal=True, causal_needs_equal_lengths=True, mask=True,
    ),
}


# sageattention 1.x (1.0.6 is what ``pip install sageattention`` gets; 2.x is built from source): Triton only,
# no architecture switch; ``assert headdim in [64, 96, 128]`` with no padding (SD1.5's 40/80 are out); the same
# sageattn(q, k, v, tensor_layout, is_causal, sm_scale) call. (It also subtracts k's mean from k in place: the
# networks' k is a fresh projection each call, so nothing reads it afterwards.)
SAGE1_RULE = KernelRule(
    "sage", "sageattention", frozenset({"cuda"}), _HALF, head_dims=frozenset({64, 96, 128}),
    causal=True, causal_needs_equal_lengths=True, mask=False,
)


# ---- the kernels, each called with q, k, v as [B, N, H, D] views of the networks' [B, N, H*D] ----------------


def sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
    mask: torch.Tensor | None = None, scale: float | None = None,
) -> torch.Tensor:
    """PyTorch's scaled_dot_product_attention on [B, N, H, D]; returns [B, N, H, D]."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=causal, scale=scale
    )
    return out.transpose(1, 2)


def _load_sage(importer: Callable[[str], Any]) -> Callable[..., torch.Tensor]:
    module = importer("sageattention")
    sageattn = module.sageattn

    def run(q, k, v, *, causal, mask, scale):  # noqa: ANN001, ANN202 (mask is refused by the rule)
        # NHD is [batch, tokens, heads, head_dim]: our views as they are, no transpose or copy.
        return sageattn(q, k, v, tensor_layout="NHD", is_causal=causal, sm_scale=scale)

    # 2.x has the per-architecture CUDA kernels beside sageattn(); 1.x has only the Triton one
    if not hasattr(module, "sageattn_qk_int8_pv_fp16_cuda"):
        run.rule = SAGE1_RULE  # type: ignore[attr-defined]
    return run


def _xformers_bias(mask: torch.Tensor, q: torch.Tensor, kv_len: int) -> torch.Tensor:
    """An additive [B, H, Nq, Nk] bias in q's dtype, its rows 8-aligned in memory as xformers requires."""
    b, n, h, _ = q.shape
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
    padded = torch.empty((b, h, n, math.ceil(kv_len / 8) * 8), dtype=q.dtype, device=q.device)
    bias = padded[..., :kv_len]
    bias.copy_(mask.to(q.dtype).expand(b, h, n, kv_len))
    return bias


def _load_xformers(importer: Callable[[str], Any]) -> Callable[..., torch.Tensor]:
    ops = importer("xformers.ops")
    kernel, lower_triangular = ops.memory_efficient_attention, ops.LowerTriangularMask

    def run(q, k, v, *, causal, mask, scale):  # noqa: ANN001, ANN202
        # xformers takes [B, M, H, K]: our views as they are.
        bias = lower_triangular() if causal else None
        if mask is not None:
            bias = _xformers_bias(mask, q, k.shape[1])
        if scale is None:  # xformers before 0.0.21 has no scale argument
            return kernel(q, k, v, attn_bias=bias)
        return kernel(q, k, v, attn_bias=bias, scale=scale)

    return run


_LOADERS: dict[str, Callable[[Callable[[str], Any]], Callable[..., torch.Tensor]]] = {
    "sage": _load_sage,
    "xformers": _load_xformers,
}


def _combine(mask: torch.Tensor | None, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """One SDPA-style attn_mask from a boolean/additive ``mask`` and an additive ``bias``."""
    if bias is not None:
        bias = bias.to(dtype)
    if mask is None:
        return bias
    if mask.dtype != torch.bool:
        mask = mask.to(dtype)
    if bias is None:
        return mask
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    return mask + bias


# ---- the dispatcher ------------------------------------------------------------------------------------------


class AttentionDispatcher:
    """Chooses and runs an attention kernel per call; remembers failures per shape and what each layer used.

    ``mode``: "auto" (best usable), or one backend forced for debugging ("sdpa", "sage", "xformers"); a forced
    kernel that cannot run a shape falls back to SDPA and says so once. ``probe`` and ``importer`` replace the
    device probe and ``importlib.import_module`` (tests simulate GPUs and kernels with them).
    """

    def __init__(
        self,
        mode: str = "auto",
        *,
        probe: Callable[[torch.device], DeviceInfo] = probe_device,
        importer: Callable[[str], Any] = importlib.import_module,
        rules: Mapping[str, KernelRule] = KERNEL_RULES,
    ) -> None:
        self.mode = check_mode(mode)
        self._probe = probe
        self._importer = importer
        self._rules = dict(rules)
        self._kernels: dict[str, Callable[..., torch.Tensor] | None] = {}
        self._devices: dict[torch.device, DeviceInfo] = {}
        self._plans: dict[CallShape, tuple[str, ...]] = {}
        self._fast: dict[tuple, tuple[CallShape, tuple[str, ...]]] = {}  # per-call key -> (shape, what to try)
        self._failed: set[tuple[str, CallShape]] = set()
        self._told: set[Any] = set()
        self._lock = threading.Lock()  # the record and notes are read from the status thread
        self._record: dict[Any, str] = {}
        self.notes: list[str] = []  # each fallback warning once, for front ends to show

    # -- context -----------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def active(self, *, new_job: bool = False) -> Iterator[AttentionDispatcher]:
        """Route :func:`attention` calls in this thread (context) here; ``new_job`` clears the layer record."""
        if new_job:
            self.reset_record()
        token = _current.set(self)
        try:
            yield self
        finally:
            _current.reset(token)

    # -- the record --------------------------------------------------------------------------------------------

    def reset_record(self) -> None:
        with self._lock:
            self._record.clear()

    def layer_counts(self) -> dict[str, int]:
        """Layers per backend (each layer counted under the backend it used last), best backend first."""
        with self._lock:
            used = list(self._record.values())
        return {name: used.count(name) for name in BACKENDS if name in used}

    def summary(self) -> str:
        """For the status line: ``sage 20 / sdpa 13``; the mode before any layer ran; ``(forced X)`` if forced."""
        counts = self.layer_counts()
        text = " / ".join(f"{name} {n}" for name, n in counts.items()) if counts else self.mode
        if self.mode != "auto" and counts:
            text += f" (forced {self.mode})"
        return text

    # -- choosing ----------------------------------------------------------------------------------------------

    def _device_info(self, device: torch.device) -> DeviceInfo:
        info = self._devices.get(device)
        if info is None:
            info = self._devices[device] = self._probe(device)
        return info

    def _kernel(self, name: str) -> Callable[..., torch.Tensor] | None:
        if name not in self._kernels:
            kernel = None
            try:
                kernel = _LOADERS[name](self._importer)
            except ImportError as exc:  # not installed: normal, say nothing unless it was asked for
                log.debug("attention backend %s unavailable: %s", name, exc)
                if self.mode == name:
                    self._tell(("absent", name), f"attention: {name} was asked for but {self._rules[name].package} "
                               f"cannot be imported ({visible(exc)}); using sdpa")
            except Exception as exc:  # installed but broken (wrong CUDA build, missing symbol, ...)
                self._tell(("broken", name), f"attention: {self._rules[name].package} is installed but failed to "
                           f"load ({type(exc).__name__}: {visible(exc)}); not using {name}")
            rule = getattr(kernel, "rule", None)
            if rule is not None:  # the installed version accepts other calls than the default rule says
                self._rules[name] = rule
            self._kernels[name] = kernel
        return self._kernels[name]

    def available(self, device: torch.device | str) -> list[str]:
        """Backends whose package loads and whose rules accept ``device`` at all, best first."""
        info = self._device_info(torch.device(device))
        names = [name for name, rule in self._rules.items()
                 if info.type in rule.devices and self._kernel(name) is not None]
        return [*names, "sdpa"]

    def plan(self, shape: CallShape, device: torch.device) -> tuple[str, ...]:
        """Backends to try for ``shape``, in order; always ends with sdpa."""
        order = self._plans.get(shape)
        if order is not None:
            return order
        info = self._device_info(device)
        wanted = [self.mode] if self.mode in self._rules else ([] if self.mode == "sdpa" else list(self._rules))
        names = []
        for name in wanted:
            # Loading first settles which version's rule applies; a device no version runs on (the CPU) loads
            # nothing: a CPU-only box with the cuda extra installed does not import them for nothing.
            runs_here = info.type in self._rules[name].devices
            kernel = self._kernel(name) if runs_here else None
            why = self._rules[name].refusal(shape, info)
            if why is None and kernel is not None:
                names.append(name)
            elif why is not None and (kernel is not None or not runs_here) and self.mode == name:
                self._tell(("refused", name, why), f"attention: forced {name} cannot run {shape.describe()} "
                           f"({why}); using sdpa there")
            else:
                log.debug("attention: %s skipped for %s: %s", name, shape.describe(), why or "not available")
        order = self._plans[shape] = (*names, "sdpa")
        return order

    def _tell(self, key: Any, message: str) -> None:
        with self._lock:
            if key in self._told:
                return
            self._told.add(key)
            self.notes.append(message)
        log.warning("%s", message)

    # -- running -----------------------------------------------------------------------------------------------

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        heads: int,
        *,
        causal: bool = False,
        mask: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        scale: float | None = None,
        layer: Any = None,
    ) -> torch.Tensor:
        b, n, inner = q.shape
        d = inner // heads
        attn_mask = _combine(mask, bias, q.dtype) if mask is not None or bias is not None else None
        # Called for every layer of every step: the choice is looked up by a plain tuple (a few hundred ns).
        key = (q.device, q.dtype, heads, d, n, k.shape[1], causal, attn_mask is not None, scale is not None)
        entry = self._fast.get(key)
        if entry is None:
            shape = CallShape(q.device.type, q.dtype, heads, d, n, k.shape[1], *key[6:])
            entry = self._fast[key] = (shape, tuple(x for x in self.plan(shape, q.device)
                                                    if (x, shape) not in self._failed))
        shape, order = entry
        qh, kh, vh = (t.reshape(b, t.shape[1], heads, d) for t in (q, k, v))  # views of contiguous inputs
        used = "sdpa"
        out = None
        for name in order:
            if name == "sdpa":
                out = sdpa(qh, kh, vh, causal=causal, mask=attn_mask, scale=scale)
                break
            try:
                out = self._kernels[name](qh, kh, vh, causal=causal, mask=attn_mask, scale=scale)  # type: ignore[misc]
            except _OOM:
                raise
            except Exception as exc:  # unsupported arch or shape, build problem: never this shape again
                self._failed.add((name, shape))
                self._fast[key] = (shape, tuple(x for x in order if x != name))
                self._tell(("failed", name, shape), f"attention: {name} failed on {shape.describe()} "
                           f"({type(exc).__name__}: {visible(exc)}); using the next backend for that shape "
                           "from now on")
                continue
            used = name
            break
        key = layer if isinstance(layer, (str, int)) else (id(layer) if layer is not None else shape)
        with self._lock:
            self._record[key] = used
        watched = _watched.get()
        if watched is not None:
            watched.add(used)
        assert out is not None
        return out.reshape(b, n, -1)


_current: contextvars.ContextVar[AttentionDispatcher | None] = contextvars.ContextVar(
    "darkroom_attention_dispatcher", default=None
)


# the backends used by attention calls inside a ``backends_used()`` block
_watched: contextvars.ContextVar[set[str] | None] = contextvars.ContextVar("darkroom_attention_watch", default=None)


@contextlib.contextmanager
def backends_used() -> Iterator[set[str]]:
    """The set of backends the attention calls inside the block run on (CUDA graphs ask: SageAttention's
    kernels cannot be captured, ``core.accel.cuda_graphs``)."""
    used: set[str] = set()
    token = _watched.set(used)
    try:
        yield used
    finally:
        _watched.reset(token)


def current_dispatcher() -> AttentionDispatcher | None:
    """The dispatcher :func:`attention` uses here, or None (plain SDPA)."""
    return _current.get()


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    *,
    causal: bool = False,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
    layer: Any = None,
) -> torch.Tensor:
    """Multi-head attention over ``[B, N, heads*D]`` q and ``[B, M, heads*D]`` k, v; returns ``[B, N, heads*D]``.

    ``causal``: token i sees tokens <= i (CLIP). ``mask``: boolean (True = attend) or additive, broadcastable
    to ``[B, heads, N, M]`` as for SDPA; ``bias``: an additive one (T5's relative positions), added to ``mask``.
    ``scale``: the logit scale (None: 1/sqrt(D); T5 uses 1). ``layer``: who is calling (the module itself, or a
    name), so the status line counts layers rather than calls.
    """
    # Under torch.compile the call traces to SDPA, which inductor lowers to its own fused kernels: Dynamo cannot
    # trace ContextVar.get (a graph break at every layer), and the kernels' Python wrappers would break it too.
    # Under torch.jit.trace (Stable-Fast) likewise: the tracer cannot see into Triton or C++ extension kernels,
    # whose output would be recorded as a constant.
    dispatcher = None if _is_compiling() or torch.jit.is_tracing() else _current.get()
    if dispatcher is not None:
        return dispatcher(q, k, v, heads, causal=causal, mask=mask, bias=bias, scale=scale, layer=layer)
    b, n, inner = q.shape
    qh, kh, vh = (t.reshape(b, t.shape[1], heads, inner // heads) for t in (q, k, v))
    attn_mask = _combine(mask, bias, q.dtype) if mask is not None or bias is not None else None
    out = sdpa(qh, kh, vh, causal=causal, mask=attn_mask, scale=scale)
    return out.reshape(b, n, -1)
