"""Shared frame of every main screen: header, body, status bar and footer with the visible bindings."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import Footer, Header

from tui.widgets.status_bar import StatusBar


class MainScreen(Screen):
    DEFAULT_CSS = """
    MainScreen #body { height: 1fr; }
    """

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="body"):
            yield from self.compose_body()
        yield StatusBar(id="status-bar")
        yield Footer()

    def compose_body(self) -> ComposeResult:
        yield from ()
