"""A1111 prompt syntax -> CLIP conditioning.

Syntax (A1111 "attention/emphasis", restated from its documentation):

- ``(text)`` multiplies the weight of ``text`` by 1.1, ``((text))`` by 1.21, ``[text]`` divides by 1.1;
  ``(text:1.3)`` multiplies by 1.3 instead. Nesting multiplies.
- ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are literal characters; any other backslash is dropped.
- An opening bracket never closed still applies its factor to everything after it; a closer with no opener
  (and ``:1.3)`` with no open round bracket) is literal text.
- ``BREAK`` (uppercase, a whole word) ends the current 75-token chunk. Deviation: A1111 lets brackets
  around ``BREAK`` turn it back into the literal word; here it always breaks, and brackets keep weighting the
  text on both sides.
- A malformed weight such as ``(a:1.2.3)`` (an error in A1111) reads as literal ``:1.2.3`` closed by ``)``.

Conditioning: adjacent pieces of equal weight are joined, each piece is tokenised separately and every token
keeps its piece's weight. Tokens are packed into chunks of 75; when a chunk is full and the last comma is at
most ``comma_backtrack`` (A1111 default 20) tokens back, the tokens after that comma move to the next chunk.
Each chunk becomes BOS + 75 tokens (padded) + EOS = 77 ids, is encoded on its own, and the chunks are
concatenated along the token axis: ``[1, 77 * k, width]``. Weights are applied as A1111's "Original"
emphasis: ``z *= w``, then ``z`` is rescaled so its mean equals the unweighted mean (per chunk).

``parse_prompt`` and ``build_chunks`` are pure and hashable-output; ``encode_chunks``/``encode_prompt``
depend only on (model weights, prompt, clip_skip), the boundary a conditioning cache keys on.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import NamedTuple

import torch

from core.models.clip import CLIPTextModel
from core.models.conditioning import Conditioning, EncoderSettings
from core.models.tokenizer import CHUNK_TOKENS, CLIPTokenizer, get_tokenizer

ROUND = 1.1  # factor of ( )
SQUARE = 1 / 1.1  # factor of [ ]
COMMA_BACKTRACK = 20  # A1111 default for "comma padding backtrack"

_BREAK = re.compile(r"\s*\bBREAK\b\s*")
_WEIGHT = re.compile(r":\s*([+-]?[.\d]+)\s*\)")
_SPECIAL = set("\\()[]:")


class PromptChunk(NamedTuple):
    tokens: tuple[int, ...]  # 77 ids: BOS, up to 75 prompt tokens, EOS, padding
    weights: tuple[float, ...]  # 77 multipliers (1.0 for BOS, EOS and padding)
    fixes: tuple = ()  # (position in the 77, vectors [n, width]): textual-inversion embeddings placed there


def parse_prompt(text: str) -> list[list[tuple[str, float]]]:
    """Split an A1111 prompt into BREAK-separated segments of ``(text, weight)`` pieces.

    Adjacent pieces of equal weight are joined and empty pieces dropped. An empty segment stays in the list
    (a leading or doubled BREAK makes an empty chunk, as in A1111). ``parse_prompt("")`` is ``[[]]``.
    """
    pieces: list[list | None] = []  # [text, weight] or None for a BREAK
    round_open: list[int] = []  # index into ``pieces`` where each open bracket's range starts
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            if piece is not None:
                piece[1] *= factor

    def add_text(run: str) -> None:
        for i, part in enumerate(_BREAK.split(run)):
            if i:
                pieces.append(None)
            pieces.append([part, 1.0])

    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            if i + 1 < n and text[i + 1] in "()[]\\":
                pieces.append([text[i + 1], 1.0])
                i += 2
            else:
                i += 1  # a backslash escaping nothing is dropped
        elif ch == "(":
            round_open.append(len(pieces))
            i += 1
        elif ch == "[":
            square_open.append(len(pieces))
            i += 1
        elif ch == ")" and round_open:
            scale(round_open.pop(), ROUND)
            i += 1
        elif ch == "]" and square_open:
            scale(square_open.pop(), SQUARE)
            i += 1
        elif ch == ":" and round_open and (m := _WEIGHT.match(text, i)) and _is_float(m.group(1)):
            scale(round_open.pop(), float(m.group(1)))
            i = m.end()
        elif ch in _SPECIAL:  # ':' that is not a weight, or a closer with nothing open
            pieces.append([ch, 1.0])
            i += 1
        else:
            j = i + 1
            while j < n and text[j] not in _SPECIAL:
                j += 1
            add_text(text[i:j])
            i = j
    for start in round_open:  # unclosed openers weight the rest of the prompt
        scale(start, ROUND)
    for start in square_open:
        scale(start, SQUARE)

    segments: list[list[tuple[str, float]]] = [[]]
    for piece in pieces:
        if piece is None:
            segments.append([])
            continue
        text_piece, weight = piece
        if not text_piece:
            continue
        seg = segments[-1]
        if seg and seg[-1][1] == weight:
            seg[-1] = (seg[-1][0] + text_piece, weight)
        else:
            seg.append((text_piece, weight))
    return segments


def _is_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def build_chunks(
    tokenizer: CLIPTokenizer, prompt: str, comma_backtrack: int = COMMA_BACKTRACK, embeddings: Mapping | None = None
) -> list[PromptChunk]:
    """Tokenise a prompt into weighted 77-token chunks (see the module docstring). ``embeddings``
    (``core.models.embeddings.token_table``): names whose tokens become textual-inversion vectors."""
    from core.models.embeddings import PLACEHOLDER, match

    comma = tokenizer.encoder[",</w>"]
    chunks: list[PromptChunk] = []
    tokens: list[int] = []
    weights: list[float] = []
    fixes: list[tuple[int, torch.Tensor]] = []  # (index in ``tokens``, vectors)
    last_comma = -1  # index in ``tokens`` of the latest comma, -1 if none in this chunk

    def close() -> None:
        nonlocal tokens, weights, fixes, last_comma
        ids = tokenizer.window(tokens)
        chunks.append(PromptChunk(tuple(ids), tuple([1.0, *weights] + [1.0] * (len(ids) - 1 - len(weights))),
                                  tuple((at + 1, vectors) for at, vectors in fixes)))  # +1: after BOS
        tokens, weights, fixes, last_comma = [], [], [], -1

    for index, segment in enumerate(parse_prompt(prompt)):
        if index:  # BREAK
            close()
        for text, weight in segment:
            ids = tokenizer.encode(text)
            at = 0
            while at < len(ids):
                found = match(embeddings, ids, at)
                if found is not None:  # an embedding's name: its vectors, kept within one chunk (A1111)
                    length, vectors = found
                    count = min(vectors.shape[0], CHUNK_TOKENS)
                    if len(tokens) + count > CHUNK_TOKENS:
                        close()
                    fixes.append((len(tokens), vectors[:count]))
                    tokens.extend([PLACEHOLDER] * count)
                    weights.extend([weight] * count)
                    at += length
                    continue
                token = ids[at]
                at += 1
                if token == comma:
                    last_comma = len(tokens)
                elif (
                    len(tokens) == CHUNK_TOKENS
                    and last_comma != -1
                    and CHUNK_TOKENS - last_comma <= comma_backtrack
                ):
                    # Keep the phrase after the last comma whole: move it into the next chunk.
                    keep = last_comma + 1
                    moved_tokens, moved_weights = tokens[keep:], weights[keep:]
                    moved_fixes = [(i - keep, v) for i, v in fixes if i >= keep]
                    tokens, weights = tokens[:keep], weights[:keep]
                    fixes = [(i, v) for i, v in fixes if i < keep]
                    close()
                    tokens, weights, fixes = moved_tokens, moved_weights, moved_fixes
                if len(tokens) == CHUNK_TOKENS:
                    close()
                tokens.append(token)
                weights.append(weight)
    if tokens or not chunks:
        close()
    return chunks


def apply_emphasis(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111 "Original" emphasis on ``z`` ``[k, 77, D]`` with ``weights`` ``[k, 77]``, in float32.

    Scaling token vectors changes the overall magnitude the UNet sees; restoring each chunk's mean keeps
    that magnitude while shifting emphasis between tokens.
    """
    if bool((weights == 1).all()):
        return z
    zf = z.float()
    original_mean = zf.mean(dim=(1, 2), keepdim=True)
    zf = zf * weights.to(zf.device, torch.float32)[..., None]
    zf = zf * (original_mean / zf.mean(dim=(1, 2), keepdim=True))
    return zf.to(z.dtype)


