"""The database under stress: a write lock another process holds past the busy timeout, a full disk mid-run.

Each gives one StoreError naming the file and what to do, and the worker stops with one WorkerStopped event
instead of logging a traceback every second.
"""

from __future__ import annotations

import logging
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from core.events import JobFinished, Status, WorkerStopped
from core.request import GenerationRequest
from core.store import JobStore, StoreError, describe_sqlite_error
from core.worker import GeneratedImage, Worker

TIMEOUT = 20.0

LOCKER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(60)
"""


def req(prompt: str = "a cat", **kw) -> GenerationRequest:
    kw.setdefault("steps", 2)
    return GenerationRequest(model="fake.safetensors", prompt=prompt, **kw)


class LockHolder:
    """Another process holding the database's write lock (BEGIN IMMEDIATE, then sleeping)."""

    def __init__(self, path: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", LOCKER, str(path)], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "locked"

    def release(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture
def lock_holder():
    holders: list[LockHolder] = []

    def make(path: Path) -> LockHolder:
        holders.append(LockHolder(path))
        return holders[-1]

    yield make
    for holder in holders:
        holder.release()


class FullDisk:
    """Wraps a store's connections: while ``full`` is set, every write statement fails as SQLite does when
    the disk under the database is full."""

    def __init__(self, store: JobStore, monkeypatch: pytest.MonkeyPatch) -> None:
        self.full = threading.Event()
        self.writes_refused = 0
        real = store._conn
        disk = self

        class Conn:
            def __init__(self, conn: sqlite3.Connection) -> None:
                self._conn = conn

            def execute(self, sql: str, *args):
                if disk.full.is_set() and sql.split()[0].upper() in ("INSERT", "UPDATE", "DELETE"):
                    disk.writes_refused += 1
                    raise sqlite3.OperationalError("database or disk is full")
                return self._conn.execute(sql, *args)

            def __getattr__(self, name):
                return getattr(self._conn, name)

        monkeypatch.setattr(store, "_conn", lambda: Conn(real()))


# ---- the store ------------------------------------------------------------------------------------------------


def test_lock_held_past_the_busy_timeout_is_one_clear_error(tmp_path, lock_holder):
    path = tmp_path / "db.sqlite3"
    JobStore(path).close()
    holder = lock_holder(path)
    with JobStore(path, busy_timeout=0.5) as store:
        started = time.monotonic()
        with pytest.raises(StoreError) as info:
            store.add_job(req())
        waited = time.monotonic() - started
        assert 0.4 <= waited < 5  # it waited for the lock, then gave up
        message = str(info.value)
        assert str(path) in message and "locked" in message and "more than 0.5 s" in message
        assert "another --db" in message and "\n" not in message
        assert store.list_jobs() == []  # reads still work in WAL mode
        holder.release()
        assert store.add_job(req()) == 1  # and writes, once the lock is gone: no transaction left open


def test_opening_a_database_locked_past_the_timeout(tmp_path, lock_holder, monkeypatch):
    path = tmp_path / "db.sqlite3"
    lock_holder(path)  # a new file: the migration itself needs the write lock
    monkeypatch.setenv("DARKROOM_DB_TIMEOUT", "0.3")
    with pytest.raises(StoreError, match="locked"):
        JobStore(path)


def test_full_disk_is_one_clear_error_and_the_store_stays_usable(tmp_path, monkeypatch):
    store = JobStore(tmp_path / "db.sqlite3")
    job_id = store.add_job(req())
    disk = FullDisk(store, monkeypatch)
    disk.full.set()
    with pytest.raises(StoreError) as info:
        store.add_job(req("more"))
    assert str(tmp_path / "db.sqlite3") in str(info.value) and "disk holding the job database is full" in str(
        info.value
    )
    assert isinstance(info.value.__cause__, sqlite3.OperationalError)
    with pytest.raises(StoreError, match="full"):
        store.add_history(job_id, tmp_path / "x.png", req())
    assert [j.id for j in store.list_jobs()] == [job_id]
    disk.full.clear()
    assert store.add_job(req("after")) == job_id + 1  # the failed transactions were rolled back
    store.close()


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        ("disk I/O error", "disk I/O error"),
        ("attempt to write a readonly database", "read-only"),
        ("file is not a database", "not a usable job database"),
        ("database table is locked", "locked"),
        ("something new", "the job database failed (something new)"),
    ],
)
def test_every_sqlite_failure_names_the_file(tmp_path, error, expected):
    message = describe_sqlite_error(tmp_path / "db.sqlite3", sqlite3.OperationalError(error), 30.0)
    assert message.startswith(f"{tmp_path / 'db.sqlite3'}: ") and expected in message


