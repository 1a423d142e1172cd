"""Precision and memory policy: what runs where, in which dtype, and what a job will need.

One place decides, per job, from an estimate of the job's memory against what the device has free:

- **precision** (``core.accel.device.compute_dtype``: bf16 on GPUs with native bf16, else fp16; on the CPU bf16
  with AMX, else fp32),
  the VAE's dtype (:func:`vae_dtype`) and whether the denoiser's convolutions use channels_last
  (:func:`use_channels_last`);
- **an estimate** (:func:`estimate_job`): the bytes of every network the job uses (``module_bytes``) plus the
  activations of each stage at the job's size and batch, by a per-family formula (see ``_ACTIVATION``);
- **a plan** (:func:`choose_plan`): everything resident, model offload (each network on the GPU only while it
  runs) or sequential offload (the denoiser's blocks one at a time), and a tiled VAE when the decode would not
  fit; chosen from the estimate, or forced (``core.accel.memory_mode``: ``--lowvram``, ``$DARKROOM_MEMORY``);
- **placement** (:class:`Placement`): moves the networks as the plan says; text encoders leave the GPU after
  encoding in every plan;
- **out of memory** (:func:`is_out_of_memory`, :func:`free_cached`, :func:`what_would_fit`): the runner frees
  memory, retries once with the next plan, and otherwise fails the job with what would fit.

Nothing here needs a GPU to be tested: the free memory is an argument, and placement moves tensors with
``Tensor.to(device)``, which a test points at the ``meta`` device.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from core.models.quant.layers import module_bytes

GiB = 2**30
OFFLOADS = ("none", "model", "sequential")  # least VRAM last
TEXT_PREFIX = "text_encoder"  # the text encoders' roles: text_encoder, text_encoder_2, ...
# Allocator slack (fragmentation, cuDNN/cuBLAS workspaces): an estimate must leave this much of the free
# memory unused to count as fitting. Not calibrated (the CPU has no such allocator): 10 % and 384 MiB is what
# the caching allocator's fragmentation ran to in published SD/SDXL memory reports.
SAFETY_FACTOR = 1.10
SAFETY_BYTES = 384 * 2**20
VAE_TILES = (64, 48, 32, 24, 16, 8)  # latent tile sizes tried for a tiled VAE, largest first


# ------------------------------------------------------------------------------------------------ precision


def vae_dtype(compute: torch.dtype) -> torch.dtype:
    """The VAE runs in the compute dtype: bf16 has fp32's range, so it never overflows; an fp16 decode that
    overflows (the original SDXL VAE does) is redone in fp32 and that VAE stays fp32 (``pipeline.decode``)."""
    return compute


def use_channels_last(device: torch.device | str, network: nn.Module) -> bool:
    """channels_last (NHWC) is cuDNN's fast layout for the UNets' convolutions on CUDA (diffusers and fal
    measure 1.3x on SD1.5 with compile); transformers (Flux) have no convolutions to gain from it, and on the
    CPU oneDNN already reorders, so it is left as is there."""
    return torch.device(device).type == "cuda" and hasattr(getattr(network, "config", None), "model_channels")


# ------------------------------------------------------------------------------------------------ free memory


def free_memory(device: torch.device | str) -> int | None:
    """Bytes a job can still allocate on ``device``: CUDA's free memory plus what torch's caching allocator
    holds but does not use; on MPS the recommended limit less what is allocated; on the CPU ``MemAvailable``.
    None when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        free, _total = torch.cuda.mem_get_info(index)
        cached = torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)
        return int(free + max(cached, 0))
    if device.type == "mps":
        recommended = getattr(torch.mps, "recommended_max_memory", None)
        if recommended is None:
            return None
        return int(recommended() - torch.mps.current_allocated_memory())
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# ------------------------------------------------------------------------------------------------ measuring


