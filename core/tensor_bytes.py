"""Raw bytes of CPU tensors and uint8 images without numpy.

numpy is not a runtime dependency (the test extra brings it in through diffusers, a user's install does not),
so ``Tensor.numpy``, ``Image.fromarray`` and ``safetensors.torch.save_file`` (which builds numpy arrays)
cannot be used by anything that runs for a user. These helpers hand PIL and files the tensor's memory directly.
"""

from __future__ import annotations

import ctypes
import sys

import torch
from PIL import Image


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of ``tensor`` in row-major order and little-endian, as safetensors and PIL expect.

    The view shares memory with a contiguous CPU copy of the tensor (no copy when it already is one); keep
    the returned view alive only while you use it.
    """
    if sys.byteorder != "little":  # pragma: no cover - every platform torch ships wheels for is little-endian
        raise NotImplementedError("writing tensors on a big-endian machine is not supported")
    data = tensor.detach().to("cpu").contiguous()
    size = data.numel() * data.element_size()
    if size == 0:
        return memoryview(b"")
    buffer = (ctypes.c_ubyte * size).from_address(data.data_ptr())
    view = memoryview(buffer).cast("B")
    # The ctypes array does not own the memory: tie the tensor's lifetime to the buffer object.
    buffer._tensor = data  # type: ignore[attr-defined]
    return view


def rgb_image(pixels: torch.Tensor) -> Image.Image:
    """uint8 ``[H, W, 3]`` tensor -> PIL RGB image (a copy: the image owns its pixels)."""
    if pixels.dtype != torch.uint8 or pixels.dim() != 3 or pixels.shape[-1] != 3:
        raise ValueError(f"expected a uint8 [H, W, 3] tensor, got {pixels.dtype} {tuple(pixels.shape)}")
    height, width, _ = pixels.shape
    return Image.frombytes("RGB", (width, height), bytes(tensor_bytes(pixels)))
