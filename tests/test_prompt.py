"""A1111 prompt parsing, 75-token chunking and weighted conditioning."""

from __future__ import annotations

import pytest
import torch

from core.models.clip import CLIPTextConfig, CLIPTextModel
from core.models.prompt import (
    PromptChunk,
    apply_emphasis,
    build_chunks,
    encode_chunks,
    encode_prompt,
    encode_prompts,
    pad_to_same_length,
    parse_prompt,
)
from core.models.testing import random_state_dict
from core.models.tokenizer import BOS_ID, EOS_ID, CLIPTokenizer

CAT, DOG, COMMA, RED = 2368, 1929, 267, 736  # single-token words (checked in test_token_ids_used_here)
R, S = 1.1, 1 / 1.1


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer()


@pytest.fixture(scope="module")
def model():
    cfg = CLIPTextConfig.preset("sd15", "tiny")
    with torch.device("meta"):
        meta = CLIPTextModel(cfg)
    m = CLIPTextModel(cfg)
    m.load_state_dict(random_state_dict(meta, seed=2))
    return m.eval()


# ---------------------------------------------------------------------------------------------------- parsing

PARSE_CASES = [
    ("normal text", [[("normal text", 1.0)]]),
    ("an (important) word", [[("an ", 1.0), ("important", R), (" word", 1.0)]]),
    ("((word))", [[("word", R * R)]]),
    ("(((word)))", [[("word", R * R * R)]]),
    ("(word:1.3)", [[("word", 1.3)]]),
    ("(word: 0.5 )", [[("word", 0.5)]]),
    ("(word:-1)", [[("word", -1.0)]]),
    ("(word:+.5)", [[("word", 0.5)]]),
    ("[word]", [[("word", S)]]),
    ("[[word]]", [[("word", S * S)]]),
    ("([word])", [[("word", R * S)]]),
    ("((word:1.5))", [[("word", 1.5 * R)]]),
    ("(a (b) c)", [[("a ", R), ("b", R * R), (" c", R)]]),
    ("(unbalanced", [[("unbalanced", R)]]),
    ("a [b (c", [[("a ", 1.0), ("b ", S), ("c", S * R)]]),
    ("stray) and] closers", [[("stray) and] closers", 1.0)]]),
    ("no weight:1.3) here", [[("no weight:1.3) here", 1.0)]]),
    ("a:b c::d", [[("a:b c::d", 1.0)]]),
    ("(x:y)", [[("x:y", R)]]),
    ("(a:1.2.3)", [[("a:1.2.3", R)]]),
    (r"\(literal\]", [[("(literal]", 1.0)]]),
    (r"\(\) \[\] \\", [[("() [] \\", 1.0)]]),
    (r"a\b", [[("ab", 1.0)]]),
    (r"(\(x\):1.2)", [[("(x)", 1.2)]]),
    ("(unnecessary)(parens)", [[("unnecessaryparens", R)]]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            [
                ("a ", 1.0),
                ("house", 1.3 * R * R),
                (" ", R),
                ("on", 1.0),
                (" a ", R),
                ("hill", 0.5 * R),
                (", sun, ", R),
                ("sky", R**4),
                (".", R),
            ]
        ],
    ),
    ("a BREAK b", [[("a", 1.0)], [("b", 1.0)]]),
    ("a, BREAK, b", [[("a,", 1.0)], [(", b", 1.0)]]),
    ("BREAK a", [[], [("a", 1.0)]]),
    ("BREAK", [[], []]),
    ("a break b BREAKfast", [[("a break b BREAKfast", 1.0)]]),
    ("(a BREAK b)", [[("a", R)], [("b", R)]]),
    ("a BREAK BREAK b", [[("a", 1.0)], [], [("b", 1.0)]]),
    ("", [[]]),
    ("()", [[]]),
]


