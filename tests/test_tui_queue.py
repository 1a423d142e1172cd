"""Pilot tests of the Queue screen and quitting with a running job (fake runner gated by an Event)."""

from __future__ import annotations

import json
import threading

import pytest

from core.request import GenerationRequest
from tests.tui_fakes import FakeRunner, make_app, screen_text, wait_for


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DARKROOM_HOME", str(tmp_path / "home"))


def request(prompt: str, steps: int = 3) -> GenerationRequest:
    return GenerationRequest(model="fake-model.safetensors", prompt=prompt, steps=steps, seed=7)


def state(app, job_id):
    return app.store.get_job(job_id).state


async def open_queue(pilot, app):
    await pilot.press("f4")
    await pilot.pause()
    return app.screen


async def test_cancel_running_job(tmp_path):
    runner = FakeRunner(gate=threading.Event())
    app = make_app(tmp_path, runner)
    said: list[str] = []  # the notification itself may time out before a loaded machine gets to look
    notify = app.notify
    app.notify = lambda message, **kw: (said.append(message), notify(message, **kw))[1]
    async with app.run_test(size=(140, 40)) as pilot:
        job = app.submit(request("to be cancelled"))
        await wait_for(pilot, lambda: app.running_job == job)
        screen = await open_queue(pilot, app)
        assert screen.selected_job_id() == job
        assert "running" in screen_text(app)
        await pilot.press("c")
        await wait_for(pilot, lambda: state(app, job) == "cancelled")
        assert f"Job #{job} stops at its next step" in said
        await wait_for(pilot, lambda: app.running_job is None)
        await wait_for(pilot, lambda: "cancelled" in screen_text(app))
        assert app.store.history() == []


async def test_pause_holds_jobs_and_resume_runs_them(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=(140, 40)) as pilot:
        screen = await open_queue(pilot, app)
        await pilot.press("p")
        assert app.worker.paused
        await wait_for(pilot, lambda: "PAUSED" in screen_text(app))
        job = app.submit(request("held"))
        await pilot.pause(0.5)
        assert state(app, job) == "pending"
        await pilot.press("p")
        await wait_for(pilot, lambda: state(app, job) == "done")
        await wait_for(pilot, lambda: "done" in [str(c) for c in screen.table.get_row(str(job))])


async def test_move_and_retry(tmp_path):
    from core.errors import DarkroomError

    app = make_app(tmp_path, FakeRunner(fail_with=DarkroomError("boom")))
    async with app.run_test(size=(140, 40)) as pilot:
        screen = await open_queue(pilot, app)
        await pilot.press("p")  # keep both pending so they can be reordered
        first, second = app.submit(request("first")), app.submit(request("second"))
        await pilot.pause()
        pending = [j.id for j in app.store.list_jobs(states=["pending"])]
        assert pending == [first, second]
        screen.table.move_cursor(row=screen.table.get_row_index(str(second)))
        await pilot.press("u")
        assert [j.id for j in app.store.list_jobs(states=["pending"])] == [second, first]
        assert screen.selected_job_id() == second
        await pilot.press("u")  # already first: said, not silently ignored
        assert f"Job #{second} already runs first" in [n.message for n in app._notifications]
        await pilot.press("p")
        await wait_for(pilot, lambda: state(app, first) == "failed" and state(app, second) == "failed")
        app.worker._runner.fail_with = None
        screen.table.move_cursor(row=screen.table.get_row_index(str(first)))
        await pilot.pause()
        assert f"#{first} failed  boom" in screen_text(app)  # the job's error is shown on the job
        await pilot.press("r")
        await wait_for(pilot, lambda: len(app.store.history()) == 1)
        assert app.store.history()[0].request.prompt == "first"
        # r on a done job: not "cannot be retried" alone, but where to make it again
        await wait_for(pilot, lambda: "done" in [str(c) for c in screen.table.get_row(str(first))])
        screen.table.move_cursor(row=screen.table.get_row_index(str(first)))
        await pilot.press("r")
        assert f"Job #{first} is done: to make it again, History's g (Again) queues it as a new job" in [
            n.message for n in app._notifications]
        assert len(app.store.list_jobs(states=["pending"])) == 0


async def test_quit_with_running_job_can_leave_it_interrupted(tmp_path):
    runner = FakeRunner(gate=threading.Event())
    app = make_app(tmp_path, runner)
    async with app.run_test(size=(140, 40)) as pilot:
        job = app.submit(request("left behind"))
        await wait_for(pilot, lambda: app.running_job == job)
        await pilot.press("ctrl+q")
        await pilot.pause()
        assert "still running" in screen_text(app)
        await pilot.click("#interrupt")
        await wait_for(pilot, lambda: not app.is_running)
    assert app.store.get_job(job).state == "interrupted"


