"""In-process ``run_batch`` with a fake runner: shared by the batch CLI tests."""

from __future__ import annotations

import io
import queue
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from cli.batch import run_batch
from core.worker import GeneratedImage
from tests.family_files import write_header_only

BatchRun = Callable[..., tuple[int, str, str]]


class RecordingRunner:
    """Makes one 8x8 image per seed, reports every step and remembers every request it ran.

    Subclasses hook ``before_steps``/``after_steps`` to fail or act at those points.
    """

    seen: list = []

    def run(self, job, ctx):
        type(self).seen.append(job.request)
        self.before_steps(job)
        for i in range(1, job.request.steps + 1):
            ctx.step(i, job.request.steps)
        self.after_steps(job)
        return [GeneratedImage(Image.new("RGB", (8, 8)), s, job.request) for s in job.request.image_seeds()]

    def before_steps(self, job) -> None:
        pass

    def after_steps(self, job) -> None:
        pass


def batch_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private home and a models folder holding the stand-in checkpoint ``fake`` (header-only SD1.5)."""
    monkeypatch.setenv("DARKROOM_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DARKROOM_MODELS", raising=False)
    models = tmp_path / "models"
    models.mkdir()
    write_header_only(models / "fake.safetensors", "sd15")
    return models


def batch_runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, runner: type[RecordingRunner]) -> BatchRun:
    """``run(jobs, stdin=None) -> (exit code, stdout, stderr)`` over a private home, models folder and DB."""
    models = batch_models(tmp_path, monkeypatch)
    runner.seen = []

    def run(jobs: str, *, stdin: str | None = None) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = run_batch(
            jobs,
            models_dirs=[models],
            output_dir=tmp_path / "out",
            db_path=tmp_path / "db.sqlite3",
            runner_factory=runner,
            stdin=io.StringIO(stdin) if stdin is not None else None,
            stdout=out,
            stderr=err,
        )
        return code, out.getvalue(), err.getvalue()

    return run


def batch_and_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, runner: type[RecordingRunner]
                     ) -> tuple[BatchRun, Callable[[str, str], str], Path]:
    """(run, write, tmp_path): ``batch_runner``'s run and ``write(name, text)``, which writes a dedented jobs
    file into ``tmp_path`` and returns its path."""
    run = batch_runner(tmp_path, monkeypatch, runner)

    def write(name: str, text: str) -> str:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return str(path)

    return run, write, tmp_path


def run_jobs(jobs: list[dict], models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
             **options) -> tuple[list[Path], str]:
    """``jobs`` through the real pipeline in ``run_batch`` (in process; the subprocess start-up is what
    test_sdxl's --batch test covers), one JSONL file, ``models_dir`` the models folder, ``options`` more of
    ``run_batch``'s arguments (``precision=``); asserts the run succeeded. Returns the images written, in job
    order, and stderr."""
    import json

    job_file = tmp_path / "jobs.jsonl"
    job_file.write_text("\n".join(json.dumps(j) for j in jobs))
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setenv("DARKROOM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DARKROOM_MODELS", str(models_dir))  # run_batch sets it; restored after the test
    code = run_batch(str(job_file), models_dirs=[models_dir], output_dir=tmp_path / "out",
                     db_path=tmp_path / "jobs.db", stdout=out, stderr=err, rich_progress=False, **options)
    assert code == 0, err.getvalue()
    return [Path(line) for line in out.getvalue().splitlines()], err.getvalue()


def default_sigint() -> None:
    """``preexec_fn`` for a child process a test sends Ctrl-C: a shell starts background commands (``cmd &``)
    with SIGINT ignored, the child inherits that, and Python then never raises KeyboardInterrupt in it."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


class StderrLines:
    """A child process's stderr, read line by line in a thread: a test waits for a progress line, then signals."""

    def __init__(self, proc: Any) -> None:
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(line) for line in proc.stderr], daemon=True).start()

    def wait_for(self, text: str, timeout: float = 60.0) -> None:
        """Until a line holding ``text`` has come (queue.Empty after ``timeout`` seconds without a line)."""
        while text not in self.lines.get(timeout=timeout):
            pass

    def rest(self) -> list[str]:
        """The lines read so far and not yet waited through."""
        out = []
        while not self.lines.empty():
            out.append(self.lines.get())
        return out
