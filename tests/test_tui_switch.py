"""What an F-key screen switch costs: no footer rebuild, no stylesheet pass, no screen built on the first visit.

The latency itself is measured by ``bench/bench_tui.py --switch-rounds`` (timings never go in tests); these
tests pin the three mechanisms that took it from 150-1000 ms to under 100 ms, so they cannot silently go.
"""

from __future__ import annotations

import re
import threading

import pytest
from textual.app import App
from textual.screen import Screen
from textual.widget import Widget

from core.request import GenerationRequest
from tests.tui_fakes import FakeRunner, make_app, screen_text, wait_for
from tui.widgets.footer import StableFooter


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DARKROOM_HOME", str(tmp_path / "home"))


def cells(app) -> str:
    """The screen's text with its colours, the process's RAM figures (status bar) left out."""
    return re.sub(r"RAM \S+ peak \S+", "RAM", screen_text(app, styles=True))


def footer_keys(screen: Screen) -> list:
    return list(screen.query_one(StableFooter).children)


async def visit_every_screen(pilot) -> None:
    for key in ("f4", "f5", "f3", "f2"):
        await pilot.press(key)
        await pilot.pause()


@pytest.fixture
def fast_prebuild(monkeypatch):
    """The background build starts and goes on within tenths of a second."""
    monkeypatch.setattr("tui.app.PREBUILD_AFTER_S", 0.05)
    monkeypatch.setattr("tui.app.PREBUILD_BETWEEN_S", 0.05)


def all_screens_built(app) -> bool:
    try:
        return all(app.get_screen_stack(mode)[0].is_mounted for mode in app.MODES)
    except KeyError:  # a mode whose screen does not exist yet
        return False


async def test_screens_not_shown_at_start_are_built_in_the_background(tmp_path, fast_prebuild):
    app = make_app(tmp_path, prebuild_screens=True)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, lambda: all_screens_built(app), timeout=30)
        assert app.current_mode == "generate"  # built, not shown
        built = {mode: app.get_screen_stack(mode)[0] for mode in app.MODES}
        await pilot.press("f4")
        await pilot.pause()
        assert app.screen is built["queue"]  # the first visit shows the screen built before, not a new one
        assert app.screen.focused is not None
        prebuilt = cells(app)

    # ... and looks exactly as the same screen built on its first visit (every cell's text and colours):
    # building it in the background skips a stylesheet pass Textual would otherwise make.
    lazy = make_app(tmp_path / "lazy")
    async with lazy.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        await pilot.press("f4")
        await wait_for(pilot, lambda: type(lazy.screen).__name__ == "QueueScreen")
        await pilot.pause(0.3)
        assert cells(lazy) == prebuilt


async def test_switching_back_keeps_the_footer_and_skips_the_style_pass(tmp_path, monkeypatch):
    gate = threading.Event()
    app = make_app(tmp_path, FakeRunner(gate=gate))
    async with app.run_test(size=(120, 40)) as pilot:
        await visit_every_screen(pilot)
        generate = app.screen
        keys = footer_keys(generate)
        assert keys, "the footer shows the screen's keys"

        passes: list[Screen] = []
        original = Screen.update_node_styles

        def counted(self, animate: bool = True) -> None:
            passes.append(self)
            original(self, animate)

        monkeypatch.setattr(Screen, "update_node_styles", counted)
        await visit_every_screen(pilot)
        assert app.screen is generate
        assert footer_keys(generate) == keys  # the same widgets: nothing was rebuilt
        assert passes == []  # Textual's default re-applies the stylesheet to every widget on each switch
        monkeypatch.undo()

        # ... but when the keys change (Ctrl+S "Stop job" shows only while a job runs), it is rebuilt.
        def labels() -> list[str]:
            return [str(key.description) for key in footer_keys(app.screen)]

        assert "Stop job" not in labels()
        app.submit(GenerationRequest(model="fake-model.safetensors", prompt="p", steps=3, seed=1))
        await wait_for(pilot, lambda: app.running_job is not None)
        app.screen.refresh_bindings()
        await wait_for(pilot, lambda: "Stop job" in labels())
        gate.set()
        await wait_for(pilot, lambda: app.running_job is None)
        app.screen.refresh_bindings()
        await wait_for(pilot, lambda: "Stop job" not in labels())


async def test_no_stylesheet_pass_on_any_first_visit(tmp_path, monkeypatch, fast_prebuild):
    """Also not on the first switch back to the screen shown at start (its styles are counted once it has
    painted: Textual's start-up pass ran before it mounted)."""
    app = make_app(tmp_path, prebuild_screens=True)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, lambda: all_screens_built(app), timeout=30)
        passes: list[str] = []
        original = App.refresh_css

        def counted(self, animate: bool = True) -> None:
            passes.append(type(self.screen).__name__)
            original(self, animate)

        monkeypatch.setattr(App, "refresh_css", counted)
        await visit_every_screen(pilot)
        assert type(app.screen).__name__ == "GenerateScreen"
        assert passes == []


async def test_screens_built_in_the_background_are_drawn_before_their_first_visit(tmp_path, monkeypatch,
                                                                                 fast_prebuild):
    """Their widgets' lines are rendered off screen once the screens are built, so the first visit draws from
    the same caches as a later one: it renders lines of no widget that a later visit does not render too
    (without it: every container, the tabs, the footer's keys, ...)."""
    app = make_app(tmp_path, prebuild_screens=True)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, lambda: app._laid_out >= {"presets", "queue", "history"}, timeout=30)
        await pilot.pause(0.3)
        history = app.get_screen_stack("history")[0]
        rendered: list[str] = []
        for cls in {type(widget) for widget in history.walk_children()} | {Widget}:
            for klass in cls.__mro__:
                if "render_line" in vars(klass) and klass.__module__.startswith(("textual", "tui")):
                    original = vars(klass)["render_line"]

                    def counted(self, y, _original=original):  # noqa: ANN001, ANN202
                        rendered.append(type(self).__name__)
                        return _original(self, y)

                    monkeypatch.setattr(klass, "render_line", counted)

        async def visit_history() -> set[str]:
            rendered.clear()
            await pilot.press("f5")
            await pilot.pause()
            assert app.screen is history
            return set(rendered) - {"StatusBar"}  # it redraws itself once a second

        first = await visit_history()
        await pilot.press("f2")
        await pilot.pause(0.3)
        assert first <= await visit_history()
