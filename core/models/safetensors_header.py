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
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from core.errors import CheckpointError

# safetensors itself refuses headers above 100 MB; a real SDXL header is about 200 KB.
MAX_HEADER_BYTES = 100_000_000
# A real header nests 3 levels ({name: {"shape": [...]}}); json recursion on a hostile one crashes the reader.
MAX_JSON_DEPTH = 16
# safetensors counts elements in a u64 and refuses shapes whose product overflows it.
MAX_ELEMENTS = 2**64 - 1

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

def file_kind(mode: int) -> str | None:
    """What a non-regular file is, from its ``st_mode``; None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    return "not a regular file"


def open_regular(path: Path):
    """Open a model file for reading, refusing anything but a regular file (never blocks).

    Opening a FIFO for reading waits for a writer forever, and a device never ends; ``O_NONBLOCK`` makes the
    open itself return at once, and ``fstat`` on the opened file (not the name, which could change in between)
    decides. Raises CheckpointError naming the file.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        if os.path.islink(path):
            target = os.readlink(path)
            raise CheckpointError(path, f"this is a symbolic link to {target!r}, which does not exist") from None
        raise CheckpointError(path, "the file does not exist") from None
    except IsADirectoryError:
        raise CheckpointError(path, "this is a folder, not a checkpoint file") from None
    except PermissionError:
        raise CheckpointError(path, "the file cannot be read (permission denied)") from None
    except OSError as e:
        raise CheckpointError(path, f"the file cannot be opened ({e.strerror or e})") from None
    try:
        mode = os.fstat(fd).st_mode
        kind = file_kind(mode)
        if kind == "a folder":
            raise CheckpointError(path, "this is a folder, not a checkpoint file")
        if kind is not None:
            raise CheckpointError(path, f"this is {kind}, not a checkpoint file (a model must be a regular file)")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


class _HeaderProblem(ValueError):
    """Raised from inside json.loads hooks; becomes a CheckpointError with the file name."""


_BRACKETS_ONLY = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def _without_strings(raw: bytes) -> bytes:
    """The JSON text with its string literals removed (brackets inside names and metadata do not nest)."""
    if b"\\" in raw:  # escaped backslashes first, then escaped quotes: what is left delimits strings
        raw = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    return b"".join(raw.split(b'"')[::2])  # 4x faster than a regex over a 400 KB header


def _nesting_exceeds(structure: bytes, limit: int) -> bool:
    """True if parsing JSON whose text without strings is ``structure`` would nest deeper than ``limit``."""
    brackets = structure.translate(_BRACKETS_ONLY, _NOT_BRACKETS)
    passes = 0
    while passes < limit:  # each pass removes the innermost pair of every branch: depth drops by one
        shorter = brackets.replace(b"[]", b"")
        if len(shorter) == len(brackets):
            break
        brackets, passes = shorter, passes + 1
    # Left: nothing (depth <= passes), or brackets never closed, with the removed levels inside them; short
    # unless hostile, and then the loop ends early. (Invalid JSON may be over-counted: json rejects it anyway.)
    depth = 0
    for b in brackets:
        depth += 1 if b == 0x5B else -1
        if depth + passes > limit:
            return True
        if depth < 0:
            return False
    return False


def _no_constants(name: str) -> object:
    raise _HeaderProblem(f"it contains {name}, which is not valid JSON")


def _unique_pairs(pairs: list[tuple[str, object]]) -> dict[str, object]:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise _HeaderProblem(f"it names {short_repr(key)} twice")
        seen.add(key)
    return dict(pairs)


def _count_keys(doc: object) -> int:
    """Keys of the top-level object and the objects directly in it: all a valid header has (deeper objects
    only undercount, which sends the caller to its exact check)."""
    if not isinstance(doc, dict):
        return 0
    return len(doc) + sum(len(v) for v in doc.values() if type(v) is dict)


