"""The Qwen3 tokenizer (byte-level BPE, 151,643 tokens + 26 added tokens) and the chat prompts Z-Image and
FLUX.2 [klein] wrap a prompt in before tokenizing, read by the ``tokenizers`` library.

``data/qwen3/`` holds Qwen's ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` (Apache-2.0, see
``data/qwen3/LICENSE-NOTE.md``). The pipeline is transformers' ``Qwen2Tokenizer`` (5.x): NFC normalisation, the
GPT-4-style split regex below, byte-level mapping, BPE, then the added tokens (``<|im_start|>``, ``<think>``,
...) matched literally in the text as in the reference, so a prompt that contains ``<|im_end|>`` gets that token.
No BOS/EOS is added; padding is on the right with ``<|endoftext|>``; truncation keeps the first tokens.

Both pipelines apply Qwen3's chat template to one user message with ``add_generation_prompt=True``; for a single
message the template reduces to the fixed strings in :data:`TEMPLATES` (the tests check them against
``apply_chat_template``):

* ``"zimage"`` (``ZImagePipeline``, ``enable_thinking=True``): ``<|im_start|>user\\n{p}<|im_end|>\\n<|im_start|>assistant\\n``
* ``"klein"`` (``Flux2KleinPipeline``, ``enable_thinking=False``): the same plus ``<think>\\n\\n</think>\\n\\n``
"""

from __future__ import annotations

import json
from functools import cache
from importlib.resources import as_file, files
from typing import NamedTuple

import torch

PAD_ID = 151643  # <|endoftext|>
IM_START_ID = 151644
IM_END_ID = 151645
MAX_LENGTH = 512  # both pipelines' max_sequence_length
TEMPLATES = {
    "zimage": "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n",
    "klein": "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
}
# transformers' Qwen2Tokenizer PRETOKENIZE_REGEX (Qwen's own tokenizer.json uses the same pattern)
SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


@cache
def _tokenizer():
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    data = files("core.models") / "data" / "qwen3"
    with as_file(data / "vocab.json") as vocab, as_file(data / "merges.txt") as merges:
        tok = Tokenizer(BPE.from_file(str(vocab), str(merges), continuing_subword_prefix="", end_of_word_suffix="",
                                      fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    config = json.loads((data / "tokenizer_config.json").read_text(encoding="utf-8"))
    for token_id, spec in sorted(config["added_tokens_decoder"].items(), key=lambda item: int(item[0])):
        token = AddedToken(spec["content"], single_word=spec["single_word"], lstrip=spec["lstrip"],
                           rstrip=spec["rstrip"], normalized=spec["normalized"], special=spec["special"])
        tok.add_tokens([token])  # added in id order, so each lands on its id; checked below
        if tok.token_to_id(spec["content"]) != int(token_id):
            raise RuntimeError(f"Qwen3 tokenizer data is inconsistent: {spec['content']!r} is not id {token_id}")
    return tok


class Qwen3Tokens(NamedTuple):
    input_ids: torch.Tensor  # [B, max_length] int64, right-padded with <|endoftext|>
    attention_mask: torch.Tensor  # [B, max_length] int64: 1 on tokens, 0 on padding
    truncated: list[int]  # per prompt, tokens cut off (0 = the whole templated prompt fits)


def apply_template(prompt: str, template: str | None) -> str:
    """``prompt`` inside the chat prompt of ``template`` ("zimage", "klein"), or unchanged for None."""
    if template is None:
        return prompt
    if template not in TEMPLATES:
        raise ValueError(f"Qwen3 prompt template {template!r} is unknown; valid: {', '.join(TEMPLATES)}")
    return TEMPLATES[template].format(prompt)


def encode(text: str) -> list[int]:
    """Token ids of ``text`` as it is (no template, no padding)."""
    return _tokenizer().encode(text, add_special_tokens=False).ids


def tokenize(prompts: str | list[str], template: str | None, max_length: int = MAX_LENGTH) -> Qwen3Tokens:
    """Ids of ``prompts`` wrapped in ``template``, truncated and right-padded to exactly ``max_length``, as the
    pipelines call the tokenizer (``padding="max_length", truncation=True``)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if max_length < 1:
        raise ValueError(f"Qwen3 max_length must be at least 1, got {max_length}")
    texts = [apply_template(p, template) for p in prompts]
    encodings = _tokenizer().encode_batch(texts, add_special_tokens=False)
    ids = torch.full((len(texts), max_length), PAD_ID, dtype=torch.int64)
    mask = torch.zeros((len(texts), max_length), dtype=torch.int64)
    truncated = []
    for row, encoding in enumerate(encodings):
        kept = encoding.ids[:max_length]
        truncated.append(len(encoding.ids) - len(kept))
        ids[row, : len(kept)] = torch.tensor(kept, dtype=torch.int64)
        mask[row, : len(kept)] = 1
    return Qwen3Tokens(ids, mask, truncated)


def vocab_size() -> int:
    """Tokens in use (151,669; the embedding matrices have 151,936 rows, the rest unused)."""
    return _tokenizer().get_vocab_size()
