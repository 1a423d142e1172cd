"""Pilot tests of the Generate screen's advanced section (VAE, clip skip, img2img, hires fix)."""

from __future__ import annotations

import threading

import pytest
from PIL import Image
from textual.widgets import Collapsible, Input, Select, Switch

from core.presets import Preset
from tests.tui_fakes import FakeRegistry, FakeRunner, make_app, wait_for


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DARKROOM_HOME", str(tmp_path / "home"))


class VaeRegistry(FakeRegistry):
    def vaes(self):
        from tests.tui_fakes import FakeModel

        return [FakeModel("sdxl_vae", self.search_dirs[0] / "sdxl_vae.safetensors")]


def gated_app(tmp_path):
    app = make_app(tmp_path, FakeRunner(gate=threading.Event()))  # jobs stay queued: only submission matters
    app.registry = VaeRegistry()
    return app


async def ready(pilot, app):
    screen = app.get_generate_screen()
    await wait_for(pilot, lambda: screen.query_one("#model", Select).value == "fake-model.safetensors")
    return screen


def fill_advanced(screen, init_image):
    screen.query_one("#vae", Select).value = "sdxl_vae"
    screen.query_one("#clip_skip", Input).value = "2"
    screen.query_one("#init_image", Input).value = str(init_image)
    screen.query_one("#denoise", Input).value = "0.6"
    screen.query_one("#hires-enabled", Switch).value = True
    screen.query_one("#hires-scale", Input).value = "1.5"
    screen.query_one("#hires-upscaler", Select).value = "image"
    screen.query_one("#hires-steps", Input).value = "12"
    screen.query_one("#hires-denoise", Input).value = "0.4"


async def test_advanced_values_reach_the_request_and_come_back_after_restart(tmp_path):
    source = tmp_path / "source.png"
    Image.new("RGB", (64, 64), "red").save(source)
    app = gated_app(tmp_path)
    async with app.run_test(size=(140, 50)) as pilot:
        screen = await ready(pilot, app)
        assert [str(o[0]) for o in screen.query_one("#vae", Select)._options] == ["built-in", "sdxl_vae"]
        # Keyboard: focus the section's title and open it with Enter.
        advanced = screen.query_one("#advanced", Collapsible)
        assert advanced.collapsed
        advanced.query_one("CollapsibleTitle").focus()
        await pilot.press("enter")
        assert not advanced.collapsed
        fill_advanced(screen, source)
        await pilot.press("ctrl+j")
        await wait_for(pilot, lambda: len(app.store.list_jobs()) == 1)
        request = app.store.list_jobs()[0].request
        assert (request.vae, request.clip_skip, request.init_image, request.denoise) == ("sdxl_vae", 2, str(source), 0.6)
        assert request.hires is not None
        assert (request.hires.scale, request.hires.upscaler, request.hires.steps, request.hires.denoise) == (
            1.5, "image", 12, 0.4)
    app2 = gated_app(tmp_path)
    async with app2.run_test(size=(140, 50)) as pilot:
        screen = await ready(pilot, app2)
        await wait_for(pilot, lambda: screen.query_one("#vae", Select).value == "sdxl_vae")
        assert not screen.query_one("#advanced", Collapsible).collapsed
        assert screen.query_one("#clip_skip", Input).value == "2"
        assert screen.query_one("#init_image", Input).value == str(source)
        assert screen.query_one("#denoise", Input).value == "0.6"
        assert screen.query_one("#hires-enabled", Switch).value is True
        assert screen.query_one("#hires-upscaler", Select).value == "image"
        assert (screen.query_one("#hires-scale", Input).value, screen.query_one("#hires-steps", Input).value,
                screen.query_one("#hires-denoise", Input).value) == ("1.5", "12", "0.4")


async def test_defaults_send_a_plain_txt2img_request(tmp_path):
    app = gated_app(tmp_path)
    async with app.run_test(size=(140, 50)) as pilot:
        await ready(pilot, app)
        await pilot.press("ctrl+j")
        await wait_for(pilot, lambda: len(app.store.list_jobs()) == 1)
        request = app.store.list_jobs()[0].request
        assert (request.vae, request.clip_skip, request.init_image, request.denoise, request.hires) == (
            None, 1, None, 1.0, None)


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("#init_image", "missing.png", "init_image = 'missing.png' is invalid: an image file; "),
    # checked when queued, as --batch does, not when the job runs
    ("#init_image", __file__, "is invalid: an image file (PNG, JPEG, WebP); "),
    ("#clip_skip", "13", "clip_skip = 13 is invalid"),
    ("#hires-scale", "9", "hires.scale = 9.0 is invalid"),
    ("#hires-steps", "", "hires.steps = '' is invalid"),
])
async def test_invalid_advanced_value_is_a_notification(tmp_path, field, value, expected):
    app = gated_app(tmp_path)
    async with app.run_test(size=(140, 50)) as pilot:
        screen = await ready(pilot, app)
        screen.query_one("#hires-enabled", Switch).value = True
        screen.query_one(field, Input).value = value
        await pilot.press("ctrl+j")
        await pilot.pause()
        assert app.store.list_jobs() == []
        messages = [n.message for n in app._notifications]
        assert any(expected in m for m in messages), messages