class LiveTensorBytes(TorchFunctionMode):
    """Counts the bytes of tensors created inside the mode while they are alive, and the peak: the activation
    memory of a forward, measured the same on any device (the CPU has no allocator statistics).

    Each storage is counted once (views share it); a view of a tensor made outside (a weight's ``.t()``) is
    not an allocation. It sees what torch functions return (the scratch memory inside one kernel is not seen);
    a function mode rather than a dispatch mode, which would import ``torch._dynamo`` (10 s on a busy CPU).
    Used to calibrate the activation formulas (``bench/bench_memory.py``) and by tests.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._storages: dict[int, list[int]] = {}  # data_ptr -> [bytes, live tensors]
        self._refs: dict[int, weakref.ref] = {}  # keeps the callbacks' weakrefs alive

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs: set[int] | None = None
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr == 0:
                continue
            entry = self._storages.get(ptr)
            if entry is None:
                if inputs is None:
                    inputs = {a.untyped_storage().data_ptr() for a in tree_leaves((args, kwargs))
                              if isinstance(a, torch.Tensor) and a.device.type != "meta"}
                if ptr in inputs:
                    continue  # a view of (or in-place op on) a tensor made outside the mode
                entry = self._storages[ptr] = [storage.nbytes(), 0]
                self.live += entry[0]
                self.peak = max(self.peak, self.live)
            entry[1] += 1
            ref = weakref.ref(t, lambda ref, ptr=ptr: self._release(ref, ptr))
            self._refs[id(ref)] = ref
        return out

    def _release(self, ref: weakref.ref, ptr: int) -> None:
        self._refs.pop(id(ref), None)
        entry = self._storages.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            self.live -= entry[0]
            del self._storages[ptr]


# ------------------------------------------------------------------------------------------------ estimate

# Activation formulas: peak bytes of live activations during one call of a stage, as
#     constant * batch * width_of_the_full_resolution_level * positions * bytes_per_element
# (+ the attention scores where the kernel materialises them: batch * heads * tokens^2). Every tensor of a
# UNet or VAE forward scales with the full-resolution level's width times its positions (the deeper levels
# are fixed fractions of it for a given architecture), and a transformer's with tokens x hidden size, so one
# constant per architecture and stage captures it.
#
# Calibration (bench/bench_memory.py, CPU, fp32, LiveTensorBytes): each family's real architecture (its full
# config) with the width scaled down (UNet model_channels 64 / 32 for SDXL, VAE ch 32, Flux hidden 256 with 2+4
# blocks) at two sizes and two batches; measured peak / (batch * width * positions * bytes) was the same to
# 0.1 % across them (sd15 and sd2 27.0, sdxl 16.3, VAE decode 6.0 and encode 5.0, Flux 22.6, re-measured once the
# feature-cache hooks were in the networks), so the formula
# is linear as assumed and the constant carries to the full width; below, those ratios rounded up. The CPU's
# SDPA never materialises attention scores and neither do the CUDA kernels (flash / memory-efficient, Sage,
# xformers), so there is no tokens^2 term. What the CPU cannot show (allocator slack, cuDNN workspaces) is the
# SAFETY_* headroom; bench/gpu_check.py prints estimate against measured peak on a GPU.
_ACTIVATION = {
    "unet:sd15": 28.0,  # x model_channels x latent h*w: the skips of 12 input blocks + a GEGLU at the top level
    "unet:sd2": 28.0,
    "unet:sdxl": 17.0,  # no attention at the top level; 10-deep transformers at 1/4 of the positions
    "unet:sdxl_refiner": 17.0,
    "unet:default": 28.0,
    "flux": 23.5,  # x hidden x (image + text tokens): the single blocks' fused qkv + MLP projection
    "zimage": 15.0,  # x dim x (image + caption tokens): 14.3 measured; the SwiGLU's two 8/3-wide halves
    "vae_decode": 6.5,  # x decoder top width (ch * ch_mult[0]) x image H*W: two full-size maps + the upsample
    "vae_encode": 5.5,
    "text": 40.0,  # x hidden x tokens (77 per chunk): small next to the weights (not measured)
}


def _activation(stage: str, family: str | None = None) -> float:
    if stage == "unet":
        return _ACTIVATION.get(f"unet:{family}", _ACTIVATION["unet:default"])
    return _ACTIVATION[stage]


def denoiser_activations(
    network: nn.Module, family: str, latent_hw: tuple[int, int], batch: int, element: int, text_tokens: int = 77
) -> int:
    """Peak activation bytes of one denoiser call on ``batch`` latents (CFG: twice the images)."""
    cfg = getattr(network, "config", None)
    h, w = latent_hw
    if hasattr(cfg, "model_channels"):  # a UNet
        return int(_activation("unet", family) * batch * cfg.model_channels * h * w * element)
    if hasattr(cfg, "cap_feat_dim"):  # Z-Image: 2x2 patches and up to 512 caption tokens, each padded to 32
        tokens = -(-(h // 2) * (w // 2) // 32) * 32 + 512
        return int(_activation("zimage") * batch * cfg.dim * tokens * element)
    if hasattr(cfg, "hidden_size"):  # a DiT (Flux: 2x2 patches; FLUX.2's latent is one token per cell)
        from core.models.families import FAMILIES

        patch = getattr(FAMILIES[family].sampling, "patch", 2) if family in FAMILIES else 2
        tokens = (h // patch) * (w // patch) + text_tokens
        return int(_activation("flux") * batch * cfg.hidden_size * tokens * element)
    return 0


def vae_activations(vae: nn.Module, image_hw: tuple[int, int], batch: int, element: int, stage: str) -> int:
    """Peak activation bytes of a VAE decode (``stage="vae_decode"``) or encode of ``batch`` images."""
    cfg = getattr(vae, "config", None)
    if not hasattr(cfg, "ch"):
        return 0
    width = cfg.ch * cfg.ch_mult[0]
    return int(_activation(stage) * batch * width * image_hw[0] * image_hw[1] * element)


def text_activations(encoder: nn.Module, element: int, tokens: int = 77) -> int:
    cfg = getattr(encoder, "config", None)
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "width", None) or getattr(cfg, "d_model", 768)
    return int(_activation("text") * hidden * tokens * element)


def offload_blocks(network: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """(blocks, resident): what sequential offload moves one at a time (each entry of the network's
    ``ModuleList``s, and any other child over 5 % of it), and what stays on the GPU (the small rest:
    embeddings, the output layer). A block is moved in by a hook on its own ``forward``, so only modules
    the network calls are blocks."""
    total = max(module_bytes(network), 1)
    blocks: list[nn.Module] = []
    resident: list[nn.Module] = []
    for child in network.children():
        if isinstance(child, nn.ModuleList):
            blocks.extend(child)
        elif module_bytes(child) > total * 0.05:
            blocks.append(child)
        else:
            resident.append(child)
    return blocks, resident


@dataclass(frozen=True)
class Estimate:
    """A job's memory: weights by group and the peak activations of each stage (bytes)."""

    text_weights: int  # all text encoders the job uses
    denoiser_weights: int  # the base denoiser
    refiner_weights: int  # the refiner's denoiser (0 without one)
    vae_weights: int
    text: int  # activations while encoding a prompt
    denoise: int  # one denoiser call at the job's size and batch (the hires pass when larger)
    decode: int  # one untiled VAE decode of a batch (encode included when img2img/hires needs it)
    resident_weights: int  # what sequential offload keeps on the GPU of the denoiser(s)
    largest_block: int  # the largest block sequential offload moves
    latent_hw: tuple[int, int] = (0, 0)  # of the largest pass (for tiling)
    batch: int = 1

    @property
    def weights(self) -> int:
        return self.text_weights + self.denoiser_weights + self.refiner_weights + self.vae_weights

    def vae_stage(self, tile: int | None) -> int:
        """The VAE's activations, tiled to ``tile`` latent pixels (None: untiled). A tiled decode also holds
        the fp32 output and its weights (4 + 4 bytes per output value)."""
        h, w = self.latent_hw
        if tile is None or (h <= tile and w <= tile) or h * w == 0:
            return self.decode
        share = min(tile, h) * min(tile, w) / (h * w)
        output = self.batch * 3 * h * w * 64 * 4 + h * w * 64 * 4
        return int(self.decode * share) + output

    def need(self, offload: str = "none", tile: int | None = None) -> int:
        """Peak bytes on the device under a plan (text encoders are on it only while encoding)."""
        vae = self.vae_weights + self.vae_stage(tile)
        text = self.text_weights + self.text
        if offload == "none":
            resident = self.denoiser_weights + self.refiner_weights + self.vae_weights
            return resident + max(text, self.denoise, self.vae_stage(tile))
        if offload == "model":
            # a refiner samples in the same loop as the base: both denoisers are on the device then
            return max(text, self.denoiser_weights + self.refiner_weights + self.denoise, vae)
        return max(text, self.resident_weights + 2 * self.largest_block + self.denoise, vae)


