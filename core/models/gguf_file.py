"""Reading GGUF files (ComfyUI-GGUF / stable-diffusion.cpp quantisations of diffusion models and T5).

``GGUFFile`` opens a file with ``gguf.GGUFReader`` (memory-mapped, copy-on-write so torch can wrap the pages
without a copy or a read-only warning), checks it once, and then serves tensors one at a time with the same
surface as the loader's other tensor sources (``path``, ``format``, ``shapes``, ``dtypes``, ``get``, ``close``):
F32/F16/BF16 tensors come back as ordinary torch tensors viewing the file, block-quantised ones as
``QuantizedTensor`` (raw bytes viewing the file, plus type and shape), for ``quant.assign_weights``.

Every problem with the file is one ``CheckpointError`` sentence naming it: not a GGUF, damaged or truncated,
a tensor type Darkroom cannot dequantise, or a GGUF of another model (``check_architecture``).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core.errors import CheckpointError
from core.models.gguf_header import (
    COMPAT_ARCHITECTURES,
    GGUF_MAGIC,
    IMAGE_ARCHITECTURES,
    T5_ARCHITECTURES,
    T5_NAME_MAP,
    state_name,
    t5_name,
)
from core.models.gguf_header import damaged as _damaged
from core.models.quant.ggml import GGML_TYPE_NAMES, SUPPORTED_GGUF_TYPES, UNQUANTIZED, qtype_size
from core.models.quant.layers import QuantizedTensor
from core.models.safetensors_header import short_repr

_TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# The names and the stdlib header reader live in core.models.gguf_header (the registry reads headers without
# torch); re-exported here for the loader's callers.
__all__ = ["GGUFFile", "GGUFTensorInfo", "IMAGE_ARCHITECTURES", "T5_ARCHITECTURES", "COMPAT_ARCHITECTURES",
           "GGUF_MAGIC", "T5_NAME_MAP", "t5_name"]


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (GGUF stores dimensions innermost first)
    qtype: str  # GGML type name: "Q4_K", "F16", ...
    nbytes: int
    index: int  # position in GGUFReader.tensors



class GGUFFile:
    """An open GGUF file: metadata, tensor list, tensors on demand (memory-mapped)."""

    format = "gguf"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._reader = _open_reader(self.path)
        self.architecture: str | None = self.field_str("general.architecture")
        self.tensors: dict[str, GGUFTensorInfo] = {}
        size = os.path.getsize(self.path)
        for index, t in enumerate(self._reader.tensors):
            type_id = int(t.tensor_type)
            qtype = GGML_TYPE_NAMES.get(type_id)
            if qtype is None:
                name = getattr(t.tensor_type, "name", str(type_id))
                raise CheckpointError(
                    self.path,
                    f"tensor {short_repr(t.name)} is stored as GGML type {name}, which Darkroom cannot "
                    f"dequantise; supported types: {', '.join(SUPPORTED_GGUF_TYPES)}",
                )
            shape = self._orig_shape(t.name) or tuple(int(d) for d in reversed(t.shape.tolist()))
            block, type_size = qtype_size(qtype)
            numel = math.prod(shape)
            stored_row = int(t.shape[0]) if len(t.shape) else 1  # blocks run along the stored innermost axis
            if numel != int(t.n_elements) or stored_row % block:
                raise _damaged(self.path, f"tensor {short_repr(t.name)} has an impossible shape {list(shape)}")
            nbytes = numel // block * type_size
            if t.data_offset + nbytes > size or t.data.nbytes != nbytes:
                raise _damaged(self.path, f"tensor {short_repr(t.name)} runs past the end of the file")
            self.tensors[t.name] = GGUFTensorInfo(t.name, shape, qtype, nbytes, index)
        self.shapes = {name: info.shape for name, info in self.tensors.items()}
        # dtype names as the loader's other sources give them: torch names for the plain float types,
        # GGML names for block quantisations
        self.dtypes = {
            name: str(_TORCH_DTYPES[i.qtype]).removeprefix("torch.") if i.qtype in UNQUANTIZED else i.qtype
            for name, i in self.tensors.items()
        }

    # ------------------------------------------------------------------------------------ metadata

    def field(self, key: str) -> Any:
        """A metadata value (str, int, float, bool or a list of them), or None when absent."""
        field = self._reader.get_field(key)
        if field is None:
            return None
        try:
            values = [_field_value(field, part) for part in field.data]
        except (ValueError, IndexError, UnicodeDecodeError) as e:
            raise _damaged(self.path, f"metadata {short_repr(key)} cannot be read: {e}") from None
        import gguf

        is_array = field.types and field.types[0] == gguf.GGUFValueType.ARRAY
        return values if is_array else (values[0] if values else None)

    def field_str(self, key: str) -> str | None:
        value = self.field(key)
        return value if isinstance(value, str) else None

    def _orig_shape(self, name: str) -> tuple[int, ...] | None:
        # ComfyUI-GGUF stores the real shape of tensors it reshaped before quantising (SD1/SDXL convs).
        value = self.field(f"comfy.gguf.orig_shape.{name}")
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, int) and v > 0 for v in value):
            raise _damaged(self.path, f"the original shape recorded for tensor {short_repr(name)} is not a list of sizes")
        return tuple(value)

    def qtype_counts(self) -> dict[str, int]:
        """GGML type name -> number of tensors (what ComfyUI-GGUF logs as ``gguf qtypes``)."""
        counts: dict[str, int] = {}
        for info in self.tensors.values():
            counts[info.qtype] = counts.get(info.qtype, 0) + 1
        return counts

    def quantization(self) -> str:
        """The type that holds most of the weights (by element count), e.g. ``"Q4_K"``, for listings."""
        counts: dict[str, int] = {}
        for info in self.tensors.values():
            counts[info.qtype] = counts.get(info.qtype, 0) + math.prod(info.shape)
        return max(counts, key=counts.__getitem__) if counts else "empty"

    def check_architecture(self, allowed: Collection[str], what: str) -> None:
        """Refuse a GGUF of another model: ``allowed`` architectures, ``what`` the part the file was given as
        (e.g. ``"a Flux diffusion model"``). A file without an architecture (stable-diffusion.cpp) passes: the
        loader tells it apart by its tensor names."""
        arch = self.architecture or ""
        if arch in allowed or arch in COMPAT_ARCHITECTURES:
            return
        if arch in IMAGE_ARCHITECTURES:
            kind = "an image model"
        elif arch in T5_ARCHITECTURES:
            kind = "a T5 text encoder"
        else:
            kind = "a language model or text encoder for llama.cpp"
        wanted = ", ".join(repr(a) for a in sorted(allowed))
        raise CheckpointError(
            self.path,
            f"this GGUF is {kind} (architecture {short_repr(arch)}), not {what}, whose GGUF files have "
            f"architecture {wanted}",
        )

    # ------------------------------------------------------------------------------------ tensors

    def raw(self, name: str) -> torch.Tensor:
        """The tensor's bytes as a uint8 tensor viewing the file (rows x bytes per row for block types)."""
        info = self.tensors[name]
        data = self._reader.tensors[info.index].data
        t = torch.from_numpy(data)  # shares the memory map: pages are read when first touched
        return t.view(torch.uint8) if t.dtype != torch.uint8 else t

    def get(self, name: str) -> torch.Tensor | QuantizedTensor:
        """F32/F16/BF16 as a torch tensor of the torch shape viewing the file; block types as a
        ``QuantizedTensor`` (dequantised later, layer by layer)."""
        info = self.tensors[name]
        raw = self.raw(name)
        if info.qtype in UNQUANTIZED:
            return raw.reshape(-1).view(_TORCH_DTYPES[info.qtype]).reshape(info.shape)
        return QuantizedTensor(raw, info.qtype, info.shape)  # raw keeps the stored (rows, bytes per row) shape

    def state_names(self) -> dict[str, str]:
        """file tensor name -> the name in the original checkpoint layout our networks load: T5 and Qwen3 files get the
        Hugging Face names, diffusion models lose a ``model.diffusion_model.`` prefix."""
        return {name: state_name(name, self.architecture) for name in self.tensors}

    def items(self) -> Iterator[tuple[str, torch.Tensor | QuantizedTensor]]:
        for name in self.tensors:
            yield name, self.get(name)

    def close(self) -> None:
        # Tensors already handed out keep their own reference to the mapping.
        self._reader = None  # type: ignore[assignment]

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()




