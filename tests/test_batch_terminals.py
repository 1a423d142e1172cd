"""``--batch`` progress in the terminals it runs from: a piped stdout printed on the same terminal, TERM=dumb."""

from __future__ import annotations

import io
import os
import threading

import pytest

from cli.batch import run_batch
from tests.batch_harness import RecordingRunner, StderrLines, batch_models

JOBS = '[defaults]\nmodel = "fake"\nsteps = 2\n[[job]]\nprompt = "x"\n[[job]]\nprompt = "y"\n'


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _run(tmp_path, monkeypatch, out, err) -> int:
    models = batch_models(tmp_path, monkeypatch)
    jobs = tmp_path / "jobs.toml"
    jobs.write_text(JOBS)
    return run_batch(str(jobs), models_dirs=[models], output_dir=tmp_path / "out", db_path=tmp_path / "db.sqlite3",
                     runner_factory=RecordingRunner, stdout=out, stderr=err)


def test_a_piped_stdout_gets_plain_progress_lines(tmp_path, monkeypatch):
    """`darkroom --batch jobs.toml | cat` (or `| tee paths.txt`): cat prints the paths on the terminal the live
    bars redraw, and the redraws erased them; with stdout a pipe the progress is one line per event."""
    monkeypatch.setenv("TERM", "xterm-256color")
    read_fd, write_fd = os.pipe()
    piped: list[bytes] = []
    reader = threading.Thread(target=lambda: piped.append(os.fdopen(read_fd, "rb").read()))
    reader.start()
    err = _Terminal()
    with open(write_fd, "w") as out:
        code = _run(tmp_path, monkeypatch, out, err)
    reader.join(10)
    assert code == 0
    assert "\x1b[" not in err.getvalue()  # no cursor moves, erases or colours between the paths
    assert "[1/2] step 1/2" in err.getvalue() and "[2/2] done" in err.getvalue()
    assert len(piped[0].decode().splitlines()) == 2


@pytest.mark.parametrize("term", ["dumb", "unknown"])
def test_a_dumb_terminal_gets_step_lines(tmp_path, monkeypatch, term):
    """Rich's live display shows nothing but the final state where TERM=dumb (an Emacs shell buffer): a job
    of minutes said nothing between 'loading' and 'done'."""
    monkeypatch.setenv("TERM", term)
    terminal = _Terminal()
    assert _run(tmp_path, monkeypatch, terminal, terminal) == 0
    shown = terminal.getvalue()
    assert "\x1b" not in shown
    assert "[1/2] step 1/2" in shown and "[2/2] step 2/2" in shown
    assert len([line for line in shown.splitlines() if line.endswith(".png")]) == 2


def test_a_terminal_with_stdout_in_a_file_keeps_the_live_bars(tmp_path, monkeypatch):
    monkeypatch.setenv("TERM", "xterm-256color")
    err = _Terminal()
    with open(tmp_path / "paths.txt", "w") as out:
        assert _run(tmp_path, monkeypatch, out, err) == 0
    assert "\x1b[" in err.getvalue() and "step 1/2" not in err.getvalue()  # drawn as bars, not lines
    assert len((tmp_path / "paths.txt").read_text().splitlines()) == 2


def _run_until_a_step_then(tmp_path, signum: int, preexec=None) -> tuple[int, str, list[str]]:
    """A batch subprocess (fake runner, 150 slow steps) sent ``signum`` once its first step is reported."""
    import subprocess

    from tests.test_batch_cli import _env, _script

    jobs = tmp_path / "jobs.toml"
    jobs.write_text('[[job]]\nmodel = "fake"\nsteps = 150\nbatch_count = 2\n[[job]]\nmodel = "fake"\nsteps = 2\n')
    cmd = _script(tmp_path)
    cmd[2] = str(jobs)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(tmp_path),
                            preexec_fn=preexec)
    lines = StderrLines(proc)
    try:
        lines.wait_for("[1/2] step 1/")
        proc.send_signal(signum)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return code, proc.stdout.read(), lines.rest()


