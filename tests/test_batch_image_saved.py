"""``darkroom --batch`` prints each image path as its ``ImageSaved`` event arrives, not at the job's end."""

from __future__ import annotations

import _thread
import io
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from cli.batch import EXIT_INTERRUPTED, EXIT_JOB_FAILED, EXIT_OK, run_batch
from core.store import JobStore
from core.worker import GeneratedImage
from tests.batch_harness import batch_models

TIMEOUT = 30.0
JOBS = ('[[job]]\nmodel = "fake"\nprompt = "three"\nsteps = 1\nseed = 40\nbatch_count = 3\n'
        '[[job]]\nmodel = "fake"\nprompt = "one more"\nsteps = 1\nseed = 50\n')


class SavesEachBatch:
    """As the pipeline is: each image handed to ``ctx.save_images`` when made, those ``ctx.has_image`` says an
    earlier run saved skipped. With ``gate`` set it waits for it before a job's last image (``at_last`` says
    it is there); with ``fail_last`` it raises there instead. At seed ``ctrl_c_at`` it presses Ctrl-C (a
    KeyboardInterrupt in the main thread, where run_batch waits for events) and waits to be stopped."""

    gate: threading.Event | None = None
    at_last = threading.Event()
    fail_last = False
    ctrl_c_at: int | None = None
    stderr: io.StringIO = io.StringIO()  # the running batch's
    made: list[int] = []

    def run(self, job, ctx):
        cls = type(self)
        seeds = job.request.image_seeds()
        for seed in seeds:
            if ctx.has_image(seed):
                continue
            ctx.step(1, 1)
            if seed == cls.ctrl_c_at:
                # once run_batch is in its event loop (it has shown the job's start), as a user's Ctrl-C would be
                _wait(lambda: "[1/2] started" in cls.stderr.getvalue(), "the job's start on stderr")
                _thread.interrupt_main()
                _wait(lambda: ctx.check_cancelled(), "the batch run to stop the job")  # raises once it does
            if seed == seeds[-1] and len(seeds) > 1:
                if cls.fail_last:
                    raise RuntimeError("died in the last image")
                if cls.gate is not None:
                    cls.at_last.set()
                    assert cls.gate.wait(TIMEOUT)
            cls.made.append(seed)
            ctx.save_images([GeneratedImage(Image.new("RGB", (8, 8)), seed, job.request)])
        return []


