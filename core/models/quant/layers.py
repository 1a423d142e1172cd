"""Packed weights and the layers that dequantise them at forward time.

A network is built on the meta device with plain ``nn.Linear``/``nn.Conv2d``/``nn.Embedding`` layers, as for
any checkpoint. ``assign_weights`` then puts the file's tensors into it: a layer whose weight is packed (a GGUF
block quantisation, or fp8 storage) is swapped for a ``Quantized*`` twin that keeps the packed bytes as its
only copy of the weight and rebuilds the full weight in the input's dtype for the duration of one call
(``F.linear`` on a temporary, as ComfyUI-GGUF and ComfyUI's fp8 ``manual_cast`` do). Everything else (norms,
biases, the unquantised embedders GGUF files keep in F32/F16) is assigned as usual in the compute dtype.

fp8 weights are stored as their raw bytes (uint8) too, so ``module.to(dtype)`` (which casts every floating
tensor) cannot silently upcast them and undo the memory saving; the legacy ComfyUI ``scale_weight`` (and the
newer ``weight_scale``) scalar is kept as a Python float: ``W = w_fp8.to(dtype) * scale``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.models.quant.ggml import GGML_TYPES, SUPPORTED_GGUF_TYPES, dequantize, packed_nbytes

FP8_TYPES: dict[str, torch.dtype] = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_FP8_NAMES = {dtype: name for name, dtype in FP8_TYPES.items()}
PACKED_TYPES = frozenset(GGML_TYPES) | frozenset(FP8_TYPES)

# fp8 per-layer scale keys: legacy ComfyUI "scaled fp8" and the current ComfyUI / BFL names.
_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
# Static activation scales serve an fp8 matmul (torch._scaled_mm); the upcast path does not need them.
_IGNORED_SUFFIXES = (".scale_input", ".input_scale")
_FP8_FORMATS = {"float8_e4m3fn", "float8_e5m2"}


class QuantizedTensor:
    """A packed weight: raw bytes (uint8, file order), its type name and its logical torch-order shape.

    ``qtype`` is a GGML type name (``"Q4_K"``, ...) or ``"F8_E4M3"``/``"F8_E5M2"``; ``scale`` is the fp8
    per-tensor scale (None: 1). For GGUF data ``raw`` is usually ``(rows, bytes_per_row)``, the shape
    ``gguf.GGUFReader`` gives, which lets an embedding dequantise only the rows it looks up.
    """

    __slots__ = ("raw", "qtype", "shape", "scale")

    def __init__(
        self, raw: torch.Tensor, qtype: str, shape: Sequence[int], scale: float | None = None
    ) -> None:
        if qtype not in PACKED_TYPES:
            raise ValueError(f"unsupported weight type {qtype!r}; supported: {', '.join(sorted(PACKED_TYPES))}")
        shape = tuple(int(s) for s in shape)
        numel = math.prod(shape)
        if qtype in FP8_TYPES:
            expected = numel
        else:
            # Blocks run along the stored rows, which for a reshaped tensor (ComfyUI-GGUF's SD convs) are not
            # the logical shape's last axis: only the total has to be whole blocks.
            block = GGML_TYPES[qtype][1]
            if numel % block:
                raise ValueError(
                    f"a {qtype} tensor holds whole blocks of {block} values; shape {list(shape)} does not"
                )
            expected = packed_nbytes(qtype, numel)
        if raw.dtype != torch.uint8 or raw.numel() != expected:
            raise ValueError(
                f"{qtype} data of {raw.numel()} {str(raw.dtype).removeprefix('torch.')} elements cannot hold "
                f"shape {list(shape)} ({expected} bytes needed)"
            )
        self.raw, self.qtype, self.shape, self.scale = raw, qtype, shape, scale

    @classmethod
    def from_fp8(cls, weight: torch.Tensor, scale: float | None = None) -> QuantizedTensor:
        """Wrap an fp8 tensor (a view of the file is fine: no copy)."""
        return cls(weight.reshape(-1).view(torch.uint8), _FP8_NAMES[weight.dtype], weight.shape, scale)

    @property
    def nbytes(self) -> int:
        return self.raw.numel()

    @property
    def device(self) -> torch.device:
        return self.raw.device

    def to(self, device: torch.device | str) -> QuantizedTensor:
        return QuantizedTensor(self.raw.to(device), self.qtype, self.shape, self.scale)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The full weight in ``dtype`` on the packed data's device (a new tensor each call)."""
        return _decode(self.raw, self.qtype, self.shape, dtype, self.scale)

    def __repr__(self) -> str:
        return f"QuantizedTensor({self.qtype}, shape={list(self.shape)}, {self.nbytes} bytes, {self.device})"