@pytest.mark.parametrize(("text", "expected"), PARSE_CASES)
def test_parse_prompt(text, expected):
    got = parse_prompt(text)
    assert [[t for t, _ in seg] for seg in got] == [[t for t, _ in seg] for seg in expected]
    for seg_got, seg_want in zip(got, expected):
        assert [w for _, w in seg_got] == pytest.approx([w for _, w in seg_want], rel=1e-12)


# --------------------------------------------------------------------------------------------------- chunking


def test_token_ids_used_here(tok):
    assert [tok.encode(w) for w in ("cat", "dog", ",", "red")] == [[CAT], [DOG], [COMMA], [RED]]


def _body(chunk: PromptChunk) -> list[int]:
    """Prompt tokens of a chunk: between BOS and the first EOS."""
    assert chunk.tokens[0] == BOS_ID and len(chunk.tokens) == 77 and len(chunk.weights) == 77
    end = chunk.tokens.index(EOS_ID)
    assert set(chunk.tokens[end:]) == {EOS_ID}  # CLIP-L pads with EOS
    return list(chunk.tokens[1:end])


def test_chunk_layout_and_weights(tok):
    (chunk,) = build_chunks(tok, "red (cat:1.5) [dog]")
    assert chunk.tokens[:5] == (BOS_ID, RED, CAT, DOG, EOS_ID)
    assert chunk.weights[:4] == pytest.approx((1.0, 1.0, 1.5, S))
    assert set(chunk.weights[4:]) == {1.0}


def test_exactly_75_tokens_is_one_chunk_76_is_two(tok):
    assert [_body(c) for c in build_chunks(tok, "cat " * 75)] == [[CAT] * 75]
    chunks = build_chunks(tok, "cat " * 75 + "dog")
    assert [_body(c) for c in chunks] == [[CAT] * 75, [DOG]]
    assert chunks[0].tokens[-1] == EOS_ID  # a full chunk still ends with EOS
    assert len(build_chunks(tok, "cat " * 200)) == 3


def test_break_starts_new_chunk(tok):
    assert [_body(c) for c in build_chunks(tok, "cat BREAK dog")] == [[CAT], [DOG]]
    assert [_body(c) for c in build_chunks(tok, "BREAK dog")] == [[], [DOG]]
    assert [_body(c) for c in build_chunks(tok, "cat BREAK")] == [[CAT]]
    assert [_body(c) for c in build_chunks(tok, "")] == [[]]
    # Weights survive across the break.
    chunks = build_chunks(tok, "(cat BREAK dog:1.4)")
    assert (chunks[0].weights[1], chunks[1].weights[1]) == pytest.approx((1.4, 1.4))


def test_comma_backtrack_moves_phrase_to_next_chunk(tok):
    # comma at index 70; the chunk fills at 75; the 76th token pulls the 4 dogs after the comma along.
    prompt = "cat " * 70 + ", " + "dog " * 10
    chunks = build_chunks(tok, prompt)
    assert [_body(c) for c in chunks] == [[CAT] * 70 + [COMMA], [DOG] * 10]
    # Comma exactly 20 back (index 55) still backtracks, 21 back (index 54) does not.
    chunks = build_chunks(tok, "cat " * 55 + ", " + "dog " * 30)
    assert [_body(c) for c in chunks] == [[CAT] * 55 + [COMMA], [DOG] * 30]
    chunks = build_chunks(tok, "cat " * 54 + ", " + "dog " * 30)
    assert [_body(c) for c in chunks] == [[CAT] * 54 + [COMMA] + [DOG] * 20, [DOG] * 10]
    # Disabled: a plain split at 75.
    chunks = build_chunks(tok, prompt, comma_backtrack=0)
    assert [_body(c) for c in chunks] == [[CAT] * 70 + [COMMA] + [DOG] * 4, [DOG] * 6]
    # A comma that lands exactly at a full chunk starts the next chunk, nothing moves.
    chunks = build_chunks(tok, "cat " * 75 + ", dog")
    assert [_body(c) for c in chunks] == [[CAT] * 75, [COMMA, DOG]]


