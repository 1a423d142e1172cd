"""Pilot tests of the Generate screen with the fake runner (no torch, no real terminal)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from textual.widgets import Checkbox, Input, Select, TextArea

from tests.tui_fakes import FakeRunner, make_app, screen_text, wait_for


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DARKROOM_HOME", str(tmp_path / "home"))


async def test_queue_job_finishes_into_history(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=(140, 45)) as pilot:
        screen = app.get_generate_screen()
        await wait_for(pilot, lambda: screen.query_one("#model", Select).value == "fake-model.safetensors")
        screen.query_one("#prompt", TextArea).load_text("a lighthouse at dusk")
        screen.query_one("#steps", Input).value = "4"
        screen.query_one("#seed", Input).value = "1234"
        screen.query_one("#seed-lock", Checkbox).value = True
        await pilot.press("ctrl+j")
        await wait_for(pilot, lambda: len(app.store.history()) == 1)
        row = app.store.history()[0]
        assert row.request.prompt == "a lighthouse at dusk"
        assert row.request.steps == 4
        assert row.seed == 1234
        await wait_for(pilot, lambda: screen.preview.frames_drawn >= 2)  # previews, then the final image
        stats = str(screen.query_one("#preview-stats").render())
        assert "done" in stats and "seeds 1234" in stats
        assert screen.query_one("#preview-progress").progress == 4


async def ready(pilot, app):
    screen = app.get_generate_screen()
    await wait_for(pilot, lambda: screen.query_one("#model", Select).value == "fake-model.safetensors")
    return screen


async def test_no_model_chosen_is_named_and_settings_keep_saving(tmp_path):
    """A blank model Select (no checkpoints, or the blank entry picked) asks for a model instead of reporting
    the Select's sentinel as an invalid value, and the last-used settings are still written."""
    app = make_app(tmp_path)
    async with app.run_test(size=(140, 45)) as pilot:
        screen = await ready(pilot, app)
        screen.query_one("#model", Select).clear()
        screen.query_one("#prompt", TextArea).load_text("no model yet")
        await pilot.pause(0.8)  # the settings file is written at most every half second
        await pilot.press("ctrl+j")
        await pilot.pause()
        messages = [n.message for n in app._notifications]
        assert "Choose a model first (no checkpoint is selected)." in messages
        assert not app.store.list_jobs()
        assert "no model yet" in app.settings_file.read_text()


async def test_prompt_editing_queues_without_a_warning_and_unreadable_syntax_warns(tmp_path):
    app = make_app(tmp_path, FakeRunner(gate=threading.Event()))
    async with app.run_test(size=(140, 45)) as pilot:
        screen = await ready(pilot, app)
        screen.query_one("#prompt", TextArea).load_text("a cat, [red:blue:0.5] [dog|cat] AND a hat:0.5")
        await pilot.press("ctrl+j")
        await pilot.pause()
        assert len(app.store.list_jobs()) == 1
        assert not [n.message for n in app._notifications if n.severity == "warning"]
        screen.query_one("#prompt", TextArea).load_text("a cat, [red:blue:0.5")
        await pilot.press("ctrl+j")
        await pilot.pause()
        assert len(app.store.list_jobs()) == 2
        warnings = [n.message for n in app._notifications if n.severity == "warning"]
        assert any(w.startswith("[red:blue:0.5 in the prompt: not read as prompt editing") for w in warnings), warnings


async def test_seed_lock_says_its_state_in_words(tmp_path):
    app = make_app(tmp_path, start_worker=False)
    async with app.run_test(size=(140, 45)) as pilot:
        screen = await ready(pilot, app)
        lock = screen.query_one("#seed-lock", Checkbox)
        lock.value = False
        await pilot.press("ctrl+l")
        await pilot.pause()
        assert lock.value and str(lock.label) == "locked"
        await pilot.press("ctrl+l")
        await pilot.pause()
        assert not lock.value and str(lock.label) == "lock"