def short_repr(value: object, limit: int = 80) -> str:
    """``repr`` of a header value for a message, shortened: hostile headers hold megabyte-long names."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _parse_json(path: Path, raw: bytes) -> object:
    if not raw.strip(b" \t\r\n\x00"):
        raise CheckpointError(
            path,
            "the safetensors header is empty (blank or zero bytes), as in a download that never finished; "
            "re-download the file",
        )
    structure = _without_strings(raw)
    if _nesting_exceeds(structure, MAX_JSON_DEPTH):
        raise CheckpointError(
            path,
            f"the safetensors header nests more than {MAX_JSON_DEPTH} levels deep (a real one has 3); "
            "the file is corrupt or made to crash programs that read it",
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(
            path,
            f"the safetensors header is not UTF-8 text (bad byte at position {e.start}); the file is corrupt",
        ) from None
    try:
        doc = json.loads(text, parse_constant=_no_constants)
        # json.loads keeps the last of two equal keys silently. Outside strings a colon only ends a key, so
        # fewer keys counted than colons may mean duplicates; only then the slower hook (3x json's time) decides
        if structure.count(b":") != _count_keys(doc):
            json.loads(text, object_pairs_hook=_unique_pairs)
        return doc
    except _HeaderProblem as e:
        raise CheckpointError(path, f"the safetensors header is invalid: {e}; the file is corrupt") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(
            path,
            f"the safetensors header is not valid JSON ({e.msg} at character {e.pos}); the file is corrupt "
            "or not a safetensors file",
        ) from None
    except RecursionError:  # not reached after the nesting check; kept so no reader can crash on it
        raise CheckpointError(path, "the safetensors header nests too deeply to read; the file is corrupt") from None
    except ValueError:  # Python refuses to convert integers of more than 4300 digits
        raise CheckpointError(
            path, "the safetensors header holds a number thousands of digits long; the file is corrupt"
        ) from None


def _encodable(text: str) -> bool:
    """False for strings with lone surrogates (a JSON escape like \\ud800): they cannot be printed or stored."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_header(path: str | Path) -> SafetensorsHeader:
    """Parse and validate the header; reads only the first 8 + N bytes of the file.

    Validation follows the safetensors format as its own loader enforces it, so every file it would refuse
    gets a message here instead: the tensors' byte ranges, sorted, tile the data area exactly (from 0, no
    gaps, no overlaps, nothing after the last), ``__metadata__`` is a map of strings, and the JSON is plain
    (no NaN, no duplicate names, no absurd nesting).
    """
    path = Path(path)
    with open_regular(path) as f:
        file_size = os.fstat(f.fileno()).st_size
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
                raise CheckpointError(path, f"this is {kind}, not a model checkpoint (.safetensors or .ckpt)")
            raise CheckpointError(
                path,
                f"the header length field says {n:,} bytes but the file has {file_size:,} bytes "
                f"(a valid header is at most {MAX_HEADER_BYTES // 1_000_000} MB and fits in the file); "
                "it is not a safetensors file or is badly truncated",
            )
        try:
            raw = f.read(n)
        except OSError as e:
            raise CheckpointError(path, f"the file cannot be read ({e.strerror or e})") from None
    if len(raw) < n:  # it shrank since its size was read
        raise CheckpointError(path, "the file is cut off inside its header (it changed while being read)")

    doc = _parse_json(path, raw)
    if not isinstance(doc, dict):
        raise CheckpointError(path, "the safetensors header is JSON but not an object mapping tensor names")

    data_start = 8 + n
    data_size = file_size - data_start
    metadata = _parse_metadata(path, doc.pop("__metadata__", None))
    tensors: dict[str, TensorEntry] = {}
    escapes = b"\\u" in raw  # only a backslash-u escape makes a lone surrogate: most headers skip the check
    for key, entry in doc.items():
        if escapes and not _encodable(key):
            raise CheckpointError(
                path, f"the safetensors header has a tensor name {short_repr(key)} that is not valid Unicode; "
                "the file is corrupt"
            )
        tensors[key] = _parse_entry(path, key, entry, data_start)
    if not tensors:
        raise CheckpointError(path, "the safetensors file contains no tensors")
    _check_layout(path, tensors, data_start, data_size)
    return SafetensorsHeader(path, file_size, data_start, tensors, metadata)


def _parse_metadata(path: Path, value: object) -> dict[str, str]:
    if value is None:  # absent, or null (which safetensors accepts)
        return {}
    if not isinstance(value, dict):
        raise CheckpointError(
            path,
            f"the safetensors header's __metadata__ is {_json_type(value)}, but it must be an object of "
            "strings; the file is corrupt",
        )
    for key, item in value.items():
        if not isinstance(item, str):
            raise CheckpointError(
                path,
                f"the safetensors header's __metadata__ entry {short_repr(key)} is {_json_type(item)}, but "
                "metadata values must be strings; the file is corrupt",
            )
        if not (_encodable(key) and _encodable(item)):
            raise CheckpointError(
                path, f"the safetensors header's __metadata__ entry {short_repr(key)} is not valid Unicode; "
                "the file is corrupt"
            )
    return dict(value)