class Lines(io.StringIO):
    """An output stream that can be read while the batch writes it from another thread."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()

    def write(self, text: str) -> int:
        with self.lock:
            return super().write(text)

    def lines(self) -> list[str]:
        with self.lock:
            return self.getvalue().splitlines()


@pytest.fixture
def batch(tmp_path, monkeypatch):
    models = batch_models(tmp_path, monkeypatch)
    jobs = tmp_path / "jobs.toml"
    jobs.write_text(JOBS)
    SavesEachBatch.gate, SavesEachBatch.fail_last, SavesEachBatch.made = None, False, []
    SavesEachBatch.ctrl_c_at = None
    SavesEachBatch.at_last = threading.Event()

    def run(stdout: io.StringIO | None = None, **options) -> tuple[int, str, str]:
        out, err = stdout if stdout is not None else io.StringIO(), Lines()
        SavesEachBatch.stderr = err
        code = run_batch(str(jobs), models_dirs=[models], output_dir=tmp_path / "out",
                         db_path=tmp_path / "db.sqlite3", runner_factory=SavesEachBatch, stdout=out, stderr=err,
                         rich_progress=False, **options)
        return code, out.getvalue(), err.getvalue()

    return run, tmp_path


def _history(tmp_path: Path) -> list[tuple[str, int]]:
    with JobStore(tmp_path / "db.sqlite3") as store:
        return [(h.path, h.seed) for job in sorted(store.list_jobs(), key=lambda j: j.id)
                for h in store.job_history(job.id)]


def _wait(predicate, what: str):
    deadline = time.monotonic() + TIMEOUT
    while not (result := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)
    return result


def test_each_path_is_on_stdout_as_soon_as_its_image_is_saved(batch):
    """A batch_count 3 job waiting before its last image has already printed the first two paths (those the
    history has, in seed order); once it goes on, stdout holds every path of the run once, in order."""
    run, tmp_path = batch
    SavesEachBatch.gate = threading.Event()
    out = Lines()
    result: list = []
    thread = threading.Thread(target=lambda: result.append(run(out)), daemon=True)
    thread.start()
    try:
        assert SavesEachBatch.at_last.wait(TIMEOUT)
        first = _wait(lambda: len(out.lines()) >= 2 and out.lines(), "the first two paths")
        assert first == [path for path, _ in _history(tmp_path)]  # seeds 40, 41, nothing more yet
        assert [seed for _, seed in _history(tmp_path)] == [40, 41]
    finally:
        SavesEachBatch.gate.set()
        thread.join(TIMEOUT)
    code, stdout, stderr = result[0]
    assert code == EXIT_OK, stderr
    history = _history(tmp_path)
    assert [seed for _, seed in history] == [40, 41, 42, 50]
    assert stdout.splitlines() == [path for path, _ in history]  # each once, in seed order, job by job
    assert stdout.splitlines()[:2] == first
    assert "[1/2] done: 3 image(s)" in stderr and "[2/2] done: 1 image(s)" in stderr


def test_a_job_that_fails_midway_has_printed_what_it_saved_and_resume_prints_each_path_once(batch):
    """The first job fails in its last image: its first two paths are on stdout (they are saved and in the
    history); ``--resume`` makes only the missing image and prints the job's three paths once each, in seed
    order, after the second job's (done before: printed again as it is skipped, before anything runs)."""
    run, tmp_path = batch
    SavesEachBatch.fail_last = True
    code, stdout, stderr = run()
    assert code == EXIT_JOB_FAILED, stderr
    assert "[1/2] failed: internal error: RuntimeError: died in the last image" in stderr
    history = _history(tmp_path)
    assert [seed for _, seed in history] == [40, 41, 50]
    assert stdout.splitlines() == [path for path, _ in history]

    SavesEachBatch.fail_last, SavesEachBatch.made = False, []
    code, stdout, stderr = run(resume=True)
    assert code == EXIT_OK, stderr
    assert SavesEachBatch.made == [42]
    by_seed = {seed: path for path, seed in _history(tmp_path)}
    assert stdout.splitlines() == [by_seed[50], by_seed[40], by_seed[41], by_seed[42]]
    assert "[2/2] skipped: done in an earlier run (1 image(s))" in stderr


def test_ctrl_c_prints_the_images_a_job_kept_as_it_stopped(batch):
    """A resumed job whose earlier image 41 waits for 40 (deleted since, so made again: seed order) is stopped
    by Ctrl-C while it makes 40: it says 41 is saved only as it stops, after the run left its event loop, and
    41's path is printed all the same (exit 130). The next ``--resume`` prints every path once."""
    run, tmp_path = batch
    SavesEachBatch.fail_last = True
    assert run()[0] == EXIT_JOB_FAILED
    by_seed = {seed: path for path, seed in _history(tmp_path)}
    Path(by_seed[40]).unlink()
    SavesEachBatch.fail_last, SavesEachBatch.ctrl_c_at = False, 40
    code, stdout, stderr = run(resume=True)
    assert code == EXIT_INTERRUPTED, stderr
    assert "job 1 marked interrupted (1 of its 3 images kept; --resume makes the rest)" in stderr
    assert stdout.splitlines() == [by_seed[50], by_seed[41]]

    SavesEachBatch.ctrl_c_at, SavesEachBatch.made = None, []
    code, stdout, stderr = run(resume=True)
    assert code == EXIT_OK, stderr
    assert SavesEachBatch.made == [40, 42]
    by_seed = {seed: path for path, seed in _history(tmp_path) if Path(path).is_file()}
    assert stdout.splitlines() == [by_seed[50], by_seed[40], by_seed[41], by_seed[42]]
