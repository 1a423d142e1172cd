"""Pilot tests of the LoRA / embedding picker (Ctrl+N on Generate) and the running job's LoRAs in the preview."""

from __future__ import annotations

from pathlib import Path

import pytest
from textual.widgets import Select, TextArea

from tests.tui_fakes import FakeModel, FakeRegistry, make_app, screen_text, wait_for
from tui.screens.networks import NetworksScreen


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DARKROOM_HOME", str(tmp_path / "home"))


class NetworkRegistry(FakeRegistry):
    def loras(self) -> list[FakeModel]:
        return [FakeModel(n, Path("/models/loras") / f"{n}.safetensors") for n in ("styles/ink", "detail")]

    def embeddings(self) -> list[FakeModel]:
        return [FakeModel("easynegative", Path("/models/embeddings/easynegative.pt"))]


async def prompt_reading(pilot, app, text: str):
    """(the Generate screen, its focused prompt holding ``text``) once the form has its model."""
    screen = app.get_generate_screen()
    await wait_for(pilot, lambda: screen.query_one("#model", Select).value == "fake-model.safetensors")
    prompt = screen.query_one("#prompt", TextArea)
    prompt.load_text(text)
    prompt.focus()
    return screen, prompt


async def test_picker_inserts_loras_and_embeddings_and_the_running_job_shows_its_loras(tmp_path):
    app = make_app(tmp_path, registry=NetworkRegistry())
    async with app.run_test(size=(140, 45)) as pilot:
        screen, prompt = await prompt_reading(pilot, app, "a harbour at night")
        prompt.move_cursor((0, len(prompt.text)))
        await pilot.press("ctrl+n")
        await wait_for(pilot, lambda: isinstance(app.screen, NetworksScreen) and len(app.screen.entries) == 3)
        text = screen_text(app)
        assert "styles/ink" in text and "detail" in text and "easynegative" in text and "2 LoRAs, 1 embedding" in text
        await pilot.press("i", "n", "k", "enter")  # the filter leaves one entry; Enter inserts it
        await wait_for(pilot, lambda: app.screen is screen)
        assert prompt.text == "a harbour at night <lora:ink:1>"
        await pilot.press("ctrl+n")
        await wait_for(pilot, lambda: isinstance(app.screen, NetworksScreen) and len(app.screen.entries) == 3)
        await pilot.press("e", "a", "s", "y", "enter")
        await wait_for(pilot, lambda: app.screen is screen)
        assert prompt.text == "a harbour at night <lora:ink:1> easynegative"
        await pilot.press("ctrl+n")
        await wait_for(pilot, lambda: isinstance(app.screen, NetworksScreen))
        await pilot.press("escape")
        await wait_for(pilot, lambda: app.screen is screen)
        assert prompt.text == "a harbour at night <lora:ink:1> easynegative"

        # a preset's LoRA (the LCM-LoRA) becomes a tag in the prompt, once
        from core.presets import find_preset

        for _ in range(2):
            screen.apply_preset(find_preset("sd15-lcm-lora"))
            await pilot.pause()
        assert prompt.text == "a harbour at night <lora:ink:1> easynegative <lora:lcm-lora-sdv1-5:1>"
        # the running job's LoRAs in the preview title
        prompt.load_text("a cat <lora:ink:0.8> <lora:detail:0.5:1.2>")
        await pilot.press("ctrl+j")
        await wait_for(pilot, lambda: "[LoRAs: ink 0.8, detail 0.5/1.2]" in screen_text(app))


async def test_a_tag_inserted_before_a_word_is_kept_apart_from_it(tmp_path):
    # With the cursor at the start of the prompt (where a restart or a fill from an image leaves it), the
    # tag was glued to the first word: "<lora:ink:1>a harbour".
    app = make_app(tmp_path, registry=NetworkRegistry(), start_worker=False)
    async with app.run_test(size=(140, 45)) as pilot:
        screen, prompt = await prompt_reading(pilot, app, "a harbour at night")
        prompt.move_cursor((0, 0))
        screen._insert_network("<lora:ink:1>")
        assert prompt.text == "<lora:ink:1> a harbour at night"
        prompt.move_cursor((0, len("<lora:ink:1> a harbour")))
        screen._insert_network("easynegative")
        assert prompt.text == "<lora:ink:1> a harbour easynegative at night"
