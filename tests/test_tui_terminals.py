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


@pytest.mark.parametrize("from_a_shell", [True, False])
async def test_ctrl_z_suspends_outside_text_fields(tmp_path, monkeypatch, from_a_shell):
    """Ctrl+Z did nothing but undo: it suspends now (fg resumes), except in a text field, where it still
    undoes, and where no job-control shell started the app (nothing could resume it: it says so)."""
    import os

    from textual.app import App

    suspended = []
    monkeypatch.setattr(App, "action_suspend_process", lambda self: suspended.append(self))
    monkeypatch.setattr(os, "getpgrp", lambda: 200 if from_a_shell else 100)  # a shell's job: a group of its own
    monkeypatch.setattr(os, "getsid", lambda pid: 100)
    app = make_app(tmp_path, start_worker=False)
    async with app.run_test(size=(120, 40), notifications=True) as pilot:
        screen = app.get_generate_screen()
        await wait_for(pilot, lambda: screen._form_ready)
        prompt = screen.query_one("#prompt")
        prompt.focus()
        await pilot.press("a", "b", "c", "ctrl+z")
        await pilot.pause()
        assert prompt.text == "" and suspended == []  # undone, not suspended
        await pilot.press("f5")
        await wait_for(pilot, lambda: app.current_mode == "history")
        await pilot.press("ctrl+z")
        await pilot.pause()
        assert suspended == ([app] if from_a_shell else [])
        notes = [note.message for note in app._notifications]
        assert any("started from a shell" in note for note in notes) != from_a_shell


async def test_fg_after_ctrl_z_redraws_the_whole_screen(tmp_path):
    """Textual comes back from a suspend into a blank alternate screen and repainted only what changed: after
    fg the screen stayed blank but for the status line (its 1 s tick) until something moved."""
    app = make_app(tmp_path, start_worker=False)
    async with app.run_test(size=(120, 40)) as pilot:
        screen = app.get_generate_screen()
        await wait_for(pilot, lambda: screen._form_ready)
        await pilot.pause()
        rows: set[int] = set()
        display = app._display

        def recording(target, update):
            region = getattr(update, "region", None)  # a LayoutUpdate (the full screen), or ChopsUpdate spans
            rows.update(range(region.y, region.bottom) if region else (y for y, *_ in getattr(update, "spans", ())))
            return display(target, update)

        app._display = recording
        app.app_resume_signal.publish(app)  # what the driver's SIGCONT handling ends with
        await pilot.pause()
        await pilot.pause()
        assert rows == set(range(40))


async def test_the_status_line_says_how_previews_are_drawn(tmp_path):
    """Which of kitty graphics, sixel or half-blocks the app chose (auto, or --image-protocol) was said
    nowhere: a user in tmux could not tell whether a blocky preview was the fallback or a broken protocol."""
    app = make_app(tmp_path, start_worker=False)
    async with app.run_test(size=(160, 40)) as pilot:
        await wait_for(pilot, lambda: app.get_generate_screen()._form_ready)
        from core.events import Status

        app.status = Status(0, activity="idle", loaded_model="tiny")  # what the worker reports when it is up
        await pilot.pause()
        assert "previews: half-blocks" in screen_text(app).splitlines()[-2]


def test_protocol_labels_and_the_narrow_status_line():
    import textual_image.widget as tiw

    from core.events import Status
    from tui.widgets.halfblock import HalfBlockImage
    from tui.widgets.image import protocol_label
    from tui.widgets.status_bar import status_text

    assert [protocol_label(c) for c in (HalfBlockImage, tiw.TGPImage, tiw.SixelImage, tiw.UnicodeImage, None)] == [
        "half-blocks", "kitty graphics", "sixel", "block characters", ""]
    status = Status(0, activity="idle", loaded_model="tiny")
    assert "previews: sixel" in status_text(status, width=200, images="sixel").plain
    narrow = status_text(status, width=70, images="sixel").plain  # the first fact to go, with the memory peak
    assert "previews" not in narrow and "queue 0" in narrow


def test_the_tui_refuses_an_output_folder_named_in_another_encoding(tmp_path, capsys):
    import os
    from types import SimpleNamespace

    from tui.app import run_app

    folder = os.fsdecode(bytes(tmp_path) + b"/caf\xe9")
    args = SimpleNamespace(output_dir=folder, db=str(tmp_path / "db.sqlite3"), models_dir=None,
                           image_protocol="halfcell")
    assert run_app(args) == 2  # before the app starts: no job it queued could ever be recorded
    err = capsys.readouterr().err
    assert err.startswith(f"darkroom: --output-dir {tmp_path}/caf\\udce9: its name is not UTF-8 text"), err


@pytest.mark.parametrize("name", ["SIGHUP", "SIGTERM"])
async def test_a_closed_terminal_quits_leaving_the_job_interrupted(tmp_path, name):
    """The default action of SIGHUP (the SSH window closed) killed the app at once: its running job stayed
    'running' in the database until a later start. Now it quits as Ctrl+Q, 'leave it' does."""
    import os
    import signal

    from tests.tui_fakes import FakeRunner

    signum = getattr(signal, name)
    app = make_app(tmp_path, FakeRunner(delay=0.05))
    during_stop = []
    stop = app.worker.stop

    def stopping(**kwargs):
        # a second SIGHUP (the shell's, after the kernel's) or a SIGTERM now must not kill the app mid-stop
        during_stop.append(signal.getsignal(signum))
        stop(**kwargs)

    app.worker.stop = stopping
    async with app.run_test(size=(120, 40)) as pilot:
        screen = app.get_generate_screen()
        await wait_for(pilot, lambda: screen._form_ready)
        job_id = app.worker.submit(GenerationRequest(model="fake-model", prompt="a fox", steps=150, seed=1))
        await wait_for(pilot, lambda: app.running_job == job_id)
        os.kill(os.getpid(), signum)
        await wait_for(pilot, lambda: not app.is_running)
    assert app.return_code == 128 + signum
    assert app.store.get_job(job_id).state == "interrupted"
    assert during_stop and signal.SIG_DFL not in during_stop, during_stop
    assert signal.getsignal(signum) is signal.SIG_DFL  # nothing left behind in the loop
