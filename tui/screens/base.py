"""Shared frame of every main screen: screen tabs, body, status bar and footer with the visible bindings."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from textual import events
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import Static

from tui.widgets.footer import StableFooter
from tui.widgets.screen_tabs import ScreenTabs
from tui.widgets.status_bar import StatusBar


def breakpoint_classes(app: Any, width: int, height: int) -> dict[str, bool]:
    """Each of the app's breakpoint classes (-narrow/-medium/-wide, -short/-tall), on or off for this size, as
    Textual sets them on the current screen's resize (it never does for a screen built in the background)."""
    classes: dict[str, bool] = {}
    for breakpoints, size in ((app.HORIZONTAL_BREAKPOINTS or [], width), (app.VERTICAL_BREAKPOINTS or [], height)):
        chosen = next((name for edge, name in sorted(breakpoints, reverse=True) if size >= edge), None)
        classes.update({name: name == chosen for _, name in breakpoints})
    return classes


class MainScreen(Screen):
    # The footer builds a widget per binding and rebuilds them on every focus change: a screen that must paint
    # fast mounts it right after its first frame instead (see GenerateScreen).
    DEFER_FOOTER = False
    MODE = ""  # the app mode this screen is (highlighted in the screen tabs)
    # Actions whose footer entry shows only from WIDE_FOOTER columns: an 80-column footer has room for the rest.
    # Each has a second, hidden binding with a parameter (``action('key')``), so its key answers at any width.
    WIDE_ONLY: frozenset[str] = frozenset()
    WIDE_FOOTER = 100
    # Below this the layouts break (a form of no rows, tabs and footer cut off): the screen says so instead,
    # keeping the status line (a running job goes on, and shows there). 60x20 still has a form that scrolls.
    MIN_COLUMNS, MIN_ROWS = 60, 20
    DEFAULT_CSS = """
    MainScreen #body { height: 1fr; }
    MainScreen #too-small { display: none; height: 1fr; content-align: center middle; text-align: center; }
    MainScreen.-too-small > * { display: none; }
    MainScreen.-too-small > #too-small, MainScreen.-too-small > #status-bar { display: block; }
    """

    def compose(self) -> ComposeResult:
        yield ScreenTabs(self.MODE)
        with Vertical(id="body"):
            yield from self.compose_body()
        yield Static(id="too-small", markup=False)
        yield StatusBar(id="status-bar")
        if not self.DEFER_FOOTER:
            yield StableFooter()

    def compose_body(self) -> ComposeResult:
        yield from ()

    def on_screen_resume(self, event: events.ScreenResume) -> None:
        # Textual re-applies the stylesheet to every widget of a screen it switches to, in case something
        # changed while it was away. Nothing here can: a widget whose classes change while its screen is
        # suspended gets its styles then, and a changed stylesheet is re-applied by switch_mode itself. On the
        # Generate form that pass was the largest part of an F-key switch (bench/bench_tui.py).
        event.refresh_styles = False
        self._check_size(self.app.size.width, self.app.size.height)  # the window may have changed meanwhile

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in self.WIDE_ONLY and not parameters:
            return self.app.size.width >= self.WIDE_FOOTER
        return True

    def on_mount(self) -> None:
        self._check_size(self.app.size.width, self.app.size.height)

    def _check_size(self, columns: int, rows: int) -> None:
        small = columns < self.MIN_COLUMNS or rows < self.MIN_ROWS
        if small:
            self.query_one("#too-small", Static).update(
                f"This window is {columns} x {rows}: too small.\n"
                f"Make it at least {self.MIN_COLUMNS} x {self.MIN_ROWS}.\n\nCtrl+Q quits.")
        self.set_class(small, "-too-small")

    def on_resize(self, event: events.Resize) -> None:
        self._check_size(event.size.width, event.size.height)
        wide = event.size.width >= self.WIDE_FOOTER
        if self.WIDE_ONLY and wide != getattr(self, "_wide_footer", None):
            self._wide_footer = wide
            self.refresh_bindings()

    def quitting(self) -> bool:
        """The screen is being removed or the app is exiting: its widgets may be half torn down."""
        # exit() sets _exit; a shutdown that does not go through exit() (tests) clears is_running first.
        return not self.is_attached or self._closing or self.app._exit or not self.app.is_running

    def call_from_worker_thread(self, callback: Callable[..., Any], *args: Any) -> None:
        """From a worker thread: ``callback(*args)`` on the UI thread, through :meth:`deliver_if_alive`."""
        self.app.call_from_thread(self.deliver_if_alive, callback, *args)

    def deliver_if_alive(self, callback: Callable[..., Any], *args: Any) -> None:
        """``callback(*args)``, dropped if the screen or the app is going away: a scan or image load that
        finishes as the user quits must not touch widgets that are half removed."""
        if not self.quitting():
            callback(*args)
