"""Model upscalers (ESRGAN, Real-ESRGAN, SwinIR, DAT, HAT, ... as A1111/Forge/ComfyUI users keep them) through
spandrel, run in overlapping tiles.

- Files come from the registry's ``upscaler`` folders (ComfyUI ``models/upscale_models``, A1111 ``models/ESRGAN``
  and ``models/RealESRGAN``): ``.safetensors`` read by safetensors, ``.pth``/``.pt`` by
  ``torch.load(weights_only=True)``, so no pickle code runs; spandrel then recognises the architecture from the
  keys (``ModelLoader().load_from_state_dict``). An unsupported or broken file is one ``UpscalerError`` naming it.
- spandrel is the optional ``upscale`` extra (it needs a torchvision that matches torch, which a CUDA install
  has): without it a job that names a model upscaler fails with one message saying what to install; nothing
  else imports it.
- ``upscale_image`` runs the model on tiles of ``tile`` input pixels that overlap by ``overlap`` and blends them
  with linear feathering over the middle of each overlap, accumulating on the CPU in float32: the device holds one tile's
  activations, so a 4x upscale of a large image fits. The tile size comes from ``$DARKROOM_UPSCALE_TILE`` or
  from a probe of the model's activation bytes per pixel (``core.accel.memory.LiveTensorBytes``) against the
  free memory; out of memory halves it (as ComfyUI does).
- Precision: the job's device and compute dtype where spandrel's descriptor supports it (bf16, fp16), else
  float32 (always on the CPU).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import DarkroomError

INSTALL_HINT = ("pip install 'darkroom[upscale]' (spandrel; it needs the torchvision built for your torch, which "
                "comes with a CUDA install of torch: pip install torchvision)")
TILE_ENV = "DARKROOM_UPSCALE_TILE"
DEFAULT_OVERLAP = 32  # input pixels; ESRGAN's receptive field is ~20 px, so the seams blend clean pixels
MIN_TILE, MAX_TILE = 64, 1024
UPSCALER_EXTENSIONS = (".safetensors", ".pth", ".pt")
BUILTIN = ("latent", "image")  # hires-fix upscalers that are no model file


class UpscalerError(DarkroomError):
    """A model upscaler cannot be loaded or run; the message names the file."""


class UpscalerUnavailableError(UpscalerError):
    """spandrel (or a torchvision that works with this torch) is not installed."""


def display_name(name: str) -> str:
    """An upscaler as A1111 names it: the file name without folder or extension (``4x-UltraSharp``)."""
    base = name.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    stem, ext = os.path.splitext(base)
    return stem if ext.lower() in UPSCALER_EXTENSIONS else base


def is_model_upscaler(name: str | None) -> bool:
    """True for a hires-fix ``upscaler`` that names a model file (not ``latent`` / ``image``)."""
    return bool(name) and name not in BUILTIN


def import_spandrel() -> Any:
    """spandrel, or ``UpscalerUnavailableError`` saying what to install (its import pulls every architecture, two
    of which import torchvision: a missing or mismatched torchvision fails here too)."""
    try:
        import spandrel
    except Exception as exc:  # noqa: BLE001 - ImportError, or torchvision's RuntimeError against another torch
        raise UpscalerUnavailableError(
            f"model upscalers need spandrel, which cannot be imported here ({type(exc).__name__}: {exc}); "
            f"install it with {INSTALL_HINT}"
        ) from None
    return spandrel


def read_state_dict(path: Path) -> dict[str, Any]:
    """The tensors of an upscaler file, without running pickle code."""
    import pickle

    import torch

    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        if suffix in (".pth", ".pt"):
            data = torch.load(str(path), map_location="cpu", weights_only=True)
            if not isinstance(data, dict):
                raise UpscalerError(f"{path}: holds a {type(data).__name__}, not a table of weights (a state dict)")
            return data
    except UpscalerError:
        raise
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UpscalerError(
            f"{path}: holds pickled objects other than weights, which Darkroom does not load (weights_only: "
            f"{first[:200]}); use a .safetensors copy of the upscaler"
        ) from None
    except Exception as exc:  # noqa: BLE001 - truncated or damaged file: said, naming it
        raise UpscalerError(f"{path}: cannot be read as an upscaler ({type(exc).__name__}: {exc})") from None
    raise UpscalerError(f"{path}: not an upscaler file ({', '.join(UPSCALER_EXTENSIONS)})")


def _dtype_for(descriptor: Any, device: Any, wanted: Any) -> Any:
    """The job's dtype where the architecture supports it; float32 otherwise (and on the CPU)."""
    import torch

    if torch.device(device).type == "cpu" or wanted == torch.float32:
        return torch.float32
    if wanted == torch.bfloat16:
        if descriptor.supports_bfloat16:
            return torch.bfloat16
        return torch.float16 if descriptor.supports_half else torch.float32
    if wanted == torch.float16 and descriptor.supports_half:
        return torch.float16
    return torch.float32