async def test_unlocked_seed_rerolls_locked_seed_stays(tmp_path):
    app = make_app(tmp_path, FakeRunner(gate=threading.Event()))  # jobs never finish: only queueing matters
    async with app.run_test(size=(140, 45)) as pilot:
        screen = await ready(pilot, app)
        seed = screen.query_one("#seed", Input)
        seed.value = "42"
        screen.query_one("#seed-lock", Checkbox).value = True
        await pilot.press("ctrl+j")
        await pilot.pause()
        assert seed.value == "42"
        screen.query_one("#seed-lock", Checkbox).value = False
        await pilot.press("ctrl+j")
        await pilot.pause()
        assert seed.value != "42"
        await pilot.click("#dice")
        await pilot.pause()
        rolled = seed.value
        await pilot.press("ctrl+r")
        assert seed.value != rolled and 0 <= int(seed.value) <= 2**32 - 1
        jobs = app.store.list_jobs()
        assert [j.request.seed for j in sorted(jobs, key=lambda j: j.id)][:2] == [42, 42]


async def test_invalid_field_is_a_notification_not_a_job(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=(140, 45)) as pilot:
        screen = await ready(pilot, app)
        screen.query_one("#width", Input).value = "500"
        await pilot.click("#queue")
        await pilot.pause()
        assert app.store.list_jobs() == []
        messages = [n.message for n in app._notifications]
        assert any("width" in m and "multiple of 8" in m for m in messages), messages


async def test_size_preset_and_last_used_settings_restored(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=(140, 45)) as pilot:
        screen = await ready(pilot, app)
        screen.query_one("#size-preset", Select).value = "768x512"
        await pilot.pause()
        assert (screen.query_one("#width", Input).value, screen.query_one("#height", Input).value) == ("768", "512")
        screen.query_one("#prompt", TextArea).load_text("remember me")
        screen.query_one("#sampler", Select).value = "dpmpp_2m"
        screen.query_one("#steps", Input).value = "33"
        await pilot.pause()
    app2 = make_app(tmp_path)
    async with app2.run_test(size=(140, 45)) as pilot:
        screen = await ready(pilot, app2)
        assert screen.query_one("#prompt", TextArea).text == "remember me"
        assert screen.query_one("#sampler", Select).value == "dpmpp_2m"
        assert screen.query_one("#steps", Input).value == "33"
        assert screen.query_one("#width", Input).value == "768"


async def test_failed_job_is_a_notification_and_app_keeps_running(tmp_path):
    from core.errors import DarkroomError

    app = make_app(tmp_path, FakeRunner(fail_with=DarkroomError("the fake model exploded")))
    async with app.run_test(size=(140, 45)) as pilot:
        screen = await ready(pilot, app)
        screen.query_one("#steps", Input).value = "2"
        await pilot.press("ctrl+j")
        await wait_for(pilot, lambda: any("exploded" in n.message for n in app._notifications))
        assert "failed: the fake model exploded" in str(screen.query_one("#preview-stats").render())
        assert app.store.list_jobs()[0].state == "failed"
        assert app.is_running


async def test_a_long_failure_shows_its_start_under_the_preview(tmp_path):
    """A message that starts with a long path used to wrap after 'failed:' in the one-line label, which then
    read 'failed:' and nothing else."""
    from core.errors import DarkroomError

    path = "/home/someone/ComfyUI/models/checkpoints/truncated_download.safetensors"
    app = make_app(tmp_path, FakeRunner(fail_with=DarkroomError(f"{path}: the file is truncated; re-download it")))
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await ready(pilot, app)
        screen.query_one("#steps", Input).value = "2"
        await pilot.press("ctrl+j")
        await wait_for(pilot, lambda: app.store.list_jobs()[0].state == "failed")
        await pilot.pause()
        assert "failed: /home/someone/ComfyUI" in screen_text(app)