def _field_value(field: Any, part: int) -> Any:
    import gguf

    value_type = field.types[-1]
    data = field.parts[part]
    if value_type == gguf.GGUFValueType.STRING:
        return bytes(data).decode("utf-8")
    scalar = data.tolist()[0]
    return bool(scalar) if value_type == gguf.GGUFValueType.BOOL else scalar


_UNKNOWN_TYPE = re.compile(r"(\d+)\)? is not a valid GGMLQuantizationType")


# GGUF metadata value types (gguf.GGUFValueType) -> size in bytes; 8 = string, 9 = array.
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_MIN_TENSOR_INFO = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dim, type, offset


def _check_header(path: Path) -> None:
    """Walk the metadata section before gguf.GGUFReader does: its reader loops over array elements one by one
    without checking they fit in the file, so a hostile count (2**61) would hang it. Every count and length is
    checked against the bytes left, which bounds the walk by the file size."""
    import mmap
    import struct

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        size = len(data)
        pos = 4

        def take(n: int, what: str) -> int:
            nonlocal pos
            if n < 0 or pos + n > size:
                raise _damaged(path, f"{what} runs past the end of the file at byte {pos}")
            start, pos = pos, pos + n
            return start

        def u32(what: str) -> int:
            return struct.unpack_from("<I", data, take(4, what))[0]

        def u64(what: str) -> int:
            return struct.unpack_from("<Q", data, take(8, what))[0]

        def string(what: str) -> None:
            take(u64(what), what)

        def value(kind: int, what: str, depth: int = 0) -> None:
            if kind in _SCALAR_SIZES:
                take(_SCALAR_SIZES[kind], what)
            elif kind == _STRING:
                string(what)
            elif kind == _ARRAY and depth < 4:
                item, count = u32(what), u64(what)
                if item in _SCALAR_SIZES:
                    take(count * _SCALAR_SIZES[item], what)
                    return
                if count * 8 > size - pos:  # every string or nested array takes at least 8 bytes
                    raise _damaged(path, f"{what} declares {count} items, more than the file holds")
                for _ in range(count):
                    value(item, what, depth + 1)
            else:
                raise _damaged(path, f"{what} has an unknown value type {kind}")

        version = u32("the version")
        if version not in (2, 3):
            raise CheckpointError(
                path, f"is a GGUF version {version} file; Darkroom reads versions 2 and 3 (convert it again)"
            )
        n_tensors, n_fields = u64("the tensor count"), u64("the field count")
        if n_tensors * _MIN_TENSOR_INFO + n_fields * 12 > size - pos:
            raise _damaged(path, f"the header declares {n_tensors} tensors and {n_fields} fields, more than the file holds")
        for i in range(n_fields):
            start = pos
            string(f"metadata field {i}")
            key = bytes(data[start + 8 : pos])
            value(u32(f"metadata field {short_repr(key)}"), f"metadata field {short_repr(key)}")