async def test_quit_with_running_job_can_finish_it(tmp_path):
    runner = FakeRunner(gate=threading.Event())
    app = make_app(tmp_path, runner)
    async with app.run_test(size=(140, 40)) as pilot:
        job = app.submit(request("finish me"))
        await wait_for(pilot, lambda: app.running_job == job)
        await pilot.press("ctrl+q")
        await pilot.pause()
        await pilot.click("#finish")
        await pilot.pause(0.2)
        assert app.is_running  # still waiting for the job
        runner.gate.set()
        await wait_for(pilot, lambda: not app.is_running)
    assert app.store.get_job(job).state == "done"
    assert len(app.store.history()) == 1


async def test_quit_dialog_answers_to_keys(tmp_path):
    """Keyboard first: Esc stays, l leaves the job interrupted (f finishes it, like the button)."""
    runner = FakeRunner(gate=threading.Event())
    app = make_app(tmp_path, runner)
    async with app.run_test(size=(140, 40)) as pilot:
        job = app.submit(request("keys"))
        await wait_for(pilot, lambda: app.running_job == job)
        await pilot.press("ctrl+q")
        await pilot.pause()
        await pilot.press("escape")
        await pilot.pause()
        assert app.is_running and "still running" not in screen_text(app)
        await pilot.press("ctrl+q")
        await pilot.pause()
        await pilot.press("l")
        await wait_for(pilot, lambda: not app.is_running)
    assert app.store.get_job(job).state == "interrupted"


async def test_a_stopped_batch_runs_job_is_retried_into_this_queue(tmp_path):
    """Jobs a `darkroom --batch` run did not start are interrupted in its own queue; the Queue screen says
    where they come from, and r runs them here."""
    app = make_app(tmp_path)
    job = app.store.add_job(request("from a batch run"), queue="batch-77-1", owned=True)
    app.store.interrupt_pending("batch-77-1", "not started: the batch run was interrupted")
    async with app.run_test(size=(140, 40)) as pilot:
        screen = await open_queue(pilot, app)
        screen.table.move_cursor(row=screen.table.get_row_index(str(job)))
        await pilot.pause()
        assert "from another process's queue (batch-77-1): r runs it here" in screen_text(app)
        await pilot.press("r")
        await wait_for(pilot, lambda: state(app, job) == "done")
        assert app.store.get_job(job).queue == app.worker.queue


async def test_running_jobs_time_keeps_counting(tmp_path):
    app = make_app(tmp_path, FakeRunner(delay=0.3))
    async with app.run_test(size=(140, 40)) as pilot:
        job = app.submit(request("slow", steps=30))
        screen = await open_queue(pilot, app)
        await wait_for(pilot, lambda: app.progress.get(job) is not None and app.progress[job].step >= 1)
        first = str(screen.table.get_cell(str(job), "time"))
        # the cell changes while the job still runs (its end would change it too); on a loaded machine the
        # table's refresh can lag a step or two, so wait for the change instead of reading after N steps
        await wait_for(pilot, lambda: state(app, job) == "running"
                       and str(screen.table.get_cell(str(job), "time")) != first)
        # the selected job's detail pane counts with the table's clock, not only when the table is read again
        detail = screen.query_one("#job-detail")
        await wait_for(pilot, lambda: state(app, job) == "running"
                       and f"running {screen.table.get_cell(str(job), 'time')}" in str(detail.render()))
        shown = str(screen.table.get_cell(str(job), "time"))
        await wait_for(pilot, lambda: state(app, job) == "running" and shown not in str(detail.render()))
        app.worker.cancel(job)


async def test_a_paused_queue_stays_paused_after_a_restart(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=(140, 40)) as pilot:
        await open_queue(pilot, app)
        await pilot.press("p")
        assert app.worker.paused
    assert json.loads((tmp_path / "settings.json").read_text())["queue_paused"] is True

    app = make_app(tmp_path)  # the next session, same settings file
    async with app.run_test(size=(140, 40)) as pilot:
        await wait_for(pilot, lambda: app.worker.running)
        assert app.worker.paused
        job = app.submit(request("waits"))
        await pilot.pause(0.3)
        assert state(app, job) == "pending"
        await open_queue(pilot, app)
        await pilot.press("p")
        await wait_for(pilot, lambda: state(app, job) == "done")
    assert json.loads((tmp_path / "settings.json").read_text())["queue_paused"] is False


