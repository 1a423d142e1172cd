"""``darkroom --batch JOBS --resume`` and the batch runner under database failures (exit 4, one message)."""

from __future__ import annotations

import io
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from cli.batch import EXIT_DATABASE, run_batch
from cli.main import build_parser
from core.store import JobStore
from core.worker import GeneratedImage
from tests.batch_harness import batch_models

LOCKER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(60)
"""

JOBS = '[[job]]\nmodel = "fake"\nprompt = "one"\nsteps = 1\nbatch_count = 2\n[[job]]\nmodel = "fake"\nprompt = "two"\nsteps = 1\n'


class Runner:
    """One image per seed; ``fail`` (a set of prompts) fails those jobs; ``on_done(job)`` runs after each."""

    seen: list[str] = []
    fail: set[str] = set()
    on_done = None

    def run(self, job, ctx):
        type(self).seen.append(job.request.prompt)
        ctx.step(1, 1)
        if job.request.prompt in type(self).fail:
            raise RuntimeError("boom")
        if type(self).on_done is not None:
            type(self).on_done(job)
        return [GeneratedImage(Image.new("RGB", (8, 8)), s, job.request) for s in job.request.image_seeds()]


@pytest.fixture
def batch(tmp_path, monkeypatch):
    models = batch_models(tmp_path, monkeypatch)
    jobs = tmp_path / "jobs.toml"
    jobs.write_text(JOBS)
    Runner.seen, Runner.fail, Runner.on_done = [], set(), None

    def run(*, resume: bool = False, source: str | None = None, stdin: str | None = None) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = run_batch(
            source or str(jobs),
            models_dirs=[models],
            output_dir=tmp_path / "out",
            db_path=tmp_path / "db.sqlite3",
            runner_factory=Runner,
            stdin=io.StringIO(stdin) if stdin is not None else None,
            stdout=out,
            stderr=err,
            resume=resume,
        )
        return code, out.getvalue(), err.getvalue()

    return run, jobs, tmp_path


def _as_if_run_by_a_process_now_gone(db: Path) -> None:
    """The runs here share the test's process; a real earlier run's process has exited by the time of the
    next one: give its jobs a dead owner, as recovery would find them."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    conn = sqlite3.connect(db)
    conn.execute("UPDATE jobs SET owner_pid = ? WHERE owner_pid IS NOT NULL", (proc.pid,))
    conn.commit()
    conn.close()


def _images(tmp_path: Path) -> list[str]:
    return sorted(str(p) for p in (tmp_path / "out").rglob("*.png") if not p.name.startswith("."))


def test_resume_runs_only_what_did_not_finish_and_prints_every_path(batch):
    run, jobs, tmp_path = batch
    Runner.fail = {"two"}
    code, out, err = run()
    assert code == 1
    first_paths = out.split()
    assert len(first_paths) == 2 and Runner.seen == ["one", "two"]

    Runner.fail, Runner.seen = set(), []
    code, out, err = run(resume=True)
    assert code == 0, err
    assert Runner.seen == ["two"]  # job 1 was not run again
    paths = out.split()
    assert paths[:2] == first_paths and len(paths) == 3  # job 1's images printed as if it had run
    assert "[1/2] skipped: done in an earlier run (2 image(s))" in err
    assert sorted(paths) == _images(tmp_path)
    with JobStore(tmp_path / "db.sqlite3") as store:
        assert [j.state for j in store.list_jobs()] == ["done", "done"]  # job 2 retried, not queued anew

    Runner.seen = []
    code, out, err = run(resume=True)  # everything is done: nothing runs, every path again
    assert code == 0 and Runner.seen == [] and sorted(out.split()) == sorted(paths)
    assert "2 of 2 job(s) succeeded" in err

    jobs.write_text(JOBS.replace('"two"', '"two, changed"'))  # a changed job is another job
    code, out, err = run(resume=True)
    assert code == 0 and Runner.seen == ["two, changed"] and len(out.split()) == 3


class SavesThenFails:
    """Saves each image of the job as it is made (as the pipeline does), skipping those saved before; the
    first run fails after ``fail_after`` images."""

    fail_after: int | None = 1

    def run(self, job, ctx):
        made = 0
        for seed in job.request.image_seeds():
            if ctx.has_image(seed):
                continue
            ctx.step(1, 1)
            ctx.save_images([GeneratedImage(Image.new("RGB", (8, 8)), seed, job.request)])
            made += 1
            if made == type(self).fail_after:
                raise RuntimeError("boom")
        return []


