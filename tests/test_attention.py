"""The attention dispatcher: choice per call, per-shape fallback, forced modes, the per-layer record.

SageAttention and xformers are simulated by fake modules in ``sys.modules`` whose kernels check their input
layout the way the real ones read it and compute reference attention; a GPU is simulated by the dispatcher's
injectable device probe while the tensors stay on the CPU.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys
import threading
import types

import pytest
import torch
import torch.nn.functional as F

from core.accel import attention as attn
from core.accel.attention import AttentionDispatcher, CallShape, DeviceInfo
from core.accel.attention_mode import AttentionModeError, resolve_mode


def reference(q, k, v, heads, *, causal=False, mask=None, scale=None):
    """Attention written out in float64 on [B, N, H*D] (no SDPA), to check every path against."""
    b, n, _ = q.shape
    qh, kh, vh = (t.double().unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
    d = qh.shape[-1]
    logits = qh @ kh.transpose(-1, -2) * (scale if scale is not None else d**-0.5)
    if causal:
        logits = logits.masked_fill(torch.ones(n, kh.shape[2], dtype=torch.bool).tril().logical_not(), float("-inf"))
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask.double()
    return (logits.softmax(-1) @ vh).transpose(1, 2).reshape(b, n, -1)


class FakeKernels:
    """Installs fake ``sageattention`` and ``xformers.ops`` modules; records calls; can fail on chosen shapes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, sage: bool = True, xformers: bool = True,
                 sage_version: int = 2) -> None:
        self.calls: list[tuple[str, tuple[int, ...]]] = []
        self.fail: dict[str, object] = {}  # backend -> predicate(q) -> bool
        self.heads: int | None = None  # when set, the kernels check the heads axis is where their layout says
        self.old_xformers = False  # when set, memory_efficient_attention takes no scale argument
        # when set, the kernels' results are invisible to torch.jit.trace, as Triton launches and C++ extension
        # calls are: the output enters a trace as a constant
        self.opaque = False
        self.sage_version = sage_version
        if sage:
            mod = types.ModuleType("sageattention")
            mod.sageattn = self.sageattn
            if sage_version >= 2:  # 2.x exports its per-architecture kernels beside sageattn
                mod.sageattn_qk_int8_pv_fp16_cuda = self.sageattn
            monkeypatch.setitem(sys.modules, "sageattention", mod)
        else:
            monkeypatch.setitem(sys.modules, "sageattention", None)  # import raises ModuleNotFoundError
        if xformers:
            pkg, ops = types.ModuleType("xformers"), types.ModuleType("xformers.ops")

            class LowerTriangularMask:
                pass

            ops.memory_efficient_attention = self.memory_efficient_attention
            ops.LowerTriangularMask = LowerTriangularMask
            pkg.ops = ops
            self.LowerTriangularMask = LowerTriangularMask
            monkeypatch.setitem(sys.modules, "xformers", pkg)
            monkeypatch.setitem(sys.modules, "xformers.ops", ops)
        else:
            monkeypatch.setitem(sys.modules, "xformers", None)
            monkeypatch.setitem(sys.modules, "xformers.ops", None)

    def _maybe_fail(self, name: str, q: torch.Tensor) -> None:
        predicate = self.fail.get(name)
        if predicate is not None and predicate(q):
            raise RuntimeError(f"{name}: simulated kernel error")

    def sageattn(self, q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, return_lse=False, **kw):
        if self.sage_version == 1:  # what sageattention 1.0.6 checks, and its smooth_k in place
            assert q.dtype in (torch.float16, torch.bfloat16, torch.float32)
            assert q.shape[-1] in (64, 96, 128), "headdim should be in [64, 96, 128]."
            k -= k.mean(dim=1 if tensor_layout == "NHD" else 2, keepdim=True)
            q, k, v = (t.to(torch.float16) if t.dtype == torch.float32 else t for t in (q, k, v))
        # what sageattention 2.x checks itself
        assert tensor_layout in ("HND", "NHD") and q.dim() == k.dim() == v.dim() == 4
        assert q.dtype in (torch.float16, torch.bfloat16) and q.dtype == k.dtype == v.dtype
        assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1, "Last dim of qkv must be contiguous."
        if q.shape[-1] > 128:
            raise ValueError(f"Unsupported head_dim: {q.shape[-1]}")
        head_axis = 2 if tensor_layout == "NHD" else 1
        if self.heads is not None:
            assert q.shape[head_axis] == k.shape[head_axis] == self.heads, f"heads not on axis {head_axis}"
        seq_axis = 1 if tensor_layout == "NHD" else 2
        assert not is_causal or q.shape[seq_axis] == k.shape[seq_axis]
        self.calls.append(("sage", tuple(q.shape)))
        self._maybe_fail("sage", q)
        if tensor_layout == "NHD":
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=is_causal, scale=sm_scale)
        out = out.to(q.dtype)
        return out.transpose(1, 2) if tensor_layout == "NHD" else out

    def memory_efficient_attention(self, query, key, value, attn_bias=None, p=0.0, **kw):
        # xformers: [B, M, H, K]; a bias tensor [B, H, Mq, Mk] in the query's dtype, rows 8-aligned in memory
        assert query.dim() == key.dim() == value.dim() == 4
        if self.heads is not None:
            assert query.shape[2] == key.shape[2] == self.heads, "heads not on axis 2 ([B, M, H, K])"
        mask, causal = None, False
        if isinstance(attn_bias, self.LowerTriangularMask):
            causal = True
        elif attn_bias is not None:
            b, m, h, _ = query.shape
            assert isinstance(attn_bias, torch.Tensor) and attn_bias.dtype == query.dtype
            assert tuple(attn_bias.shape) == (b, h, m, key.shape[1]), attn_bias.shape
            assert attn_bias.stride(-2) % 8 == 0, "attn_bias is not correctly aligned"
            mask = attn_bias.float()
        scale = kw.pop("scale", None)
        assert not kw and (scale is None or not self.old_xformers), "xformers < 0.0.21 has no scale argument"
        self.calls.append(("xformers", tuple(query.shape)))
        self._maybe_fail("xformers", query)
        q, k, v = (t.transpose(1, 2).float() for t in (query, key, value))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)
        out = out.transpose(1, 2).to(query.dtype)
        return torch.tensor(out.tolist(), dtype=out.dtype) if self.opaque else out

    def used(self, name: str) -> int:
        return sum(1 for n, _ in self.calls if n == name)


