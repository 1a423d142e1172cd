"""The Generate form: every bad field in one notification, by its form label; a decompression-bomb init image is
a notification (it made the TUI exit); img2img's strength defaults to 0.75."""

from __future__ import annotations

import threading

import pytest
from PIL import Image
from textual.widgets import Input, Select

from tests.test_request_hostile import png_declaring
from tests.tui_fakes import FakeRunner, make_app, wait_for


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DARKROOM_HOME", str(tmp_path / "home"))


async def test_bad_fields_are_reported_at_once_and_a_bomb_does_not_end_the_app(tmp_path):
    bomb = png_declaring(tmp_path / "bomb.png", 30000, 30000)
    source = tmp_path / "source.png"
    Image.new("RGB", (64, 64), "red").save(source)
    app = make_app(tmp_path, FakeRunner(gate=threading.Event()))  # jobs stay queued: only submission matters
    async with app.run_test(size=(140, 50)) as pilot:
        screen = app.get_generate_screen()
        await wait_for(pilot, lambda: screen.query_one("#model", Select).value == "fake-model.safetensors")
        assert screen.query_one("#denoise", Input).value == "0.75"
        for field, value in (("#steps", "0"), ("#cfg", "lots"), ("#width", "100"), ("#init_image", str(bomb))):
            screen.query_one(field, Input).value = value
        await pilot.press("ctrl+j")
        await pilot.pause()
        assert app.is_running and app.store.list_jobs() == []
        errors = [n.message for n in app._notifications if n.severity == "error"]
        assert len(errors) == 1, errors
        lines = errors[0].splitlines()
        assert [line.split(" = ")[0] for line in lines] == [
            "Steps: steps", "CFG: cfg", "Size (width): width", "Init: init_image"]
        # text that is not a number gets the field's valid range, as a jobs file's does
        assert lines[1] == "CFG: cfg = 'lots' is invalid: a number from 0.0 to 30.0"
        assert "a decompression bomb?" in lines[3]

        for field, value in (("#steps", "4"), ("#cfg", "7"), ("#width", "512"), ("#init_image", str(source))):
            screen.query_one(field, Input).value = value
        await pilot.press("ctrl+j")
        await pilot.pause()
        (job,) = app.store.list_jobs()
        assert (job.request.init_image, job.request.denoise) == (str(source.resolve()), 0.75)

        screen.set_form_values({"denoise": 1.0, "init_image": None})  # a txt2img job from the history
        assert screen.query_one("#denoise", Input).value == "0.75"  # its 1.0 is no img2img strength
        screen.set_form_values({"denoise": 1.0, "init_image": str(source)})  # an img2img job's 1.0 is kept
        assert screen.query_one("#denoise", Input).value == "1.0"
