"""Writing ``.safetensors`` files with the standard library and torch alone.

``safetensors.torch.save_file`` converts every tensor through numpy, which a user's install does not have;
Darkroom writes files at run time (random test checkpoints that ``core.models.testing`` makes, for the
runtime-only install check) so it writes the format itself: an 8-byte little-endian header length, the JSON
header (tensor name -> dtype, shape, data_offsets relative to the end of the header, and an optional
``__metadata__`` map of strings), padded with spaces to a multiple of 8, then the tensors' bytes in order.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import torch

from core.models.safetensors_header import DTYPES
from core.tensor_bytes import tensor_bytes

_CODE_OF = {name: code for code, (name, _bits) in DTYPES.items()}


def save_tensors(
    tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write ``tensors`` to ``path`` (atomically: a temporary file renamed into place)."""
    path = Path(path)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for key, tensor in tensors.items():
        name = str(tensor.dtype).removeprefix("torch.")
        if name not in _CODE_OF:
            raise ValueError(f"tensor {key!r} has dtype {name}, which safetensors cannot store")
        size = tensor.numel() * tensor.element_size()
        header[key] = {"dtype": _CODE_OF[name], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the reference writer aligns the data to 8 bytes
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for tensor in tensors.values():
                f.write(tensor_bytes(tensor))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
