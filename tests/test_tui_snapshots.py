"""Snapshot-like checks on ``App.export_screenshot()`` with the deterministic half-cell image widget."""

from __future__ import annotations

import re

import pytest
from PIL import Image

from tests.tui_fakes import make_app, screen_text, wait_for


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DARKROOM_HOME", str(tmp_path / "home"))


def two_band_image() -> Image.Image:
    """Top half pure red, bottom half pure blue: the half-block cells must carry exactly these colours."""
    image = Image.new("RGB", (16, 16), (255, 0, 0))
    image.paste((0, 0, 255), (0, 8, 16, 16))
    return image


def normalized(svg: str) -> str:
    """Rich names the SVG's CSS classes after a hash that differs per export; the drawing does not."""
    return re.sub(r"terminal-\d+", "terminal", svg)


async def shot_with_preview(tmp_path, image):
    app = make_app(tmp_path, start_worker=False)
    async with app.run_test(size=(120, 40), notifications=False) as pilot:
        screen = app.get_generate_screen()
        await wait_for(pilot, lambda: screen.models)
        await app.workers.wait_for_complete()  # the preset scan too: its options change the drawing
        await pilot.pause()
        # The prompt gets the focus (typing works at once); its blinking cursor would make two exports of the same
        # state differ by timing, so the focus is taken away before the export: no cursor is drawn at all.
        await wait_for(pilot, lambda: app.focused is screen.query_one("#prompt"))
        app.set_focus(None)
        await pilot.pause()
        screen.preview.show_image(image)
        # Compare settled frames: wait until two exports in a row agree (late layout passes on a loaded box).
        shot = app.export_screenshot()
        for _ in range(50):
            await pilot.pause(0.05)
            again = app.export_screenshot()
            if normalized(again) == normalized(shot):
                break
            shot = again
        return shot, screen_text(app)


async def test_preview_is_drawn_with_half_blocks_in_the_image_colours(tmp_path):
    svg, text = await shot_with_preview(tmp_path, two_band_image())
    assert "▀" in text
    half_block_rows = [line for line in text.splitlines() if "▀▀▀▀" in line]
    assert len(half_block_rows) >= 4
    fills = {c.lower() for c in re.findall(r"#[0-9a-fA-F]{6}", svg)}
    assert {"#ff0000", "#0000ff"} <= fills


async def test_same_state_gives_the_same_screenshot(tmp_path):
    first, _ = await shot_with_preview(tmp_path / "a", two_band_image())
    second, _ = await shot_with_preview(tmp_path / "b", two_band_image())
    assert normalized(first) == normalized(second)
    third, _ = await shot_with_preview(tmp_path / "c", two_band_image().transpose(Image.Transpose.ROTATE_90))
    assert normalized(third) != normalized(first)


SCREENS = [
    ("f2", ["Prompt", "Negative prompt", "Queue  (Ctrl+Enter)", "Preview", "^r Random seed"]),
    ("f3", ["Presets", "sd15-balanced", "built-in", "Save current"]),
    ("f4", ["Queue — 0 active", "state", "prompt", "progress", "Pause/Resume"]),
    ("f5", ["search prompts", "No images yet.", "Copy prompt"]),
]


async def test_each_screen_shows_its_landmarks_and_the_status_bar(tmp_path):
    app = make_app(tmp_path, start_worker=False)
    async with app.run_test(size=(140, 45), notifications=False) as pilot:
        await wait_for(pilot, lambda: app.get_generate_screen().models)
        for key, landmarks in SCREENS:
            await pilot.press(key)
            await pilot.pause(0.2)
            text = screen_text(app)
            for landmark in landmarks:
                assert landmark in text, (key, landmark, text)
            assert "starting the worker…" in text
            assert app.export_screenshot().startswith("<svg")