# ---- the worker ----------------------------------------------------------------------------------------------


class Runner:
    """One 8x8 image per seed; with ``gate`` each step waits for it."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.gate = gate
        self.steps = 0

    def run(self, job, ctx):
        for i in range(1, job.request.steps + 1):
            if self.gate is not None:
                while not self.gate.wait(0.01):
                    ctx.check_cancelled()
            self.steps += 1
            ctx.step(i, job.request.steps)
        return [GeneratedImage(Image.new("RGB", (8, 8)), s, job.request) for s in job.request.image_seeds()]


def _collect(worker: Worker) -> list:
    events: list = []
    worker.subscribe(events.append)
    return events


def _wait(predicate, what: str):
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def test_full_disk_while_idle_stops_the_worker_with_one_event(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("DARKROOM_HOME", str(tmp_path / "home"))
    store = JobStore(tmp_path / "db.sqlite3")
    worker = Worker(store, Runner(), output_dir=tmp_path / "out", status_interval=0.05)
    events = _collect(worker)
    monkeypatch.setattr(Worker, "_make_status", lambda self, ctx: Status(job_id=None))  # no torch import here
    worker.start()
    first = worker.submit(req())
    _wait(lambda: any(isinstance(e, JobFinished) for e in events), "the first job")
    disk = FullDisk(store, monkeypatch)
    disk.full.set()
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="core"):
        with JobStore(tmp_path / "db.sqlite3") as other:  # another process queues a job: claiming it fails
            other.add_job(req("second"))
        _wait(lambda: not worker.running, "the worker to stop")
        time.sleep(0.3)  # several status intervals: nothing more is logged or sent
    stopped = [e for e in events if isinstance(e, WorkerStopped)]
    assert len(stopped) == 1 and "disk holding the job database is full" in stopped[0].error
    assert worker.fatal_error is not None
    assert not any(r.exc_info for r in caplog.records)  # no traceback logged
    assert [r.getMessage() for r in caplog.records] == [f"the worker stopped: {stopped[0].error}"]
    assert disk.writes_refused == 1  # it did not keep retrying
    assert store.get_job(first).state == "done"
    worker.stop(timeout=5)
    store.close()


def test_full_disk_mid_job_stops_generation_and_the_next_start_recovers(tmp_path, monkeypatch, caplog):
    """The heartbeat of a running job fails: the worker interrupts the job and stops at once with one
    message; the job stays marked running (nothing more can be written) until recovery ends it."""
    monkeypatch.setenv("DARKROOM_HOME", str(tmp_path / "home"))
    store = JobStore(tmp_path / "db.sqlite3")
    gate = threading.Event()
    runner = Runner(gate)
    worker = Worker(store, runner, output_dir=tmp_path / "out", status_interval=0.05)
    events = _collect(worker)
    monkeypatch.setattr(Worker, "_make_status", lambda self, ctx: Status(job_id=None))
    worker.start()
    job_id = worker.submit(req(steps=50))
    _wait(lambda: store.get_job(job_id).state == "running", "the job to start")
    disk = FullDisk(store, monkeypatch)
    with caplog.at_level(logging.DEBUG, logger="core"):
        disk.full.set()
        _wait(lambda: not worker.running, "the worker to stop")
        time.sleep(0.2)
    gate.set()
    stopped = [e for e in events if isinstance(e, WorkerStopped)]
    assert len(stopped) == 1 and stopped[0].job_id == job_id
    assert runner.steps == 0  # interrupted before generating further
    assert not any(r.exc_info for r in caplog.records)
    disk.full.clear()
    worker.stop(timeout=5)
    store.close()
    with JobStore(tmp_path / "db.sqlite3", stale_after=0.0) as later:
        assert later.get_job(job_id).state == "running"
        assert later.recover() == [job_id]
        assert later.get_job(job_id).state == "interrupted"


def test_lock_held_past_the_timeout_mid_run_stops_the_worker(tmp_path, monkeypatch, lock_holder):
    monkeypatch.setenv("DARKROOM_HOME", str(tmp_path / "home"))
    path = tmp_path / "db.sqlite3"
    store = JobStore(path, busy_timeout=0.3)
    worker = Worker(store, Runner(), output_dir=tmp_path / "out", status_interval=0.05)
    events = _collect(worker)
    monkeypatch.setattr(Worker, "_make_status", lambda self, ctx: Status(job_id=None))
    worker.start()
    _wait(lambda: worker._activity == "idle", "the worker to be idle")
    lock_holder(path)
    _wait(lambda: not worker.running, "the worker to stop")
    stopped = [e for e in events if isinstance(e, WorkerStopped)]
    assert len(stopped) == 1 and "locked" in stopped[0].error and str(path) in stopped[0].error
    worker.stop(timeout=5)
    store.close()


def test_a_version_1_database_is_upgraded_with_its_jobs_and_history(tmp_path):
    from core.store import MIGRATIONS, SCHEMA_VERSION

    path = tmp_path / "db.sqlite3"
    conn = sqlite3.connect(path)
    for statement in MIGRATIONS[0]:
        conn.execute(statement)
    conn.execute("PRAGMA user_version = 1")
    conn.execute(
        "INSERT INTO jobs (queue, state, priority, position, request, created) VALUES ('default', 'done', 0, 1, ?, 1.0)",
        ('{"model": "m.safetensors", "prompt": "old"}',),
    )
    conn.execute("INSERT INTO history (job_id, path, request, created) VALUES (1, 'a.png', ?, 1.0)",
                 ('{"model": "m.safetensors", "prompt": "old"}',))
    conn.commit()
    conn.close()
    with JobStore(path) as store:
        assert store.schema_version == SCHEMA_VERSION == 3
        assert store.open_grids() == []
        job = store.get_job(1)
        assert job.request.prompt == "old" and job.output_dir is None and job.source_key is None
        assert [h.path for h in store.job_history(1)] == ["a.png"]
        assert store.jobs_by_source(["nothing"]) == {}


def test_claiming_that_keeps_failing_stops_the_worker_with_one_message(tmp_path, monkeypatch, caplog):
    """An unexpected error from claiming (not one of the database's own) was logged with a traceback every
    second, forever, and a --batch run hung (a non-UTF-8 output folder did it). A passing one is retried; one
    that fails CLAIM_ATTEMPTS times in a row stops the worker with one event naming it."""
    from core.worker import CLAIM_ATTEMPTS

    monkeypatch.setenv("DARKROOM_HOME", str(tmp_path / "home"))
    store = JobStore(tmp_path / "db.sqlite3")
    real_claim, calls = store.claim_next, []

    def claim(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1 or len(calls) > 2:  # fails, then works once, then fails for good
            raise UnicodeEncodeError("utf-8", "caf\udce9", 3, 4, "surrogates not allowed")
        return real_claim(*args, **kwargs)

    monkeypatch.setattr(store, "claim_next", claim)
    worker = Worker(store, Runner(), output_dir=tmp_path / "out", status_interval=0.05)
    events = _collect(worker)
    monkeypatch.setattr(Worker, "_make_status", lambda self, ctx: Status(job_id=None))
    first = store.add_job(req())  # there before the worker starts: its first claim fails, the second takes it
    with caplog.at_level(logging.DEBUG, logger="core"):
        worker.start()
        _wait(lambda: not worker.running, "the worker to stop")
    assert store.get_job(first).state == "done"  # one failure was retried
    stopped = [e for e in events if isinstance(e, WorkerStopped)]
    assert len(stopped) == 1 and f"failed {CLAIM_ATTEMPTS} times in a row (UnicodeEncodeError" in stopped[0].error
    assert len(calls) == 2 + CLAIM_ATTEMPTS
    assert not any(r.exc_info for r in caplog.records)  # said in words, no traceback
    worker.stop(timeout=5)
    store.close()
