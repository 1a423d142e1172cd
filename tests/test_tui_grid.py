"""Pilot tests of the X/Y/Z grid dialog (Ctrl+G on Generate): the cells it queues, the message for bad values,
and the grid image saved once every cell is done, shown as the grid's History entry."""

from __future__ import annotations

import threading

import pytest
from PIL import Image
from textual.widgets import Select, TextArea

from core.grid import expand, grid_image, parse_axes
from tests.tui_fakes import FakeRunner, make_app, screen_text, wait_for
from tui.screens.grid import GridScreen
from tui.widgets.safe_input import Input


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DARKROOM_HOME", str(tmp_path / "home"))


async def open_dialog(pilot, app, prompt="a red cat"):
    screen = app.get_generate_screen()
    await wait_for(pilot, lambda: screen._form_ready and screen.query_one("#model", Select).value)
    screen.query_one("#prompt", TextArea).load_text(prompt)
    screen.query_one("#seed", Input).value = "42"
    screen.query_one("#steps", Input).value = "2"
    await pilot.pause()
    form_request = screen.build_request()
    await wait_for(pilot, lambda: "^g X/Y/Z grid" in screen_text(app).splitlines()[-1])  # 120 columns: in the footer
    await pilot.press("ctrl+g")
    await wait_for(pilot, lambda: isinstance(app.screen, GridScreen))
    return screen, app.screen, form_request


async def test_dialog_queues_every_cell_and_the_grid_image_is_the_history_entry(tmp_path):
    """Bad values: one message naming the axis, nothing queued; good ones: the cells core.grid.expand gives of
    the queue key's request, and once they are done the grid image, which History shows as the grid's entry."""
    gate = threading.Event()  # the cells wait until the queued jobs are checked
    app = make_app(tmp_path, FakeRunner(gate=gate))
    async with app.run_test(size=(120, 40)) as pilot:
        screen, dialog, form_request = await open_dialog(pilot, app)
        # an empty dialog says what to type, not that something is invalid, and cannot queue
        assert "type values for at least one axis" in screen_text(app) and "invalid" not in screen_text(app)
        assert dialog.query_one("#grid-queue").disabled
        dialog.query_one("#grid-x-values", Input).value = "1-3"
        dialog.query_one("#grid-y-field", Select).value = "steps"
        dialog.query_one("#grid-y-values", Input).value = "4, 999"
        await pilot.pause()
        assert "grid.y (steps) = 999 is invalid: an integer from 1 to 150" in screen_text(app)
        await pilot.press("ctrl+j")
        await pilot.pause()
        assert isinstance(app.screen, GridScreen) and not app.store.list_jobs()
        assert any("grid.y (steps) = 999" in n.message for n in app._notifications)
        dialog.query_one("#grid-y-values", Input).value = "1-1000"  # 3 x 1000 cells
        await pilot.pause()
        assert "grid = '3 x x 1000 y = 3000 cells' is invalid: at most 1000 cells" in screen_text(app)
        assert not app.store.list_jobs()
        dialog.query_one("#grid-y-field", Select).clear()  # values with no field: said, not dropped
        await pilot.pause()
        assert "grid.y.field = '' is invalid: a field for these values: Seed, Steps, CFG Scale" in screen_text(app)

        dialog.query_one("#grid-x-field", Select).value = "cfg"
        dialog.query_one("#grid-x-values", Input).value = "4-7 (+3)"
        dialog.query_one("#grid-y-field", Select).value = "prompt_sr"
        dialog.query_one("#grid-y-values", Input).value = "red, blue"
        await pilot.pause()
        assert "4 cells" in screen_text(app)
        await pilot.press("ctrl+j")
        await wait_for(pilot, lambda: app.screen is screen)

        axes = parse_axes({"x": {"field": "cfg", "values": [4.0, 7.0]},
                           "y": {"field": "prompt_sr", "values": ["red", "blue"]}})
        jobs = app.store.list_jobs()
        grid_id = jobs[0].request.extra["grid"]["id"]
        assert [job.request for job in jobs] == expand(form_request, axes, grid_id)  # the queue key's request
        assert [(j.request.cfg, j.request.prompt) for j in jobs] == [
            (4.0, "a red cat"), (7.0, "a red cat"), (4.0, "a blue cat"), (7.0, "a blue cat")]

        gate.set()
        await wait_for(pilot, lambda: any(row.request.extra["grid"].get("image") for row in app.store.history()),
                       timeout=20)
        rows = app.store.history()
        (grid_row,) = [row for row in rows if row.request.extra["grid"].get("image")]
        cells = {(r.request.extra["grid"]["x"], r.request.extra["grid"]["y"], 0): Image.open(r.path).convert("RGB")
                 for r in rows if r is not grid_row}
        expected, _ = grid_image(cells, axes)
        with Image.open(grid_row.path) as saved:
            assert saved.convert("RGB").tobytes() == expected.tobytes()
            assert "X Type: CFG Scale, X Values: \"4.0, 7.0\", Y Type: Prompt S/R" in saved.text["parameters"]
        assert grid_row.request.seed == 42 and grid_row.request.extra["grid"]["axes"]["y"]["values"] == ["red", "blue"]

        await pilot.press("f5")
        history = app.screen
        table = history.query_one("#history-table")
        await wait_for(pilot, lambda: table.row_count == 1)
        assert str(table.get_row(f"grid:{grid_id}")[1]) == "4 cells"
        assert history.selected_row().path == grid_row.path  # the entry shows (and names) the grid image
        await wait_for(pilot, lambda: history.query_one("#thumb").display)
        table.focus()
        await pilot.press("g")  # "again" on the grid image: that job's image is no second grid image
        await wait_for(pilot, lambda: len(app.store.history()) == 6)
        await wait_for(pilot, lambda: str(table.get_row(f"grid:{grid_id}")[1]) == "5 cells")
        assert history.selected_row().path == grid_row.path
        await pilot.press("enter")  # opens into the grid image and its cells
        await wait_for(pilot, lambda: table.row_count == 6)

        from tests.test_tui_commands import palette

        await palette(pilot, "X/Y/Z grid")  # the command palette opens the dialog on Generate too
        await wait_for(pilot, lambda: isinstance(app.screen, GridScreen) and app.current_mode == "generate")


