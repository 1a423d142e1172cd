"""Worker with a fake runner (event order, pause, cancel, failure, priority, stop) and core.accel.device."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from core.errors import CheckpointError
from core.events import (
    ImageSaved,
    JobCancelled,
    JobFailed,
    JobFinished,
    JobQueued,
    JobStarted,
    JobStep,
    Status,
)
from core.metadata import read_request
from core.request import GenerationRequest
from core.store import JobStore
from core.worker import GeneratedImage, JobCancelledError, JobContext, Worker

TIMEOUT = 20.0


def req(prompt: str = "a cat", **kw) -> GenerationRequest:
    kw.setdefault("steps", 3)
    return GenerationRequest(model="fake.safetensors", prompt=prompt, **kw)


class FakeRunner:
    """Makes one tiny image per seed. Prompts steer it: "boom" raises RuntimeError, "badmodel" a
    CheckpointError. With ``gated`` each step waits for ``release()``."""

    def __init__(self, *, gated: bool = False, delay: float = 0.0) -> None:
        self.gated = gated
        self.delay = delay
        self._gate = threading.Semaphore(0)
        self.steps_started: dict[int, int] = {}
        self.threads: set[str] = set()

    def release(self, n: int = 1) -> None:
        for _ in range(n):
            self._gate.release()

    def run(self, job, ctx: JobContext) -> list[GeneratedImage]:
        self.threads.add(threading.current_thread().name)
        ctx.set_activity("loading fake.safetensors")
        if "badmodel" in job.request.prompt:
            raise CheckpointError("fake.safetensors", "is not a checkpoint")
        total = job.request.steps
        for i in range(1, total + 1):
            self.steps_started[job.id] = i
            if self.gated:
                assert self._gate.acquire(timeout=TIMEOUT)
            if self.delay:
                time.sleep(self.delay)
            ctx.step(i, total)
        if "boom" in job.request.prompt:
            raise RuntimeError("boom")
        return [
            GeneratedImage(
                Image.new("RGB", (8, 8), (i * 40, 0, 0)), seed, job.request, "abc123", {"total": 0.1}
            )
            for i, seed in enumerate(job.request.image_seeds())
        ]


class Recorder:
    def __init__(self) -> None:
        self.events: list = []
        self.lock = threading.Lock()

    def __call__(self, event) -> None:
        with self.lock:
            self.events.append(event)

    def of(self, kind, job_id=None) -> list:
        with self.lock:
            return [e for e in self.events if isinstance(e, kind) and (job_id is None or e.job_id == job_id)]

    def jobs(self) -> list:
        """Job events only (Status is periodic and interleaves anywhere)."""
        with self.lock:
            return [e for e in self.events if not isinstance(e, Status)]

    def wait(self, predicate, what: str = "condition"):
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            result = predicate()
            if result:
                return result
            time.sleep(0.005)
        raise AssertionError(f"timed out waiting for {what}; events: {self.jobs()}")


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("DARKROOM_HOME", str(tmp_path / "home"))
    store = JobStore(tmp_path / "db.sqlite3")
    workers: list[Worker] = []

    def make(runner=None, **kw) -> tuple[Worker, Recorder]:
        kw.setdefault("status_interval", 0.05)
        w = Worker(store, runner if runner is not None else FakeRunner(), output_dir=tmp_path / "out", **kw)
        rec = Recorder()
        w.subscribe(rec)
        workers.append(w)
        return w, rec

    yield make, store, tmp_path
    for w in workers:
        w.stop(timeout=10)
    store.close()


def finished(rec: Recorder, job_id: int):
    return rec.wait(lambda: rec.of(JobFinished, job_id), f"job {job_id} to finish")[0]


def test_one_job_event_order_files_and_history(env):
    make, store, tmp_path = env
    w, rec = make()
    job_id = w.submit(req("a red fox", batch_size=2))
    w.start()
    done = finished(rec, job_id)
    kinds = [type(e) for e in rec.jobs()]
    assert kinds == [JobQueued, JobStarted, JobStep, JobStep, JobStep, ImageSaved, ImageSaved, JobFinished]
    started = rec.of(JobStarted)[0]
    seed = started.request.seed
    assert rec.of(JobQueued)[0].request.seed == -1 and seed != -1
    assert [e.step for e in rec.of(JobStep)] == [1, 2, 3]
    assert all(e.total == 3 for e in rec.of(JobStep))
    # the resolved seed is stored back in the job row
    job = store.get_job(job_id)
    assert job.state == "done" and job.request.seed == seed
    assert done.seeds == (seed, seed + 1)
    assert len(done.paths) == 2
    assert [(e.path, e.seed, e.earlier) for e in rec.of(ImageSaved)] == [(p, s, False) for p, s in
                                                                          zip(done.paths, done.seeds)]
    for path, s in zip(done.paths, done.seeds):
        assert Path(path).is_file() and Path(path).is_relative_to(tmp_path / "out")
        saved = read_request(path)
        assert saved.prompt == "a red fox" and saved.seed == s
    history = store.history()
    assert {h.path for h in history} == set(done.paths)
    assert all(
        h.job_id == job_id and h.model_hash == "abc123" and h.timings == {"total": 0.1} for h in history
    )


def test_status_events_while_busy(env):
    make, store, _ = env
    runner = FakeRunner(gated=True)
    w, rec = make(runner)
    first = w.submit(req("one"))
    w.submit(req("two"))
    w.start()
    rec.wait(lambda: rec.of(JobStarted, first), "start")
    # several periodic statuses arrive while the job is stuck in its first step
    rec.wait(lambda: len([s for s in rec.of(Status) if s.job_id == first]) >= 3, "status ticks")
    status = [s for s in rec.of(Status) if s.job_id == first][-1]
    assert status.activity == "loading fake.safetensors"
    assert status.device == "cpu" and status.dtype == "float32"
    assert 0 < status.memory_used <= status.memory_total and status.memory_peak >= status.memory_used
    assert status.queue_length == 1 and status.paused is False
    assert status.attention_backend in ("sage", "xformers", "sdpa")
    runner.release(6)
    rec.wait(lambda: len(rec.of(JobFinished)) == 2, "both jobs")
    rec.wait(lambda: any(s.queue_length == 0 and s.activity == "idle" for s in rec.of(Status)), "idle status")


def test_idle_worker_reports_its_device_at_once(env):
    make, _, _ = env
    w, rec = make(status_interval=60.0)  # no periodic tick: the first status must not wait for one
    w.start()
    status = rec.wait(lambda: [s for s in rec.of(Status) if s.device != "…"], "a full status")[0]
    assert status.device == "cpu" and status.dtype == "float32" and status.activity == "idle"
    assert status.memory_used > 0 and status.queue_length == 0


def test_first_status_says_torch_is_loading(tmp_path):
    """In a fresh process (torch not imported yet) the worker says so before the slow import."""
    import json
    import subprocess
    import sys

    script = f"""
