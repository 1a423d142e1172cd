"""Worker events entering the UI: step messages coalesce (can_replace), previews are throttled, the last
step always arrives, and the status bar shows every Status field."""

from __future__ import annotations

import sys
import threading

import pytest
from PIL import Image

from core.events import JobStarted, JobStep, Status
from core.request import GenerationRequest
from tests.tui_fakes import FakeRunner, make_app, screen_text, wait_for
from tui.app import DarkroomApp


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DARKROOM_HOME", str(tmp_path / "home"))


def step(job, n, preview=True):
    return JobStep(job, n, 200, n * 0.01, Image.new("RGB", (8, 8), (n, 0, 0)) if preview else None)


def test_can_replace_rules():
    older = DarkroomApp.JobProgress(step(1, 1))
    assert older.can_replace(DarkroomApp.JobProgress(step(1, 2)))
    assert not older.can_replace(DarkroomApp.JobProgress(step(2, 2)))  # another job
    assert not older.can_replace(DarkroomApp.JobProgress(step(1, 2, preview=False)))  # would lose an image
    assert DarkroomApp.JobProgress(step(1, 1, preview=False)).can_replace(DarkroomApp.JobProgress(step(1, 2)))
    assert not older.can_replace(DarkroomApp.CoreEvent(Status(1)))


async def test_burst_of_steps_is_throttled_and_last_step_arrives(tmp_path):
    app = make_app(tmp_path, FakeRunner(gate=threading.Event()), start_worker=False)
    async with app.run_test(size=(140, 45)) as pilot:
        request = GenerationRequest(model="fake-model.safetensors", prompt="burst", seed=1)
        app._on_worker_event(JobStarted(1, request))

        def burst():
            for n in range(1, 201):
                app._on_worker_event(step(1, n))

        thread = threading.Thread(target=burst)
        thread.start()
        thread.join()
        await wait_for(pilot, lambda: app.progress.get(1) is not None and app.progress[1].step == 200)
        preview = app.get_generate_screen().preview
        assert app.preview_messages_posted < 20  # ~4/s, plus the final step
        assert app.progress_messages_handled < 200  # stale steps were dropped in the queue
        assert preview.image_widget.image.getpixel((0, 0)) == (200, 0, 0)  # the newest preview is shown
        assert "step 200/200" in screen_text(app)


async def test_status_bar_shows_every_field(tmp_path):
    app = make_app(tmp_path, start_worker=False)
    async with app.run_test(size=(160, 45)) as pilot:
        app._on_worker_event(Status(None, activity="loading dreamshaper_8", device="cuda:0",
                                    memory_used=3 * 2**30, memory_peak=5 * 2**30, memory_total=24 * 2**30,
                                    attention_backend="sage", dtype="float16", loaded_model="dreamshaper_8",
                                    queue_length=3, paused=True))
        await wait_for(pilot, lambda: "dreamshaper_8" in screen_text(app))
        line = next(line for line in screen_text(app).splitlines() if "cuda:0" in line)
        for part in ("VRAM 3.0G peak 5.0G of 24.0G", "sage", "float16", "model dreamshaper_8", "queue 3 (paused)",
                     "loading dreamshaper_8"):
            assert part in line, line
        await pilot.press("f4")  # the status bar is on every screen
        await pilot.pause()
        assert "cuda:0" in screen_text(app)


async def test_statuses_freeze_new_modules_and_models_but_never_collect_on_the_ui_thread(tmp_path, monkeypatch):
    """A model load or new modules (torch, the pipeline) freeze what exists, without a collection: a full
    collection with torch loaded stalled the UI ~270 ms, and unfrozen model objects made later ones ~20 ms."""
    import gc
    import types

    app = make_app(tmp_path, start_worker=False)
    collections = []
    async with app.run_test(size=(140, 45)) as pilot:
        await wait_for(pilot, lambda: gc.get_freeze_count() > 0)
        monkeypatch.setattr(gc, "collect", lambda *a: collections.append(a) or 0)
        model = [[index] for index in range(20_000)]  # the objects of a model the worker just loaded

        def collector_sees(objects: list) -> bool:  # gc.get_objects() lists every tracked object but frozen ones
            tracked = {id(obj) for obj in gc.get_objects()}
            return any(id(part) in tracked for part in objects)

        assert collector_sees(model)
        app._on_worker_event(Status(None, loaded_model="a"))
        await wait_for(pilot, lambda: app._frozen_model == "a")
        # Which objects are frozen, not how many: the freeze count also drops when frozen objects are freed.
        assert not collector_sees(model)
        before = gc.get_freeze_count()
        app._on_worker_event(Status(None, loaded_model="a"))  # the same model again: nothing to do
        await pilot.pause()
        assert gc.get_freeze_count() <= before
        for index in range(60):  # what the worker's imports do to sys.modules
            monkeypatch.setitem(sys.modules, f"darkroom_test_fake_module_{index}", types.ModuleType("fake"))
        app._on_worker_event(Status(None, loaded_model="a"))
        await wait_for(pilot, lambda: app._frozen_modules == len(sys.modules))
        assert collections == []  # never a full collection on the UI thread
        monkeypatch.undo()
        del model
    assert gc.get_freeze_count() == 0  # the app leaves the process as it found it