def _json_type(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "null"


def _check_layout(path: Path, tensors: dict[str, TensorEntry], data_start: int, data_size: int) -> None:
    """Sorted by offset, the tensors must tile the data area exactly, as safetensors requires."""
    data_end = max(t.end for t in tensors.values()) - data_start
    if data_end > data_size:
        raise CheckpointError(
            path,
            f"the file is truncated: its header says {human_size(data_end)} of tensor data but only "
            f"{human_size(max(data_size, 0))} are present; re-download it",
        )
    position, previous = 0, None
    for key, t in sorted(tensors.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        start, end = t.start - data_start, t.end - data_start
        if start > position and previous is None:
            raise CheckpointError(
                path,
                f"the safetensors header says the first tensor, {short_repr(key)}, starts at byte {start:,} of the "
                "data area, but tensor data must start at 0; the offsets are shifted, so the file is corrupt",
            )
        if start > position:
            raise CheckpointError(
                path,
                f"the safetensors header leaves {start - position:,} bytes unused between tensors "
                f"{short_repr(previous)} and {short_repr(key)} (tensor data must follow on without gaps); "
                "the file is corrupt",
            )
        if start < position:
            raise CheckpointError(
                path,
                f"the safetensors header gives tensors {short_repr(previous)} and {short_repr(key)} overlapping "
                f"bytes (data offset {start:,} is inside the previous tensor, which ends at {position:,}); "
                "the file is corrupt",
            )
        position, previous = end, key
    if position < data_size:
        raise CheckpointError(
            path,
            f"the file has {data_size - position:,} bytes after its last tensor that the header does not "
            "account for (two files joined, or a corrupt header); re-download it",
        )


def _parse_entry(path: Path, key: str, entry: object, data_start: int) -> TensorEntry:
    def bad(what: str) -> CheckpointError:
        return CheckpointError(path, f"the safetensors header entry for tensor {short_repr(key)} {what}; the file is corrupt")

    if not isinstance(entry, dict):
        raise bad("is not an object")
    code = entry.get("dtype")
    if not isinstance(code, str) or code not in DTYPES:
        raise bad(f"has unknown dtype {short_repr(code)} (known: {', '.join(DTYPES)})")
    shape = entry.get("shape")
    # type() rather than isinstance(): JSON true/false are bools, which Python counts as ints
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise bad(f"has an invalid shape {short_repr(shape)} (expected a list of non-negative integers)")
    offsets = entry.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise bad(f"has invalid data_offsets {short_repr(offsets)} (expected [start, end] with 0 <= start <= end)")
    name, bits = DTYPES[code]
    if len(shape) <= 64:
        elements = math.prod(shape)
    else:  # stop at the first overflow: multiplying thousands of huge numbers takes minutes
        elements = 1
        for d in shape:
            elements *= d
            if elements > MAX_ELEMENTS:
                break
    if elements > MAX_ELEMENTS:
        raise bad(f"has shape {short_repr(shape)} with more elements than any file can hold")
    expected = elements * bits // 8
    if offsets[1] - offsets[0] != expected:
        raise bad(f"spans {offsets[1] - offsets[0]} bytes but shape {short_repr(shape)} of {code} needs {expected}")
    return TensorEntry(name, tuple(shape), data_start + offsets[0], data_start + offsets[1])


# ---- small tensors without torch ----------------------------------------------------------------------------

MAX_FLOATS_BYTES = 1 << 20  # what read_floats reads at most: detection markers are a few hundred values
_STRUCT = {"float16": "e", "float32": "f", "float64": "d"}


def read_floats(header: SafetensorsHeader, key: str) -> list[float]:
    """The values of one small floating-point tensor (F16, BF16, F32, F64) as Python floats, stdlib only: for
    the few detection guesses that need tensor data on the UI thread (SD2.x's v-prediction bias)."""
    entry = header.tensors[key]
    if entry.dtype not in (*_STRUCT, "bfloat16"):
        raise CheckpointError(header.path, f"tensor {short_repr(key)} is {entry.dtype}, not a float tensor")
    if entry.nbytes > MAX_FLOATS_BYTES:
        raise CheckpointError(header.path, f"tensor {short_repr(key)} is too large to read here ({entry.nbytes} bytes)")
    with open_regular(header.path) as f:
        try:
            f.seek(entry.start)
            raw = f.read(entry.nbytes)
        except OSError as e:
            raise CheckpointError(header.path, f"the file cannot be read ({e.strerror or e})") from None
    if len(raw) != entry.nbytes:
        raise CheckpointError(header.path, f"tensor {short_repr(key)} is cut short; the file is truncated")
    if entry.dtype == "bfloat16":  # the top half of a float32
        halves = struct.unpack(f"<{len(raw) // 2}H", raw)
        return list(struct.unpack(f"<{len(halves)}f", struct.pack(f"<{len(halves)}I", *(h << 16 for h in halves))))
    code = _STRUCT[entry.dtype]
    return list(struct.unpack(f"<{len(raw) // struct.calcsize(code)}{code}", raw))