import json, threading
from core.events import Status
from core.store import JobStore
from core.worker import Worker
seen, full = [], threading.Event()
def on_event(event):
    if isinstance(event, Status):
        seen.append(event.activity + " @ " + event.device)
        if event.device != "…":
            full.set()
w = Worker(JobStore({str(tmp_path / "db.sqlite3")!r}), lambda: None, output_dir={str(tmp_path)!r},
           status_interval=60.0)
w.subscribe(on_event)
w.start()
full.wait(60)
w.stop(timeout=10)
print(json.dumps(seen))
"""
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=120,
                            env={**__import__("os").environ, "DARKROOM_HOME": str(tmp_path / "home")})
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen[0] == "starting: importing torch @ …"
    assert seen[1] == "idle @ cpu"


def test_priority_then_fifo(env):
    make, _, _ = env
    w, rec = make()
    low1 = w.submit(req("low1"))
    high = w.submit(req("high"), priority=2)
    low2 = w.submit(req("low2"))
    mid = w.submit(req("mid"), priority=1)
    w.start()
    rec.wait(lambda: len(rec.of(JobFinished)) == 4, "all jobs")
    assert [e.job_id for e in rec.of(JobStarted)] == [high, mid, low1, low2]


def test_pause_holds_before_next_job_and_resume_continues(env):
    make, store, _ = env
    runner = FakeRunner(gated=True)
    w, rec = make(runner)
    a = w.submit(req("a"))
    b = w.submit(req("b"))
    w.start()
    rec.wait(lambda: rec.of(JobStarted, a), "a started")
    w.pause()
    assert w.paused
    runner.release(3)  # a still finishes
    finished(rec, a)
    rec.wait(lambda: any(s.activity == "paused" and s.paused for s in rec.of(Status)), "paused status")
    assert store.get_job(b).state == "pending"
    assert not rec.of(JobStarted, b)
    w.resume()
    runner.release(3)
    finished(rec, b)


def test_cancel_queued_job(env):
    make, store, _ = env
    w, rec = make()
    w.pause()
    a = w.submit(req("a"))
    b = w.submit(req("b"))
    w.start()
    assert w.cancel(b)
    assert rec.of(JobCancelled, b)
    assert store.get_job(b).state == "cancelled"
    assert not w.cancel(b)
    w.resume()
    finished(rec, a)
    c = w.submit(req("c"))
    finished(rec, c)
    assert not rec.of(JobStarted, b)


def test_cancel_running_job_stops_within_one_step(env):
    make, store, tmp_path = env
    runner = FakeRunner(gated=True)
    w, rec = make(runner)
    a = w.submit(req("a", steps=50))
    b = w.submit(req("b"))
    w.start()
    runner.release(1)
    rec.wait(lambda: rec.of(JobStep, a), "first step")
    assert w.cancel(a)
    runner.release(1)  # let the runner reach its next step call, which must raise
    rec.wait(lambda: rec.of(JobCancelled, a), "cancel")
    assert [e.step for e in rec.of(JobStep, a)] == [1]
    assert runner.steps_started[a] == 2
    assert store.get_job(a).state == "cancelled"
    assert not rec.of(JobFinished, a) and store.history() == []
    runner.release(3)
    finished(rec, b)  # the queue keeps going


def test_cancel_through_the_database_from_another_process(env):
    make, store, tmp_path = env
    runner = FakeRunner(gated=True)
    w, rec = make(runner)
    a = w.submit(req("a", steps=50))
    w.start()
    runner.release(1)
    rec.wait(lambda: rec.of(JobStep, a), "first step")
    other = JobStore(store.path)  # e.g. a TUI in another process
    assert other.cancel(a)
    other.close()
    # the status thread sees the flag; the next step raises
    rec.wait(lambda: w._current is not None and w._current.is_cancelled(), "flag noticed")
    runner.release(1)
    rec.wait(lambda: rec.of(JobCancelled, a), "cancel")
    assert store.get_job(a).state == "cancelled"


def test_a_failed_job_leaves_none_of_its_tensors_alive(env):
    """The worker keeps a recent failure's exception (the batch runner's exit code reads its type); its
    traceback's frames held the job's tensors (latents, activations: GPU memory in the TUI) until 100 more
    jobs had failed. The traceback is still in the failure log."""
    import gc
    import weakref

    make, store, tmp_path = env
    held: list[weakref.ref] = []

    class FailsHoldingATensor:
        def run(self, job, ctx):
            activations = torch.zeros(64)
            held.append(weakref.ref(activations))
            try:
                raise ValueError("inner")
            except ValueError:
                raise RuntimeError("boom") from None  # a chained one's frames too

    w, rec = make(FailsHoldingATensor())
    job = w.submit(req("x"))
    w.start()
    rec.wait(lambda: rec.of(JobFailed, job), "the failure")
    w.stop(timeout=10)
    gc.collect()
    assert held[0]() is None
    assert isinstance(w.failure(job), RuntimeError)
    log = (tmp_path / "home" / "data" / "logs" / "worker.log").read_text()
    assert "Traceback" in log and "in run" in log and "RuntimeError: boom" in log


def test_failure_is_reported_and_next_job_runs(env):
    make, store, tmp_path = env
    w, rec = make()
    bad = w.submit(req("boom"))
    badmodel = w.submit(req("badmodel"))
    good = w.submit(req("fine"))
    w.start()
    finished(rec, good)
    failed = {e.job_id: e.error for e in rec.of(JobFailed)}
    assert failed[bad] == "internal error: RuntimeError: boom"
    assert failed[badmodel] == "fake.safetensors: is not a checkpoint"
    assert store.get_job(bad).state == "failed" and store.get_job(bad).error == failed[bad]
    assert isinstance(w.failure(badmodel), CheckpointError)
    log = (tmp_path / "home" / "data" / "logs" / "worker.log").read_text()
    assert "Traceback" in log and "RuntimeError: boom" in log and f"job {bad}" in log
    assert "CheckpointError" not in log  # user errors are not internal errors
    # retry puts it back and it runs again (and fails again)
    assert w.retry(bad) == bad
    rec.wait(lambda: len(rec.of(JobFailed, bad)) == 2, "second failure")


class OneImageAtATime:
    """A runner as the pipeline is: each image handed to ``ctx.save_images`` when made, the seeds an earlier
    run saved (``ctx.has_image``) skipped; ``fail_after`` images it raises (a crash in the next image)."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.fail_after = fail_after
        self.made: list[int] = []

    def run(self, job, ctx: JobContext) -> list[GeneratedImage]:
        for seed in job.request.image_seeds():
            if ctx.has_image(seed):
                continue
            if self.fail_after is not None and len(self.made) == self.fail_after:
                raise RuntimeError("died in the next image")
            self.made.append(seed)
            ctx.save_images([GeneratedImage(Image.new("RGB", (8, 8)), seed, job.request)])
        return []


