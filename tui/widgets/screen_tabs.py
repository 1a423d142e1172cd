"""The top line of every main screen: the app's name and its four screens with their keys, the current one
highlighted; clicking a name switches to it.

It takes the place of Textual's Header, and with the F-keys named here the footer only lists the screen's own
actions, so it fits an 80-column window.
"""

from __future__ import annotations

from rich.style import Style
from rich.text import Text
from textual.widgets import Static

# (mode, key, label), in the order of the keys
TABS = (("generate", "F2", "Generate"), ("presets", "F3", "Presets"), ("queue", "F4", "Queue"),
        ("history", "F5", "History"))


def tabs_text(current: str) -> Text:
    text = Text(no_wrap=True, overflow="ellipsis")
    text.append(" Darkroom ", style="bold")
    for mode, key, label in TABS:
        click = Style(meta={"@click": f"app.switch_mode({mode!r})"})
        text.append(" ")
        text.append(f" {key} {label} ", style=click + Style(bold=True, reverse=True) if mode == current else click)
    return text


class ScreenTabs(Static):
    DEFAULT_CSS = """
    ScreenTabs { height: 1; width: 1fr; background: $panel; color: $text; }
    """

    def __init__(self, current: str) -> None:
        super().__init__(tabs_text(current), id="screen-tabs")
