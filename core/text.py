"""Text from users and files made safe to show in a terminal: the one place that decides how.

Prompts, model, VAE, preset and file names, jobs-file field names, tensor names in error messages and
metadata read from PNGs can hold characters a terminal obeys instead of showing: ESC and CSI (0x9b) start
escape sequences (``ESC ] 0 ; title BEL`` sets the window title, ``ESC [ 2 J`` clears the screen), BEL rings,
CR and backspace overwrite what was written, bidi overrides (U+202E) and other invisible format characters
make a name read differently from what it is, and a lone surrogate (``\\udc80`` from ``surrogateescape``)
makes the encoder raise. Every front end shows such text through :func:`visible` (or, inside an editable
field, :func:`visible_same_length`); the core keeps the raw strings (requests, the database, exceptions).

The form, one for all of them: each such character is written as its Python escape, ``\\x1b``, ``\\x9b``,
``\\x07``, ``\\r``, ``\\u202e``, ``\\udc80``, ``\\U000e0041``. Nothing else changes: backslashes and quotes
stay as written (A1111's ``\\(`` escapes read as typed), and so do ordinary non-ASCII letters, emoji and the
zero-width joiners (U+200C, U+200D) that Persian, Indic scripts and emoji sequences need.

Line breaks and tabs: in one-line places (a table cell, a log line, a caption) a newline, CRLF or tab is a
space, so a prompt fits its row and a name cannot start a fake line of output; in multi-line views
(``multiline=True``: a prompt in a details pane, a dialog) newlines and tabs are kept and CRLF is a newline.
A CR on its own is always ``\\r``.

Only the standard library: ``cli/`` (which never imports Textual) and ``tui/`` both use this module.
"""

from __future__ import annotations

import re

# What a terminal obeys or hides, besides newline and tab (handled by mode):
# C0 controls, DEL and C1 controls (category Cc); every format character (Cf: soft hyphen, bidi marks,
# embeddings, overrides and isolates, zero-width space, word joiner, BOM, interlinear annotation, tag
# characters, ...) except ZWNJ/ZWJ; the line and paragraph separators (Zl, Zp); lone surrogates (Cs).
# tests/test_text.py checks this list against unicodedata, so a newer Unicode version cannot slip past.
_HIDDEN = (
    "\x00-\x08\x0b-\x1f\x7f-\x9f"
    "\u00ad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2\u180e"
    "\u200b\u200e\u200f\u2028-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb"
    "\U000110bd\U000110cd\U00013430-\U00013438\U0001bca0-\U0001bca3\U0001d173-\U0001d17a"
    "\U000e0001\U000e0020-\U000e007f"
    "\ud800-\udfff"
)
_ONE_LINE = re.compile(f"\r\n|[\n\t{_HIDDEN}]")
_MULTI_LINE = re.compile(f"\r\n|[{_HIDDEN}]")
_IN_PLACE = re.compile(f"[\n{_HIDDEN}]")


def _escape(char: str) -> str:
    code = ord(char)
    if code == 0x0D:
        return "\\r"
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def _one_line(match: re.Match[str]) -> str:
    found = match.group()
    return " " if found in ("\r\n", "\n", "\t") else _escape(found)


def _multi_line(match: re.Match[str]) -> str:
    found = match.group()
    return "\n" if found == "\r\n" else _escape(found)


def visible(text: object, *, multiline: bool = False) -> str:
    """``text`` (``str()`` of it, if not a string) with every character a terminal would obey or hide written
    as its escape (``\\x1b``, ``\\u202e``, ...); newlines and tabs are spaces unless ``multiline``.

    Idempotent, and the result never contains such a character, so it can go to any terminal (through Rich
    or Textual as plain ``Text``, never as markup).
    """
    text = text if isinstance(text, str) else str(text)
    pattern = _MULTI_LINE if multiline else _ONE_LINE
    if pattern.search(text) is None:  # the common case: nothing to change, no copy
        return text
    return pattern.sub(_multi_line if multiline else _one_line, text)


def _picture(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code < 0x20:
        return chr(0x2400 + code)  # control pictures: ␛ for ESC, ␇ for BEL, ␊ for a newline
    if code == 0x7F:
        return "\u2421"  # ␡
    return "\ufffd"  # C1, format characters, surrogates: no picture exists


def visible_same_length(text: str) -> str:
    """``text`` with each such character replaced by ONE visible character (its control picture, ``␛``, or
    ``\ufffd`` where Unicode has none), so the display still lines up, character for character, with the value
    being edited (the cursor and the selection of an input field index the real text). Tabs are kept.

    Only for editable fields: everywhere else :func:`visible`'s escapes say exactly which character it is.
    """
    if _IN_PLACE.search(text) is None:
        return text
    return _IN_PLACE.sub(_picture, text)
