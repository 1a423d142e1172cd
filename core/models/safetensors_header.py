"""Reading a ``.safetensors`` header without touching tensor data.

Layout: an 8-byte little-endian header length N, N bytes of JSON mapping each tensor name to
``{"dtype", "shape", "data_offsets": [start, end]}`` (offsets relative to the end of the header), an optional
``"__metadata__"`` string map, then the raw tensor bytes. Everything here is stdlib only, so the UI can inspect a
models folder without importing torch.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from core.errors import CheckpointError

# safetensors itself refuses headers above 100 MB; a real SDXL header is about 200 KB.
MAX_HEADER_BYTES = 100_000_000

# safetensors dtype code -> (torch dtype attribute name, bits per element)
DTYPES: dict[str, tuple[str, int]] = {
    "BOOL": ("bool", 8),
    "U8": ("uint8", 8),
    "I8": ("int8", 8),
    "F8_E4M3": ("float8_e4m3fn", 8),
    "F8_E5M2": ("float8_e5m2", 8),
    "I16": ("int16", 16),
    "U16": ("uint16", 16),
    "F16": ("float16", 16),
    "BF16": ("bfloat16", 16),
    "I32": ("int32", 32),
    "U32": ("uint32", 32),
    "F32": ("float32", 32),
    "F64": ("float64", 64),
    "I64": ("int64", 64),
    "U64": ("uint64", 64),
}


@dataclass(frozen=True)
class TensorEntry:
    dtype: str  # torch attribute name: "float16", "bfloat16", "float32", ...
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    file_size: int
    data_start: int  # 8 + header length
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v.shape for k, v in self.tensors.items()}

    @property
    def dtypes(self) -> dict[str, str]:
        return {k: v.dtype for k, v in self.tensors.items()}


def human_size(n: int) -> str:
    """Decimal units, as download pages and file managers show them."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} bytes"


# Magic numbers of files people drop into a models folder by mistake.
_MAGIC: list[tuple[bytes, str]] = [
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"%PDF", "a PDF document"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"7z\xbc\xaf", "a 7-Zip archive"),
    (b"Rar!", "a RAR archive"),
    (b"GGUF", "a GGUF file (llama.cpp / stable-diffusion.cpp format)"),
    (b"<!DOCTYPE", "an HTML page (a failed download?)"),
    (b"<html", "an HTML page (a failed download?)"),
]


def sniff(head: bytes) -> str | None:
    """Name the kind of a file that is certainly not a checkpoint, from its first bytes; None if unsure."""
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "a WebP image"
    if head.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer, not the model itself (download the actual file)"
    stripped = head.lstrip()
    if stripped[:1] in (b"{", b"["):
        return "a JSON file"
    if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "a text file"
    return None


def read_header(path: str | Path) -> SafetensorsHeader:
    """Parse and validate the header; reads only the first 8 + N bytes of the file."""
    path = Path(path)
    try:
        file_size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(
                    path,
                    f"the file is only {file_size} bytes long; a .safetensors checkpoint starts with an "
                    "8-byte header length followed by a JSON header, so it is empty or cut off",
                )
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or n + 8 > file_size:
                f.seek(0)
                kind = sniff(f.read(64))
                if kind is not None:
                    raise CheckpointError(
                        path, f"this is {kind}, not a model checkpoint (.safetensors or .ckpt)"
                    )
                raise CheckpointError(
                    path,
                    f"the header length field says {n:,} bytes but the file has {file_size:,} bytes "
                    f"(a valid header is at most {MAX_HEADER_BYTES // 1_000_000} MB and fits in the file); "
                    "it is not a safetensors file or is badly truncated",
                )
            raw = f.read(n)
    except FileNotFoundError:
        raise CheckpointError(path, "the file does not exist") from None
    except IsADirectoryError:
        raise CheckpointError(path, "this is a folder, not a checkpoint file") from None
    except PermissionError:
        raise CheckpointError(path, "the file cannot be read (permission denied)") from None

    try:
        doc = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(
            path,
            f"the safetensors header is not UTF-8 text (bad byte at position {e.start}); the file is corrupt",
        ) from None
    except json.JSONDecodeError as e:
        raise CheckpointError(
            path,
            f"the safetensors header is not valid JSON ({e.msg} at character {e.pos}); the file is corrupt "
            "or not a safetensors file",
        ) from None
    if not isinstance(doc, dict):
        raise CheckpointError(path, "the safetensors header is JSON but not an object mapping tensor names")

    data_start = 8 + n
    data_size = file_size - data_start
    metadata_raw = doc.pop("__metadata__", None) or {}
    metadata = {str(k): str(v) for k, v in metadata_raw.items()} if isinstance(metadata_raw, dict) else {}
    tensors: dict[str, TensorEntry] = {}
    data_end = 0
    for key, entry in doc.items():
        tensors[key] = entry = _parse_entry(path, key, entry, data_start)
        data_end = max(data_end, entry.end - data_start)
    if not tensors:
        raise CheckpointError(path, "the safetensors file contains no tensors")
    if data_end > data_size:
        raise CheckpointError(
            path,
            f"the file is truncated: its header says {human_size(data_end)} of tensor data but only "
            f"{human_size(max(data_size, 0))} are present; re-download it",
        )
    return SafetensorsHeader(path, file_size, data_start, tensors, metadata)


def _parse_entry(path: Path, key: str, entry: object, data_start: int) -> TensorEntry:
    def bad(what: str) -> CheckpointError:
        return CheckpointError(
            path, f"the safetensors header entry for tensor {key!r} {what}; the file is corrupt"
        )

    if not isinstance(entry, dict):
        raise bad("is not an object")
    code = entry.get("dtype")
    if code not in DTYPES:
        raise bad(f"has unknown dtype {code!r} (known: {', '.join(DTYPES)})")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise bad(f"has an invalid shape {shape!r} (expected a list of non-negative integers)")
    offsets = entry.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise bad(f"has invalid data_offsets {offsets!r} (expected [start, end] with 0 <= start <= end)")
    name, bits = DTYPES[code]
    expected = math.prod(shape) * bits // 8
    if offsets[1] - offsets[0] != expected:
        raise bad(f"spans {offsets[1] - offsets[0]} bytes but shape {shape} of {code} needs {expected}")
    return TensorEntry(name, tuple(shape), data_start + offsets[0], data_start + offsets[1])