def _decode(
    raw: torch.Tensor, qtype: str, shape: Sequence[int], dtype: torch.dtype, scale: float | None
) -> torch.Tensor:
    if qtype in FP8_TYPES:
        w = raw.reshape(shape).view(FP8_TYPES[qtype]).to(dtype)  # exact: fp8 values are all bf16/fp16 values
        return w if scale is None else w * scale
    return dequantize(raw, qtype, shape, dtype)


class _Packed(nn.Module):
    """Shared parts of the wrappers: the packed bytes as the buffer ``weight_raw`` (moves with ``.to()``, never
    cast by it) and ``weight``, a read-only property that dequantises (a full-size temporary: for inspection
    or tests, not for the hot path).

    ``weight_patch`` is how a LoRA reaches a packed weight (``core.lora.patch`` sets and clears it; the packed
    bytes never change): a callable that adds its delta in place to the weight dequantised for the call, so the
    layer computes with exactly the weight the dequantised layer with the LoRA merged would have."""

    weight_raw: torch.Tensor
    weight_patch: Callable[[torch.Tensor], None] | None = None

    def _init_packed(self, packed: QuantizedTensor, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        self.register_buffer("weight_raw", packed.raw)
        self.qtype = packed.qtype
        self.weight_shape = packed.shape
        self.weight_scale = packed.scale
        self.compute_dtype = dtype
        self.bias = None if bias is None else nn.Parameter(bias.to(dtype), requires_grad=False)

    def _apply(self, fn: Any, recurse: bool = True) -> nn.Module:
        # ``module.to(dtype)`` casts floating tensors only, so the packed bytes stay as they are; the dtype the
        # weight is rebuilt in (embeddings: their output dtype) follows the cast like any parameter would.
        super()._apply(fn, recurse)
        probe = fn(torch.empty(0, dtype=self.compute_dtype))
        if probe.is_floating_point():
            self.compute_dtype = probe.dtype
        return self

    @property
    def packed(self) -> QuantizedTensor:
        return QuantizedTensor(self.weight_raw, self.qtype, self.weight_shape, self.weight_scale)

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantized_weight(self.compute_dtype)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        weight = _decode(self.weight_raw, self.qtype, self.weight_shape, dtype, self.weight_scale)
        if self.weight_patch is not None:
            if weight.untyped_storage().data_ptr() == self.weight_raw.untyped_storage().data_ptr():
                weight = weight.clone()  # GGUF F32/F16/BF16 in their own dtype decode to a view of the bytes
            self.weight_patch(weight)
        return weight

    def _bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.qtype}, shape={list(self.weight_shape)}, bias={self.bias is not None}"


class QuantizedLinear(_Packed):
    """``nn.Linear`` with a packed weight, dequantised to the input's dtype on every call."""

    def __init__(
        self, packed: QuantizedTensor, bias: torch.Tensor | None = None, *, dtype: torch.dtype = torch.bfloat16
    ) -> None:
        super().__init__()
        if len(packed.shape) != 2:
            raise ValueError(f"a Linear weight is 2-D; got shape {list(packed.shape)}")
        self.out_features, self.in_features = packed.shape
        self._init_packed(packed, bias, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(x.dtype), self._bias(x.dtype))


