"""JobStore: queue states and order, history search, schema versioning, two-process use, crash recovery."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
import time

import pytest

from core.request import GenerationRequest
from core.store import SCHEMA_VERSION, JobStateError, JobStore, StoreError


def req(prompt: str = "a cat", **kw) -> GenerationRequest:
    return GenerationRequest(model="m.safetensors", prompt=prompt, **kw)


@pytest.fixture
def store(tmp_path):
    s = JobStore(tmp_path / "db.sqlite3")
    yield s
    s.close()


# ---- schema -------------------------------------------------------------------------------------------------


def test_schema_versioned_and_wal(tmp_path):
    path = tmp_path / "db.sqlite3"
    with JobStore(path) as s:
        assert s.schema_version == SCHEMA_VERSION >= 1
        job_id = s.add_job(req())
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    # reopening does not re-run migrations or lose data
    with JobStore(path) as s:
        assert s.get_job(job_id).request == req()


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "db.sqlite3"
    JobStore(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer"):
        JobStore(path)


def test_default_path_is_under_darkroom_home(tmp_path, monkeypatch):
    monkeypatch.setenv("DARKROOM_HOME", str(tmp_path))
    with JobStore() as s:
        assert s.path == tmp_path / "data" / "darkroom.sqlite3"
        assert s.path.exists()


# ---- states -------------------------------------------------------------------------------------------------


def test_request_round_trips_and_claim_marks_running(store):
    r = req(steps=7, seed=5, extra={"k": 1})
    job_id = store.add_job(r)
    job = store.get_job(job_id)
    assert job.state == "pending" and job.request == r and job.queue == "default"
    claimed = store.claim_next()
    assert claimed.id == job_id
    assert claimed.state == "running"
    assert claimed.owner_pid == os.getpid()
    assert claimed.started is not None and claimed.heartbeat is not None
    assert store.claim_next() is None
    assert store.finish(job_id)
    job = store.get_job(job_id)
    assert job.state == "done" and job.finished >= job.started


def test_fail_records_error_and_finished_jobs_do_not_change(store):
    job_id = store.add_job(req())
    store.claim_next()
    assert store.fail(job_id, "model.safetensors: not a checkpoint")
    job = store.get_job(job_id)
    assert job.state == "failed" and job.error == "model.safetensors: not a checkpoint"
    # a second end transition is refused: only running jobs can end
    assert not store.finish(job_id)
    assert store.get_job(job_id).state == "failed"


def test_cancel_pending_and_running(store):
    a = store.add_job(req("a"))
    b = store.add_job(req("b"))
    assert store.claim_next().id == a
    assert store.cancel(b)
    assert store.get_job(b).state == "cancelled"
    assert store.claim_next() is None  # cancelled jobs are never claimed
    # running: only flagged, the worker finishes it off
    assert store.cancel(a)
    assert store.get_job(a).state == "running"
    assert store.is_cancel_requested(a)
    assert store.mark_cancelled(a)
    assert store.get_job(a).state == "cancelled"
    assert not store.cancel(a)  # already final
    assert not store.cancel(9999)


def test_retry_puts_job_back_at_the_end(store):
    a = store.add_job(req("a"))
    store.claim_next()
    store.fail(a, "boom")
    b = store.add_job(req("b"))
    assert store.retry(a) == a
    job = store.get_job(a)
    assert job.state == "pending" and job.error is None and job.started is None
    assert [store.claim_next().id, store.claim_next().id] == [b, a]
    store.finish(a)
    with pytest.raises(JobStateError, match="done"):
        store.retry(a)
    with pytest.raises(JobStateError, match="running"):
        store.retry(b)
    store.mark_interrupted(b)
    assert store.retry(b) == b


def test_queues_are_separate(store):
    a = store.add_job(req("a"), queue="batch-1")
    b = store.add_job(req("b"))
    assert store.pending_count() == 2
    assert store.pending_count("batch-1") == 1
    assert store.claim_next("default").id == b
    assert store.claim_next("default") is None
    assert store.claim_next("batch-1").id == a
    assert [j.id for j in store.list_jobs(queue="batch-1")] == [a]


def test_retry_into_another_queue_and_interrupt_pending(store):
    """A batch run's queue: what it did not start is interrupted when it stops, and a retry by another worker
    moves the job into that worker's queue, where it runs."""
    ran = store.add_job(req("ran"), queue="batch-1", owned=True)
    left = store.add_job(req("left"), queue="batch-1", owned=True)
    other = store.add_job(req("other"), queue="batch-2", owned=True)
    store.claim_next("batch-1")
    store.mark_interrupted(ran)
    assert store.interrupt_pending("batch-1", "not started: the batch run was interrupted") == 1
    job = store.get_job(left)
    assert job.state == "interrupted" and job.error == "not started: the batch run was interrupted"
    assert store.get_job(other).state == "pending"  # another run's queue is not touched
    assert store.retry(left, queue="default") == left
    job = store.get_job(left)
    assert (job.queue, job.state, job.owner_pid) == ("default", "pending", None)
    assert store.claim_next("batch-1") is None
    assert store.claim_next("default").id == left
    assert store.retry(ran) == ran and store.get_job(ran).queue == "batch-1"  # no queue given: stays