@pytest.mark.parametrize(("name", "code", "said"), [("SIGHUP", 129, "the terminal closed (SIGHUP)"),
                                                    ("SIGTERM", 143, "SIGTERM")])
def test_a_closed_terminal_or_sigterm_stops_the_run_as_ctrl_c_does(tmp_path, name, code, said):
    """The default action killed the process at once: the job stayed 'running' in the database (the Queue
    screen showed it so) until a later start's recovery; now it is marked interrupted, as on Ctrl-C."""
    import signal

    from core.store import JobStore

    exit_code, stdout, stderr = _run_until_a_step_then(tmp_path, getattr(signal, name))
    assert exit_code == code, stderr
    assert stdout == ""
    assert any(f"darkroom: {said}; stopping the current job" in line for line in stderr), stderr
    assert any("job 1 marked interrupted; 1 job(s) not started" in line for line in stderr), stderr
    with JobStore(tmp_path / "db.sqlite3") as store:
        assert sorted(j.state for j in store.list_jobs()) == ["interrupted", "interrupted"]
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file() and p.name.startswith(".")]


def test_nohup_keeps_the_run_going_when_the_terminal_closes(tmp_path):
    """`nohup darkroom --batch ...` ignores SIGHUP: the handler is not installed over that."""
    import signal

    exit_code, stdout, stderr = _run_until_a_step_then(
        tmp_path, signal.SIGHUP, preexec=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    assert exit_code == 0, stderr
    assert len(stdout.splitlines()) == 3


def test_an_output_folder_named_in_another_encoding_is_refused_before_running(tmp_path, monkeypatch):
    """--output-dir $'caf\\xe9' (latin-1 bytes): the database refused the path, the worker failed to claim the
    job again and again (a traceback each time) and the run never ended."""
    folder = os.fsdecode(bytes(tmp_path) + b"/caf\xe9")
    err = io.StringIO()
    models = batch_models(tmp_path, monkeypatch)
    jobs = tmp_path / "jobs.toml"
    jobs.write_text(JOBS)
    code = run_batch(str(jobs), models_dirs=[models], output_dir=folder, db_path=tmp_path / "db.sqlite3",
                     runner_factory=RecordingRunner, stdout=io.StringIO(), stderr=err)
    assert code == 2
    assert err.getvalue() == (f"darkroom: error: --output-dir {tmp_path}/caf\\udce9: its name is not UTF-8 text, "
                              "and the job database records image paths as text: rename the folder or choose "
                              "another\n")


class _Exited(BaseException):
    """os._exit, made an exception: the run's quick way out, seen without ending the test process."""


class _SignalsItself(RecordingRunner):
    """Job 1 (150 steps) sends ``signum`` to this process after its first step, then steps on until the stop
    interrupts it (bounded, so a run that never stops it still ends)."""

    signum = 0

    def run(self, job, ctx):
        if job.request.steps != 150:
            return super().run(job, ctx)
        import time

        ctx.step(1, 150)
        os.kill(os.getpid(), self.signum)
        for i in range(2, 1000):
            ctx.step(min(i, 150), 150)
            time.sleep(0.01)
        return super().run(job, ctx)


@pytest.fixture
def signals_of_the_stop(tmp_path, monkeypatch):
    """Default SIGHUP/SIGTERM (as a shell gives them), os._exit recorded, and a hook that raises a signal in
    the main thread at a chosen point of the stop; restores every handler and stops the worker afterwards."""
    import signal

    from core.worker import Worker

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM)}
    for signum in (signal.SIGHUP, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)
    exits: list[int] = []

    def exit_now(code: int) -> None:
        exits.append(code)
        raise _Exited(code)

    monkeypatch.setattr(os, "_exit", exit_now)
    workers: list = []
    start, stop = Worker.start, Worker.stop  # before any hook replaces them

    def started(self, *args, **kwargs):
        workers.append(self)
        return start(self, *args, **kwargs)

    monkeypatch.setattr(Worker, "start", started)

    def raise_before(owner, name: str, signum: int) -> None:
        original = getattr(owner, name)

        def hooked(self, *args, **kwargs):
            signal.raise_signal(signum)  # its handler runs here, in the main thread, as a real one would
            return original(self, *args, **kwargs)

        monkeypatch.setattr(owner, name, hooked)

    def run(signum: int) -> tuple[object, str]:
        _SignalsItself.signum = signum
        models = batch_models(tmp_path, monkeypatch)
        jobs = tmp_path / "jobs.toml"
        jobs.write_text('[[job]]\nmodel = "fake"\nsteps = 150\n[[job]]\nmodel = "fake"\nsteps = 2\n')
        err = io.StringIO()
        try:
            outcome: object = run_batch(str(jobs), models_dirs=[models], output_dir=tmp_path / "out",
                                        db_path=tmp_path / "db.sqlite3", runner_factory=_SignalsItself,
                                        stdout=io.StringIO(), stderr=err)
        except _Exited as exc:
            outcome = f"os._exit({exc.args[0]})"
        except KeyboardInterrupt as exc:  # a Hangup let out of the stop (caught: pytest would end the session)
            outcome = exc
        return outcome, err.getvalue()

    try:
        yield raise_before, run, exits
    finally:
        for worker in workers:  # the quick way out leaves it running, as os._exit would have ended it
            stop(worker, finish_current=False, timeout=30)
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def _states(tmp_path) -> list[str]:
    from core.store import JobStore

    with JobStore(tmp_path / "db.sqlite3") as store:
        return sorted(j.state for j in store.list_jobs())