def _element(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def estimate_job(model: Any, request: Any, refiner: Any = None) -> Estimate:
    """The memory of ``request`` on loaded ``model`` (``pipeline.LoadedModel``; ``refiner`` likewise)."""
    element = _element(model.dtype)
    components = model.checkpoint.components
    models = [model] + ([refiner] if refiner is not None else [])
    # what LoRAs add on the device (LoraPatcher.forward_bytes: packed layers' forward-time deltas; merges add nothing)
    lora = [getattr(mm, "loras", None) for mm in models]
    lora_bytes = [p.forward_bytes() if p is not None else {} for p in lora]
    text_weights = sum(
        module_bytes(m) for mm in models for role, m in mm.checkpoint.components.items() if role.startswith(TEXT_PREFIX)
    ) + sum(b for added in lora_bytes for role, b in added.items() if role.startswith(TEXT_PREFIX))
    unet = components["unet"]
    downscale = model.spec.latent.downscale
    sizes = [(request.width, request.height)]
    if getattr(request, "hires", None) is not None:
        multiple = model.spec.pixel_multiple
        scale = request.hires.scale
        sizes.append((round(request.width * scale / multiple) * multiple, round(request.height * scale / multiple) * multiple))
    if getattr(request, "outpaint", None) is not None and getattr(request, "inpaint_area", "whole") == "whole":
        from core.inpaint import padded_size  # outpainting samples the padded image

        sizes.append(padded_size(request, model.spec.pixel_multiple))
    width, height = max(sizes, key=lambda s: s[0] * s[1])
    latent_hw = (height // downscale, width // downscale)
    batch = request.batch_size
    calls = batch * (2 if request.cfg != 1 else 1)  # CFG: cond and uncond in one call
    denoise = max(
        denoiser_activations(mm.checkpoint.components["unet"], mm.family, latent_hw, calls, element) for mm in models
    )
    vae = components["vae"]
    decode = vae_activations(vae, (height, width), batch, element, "vae_decode")
    if getattr(request, "is_img2img", False) or getattr(request, "hires", None) is not None:
        decode = max(decode, vae_activations(vae, (height, width), batch, element, "vae_encode"))
    text = max((text_activations(m, element) for role, m in components.items() if role.startswith(TEXT_PREFIX)),
               default=0)
    resident, largest = 0, 0
    for mm, added in zip(models, lora_bytes):
        blocks, kept = offload_blocks(mm.checkpoint.components["unet"])
        # a packed layer's LoRA factors are cached on the device as its block runs and stay: resident
        resident += sum(module_bytes(m) for m in kept) + added.get("unet", 0)
        largest = max([largest, *(module_bytes(b) for b in blocks)])
    return Estimate(
        text_weights=text_weights,
        denoiser_weights=module_bytes(unet) + lora_bytes[0].get("unet", 0),
        refiner_weights=(module_bytes(refiner.checkpoint.components["unet"]) + lora_bytes[1].get("unet", 0)
                         if refiner is not None else 0),
        vae_weights=module_bytes(vae) + (module_bytes(refiner.checkpoint.vae) if refiner is not None else 0),
        text=text,
        denoise=denoise,
        decode=decode,
        resident_weights=resident,
        largest_block=largest,
        latent_hw=latent_hw,
        batch=batch,
    )


# ------------------------------------------------------------------------------------------------ plan


def _gb(value: int) -> str:
    return f"{value / GiB:.1f} GB"


def fits(need: int, free: int | None) -> bool:
    return free is None or need * SAFETY_FACTOR + SAFETY_BYTES <= free


@dataclass(frozen=True)
class MemoryPlan:
    """Where the networks live during a job and whether the VAE tiles."""

    offload: str = "none"  # one of OFFLOADS
    vae_tile: int | None = None  # latent tile size; None: untiled (or the pipeline's fixed large-image rule)
    need: int = 0  # the estimate under the default plan (everything resident, untiled)
    free: int | None = None
    mode: str = "auto"  # core.accel.memory_mode
    reason: str = ""  # "estimate", "forced", "retry after out of memory"

    @property
    def is_default(self) -> bool:
        return self.offload == "none" and self.vae_tile is None

    def describe(self) -> str:
        """``model offload (est. 9.1 GB > 7.8 GB free)``; empty for the default plan."""
        if self.is_default:
            return ""
        parts = {"none": [], "model": ["model offload"], "sequential": ["sequential offload"]}[self.offload]
        if self.vae_tile is not None:
            parts.append(f"tiled VAE ({self.vae_tile * 8} px tiles)")
        if self.reason == "forced":
            why = "--lowvram" if self.mode == "lowvram" else f"memory mode {self.mode}"
        elif self.reason == "retry":
            why = "retry after running out of memory"
        elif self.free is not None:
            why = f"est. {_gb(self.need)} > {_gb(self.free)} free"
        else:
            why = self.reason
        return f"{', '.join(parts)} ({why})" if why else ", ".join(parts)


def _tile_for(estimate: Estimate, offload: str, free: int | None) -> int | None:
    """None when the untiled VAE fits, else the largest tile that fits (the smallest when none does)."""
    if fits(estimate.need(offload), free):
        return None
    h, w = estimate.latent_hw
    tiles = [t for t in VAE_TILES if t < max(h, w)]
    for tile in tiles:
        if fits(estimate.need(offload, tile), free):
            return tile
    return tiles[-1] if tiles else None


def choose_plan(estimate: Estimate, free: int | None, mode: str = "auto", device: torch.device | str = "cuda") -> MemoryPlan:
    """The least intrusive plan that fits ``free`` bytes: nothing moves on the CPU (its memory is where
    offloaded weights would go), otherwise resident, then model offload, then sequential, then a tiled VAE
    on top; ``mode`` forces a floor (``lowvram``: model offload; ``sequential``) or forbids offload (``gpu``)."""
    need = estimate.need("none")
    if torch.device(device).type == "cpu":
        tile = _tile_for(estimate, "none", free)
        return MemoryPlan("none", tile, need, free, mode, "estimate")
    floor = {"auto": "none", "gpu": "none", "lowvram": "model", "sequential": "sequential"}[mode]
    ladder = OFFLOADS[OFFLOADS.index(floor):] if mode != "gpu" else ("none",)
    offload = ladder[-1]
    for candidate in ladder:
        if fits(estimate.need(candidate), free):
            offload = candidate
            break
    tile = _tile_for(estimate, offload, free)
    reason = "forced" if mode in ("lowvram", "sequential") and offload == floor else "estimate"
    return MemoryPlan(offload, tile, need, free, mode, reason)


def escalate(plan: MemoryPlan, estimate: Estimate, device: torch.device | str = "cuda") -> MemoryPlan | None:
    """The plan to retry with after running out of memory: the next offload level and a tiled VAE (the
    tile that fits, at most 32 latent pixels); None when there is nothing left to give up."""
    if torch.device(device).type == "cpu":
        offload = "none"  # offloading to the CPU from the CPU frees nothing
    else:
        offload = OFFLOADS[min(OFFLOADS.index(plan.offload) + 1, len(OFFLOADS) - 1)]
    h, w = estimate.latent_hw
    smaller = [t for t in VAE_TILES if t <= 32 and t < max(h, w) and (plan.vae_tile is None or t < plan.vae_tile)]
    tile = _tile_for(estimate, offload, plan.free) or (smaller[0] if smaller else plan.vae_tile)
    if plan.vae_tile is not None and tile is not None:
        tile = min(tile, plan.vae_tile)
    if offload == plan.offload and tile == plan.vae_tile:
        return None
    return replace(plan, offload=offload, vae_tile=tile, reason="retry")


# ------------------------------------------------------------------------------------------------ out of memory

_OOM_TYPES = tuple(t for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)) if t)


