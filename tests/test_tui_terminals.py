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