class WarningRunner(FakeRunner):
    def run(self, job, ctx):
        import logging

        logging.getLogger("core.pipeline").warning("the mask [b]was[/b] scaled \x1b]0;owned\x07")
        return super().run(job, ctx)


async def test_a_job_warning_is_a_notification_shown_literally(tmp_path):
    app = make_app(tmp_path, WarningRunner())
    async with app.run_test(size=(140, 45)) as pilot:
        screen = await ready(pilot, app)
        screen.query_one("#steps", Input).value = "1"
        await pilot.press("ctrl+j")
        await wait_for(pilot, lambda: any(n.severity == "warning" for n in app._notifications))
        (note,) = [n for n in app._notifications if n.severity == "warning"]
        assert note.message.startswith("Job #1: the mask [b]was[/b] scaled \\x1b]0;owned")
        assert "\x1b" not in note.message and "\x07" not in note.message and not note.markup


async def test_markup_in_prompt_is_shown_literally(tmp_path):
    prompt = "[red]x[/red] (a:1.2) [b]"
    app = make_app(tmp_path)
    async with app.run_test(size=(140, 45)) as pilot:
        screen = await ready(pilot, app)
        screen.query_one("#prompt", TextArea).load_text(prompt)
        screen.query_one("#steps", Input).value = "2"
        await pilot.press("ctrl+j")
        await wait_for(pilot, lambda: len(app.store.history()) == 1)
        assert prompt in str(screen.query_one("#preview-title").render())
        await pilot.press("f4")
        await pilot.pause()
        queue_table = app.screen.query_one("#queue-table")
        assert prompt in [str(c) for c in queue_table.get_row_at(0)]
        await pilot.press("f5")
        await wait_for(pilot, lambda: prompt in str(app.screen.query_one("#details-text").render()))
        svg = app.export_screenshot()
        assert "[red]x[/red]" in svg and "[b]" in svg


@pytest.mark.parametrize("frames", range(0, 14))
async def test_quitting_while_the_form_is_still_mounting_is_clean(tmp_path, frames):
    """The form mounts in chunks after the first frame; quitting after any number of frames must not raise
    (Textual's Select used to fail on mount when the app exited before its children were composed)."""
    app = make_app(tmp_path, start_worker=False)
    async with app.run_test(size=(140, 45)) as pilot:
        for _ in range(frames):
            await pilot.pause(0)
    assert app.return_code in (0, None)


async def test_scan_results_arriving_while_quitting_are_dropped(tmp_path):
    """The model and preset scans run in threads; a result that arrives as the app quits must not touch the
    torn-down form (seen as NoMatches('SelectOverlay') from set_options)."""
    app = make_app(tmp_path, start_worker=False)
    delivered = []
    async with app.run_test(size=(140, 45)) as pilot:
        screen = app.get_generate_screen()
        await wait_for(pilot, lambda: screen._form_ready and screen.presets)
        presets = screen.presets
        screen.deliver_if_alive(delivered.append, "while running")
    # The app has quit and its widgets are unmounted; the threads' results come now.
    screen.deliver_if_alive(screen._presets_ready, presets, ["a problem nobody will see"])
    screen.deliver_if_alive(screen._models_ready, [], None)
    screen.deliver_if_alive(delivered.append, "after quitting")
    assert delivered == ["while running"]


@pytest.mark.parametrize(("size", "side_by_side"), [((140, 45), True), ((80, 24), True), ((72, 30), True),
                                                ((60, 24), False)])