# cuBLAS and cuDNN allocate their handles and workspaces outside torch's allocator, and report running out of
# device memory with their own status (``CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate``)
_LIBRARY_OOM = ("CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED")


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's OutOfMemoryError, or the RuntimeErrors that mean the same (CUDA/MPS/CPU allocators, cuBLAS and
    cuDNN)."""
    if _OOM_TYPES and isinstance(exc, _OOM_TYPES):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text.lower() or "can't allocate memory" in text or "MPS backend out of memory" in text
        or any(status in text for status in _LIBRARY_OOM)
    )


def free_cached(device: torch.device | str) -> None:
    """Give back what a failed job left: unreachable tensors (gc) and the caching allocator's free blocks."""
    gc.collect()
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


def what_would_fit(
    estimate_for: Any, width: int, height: int, batch: int, multiple: int, free: int | None, mode: str
) -> str:
    """Advice for a job that ran out of memory even after the retry: ``estimate_for(width, height, batch)``
    gives an ``Estimate``; says which of fewer images per batch, a smaller size (same aspect ratio) and
    ``--lowvram`` would fit ``free`` by the estimate."""
    advice: list[str] = []
    if free is None:
        free = 0
    if batch > 1:
        fitting = [b for b in range(batch - 1, 0, -1) if fits(estimate_for(width, height, b).need("sequential", 8), free)]
        advice.append(f"{fitting[0]} image{'s' if fitting[0] > 1 else ''} per batch" if fitting else "1 image per batch")
    for step in range(1, 16):
        scale = 1 - step / 16
        w = max(multiple, int(width * scale) // multiple * multiple)
        h = max(multiple, int(height * scale) // multiple * multiple)
        if fits(estimate_for(w, h, 1 if batch > 1 else batch).need("sequential", 8), free):
            advice.append(f"a smaller size (up to {w}x{h})")
            break
    if mode not in ("lowvram", "sequential"):
        advice.append("--lowvram")
    return ", or ".join(advice) if advice else "a smaller size or fewer images"


# ------------------------------------------------------------------------------------------------ placement


@dataclass
class _Home:
    """A tensor's own object (kept on the CPU while a device copy stands in for it) and that copy's identity,
    to tell whether it was changed on the device (a LoRA merge writes into it or replaces it)."""

    original: torch.Tensor
    placed: torch.Tensor
    data_ptr: int
    version: int


def _slots(module: nn.Module) -> Iterator[tuple[nn.Module, dict, str]]:
    """Every (owner, its _parameters or _buffers dict, name) of ``module`` and its submodules."""
    for owner in module.modules():
        for slots in (owner._parameters, owner._buffers):
            for name, tensor in slots.items():
                if tensor is not None:
                    yield owner, slots, name


@dataclass
class Placement:
    """Moves networks between the CPU (``home``) and ``device`` as the job's plan says.

    Moving in puts a device copy in place of each parameter and buffer (the CPU object is kept); moving out
    puts the CPU object back, so nothing is copied back unless the weight changed on the device (a LoRA merge,
    an fp32 upcast of the VAE): then its new value is copied into the CPU object first. Components are named
    ``"<model key>/<role>"``. Swapping objects rather than ``param.data`` works for any device pair, so tests
    use the ``meta`` device as the GPU; the LoRA patcher finds parameters by name, so it follows the swap.
    """

    device: torch.device
    home: torch.device = field(default_factory=lambda: torch.device("cpu"))
    plan: MemoryPlan = field(default_factory=MemoryPlan)
    moves: list[tuple[str, str]] = field(default_factory=list)  # (component, "in"/"out"), for the status and tests

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        self.home = torch.device(self.home)
        self._components: dict[str, nn.Module] = {}
        self._homes: dict[tuple[int, int, str], _Home] = {}  # (id(owner), id(slots), name)
        self._on: set[str] = set()
        self._hooks: list[Any] = []
        self._moved: dict[str, Callable[[], None]] = {}  # model key -> what follows its networks home

    @property
    def active(self) -> bool:
        """False when device and home are one (the CPU): nothing ever moves."""
        return self.device != self.home

    # -- registration --------------------------------------------------------------------------------------
    def register(self, key: str, components: Mapping[str, nn.Module], moved: Callable[[], None] | None = None) -> None:
        """(Re)name ``components`` (role -> network) of model ``key``; a network replaced under a role (another
        VAE) drops the old one's records. ``moved`` is called after one of them has moved home: the model's
        LoRA patcher (``LoraPatcher.follow``) lets go of what it kept on the device for those weights."""
        if moved is not None:
            self._moved[key] = moved
        for role, module in components.items():
            name = f"{key}/{role}"
            old = self._components.get(name)
            if old is not None and old is not module:
                for owner, slots, slot in _slots(old):
                    self._homes.pop((id(owner), id(slots), slot), None)
                self._on.discard(name)
            self._components[name] = module

    def forget(self, key: str) -> None:
        """A model that is unloaded: drop every reference to it (its tensors go with it)."""
        self._remove_hooks()
        self._moved.pop(key, None)
        for name in [n for n in self._components if n.startswith(f"{key}/")]:
            module = self._components.pop(name)
            self._on.discard(name)
            for owner, slots, slot in _slots(module):
                self._homes.pop((id(owner), id(slots), slot), None)

    def names(self, key: str, roles: Iterable[str]) -> list[str]:
        wanted = tuple(roles)
        return [n for n in self._components if n.startswith(f"{key}/") and n.split("/", 1)[1].startswith(wanted)]

    def on_device(self, name: str) -> bool:
        return name in self._on

    def resident_bytes(self) -> int:
        """Bytes of the registered networks' tensors now on the device (free to a job: they can move)."""
        if not self.active:
            return 0
        total = 0
        for module in self._components.values():
            for _owner, slots, name in _slots(module):
                t = slots[name]
                if t.device == self.device:
                    total += t.numel() * t.element_size()
        return total

    # -- moving --------------------------------------------------------------------------------------------
    def _move_in(self, module: nn.Module) -> None:
        with torch.inference_mode(False), torch.no_grad():
            for owner, slots, name in _slots(module):
                original = slots[name]
                if original.device == self.device:
                    continue
                copy = original.detach().to(self.device)
                placed = nn.Parameter(copy, requires_grad=False) if isinstance(original, nn.Parameter) else copy
                slots[name] = placed
                self._homes[(id(owner), id(slots), name)] = _Home(original, placed, copy.data_ptr(), placed._version)

    def _move_out(self, module: nn.Module) -> None:
        with torch.inference_mode(False), torch.no_grad():
            for owner, slots, name in _slots(module):
                current = slots[name]
                home = self._homes.pop((id(owner), id(slots), name), None)
                if home is None:
                    if current.device != self.home:  # put on the device before we managed it (a new VAE)
                        moved = current.detach().to(self.home)
                        slots[name] = nn.Parameter(moved, requires_grad=False) if isinstance(current, nn.Parameter) else moved
                    continue
                unchanged = (current is home.placed and current.data_ptr() == home.data_ptr
                             and current._version == home.version)
                if not unchanged:  # changed on the device: that is the weight now
                    home.original.data = current.detach().to(self.home)
                slots[name] = home.original

    def move_in(self, name: str) -> None:
        if not self.active or name in self._on:
            return
        self._move_in(self._components[name])
        self._on.add(name)
        self.moves.append((name, "in"))

    def move_out(self, name: str) -> None:
        if not self.active:
            return
        module = self._components[name]
        if name not in self._on and not any(slots[n].device != self.home for _, slots, n in _slots(module)):
            return
        self._move_out(module)
        self._on.discard(name)
        self.moves.append((name, "out"))
        moved = self._moved.get(name.split("/", 1)[0])
        if moved is not None:
            moved()

    # -- plans ---------------------------------------------------------------------------------------------
    def prepare(self, plan: MemoryPlan) -> None:
        """Arrange the registered networks for ``plan`` before a job: resident denoisers and VAEs on the
        device (plan none), everything home (model/sequential offload: moved in as each stage runs), the
        sequential hooks installed or removed."""
        self.plan = plan
        self._remove_hooks()
        if not self.active:
            return
        for name in list(self._components):
            role = name.split("/", 1)[1]
            if plan.offload == "none" and not role.startswith(TEXT_PREFIX):
                self.move_in(name)
            else:
                self.move_out(name)
        if plan.offload == "sequential":
            for name, module in self._components.items():
                if name.endswith("/unet"):
                    self._install_hooks(name, module)

    def _install_hooks(self, name: str, network: nn.Module) -> None:
        blocks, resident = offload_blocks(network)
        for module in resident:
            self._move_in(module)
        for slots in (network._parameters, network._buffers):  # the network's own tensors (not in a child)
            for slot, tensor in list(slots.items()):
                if tensor is not None and tensor.device != self.device:
                    copy = tensor.detach().to(self.device)
                    placed = nn.Parameter(copy, requires_grad=False) if isinstance(tensor, nn.Parameter) else copy
                    slots[slot] = placed
                    self._homes[(id(network), id(slots), slot)] = _Home(tensor, placed, copy.data_ptr(), placed._version)
        for block in blocks:
            self._hooks.append(block.register_forward_pre_hook(lambda m, args: self._move_in(m)))
            self._hooks.append(block.register_forward_hook(lambda m, args, out: self._move_out(m)))
        self.moves.append((name, "blocks"))

    def _remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    @contextmanager
    def use(self, key: str, roles: Iterable[str]) -> Iterator[None]:
        """The networks ``roles`` of model ``key`` on the device for a stage. Model/sequential offload first
        move every other network home; a sequential denoiser stays where its hooks put it."""
        names = self.names(key, roles)
        if self.active:
            if self.plan.offload != "none":
                for other in [n for n in self._on if n not in names]:
                    self.move_out(other)
            for name in names:
                if not (self.plan.offload == "sequential" and name.endswith("/unet")):
                    self.move_in(name)
        yield

    def release(self, key: str, roles: Iterable[str]) -> None:
        """Move ``roles`` of ``key`` home (text encoders after encoding)."""
        for name in self.names(key, roles):
            self.move_out(name)

    def release_all(self) -> None:
        self._remove_hooks()
        for name in list(self._components):
            self.move_out(name)
