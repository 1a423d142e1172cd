"""CLIP byte-level BPE tokenizer (the one shared by SD1.x, SD2.x, SDXL and Flux CLIP-L).

Produces the same ids as transformers' ``CLIPTokenizer`` built from the same ``vocab.json``/``merges.txt``
(transformers 5.x, whose CLIP tokenizer is the ``tokenizers``-backed one). Its pipeline, restated:

1. ``<|startoftext|>`` / ``<|endoftext|>`` written literally in the raw text become their special ids.
2. Normalise: Unicode NFC, every run of whitespace -> one space, lowercase (character by character, so a
   final capital sigma becomes "σ", not "ς").
3. Pre-tokenise with ``<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|\\p{L}+|\\p{N}|[^\\s\\p{L}\\p{N}]+``
   keeping the matches (whitespace is dropped); the byte-level stage then re-splits with GPT-2's regex,
   which only changes a lowercased special token (-> "<|", "endoftext", "|>"). Python's ``re`` has no ``\\p{..}``, so the scan below is
   hand-written on top of ``unicodedata.category``.
4. Each piece's UTF-8 bytes are mapped to printable characters (GPT-2's byte-to-unicode table), ``</w>`` is
   appended to the last character, and merges are applied lowest rank first.

transformers' older pure-Python tokenizer without ``ftfy`` additionally split CJK characters apart and dropped
control characters; with ``ftfy`` (what A1111 runs) it also NFC-normalised and grouped CJK runs as here. ftfy's
other repairs (curly quotes, mojibake, full-width forms) are not reproduced.
"""

from __future__ import annotations

import json
import unicodedata
from functools import lru_cache
from importlib.resources import files

BOS_ID = 49406  # <|startoftext|>
EOS_ID = 49407  # <|endoftext|>
CONTEXT_LENGTH = 77  # BOS + 75 tokens + EOS
CHUNK_TOKENS = CONTEXT_LENGTH - 2

_SPECIALS = {"<|startoftext|>": BOS_ID, "<|endoftext|>": EOS_ID}
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
# Unicode White_Space, which is what the reference regex's \s matches (Python's str.isspace also accepts
# U+001C..U+001F, which the reference keeps as punctuation).
_WHITESPACE = frozenset(
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)

# Character classes used by the pre-tokeniser.
_SPACE, _LETTER, _NUMBER, _OTHER = 0, 1, 2, 3


@lru_cache(maxsize=4096)
def _char_class(ch: str) -> int:
    if ch in _WHITESPACE:
        return _SPACE
    major = unicodedata.category(ch)[0]
    if major == "L":
        return _LETTER
    if major == "N":
        return _NUMBER
    return _OTHER


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (printable Latin-1 bytes map to themselves)."""
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    )
    table = {b: chr(b) for b in keep}
    shift = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shift)
            shift += 1
    return table


def normalize(text: str) -> str:
    """NFC, whitespace runs -> one space, per-character lowercase (the reference normaliser)."""
    text = unicodedata.normalize("NFC", text)
    out = []
    in_space = False
    for ch in text:
        if ch in _WHITESPACE:
            if not in_space:
                out.append(" ")
            in_space = True
            continue
        in_space = False
        out.append(ch.lower())
    return "".join(out)


def pre_tokenize(text: str) -> list[str]:
    """Split normalised text into BPE words (see the module docstring, step 3)."""
    pieces = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        cls = _char_class(ch)
        if cls == _SPACE:
            i += 1
            continue
        if ch == "<":
            special = next((s for s in _SPECIALS if text.startswith(s, i)), None)
            if special:
                # The byte-level stage re-splits it with GPT-2's regex: punctuation / letters / punctuation.
                pieces += ["<|", special[2:-2], "|>"]
                i += len(special)
                continue
        if ch == "'":
            contraction = next((c for c in _CONTRACTIONS if text.startswith(c, i)), None)
            if contraction:
                pieces.append(contraction)
                i += len(contraction)
                continue
        if cls == _NUMBER:  # digits are single tokens
            pieces.append(ch)
            i += 1
            continue
        j = i + 1
        while j < n and _char_class(text[j]) == cls:
            j += 1
        pieces.append(text[i:j])
        i = j
    return pieces


class CLIPTokenizer:
    """CLIP BPE tokenizer; ``encode`` returns ids without BOS/EOS.

    ``pad_id`` fills windows after EOS: 49407 (EOS) for OpenAI CLIP-L, 0 for the OpenCLIP encoders.
    """

    def __init__(self, pad_id: int = EOS_ID) -> None:
        data = files("core.models") / "data" / "clip"
        self.encoder: dict[str, int] = json.loads((data / "vocab.json").read_text(encoding="utf-8"))
        lines = (data / "merges.txt").read_text(encoding="utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1:] if line.strip()]
        self.ranks: dict[tuple[str, str], int] = {pair: rank for rank, pair in enumerate(merges)}
        self.byte_encoder = _bytes_to_unicode()
        self.bos_id = BOS_ID
        self.eos_id = EOS_ID
        self.pad_id = pad_id
        self._cache: dict[str, list[int]] = {}

    def _bpe(self, word: str) -> list[int]:
        """Ids of one pre-tokenised word (already byte-mapped)."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        symbols = list(word)
        symbols[-1] += "</w>"
        ranks = self.ranks
        while len(symbols) > 1:
            best, best_rank = None, None
            for pair in zip(symbols, symbols[1:]):
                rank = ranks.get(pair)
                if rank is not None and (best_rank is None or rank < best_rank):
                    best, best_rank = pair, rank
            if best is None:
                break
            first, second = best
            merged = []
            i = 0
            while i < len(symbols):
                if i < len(symbols) - 1 and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        ids = [self.encoder[s] for s in symbols]
        if len(self._cache) < 100_000:  # prompts reuse a small vocabulary; bound memory for odd inputs
            self._cache[word] = ids
        return ids

    def _encode_plain(self, text: str, out: list[int]) -> None:
        for piece in pre_tokenize(normalize(text)):
            out.extend(self._bpe("".join(self.byte_encoder[b] for b in piece.encode("utf-8"))))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with no BOS/EOS and no length limit."""
        ids: list[int] = []
        start = 0
        while True:
            # Literal special tokens in the raw text map straight to their ids (matched before normalising).
            hits = [(pos, s) for s in _SPECIALS if (pos := text.find(s, start)) >= 0]
            if not hits:
                break
            pos, special = min(hits)
            self._encode_plain(text[start:pos], ids)
            ids.append(_SPECIALS[special])
            start = pos + len(special)
        self._encode_plain(text[start:], ids)
        return ids

    def window(self, ids: list[int], length: int = CONTEXT_LENGTH) -> list[int]:
        """BOS + up to ``length - 2`` ids (extra ones dropped) + EOS, padded with ``pad_id`` to ``length``."""
        body = list(ids[: length - 2])
        out = [self.bos_id, *body, self.eos_id]
        return out + [self.pad_id] * (length - len(out))

    def encode_window(self, text: str, length: int = CONTEXT_LENGTH) -> list[int]:
        """One fixed-length window of ``text``, truncated like ``truncation=True, padding="max_length"``."""
        return self.window(self.encode(text), length)


_shared: dict[int, CLIPTokenizer] = {}


def get_tokenizer(pad_id: int = EOS_ID) -> CLIPTokenizer:
    """A process-wide tokenizer per pad id, so the vocabulary is read once."""
    tok = _shared.get(pad_id)
    if tok is None:
        tok = _shared[pad_id] = CLIPTokenizer(pad_id)
    return tok
