"""Shared frame of every main screen: header, body, status bar and footer with the visible bindings."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import Footer, Header

from tui.widgets.status_bar import StatusBar


class MainScreen(Screen):
    # The footer builds a widget per binding and rebuilds them on every focus change: a screen that must paint
    # fast mounts it right after its first frame instead (see GenerateScreen).
    DEFER_FOOTER = False
    DEFAULT_CSS = """
    MainScreen #body { height: 1fr; }
    """

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="body"):
            yield from self.compose_body()
        yield StatusBar(id="status-bar")
        if not self.DEFER_FOOTER:
            yield Footer()

    def compose_body(self) -> ComposeResult:
        yield from ()