# ---- order --------------------------------------------------------------------------------------------------


def test_priority_then_fifo(store):
    low1 = store.add_job(req("low1"))
    high1 = store.add_job(req("high1"), priority=5)
    low2 = store.add_job(req("low2"))
    high2 = store.add_job(req("high2"), priority=5)
    mid = store.add_job(req("mid"), priority=1)
    expected = [high1, high2, mid, low1, low2]
    assert [j.id for j in store.list_jobs(states=["pending"])] == expected
    assert [store.claim_next().id for _ in expected] == expected


def test_list_jobs_running_first_then_pending_then_rest(store):
    a, b, c = (store.add_job(req(x)) for x in "abc")
    store.claim_next()
    store.fail(a, "x")
    store.claim_next()  # b running
    assert [j.id for j in store.list_jobs()] == [b, c, a]
    d = store.add_job(req("d"))
    store.cancel(d)  # ended after a: listed before it
    assert [j.id for j in store.list_jobs()] == [b, c, d, a]
    assert [j.id for j in store.list_jobs(states=["failed"])] == [a]
    with pytest.raises(ValueError):
        store.list_jobs(states=["bogus"])


def test_move_reorders_pending(store):
    a, b, c, d = (store.add_job(req(x)) for x in "abcd")

    def order():
        return [j.id for j in store.list_jobs(states=["pending"])]

    store.move(d, -2)
    assert order() == [a, d, b, c]
    store.move(a, 1)
    assert order() == [d, a, b, c]
    store.move(b, -100)  # clamps to the front
    assert order() == [b, d, a, c]
    assert store.move(b, 100)  # and to the back
    assert order() == [d, a, c, b]
    assert not store.move(b, 1) and not store.move(d, -1)  # already last / first: nothing moves
    assert order() == [d, a, c, b]
    # the order is what actually runs
    assert [store.claim_next().id for _ in range(4)] == [d, a, c, b]
    with pytest.raises(JobStateError):
        store.move(a, 1)


def test_move_across_priorities_takes_the_passed_priority(store):
    low = store.add_job(req("low"))
    high = store.add_job(req("high"), priority=3)
    assert [j.id for j in store.list_jobs(states=["pending"])] == [high, low]
    store.move(low, -1)
    assert store.get_job(low).priority == 3
    assert store.claim_next().id == low
    assert store.claim_next().id == high


# ---- history ------------------------------------------------------------------------------------------------


def test_history_round_trip_and_delete(store):
    r = req("a red fox", seed=42)
    job_id = store.add_job(r)
    h = store.add_history(job_id, "/out/1.png", r, 42, model_hash="abcdef1234", timings={"total": 1.5})
    entry = store.get_history(h)
    assert entry.job_id == job_id and entry.path == "/out/1.png" and entry.request == r
    assert entry.seed == 42 and entry.model_hash == "abcdef1234" and entry.timings == {"total": 1.5}
    assert store.delete_history(h)
    assert store.get_history(h) is None
    assert not store.delete_history(h)


def test_history_newest_first_with_paging(store):
    ids = [store.add_history(None, f"/out/{i}.png", req(f"p{i}"), i) for i in range(5)]
    assert [e.id for e in store.history()] == ids[::-1]
    assert [e.id for e in store.history(limit=2, offset=1)] == [ids[3], ids[2]]


