"""The TUI in the terminals users reach their GPU box from: NO_COLOR, small windows, suspend and resume."""

from __future__ import annotations

import pytest
from PIL import Image

from core.request import GenerationRequest
from tests.tui_fakes import make_app, screen_text, wait_for


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DARKROOM_HOME", str(tmp_path / "home"))


async def test_no_color_draws_the_half_block_preview(tmp_path, monkeypatch):
    """NO_COLOR=1 makes Textual run every line through its Monochrome filter, which needs a Style on every
    segment: the preview's blank padding had none and the app died with an AttributeError traceback."""
    monkeypatch.setenv("NO_COLOR", "1")
    image = tmp_path / "wide.png"
    Image.new("RGB", (64, 16), (200, 40, 20)).save(image)  # wider than the preview box: blank rows around it
    app = make_app(tmp_path, start_worker=False)
    app.store.add_history(None, image, GenerationRequest(model="fake-model", prompt="a red fox", steps=2, seed=3))
    async with app.run_test(size=(120, 40)) as pilot:
        screen = app.get_generate_screen()
        await wait_for(pilot, lambda: screen.preview.frames_drawn == 1)
        await pilot.pause()
        assert "▀" in screen_text(app)


@pytest.mark.parametrize("small", [(40, 15), (59, 30), (100, 19)])
async def test_a_window_too_small_says_so_and_the_layout_comes_back(tmp_path, small):
    """Below 60x20 the form had no rows and the tabs and footer were cut off: every screen says to make the
    window larger instead (the status line stays, a job goes on), and the layout is back once it is."""
    app = make_app(tmp_path, start_worker=False)
    async with app.run_test(size=small) as pilot:
        screen = app.get_generate_screen()
        await wait_for(pilot, lambda: screen._form_ready)
        await pilot.pause()
        text = screen_text(app)
        assert f"This window is {small[0]} x {small[1]}: too small" in text.replace("\n", " ")
        assert "Make it at least 60 x 20" in text and "Ctrl+Q quits" in text
        assert not screen.query_one("#form").display or not screen.query_one("#body").display
        assert screen.query_one("#status-bar").region.height == 1
        await pilot.press("f5")
        await wait_for(pilot, lambda: app.current_mode == "history")
        await pilot.pause()
        assert "too small" in screen_text(app)
        await pilot.resize_terminal(120, 40)
        await pilot.pause()
        assert "too small" not in screen_text(app) and "search prompts" in screen_text(app)
        await pilot.press("f2")
        await wait_for(pilot, lambda: app.current_mode == "generate")
        await pilot.pause()
        text = screen_text(app)
        assert "too small" not in text and "Queue  (Ctrl+Enter)" in text


async def test_ctrl_c_says_how_to_quit_in_plain_words(tmp_path):
    """Textual's Ctrl+C hint is markup and Darkroom's notifications are never parsed as markup: it read
    'Press [b]ctrl+q[/b] to quit the app'."""
    app = make_app(tmp_path, start_worker=False)
    async with app.run_test(size=(120, 40), notifications=True) as pilot:
        screen = app.get_generate_screen()
        await wait_for(pilot, lambda: screen._form_ready)
        await pilot.press("f5")  # a screen whose focus is no text field
        await wait_for(pilot, lambda: app.current_mode == "history")
        await pilot.press("ctrl+c")
        await wait_for(pilot, lambda: list(app._notifications))
        (note,) = list(app._notifications)
        assert "[b]" not in note.message and "Ctrl+Q quits Darkroom" in note.message
        assert app.is_running