def test_status_line_separates_activity_from_job_progress_and_never_wraps():
    from core.events import Status
    from tui.widgets.status_bar import status_text

    text = status_text(Status(0, activity="generating", loaded_model="m"), "job #4 step 12/20")
    assert "generating · job #4 step 12/20" in text.plain
    assert text.no_wrap


def test_status_line_names_the_memory_it_shows():
    from core.events import Status
    from tui.widgets.status_bar import status_text

    cpu = Status(None, device="cpu", memory_used=300 * 2**20, memory_peak=2**30, memory_total=24 * 2**30)
    assert " RAM 300M peak 1.0G of 24.0G " in status_text(cpu).plain  # the process's memory on the CPU
    mps = Status(None, device="mps", memory_used=2**30, memory_peak=2**30, memory_total=16 * 2**30)
    assert " VRAM 1.0G peak 1.0G of 16.0G " in status_text(mps).plain


def test_status_line_while_the_worker_starts():
    from core.events import Status
    from tui.widgets.status_bar import status_text

    assert status_text(None).plain == " starting the worker…"
    starting = Status(None, activity="starting: importing torch", device="…", queue_length=2)
    assert status_text(starting).plain == " starting  importing torch…  queue 2"
    assert "RAM" not in status_text(starting).plain  # no device facts to show yet


async def test_status_line_keeps_the_queue_and_the_job_at_80_columns(tmp_path, monkeypatch):
    # At 80 columns the device facts and a long model name took the whole line, cutting off what the worker is
    # doing; narrow, the memory and attention get their short forms and the model name gives way.
    from core.events import Status
    from tests.tui_fakes import make_app, screen_text, wait_for

    monkeypatch.setenv("DARKROOM_HOME", str(tmp_path / "home"))
    model = "juggernautXL_v9Rundiffusionphoto2.safetensors"
    app = make_app(tmp_path, start_worker=False)
    async with app.run_test(size=(80, 24)) as pilot:
        app.status = Status(None, activity="generating", device="cuda:0", memory_used=5 * 2**30,
                            memory_peak=7 * 2**30, memory_total=24 * 2**30, attention_backend="sage",
                            dtype="float16", loaded_model=model, queue_length=3)
        app.progress_line = "job #12 step 13/60"
        await wait_for(pilot, lambda: "job #12 step 13/60" in screen_text(app))
        line = next(row for row in screen_text(app).splitlines() if "cuda:0" in row)
        assert "queue 3  generating · job #12 step 13/60" in line and "VRAM 5.0G" in line
        assert "model juggernaut" in line  # the name shortened, not gone
        await pilot.resize_terminal(160, 30)  # wide again: everything in full
        await wait_for(pilot, lambda: f"model {model}" in screen_text(app))
        assert "VRAM 5.0G peak 7.0G of 24.0G  attention: sage" in screen_text(app)


async def test_a_job_event_while_the_app_closes_is_dropped(tmp_path):
    """A job that ends as the app closes (quit with 'Finish it', a test leaving run_test) delivered its event
    with no screen left: refresh_bindings raised ScreenStackError and the app exited with a traceback."""
    from core.events import JobFinished

    app = make_app(tmp_path, start_worker=False)
    async with app.run_test(size=(80, 24)):
        pass
    assert app.screen_stack == []  # closed: the last screen is gone, the app still counts as mounted
    app.on_darkroom_app_core_event(app.CoreEvent(JobStarted(7, GenerationRequest(model="m", seed=1))))
    app.on_darkroom_app_core_event(app.CoreEvent(JobFinished(7, ("x.png",), (1,), 0.1)))


async def test_a_step_event_while_the_app_closes_is_dropped(tmp_path):
    """A job's step that arrives once the app is closing reached the Generate screen while its widgets were being
    removed: the preview's query raised NoMatches and the app exited with a traceback (seen in the suite, at
    random). From exit() on, steps update the app's record only."""
    app = make_app(tmp_path, start_worker=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: app.get_generate_screen() is not None)
        screen = app.get_generate_screen()
        drawn = []
        screen.show_step = drawn.append
        app.on_darkroom_app_job_progress(app.JobProgress(JobStep(7, 2, 20, 1.0, None, 0)))
        assert len(drawn) == 1  # running: drawn
        app.exit()
        app.on_darkroom_app_job_progress(app.JobProgress(JobStep(7, 3, 20, 1.5, None, 0)))
        assert len(drawn) == 1 and app.progress[7].step == 3  # closing: recorded, not drawn