def test_each_image_is_recorded_when_made_and_a_retry_makes_only_the_rest(env):
    """A batch_count 3 job failing in its third image keeps the first two (on disk, in the history); its retry
    makes only the third, and its JobFinished lists all three in seed order."""
    make, store, _ = env
    runner = OneImageAtATime(fail_after=2)
    w, rec = make(runner)
    job = w.submit(req("three", seed=10, batch_count=3))
    w.start()
    rec.wait(lambda: rec.of(JobFailed, job), "the failure")
    kept = store.job_history(job)
    assert [h.seed for h in kept] == [10, 11] and all(Path(h.path).is_file() for h in kept)
    runner.fail_after, runner.made = None, []
    w.retry(job)
    event = finished(rec, job)
    assert runner.made == [12]
    assert event.seeds == (10, 11, 12) and event.paths[:2] == tuple(h.path for h in kept)
    assert [h.path for h in store.job_history(job)] == list(event.paths)


class GatedImages(OneImageAtATime):
    """``OneImageAtATime`` that waits for ``go`` before making its last image."""

    def __init__(self) -> None:
        super().__init__()
        self.at_last = threading.Event()
        self.go = threading.Event()

    def run(self, job, ctx: JobContext) -> list[GeneratedImage]:
        seeds = job.request.image_seeds()
        for seed in seeds:
            if seed == seeds[-1]:
                self.at_last.set()
                assert self.go.wait(TIMEOUT)
            ctx.save_images([GeneratedImage(Image.new("RGB", (8, 8)), seed, job.request)])
        return []