@torch.no_grad()
def encode_chunks(model: CLIPTextModel, chunks: list[PromptChunk], clip_skip: int = 1) -> torch.Tensor:
    """Encode chunks in one batch and concatenate them: ``[1, 77 * len(chunks), width]``."""
    from core.models.embeddings import token_fixes

    lookup = model.text_model.embeddings.token_embedding
    ids = torch.tensor([c.tokens for c in chunks], dtype=torch.long, device=lookup.weight.device)
    weights = torch.tensor([c.weights for c in chunks], dtype=torch.float32)
    with token_fixes(lookup, chunks):
        z = apply_emphasis(model(ids, clip_skip=clip_skip), weights)  # [k, 77, D]
    return z.reshape(1, -1, z.shape[-1])


def encode_prompt(
    model: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    prompt: str,
    clip_skip: int = 1,
    comma_backtrack: int = COMMA_BACKTRACK,
) -> torch.Tensor:
    """Conditioning of one A1111 prompt: ``[1, 77 * chunks, width]``."""
    return encode_chunks(model, build_chunks(tokenizer, prompt, comma_backtrack), clip_skip)


def pad_to_same_length(
    cond: torch.Tensor, uncond: torch.Tensor, empty: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Append copies of ``empty`` (the empty prompt's one chunk, ``[1, 77, D]``) to the shorter tensor.

    Needed to batch cond and uncond in one UNet call. A1111 does the same under its "pad prompt/negative
    prompt to be same length" option; without it A1111 runs them in separate calls, which differs slightly.
    """
    chunk = empty.shape[1]
    if cond.shape[1] % chunk or uncond.shape[1] % chunk:
        raise ValueError(
            f"conditioning lengths {cond.shape[1]}, {uncond.shape[1]} are not multiples of {chunk}"
        )
    missing = (cond.shape[1] - uncond.shape[1]) // chunk
    if missing > 0:
        uncond = torch.cat([uncond, empty.to(uncond.dtype).repeat(uncond.shape[0], missing, 1)], dim=1)
    elif missing < 0:
        cond = torch.cat([cond, empty.to(cond.dtype).repeat(cond.shape[0], -missing, 1)], dim=1)
    return cond, uncond


def encode_prompts(
    model: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    positive: str,
    negative: str,
    clip_skip: int = 1,
    comma_backtrack: int = COMMA_BACKTRACK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond, uncond), each ``[1, 77 * k, width]`` with the same k (the shorter padded with empty chunks)."""
    cond = encode_prompt(model, tokenizer, positive, clip_skip, comma_backtrack)
    uncond = encode_prompt(model, tokenizer, negative, clip_skip, comma_backtrack)
    if cond.shape[1] != uncond.shape[1]:
        empty = encode_prompt(model, tokenizer, "", clip_skip, comma_backtrack)
        cond, uncond = pad_to_same_length(cond, uncond, empty)
    return cond, uncond


class CLIPConditioner:
    """SD1.x's conditioner: the A1111 prompt through one CLIP text encoder, as ``Conditioning``.

    No pooled vector: the SD1.x UNet does not take one, and computing it would run the layers clip skip
    leaves out.
    """

    embeddings = None  # core.models.embeddings.EmbeddingLibrary: textual inversions named in prompts

    def __init__(self, components: Mapping[str, torch.nn.Module], comma_backtrack: int = COMMA_BACKTRACK) -> None:
        self.text_encoder = components["text_encoder"]
        self.tokenizer = get_tokenizer()
        self.comma_backtrack = comma_backtrack

    def encode(self, text: str, settings: EncoderSettings) -> Conditioning:
        from core.models.embeddings import prompt_table

        table = prompt_table(self.embeddings, text, self.tokenizer, "clip_l", self.text_encoder.config.width)
        chunks = build_chunks(self.tokenizer, text, self.comma_backtrack, table)
        with torch.inference_mode():
            context = encode_chunks(self.text_encoder, chunks, settings.clip_skip)
        return Conditioning(context)
