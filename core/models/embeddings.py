"""Textual-inversion embeddings: files in ``models/embeddings`` used by name in the prompt, as A1111 does.

A1111 (``modules/textual_inversion/textual_inversion.py``, ``sd_hijack_clip.py``; facts only): an embedding is
one or more token vectors learned for a word. Wherever the prompt's tokens spell an embedding's name (its file
stem, tokenised as any text: "easynegative" matches "EasyNegative" but not "easynegatives"), those tokens are
replaced by the embedding's vectors, one position per vector, carrying the weight of the text around them. An
embedding never straddles two 77-token chunks: when it does not fit, the chunk is closed first. The vectors
replace the token-embedding lookup's output at those positions; position embeddings are added on top.

File layouts read:

| layout | tensors |
| --- | --- |
| A1111 ``.pt`` | ``{"string_to_param": {"*": [n, width]}, "name", "step", ...}`` |
| ``emb_params`` (``.safetensors`` / ``.pt``) | ``emb_params [n, width]`` |
| diffusers ``learned_embeds`` | ``{"<token>": [width]}`` (one vector) |
| SDXL | ``clip_l [n, 768]``, ``clip_g [n, 1280]`` |

``.pt`` files go through the weights-only unpickler (``core.models.checkpoint.unpickle``): no code from the
file runs. A vector set whose width differs from an encoder's is left out for that encoder (A1111 skips it).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from core.errors import CheckpointError

PLACEHOLDER = 0  # the token id standing in for an embedding's positions (its lookup is replaced)


@dataclass(frozen=True)
class Embedding:
    name: str
    path: Path
    vectors: dict[str, torch.Tensor]  # "clip_l" / "clip_g" (SDXL files) or "" (a single set) -> [n, width]
    identity: tuple  # (path, size, mtime_ns)

    def for_encoder(self, part: str, width: int) -> torch.Tensor | None:
        """The vectors for the text encoder ``part`` ("clip_l", "clip_g", ...) of ``width``, or None."""
        vectors = self.vectors.get(part, self.vectors.get(""))
        if vectors is None or vectors.shape[-1] != width:
            return None
        return vectors


def _as_vectors(path: Path, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.ndim not in (1, 2) or not value.is_floating_point():
        raise CheckpointError(path, "the embedding's vectors are not a [vectors, width] float tensor")
    return value.detach().float().reshape(-1, value.shape[-1]).clone()


def parse_embedding(path: Path, data: object) -> dict[str, torch.Tensor]:
    """The vector sets of an embedding file's contents (see the module docstring)."""
    if isinstance(data, dict):
        if "clip_l" in data or "clip_g" in data:
            return {k: _as_vectors(path, data[k]) for k in ("clip_l", "clip_g") if k in data}
        params = data.get("string_to_param")
        if isinstance(params, dict) and params:
            return {"": _as_vectors(path, next(iter(params.values())))}
        if "emb_params" in data:
            return {"": _as_vectors(path, data["emb_params"])}
        tensors = [v for v in data.values() if isinstance(v, torch.Tensor)]
        if len(tensors) == 1:
            return {"": _as_vectors(path, tensors[0])}
    raise CheckpointError(path, "this is not a textual-inversion embedding (no string_to_param, emb_params or "
                                "clip_l/clip_g vectors)")


def read_embedding(path: str | Path, name: str | None = None) -> Embedding:
    from core.models.checkpoint import SafetensorsSource, unpickle
    from core.models.safetensors_header import open_regular

    path = Path(path)
    st = os.stat(path)
    with open_regular(path) as f:  # a FIFO named *.pt is refused, not read forever
        head = f.read(9)
    if head[8:9] == b"{" or path.suffix.lower() == ".safetensors" and not head.startswith(b"PK"):
        source = SafetensorsSource(path)
        try:
            data: object = {k: source.get(k) for k in source.shapes}
        finally:
            source.close()
    else:
        data = unpickle(path)
    return Embedding(name or path.stem, path, parse_embedding(path, data), (str(path), st.st_size, st.st_mtime_ns))


class EmbeddingLibrary:
    """The embeddings a model folder offers (``files``: () -> [(name, path)], e.g. from
    ``ModelRegistry.embeddings``), read when a prompt first names them and kept while the file is unchanged."""

    def __init__(self, files: Callable[[], Sequence[tuple[str, Path]]]) -> None:
        self._files = files
        self._read: dict[str, Embedding] = {}

    def used(self, text: str) -> list[Embedding]:
        """The embeddings whose names occur in ``text`` (case-insensitive), read or from the cache."""
        lowered = text.lower()
        if not lowered.strip():
            return []
        out = []
        for name, path in self._files():
            stem = name.rsplit("/", 1)[-1]
            if not stem or stem.lower() not in lowered:
                continue
            try:
                st = os.stat(path)
            except OSError:
                continue
            hit = self._read.get(str(path))
            if hit is None or hit.identity[1:] != (st.st_size, st.st_mtime_ns):
                hit = self._read[str(path)] = read_embedding(path, stem)
            out.append(hit)
        return out

    def signature(self, text: str) -> tuple:
        """What the encoding of ``text`` depends on: the files of the embeddings it names."""
        return tuple(sorted(e.identity for e in self.used(text)))


EmbeddingTable = dict[int, list[tuple[tuple[int, ...], torch.Tensor]]]


def token_table(embeddings: Sequence[Embedding], tokenizer, part: str, width: int) -> EmbeddingTable:
    """first token of a name -> [(the name's tokens, vectors)], longest names first (A1111's order)."""
    table: EmbeddingTable = {}
    for embedding in embeddings:
        vectors = embedding.for_encoder(part, width)
        ids = tuple(tokenizer.encode(embedding.name))
        if vectors is None or not ids:
            continue
        table.setdefault(ids[0], []).append((ids, vectors))
    for entries in table.values():
        entries.sort(key=lambda e: -len(e[0]))
    return table


def match(table: EmbeddingTable | None, ids: Sequence[int], at: int) -> tuple[int, torch.Tensor] | None:
    """(tokens the name takes, vectors) when an embedding's name starts at ``ids[at]``."""
    if not table:
        return None
    for name, vectors in table.get(ids[at], ()):
        if tuple(ids[at : at + len(name)]) == name:
            return len(name), vectors
    return None


@contextmanager
def token_fixes(embedding: torch.nn.Embedding, chunks: Sequence) -> Iterator[None]:
    """While encoding ``chunks`` (one batch row each), the token lookup of ``embedding`` returns each chunk's
    fixes (``PromptChunk.fixes``: (position, vectors)) at their positions."""
    fixes = [(row, position, vectors) for row, chunk in enumerate(chunks) for position, vectors in chunk.fixes]
    if not fixes:
        yield
        return

    def hook(module, inputs, output):
        output = output.clone()
        for row, position, vectors in fixes:
            output[row, position : position + vectors.shape[0]] = vectors.to(output.device, output.dtype)
        return output

    handle = embedding.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def prompt_table(library: EmbeddingLibrary | None, text: str, tokenizer, part: str, width: int) -> EmbeddingTable | None:
    """The token table of the embeddings ``text`` names for one encoder, or None (no library, none named)."""
    if library is None:
        return None
    used = library.used(text)
    return token_table(used, tokenizer, part, width) if used else None