def test_history_search_escapes_like_wildcards(store):
    pct = store.add_history(None, "/1.png", req("100% cotton shirt"), 1)
    plain = store.add_history(None, "/2.png", req("1000 cotton shirts"), 2)
    under = store.add_history(None, "/3.png", req("snake_case"), 3)
    other = store.add_history(None, "/4.png", req("snakeXcase"), 4)
    assert [e.id for e in store.history("%")] == [pct]
    assert [e.id for e in store.history("_")] == [under]
    assert [e.id for e in store.history("0% c")] == [pct]
    assert {e.id for e in store.history("COTTON")} == {pct, plain}  # case-insensitive
    assert {e.id for e in store.history("snake")} == {under, other}
    assert store.history("nothing like this") == []
    assert len(store.history("")) == 4


# ---- several processes --------------------------------------------------------------------------------------


def _add_and_claim(path: str, tag: str, n: int, out) -> None:
    s = JobStore(path)
    added = [s.add_job(req(f"{tag}{i}"), queue="shared") for i in range(n)]
    claimed = []
    while (job := s.claim_next("shared")) is not None:
        claimed.append(job.id)
        s.finish(job.id)
    s.close()
    out.put((added, claimed))


def test_two_processes_write_and_claim_concurrently(tmp_path):
    path = str(tmp_path / "db.sqlite3")
    JobStore(path).close()
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_add_and_claim, args=(path, tag, 40, out)) for tag in "xy"]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    added = [i for a, _ in results for i in a]
    claimed = [i for _, c in results for i in c]
    assert len(set(added)) == 80
    assert sorted(claimed) == sorted(added)  # every job claimed exactly once, none twice
    with JobStore(path) as s:
        assert len(s.list_jobs(states=["done"], queue="shared")) == 80


def _claim_and_hang(path: str, ready) -> None:
    s = JobStore(path)
    job = s.claim_next()
    ready.put(job.id)
    time.sleep(120)


def test_recover_marks_killed_owner_interrupted_and_keeps_pending(tmp_path):
    path = str(tmp_path / "db.sqlite3")
    with JobStore(path) as s:
        first = s.add_job(req("first"))
        rest = [s.add_job(req(f"rest{i}")) for i in range(3)]
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Queue()
    proc = ctx.Process(target=_claim_and_hang, args=(path, ready))
    proc.start()
    try:
        assert ready.get(timeout=60) == first
        with JobStore(path) as s:
            # the owner is alive (and heartbeat fresh): another process's job is left alone
            assert s.recover() == []
            assert s.get_job(first).state == "running"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.join(timeout=30)
    with JobStore(path) as s:
        assert s.recover() == [first]
        job = s.get_job(first)
        assert job.state == "interrupted" and "interrupted" in job.error
        assert [j.state for j in map(s.get_job, rest)] == ["pending"] * 3
        assert s.recover() == []
        assert s.retry(first) == first
        assert s.get_job(first).state == "pending"


def _queue_privately_and_exit(path: str, out) -> None:
    with JobStore(path) as s:
        out.put([s.add_job(req(f"batch{i}"), queue="batch-9", owned=True) for i in range(2)])


def test_recover_interrupts_pending_jobs_of_a_dead_private_queue(tmp_path):
    """A batch run killed outright (no Ctrl-C handler) leaves its queue's jobs pending, and nobody else runs
    that queue: once its process is gone they become interrupted, hence retryable. Shared-queue jobs stay."""
    path = str(tmp_path / "db.sqlite3")
    with JobStore(path) as s:
        shared = s.add_job(req("shared"))
        mine = s.add_job(req("mine"), queue="batch-live", owned=True)  # this (live) process's
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_queue_privately_and_exit, args=(path, out))
    proc.start()
    orphans = out.get(timeout=60)
    proc.join(timeout=30)
    with JobStore(path) as s:
        assert sorted(s.recover()) == sorted(orphans)
        for job_id in orphans:
            job = s.get_job(job_id)
            assert job.state == "interrupted" and job.error == "not started: the process that queued it stopped"
        assert s.get_job(shared).state == "pending" and s.get_job(mine).state == "pending"
        assert s.recover() == []


