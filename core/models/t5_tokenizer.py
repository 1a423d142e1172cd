"""The T5 tokenizer (SentencePiece Unigram, 32,100 pieces) for Flux's T5-XXL, read by the ``tokenizers`` library.

``data/t5/tokenizer.json`` is the file FLUX.1 ships as ``tokenizer_2/`` (Apache-2.0, Google; see
``data/t5/LICENSE-NOTE.md``). Output matches transformers' ``T5TokenizerFast`` called as ``FluxPipeline`` calls
it: ``</s>`` appended, truncated to ``max_length`` (the content keeps ``max_length - 1`` tokens, then ``</s>``)
and right-padded with ``<pad>`` to exactly ``max_length``: 512 for dev, 256 for schnell (BFL's ``cli.py``).

As in the reference, the literal texts ``</s>``, ``<pad>``, ``<unk>`` and ``<extra_id_N>`` in a prompt are read
as those special tokens.
"""

from __future__ import annotations

import json
from functools import cache
from importlib.resources import files
from typing import NamedTuple

import torch

PAD_ID = 0  # <pad>
EOS_ID = 1  # </s>
MAX_LENGTH = {"dev": 512, "schnell": 256}


@cache
def _tokenizer():
    from tokenizers import Tokenizer  # lazily: only Flux jobs need it

    spec = json.loads((files("core.models") / "data" / "t5" / "tokenizer.json").read_text(encoding="utf-8"))
    # SentencePiece's conventions, as transformers' T5TokenizerFast (5.x) rebuilds them around the same vocabulary
    # and charsmap: split on whitespace, then "▁" before every word, also right after a special token glued to
    # text ("a</s>b" -> a, </s>, ▁, b). The file's own pipeline (one "▁" only at the start of the text) differs
    # there alone; its whitespace-run handling is what WhitespaceSplit already does.
    normalizers = spec["normalizer"].get("normalizers", [spec["normalizer"]])
    spec["normalizer"] = next(n for n in normalizers if n["type"] == "Precompiled")
    spec["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "WhitespaceSplit"},
            {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True},
        ],
    }
    return Tokenizer.from_str(json.dumps(spec))


class T5Tokens(NamedTuple):
    input_ids: torch.Tensor  # [B, max_length] int64: tokens, </s>, then <pad>
    attention_mask: torch.Tensor  # [B, max_length] int64: 1 up to and including </s>, 0 on padding
    truncated: list[int]  # per prompt, how many tokens were cut off (0 = the whole prompt fits)


def tokenize(prompts: str | list[str], max_length: int = 512) -> T5Tokens:
    """Token ids of ``prompts`` padded or truncated to ``max_length`` (``</s>`` included)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if max_length < 1:
        raise ValueError(f"T5 max_length must be at least 1 (room for </s>), got {max_length}")
    encodings = _tokenizer().encode_batch(list(prompts), add_special_tokens=False)
    ids = torch.full((len(prompts), max_length), PAD_ID, dtype=torch.int64)
    mask = torch.zeros((len(prompts), max_length), dtype=torch.int64)
    truncated = []
    for row, encoding in enumerate(encodings):
        content = encoding.ids[: max_length - 1]
        truncated.append(len(encoding.ids) - len(content))
        n = len(content) + 1
        ids[row, : n - 1] = torch.tensor(content, dtype=torch.int64)
        ids[row, n - 1] = EOS_ID
        mask[row, :n] = 1
    return T5Tokens(ids, mask, truncated)


def vocab_size() -> int:
    """Pieces in the tokenizer (32,100; the T5-XXL embedding has 32,128 rows, the last 28 unused)."""
    return _tokenizer().get_vocab_size()