def test_each_saved_image_is_an_event_at_once_before_the_job_ends(env):
    """A batch_count 3 job sends an ImageSaved for each image as it is saved and recorded: while the job waits
    before its last image, the first two are out (path, seed, on disk and in the history), and no JobFinished."""
    make, store, _ = env
    runner = GatedImages()
    w, rec = make(runner)
    job = w.submit(req("three", seed=20, batch_count=3))
    w.start()
    assert runner.at_last.wait(TIMEOUT)
    first = rec.wait(lambda: len(rec.of(ImageSaved, job)) == 2 and rec.of(ImageSaved, job), "two images")
    assert [(e.seed, e.earlier) for e in first] == [(20, False), (21, False)]
    assert [e.path for e in first] == [h.path for h in store.job_history(job)]
    assert all(Path(e.path).is_file() for e in first)
    assert not rec.of(JobFinished, job)
    runner.go.set()
    done = finished(rec, job)
    saved = rec.of(ImageSaved, job)
    assert tuple(e.path for e in saved) == done.paths and tuple(e.seed for e in saved) == done.seeds == (20, 21, 22)
    kinds = [type(e) for e in rec.jobs() if e.job_id == job]
    assert kinds.index(JobFinished) == len(kinds) - 1  # every ImageSaved before it


def test_a_retry_sends_the_earlier_runs_images_too_once_each_in_seed_order(env):
    """A job that failed after three of four images said each before its JobFailed; one of them is deleted;
    its retry sends every image once in seed order: the kept ones of the earlier run marked ``earlier``
    (seed 12 waits for the remade 11), the remade and new ones not."""
    make, store, _ = env
    runner = OneImageAtATime(fail_after=3)
    w, rec = make(runner)
    job = w.submit(req("four", seed=10, batch_count=4))
    w.start()
    rec.wait(lambda: rec.of(JobFailed, job), "the failure")
    first_run = [e for e in rec.jobs() if e.job_id == job and isinstance(e, ImageSaved | JobFailed)]
    assert [getattr(e, "seed", None) for e in first_run] == [10, 11, 12, None]
    deleted = first_run[1].path
    Path(deleted).unlink()
    del rec.events[:]
    runner.fail_after, runner.made = None, []
    w.retry(job)
    done = finished(rec, job)
    assert runner.made == [11, 13]
    saved = rec.of(ImageSaved, job)
    assert [(e.seed, e.earlier) for e in saved] == [(10, True), (11, False), (12, True), (13, False)]
    assert saved[0].path == first_run[0].path and saved[2].path == first_run[2].path
    assert tuple(e.path for e in saved) == done.paths