@dataclass
class LoadedUpscaler:
    """A spandrel image model on the job's device, with its scale and the tile size chosen for it."""

    name: str
    path: Path
    descriptor: Any  # spandrel.ImageModelDescriptor
    device: Any
    dtype: Any
    tile: int | None = None  # input pixels per tile side; None until chosen (setting or probe)
    overlap: int = DEFAULT_OVERLAP
    tiles_run: int = 0  # tiles run since load (tests, bench)
    _bytes_per_pixel: float | None = field(default=None, repr=False)

    @property
    def scale(self) -> int:
        return int(self.descriptor.scale)

    @property
    def label(self) -> str:
        return f"{self.descriptor.architecture.name} {self.scale}x"

    def __call__(self, tile: Any) -> Any:
        """spandrel's own model call on one ``[1, C, h, w]`` tile in [0, 1] (pads to its size rules)."""
        self.tiles_run += 1
        return self.descriptor(tile)


def load_upscaler(path: Path | str, *, device: Any = "cpu", dtype: Any = None, name: str | None = None
                  ) -> LoadedUpscaler:
    """Load an upscaler file (``UpscalerError`` naming it when it is not one spandrel can run)."""
    import torch

    spandrel = import_spandrel()
    path = Path(path)
    state = read_state_dict(path)
    try:
        descriptor = spandrel.ModelLoader(device="cpu").load_from_state_dict(state)
    except spandrel.UnsupportedModelError:
        raise UpscalerError(
            f"{path}: not an upscaler architecture spandrel {spandrel.__version__} recognises (ESRGAN, Real-ESRGAN, "
            "SwinIR, DAT, HAT, ...); is it an upscale model?"
        ) from None
    except Exception as exc:  # noqa: BLE001 - keys of a known architecture with wrong shapes, missing keys
        raise UpscalerError(f"{path}: its weights do not load as an upscaler ({type(exc).__name__}: {exc})") from None
    if not isinstance(descriptor, spandrel.ImageModelDescriptor):
        raise UpscalerError(f"{path}: is a {descriptor.architecture.name} {descriptor.purpose} model (it needs a mask), "
                            "not an upscaler")
    if descriptor.input_channels != 3 or descriptor.output_channels != 3:
        raise UpscalerError(f"{path}: takes {descriptor.input_channels} channels and gives "
                            f"{descriptor.output_channels}; only RGB upscalers can be used")
    device = torch.device(device)
    chosen = _dtype_for(descriptor, device, dtype or torch.float32)
    descriptor.to(device).to(chosen).eval()
    return LoadedUpscaler(name or path.stem, path, descriptor, device, chosen)


# Keys of a source's infotext that its request does not hold, carried into the upscaled image's (model hash,
# LoRA hashes, ...); the ones the request writes itself, and the previous upscale's, are not.
_NOT_CARRIED = ("Prompt", "Negative prompt", "Version", "Postprocess upscale by", "Postprocess upscaler")


def source_infotext_keys(image: Any) -> dict[str, str]:
    """The infotext keys of an open PIL image (its ``parameters`` text) to carry into its upscaled copy."""
    text = getattr(image, "info", {}).get("parameters")
    if not isinstance(text, str) or not text.strip():
        return {}
    from core.metadata import parse_infotext

    params = parse_infotext(text)
    return {k: v for k, v in params.items() if k not in _NOT_CARRIED and not k.endswith(("-1", "-2"))}


