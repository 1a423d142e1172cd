"""The key footer, rebuilt only when what it shows changes.

Textual's ``Footer`` recomposes (one ``FooterKey`` widget per binding, each styled anew) on every bindings
signal, which fires on each focus change and every screen switch. The keys of a screen rarely change, so
the rebuild was pure cost: about a third of the UI thread's work for an F-key screen switch
(``bench/bench_tui.py --switch-rounds``). This footer compares what it would show with what it shows and
keeps its widgets when nothing differs.
"""

from __future__ import annotations

from textual.screen import Screen
from textual.widgets import Footer


class StableFooter(Footer):
    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 - Footer's own signature
        super().__init__(*args, **kwargs)
        self._shown: tuple | None = None

    def _signature(self, screen: Screen) -> tuple:
        """What the footer draws: every shown binding's key, label, action, state and tooltip, and the screen's
        classes (its breakpoint class sets the keys' spacing: app.tcss)."""
        return tuple(
            (binding.key, binding.description, binding.action, enabled, tooltip, binding.group)
            for (_, binding, enabled, tooltip) in screen.active_bindings.values()
            if binding.show
        ) + (self.compact, self.app.ENABLE_COMMAND_PALETTE, screen.classes)

    def bindings_changed(self, screen: Screen) -> None:
        if self.is_attached and screen is self.screen and screen.app.app_focus:
            signature = self._signature(screen)
            if signature == self._shown:
                self._bindings_ready = True
                return
            self._shown = signature
        super().bindings_changed(screen)
