"""Command palette provider: presets, models and history search."""

from __future__ import annotations

import pytest
from textual.widgets import Input, Select

from core.presets import load_presets
from core.request import GenerationRequest
from tests.tui_fakes import make_app, wait_for


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DARKROOM_HOME", str(tmp_path / "home"))


async def palette(pilot, text):
    await pilot.press("ctrl+p")
    await pilot.pause()
    await pilot.press(*text)
    await pilot.pause(0.3)
    await pilot.press("enter")
    await pilot.pause()


async def test_palette_applies_preset_picks_model_and_searches_history(tmp_path):
    fast = next(p for p in load_presets()[0] if p.name == "sd15-fast-ays")
    app = make_app(tmp_path, models=["alpha.safetensors", "beta.safetensors"])
    async with app.run_test(size=(140, 45)) as pilot:
        generate = app.get_generate_screen()
        await wait_for(pilot, lambda: generate.models and generate.presets)
        await palette(pilot, "fast-ays")
        assert generate.query_one("#steps", Input).value == str(fast.fields["steps"])
        await palette(pilot, "Model: beta")
        assert generate.query_one("#model", Select).value == "beta.safetensors"

        for prompt in ("an owl", "a cat"):
            app.submit(GenerationRequest(model="alpha.safetensors", prompt=prompt, steps=1, seed=1))
        await wait_for(pilot, lambda: len(app.store.history()) == 2)
        await palette(pilot, "owl")
        assert type(app.screen).__name__ == "HistoryScreen"
        assert app.screen.query_one("#history-search", Input).value == "owl"
        await wait_for(pilot, lambda: app.screen.query_one("#history-table").row_count == 1)


async def test_palette_opens_the_png_dialog_from_any_screen(tmp_path):
    app = make_app(tmp_path, start_worker=False)
    async with app.run_test(size=(140, 45)) as pilot:
        generate = app.get_generate_screen()
        await wait_for(pilot, lambda: generate.models)
        await pilot.press("f5")
        await pilot.pause()
        await palette(pilot, "Open PNG")
        await wait_for(pilot, lambda: type(app.screen).__name__ == "TextPromptScreen")
        assert "drop the file here" in str(app.screen.query_one("#question").render())
        await pilot.press("escape")
        assert app.screen is generate
