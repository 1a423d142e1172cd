"""Our CLIP BPE tokenizer against transformers' CLIPTokenizer built from the same vocab/merges."""

from __future__ import annotations

import itertools
import random
import unicodedata
from importlib.resources import files

import pytest

from core.models.tokenizer import BOS_ID, EOS_ID, CLIPTokenizer, get_tokenizer, normalize, pre_tokenize

transformers = pytest.importorskip("transformers")

DATA = files("core.models") / "data" / "clip"

SUBJECTS = [
    "a photo of a cat",
    "Portrait of an old man, highly detailed",
    "café au lait, crème brûlée, naïve façade",
    "東京タワー の 夜景",
    "한국어 프롬프트 테스트",
    "русский текст, ΟΔΟΣ ΣΟΦΙΑ",
    "İstanbul at dusk",
    "emoji 😀👍🏽 and family 👨\u200d👩\u200d👧",
    "it's a dog's life, don't they're we've I'm you'll he'd",
    "(masterpiece:1.2), ((best quality)), [blurry], (worst quality:0.8)",
    "\\(escaped\\) \\[brackets\\] a:b c::d",
    "1girl, 2boys, 3.14159, 1,000,000 views, 4k 8K UHD",
    "!!!??? ... ,,, ;;; --- ___ *** ~~~",
    "  lots   of\t\twhitespace \n\n here  ",
    "ﬁne ligatures and ＦＵＬＬ１２３ width",
    "cafe\u0301 decomposed accent",
    "<lora:detail_tweaker:0.7> embedding:easynegative",
    "score_9, score_8_up, source_anime, rating_safe",
    "BREAK and AND and break",
    "'quoted' \"double\" `tick` ‘curly’ “quotes”",
    "a<|endoftext|>b <|startoftext|>",
    "<|ENDOFTEXT|> mixed-case special, x<<|endoftext|>>y",
    "\x1c\x1d control\x00chars\x7f",
    "",
]
MODIFIERS = ["", " trending on artstation", ", 8k", ":1.5)", "  ", " ÆØÅ", "'s", "''t", " 日本", " 42"]
CHARS = list("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789 ,.:;()[]{}<>|'\"!?-_/\\*&^%$#@~`+=\t\n") + list(
    "éüñßçøåÆŒ東京日本語한글русскийΣΟΔ😀👍🏽\u200d\u0301ﬁ１Ａ\u3000\xa0\u2028"
)
WORDS = ["<|endoftext|>", "<|startoftext|>", "<|EndOfText|>", "it's", "DON'T", "(", ")", ":1.1", "BREAK"]


def _prompts() -> list[str]:
    rng = random.Random(1234)
    prompts = [s + m for s, m in itertools.product(SUBJECTS, MODIFIERS)]  # 240 combinations
    for _ in range(120):  # random character soup, including whitespace and joiners
        prompts.append("".join(rng.choice(CHARS) for _ in range(rng.randint(0, 60))))
    for _ in range(40):  # random word salad with special-token look-alikes
        prompts.append(" ".join(rng.choice(WORDS + SUBJECTS) for _ in range(rng.randint(1, 8))))
    for _ in range(10):  # very long prompts (several 75-token windows)
        prompts.append(", ".join(rng.choice(SUBJECTS) for _ in range(40)))
    return prompts


@pytest.fixture(scope="module")
def reference():
    return transformers.CLIPTokenizer(str(DATA / "vocab.json"), str(DATA / "merges.txt"))


@pytest.fixture(scope="module")
def ours():
    return CLIPTokenizer()


def test_prompt_list_is_large_and_varied():
    prompts = _prompts()
    assert len(prompts) >= 300
    assert len(set(prompts)) > 300


def test_ids_equal_reference(reference, ours):
    prompts = _prompts()
    expected = reference(prompts)["input_ids"]
    mismatches = []
    for text, ids in zip(prompts, expected):
        assert ids[0] == BOS_ID and ids[-1] == EOS_ID
        got = ours.encode(text)
        if got != ids[1:-1]:
            mismatches.append((text, ids[1:-1], got))
    assert not mismatches, mismatches[:3]
    # The long prompts really exceed one window.
    assert max(len(ids) for ids in expected) > 300


def test_windows_equal_reference_truncation(reference):
    tok = CLIPTokenizer()
    for text in _prompts()[::7]:
        want = reference(text, padding="max_length", max_length=77, truncation=True)["input_ids"]
        assert tok.encode_window(text) == want


def test_window_layout_and_pad_id():
    tok = CLIPTokenizer(pad_id=0)
    ids = tok.encode("a photo of a cat")
    win = tok.window(ids)
    assert len(win) == 77
    assert win[: len(ids) + 2] == [BOS_ID, *ids, EOS_ID]
    assert set(win[len(ids) + 2 :]) == {0}
    full = tok.window(list(range(100)))
    assert full == [BOS_ID, *range(75), EOS_ID]
    assert get_tokenizer(0) is get_tokenizer(0)
    assert get_tokenizer().pad_id == EOS_ID


def test_character_classes_match_reference_regex():
    """Every BMP code point is split like the reference's \\p{L}/\\p{N}/\\s regex (same Unicode version)."""
    from tokenizers import Regex, pre_tokenizers

    split = pre_tokenizers.Split(
        Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
        behavior="removed",
        invert=True,
    )
    bad = []
    for cp in range(0x10000):
        ch = chr(cp)
        if 0xD800 <= cp < 0xE000 or unicodedata.category(ch) == "Cn":
            continue  # surrogates; unassigned in this Python's Unicode version (newer tables may assign them)
        text = "a" + ch + "1" + ch + ch + "."
        if [p for p, _ in split.pre_tokenize_str(text)] != pre_tokenize(text):
            bad.append(hex(cp))
    assert not bad, bad[:20]


def test_normalize_examples():
    assert normalize("ΟΔΟΣ") == "οδοσ"  # per-character lowercase: no final-sigma rule
    assert normalize("cafe\u0301") == "caf\u00e9"  # NFC
    assert normalize("a \t\n b\u3000c") == "a b c"