def test_private_queue_jobs_are_owned_and_a_retry_runs_them_in_the_retrying_workers_queue(env):
    """A batch run (private queue) stopped before a job started; the TUI's worker retries it and runs it."""
    make, store, _ = env
    batch, _ = make(queue="batch-1", private_queue=True)
    left = batch.submit(req("left behind"))
    assert store.get_job(left).owner_pid == os.getpid()
    assert store.interrupt_pending("batch-1", "not started: the batch run was interrupted") == 1
    tui, rec = make()
    tui.start()
    assert tui.retry(left) == left
    finished(rec, left)
    assert store.get_job(left).queue == "default"


def test_unavailable_runner_factory_fails_job_with_message(env):
    make, store, _ = env

    def factory():
        raise CheckpointError("x.safetensors", "cannot be read")

    w, rec = make(factory)
    a = w.submit(req())
    w.start()
    rec.wait(lambda: rec.of(JobFailed, a), "failure")
    assert rec.of(JobFailed, a)[0].error == "x.safetensors: cannot be read"


def test_runner_factory_is_called_in_the_worker_thread_once(env):
    make, _, _ = env
    calls: list[str] = []
    runner = FakeRunner()

    def factory():
        calls.append(threading.current_thread().name)
        return runner

    w, rec = make(factory)
    ids = [w.submit(req(str(i))) for i in range(2)]
    assert calls == []  # nothing is built on the caller's thread
    w.start()
    finished(rec, ids[1])
    assert calls == ["darkroom-worker"]
    assert runner.threads == {"darkroom-worker"}


def test_runner_class_is_used_as_a_factory(env):
    make, _, _ = env
    w, rec = make(FakeRunner)
    a = w.submit(req())
    w.start()
    finished(rec, a)


def test_multiple_subscribers_and_unsubscribe(env):
    make, _, _ = env
    w, rec = make()
    second = Recorder()
    unsubscribe = w.subscribe(second)

    def broken(event):
        raise ValueError("subscriber bug")  # must not break the worker or other subscribers

    w.subscribe(broken)
    a = w.submit(req("a"))
    w.start()
    finished(rec, a)
    second.wait(lambda: second.of(JobFinished, a), "second subscriber")
    assert [type(e) for e in second.jobs()] == [type(e) for e in rec.jobs()]
    unsubscribe()
    b = w.submit(req("b"))
    finished(rec, b)
    assert not second.of(JobQueued, b)