async def queue_cfg_grid(pilot, app, values="4, 7"):
    """Queue a one-axis CFG grid from the dialog; returns its grid id."""
    screen, dialog, _ = await open_dialog(pilot, app)
    dialog.query_one("#grid-x-field", Select).value = "cfg"
    dialog.query_one("#grid-x-values", Input).value = values
    await pilot.pause()
    await pilot.press("ctrl+j")
    await wait_for(pilot, lambda: app.screen is screen)
    return app.store.list_jobs()[0].request.extra["grid"]["id"]


def grid_images(store):
    return [row for row in store.history() if row.request.extra.get("grid", {}).get("image")]


async def test_a_grid_left_at_quit_is_finished_by_the_next_start_and_a_retried_cell_completes_it(tmp_path):
    """Quit while a cell runs: that cell is interrupted, the other stays queued and the grid stays open in the
    store. The next start runs the queued cell, says the grid waits for the interrupted one, and retrying that
    job saves the grid image with both cells."""
    runner = FakeRunner(gate=threading.Event())  # never opened: the first cell runs until the app quits
    app = make_app(tmp_path, runner)
    async with app.run_test(size=(120, 40)) as pilot:
        grid_id = await queue_cfg_grid(pilot, app)
        await wait_for(pilot, lambda: runner.started.is_set())
    store = app.store
    assert [grid for grid, _, _ in store.open_grids()] == [grid_id]
    assert sorted(job.state for job in store.grid_cells(grid_id)) == ["interrupted", "pending"]
    interrupted = next(job.id for job in store.grid_cells(grid_id) if job.state == "interrupted")

    app = make_app(tmp_path, FakeRunner())  # the same database and output folder
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, lambda: any("no grid image yet: 1 of its 2 cells has no image; retrying it" in n.message
                                          for n in app._notifications))
        assert not grid_images(app.store) and [g for g, _, _ in app.store.open_grids()] == [grid_id]
        retried = app.worker.retry(interrupted)
        await wait_for(pilot, lambda: grid_images(app.store), timeout=20)
        (grid_row,) = grid_images(app.store)
        assert app.store.open_grids() == []
        cells = {job.request.extra["grid"]["x"]: job.id for job in app.store.grid_cells(grid_id)
                 if job.state == "done"}
        assert sorted(cells) == [0, 1] and retried in cells.values()
        axes = parse_axes({"x": {"field": "cfg", "values": [4.0, 7.0]}})
        expected, _ = grid_image({(x, 0, 0): Image.open(app.store.job_history(job_id)[0].path).convert("RGB")
                                  for x, job_id in cells.items()}, axes)
        with Image.open(grid_row.path) as saved:
            assert saved.convert("RGB").tobytes() == expected.tobytes()
        assert grid_row.request.seed == 42 and grid_row.request.extra["grid"]["id"] == grid_id


