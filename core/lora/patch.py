"""Merging LoRAs into a loaded model's weights, and taking them out again bit for bit.

Merged weights run at full speed (no extra matmuls per step). Each touched weight is rebuilt from its
original: ``W' = cast(float32(W0) + Σ m * scale * ΔW)``, so the order of LoRAs and the history of switches
never matter, and the parameter's tensor is *replaced* (``param.data = W'``), never written into: our weights
may be views of a memory-mapped file. The original tensor is kept (the same object on the CPU, a CPU copy for
a GPU model) and put back when no LoRA touches the weight any more, so removing LoRAs restores every weight
exactly. Switching sets re-merges only the weights whose contributions changed; the model is never reloaded.
A merge buffer a switch takes off a weight is kept with what it holds (within the memory the current or the
previous set's merged weights take, ``_trim_spares``), so switching back to the previous set puts those
tensors back without computing anything; a new set reuses the oldest kept buffers of the same shapes.
A merge is made where the weight is (the GPU while the memory plan keeps the network there, else the CPU), in
the weight's own memory format; when the plan's ``Placement`` moves a network home, ``follow`` lets go of the
buffers and LoRA factors kept on the device for it.

fp8 and GGUF weights (the packed layers of ``core.models.quant``, which dequantise per call) take the LoRA at
forward time instead (``ForwardDelta``): the layer's ``weight_patch`` merges the same contributions into the
weight it dequantises for each call (``merge_into``, as a merge into the dequantised weight would), so the layer
computes with the merged weight; removing the set clears the hook (the packed bytes are never written). Both
kinds go through the same ``apply``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from core.lora import LoraError
from core.lora.check import nothing_matched, unmatched_warning
from core.lora.detect import family_mismatch
from core.lora.files import LoraFile, LoraFileCache, LoraModule
from core.lora.keymap import Target, weight_modules
from core.lora.tags import LoraRef
from core.models.family import ModelFamily, resolve

log = logging.getLogger(__name__)

_FP8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
             if hasattr(torch, n))


@dataclass(frozen=True)
class ActiveLora:
    """A LoRA file in use with the multipliers a request gave it."""

    file: LoraFile
    ref: LoraRef


@dataclass
class LoraReport:
    """What applying one LoRA did: modules merged, keys that matched no layer (skipped, warned about)."""

    lora: ActiveLora
    matched: int = 0
    unmatched_keys: int = 0
    unmatched_examples: list[str] = field(default_factory=list)

    def warning(self, model_label: str) -> str | None:
        if not self.unmatched_keys:
            return None
        return unmatched_warning(self.lora.ref.name, self.unmatched_keys, self.lora.file.total_keys,
                                 self.unmatched_examples, model_label)


class _Misfit(Exception):
    """(lora, module, ValueError): a contribution whose delta does not fit the weight."""


def merge_into(buffer: torch.Tensor, base: torch.Tensor, contributions: list) -> None:
    """``buffer = cast(float32(base) + Σ m * scale * ΔW)`` (``buffer`` may be ``base`` itself: in place).

    Float32 weights are computed straight into the buffer (several plain LoRAs in row blocks, one pass);
    plain LoRAs on 16-bit weights in row blocks through float32; anything else (LoHa, LoKr, full diffs, DoRA,
    row ranges of a fused layer) through a float32 copy. Raises ``_Misfit`` for a delta that does not fit."""
    single = base.dtype == torch.float32 and len(contributions) == 1
    if not single and _blockwise(contributions):
        try:
            _merge_rows(buffer, base, contributions)
        except ValueError as exc:
            raise _Misfit(*contributions[0][:2], exc) from None
        return
    if base.dtype == torch.float32 and buffer.is_contiguous():
        merged, start = buffer, base
    else:  # 16-bit, or a channels_last buffer: the row arithmetic below needs a contiguous float32 weight
        merged, start = base.to(torch.float32, memory_format=torch.contiguous_format, copy=True), None
    for lora, module, multiplier, target in contributions:
        try:
            plain = target.rows is None and not target.swap_halves
            if start is not None and plain:
                module.add_to(merged, multiplier, start=start)  # merged = start + delta, one pass
            else:
                if start is not None and start is not merged:
                    merged.copy_(start)
                _add_to_part(module, merged, multiplier, target)
            start = None
        except ValueError as exc:
            raise _Misfit(lora, module, exc) from None
    if merged is not buffer:
        buffer.copy_(merged)


class ForwardDelta:
    """The LoRA contributions of one packed (fp8/GGUF) layer, added in place to its dequantised weight on every
    call (``_Packed.weight_patch``) by ``merge_into``, as a merge into the dequantised weight would add them:
    the layer computes with the weight of the dequantised model with the LoRAs merged, bit for bit.

    Why on the weight and not as ``x @ down.T @ up.T`` beside the layer: the weight is dequantised into a
    temporary on every call anyway, so the delta is one ``addmm`` into it, ``out * in * r`` multiply-adds, and
    the result is the merged weight exactly (split q/k/v rows, swapped halves, LoHa/LoKr/full deltas and DoRA
    come for free). The side path costs ``tokens * (in + out) * r``, more once ``tokens > out * in / (in + out)``
    (1536 for Flux's 3072-wide layers, which see 4096 + 512 tokens at 1024 px, twice that with CFG), does not
    reproduce the merge's rounding and cannot express DoRA."""

    __slots__ = ("contributions",)

    def __init__(self, contributions: list) -> None:
        self.contributions = contributions

    def __call__(self, weight: torch.Tensor) -> None:
        merge_into(weight, weight, self.contributions)


def _may_allocate(like: torch.Tensor) -> bool:
    """Whether a switch may take new memory for a merge buffer to keep the previous one: on the CPU yes (the
    kept buffers stay within the merged weights' size, ``_trim_spares``); on a GPU while a quarter of its
    memory stays free after it, so keeping merges never crowds out the activations."""
    if like.device.type != "cuda":
        return True
    free, total = torch.cuda.mem_get_info(like.device)
    return free - like.nbytes > total // 4


def _layout(t: torch.Tensor) -> tuple:
    """What a kept merge buffer must share with a weight to take its merge: shape, strides (memory format),
    dtype and device."""
    return tuple(t.shape), t.stride(), t.dtype, t.device


def _on(where: torch.device, device: torch.device) -> bool:
    """``where`` (a tensor's device) is ``device``, which may name no index (``--device cuda``)."""
    device = torch.device(device)
    return where.type == device.type and (device.index is None or where.index == device.index)


def _needs_forward_time(weight: torch.Tensor) -> bool:
    """Quantised weights (fp8, GGUF tensor subclasses) cannot take a merged float delta."""
    return weight.dtype in _FP8 or type(weight) not in (torch.Tensor, nn.Parameter)


_BLOCK_ELEMENTS = 1 << 20  # float32 rows per block of a 16-bit merge: 4 MB, stays in cache


def _blockwise(contributions: list) -> bool:
    """Every contribution is a plain LoRA (up @ down) on the whole weight: mergeable in row blocks."""
    return all(module.kind == "lora" and "mid" not in module.tensors and not module.dora and target.rows is None
               and not target.swap_halves for _, module, _, target in contributions)


def _merge_rows(buffer: torch.Tensor, base: torch.Tensor, contributions: list) -> None:
    """``buffer = cast(float32(base) + Σ m * scale * up @ down)`` a block of rows at a time: for 16-bit weights
    without a weight-sized float32 temporary, and for several LoRAs on one weight in one pass over memory (each
    block takes every LoRA while it is in cache, instead of one pass over the whole weight per LoRA)."""
    out = base.shape[0]
    # a channels_last conv weight (UNets on CUDA) is not a [out, in*k*k] view: its rows are copied a block at a
    # time, and its merged rows written back through its own strides, so the merge keeps its memory format
    flat = buffer.view(out, -1) if buffer.is_contiguous() else None
    factors = []
    for _, module, multiplier, _ in contributions:
        up, down = module.tensors["up"], module.tensors["down"]
        rank = down.shape[0]
        if up.shape[0] != out or up.numel() != out * rank or down.numel() // rank != base[0].numel():
            raise ValueError(f"its delta is [{up.shape[0]}, {down.numel() // rank}], the layer's weight "
                             f"{tuple(base.shape)}")
        factors.append((*module.factors(base.device), multiplier * module.scale))
    rows = max(1, _BLOCK_ELEMENTS // max(1, base[0].numel()))
    for start in range(0, out, rows):
        stop = min(out, start + rows)
        base_rows = base[start:stop].reshape(stop - start, -1)  # a view of a contiguous weight
        if base.dtype == torch.float32:  # straight into the buffer: base + the first LoRA, then the others
            (up, down, alpha), rest = factors[0], factors[1:]
            block = torch.addmm(base_rows, up[start:stop], down, alpha=alpha,
                                out=flat[start:stop] if flat is not None else None)
        else:
            block, rest = base_rows.float(), factors
        for up, down, alpha in rest:
            block.addmm_(up[start:stop], down, alpha=alpha)
        rows_out = buffer[start:stop]
        if flat is None or block.data_ptr() != rows_out.data_ptr():
            rows_out.copy_(block.view(rows_out.shape))


def _add_to_part(module: LoraModule, weight: torch.Tensor, multiplier: float, target: Target) -> None:
    """``weight`` rows ``target.rows`` (blocks of the input width) += the module's delta, its two halves
    exchanged when ``target.swap_halves``."""
    if target.rows is not None:
        width = weight.shape[1]
        start, stop = target.rows
        weight = weight[start * width : None if stop is None else stop * width]
    if not target.swap_halves:
        module.add_to(weight, multiplier)
        return
    if module.dora:
        raise ValueError("a DoRA magnitude on a layer stored in another row order is not supported")
    delta = module.delta(weight.shape, weight.device)
    half = weight.shape[0] // 2
    weight[:half].add_(delta[half:], alpha=multiplier)
    weight[half:].add_(delta[:half], alpha=multiplier)


class LoraPatcher:
    """The LoRA state of one loaded model's networks (role -> module)."""

    def __init__(self, components: Mapping[str, nn.Module], family: ModelFamily) -> None:
        self.components = components
        self.family = family
        self._table: dict[str, Target] | None = None
        self._originals: dict[tuple[str, str], torch.Tensor] = {}  # (role, parameter) -> original tensor
        self._merged: dict[tuple[str, str], tuple] = {}  # (role, parameter) -> signature of what is merged in
        # merge buffers taken off their weights, by _layout (shape, strides, dtype, device), each under (weight,
        # signature of what it holds), oldest first: a switch back to that merge puts it back as it is; a new merge
        # writes into the oldest instead of allocating (fresh memory costs a page fault per 4 KiB, more than the
        # merge itself)
        self._spares: dict[tuple, OrderedDict[tuple, torch.Tensor]] = {}
        self._retired: set[int] = set()  # ids of the buffers taken off in this apply: not reused by it
        self._merged_bytes = 0  # what the merged weights took after the last apply
        self._params: dict[tuple[str, str], tuple[dict, str]] = {}  # (role, parameter) -> its owner's slot
        self._layers: dict[tuple[str, str], nn.Module | None] = {}  # (role, parameter) -> its packed layer, if any
        self._hooked: set[tuple[str, str]] = set()  # packed weights with a ForwardDelta attached
        self.active: tuple[ActiveLora, ...] = ()
        self.requested: tuple[LoraRef, ...] = ()  # the refs of the request these LoRAs came from
        self.text_signature: tuple = ()  # what changes prompt encodings: LoRAs merged into text encoders

    @property
    def table(self) -> dict[str, Target]:
        if self._table is None:
            if not self.family.lora_keys:
                raise LoraError(f"LoRAs are not supported for {self.family.label} models yet")
            from core.models.quant.layers import packed_state

            # packed (fp8/GGUF) layers hold no weight parameter but are layers a LoRA targets all the same
            modules = {role: weight_modules([*dict(m.named_parameters()), *packed_state(m)])
                       for role, m in self.components.items()}
            self._table = resolve(self.family.lora_keys)(modules)
        return self._table

    @property
    def merged_weights(self) -> int:
        return len(self._merged)

    def forward_bytes(self) -> dict[str, int]:
        """Device memory the LoRAs add to each network (role -> bytes) while it runs. A merged weight adds
        nothing (the merge takes the original's place, same shape and dtype); a packed (fp8/GGUF) layer's
        ``ForwardDelta`` needs its modules' tensors as float32 on the layer's device (a plain LoRA's factors stay
        cached there, ``_drop_factors``), and, for kinds merged through a whole float32 weight (LoHa, LoKr, full
        diffs, DoRA, row ranges), that copy and the delta during a call: the largest such layer counts."""
        tensors: dict[str, dict[int, int]] = {}
        working: dict[str, int] = {}
        for key in self._hooked:
            role, layer = key[0], self._packed(key)
            contributions = layer.weight_patch.contributions  # type: ignore[union-attr]
            for _, module, _, _ in contributions:
                tensors.setdefault(role, {})[id(module)] = 4 * sum(t.numel() for t in module.tensors.values())
            if not _blockwise(contributions):
                whole = 2 * 4 * int(torch.Size(layer.weight_shape).numel())  # type: ignore[union-attr]
                working[role] = max(working.get(role, 0), whole)
        return {role: sum(tensors[role].values()) + working.get(role, 0) for role in tensors}

    def _plan(self, loras: Sequence[ActiveLora]) -> tuple[dict[tuple[str, str], list], list[LoraReport]]:
        plan: dict[tuple[str, str], list] = {}
        reports = []
        table = self.table if loras else {}
        for lora in loras:
            report = LoraReport(lora)
            for name, module in lora.file.modules.items():
                target = table.get(name)
                if target is None:
                    report.unmatched_keys += module.keys
                    report.unmatched_examples.append(name)
                    continue
                multiplier = lora.ref.te if target.role.startswith("text_encoder") else lora.ref.unet
                report.matched += 1
                if multiplier == 0:
                    continue
                plan.setdefault((target.role, target.weight), []).append((lora, module, multiplier, target))
            report.unmatched_keys += len(lora.file.stray)
            report.unmatched_examples.extend(lora.file.stray[:2])
            if report.matched == 0:
                example = (report.unmatched_examples or [""])[0]
                raise nothing_matched(lora.file.path, lora.ref.name, lora.file.total_keys, example, self.family.label)
            reports.append(report)
        for contributions in plan.values():  # a fixed order: the same set gives the same bits, however listed
            contributions.sort(key=lambda c: (c[0].file.identity, c[1].name, c[2]))
        return plan, reports

    @staticmethod
    def _signature(contributions: list) -> tuple:
        return tuple((lora.file.identity, module.name, multiplier, target.rows, target.swap_halves)
                     for lora, module, multiplier, target in contributions)

    def apply(self, loras: Sequence[ActiveLora], requested: Sequence[LoraRef] = ()) -> list[LoraReport]:
        """Make ``loras`` the merged set (empty: remove all). Returns one report per LoRA."""
        plan, reports = self._plan(loras)
        wanted = {key: self._signature(c) for key, c in plan.items()}
        previous = self.active
        self.follow()  # kept buffers on a device their weight has left are of no use to this switch
        try:
            for key in list(self._merged):
                if key not in wanted:
                    self._restore(key)
            for key, contributions in plan.items():
                if self._merged.get(key) != wanted[key]:
                    self._merge(key, contributions, wanted[key])
                    self._merged[key] = wanted[key]
        except BaseException:
            for key in [*self._originals, *self._hooked]:  # half a set is no set: back to the plain model
                self._restore(key)
            self._spares.clear()
            self.active, self.requested, self.text_signature = (), (), ()
            raise
        finally:
            self._retired.clear()
            self._drop_factors((*previous, *loras))
        self._trim_spares()
        self.active = tuple(loras)
        self.requested = tuple(requested)
        self.text_signature = tuple(sorted(
            (key, sig) for key, sig in wanted.items() if key[0].startswith("text_encoder")
        ))
        return reports

    def remove_all(self) -> None:
        self.apply(())

    def follow(self) -> None:
        """Let go of what this patcher holds on a device its weights have left: the memory plan's ``Placement``
        calls it when it moves a network home (model or sequential offload), so an offloaded network leaves no
        LoRA memory on the GPU. Kept merge buffers of a weight that lives elsewhere now are dropped (they would
        never be reused there; a switch back merges again where the weight is), and so are the LoRA factors
        cached on a device no packed layer that adds them is on any more."""
        for layout, group in self._spares.items():
            for tag in [t for t in group if self._parameter(t[0]).device != layout[3]]:
                del group[tag]
        self._spares = {k: v for k, v in self._spares.items() if v}
        self._drop_factors(self.active)

    def spare_bytes(self, device: torch.device) -> int:
        """Bytes of the merge buffers kept (for a switch back) on ``device`` (``cuda``: any CUDA device)."""
        return sum(t.nbytes for layout, group in self._spares.items() if _on(layout[3], device)
                   for t in group.values())

    def drop_spares(self, device: torch.device) -> None:
        """Let go of the merge buffers kept on ``device`` (the memory plan wants the room)."""
        self._spares = {layout: group for layout, group in self._spares.items() if not _on(layout[3], device)}

    def _drop_factors(self, loras: Sequence[ActiveLora]) -> None:
        """The device copies of ``loras``' factors (``LoraModule.factors``) are kept only on the device of a
        packed layer that adds them at forward time; a merged weight needed them only while merging (kept, a
        GPU's would stay for as long as the file is in the cache, LoRA or not). The CPU's are kept: RAM, and
        a switch back merging on the CPU converts nothing again."""
        needed: dict[int, set[torch.device]] = {}
        for key in self._hooked:
            layer = self._packed(key)
            for _, module, _, _ in layer.weight_patch.contributions:  # type: ignore[union-attr]
                needed.setdefault(id(module), set()).add(layer.weight_raw.device)  # type: ignore[union-attr]
        for file in {id(a.file): a.file for a in loras}.values():
            for module in file.modules.values():
                module.drop_factors(needed.get(id(module), set()))

    def _trim_spares(self) -> None:
        """Kept buffers take at most as much memory as the weights merged now or, if more, by the set before
        (so that set comes back whole), and none once no LoRA is merged; the oldest go first."""
        merged = sum(self._parameter(key).data.nbytes for key in self._originals)
        budget, self._merged_bytes = (max(merged, self._merged_bytes) if merged else 0), merged
        held = sum(t.nbytes for group in self._spares.values() for t in group.values())
        for group in self._spares.values():
            while group and held > budget:
                held -= group.popitem(last=False)[1].nbytes
        self._spares = {k: v for k, v in self._spares.items() if v}

    def _retire(self, key: tuple[str, str], tensor: torch.Tensor) -> None:
        """Keep a merge buffer taken off ``key`` with the signature of what it holds."""
        group = self._spares.setdefault(_layout(tensor), OrderedDict())
        group[(key, self._merged.get(key))] = tensor
        self._retired.add(id(tensor))

    def _buffer(self, base: torch.Tensor) -> torch.Tensor:
        """The oldest kept buffer of ``base``'s shape not taken off in this switch (those may be wanted back by
        the next one), else a new tensor."""
        group = self._spares.get(_layout(base))
        for tag, tensor in (group or {}).items():
            if id(tensor) not in self._retired or not _may_allocate(base):
                return group.pop(tag)  # type: ignore[union-attr]
        # in the weight's own memory format: a channels_last conv weight merged into a contiguous buffer would
        # cost every forward a layout conversion
        return torch.empty_like(base, memory_format=torch.preserve_format)

    def _parameter(self, key: tuple[str, str]) -> nn.Parameter:
        # The owner's slot is looked up once, not per switch, and read each time: merging replaces a Parameter's
        # .data, but the memory plan's Placement (core.accel.memory) puts another Parameter object in the slot
        # when it moves the network to the GPU and back, and a merge must reach the one the network runs with.
        slot = self._params.get(key)
        if slot is None:
            role, name = key
            try:
                self.components[role].get_parameter(name)
            except AttributeError:
                raise LoraError(f"{role} has no weight {name!r} a LoRA can patch") from None
            path, _, leaf = name.rpartition(".")
            slot = self._params[key] = (self.components[role].get_submodule(path)._parameters, leaf)
        slots, leaf = slot
        return slots[leaf]

    def _packed(self, key: tuple[str, str]) -> nn.Module | None:
        """The packed (fp8/GGUF) layer whose weight ``key`` is, or None for an ordinary parameter."""
        if key not in self._layers:
            from core.models.quant.layers import _Packed

            role, name = key
            module_name, _, leaf = name.rpartition(".")
            try:
                layer = self.components[role].get_submodule(module_name)
            except AttributeError:
                layer = None
            self._layers[key] = layer if leaf == "weight" and isinstance(layer, _Packed) else None
        return self._layers[key]

    def _hook(self, key: tuple[str, str], layer: nn.Module, contributions: list) -> None:
        """Attach the contributions to a packed layer, checked against its shape first on the meta device (no
        memory, no arithmetic), so a LoRA that does not fit fails here, not in the middle of a job."""
        probe = torch.empty(layer.weight_shape, dtype=torch.float32, device="meta")
        for lora, module, multiplier, target in contributions:
            try:
                _add_to_part(module, probe, multiplier, target)
            except (ValueError, RuntimeError) as exc:  # a meta tensor's shape errors are RuntimeErrors
                raise LoraError(
                    f"{lora.file.path}: LoRA {lora.ref.name!r} module {module.name!r} does not fit the model's "
                    f"{key[1]!r} ({exc}); the LoRA was made for another model"
                ) from None
        layer.weight_patch = ForwardDelta(list(contributions))
        self._hooked.add(key)

    def _original(self, key: tuple[str, str], param: nn.Parameter) -> torch.Tensor:
        kept = self._originals.get(key)
        if kept is None:
            return param.data
        return kept if kept.device == param.device else kept.to(param.device)

    def _merge(self, key: tuple[str, str], contributions: list, signature: tuple = ()) -> None:
        layer = self._packed(key)
        if layer is not None:
            self._hook(key, layer, contributions)
            return
        param = self._parameter(key)
        current = param.data
        group = self._spares.get(_layout(current))
        kept = group.pop((key, signature), None) if group and signature else None
        if kept is not None:  # this very merge, kept from an earlier set: the same bits, nothing to compute
            if key in self._originals:
                self._retire(key, current)  # the merge it replaces is kept in turn
            else:
                self._keep_original(key, current)
            param.data = kept
            return
        base = self._original(key, param)
        if _needs_forward_time(base):  # packed storage outside a layer we wrap: nothing dequantises it per call
            raise LoraError(
                f"{key[0]} weight {key[1]!r} is {str(base.dtype).removeprefix('torch.')} outside a packed layer: "
                "a LoRA cannot be merged into it; use a float16/bfloat16 model"
            )
        if key in self._originals:  # the weight holds a merge of ours: kept, a switch back may want it
            self._retire(key, current)
        buffer = self._buffer(base)  # a kept buffer or a new tensor takes the merge
        try:
            merge_into(buffer, base, contributions)
        except _Misfit as misfit:
            lora, module, exc = misfit.args
            raise LoraError(
                f"{lora.file.path}: LoRA {lora.ref.name!r} module {module.name!r} does not fit the model's "
                f"{key[1]!r} ({exc}); the LoRA was made for another model"
            ) from None
        self._keep_original(key, base)
        param.data = buffer

    def _keep_original(self, key: tuple[str, str], base: torch.Tensor) -> None:
        if key not in self._originals:
            # The same tensor object on the CPU (a mmap view stays a view, never written); a CPU copy on a GPU,
            # pinned so putting it back is one fast transfer, with the weight's strides (channels_last stays so).
            if base.device.type == "cpu":
                self._originals[key] = base
            else:
                kept = torch.empty_strided(base.shape, base.stride(), dtype=base.dtype,
                                           pin_memory=torch.cuda.is_available())
                self._originals[key] = kept.copy_(base)

    def _restore(self, key: tuple[str, str]) -> None:
        if key in self._hooked:
            self._packed(key).weight_patch = None  # type: ignore[union-attr]
            self._hooked.discard(key)
            self._merged.pop(key, None)
            return
        param = self._parameter(key)
        if key in self._originals:
            self._retire(key, param.data)
        param.data = self._original(key, param)
        self._originals.pop(key, None)
        self._merged.pop(key, None)


def activate(
    patcher: LoraPatcher,
    refs: Sequence[LoraRef],
    find: Callable[[str], Path],
    cache: LoraFileCache,
    *,
    model: str = "the model",
) -> list[str]:
    """Resolve ``refs`` (``find``: name -> file, e.g. ``ModelRegistry.find_lora``), read them (cached) and
    merge them into the model in place of the current set. Returns the warnings: at most one, counting
    each LoRA's keys that matched no layer."""
    refs = tuple(refs)
    if refs == patcher.requested and all(
        a.file is cache.get(a.file.path) for a in patcher.active
    ):
        return []
    actives = []
    for ref in refs:
        path = find(ref.name)
        lora = cache.get(path)
        error = family_mismatch(lora.family, lora.family_evidence, patcher.family.name, ref.name, path, model)
        if error is not None:
            raise error
        actives.append(ActiveLora(lora, ref))
    reports = patcher.apply(actives, refs)
    # A LoRA written twice (``<lora:x:0.5> ... <lora:x:0.5>``) is merged twice, as A1111 adds it twice, but its
    # unmatched keys are the same keys: said once per file.
    said: set[Path] = set()
    parts = []
    for report in reports:
        if report.lora.file.path not in said and (w := report.warning(patcher.family.label)):
            parts.append(w)
        said.add(report.lora.file.path)
    if not parts:
        return []
    warning = "; ".join(parts)  # one warning for the set, each LoRA's count in it
    log.warning("%s", warning)
    return [warning]