async def test_layout_fits_small_terminals(tmp_path, size, side_by_side):
    """80x24 (a default SSH window) keeps the form and the preview side by side, the form narrower; below 72
    columns the preview goes under the form. The screens and their keys are named in the top line, and the
    footer's own keys fit from 80 columns up."""
    app = make_app(tmp_path, start_worker=False)
    async with app.run_test(size=size) as pilot:
        screen = await ready(pilot, app)
        await wait_for(pilot, lambda: screen.query("Footer"))
        await pilot.pause()
        form, preview = screen.query_one("#form").region, screen.preview.region
        if side_by_side:
            assert preview.x >= form.right and preview.width >= 30
        else:
            assert preview.y >= form.bottom and preview.width == form.width
        percentage = screen.query_one("#preview-progress").query_one("#percentage").region
        assert percentage.width >= 4 and percentage.right <= preview.right  # "100%" is not cut off
        lines = screen_text(app).splitlines()
        assert "F2 Generate" in lines[0] and "F5 History" in lines[0] or size[0] < 72
        if size[0] >= 80:
            assert "Quit" in lines[-1] and "palette" in lines[-1]


async def test_the_newest_history_image_fills_the_empty_preview_on_start(tmp_path):
    from PIL import Image

    from core.request import GenerationRequest

    app = make_app(tmp_path, start_worker=False)
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "old.png")
    Image.new("RGB", (32, 32), (30, 30, 200)).save(tmp_path / "new.png")
    for name in ("old", "new"):
        app.store.add_history(None, tmp_path / f"{name}.png", GenerationRequest(model="m", prompt=f"the {name} [one]"))
    async with app.run_test(size=(140, 45)) as pilot:
        screen = await ready(pilot, app)
        await wait_for(pilot, lambda: screen.preview.frames_drawn == 1)
        assert str(screen.query_one("#preview-title").render()) == "Last image: the new [one]"
        assert screen.preview.image_widget.image.getpixel((0, 0)) == (30, 30, 200)


async def test_screen_tabs_name_the_keys_and_switch_on_click(tmp_path):
    from tui.widgets.screen_tabs import tabs_text

    app = make_app(tmp_path, start_worker=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot, app)
        line = tabs_text("generate").plain
        await pilot.click("#screen-tabs", offset=(line.index("F4 Queue") + 3, 0))
        await wait_for(pilot, lambda: app.current_mode == "queue")
        assert "F4 Queue" in screen_text(app).splitlines()[0]
        await pilot.press("f5")
        await wait_for(pilot, lambda: app.current_mode == "history")


async def test_notifications_leave_the_progress_line_and_status_bar_visible(tmp_path):
    from textual.widgets._toast import Toast

    runner = FakeRunner(gate=threading.Event())
    app = make_app(tmp_path, runner)
    async with app.run_test(size=(80, 24), notifications=True) as pilot:
        screen = await ready(pilot, app)
        app.submit(screen.build_request())
        for i in range(3):
            app.notify(f"a long notification number {i} that takes a few lines " * 2, timeout=30)
        # "Queued job #1" and these, laid out
        await wait_for(pilot, lambda: len(app.screen.query(Toast)) == 4
                       and all(t.region.height for t in app.screen.query(Toast)))
        toasts = list(app.screen.query(Toast))
        kept_clear = [app.screen.query_one("#status-bar"), screen.query_one("#preview-progress"),
                      screen.query_one("#preview-stats")]
        geometry = app.screen._compositor.full_map  # every widget's region and the clip it is drawn in
        for toast in toasts:
            drawn = geometry[toast].region.intersection(geometry[toast].clip)
            assert drawn.height  # on screen
            for widget in kept_clear:
                assert not drawn.overlaps(widget.region), (drawn, widget.id, widget.region)


async def test_hires_switch_says_on_or_off(tmp_path):
    """In 256-colour terminals the switch's colours are hard to tell apart: a word says its state."""
    from textual.widgets import Label, Switch

    app = make_app(tmp_path)
    async with app.run_test(size=(140, 45)) as pilot:
        screen = await ready(pilot, app)
        await wait_for(pilot, lambda: screen._form_ready)
        state = screen.query_one("#hires-state", Label)
        assert str(state.render()) == "off"
        screen.query_one("#hires-enabled", Switch).value = True
        await pilot.pause()
        assert str(state.render()) == "on"
        screen.set_form_values({"hires": None})
        await pilot.pause()
        assert str(state.render()) == "off"