def test_a_resumed_job_says_how_many_of_its_images_were_saved_before(batch):
    """Its steps count only the images still to make (the pipeline skips the saved ones), so the progress says
    so: 'step 1/1' alone read as a one-image job, or as the whole job restarted."""
    run, jobs, tmp_path = batch
    jobs.write_text('[[job]]\nmodel = "fake"\nprompt = "four"\nsteps = 1\nbatch_count = 4\n')

    def go(**kw):
        out, err = io.StringIO(), io.StringIO()
        code = run_batch(str(jobs), models_dirs=[tmp_path / "models"], output_dir=tmp_path / "out",
                         db_path=tmp_path / "db.sqlite3", runner_factory=SavesThenFails, stdout=out, stderr=err,
                         **kw)
        return code, err.getvalue()

    SavesThenFails.fail_after = 1
    code, err = go()
    assert code == 1 and "resuming" not in err
    SavesThenFails.fail_after = None
    code, err = go(resume=True)
    assert code == 0, err
    assert "[1/1] resuming: 1 of 4 images already saved, making the other 3\n" in err
    assert "[1/1] step 1/1 (for the other 3)\n" in err
    code, err = go(resume=True)  # done: skipped, nothing resumed
    assert code == 0 and "skipped: done in an earlier run (4 image(s))" in err and "resuming" not in err


def test_without_resume_every_job_runs_again(batch):
    run, _, _ = batch
    assert run()[0] == 0
    Runner.seen = []
    assert run()[0] == 0
    assert Runner.seen == ["one", "two"]


def test_resume_makes_again_a_done_job_whose_images_were_deleted(batch):
    run, _, tmp_path = batch
    code, out, _ = run()
    Path(out.split()[0]).unlink()
    Runner.seen = []
    code, out, _ = run(resume=True)
    assert code == 0 and Runner.seen == ["one"] and len(out.split()) == 3


def test_resume_needs_a_file(batch):
    run, _, _ = batch
    code, _, err = run(resume=True, source="-", stdin='{"model": "fake"}\n')
    assert code == 2 and "--resume needs a jobs file" in err


def test_resume_is_documented_and_needs_batch(capsys):
    parser = build_parser()
    text = " ".join(parser.format_help().split())
    assert "--resume with --batch: run only the jobs of JOBS that an earlier run did not finish" in text
    assert "4 the job database cannot be used" in text
    from cli.main import main

    with pytest.raises(SystemExit) as info:
        main(["--resume"])
    assert info.value.code == 2
    assert "--resume goes with --batch" in capsys.readouterr().err