def test_backtrack_moves_weights_with_tokens(tok):
    chunks = build_chunks(tok, "cat " * 66 + ", (dog:1.3) red " * 3 + "cat " * 5)
    assert _body(chunks[0]) == [CAT] * 66 + [COMMA, DOG, RED] * 2 + [COMMA]
    assert _body(chunks[1]) == [DOG, RED] + [CAT] * 5
    assert chunks[0].weights[67:74] == pytest.approx((1.0, 1.3, 1.0, 1.0, 1.3, 1.0, 1.0))
    assert chunks[1].weights[1:4] == pytest.approx((1.3, 1.0, 1.0))


def test_pad_id_zero_for_openclip(tok):
    (chunk,) = build_chunks(CLIPTokenizer(pad_id=0), "cat")
    assert chunk.tokens[:4] == (BOS_ID, CAT, EOS_ID, 0) and set(chunk.tokens[3:]) == {0}


# ----------------------------------------------------------------------------------------------- conditioning


def test_weighting_math_against_hand_computation(model, tok):
    z = model(torch.tensor([[BOS_ID, RED, CAT, DOG] + [EOS_ID] * 73]))[0]  # unweighted [77, D]
    w = torch.ones(77)
    w[2], w[3] = 1.5, 1 / 1.1
    expected = z * w[:, None]
    expected = expected * (z.mean() / expected.mean())
    got = encode_prompt(model, tok, "red (cat:1.5) [dog]")
    assert got.shape == (1, 77, 32)
    torch.testing.assert_close(got[0], expected, rtol=1e-5, atol=1e-6)
    assert got.mean().item() == pytest.approx(z.mean().item(), rel=1e-4)
    # Without weights the conditioning is the plain encoding.
    torch.testing.assert_close(encode_prompt(model, tok, "red cat dog")[0], z)
    # Weights really act: the cat token moved.
    assert (got[0, 2] - z[2]).abs().max() > 1e-3


def test_chunks_are_encoded_separately_and_concatenated(model, tok):
    prompt = "(cat:1.2) " * 80 + "BREAK dog"
    chunks = build_chunks(tok, prompt)
    assert len(chunks) == 3
    got = encode_prompt(model, tok, prompt, clip_skip=2)
    assert got.shape == (1, 3 * 77, 32)
    for i, chunk in enumerate(chunks):
        z = model(torch.tensor([chunk.tokens]), clip_skip=2)
        want = apply_emphasis(z, torch.tensor([chunk.weights]))[0]
        torch.testing.assert_close(got[0, 77 * i : 77 * (i + 1)], want)
    assert chunks[0].weights == (1.0,) + (1.2,) * 75 + (1.0,)
    assert _body(chunks[2]) == [DOG]
    assert torch.equal(encode_chunks(model, chunks, 2), got)


def test_encode_prompts_pads_the_shorter_with_empty_chunks(model, tok):
    long = "cat " * 100  # 2 chunks
    empty = encode_prompt(model, tok, "")
    cond, uncond = encode_prompts(model, tok, long, "", clip_skip=1)
    assert cond.shape == uncond.shape == (1, 154, 32)
    torch.testing.assert_close(cond, encode_prompt(model, tok, long))
    torch.testing.assert_close(uncond, torch.cat([empty, empty], dim=1))
    cond, uncond = encode_prompts(model, tok, "dog", "blurry, " * 60 + "BREAK bad")
    assert cond.shape == uncond.shape == (1, 3 * 77, 32)
    torch.testing.assert_close(cond[:, 77:], torch.cat([empty, empty], dim=1))
    torch.testing.assert_close(cond[:, :77], encode_prompt(model, tok, "dog"))
    cond, uncond = encode_prompts(model, tok, "dog", "cat")
    assert cond.shape == uncond.shape == (1, 77, 32)


def test_pad_to_same_length_rejects_partial_chunks():
    with pytest.raises(ValueError):
        pad_to_same_length(torch.zeros(1, 77, 4), torch.zeros(1, 70, 4), torch.zeros(1, 77, 4))