async def test_preset_with_hires_fills_the_section_and_one_without_turns_it_off(tmp_path):
    app = gated_app(tmp_path)
    async with app.run_test(size=(140, 50)) as pilot:
        screen = await ready(pilot, app)
        screen.apply_preset(Preset("hd", "", {"steps": 25, "clip_skip": 2, "hires": {"scale": 1.75, "denoise": 0.3}},
                                   None, False, None))
        await pilot.pause()
        assert not screen.query_one("#advanced", Collapsible).collapsed
        assert screen.query_one("#hires-enabled", Switch).value is True
        assert screen.query_one("#hires-scale", Input).value == "1.75"
        assert screen.query_one("#hires-denoise", Input).value == "0.3"
        assert screen.query_one("#hires-upscaler", Select).value == "latent"  # HiresFix default for a missing key
        assert screen.query_one("#clip_skip", Input).value == "2"
        await pilot.press("ctrl+j")
        await wait_for(pilot, lambda: len(app.store.list_jobs()) == 1)
        request = app.store.list_jobs()[0].request
        assert (request.hires.scale, request.hires.denoise, request.hires.steps, request.clip_skip) == (1.75, 0.3, 0, 2)
        screen.apply_preset(Preset("plain", "", {"steps": 20}, None, False, None))
        await pilot.pause()
        assert screen.query_one("#hires-enabled", Switch).value is False


async def test_load_into_generate_from_history_fills_the_section(tmp_path):
    from core.request import GenerationRequest, HiresFix

    app = gated_app(tmp_path)
    async with app.run_test(size=(140, 50)) as pilot:
        screen = await ready(pilot, app)
        old = GenerationRequest(model="fake-model.safetensors", vae="/elsewhere/other_vae.pt", clip_skip=3,
                                hires=HiresFix(scale=2.5, upscaler="image", steps=7, denoise=0.45))
        app.load_into_generate(old.to_dict())
        await pilot.pause()
        # A VAE that is not in the models folders is kept as an option rather than dropped.
        assert screen.query_one("#vae", Select).value == "/elsewhere/other_vae.pt"
        assert screen.query_one("#clip_skip", Input).value == "3"
        await pilot.press("ctrl+j")
        await wait_for(pilot, lambda: len(app.store.list_jobs()) == 1)
        request = app.store.list_jobs()[0].request
        assert request.replace(seed=old.seed) == old


async def test_relative_init_image_is_taken_from_the_current_directory_and_says_so(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    Image.new("RGB", (64, 64), "red").save(work / "rel.png")
    monkeypatch.chdir(work)
    app = gated_app(tmp_path)
    async with app.run_test(size=(140, 50)) as pilot:
        screen = await ready(pilot, app)
        screen.query_one("#init_image", Input).value = "nope.png"
        await pilot.press("ctrl+j")
        await pilot.pause()
        assert app.store.list_jobs() == []
        errors = [n.message for n in app._notifications if n.severity == "error"]
        assert any(f"a relative path is taken from the current directory, {work}" in m for m in errors), errors
        screen.query_one("#init_image", Input).value = "rel.png"
        await pilot.press("ctrl+j")
        await wait_for(pilot, lambda: len(app.store.list_jobs()) == 1)
        assert app.store.list_jobs()[0].request.init_image == str(work / "rel.png")
        notes = [n.message for n in app._notifications if n.severity == "information"]
        assert f"Init image rel.png: a relative path, taken from the current directory: {work / 'rel.png'}" in notes
        # the field shows the path that was used, so a restart from another folder still finds it
        assert screen.query_one("#init_image", Input).value == str(work / "rel.png")


async def test_a_restart_with_the_advanced_section_open_shows_the_top_of_the_form(tmp_path):
    # Restored open, the section expanded after the form mounted and scrolled itself into view (Textual's
    # Collapsible does on expand): at 80x24 the focused prompt was above the top of the form.
    from tests.tui_fakes import screen_text

    for run in range(2):
        app = make_app(tmp_path, start_worker=False)
        async with app.run_test(size=(80, 24)) as pilot:
            screen = app.get_generate_screen()
            await wait_for(pilot, lambda s=screen: s._form_ready)
            if run == 0:
                screen.query_one("#advanced", Collapsible).collapsed = False
                await pilot.pause()
                app.save_form_settings()
                continue
            await pilot.pause(0.3)  # the expand's scroll ran after a refresh, animated
            assert not screen.query_one("#advanced", Collapsible).collapsed
            assert screen.query_one("#form").scroll_y == 0 and app.focused.id == "prompt"
            assert "Prompt  (Ctrl+N" in screen_text(app)