class FullDisk:
    """Every JobStore connection refuses writes while ``full`` is set, as SQLite does on a full disk."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.full = threading.Event()
        real = JobStore._conn
        disk = self

        class Conn:
            def __init__(self, conn):
                self._conn = conn

            def execute(self, sql, *args):
                if disk.full.is_set() and sql.split()[0].upper() in ("INSERT", "UPDATE", "DELETE"):
                    raise sqlite3.OperationalError("database or disk is full")
                return self._conn.execute(sql, *args)

            def __getattr__(self, name):
                return getattr(self._conn, name)

        monkeypatch.setattr(JobStore, "_conn", lambda store: Conn(real(store)))


def test_full_disk_mid_run_exits_4_with_one_message_and_resume_finishes(batch, monkeypatch):
    """The disk fills while job 1's images are saved: the first is in place but cannot be recorded. The run
    stops with one message (exit 4); the resumed run records that image, makes only job 1's second image and
    job 2, and prints every path."""
    run, _, tmp_path = batch
    disk = FullDisk(monkeypatch)
    Runner.on_done = lambda job: disk.full.set()
    started = time.monotonic()
    code, out, err = run()
    assert code == EXIT_DATABASE and time.monotonic() - started < 15
    assert out == ""  # job 1 did not finish: it printed nothing
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("darkroom: error:")]
    assert errors == [
        f"darkroom: error: {tmp_path / 'db.sqlite3'}: the disk holding the job database is full; free some space "
        "and start again (images already saved are kept and recorded at the next start)"
    ]
    assert "2 of 2 job(s) not finished" in err and "--resume" in err
    orphan = _images(tmp_path)
    assert len(orphan) == 1  # saved, renamed into place, not recorded

    disk.full.clear()
    with JobStore(tmp_path / "db.sqlite3") as store:
        assert [j.state for j in sorted(store.list_jobs(), key=lambda j: j.id)] == ["running", "pending"]
    _as_if_run_by_a_process_now_gone(tmp_path / "db.sqlite3")
    Runner.on_done, Runner.seen = None, []
    code, out, err = run(resume=True)
    assert code == 0, err
    assert Runner.seen == ["one", "two"]  # job 1 had one of its two images
    paths = out.split()
    assert len(paths) == 3 and orphan[0] in paths and sorted(paths) == _images(tmp_path)  # no duplicate
    with JobStore(tmp_path / "db.sqlite3") as store:
        assert sorted(h.path for h in store.history()) == sorted(paths)


@pytest.mark.parametrize("fresh", [False, True])
def test_lock_held_by_another_process_exits_4_instead_of_hanging(batch, monkeypatch, fresh):
    run, _, tmp_path = batch
    db = tmp_path / "db.sqlite3"
    if not fresh:
        JobStore(db).close()
    monkeypatch.setenv("DARKROOM_DB_TIMEOUT", "0.5")
    holder = subprocess.Popen([sys.executable, "-c", LOCKER, str(db)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        code, out, err = run()
        assert time.monotonic() - started < 10
    finally:
        holder.kill()
        holder.wait(timeout=10)
    assert code == EXIT_DATABASE and out == "" and Runner.seen == []
    (line,) = [line for line in err.splitlines() if "error" in line]
    assert str(db) in line and "locked" in line and "more than 0.5 s" in line


KILLED_BATCH = """
import sys, time
from PIL import Image
from cli.batch import run_batch
from core.events import Status
from core.worker import GeneratedImage, Worker

class Slow:
    def run(self, job, ctx):
        for i in range(1, job.request.steps + 1):
            time.sleep(0.2)
            ctx.step(i, job.request.steps)
        return [GeneratedImage(Image.new("RGB", (8, 8)), s, job.request) for s in job.request.image_seeds()]

Worker._make_status = lambda self, ctx: Status(job_id=None)  # no torch import in this test process
jobs, models, out, db = sys.argv[1:5]
sys.exit(run_batch(jobs, models_dirs=[models], output_dir=out, db_path=db, runner_factory=Slow, resume=True))
"""


def test_resume_after_kill_9_runs_only_the_unfinished_jobs(batch):
    run, jobs, tmp_path = batch
    jobs.write_text(JOBS + '[[job]]\nmodel = "fake"\nprompt = "three"\nsteps = 150\n')
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_BATCH, str(jobs), str(tmp_path / "models"), str(tmp_path / "out"),
         str(tmp_path / "db.sqlite3")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    try:
        first = [proc.stdout.readline().strip() for _ in range(3)]  # jobs 1 and 2 done, 3 running
        proc.kill()
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert all(first), proc.stderr.read()
    code, out, err = run(resume=True)
    assert code == 0, err
    assert Runner.seen == ["three"]
    assert out.split()[:3] == first and len(out.split()) == 4
    assert "[1/3] skipped" in err and "[2/3] skipped" in err
    with JobStore(tmp_path / "db.sqlite3") as store:
        assert [j.state for j in store.list_jobs()] == ["done"] * 3


KILLED_AT_THE_THIRD_IMAGE = """
import os, signal, sys
from cli.batch import run_batch
from core.worker import JobContext

real_step = JobContext.step

def step(self, step, total, preview=None, image_index=0):
    if step > 2:  # the first step of the third image (one step each): the first two are made
        os.kill(os.getpid(), signal.SIGKILL)
    real_step(self, step, total, preview, image_index)