async def test_a_cell_left_running_by_a_killed_app_is_recovered_and_the_grid_waits_for_its_retry(tmp_path):
    """Killed outright while a cell runs (its job stays running in the database): the next start's crash recovery
    marks it interrupted without an event, and the grid still learns it (the restored cell's state is read),
    says it waits for that cell, and a retry saves the grid image."""
    import sqlite3
    import time

    runner = FakeRunner(gate=threading.Event())
    app = make_app(tmp_path, runner)
    async with app.run_test(size=(120, 40)) as pilot:
        grid_id = await queue_cfg_grid(pilot, app)
        await wait_for(pilot, lambda: runner.started.is_set())
    killed = next(job.id for job in app.store.grid_cells(grid_id) if job.state == "interrupted")
    with sqlite3.connect(tmp_path / "db.sqlite3") as conn:  # as a kill -9 leaves it: running, its owner silent
        conn.execute("UPDATE jobs SET state = 'running', finished = NULL, error = NULL, heartbeat = ? WHERE id = ?",
                     (time.time() - 3600, killed))
    app.store.close()

    app = make_app(tmp_path, FakeRunner())
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, lambda: any("no grid image yet: 1 of its 2 cells has no image" in n.message
                                          for n in app._notifications), timeout=20)
        assert app.store.get_job(killed).state == "interrupted" and not grid_images(app.store)
        app.worker.retry(killed)
        await wait_for(pilot, lambda: grid_images(app.store), timeout=20)
        assert app.store.open_grids() == [] and not app.grids.elsewhere


async def test_a_grid_whose_cells_all_ended_before_a_kill_gets_its_image_at_the_next_start(tmp_path, monkeypatch):
    """The app is killed after the last cell's image was saved and before the grid image was: the next start
    saves the grid image, once."""
    from tui.grids import GridTracker

    app = make_app(tmp_path, FakeRunner())
    with monkeypatch.context() as patch:
        patch.setattr(GridTracker, "_finish", lambda self, grid: None)  # killed before the grid image
        async with app.run_test(size=(120, 40)) as pilot:
            grid_id = await queue_cfg_grid(pilot, app, "4, 7, 9")
            await wait_for(pilot, lambda: len(app.store.history()) == 3, timeout=20)
    assert not grid_images(app.store) and [g for g, _, _ in app.store.open_grids()] == [grid_id]

    app = make_app(tmp_path, FakeRunner())
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, lambda: grid_images(app.store), timeout=20)
        await pilot.pause(0.3)
        assert len(grid_images(app.store)) == 1 and app.store.open_grids() == []
        assert grid_images(app.store)[0].request.extra["grid"]["axes"]["x"]["values"] == [4.0, 7.0, 9.0]


async def test_an_open_field_list_stands_out_from_the_dialog_under_it(tmp_path):
    """The drop-down and the dialog were both $surface: the open X list read as part of the Y and Z rows."""
    from textual.widgets._select import SelectOverlay

    app = make_app(tmp_path)
    async with app.run_test(size=(120, 40)) as pilot:
        _, dialog, _ = await open_dialog(pilot, app)
        overlay = dialog.query(Select).first().query_one(SelectOverlay)
        assert overlay.styles.background != dialog.query_one("#grid-dialog").styles.background


async def test_a_grid_image_the_database_will_not_record_is_said_and_its_grid_stays_open(tmp_path, monkeypatch):
    """The store failing the grid image's record (a locked or full database): the failure is said, where the
    thread died on the store's close_grid raising in turn and nobody heard of it."""
    from core.store import JobStore, StoreError

    def refuse(self, *args, **kwargs):
        raise StoreError("database is locked")

    app = make_app(tmp_path, FakeRunner())
    async with app.run_test(size=(120, 40)) as pilot:
        monkeypatch.setattr(JobStore, "add_grid_image", refuse)
        monkeypatch.setattr(JobStore, "close_grid", refuse)
        grid_id = await queue_cfg_grid(pilot, app)
        await wait_for(pilot, lambda: any("Could not save the X/Y/Z grid image: database is locked" in n.message
                                          for n in app._notifications), timeout=20)
        monkeypatch.undo()
        assert [g for g, _, _ in app.store.open_grids()] == [grid_id] and not grid_images(app.store)