def test_the_shells_second_sighup_does_not_cut_the_stop_short(tmp_path, signals_of_the_stop):
    """A closed terminal sends SIGHUP twice (the kernel, then the shell to its jobs): the second, coming while
    the run waits for the job to stop, took the 'Ctrl-C again' way out (os._exit, the step not waited for)."""
    import signal

    from core.worker import Worker

    raise_before, run, exits = signals_of_the_stop
    raise_before(Worker, "stop", signal.SIGHUP)
    outcome, err = run(signal.SIGHUP)
    assert outcome == 129, err
    assert exits == []
    assert "job 1 marked interrupted; 1 job(s) not started" in err
    assert _states(tmp_path) == ["interrupted", "interrupted"]


def test_a_signal_handled_as_the_worker_starts_stops_the_run_like_a_later_one(tmp_path, monkeypatch,
                                                                            signals_of_the_stop):
    """On a busy box the job reached its first step (and its SIGHUP's handler ran) before ``worker.start()``
    returned, which was outside the run's stop: the Hangup left run_batch as a traceback, the job 'running'."""
    import signal

    from core.worker import Worker

    _, run, exits = signals_of_the_stop
    start = Worker.start  # the fixture's, which records the worker for its teardown

    def start_then_signal(self):
        start(self)
        signal.raise_signal(signal.SIGHUP)

    monkeypatch.setattr(Worker, "start", start_then_signal)
    monkeypatch.setattr(os, "kill", lambda pid, signum: None)  # the runner's own signal: this test sends it
    outcome, err = run(signal.SIGHUP)
    assert outcome == 129, err
    assert exits == []
    assert "marked interrupted" in err and _states(tmp_path) == ["interrupted", "interrupted"]


def test_a_signal_after_the_quick_way_out_is_chosen_does_not_stop_it(tmp_path, signals_of_the_stop):
    """SIGTERM, SIGTERM again while waiting (quit now), and a third (systemd's) while the not-started jobs are
    marked: the third raised out of the stop, so the interpreter exited under a worker in its step and the jobs
    after it stayed pending; now the run still records them and leaves by os._exit."""
    import signal

    from core.store import JobStore
    from core.worker import Worker

    raise_before, run, exits = signals_of_the_stop
    raise_before(Worker, "stop", signal.SIGTERM)
    raise_before(JobStore, "interrupt_pending", signal.SIGTERM)
    outcome, err = run(signal.SIGTERM)
    assert outcome == "os._exit(143)", err
    assert "job 1 marked interrupted; 1 job(s) not started" in err
    assert _states(tmp_path) == ["interrupted", "interrupted"]