class StepsThenHold:
    """A FakeRunner gate that lets ``n`` steps through, then holds the job (until it is cancelled)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def wait(self, timeout: float) -> bool:
        if self.n > 0:
            self.n -= 1
            return True
        threading.Event().wait(timeout)
        return False


async def test_a_stopped_job_leaves_the_progress_bar_where_it_stopped(tmp_path):
    # Ctrl+S at step 1 of 4: the bar said 100 % under "cancelled", as if the picture were done.
    app = make_app(tmp_path, FakeRunner(gate=StepsThenHold(1)))
    async with app.run_test(size=(140, 45)) as pilot:
        screen = await ready(pilot, app)
        screen.query_one("#steps", Input).value = "4"
        await pilot.press("ctrl+j")
        bar = screen.query_one("#preview-progress")
        await wait_for(pilot, lambda: bar.progress == 1)
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: "cancelled" in str(screen.query_one("#preview-stats").render()))
        assert bar.progress == 1 and bar.total == 4



async def test_at_80_columns_the_seed_lock_reads_locked_and_an_idle_ctrl_s_says_no_job_runs(tmp_path):
    # At 80x24 the row cut "locked" to "lock", the word the box shows when it is off. Ctrl+S, hidden from the
    # footer while idle, was disabled with it and did nothing at all.
    app = make_app(tmp_path, start_worker=False)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await ready(pilot, app)
        screen.query_one("#seed-lock", Checkbox).value = True
        await pilot.pause()
        assert "▐X▌ locked" in screen_text(app) and "Stop job" not in screen_text(app)
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert [n.message for n in app._notifications][-1:] == ["No job is running."]


async def test_at_80_columns_a_running_jobs_stop_key_fits_the_footer(tmp_path):
    """'^s Stop job' was cut to '^s St' at 80 columns; Lock seed leaves the footer there (its checkbox says
    'lock'), and Ctrl+L still toggles it."""
    gate = threading.Event()
    app = make_app(tmp_path, FakeRunner(gate=gate))
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await ready(pilot, app)
        await pilot.press("ctrl+j")
        await wait_for(pilot, lambda: app.running_job is not None)
        await wait_for(pilot, lambda: "^s Stop job" in screen_text(app).splitlines()[-1])
        assert "Lock seed" not in screen_text(app).splitlines()[-1]
        locked = screen.query_one("#seed-lock", Checkbox).value
        await pilot.press("ctrl+l")
        await pilot.pause()
        assert screen.query_one("#seed-lock", Checkbox).value is not locked
        gate.set()
    wide = make_app(tmp_path / "wide")
    async with wide.run_test(size=(120, 40)) as pilot:
        await ready(pilot, wide)
        await wait_for(pilot, lambda: "^l Lock seed" in screen_text(wide).splitlines()[-1])


async def test_a_finished_job_says_where_its_images_were_saved(tmp_path):
    # a new user's first question after the first job; it said "Job #1 finished: 1 image" and no path
    app = make_app(tmp_path)
    async with app.run_test(size=(140, 45), notifications=True) as pilot:
        screen = await ready(pilot, app)
        screen.query_one("#steps", Input).value = "2"
        await pilot.press("ctrl+j")
        await wait_for(pilot, lambda: len(app.store.history()) == 1)
        path = app.store.history()[0].path
        await wait_for(pilot, lambda: any(n.message == f"Job #1 finished: saved {path}" for n in app._notifications))
        screen.query_one("#batch_count", Input).value = "3"
        await pilot.press("ctrl+j")
        await wait_for(pilot, lambda: len(app.store.history()) == 4)
        folder = Path(app.store.history()[0].path).parent
        await wait_for(pilot, lambda: any(n.message == f"Job #2 finished: 3 images saved in {folder}"
                                          for n in app._notifications))