class QuantizedConv2d(_Packed):
    """``nn.Conv2d`` with a packed weight; stride, padding, dilation and groups are taken from the layer it
    replaces."""

    def __init__(
        self,
        conv: nn.Conv2d,
        packed: QuantizedTensor,
        bias: torch.Tensor | None = None,
        *,
        dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups, self.padding_mode = conv.dilation, conv.groups, conv.padding_mode
        self._reversed_padding_repeated_twice = conv._reversed_padding_repeated_twice
        self._init_packed(packed, bias, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # nn.Conv2d's own padding-mode handling, with our temporary weight
        return nn.Conv2d._conv_forward(self, x, self.dequantized_weight(x.dtype), self._bias(x.dtype))  # type: ignore[arg-type]


class QuantizedEmbedding(_Packed):
    """``nn.Embedding`` with a packed table: only the looked-up rows are dequantised (each row is whole blocks,
    so a row's bytes decode on their own), in ``compute_dtype``."""

    def __init__(self, packed: QuantizedTensor, *, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        if len(packed.shape) != 2:
            raise ValueError(f"an Embedding weight is 2-D; got shape {list(packed.shape)}")
        self.num_embeddings, self.embedding_dim = packed.shape
        self._init_packed(packed, None, dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.weight_patch is not None:  # a LoRA on the table: the whole patched table, then the lookup
            return F.embedding(ids, self.dequantized_weight(self.compute_dtype))
        rows = self.weight_raw.reshape(self.num_embeddings, -1)[ids.reshape(-1)]
        shape = (rows.shape[0], self.embedding_dim)
        out = _decode(rows, self.qtype, shape, self.compute_dtype, self.weight_scale)
        return out.reshape(*ids.shape, self.embedding_dim)


# --------------------------------------------------------------------------------------------- assignment


def is_quant_aux_key(key: str) -> bool:
    """Keys of fp8 files that are not network tensors but consumed by ``assign_weights`` (scales, markers): a
    loader checking a file's keys against the network's skips these."""
    return (
        key == "scaled_fp8"
        or key.endswith((".scaled_fp8", ".comfy_quant"))
        or key.endswith(_SCALE_SUFFIXES)
        or key.endswith(_IGNORED_SUFFIXES)
    )


def _is_fp8(t: object) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype in _FP8_NAMES


def _comfy_quant_format(t: torch.Tensor) -> str:
    try:
        info = json.loads(bytes(t.reshape(-1).to(torch.uint8).tolist()).decode("utf-8"))
        return str(info.get("format", ""))
    except (ValueError, AttributeError):
        return "unreadable"


def assign_weights(
    module: nn.Module,
    tensors: Mapping[str, torch.Tensor | QuantizedTensor],
    *,
    dtype: torch.dtype,
    device: torch.device | str | None = None,
    strict: bool = True,
) -> list[str]:
    """Put ``tensors`` (names relative to ``module``) into ``module``, built on meta; returns the names of the
    layers swapped for packed twins.

    A ``QuantizedTensor`` or fp8 weight of an ``nn.Linear``/``nn.Conv2d``/``nn.Embedding`` stays packed (the
    layer is replaced; its bias is cast to ``dtype``); a packed tensor anywhere else (a norm gain, a raw
    parameter) and every plain floating tensor are converted to ``dtype``. fp8 scale keys
    (``<layer>.scale_weight``, ``<layer>.weight_scale``) are folded into their weight, and the ``scaled_fp8``
    marker and static input scales are dropped. Raises ``ValueError`` naming the key for anything that does not
    fit (``strict``: keys left over or missing); the loader turns that into a ``CheckpointError``.
    """
    target = torch.device(device) if device is not None else None
    scales: dict[str, float] = {}
    plain: dict[str, torch.Tensor] = {}
    packed: dict[str, QuantizedTensor | torch.Tensor] = {}
    for key, value in tensors.items():
        if key.endswith(_SCALE_SUFFIXES):
            if not isinstance(value, torch.Tensor) or value.numel() != 1:
                raise ValueError(f"fp8 scale {key!r} must be a single number (per-tensor scaling)")
            scales[key.rsplit(".", 1)[0]] = float(value.reshape(()).to(torch.float32))
        elif key == "scaled_fp8" or key.endswith(".scaled_fp8") or key.endswith(_IGNORED_SUFFIXES):
            continue
        elif key.endswith(".comfy_quant"):
            fmt = _comfy_quant_format(value)  # type: ignore[arg-type]
            if fmt not in _FP8_FORMATS:
                raise ValueError(
                    f"layer {key.removesuffix('.comfy_quant')!r} is quantised as {fmt!r}; supported: "
                    f"{', '.join(sorted(_FP8_FORMATS))} (and GGUF {', '.join(SUPPORTED_GGUF_TYPES)})"
                )
        elif isinstance(value, QuantizedTensor) or _is_fp8(value):
            packed[key] = value
        else:
            plain[key] = value

    for key in [k for k in packed if not k.endswith("weight")]:
        # a packed bias or gain (fp8 files rarely store them so) is an ordinary tensor: plain before any layer
        # is wrapped, so the wrapper finds its bias
        value = packed.pop(key)
        plain[key] = value.to(dtype) if isinstance(value, torch.Tensor) else value.dequantize(dtype)
    swapped: list[str] = []
    for key, value in packed.items():
        layer_name, _, leaf = key.rpartition(".")
        scale = scales.pop(layer_name, None)
        if isinstance(value, torch.Tensor):
            value = QuantizedTensor.from_fp8(value, scale)
        elif scale is not None:
            value = QuantizedTensor(value.raw, value.qtype, value.shape, scale)
        if target is not None:
            value = value.to(target)
        try:
            layer = module.get_submodule(layer_name) if layer_name else module
        except AttributeError:
            raise ValueError(f"key {key!r} is not part of the network") from None
        wrapped = _wrap(layer, value, plain, layer_name, dtype, target) if leaf == "weight" else None
        if wrapped is None:
            plain[key] = value.dequantize(dtype)  # not a layer we wrap: an ordinary tensor in the compute dtype
            continue
        _set_submodule(module, layer_name, wrapped)
        swapped.append(layer_name)
    if scales:
        raise ValueError(f"fp8 scale for {next(iter(scales))!r} has no fp8 weight beside it")

    for key, t in plain.items():
        if target is not None and t.device != target:
            t = t.to(target)  # move first, then convert on the device
        if t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        plain[key] = t
    result = module.load_state_dict(plain, strict=False, assign=True)
    if strict:
        if result.unexpected_keys:
            raise ValueError(f"key {result.unexpected_keys[0]!r} is not part of the network")
        filled = tuple(f"{name}." for name in swapped)  # the packed layers got their tensors already
        missing = [k for k in result.missing_keys if not k.startswith(filled)]
        if missing:
            raise ValueError(f"key {missing[0]!r} is missing ({len(missing)} keys missing)")
    return swapped


def _wrap(
    layer: nn.Module,
    value: QuantizedTensor,
    plain: dict[str, torch.Tensor],
    name: str,
    dtype: torch.dtype,
    device: torch.device | None,
) -> nn.Module | None:
    expected = tuple(layer.weight.shape) if isinstance(layer, (nn.Linear, nn.Conv2d, nn.Embedding)) else None
    if expected is None:
        return None
    if value.shape != expected:
        raise ValueError(f"key {name + '.weight'!r} has shape {list(value.shape)}, the network expects {list(expected)}")
    bias = plain.pop(f"{name}.bias" if name else "bias", None) if not isinstance(layer, nn.Embedding) else None
    if bias is not None and device is not None:
        bias = bias.to(device)
    if isinstance(layer, nn.Embedding) and not _rows_are_blocks(value):
        return None  # a lookup dequantises single rows, so they must be whole blocks
    if isinstance(layer, nn.Linear):
        return QuantizedLinear(value, bias, dtype=dtype)
    if isinstance(layer, nn.Conv2d):
        return QuantizedConv2d(layer, value, bias, dtype=dtype)
    return QuantizedEmbedding(value, dtype=dtype)


def _rows_are_blocks(value: QuantizedTensor) -> bool:
    return value.qtype in FP8_TYPES or value.shape[-1] % GGML_TYPES[value.qtype][1] == 0


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)  # works for ModuleList/Sequential children too (their names are "0", "1", ...)


# --------------------------------------------------------------------------------------------- reporting


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def module_bytes(module: nn.Module) -> int:
    """Bytes of memory the module's parameters and buffers hold (each storage region counted once; tensors on
    meta count 0). Packed weights count their packed size."""
    seen: set[tuple[str, int, int]] = set()
    total = 0
    for t in _tensors(module):
        if t.is_meta:
            continue
        key = (str(t.device), t.data_ptr(), t.numel() * t.element_size())
        if key in seen:
            continue
        seen.add(key)
        total += key[2]
    return total


_LABELS = {"F8_E4M3": "fp8", "F8_E5M2": "fp8_e5m2", "torch.bfloat16": "bf16", "torch.float16": "fp16",
           "torch.float32": "fp32", "torch.float64": "fp64"}


def quantization_label(module: nn.Module) -> str:
    """What most of the module's weights are stored as, for listings: ``"Q4_K"``, ``"fp8"``, ``"bf16"``, ..."""
    counts: dict[str, int] = {}
    packed_ids = set()
    for m in module.modules():
        if isinstance(m, _Packed):
            label = _LABELS.get(m.qtype, m.qtype)
            counts[label] = counts.get(label, 0) + math.prod(m.weight_shape)
            packed_ids.add(id(m.weight_raw))
    for t in _tensors(module):
        if id(t) in packed_ids or not t.is_floating_point():
            continue
        label = _LABELS.get(str(t.dtype), str(t.dtype))
        counts[label] = counts.get(label, 0) + t.numel()
    return max(counts, key=counts.__getitem__) if counts else "empty"


def packed_state(module: nn.Module) -> dict[str, Any]:
    """name -> ``QuantizedTensor`` of every packed layer (for tests and for LoRA code to find them)."""
    return {f"{name}.weight": m.packed for name, m in module.named_modules() if isinstance(m, _Packed)}
