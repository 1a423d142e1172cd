"""core.text: user and file text made safe to show in a terminal."""

from __future__ import annotations

import unicodedata

import pytest

from core.text import visible, visible_same_length

HOSTILE = "a\x1b]0;pwned\x07\x1b[2Jb"
# Newline and tab are handled by mode; ZWNJ/ZWJ are kept (Persian, Indic scripts, emoji sequences).
ALLOWED = {"\n", "\t", "\u200c", "\u200d"}


def hidden_characters() -> list[str]:
    """Every character a terminal obeys or does not show: controls, format, separators, surrogates."""
    return [
        chr(c) for c in range(0x110000)
        if unicodedata.category(chr(c)) in ("Cc", "Cf", "Zl", "Zp", "Cs") and chr(c) not in ALLOWED
    ]


def raw_hidden(text: str) -> list[str]:
    return [ch for ch in text
            if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp", "Cs") and ch not in ALLOWED]


def test_osc_title_and_clear_screen_are_shown_as_escapes():
    assert visible(HOSTILE) == "a\\x1b]0;pwned\\x07\\x1b[2Jb"


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("\x9b2J", "\\x9b2J"),  # the 8-bit CSI
        ("x\x08\x08y", "x\\x08\\x08y"),  # backspaces would overwrite what came before
        ("ok\rEVIL", "ok\\rEVIL"),  # a lone CR too
        ("del\x7f", "del\\x7f"),
        ("\x00\x1f", "\\x00\\x1f"),
        ("\x85", "\\x85"),  # NEL, a C1 line break
        ("file\u202egnp.exe", "file\\u202egnp.exe"),  # right-to-left override disguising a name
        ("\u2066x\u2069", "\\u2066x\\u2069"),  # isolates
        ("zero\u200bwidth\ufeff", "zero\\u200bwidth\\ufeff"),
        ("line\u2028sep", "line\\u2028sep"),
        ("tag\U000e0041", "tag\\U000e0041"),  # invisible tag characters ("ASCII smuggling")
        ("bad\udc80byte", "bad\\udc80byte"),  # a lone surrogate from surrogateescape
    ],
)
def test_each_kind_of_hidden_character_is_named(raw, shown):
    assert visible(raw) == shown
    assert visible(raw, multiline=True) == shown


def test_every_control_format_and_surrogate_character_is_escaped_in_both_modes():
    chars = hidden_characters()
    assert len(chars) > 2000  # C0, C1, the Cf list (tags included) and the 2048 surrogates
    for multiline in (False, True):
        shown = visible("".join(chars), multiline=multiline)
        assert raw_hidden(shown) == []
        assert shown.isascii()
    assert visible_same_length("".join(chars)).isprintable()


def test_newlines_and_tabs_by_mode():
    text = "one\ntwo\r\nthree\tfour"
    assert visible(text) == "one two three four"  # one line: a name cannot start a fake output line
    assert visible(text, multiline=True) == "one\ntwo\nthree\tfour"


def test_ordinary_text_is_unchanged_and_the_same_object():
    texts = ("a (red:1.2) fox \\(escaped\\) [x] 'q' \"dq\"", "café 日本語 🦊", "👨\u200d👩\u200d👧",
             "می\u200cخواهم", "")
    for text in texts:
        assert visible(text) is text
        assert visible(text, multiline=True) is text
        assert visible_same_length(text) is text


def test_idempotent_and_encodable():
    once = visible(HOSTILE + "\udc80\u202e")
    assert visible(once) == once
    once.encode("utf-8")  # a lone surrogate no longer makes the encoder raise


def test_non_strings_are_shown_through_str():
    assert visible(3) == "3"
    assert visible(ValueError("tensor \x1b[2J.weight")) == "tensor \\x1b[2J.weight"


def test_same_length_form_for_editable_fields():
    raw = HOSTILE + "\u202e\x9b\t\n\x7f\udc80"
    shown = visible_same_length(raw)
    assert shown == "a␛]0;pwned␇␛[2Jb\ufffd\ufffd\t␊␡\ufffd"
    assert len(shown) == len(raw)  # the cursor column still matches the real text