def test_a_narrow_model_column_keeps_the_name_before_the_family():
    from types import SimpleNamespace

    from tui.screens.queue import model_text

    app = SimpleNamespace(model_families={"flux1-dev-fp8.safetensors": "Flux.1 dev", "v1-5.safetensors": "SD1.x"})
    assert model_text(app, "flux1-dev-fp8.safetensors", 32).plain == "flux1-dev-fp8 · Flux.1 dev"
    assert model_text(app, "flux1-dev-fp8.safetensors", 11).plain == "flux1-d…fp8"  # 80 columns: no room for both
    assert model_text(app, "v1-5.safetensors", 11).plain == "v1-5"
    assert model_text(app, "v1-5.safetensors", 12).plain == "v1-5 · SD1.x"  # a short name keeps its family


async def test_a_job_of_several_images_that_ended_early_says_how_many_it_kept(tmp_path):
    """Each image is saved as it is made, so a job cancelled at image 2 of 3 kept one; the Queue says so, and
    that a retry makes only the rest."""
    app = make_app(tmp_path, start_worker=False)
    async with app.run_test(size=(140, 40)) as pilot:
        job = app.submit(GenerationRequest(model="fake-model.safetensors", prompt="three", steps=2, seed=7,
                                           batch_count=3))
        app.store.add_history(job, tmp_path / "00000-7.png", app.store.get_job(job).request, seed=7)
        app.store.cancel(job)
        screen = await open_queue(pilot, app)
        screen.refresh_jobs()
        await pilot.pause()
        assert "kept 1 of 3 images (History); r makes the other 2" in screen_text(app)
        single = app.submit(request("one image"))
        app.store.cancel(single)
        screen.refresh_jobs()
        screen.table.move_cursor(row=screen.table.get_row_index(str(single)))
        await pilot.pause()
        assert "kept" not in screen_text(app)


async def test_months_of_done_jobs_list_the_newest_and_every_job_to_act_on(tmp_path):
    """The table is rebuilt on every job event; with every job ever listed, 2000 of them took 0.23 s of the UI
    thread each time. The newest done jobs are listed, and every failed or interrupted one (r retries it)."""
    from core.store import JobStore
    from tui.screens.queue import RECENT_ENDED

    store = JobStore(tmp_path / "db.sqlite3")
    failed = store.add_job(request("an old failure"))
    done = [store.add_job(request(f"done {i}")) for i in range(RECENT_ENDED + 5)]
    with store._write() as conn:
        conn.execute("UPDATE jobs SET state = 'done', finished = created + id")
        conn.execute("UPDATE jobs SET state = 'failed', error = 'boom', finished = 0 WHERE id = ?", (failed,))
    store.close()
    app = make_app(tmp_path)
    async with app.run_test(size=(140, 40)) as pilot:
        screen = await open_queue(pilot, app)
        rows = [int(str(key.value)) for key in screen.table.rows]
        assert rows == [*reversed(done[-RECENT_ENDED:]), failed]  # most recently ended first
        assert f"the last {RECENT_ENDED} done shown" in str(screen.query_one("#queue-title").render())


async def test_jobs_left_in_the_queue_at_quit_are_said_as_they_run_at_the_next_start(tmp_path):
    # they started with no word, as if the new session had queued them itself
    from core.store import JobStore

    store = JobStore(tmp_path / "db.sqlite3")
    left = [store.add_job(request(f"left {i}")) for i in range(2)]
    store.close()
    app = make_app(tmp_path)
    async with app.run_test(size=(140, 40), notifications=True) as pilot:
        await wait_for(pilot, lambda: all(state(app, job) == "done" for job in left))
        assert any(n.message == "Running 2 jobs left in the queue from last time (F4 lists them; p there pauses "
                   "the queue)" for n in app._notifications)
    app = make_app(tmp_path)  # nothing left now: nothing said
    async with app.run_test(size=(140, 40), notifications=True) as pilot:
        await wait_for(pilot, lambda: app.worker.running)
        assert not any("left in the queue" in n.message for n in app._notifications)


async def test_a_job_that_ends_between_the_queue_s_two_reads_is_listed_once(tmp_path):
    # the jobs to act on are read, then the ended ones: a job ending in between is in both reads
    import dataclasses

    app = make_app(tmp_path)
    async with app.run_test(size=(140, 40)) as pilot:
        job = app.submit(request("ends now", steps=1))
        await wait_for(pilot, lambda: state(app, job) == "done")
        screen = await open_queue(pilot, app)
        done = app.store.get_job(job)
        list_jobs = app.store.list_jobs
        app.store.list_jobs = lambda states=None, **kw: (  # the first read still sees it running
            [dataclasses.replace(done, state="running")] if "running" in (states or ()) else list_jobs(states, **kw))
        screen.refresh_jobs()
        assert [str(key.value) for key in screen.table.rows] == [str(job)]
        assert str(screen.table.get_cell(str(job), "state")) == "done"