def gpu(capability: tuple[int, int] = (9, 0)):
    return lambda device: DeviceInfo("cuda", capability)


def qkv(heads: int, head_dim: int, n: int, m: int | None = None, dtype=torch.float16, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    m = n if m is None else m
    q = torch.randn(batch, n, heads * head_dim, generator=g).to(dtype)
    k = torch.randn(batch, m, heads * head_dim, generator=g).to(dtype)
    v = torch.randn(batch, m, heads * head_dim, generator=g).to(dtype)
    return q, k, v


def shape(head_dim: int, n: int = 64, m: int | None = None, dtype=torch.float16, **kw) -> CallShape:
    return CallShape("cuda", dtype, 8, head_dim, n, n if m is None else m, **kw)


CPU = torch.device("cpu")


# ---- choice ----------------------------------------------------------------------------------------------------


def test_sd15_head_dims_sage_skips_160(monkeypatch):
    FakeKernels(monkeypatch)
    d = AttentionDispatcher(probe=gpu((9, 0)))
    assert d.plan(shape(40), CPU) == ("sage", "xformers", "sdpa")
    assert d.plan(shape(80), CPU) == ("sage", "xformers", "sdpa")
    assert d.plan(shape(160), CPU) == ("xformers", "sdpa")  # Sage raises above 128


def test_sageattention_1_takes_only_head_dims_64_96_128(monkeypatch, caplog):
    """``pip install sageattention`` gets 1.0.6, which asserts head dim 64/96/128 (no padding): SD1.5's 40 and
    80 go to the next backend without a failed call or a warning; 64 (SD2, SDXL) and 128 (Flux) use it."""
    kernels = FakeKernels(monkeypatch, sage_version=1)
    d = AttentionDispatcher(probe=gpu((7, 5)))  # 1.x is Triton only: no architecture list of its own
    assert d.plan(shape(40), CPU) == ("xformers", "sdpa")
    assert d.plan(shape(80), CPU) == ("xformers", "sdpa")
    assert d.plan(shape(64), CPU) == ("sage", "xformers", "sdpa")
    assert d.plan(shape(128, dtype=torch.bfloat16), CPU) == ("sage", "sdpa")  # xformers' bf16 needs sm80
    with caplog.at_level(logging.WARNING), d.active():
        for head_dim in (40, 80, 64):
            q, k, v = qkv(8, head_dim, 64)
            out = attn.attention(q, k, v, 8)
            assert (out.double() - reference(q, k, v, 8)).abs().max() < 2e-2
    assert [c[1][-1] for c in kernels.calls] == [40, 80, 64]  # xformers, xformers, sage
    assert kernels.used("sage") == 1 and not caplog.records and not d.notes


def test_sage_only_installed(monkeypatch):
    FakeKernels(monkeypatch, xformers=False)
    d = AttentionDispatcher(probe=gpu((8, 9)))
    assert d.plan(shape(64), CPU) == ("sage", "sdpa")
    assert d.plan(shape(160), CPU) == ("sdpa",)
    assert d.available("cuda") == ["sage", "sdpa"]


@pytest.mark.parametrize(
    ("probe", "call", "expected"),
    [
        (lambda dev: DeviceInfo("cpu"), shape(64), ("sdpa",)),  # neither kernel runs on the CPU
        (lambda dev: DeviceInfo("mps"), shape(64), ("sdpa",)),
        (gpu((9, 0)), shape(64, dtype=torch.float32), ("xformers", "sdpa")),  # Sage is fp16/bf16 only
        (gpu((7, 5)), shape(64), ("xformers", "sdpa")),  # Turing: "Unsupported CUDA architecture" in Sage
        (gpu((10, 0)), shape(64), ("xformers", "sdpa")),  # sm100 is not one Sage dispatches on
        (gpu((7, 5)), shape(64, dtype=torch.bfloat16), ("sdpa",)),  # xformers' bf16 needs sm80
        (gpu((5, 2)), shape(64), ("sdpa",)),  # older than xformers' sm60
        (gpu((12, 0)), shape(128, dtype=torch.bfloat16), ("sage", "xformers", "sdpa")),
        (gpu((12, 1)), shape(64), ("sage", "xformers", "sdpa")),  # sageattention 2.2 dispatches sm121 (GB10)
        (gpu((8, 6)), shape(64, causal=True), ("sage", "xformers", "sdpa")),
        (gpu((8, 6)), shape(64, 77, 80, causal=True), ("sdpa",)),  # causal kernels need q_len == kv_len
        (gpu((8, 6)), shape(64, masked=True), ("xformers", "sdpa")),  # Sage takes no mask
    ],
)
def test_rules(monkeypatch, probe, call, expected):
    FakeKernels(monkeypatch)
    assert AttentionDispatcher(probe=probe).plan(call, CPU) == expected


def test_rules_are_data_with_reasons():
    rule = attn.KERNEL_RULES["sage"]
    assert rule.refusal(shape(160), DeviceInfo("cuda", (9, 0))) == "head dim 160 is above its maximum 128"
    assert "sm75" in rule.refusal(shape(64), DeviceInfo("cuda", (7, 5)))
    assert rule.refusal(shape(64), DeviceInfo("cpu")) == "it runs on cuda only, not cpu"
    assert rule.refusal(shape(64), DeviceInfo("cuda", (8, 0))) is None


def test_real_environment_without_kernels_uses_sdpa(monkeypatch):
    monkeypatch.setitem(sys.modules, "sageattention", None)
    monkeypatch.setitem(sys.modules, "xformers.ops", None)
    d = AttentionDispatcher()  # the real probe: this machine's CPU
    q, k, v = qkv(8, 40, 16, dtype=torch.float32)
    with d.active():
        out = attn.attention(q, k, v, 8, layer="a")
    assert torch.allclose(out, reference(q, k, v, 8).float(), atol=1e-5)
    assert d.summary() == "sdpa 1"


# ---- numerics: every path agrees with the reference --------------------------------------------------------------


CASES = {
    "self": dict(n=24, m=24),
    "cross": dict(n=24, m=7),  # UNet cross-attention over 7 text tokens
    "causal": dict(n=12, m=12, causal=True),
    "bool mask": dict(n=12, m=10, mask=True),
    "bias + scale": dict(n=12, m=12, bias=True, scale=1.0),  # T5: unscaled logits plus a relative bias
}


@pytest.mark.parametrize("mode", ["sage", "xformers", "sdpa"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_backend_matches_reference(monkeypatch, mode, case, dtype):
    kernels = FakeKernels(monkeypatch)
    heads, head_dim = 4, 16  # heads != tokens and != head_dim, so a wrong axis cannot pass unnoticed
    kernels.heads = heads
    spec = CASES[case]
    q, k, v = qkv(heads, head_dim, spec["n"], spec["m"], dtype=dtype)
    g = torch.Generator().manual_seed(3)
    mask = bias = None
    if spec.get("mask"):
        mask = torch.rand(2, 1, spec["n"], spec["m"], generator=g) > 0.3
        mask[..., 0] = True  # every query sees at least one key
    if spec.get("bias"):
        bias = torch.randn(1, heads, spec["n"], spec["m"], generator=g)
    d = AttentionDispatcher(mode, probe=gpu((9, 0)))
    with d.active():
        out = attn.attention(q, k, v, heads, causal=spec.get("causal", False), mask=mask, bias=bias,
                             scale=spec.get("scale"), layer="x")
    want = reference(q, k, v, heads, causal=spec.get("causal", False),
                     mask=mask if bias is None else bias, scale=spec.get("scale"))
    assert out.shape == q.shape and out.dtype == dtype
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    assert torch.allclose(out.double(), want, atol=tol, rtol=tol)
    expected = mode
    if mode == "sage" and (mask is not None or bias is not None):
        expected = "sdpa"  # Sage takes no mask: the forced choice falls back
    assert d.layer_counts() == {expected: 1}
    assert kernels.used("sage") == (expected == "sage") and kernels.used("xformers") == (expected == "xformers")


def test_old_xformers_without_a_scale_argument(monkeypatch):
    kernels = FakeKernels(monkeypatch, sage=False)
    kernels.old_xformers = True
    d = AttentionDispatcher(probe=gpu())
    with d.active():
        attn.attention(*qkv(8, 40, 16), 8, layer="a")  # default scale: no argument passed
        attn.attention(*qkv(8, 40, 16), 8, scale=1.0, layer="b")  # T5's scale: the kernel refuses, sdpa runs
        attn.attention(*qkv(8, 40, 16), 8, layer="c")  # the same shape at the default scale still runs xformers
    assert d.summary() == "xformers 2 / sdpa 1" and len(d.notes) == 1 and "own scale" in d.notes[0]


def test_no_dispatcher_is_plain_sdpa(monkeypatch):
    kernels = FakeKernels(monkeypatch)
    q, k, v = qkv(8, 40, 20, 7, dtype=torch.float32)
    assert attn.current_dispatcher() is None
    out = attn.attention(q, k, v, 8)
    assert torch.allclose(out.double(), reference(q, k, v, 8), atol=1e-5)
    assert kernels.calls == []


# ---- fallback after a kernel error -------------------------------------------------------------------------------


def test_a_kernel_error_disables_that_shape_only(monkeypatch, caplog):
    kernels = FakeKernels(monkeypatch, xformers=False)
    kernels.fail["sage"] = lambda q: q.shape[1] == 64  # fails on 64 tokens, works on 16
    d = AttentionDispatcher(probe=gpu((8, 0)))
    big, small = qkv(8, 40, 64), qkv(8, 40, 16)
    with caplog.at_level(logging.WARNING, logger="core.accel.attention"), d.active():
        for _ in range(3):
            out_big = attn.attention(*big, 8, layer="big")
            attn.attention(*small, 8, layer="small")
    assert torch.allclose(out_big.double(), reference(*big, 8), atol=3e-3)  # SDPA answered
    assert kernels.used("sage") == 1 + 3  # the failing shape was tried once; the other shape every time
    assert d.layer_counts() == {"sage": 1, "sdpa": 1}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "sage failed" in warnings[0] and "64 x 64 tokens" in warnings[0] and "8 heads x 40" in warnings[0]
    assert d.notes == warnings


def test_a_kernel_error_message_reaches_the_warning_without_control_characters(monkeypatch):
    kernels = FakeKernels(monkeypatch, xformers=False)

    def hostile(q):
        raise RuntimeError("bad\x1b[2J\x1b]0;owned\x07 arch")

    kernels.fail["sage"] = hostile
    d = AttentionDispatcher(probe=gpu())
    with d.active():
        attn.attention(*qkv(8, 40, 16), 8)
    assert len(d.notes) == 1 and "\x1b" not in d.notes[0] and "\x07" not in d.notes[0] and "bad" in d.notes[0]


def test_a_sage_error_falls_to_xformers_for_that_shape(monkeypatch):
    kernels = FakeKernels(monkeypatch)
    kernels.fail["sage"] = lambda q: True
    d = AttentionDispatcher(probe=gpu((8, 0)))
    with d.active():
        attn.attention(*qkv(8, 40, 16), 8, layer=1)
        attn.attention(*qkv(8, 40, 16), 8, layer=1)
    assert kernels.used("sage") == 1 and kernels.used("xformers") == 2
    assert d.summary() == "xformers 1"


def test_fallbacks_belong_to_one_dispatcher(monkeypatch):
    kernels = FakeKernels(monkeypatch, xformers=False)
    kernels.fail["sage"] = lambda q: True
    first, second = AttentionDispatcher(probe=gpu()), AttentionDispatcher(probe=gpu())
    with first.active():
        attn.attention(*qkv(8, 40, 16), 8)
    kernels.fail.clear()
    with second.active():
        attn.attention(*qkv(8, 40, 16), 8)
    assert first.summary() == "sdpa 1" and second.summary() == "sage 1"


def test_out_of_memory_propagates_and_disables_nothing(monkeypatch):
    kernels = FakeKernels(monkeypatch, xformers=False)
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)

    def raise_oom(q):
        raise oom("CUDA out of memory. Tried to allocate 2.00 GiB")

    kernels.fail["sage"] = raise_oom
    d = AttentionDispatcher(probe=gpu())
    with d.active(), pytest.raises(oom):
        attn.attention(*qkv(8, 40, 16), 8)
    kernels.fail.clear()
    with d.active():
        attn.attention(*qkv(8, 40, 16), 8, layer="l")
    assert d.summary() == "sage 1" and d.notes == []


class _BrokenFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes ``import sageattention`` raise as a wrong-CUDA build does (an OSError from a missing .so)."""

    def find_spec(self, name, path=None, target=None):
        return importlib.machinery.ModuleSpec(name, self) if name == "sageattention" else None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise OSError("libcudart.so.12: cannot open shared object file")


def test_a_kernel_that_raises_at_import_is_skipped_with_one_warning(monkeypatch, caplog):
    kernels = FakeKernels(monkeypatch)
    monkeypatch.delitem(sys.modules, "sageattention")
    monkeypatch.setattr(sys, "meta_path", [_BrokenFinder(), *sys.meta_path])
    d = AttentionDispatcher(probe=gpu())
    with caplog.at_level(logging.WARNING, logger="core.accel.attention"), d.active():
        attn.attention(*qkv(8, 40, 16), 8, layer="a")
        attn.attention(*qkv(8, 40, 32), 8, layer="b")
    assert d.summary() == "xformers 2" and kernels.used("sage") == 0
    assert len(d.notes) == 1 and "sageattention is installed but failed to load" in d.notes[0]
    assert "libcudart" in d.notes[0]


# ---- forced choice -----------------------------------------------------------------------------------------------


def test_forced_sdpa_never_touches_a_kernel(monkeypatch):
    kernels = FakeKernels(monkeypatch)
    d = AttentionDispatcher("sdpa", probe=gpu())
    with d.active():
        for dim in (40, 80, 160):
            attn.attention(*qkv(8, dim, 16), 8, layer=dim)
    assert kernels.calls == [] and d.summary() == "sdpa 3 (forced sdpa)"


def test_forced_xformers_skips_sage(monkeypatch):
    kernels = FakeKernels(monkeypatch)
    d = AttentionDispatcher("xformers", probe=gpu())
    with d.active():
        attn.attention(*qkv(8, 40, 16), 8, layer="a")
    assert kernels.used("sage") == 0 and d.summary() == "xformers 1 (forced xformers)"


def test_forced_sage_that_cannot_run_a_shape_says_so_once(monkeypatch, caplog):
    kernels = FakeKernels(monkeypatch)
    d = AttentionDispatcher("sage", probe=gpu())
    with caplog.at_level(logging.WARNING, logger="core.accel.attention"), d.active():
        for _ in range(3):
            for dim in (40, 80, 160):
                attn.attention(*qkv(8, dim, 16), 8, layer=dim)
    assert kernels.used("xformers") == 0  # forced: only sage, then sdpa
    assert d.summary() == "sage 2 / sdpa 1 (forced sage)"
    assert len(d.notes) == 1 and "forced sage cannot run" in d.notes[0] and "head dim 160" in d.notes[0]
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_forced_backend_not_installed(monkeypatch):
    FakeKernels(monkeypatch, xformers=False)
    d = AttentionDispatcher("xformers", probe=gpu())
    with d.active():
        attn.attention(*qkv(8, 40, 16), 8, layer="a")
        attn.attention(*qkv(8, 40, 32), 8, layer="b")
    assert d.summary() == "sdpa 2 (forced xformers)"
    assert len(d.notes) == 1 and "xformers was asked for but xformers cannot be imported" in d.notes[0]


def test_unknown_mode_is_refused():
    with pytest.raises(AttentionModeError, match="valid: auto, sage, xformers, sdpa"):
        AttentionDispatcher("flash")


def test_mode_resolution_order():
    assert resolve_mode(None, {}) == "auto"
    assert resolve_mode(None, {"DARKROOM_ATTENTION": " SDPA "}) == "sdpa"
    assert resolve_mode("xformers", {"DARKROOM_ATTENTION": "sdpa"}) == "xformers"  # the command line wins
    with pytest.raises(AttentionModeError, match=r"\$DARKROOM_ATTENTION = 'fast' is not an attention backend"):
        resolve_mode(None, {"DARKROOM_ATTENTION": "fast"})


# ---- the per-layer record ----------------------------------------------------------------------------------------


def test_record_counts_layers_not_calls_and_resets_per_job(monkeypatch):
    """A tiny SD1.5 UNet at head dims 40 and 80, run for three steps: each attention layer counted once."""
    from core.models.unet import CrossAttention

    FakeKernels(monkeypatch)
    d = AttentionDispatcher(probe=gpu())
    layers = [CrossAttention(64, None, 8, 8).half(), CrossAttention(64, 32, 8, 8).half()]  # head dim 8
    x, ctx = torch.randn(1, 16, 64).half(), torch.randn(1, 7, 32).half()
    with d.active(new_job=True):
        for _step in range(3):
            layers[0](x)
            layers[1](x, ctx)
    assert d.summary() == "sage 2"
    with d.active(new_job=True):
        layers[0](x)
    assert d.summary() == "sage 1"
    d.reset_record()
    assert d.summary() == "auto"


def test_unet_layers_recorded(monkeypatch):
    from core.models.unet import UNetConfig, UNetModel

    kernels = FakeKernels(monkeypatch)
    cfg = UNetConfig.preset("sd15", "tiny")
    model = UNetModel(cfg)
    n_attention = sum(1 for m in model.modules() if type(m).__name__ == "CrossAttention")
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, cfg.in_channels, 8, 8, generator=g), torch.tensor([500.0])
    ctx = torch.randn(1, 7, cfg.context_dim, generator=g)
    d = AttentionDispatcher(probe=gpu())  # fp32 on a "GPU": xformers (Sage is fp16/bf16 only)
    with torch.no_grad():
        want = model(x, t, ctx)
        with d.active():
            got = model(x, t, ctx)
            model(x, t, ctx)
    assert d.summary() == f"xformers {n_attention}"
    assert kernels.used("xformers") == 2 * n_attention
    assert torch.allclose(got, want, atol=1e-5)


def test_summary_can_be_read_from_another_thread(monkeypatch):
    FakeKernels(monkeypatch)
    d = AttentionDispatcher(probe=gpu())
    seen: list[str] = []
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            seen.append(d.summary())

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        with d.active():
            for i in range(200):
                attn.attention(*qkv(2, 8, 4, batch=1), 2, layer=i)
    finally:
        stop.set()
        thread.join()
    assert d.summary() == "sage 200" and seen


def test_the_context_does_not_leak_into_other_threads(monkeypatch):
    FakeKernels(monkeypatch)
    d = AttentionDispatcher(probe=gpu())
    other: list[object] = []
    with d.active():
        thread = threading.Thread(target=lambda: other.append(attn.current_dispatcher()))
        thread.start()
        thread.join()
        assert attn.current_dispatcher() is d
    assert other == [None] and attn.current_dispatcher() is None


def test_compiled_networks_trace_attention_without_graph_breaks(monkeypatch):
    """torch.compile (item 4 of issue 13) must see one graph per network, not one break per attention layer:
    Dynamo cannot trace ContextVar.get, so inside a compiled region the call is plain SDPA."""
    import torch._dynamo as dynamo

    from core.models.unet import CrossAttention

    FakeKernels(monkeypatch)
    layer = CrossAttention(64, 32, 8, 8).eval()
    x, ctx = torch.randn(1, 16, 64), torch.randn(1, 7, 32)
    d = AttentionDispatcher(probe=gpu())
    dynamo.reset()
    try:
        with d.active(), torch.no_grad():
            explained = dynamo.explain(layer)(x, ctx)
            compiled = torch.compile(layer, backend="eager")(x, ctx)
    finally:
        dynamo.reset()
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    with torch.no_grad():
        assert torch.allclose(compiled, layer(x, ctx), atol=1e-6)


def test_traced_networks_record_sdpa_not_a_kernel_the_tracer_cannot_see(monkeypatch):
    """Stable-Fast compiles the denoiser with torch.jit.trace, which cannot see inside SageAttention's
    Triton/CUDA kernels or xformers' (their output would enter the trace as a constant, or as the buffer
    allocated for it): under tracing the call must be plain SDPA, as under torch.compile."""
    import warnings

    from core.models.unet import CrossAttention

    kernels = FakeKernels(monkeypatch)
    kernels.opaque = True
    layer = CrossAttention(64, 32, 8, 8).eval()
    x, ctx, later = torch.randn(1, 16, 64), torch.randn(1, 7, 32), torch.randn(1, 16, 64)
    d = AttentionDispatcher(probe=gpu())
    with d.active(), torch.no_grad():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            traced = torch.jit.trace(layer, (x, ctx), check_trace=False)
        assert kernels.calls == []  # the trace ran SDPA
        assert torch.allclose(traced(later, ctx), layer(later, ctx), atol=1e-5)  # eager: the (fake) kernel
    assert kernels.used("xformers") == 1


def test_the_compiling_probe_of_a_torch_without_torch_compiler_is_compiling():
    """torch.compiler.is_compiling arrived in torch 2.3: on 2.2 (what Darkroom declares) every attention call
    raised AttributeError; the probe falls back to torch._utils.is_compiling there."""
    import types

    old_torch_compiler = types.SimpleNamespace(compile=torch.compile)
    assert attn._compiling_probe(old_torch_compiler) is torch._utils.is_compiling
    assert attn._compiling_probe() is torch.compiler.is_compiling and attn._is_compiling() is False


def test_a_cpu_call_imports_no_gpu_kernel(monkeypatch):
    """xformers and sageattention come with the cuda extra; on a CPU (or a CPU-only box) no call can use them,
    so they are not imported (their import alone takes seconds and may print CUDA warnings)."""
    FakeKernels(monkeypatch)
    imported: list[str] = []

    def importer(name: str):
        imported.append(name)
        return sys.modules[name]

    d = AttentionDispatcher(probe=lambda device: DeviceInfo("cpu", None), importer=importer)
    q, k, v = qkv(8, 40, 16, dtype=torch.float32)
    torch.testing.assert_close(d(q, k, v, 8), reference(q, k, v, 8).float())
    assert d.plan(shape(40), CPU) == ("sdpa",) and imported == []
    forced = AttentionDispatcher("sage", probe=lambda device: DeviceInfo("cpu", None), importer=importer)
    assert forced.plan(CallShape("cpu", torch.float16, 8, 64, 64, 64), CPU) == ("sdpa",) and imported == []
    assert forced.notes == ["attention: forced sage cannot run cpu float16, 8 heads x 64, 64 x 64 tokens "
                            "(it runs on cuda only, not cpu); using sdpa there"]
    assert AttentionDispatcher(probe=gpu()).plan(shape(64), CPU)[0] == "sage"  # a GPU still gets them