# ------------------------------------------------------------------------------------------------ tiling


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile origins along one side: every ``tile - overlap`` pixels, the last one flush with the end."""
    if length <= tile:
        return [0]
    step = max(1, tile - overlap)
    starts = list(range(0, length - tile, step))
    return [*starts, length - tile]


def _ramp(size: int, before: int, after: int) -> Any:
    """Blend weights along one side of a tile's output. Over the ``before`` pixels it shares with the previous
    tile they rise from 0 to 1, over the ``after`` it shares with the next they fall; the outer quarter of each
    shared band (the pixels nearest the tile's cut edge, which saw zero padding instead of the image) gets 0,
    where the neighbour has full weight, so the seams blend pixels that saw their surroundings."""
    import torch

    weights = torch.ones(size)
    for band, flip in ((before, False), (after, True)):
        if band <= 0:
            continue
        margin = band // 4
        ramp = torch.zeros(band)
        rising = band - 2 * margin
        ramp[margin:margin + rising] = torch.arange(1, rising + 1) / (rising + 1)
        ramp[margin + rising:] = 1.0
        if flip:
            weights[size - band:] = torch.minimum(weights[size - band:], ramp.flip(0))
        else:
            weights[:band] = torch.minimum(weights[:band], ramp)
    return weights


def tile_boxes(width: int, height: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """(x, y, w, h) of every tile of a ``width`` x ``height`` image, row by row."""
    xs, ys = tile_starts(width, tile, overlap), tile_starts(height, tile, overlap)
    return [(x, y, min(tile, width), min(tile, height)) for y in ys for x in xs]


def run_tiled(
    model: Callable[[Any], Any], image: Any, scale: int, tile: int, overlap: int = DEFAULT_OVERLAP, *,
    device: Any = None, dtype: Any = None, on_tile: Callable[[int, int], None] | None = None,
) -> Any:
    """``model`` (a tile ``[1, 3, h, w]`` -> ``[1, 3, h*scale, w*scale]``) over ``image`` (``[1, 3, H, W]`` in
    [0, 1], on the CPU) in overlapping tiles, feathered together; float32 ``[1, 3, H*scale, W*scale]`` on the
    CPU. Only one tile is on the device at a time; ``on_tile(done, total)`` after each (the worker's step callback,
    which also ends a cancelled job)."""
    import torch

    _, channels, height, width = image.shape
    xs, ys = tile_starts(width, tile, overlap), tile_starts(height, tile, overlap)
    tw, th = min(tile, width), min(tile, height)
    out = torch.zeros((channels, height * scale, width * scale), dtype=torch.float32)
    # A tile's weight is wy (x) wx, so the weights' sum over the grid is (sum of wy) (x) (sum of wx): two vectors,
    # not a second full-size buffer.
    sum_y, sum_x = torch.zeros(height * scale), torch.zeros(width * scale)
    wys, wxs = [], []
    for j, y in enumerate(ys):
        above = (ys[j - 1] + th - y) * scale if j > 0 else 0
        below = (y + th - ys[j + 1]) * scale if j + 1 < len(ys) else 0
        wys.append(_ramp(th * scale, above, below))
        sum_y[y * scale:(y + th) * scale] += wys[-1]
    for i, x in enumerate(xs):
        left = (xs[i - 1] + tw - x) * scale if i > 0 else 0
        right = (x + tw - xs[i + 1]) * scale if i + 1 < len(xs) else 0
        wxs.append(_ramp(tw * scale, left, right))
        sum_x[x * scale:(x + tw) * scale] += wxs[-1]
    if float(sum_y.min()) <= 0 or float(sum_x.min()) <= 0:  # every output pixel must have a tile that counts
        raise AssertionError(f"tiling {width}x{height} by {tile} with overlap {overlap} leaves pixels unweighted")
    total, done = len(xs) * len(ys), 0
    for j, y in enumerate(ys):
        wy = wys[j]
        for i, x in enumerate(xs):
            wx = wxs[i]
            piece = image[:, :, y:y + th, x:x + tw].to(device=device or image.device, dtype=dtype or image.dtype)
            with torch.inference_mode():
                result = model(piece)
            result = result[0].float().cpu()
            if result.shape[-2:] != (th * scale, tw * scale):
                raise UpscalerError(f"the upscaler returned a {tuple(result.shape[-2:])} tile for a {(th, tw)} one; "
                                    f"its scale is not {scale}")
            w = wy[:, None] * wx[None, :]
            ys_, xs_ = slice(y * scale, (y + th) * scale), slice(x * scale, (x + tw) * scale)
            out[:, ys_, xs_] += result * w
            done += 1
            if on_tile is not None:
                on_tile(done, total)
    out /= sum_y[:, None]  # in place: a 4x upscale's output is the largest buffer here
    out /= sum_x[None, :]
    return out[None]


def choose_tile(upscaler: LoadedUpscaler, free: int | None = None) -> int:
    """Tile side in input pixels: ``$DARKROOM_UPSCALE_TILE``, else the largest whose activations (measured on a
    64 x 64 probe, linear in pixels for convolutional and windowed networks) take at most half the free memory
    (a quarter of free RAM, at most 4 GiB, on the CPU), in multiples of 32 from 64 to 1024."""
    setting = os.environ.get(TILE_ENV, "").strip()
    if setting:
        try:
            value = int(setting)
        except ValueError:
            raise UpscalerError(f"${TILE_ENV} = {setting!r} is invalid: a tile size in pixels from {MIN_TILE} to "
                                f"{MAX_TILE}") from None
        if not MIN_TILE <= value <= 8192:
            raise UpscalerError(f"${TILE_ENV} = {setting!r} is invalid: a tile size in pixels from {MIN_TILE}")
        return value
    if upscaler.tile is not None:
        return upscaler.tile
    import torch

    from core.accel.memory import LiveTensorBytes, free_memory

    if upscaler._bytes_per_pixel is None:
        probe = torch.rand((1, 3, 64, 64), generator=torch.Generator().manual_seed(0))
        probe = probe.to(device=upscaler.device, dtype=upscaler.dtype)
        with LiveTensorBytes() as counter, torch.inference_mode():
            upscaler.descriptor(probe)
        upscaler._bytes_per_pixel = max(counter.peak, 1) / (64 * 64)
    free = free_memory(upscaler.device) if free is None else free
    if free is None:
        free = 4 << 30
    budget = free / 2 if upscaler.device.type != "cpu" else min(free / 4, 4 << 30)
    side = int(math.sqrt(budget / upscaler._bytes_per_pixel)) // 32 * 32
    upscaler.tile = max(MIN_TILE, min(MAX_TILE, side))
    return upscaler.tile


def upscale_tensor(
    upscaler: LoadedUpscaler, image: Any, *, tile: int | None = None, on_tile: Callable[[int, int], None] | None = None,
) -> Any:
    """One model pass over ``image`` (``[1, 3, H, W]`` in [0, 1]) in tiles; out of memory halves the tile."""
    from core.accel.memory import free_cached, is_out_of_memory

    size = tile or choose_tile(upscaler)
    while True:
        try:
            return run_tiled(upscaler, image.cpu(), upscaler.scale, size, min(upscaler.overlap, size // 4),
                             device=upscaler.device, dtype=upscaler.dtype, on_tile=on_tile)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is retried
            if not is_out_of_memory(exc) or size // 2 < MIN_TILE:
                raise
        free_cached(upscaler.device)  # outside the except block: the failed tile's tensors are gone
        size //= 2
        upscaler.tile = size


def upscale_image(
    upscaler: LoadedUpscaler, image: Any, width: int, height: int, *, on_tile: Callable[[int, int], None] | None = None,
) -> Any:
    """A PIL image upscaled by the model to ``width`` x ``height``, as A1111 does: model passes until the image is
    at least that large (a 2x model runs twice for 4x; at most 3 passes), then a Lanczos resize to the size."""
    import torch
    from PIL import Image

    from core.tensor_bytes import rgb_image

    current = image.convert("RGB")
    for _ in range(3):
        if current.width >= width and current.height >= height:
            break
        data = torch.frombuffer(bytearray(current.tobytes()), dtype=torch.uint8)
        pixels = data.view(current.height, current.width, 3).permute(2, 0, 1)[None].float() / 255
        result = upscale_tensor(upscaler, pixels, on_tile=on_tile)
        rounded = (result[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)
        current = rgb_image(rounded.contiguous())
        if upscaler.scale <= 1:
            break
    if current.size != (width, height):
        current = current.resize((width, height), Image.Resampling.LANCZOS)
    return current


class UpscalerCache:
    """Keeps the last upscaler loaded (per file, device and dtype) between jobs, as the runner keeps its model."""

    def __init__(self, find: Callable[[str], Path], device: Any, dtype: Any) -> None:
        self.find, self.device, self.dtype = find, device, dtype
        self.loaded: LoadedUpscaler | None = None

    def get(self, name: str, dtype: Any = None) -> LoadedUpscaler:
        path = self.find(name)
        import torch

        wanted = dtype or self.dtype
        current = self.loaded
        if current is not None and current.path == path and torch.device(current.device) == torch.device(self.device):
            if current.dtype == _dtype_for(current.descriptor, self.device, wanted):
                return current
        self.loaded = None
        self.loaded = load_upscaler(path, device=self.device, dtype=wanted, name=Path(name).stem)
        return self.loaded
