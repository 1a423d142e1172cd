"""core.models.hashes: A1111's model hash, hashed once per file version; the cache-only lookup never hashes."""

from __future__ import annotations

import hashlib
import json
import threading

from core.models import hashes
from core.models.hashes import cached_sha256, file_sha256, model_hash
from core.paths import data_dir


def _no_rehash(path):
    raise AssertionError(f"hashed {path}")


def test_model_hash_is_sha256_prefix_and_cached(monkeypatch, tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"weights" * 1000)
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert model_hash(path) == expected[:10]

    real = hashes._sha256
    monkeypatch.setattr(hashes, "_sha256", _no_rehash)
    assert model_hash(path) == expected[:10]
    cache = json.loads((data_dir() / hashes.HASH_CACHE_NAME).read_text())
    assert cache[str(path.resolve())]["sha256"] == expected

    # A changed file (new size and mtime) is hashed again.
    monkeypatch.setattr(hashes, "_sha256", real)
    with open(path, "ab") as f:
        f.write(b"x")
    assert model_hash(path) == hashlib.sha256(path.read_bytes()).hexdigest()[:10] != expected[:10]


def test_cached_sha256_only_looks_in_the_cache(monkeypatch, tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"a" * 100)
    monkeypatch.setattr(hashes, "_sha256", _no_rehash)
    assert cached_sha256(path) is None  # never hashed: not known, and not hashed now
    assert cached_sha256(tmp_path / "missing.safetensors") is None
    monkeypatch.undo()
    digest = file_sha256(path)
    monkeypatch.setattr(hashes, "_sha256", _no_rehash)
    assert cached_sha256(path) == digest
    path.write_bytes(b"b" * 101)  # another file under the same name: its old hash is not its hash
    assert cached_sha256(path) is None


def test_two_threads_hashing_at_once_both_succeed_and_both_are_kept(tmp_path):
    """The TUI may hash a file for a notification while the worker hashes the one it loads: neither write
    may fail or drop the other's entry."""
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    one.write_bytes(b"1" * 10)
    two.write_bytes(b"2" * 10)
    both = threading.Barrier(2)

    def slow(path):
        both.wait(timeout=10)  # both have read the cache before either writes it
        return hashlib.sha256(path.read_bytes()).hexdigest()

    errors: list[BaseException] = []

    def run(path):
        try:
            file_sha256(path, _digest=slow)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(p,)) for p in (one, two)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert cached_sha256(one) == hashlib.sha256(b"1" * 10).hexdigest()
    assert cached_sha256(two) == hashlib.sha256(b"2" * 10).hexdigest()
