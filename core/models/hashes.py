"""Model file hashes (A1111's ``Model hash``), cached by path, size and mtime; stdlib only, so a front end's
thread can ask what is known without importing torch.

``file_sha256`` hashes a file once and remembers it in ``model-hashes.json`` in the data folder (the loader
calls it for every checkpoint it loads); ``cached_sha256`` only looks in that cache and never reads the model,
so it is cheap enough wherever a model file's hash is merely nice to know.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from core.errors import CheckpointError
from core.models.safetensors_header import open_regular

HASH_CACHE_NAME = "model-hashes.json"
# One writer at a time in this process (the TUI may hash a file for a notification while the worker hashes the
# one it loads): each adds its entry to what the other wrote. Another process's write may still drop one entry,
# which costs only a second hash of that file later.
_WRITE_LOCK = threading.Lock()


def _hash_cache_path() -> Path:
    from core.paths import data_dir

    return data_dir() / HASH_CACHE_NAME


def _read_cache() -> dict[str, Any]:
    try:
        cache = json.loads(_hash_cache_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def _entry_hash(cache: Mapping[str, Any], path: Path, st: os.stat_result) -> str | None:
    entry = cache.get(str(path))
    if isinstance(entry, Mapping) and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
        return str(entry["sha256"])
    return None


def cached_sha256(path: str | Path) -> str | None:
    """The file's SHA-256 when the cache has it for the file as it is now (same size and mtime), else None.
    Never hashes: one stat and a read of the small cache file."""
    path = Path(path).resolve()
    try:
        st = path.stat()
    except OSError:
        return None
    return _entry_hash(_read_cache(), path, st)


def file_sha256(path: str | Path, *, _digest: Callable[[Path], str] | None = None) -> str:
    """Full SHA-256 of a file, cached by (absolute path, size, mtime_ns) so each file is hashed once."""
    path = Path(path).resolve()
    try:
        st = path.stat()
    except FileNotFoundError:
        raise CheckpointError(path, "the file does not exist") from None
    cache = _read_cache()
    known = _entry_hash(cache, path, st)
    if known is not None:
        return known
    digest = (_digest or _sha256)(path)
    with _WRITE_LOCK:
        cache = _read_cache()  # what was added while this file was hashed (minutes for a big one) stays
        cache[str(path)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        cache_path = _hash_cache_path()
        tmp = cache_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, cache_path)  # atomic: a concurrent reader sees the old or the new cache, never half
    return digest


def _sha256(path: Path) -> str:
    with open_regular(path) as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def model_hash(path: str | Path) -> str:
    """A1111's ``Model hash``: the first 10 hex digits of the file's SHA-256."""
    return file_sha256(path)[:10]


__all__ = ["HASH_CACHE_NAME", "cached_sha256", "file_sha256", "model_hash"]