def _quoted(text: str) -> str:
    """A library's message, which can quote names from the file: shortened, control characters escaped."""
    return repr(text[:200])[1:-1]


def _open_reader(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise CheckpointError(path, f"cannot be opened ({e.strerror or e})") from None
    if len(head) < 4:
        raise CheckpointError(path, "the file is empty or truncated (fewer than 4 bytes); it is not a GGUF file")
    if head != GGUF_MAGIC:
        raise CheckpointError(
            path, f"is not a GGUF file (it starts with {short_repr(head)}, a GGUF file starts with b'GGUF')"
        )
    _check_header(path)
    import gguf

    try:
        # mode "c": a private copy-on-write map, so torch.from_numpy gets writable arrays without copying
        return gguf.GGUFReader(path, "c")
    except ValueError as e:
        text = str(e)
        unknown = _UNKNOWN_TYPE.search(text)
        if unknown:
            raise CheckpointError(
                path,
                f"a tensor is stored as GGML type id {unknown.group(1)}, which this version of Darkroom does not "
                f"know; supported types: {', '.join(SUPPORTED_GGUF_TYPES)}",
            ) from None
        if "version" in text:
            raise CheckpointError(path, f"unsupported GGUF version ({text})") from None
        raise _damaged(path, _quoted(text)) from None
    except (IndexError, KeyError, OverflowError, UnicodeDecodeError, TypeError, MemoryError, OSError) as e:
        raise _damaged(path, _quoted(f"{type(e).__name__}: {e}")) from None


def open_gguf(path: str | Path) -> GGUFFile:
    return GGUFFile(path)


def is_gguf(path: str | Path) -> bool:
    """True when the file starts with the GGUF magic (cheap: reads 4 bytes)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False