JobContext.step = step
jobs, models, out, db = sys.argv[1:5]
sys.exit(run_batch(jobs, models_dirs=[models], output_dir=out, db_path=db))
"""

TINY_JOB = ('[[job]]\nmodel = "tiny"\nprompt = "a lighthouse"\nsampler = "euler"\nsteps = 1\nseed = 7\n'
            'width = 64\nheight = 64\nbatch_count = 3\n')


def test_a_batch_count_job_killed_at_its_third_image_keeps_the_first_two_and_resume_makes_only_the_third(
        tmp_path, monkeypatch):
    """The real pipeline saves each image of a batch_count job as soon as it is made: ``kill -9`` while the
    third of three is sampled leaves the first two on disk and in the history; ``--resume`` makes only the
    third (one step run), keeps the first two files as they were, and prints all three paths. The killed run
    had printed the first two already, each as it was saved."""
    import os

    from core.models.testing import write_random_checkpoint
    from core.worker import JobContext

    monkeypatch.setenv("DARKROOM_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DARKROOM_MODELS", raising=False)
    models, out, db = tmp_path / "models", tmp_path / "out", tmp_path / "db.sqlite3"
    write_random_checkpoint(models / "checkpoints" / "tiny.safetensors", "sd15", "tiny", seed=0)
    jobs = tmp_path / "jobs.toml"
    jobs.write_text(TINY_JOB)
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_AT_THE_THIRD_IMAGE, str(jobs), str(models), str(out), str(db)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert proc.returncode == -9, proc.stderr
    kept = _images(tmp_path)
    assert len(kept) == 2, proc.stderr  # images 1 and 2 are in place, not lost with the process
    assert proc.stdout.split() == kept  # and printed as each was saved, before the kill
    with JobStore(db) as store:
        [job] = store.list_jobs()
        assert job.state == "running"  # as the kill left it
        assert [(h.path, h.seed) for h in store.job_history(job.id)] == list(zip(kept, [7, 8]))
    before = {path: Path(path).read_bytes() for path in kept}

    steps: list[tuple[int, int]] = []
    real_step = JobContext.step
    monkeypatch.setattr(JobContext, "step", lambda self, step, total, *a, **k: (
        steps.append((step, total)), real_step(self, step, total, *a, **k))[1])
    stdout, stderr = io.StringIO(), io.StringIO()
    code = run_batch(str(jobs), models_dirs=[models], output_dir=out, db_path=db, stdout=stdout, stderr=stderr,
                     resume=True)
    assert code == 0, stderr.getvalue()
    assert steps == [(1, 1)]  # only the third image was sampled
    assert "[1/1] resuming: 2 of 3 images already saved, making the other 1\n" in stderr.getvalue()
    paths = stdout.getvalue().split()
    assert len(paths) == 3 and paths[:2] == kept and sorted(paths) == _images(tmp_path)  # no duplicate
    assert {path: Path(path).read_bytes() for path in kept} == before
    with JobStore(db) as store:
        assert [j.state for j in store.list_jobs()] == ["done"]
        assert [(h.path, h.seed) for h in store.job_history(job.id)] == list(zip(paths, [7, 8, 9]))

    # the third image is the one the job would have made uninterrupted (image i has seed + i, whatever its batch)
    alone = tmp_path / "alone.toml"
    alone.write_text(TINY_JOB.replace("seed = 7", "seed = 9").replace("batch_count = 3", "batch_count = 1"))
    stdout = io.StringIO()
    assert run_batch(str(alone), models_dirs=[models], output_dir=tmp_path / "alone", db_path=db, stdout=stdout,
                     stderr=io.StringIO()) == 0
    with Image.open(paths[2]) as resumed, Image.open(stdout.getvalue().split()[0]) as fresh:
        assert resumed.tobytes() == fresh.tobytes()


def test_help_names_the_folders_used_without_options_and_creates_none(tmp_path, monkeypatch):
    # a new user's first questions: where do the models go, where did the images go
    monkeypatch.setenv("DARKROOM_HOME", str(tmp_path / "home"))
    text = build_parser().format_help()
    data = tmp_path / "home" / "data"
    flat = " ".join(text.split())
    assert f"checkpoints are looked for in $DARKROOM_MODELS and {data / 'models'};" in flat
    assert f"images are saved in {data / 'outputs'} (a folder per day)" in flat
    assert f"{data / 'darkroom.sqlite3'}" in flat and str(tmp_path / "home" / "config" / "presets") in flat
    assert "\n\nExit codes with --batch: 0" in text  # its own paragraph
    assert not (tmp_path / "home").exists()