def test_recover_stale_heartbeat_even_if_pid_alive(tmp_path):
    path = tmp_path / "db.sqlite3"
    with JobStore(path) as s:
        job_id = s.add_job(req())
        s.claim_next()
        assert s.recover() == []  # our own live, fresh job
    with JobStore(path, stale_after=0.0) as s:
        time.sleep(0.01)
        assert s.recover() == [job_id]


def test_unreadable_stored_request_is_failed_not_fatal(store):
    bad = store.add_job(req("bad"))
    good = store.add_job(req("good"))
    conn = sqlite3.connect(store.path)
    conn.execute(
        "UPDATE jobs SET request = ? WHERE id = ?",
        ('{"model": "m.safetensors", "sampler": "sampler_from_the_future"}', bad),
    )
    conn.commit()
    conn.close()
    assert [j.id for j in store.list_jobs()] == [good]  # listing skips it instead of crashing
    assert store.claim_next().id == good
    row = sqlite3.connect(store.path).execute("SELECT state, error FROM jobs WHERE id = ?", (bad,)).fetchone()
    assert row[0] == "failed" and "sampler_from_the_future" in row[1]


def test_grids_stay_open_until_closed_and_find_their_cells_and_retries(tmp_path):
    """The TUI's grid records (tui/grids.py): open until closed, across a reopen; a grid's cells are the jobs whose
    request carries its id, oldest first (a cell queued again comes last)."""
    base = GenerationRequest(model="m.safetensors", prompt="p", seed=3)
    axes = {"x": {"field": "cfg", "values": [4.0, 7.0]}}
    with JobStore(tmp_path / "db.sqlite3") as store:
        store.add_grid("g1", axes, base)
        ids = [store.add_job(base.replace(cfg=cfg, extra={"grid": {"id": "g1", "x": x}}))
               for x, cfg in enumerate((4.0, 7.0))]
        store.add_job(base.replace(extra={"grid": {"id": "other", "x": 0}}))
        store.add_job(base)
    with JobStore(tmp_path / "db.sqlite3") as store:
        assert store.open_grids() == [("g1", axes, base)]
        assert [job.id for job in store.grid_cells("g1")] == ids
        job = store.claim_next()
        store.fail(job.id, "boom")
        assert store.retry(job.id) == job.id == ids[0]  # in place: still the cell's job, pending again
        assert [(j.id, j.state) for j in store.grid_cells("g1")] == [(ids[0], "pending"), (ids[1], "pending")]
        again = store.add_job(job.request)  # the same cell queued anew: the newest job of that place
        assert [j.id for j in store.grid_cells("g1")] == [*ids, again]
        assert store.close_grid("g1") and not store.close_grid("g1")
        assert store.open_grids() == [] and store.grid_cells("nothing") == []


def test_history_search_finds_an_image_by_its_file_name_folder_or_seed(store):
    # a file name copied from a file manager, a day's folder or a seed from an image viewer finds its entry
    fox = store.add_history(None, "/out/2026-12-01/00007-123456.png", req("a red fox"), 123456)
    owl = store.add_history(None, "/out/2026-12-02/00008-99.png", req("an owl"), 99)
    assert [e.id for e in store.history("00007-123456")] == [fox]
    assert [e.id for e in store.history("2026-12-02")] == [owl]
    assert [e.id for e in store.history("99")] == [owl]  # the seed (and the file name's digits)
    assert [e.id for e in store.history(" 123456 ")] == [fox]
    assert [e.id for e in store.history("fox")] == [fox]


def test_history_search_for_digits_that_are_no_seed_still_matches_prompts_and_paths(store):
    # a long run of digits (a timestamp in a file name) overflowed SQLite's integer, and '²' is a digit int()
    # refuses: the search failed ("Could not read the history") instead of matching
    long = store.add_history(None, "/out/shot-20261202123456789012.png", req("a fox"), 5)
    squared = store.add_history(None, "/out/00001-6.png", req("e = mc²"), 6)
    assert [e.id for e in store.history("20261202123456789012")] == [long]
    assert [e.id for e in store.history("²")] == [squared]
