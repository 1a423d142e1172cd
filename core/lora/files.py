"""Reading LoRA files into normalised modules and computing each module's weight delta.

Every format becomes ``LoraModule(name, kind, tensors, alpha)``: ``name`` is the LoRA's own module name
(looked up in the family's key map), ``kind`` one of lora | loha | lokr | full. The math is shared/reference
lora.md §1-2 (LyCORIS ``functional/{loha,lokr}.py``, A1111 ``network_*.py``), with PyTorch layout
``W[out, in, (kh, kw)]``; ``delta()`` returns ``alpha / r * ΔW`` in float32, shaped like the target weight,
and the caller multiplies by the user's weight (``W' = W + m * alpha / r * ΔW``).

Files are read through the checkpoint loader's sources: ``.safetensors`` memory-mapped (never written),
``.pt``/``.ckpt`` only through torch's weights-only unpickler, which runs no code from the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from core.lora import LoraError
from core.lora.detect import lora_family
from core.lora.names import group_keys, module_kind


@dataclass
class LoraModule:
    name: str
    kind: str  # lora | loha | lokr | full
    tensors: dict[str, torch.Tensor]  # part -> tensor (see core.lora.names)
    alpha: float | None = None
    keys: int = 0  # file keys that make up this module (for the unmatched-keys count)
    rs: bool = False  # rank-stabilised LoRA (PEFT use_rslora): scale alpha / sqrt(rank)
    # float32 (up [out, r], down [r, in*k]) per device: switching back to this LoRA converts nothing again
    _factors: dict = field(default_factory=dict, repr=False, compare=False)

    def factors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """A plain LoRA's factors as float32 matrices on ``device`` (cached)."""
        hit = self._factors.get(device)
        if hit is None:
            up, down = self.tensors["up"], self.tensors["down"]
            rank = down.shape[0]
            hit = self._factors[device] = (up.to(device=device, dtype=torch.float32).reshape(up.shape[0], -1),
                                           down.to(device=device, dtype=torch.float32).reshape(rank, -1))
        return hit

    def drop_factors(self, keep: set[torch.device]) -> None:
        """Forget the factors cached on every device but the CPU and ``keep``."""
        if self._factors:
            self._factors = {d: f for d, f in self._factors.items() if d.type == "cpu" or d in keep}

    @property
    def rank(self) -> int | None:
        t = self.tensors
        if self.kind == "lora":
            return t["down"].shape[0]
        if self.kind == "loha":
            return t["hada_w1_b"].shape[0]
        if self.kind == "lokr":
            if "lokr_w1_b" in t:
                return t["lokr_w1_b"].shape[0]
            if "lokr_w2_b" in t:
                return t["lokr_w2_b"].shape[0]
        return None

    @property
    def dora(self) -> str | None:
        """``dora_scale`` (kohya/LyCORIS) or ``magnitude`` (PEFT ``lora_magnitude_vector``) for a DoRA module."""
        return next((p for p in ("dora_scale", "magnitude") if p in self.tensors), None)

    @property
    def scale(self) -> float:
        """alpha / rank; 1 without an alpha (or alpha 0), and for LoKr with both factors full (lora.md §2.2)."""
        rank = self.rank
        if rank is None or not self.alpha:
            return 1.0
        return self.alpha / (math.sqrt(rank) if self.rs else rank)

    def delta(self, shape: torch.Size | tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
        """``scale * ΔW`` as float32 on ``device``, reshaped to ``shape`` (raises ValueError if it cannot be)."""
        t = {k: v.to(device=device, dtype=torch.float32) for k, v in self.tensors.items()}
        if self.kind == "lora":
            delta = _lora(t)
        elif self.kind == "loha":
            delta = _loha(t)
        elif self.kind == "lokr":
            delta = _lokr(t)
        else:
            delta = t["diff"]
        if delta.numel() != math.prod(shape):
            raise ValueError(f"its delta has shape {tuple(delta.shape)}, the layer's weight {tuple(shape)}")
        return delta.reshape(shape) * self.scale

    def add_to(self, weight: torch.Tensor, multiplier: float, start: torch.Tensor | None = None) -> None:
        """``weight += multiplier * delta`` in place (``weight``: a contiguous float32 tensor of the layer's
        shape), or ``weight = start + multiplier * delta`` when ``start`` is given. A plain LoRA is one
        ``addmm`` (no delta tensor, one pass over the weight)."""
        t = self.tensors
        if self.dora:
            if start is not None:
                weight.copy_(start)
            self._add_dora_to(weight, multiplier)
            return
        if self.kind == "lora" and "mid" not in t:
            up, down = t["up"], t["down"]
            out, rank = up.shape[0], down.shape[0]
            if up.numel() == out * rank and out * (down.numel() // rank) == weight.numel() and weight.shape[0] == out:
                up, down = self.factors(weight.device)
                if start is None:
                    weight.view(out, -1).addmm_(up, down, alpha=multiplier * self.scale)
                else:
                    torch.addmm(start.reshape(out, -1), up, down, alpha=multiplier * self.scale,
                                out=weight.view(out, -1))
                return
        delta = self.delta(weight.shape, weight.device)
        if start is not None:
            torch.add(start, delta, alpha=multiplier, out=weight)
        else:
            weight.add_(delta, alpha=multiplier)


    def _add_dora_to(self, weight: torch.Tensor, multiplier: float) -> None:
        """DoRA (lora.md §2.3), in place on ``weight`` (float32, the layer's shape).

        kohya / LyCORIS ``dora_scale``: ``V = W + scale * ΔW`` (the whole delta), ``ratio = dora_scale /
        (||V|| + eps)`` with the norm over every axis but the output one (``dora_scale [out, 1, ...]``) or
        the input one (``[1, in, ...]``), the user's weight applied to the ratio as ``m * (ratio - 1) + 1``,
        ``W' = V * ratio`` (LyCORIS ``apply_weight_decompose``). PEFT ``lora_magnitude_vector [out]``:
        ``V = W + m * scale * ΔW``, ``W' = magnitude * V / ||V||`` per output row (peft ``DoraLinearLayer``).
        """
        magnitude = self.tensors[self.dora].to(device=weight.device, dtype=torch.float32)
        peft = self.dora == "magnitude"
        weight.add_(self.delta(weight.shape, weight.device), alpha=multiplier if peft else 1.0)
        on_input = (not peft and magnitude.ndim >= 2 and magnitude.shape[0] == 1 and weight.shape[0] != 1
                    and magnitude.shape[1] == weight.shape[1])
        keep = 1 if on_input else 0
        dims = tuple(d for d in range(weight.ndim) if d != keep)
        norm = torch.linalg.vector_norm(weight, dim=dims, keepdim=True)
        if magnitude.numel() != norm.numel():
            raise ValueError(f"its DoRA magnitude has shape {tuple(magnitude.shape)}, the layer's weight "
                             f"{tuple(weight.shape)}")
        if peft:
            weight.mul_(magnitude.reshape(norm.shape) / norm)
            return
        ratio = magnitude.reshape(norm.shape) / (norm + torch.finfo(torch.float32).eps)
        if multiplier != 1:
            ratio = multiplier * (ratio - 1) + 1
        weight.mul_(ratio)


def _lora(t: dict[str, torch.Tensor]) -> torch.Tensor:
    up, down = t["up"], t["down"]
    out, rank = up.shape[0], down.shape[0]
    if "mid" in t:  # Tucker core (LoCon 3x3): ΔW[o,i,y,x] = Σ_ab up[o,a] mid[a,b,y,x] down[b,i]
        return torch.einsum("oa,abyx,bi->oiyx", up.reshape(out, rank), t["mid"], down.reshape(rank, -1))
    delta = up.reshape(out, -1) @ down.reshape(rank, -1)
    if down.ndim == 4:  # conv LoRA: down [r, in, kh, kw], up [out, r, 1, 1]
        delta = delta.reshape(out, *down.shape[1:])
    return delta


def _loha(t: dict[str, torch.Tensor]) -> torch.Tensor:
    if "hada_t1" in t:  # Tucker: w_a [r, out], w_b [r, in], t [r, r, kh, kw]
        r1 = torch.einsum("ij...,jr,ip->pr...", t["hada_t1"], t["hada_w1_b"], t["hada_w1_a"])
        r2 = torch.einsum("ij...,jr,ip->pr...", t["hada_t2"], t["hada_w2_b"], t["hada_w2_a"])
        return r1 * r2
    w1 = t["hada_w1_a"] @ t["hada_w1_b"].flatten(1)
    w2 = t["hada_w2_a"] @ t["hada_w2_b"].flatten(1)
    return w1 * w2


def _lokr(t: dict[str, torch.Tensor]) -> torch.Tensor:
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    elif "lokr_t2" in t:  # Tucker: w2_a [r, b], w2_b [r, d], t2 [r, r, kh, kw]
        w2 = torch.einsum("ij...,ip,jr->pr...", t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
    else:
        b = t["lokr_w2_b"]
        w2 = (t["lokr_w2_a"] @ b.flatten(1)).reshape(t["lokr_w2_a"].shape[0], *b.shape[1:])
    if w2.ndim == 4:  # conv: w1 [a, c] -> [a, c, 1, 1], kron -> [a*b, c*d, kh, kw]
        w1 = w1[:, :, None, None]
    return torch.kron(w1.contiguous(), w2.contiguous())


@dataclass
class LoraFile:
    """One LoRA file, parsed: its modules by name, the keys of no known format, its family and hash."""

    path: Path
    modules: dict[str, LoraModule]
    stray: list[str]
    family: str | None
    family_evidence: str
    sha256: str  # A1111's LoRA hash (see ``a1111_hash``)
    identity: tuple = ()  # (path, size, mtime_ns): which version of the file was read
    dora: list[str] = field(default_factory=list)  # modules with DoRA magnitudes

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def shorthash(self) -> str:
        return self.sha256[:12]

    @property
    def total_keys(self) -> int:
        return sum(m.keys for m in self.modules.values()) + len(self.stray)


def a1111_hash(path: Path, metadata: dict[str, str] | None, data_start: int | None) -> str:
    """A1111's LoRA hash (``network.py``/``hashes.py``, lora.md §4): the ``sshs_model_hash`` kohya stored in
    the metadata when there is one; else, for a .safetensors file, the SHA-256 of everything after the
    header (the tensor data: editing the metadata does not change it); for other files the whole file's."""
    if metadata and metadata.get("sshs_model_hash"):
        return metadata["sshs_model_hash"].lower()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if data_start is not None:
            f.seek(data_start)
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_lora(path: str | Path) -> LoraFile:
    """Parse a LoRA file (raises ``LoraError`` / ``CheckpointError`` naming the file)."""
    from core.models.checkpoint import SafetensorsSource, open_source

    path = Path(path)
    st = os.stat(path)
    source = open_source(path)
    try:
        grouped, stray = group_keys(source.shapes)
        modules: dict[str, LoraModule] = {}
        dora: list[str] = []
        for name, parts in grouped.items():
            kind = module_kind(parts)
            if kind is None:  # e.g. an ".alpha" without its factors
                stray.extend(parts.values())
                continue
            if "dora_scale" in parts or "magnitude" in parts:
                dora.append(name)
            tensors = {part: source.get(key) for part, key in parts.items() if part not in ("alpha",)}
            alpha = None
            if "alpha" in parts:
                value = source.get(parts["alpha"])
                if value.numel() != 1:
                    raise LoraError(f"{path}: key {parts['alpha']!r} should be one number (the LoRA alpha), "
                                    f"it has shape {tuple(value.shape)}")
                alpha = float(value.float().item())
            modules[name] = LoraModule(name, kind, tensors, alpha, keys=len(parts))
        family, evidence = lora_family(source.shapes)
        header = source.header if isinstance(source, SafetensorsSource) else None
        if header is not None:
            _apply_adapter_metadata(path, modules, header.metadata)
        digest = a1111_hash(path, header.metadata if header else None, header.data_start if header else None)
    finally:
        source.close()
    return LoraFile(path, modules, stray, family, evidence, digest, (str(path), st.st_size, st.st_mtime_ns), dora)


def _apply_adapter_metadata(path: Path, modules: dict[str, LoraModule], metadata: dict[str, str]) -> None:
    """PEFT files saved by diffusers (``save_lora_weights``) carry no ``.alpha`` keys: the adapter config is
    JSON in the ``lora_adapter_metadata`` metadata entry, its keys prefixed by component (``unet.lora_alpha``,
    ``text_encoder.use_rslora``, ``unet.alpha_pattern``), as diffusers reads it into peft's ``LoraConfig``."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return
    try:
        config = json.loads(raw)
    except ValueError:
        raise LoraError(f"{path}: its lora_adapter_metadata is not valid JSON") from None
    if not isinstance(config, dict):
        return
    for name, module in modules.items():
        if module.alpha is not None or "." not in name:
            continue
        component, _, rest = name.partition(".")
        alpha = config.get(f"{component}.lora_alpha")
        patterns = config.get(f"{component}.alpha_pattern") or {}
        if isinstance(patterns, dict):
            # peft matches a pattern against the end of the module name (or a regex); the plain-suffix case
            for pattern, value in patterns.items():
                key = str(pattern).lstrip("^")
                if rest == key or rest.endswith("." + key):
                    alpha = value
        if isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
            module.alpha = float(alpha)
            module.rs = bool(config.get(f"{component}.use_rslora", False))


class LoraFileCache:
    """Recently used LoRA files, parsed, keyed by path: switching back to a LoRA reads nothing again (unless
    the file changed: size or modification time)."""

    def __init__(self, max_entries: int = 16) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[str, LoraFile] = OrderedDict()
        self.reads = 0

    def get(self, path: str | Path) -> LoraFile:
        key = str(path)
        st = os.stat(path)
        hit = self._entries.get(key)
        if hit is not None and hit.identity[1:] == (st.st_size, st.st_mtime_ns):
            self._entries.move_to_end(key)
            return hit
        self.reads += 1
        lora = read_lora(path)
        self._entries[key] = lora
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return lora