def test_stop_without_finishing_marks_current_interrupted(env):
    make, store, _ = env
    w, rec = make(FakeRunner(delay=0.01))
    a = w.submit(req("a", steps=150))
    b = w.submit(req("b"))
    w.start()
    rec.wait(lambda: rec.of(JobStep, a), "first step")
    w.stop(finish_current=False, timeout=10)
    assert not w.running
    assert store.get_job(a).state == "interrupted"
    assert store.get_job(b).state == "pending"
    assert not rec.of(JobFinished)
    assert store.retry(a) == a


def test_stop_after_a_start_cut_short_between_its_two_threads_stops_the_started_one(env, monkeypatch):
    """A Ctrl-C whose handler ran between the job thread's start and the status thread's: stop() joined the
    thread never started ('cannot join thread before it is started') instead of stopping the job."""
    make, store, _ = env
    w, rec = make(FakeRunner(delay=0.01))
    a = w.submit(req("a", steps=150))
    thread_start = threading.Thread.start

    def start(thread):
        if thread.name == "darkroom-worker-status":
            raise KeyboardInterrupt
        thread_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    with pytest.raises(KeyboardInterrupt):
        w.start()
    monkeypatch.setattr(threading.Thread, "start", thread_start)
    rec.wait(lambda: rec.of(JobStep, a), "first step")
    w.stop(finish_current=False, timeout=10)
    assert not w.running and store.get_job(a).state == "interrupted"


def test_stop_finishing_current_leaves_rest_pending(env):
    make, store, _ = env
    runner = FakeRunner(gated=True)
    w, rec = make(runner)
    a = w.submit(req("a"))
    b = w.submit(req("b"))
    w.start()
    rec.wait(lambda: rec.of(JobStarted, a), "a started")
    stopper = threading.Thread(target=w.stop, kwargs={"finish_current": True, "timeout": 10})
    stopper.start()
    runner.release(3)
    stopper.join(TIMEOUT)
    assert store.get_job(a).state == "done"
    assert store.get_job(b).state == "pending"


def test_step_raises_cancel_error_directly():
    class Dummy:
        def _emit(self, event):
            self.last = event

        def _set_activity(self, text):
            pass

        def _give_way(self):
            pass

    dummy = Dummy()
    ctx = JobContext(dummy, 1)  # type: ignore[arg-type]
    ctx.step(1, 2)
    assert dummy.last.step == 1 and not ctx.is_cancelled()
    ctx._cancel.set()
    with pytest.raises(JobCancelledError):
        ctx.step(2, 2)


def test_give_way_holds_the_job_at_its_next_step_boundary(env, monkeypatch):
    """An F-key switch asks the running job to step aside (Worker.give_way): its next step boundary sleeps,
    releasing the GIL, until the deadline, never longer than MAX_GIVE_WAY_S; without a request it does not."""
    import core.worker as worker_module

    make, _, _ = env
    worker, _ = make()
    slept: list[float] = []
    monkeypatch.setattr(worker_module.time, "sleep", slept.append)
    ctx = JobContext(worker, 1)
    ctx.step(1, 3)
    assert slept == []
    worker.give_way(0.2)
    ctx.step(2, 3)
    assert len(slept) == 1 and 0 < slept[0] <= 0.2
    worker.give_way(60)  # a caller cannot hold a job for long
    ctx.step(3, 3)
    assert 0 < slept[-1] <= worker_module.MAX_GIVE_WAY_S


# ---- core.accel.device ----------------------------------------------------------------------------------------

from core.accel import device as devices  # noqa: E402


