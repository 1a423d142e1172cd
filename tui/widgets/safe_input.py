"""Textual's ``Input`` and ``TextArea``, drawing their text with control characters made visible.

Use these, never ``textual.widgets.Input``/``TextArea``: the form is filled from history rows, presets and
saved settings, and Textual draws a field's value as it is, so an ESC in a loaded prompt or path reached the
terminal (a prompt from a PNG set the window title and cleared the screen). The value is untouched (what is
edited and sent is what was written); only its drawing goes through :func:`core.text.visible_same_length`,
which keeps one character per character so the cursor and the selection stay where they are.
``tests/test_tui_terminal_safety.py`` checks that no other module builds the Textual ones.
"""

from __future__ import annotations

from typing import Any

from rich.highlighter import Highlighter
from rich.text import Text
from textual import widgets

from core.text import visible_same_length


class _Visible(Highlighter):
    """Input draws its value through its highlighter (Textual's public hook for restyling it)."""

    def __init__(self, field: widgets.Input) -> None:
        self.field = field

    def highlight(self, text: Text) -> None:
        # From the real value: Text() has already dropped BEL, BS and CR, which would shift the cursor.
        text.plain = visible_same_length(self.field.value)


class Input(widgets.Input):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.highlighter is None:
            self.highlighter = _Visible(self)


class TextArea(widgets.TextArea):
    def get_line(self, line_index: int) -> Text:
        line = super().get_line(line_index)
        line.plain = visible_same_length(self.document.get_line(line_index))  # Text() drops BEL, BS, CR
        return line
