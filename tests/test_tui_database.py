"""The TUI when the job database fails under it: one message on exit, never a traceback."""

from __future__ import annotations

import asyncio
import sqlite3
import time

import pytest

from core.events import Status, WorkerStopped
from core.request import GenerationRequest
from core.store import JobStore, StoreError
from core.worker import Worker
from tests.tui_fakes import make_app, wait_for


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DARKROOM_HOME", str(tmp_path / "home"))


def _refuse_writes(store: JobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every write of ``store`` fails from now on as SQLite does when the disk is full."""
    real = store._conn

    class Conn:
        def __init__(self, conn):
            self._conn = conn

        def execute(self, sql, *args):
            if sql.split()[0].upper() in ("INSERT", "UPDATE", "DELETE"):
                raise sqlite3.OperationalError("database or disk is full")
            return self._conn.execute(sql, *args)

        def __getattr__(self, name):
            return getattr(self._conn, name)

    monkeypatch.setattr(store, "_conn", lambda: Conn(real()))


async def _exited(app) -> None:
    """Wait for the app to leave (pilot.pause cannot be used once it has)."""
    deadline = time.monotonic() + 20
    while not app._exit:
        assert time.monotonic() < deadline, "the app did not exit"
        await asyncio.sleep(0.02)


async def test_full_disk_under_the_worker_exits_with_one_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Worker, "_make_status", lambda self, ctx: Status(None))  # no torch import: a fast test
    app = make_app(tmp_path)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, lambda: app.worker.running)
        _refuse_writes(app.store, monkeypatch)
        with JobStore(tmp_path / "db.sqlite3") as other:  # another window queues a job; claiming it fails
            other.add_job(GenerationRequest(model="fake-model.safetensors", prompt="p"), queue="default")
        await _exited(app)
    assert app.return_code == 1
    # Printed once the screen is restored, wrapped at the terminal's width (a long path folds mid-word), so it
    # is compared without its whitespace.
    err = "".join(capsys.readouterr().err.split())
    assert err == "".join((
        f"darkroom: error: {tmp_path / 'db.sqlite3'}: the disk holding the job database is full; free some space "
        "and start again (images already saved are kept and recorded at the next start)"
    ).split())
    assert "Traceback" not in err and not app.worker.running


async def test_a_store_error_escaping_a_handler_is_its_message_not_a_traceback(tmp_path, capsys):
    app = make_app(tmp_path, start_worker=False)
    async with app.run_test(size=(120, 40)):
        app.call_later(lambda: (_ for _ in ()).throw(StoreError("db.sqlite3: the job database is locked")))
        await _exited(app)
    assert app.return_code == 1
    assert capsys.readouterr().err.strip() == "darkroom: error: db.sqlite3: the job database is locked"


async def test_worker_stopped_event_leaves_the_app(tmp_path):
    app = make_app(tmp_path, start_worker=False)
    async with app.run_test(size=(120, 40)):
        app._on_worker_event(WorkerStopped(None, "x.sqlite3: the job database is locked"))
        await _exited(app)
    assert app.return_code == 1