def test_pick_device_prefers_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "_mps_available", lambda: False)
    assert devices.pick_device() == torch.device("cpu")
    monkeypatch.setattr(devices, "_mps_available", lambda: True)
    assert devices.pick_device() == torch.device("mps", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert devices.pick_device() == torch.device("cuda", 0)
    assert devices.pick_device("cpu") == torch.device("cpu")


def test_pick_device_rejects_unavailable_or_unknown(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(devices.DeviceError, match="CUDA is not available"):
        devices.pick_device("cuda")
    with pytest.raises(devices.DeviceError, match="valid"):
        devices.pick_device("tpu9")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(devices.DeviceError, match="1 CUDA device"):
        devices.pick_device("cuda:3")
    assert devices.pick_device("cuda:0") == torch.device("cuda", 0)
    # "cuda" is the current device by its index, as tensors on it report theirs (cuda != cuda:0)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert devices.pick_device("cuda") == torch.device("cuda", 0) and devices.pick_device("cuda").index == 0

    # MPS too: its tensors report mps:0, and an index-less mps counted none of them as resident in the placement
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "_mps_available", lambda: True)
    assert devices.pick_device("mps").index == 0 and devices.pick_device().index == 0


def test_memory_stats_cuda_uses_torch_counters(monkeypatch):
    class Props:
        total_memory = 24 * 2**30

    seen = []
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda i: seen.append(i) or 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda i: 5 * 2**30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: Props())
    assert devices.memory_stats(torch.device("cuda", 1)) == (3 * 2**30, 5 * 2**30, 24 * 2**30)
    assert seen == [1]


def test_memory_stats_cpu_is_process_rss():
    import mmap
    import os

    before, _, _ = devices.memory_stats("cpu")
    # Touch 64 MiB of fresh anonymous pages so RSS must grow by about that much (a bytearray may reuse
    # resident memory the allocator kept from earlier tests).
    block = mmap.mmap(-1, 64 * 2**20)
    for i in range(0, len(block), 4096):
        block[i] = 1
    used, peak, total = devices.memory_stats("cpu")
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    assert used - before >= 60 * 2**20
    assert abs(used - rss) < 16 * 2**20
    assert peak >= used
    assert total == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    block.close()


def test_compute_dtype(monkeypatch):
    assert devices.compute_dtype("cpu", torch.float16) == torch.float32
    assert devices.compute_dtype("cpu", torch.bfloat16) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert devices.compute_dtype("cuda", torch.bfloat16) == torch.bfloat16
    # bf16 wherever the GPU has it natively, whatever the checkpoint stores (core.accel.memory's policy)
    assert devices.compute_dtype("cuda", torch.float32) == torch.bfloat16
    assert devices.compute_dtype("cuda", torch.float16) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert devices.compute_dtype("cuda", torch.bfloat16) == torch.float16
    assert devices.compute_dtype("mps", torch.float32) == torch.float16
    assert devices.dtype_name(torch.bfloat16) == "bfloat16"


class NiceRecorder(FakeRunner):
    """Records the scheduling priority of the job thread and of a thread it starts (as torch starts its
    intra-op pool from the first thread that runs a parallel op)."""

    def run(self, job, ctx: JobContext) -> list[GeneratedImage]:
        self.nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        seen = []
        pool = threading.Thread(target=lambda: seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
        pool.start()
        pool.join()
        self.pool_nice = seen[0]
        return super().run(job, ctx)


@pytest.mark.skipif(not hasattr(os, "getpriority") or not os.uname().sysname == "Linux", reason="per-thread nice")
@pytest.mark.parametrize("yield_cpu", [True, False])
def test_an_interactive_worker_yields_the_cpu_to_the_ui(env, yield_cpu):
    make, store, tmp_path = env
    ui = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    runner = NiceRecorder()
    w, rec = make(runner, yield_cpu=yield_cpu)
    w.start()
    finished(rec, w.submit(req()))
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == ui  # the UI thread keeps its priority
    if yield_cpu and ui < 19:
        assert runner.nice > ui and runner.pool_nice == runner.nice
    else:
        assert runner.nice == ui and runner.pool_nice == ui


def test_idle_status_names_the_dtype_the_runner_will_use(env):
    """Before any job builds the runner, the status bar's dtype is the one ``--precision`` picks."""
    from core.runner import runner_factory

    make, _, tmp_path = env
    w, rec = make(runner_factory([tmp_path], precision="bf16"), status_interval=60.0)
    w.start()
    status = rec.wait(lambda: [s for s in rec.of(Status) if s.device != "…"], "a full status")[0]
    assert status.dtype == "bfloat16" and w._runner is None
