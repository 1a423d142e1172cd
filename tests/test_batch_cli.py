"""``darkroom --batch``: job files, presets, stdout contract and exit codes (0, 1, 2, 3, 130).

The pipeline is replaced by a fake runner: in-process through ``run_batch(runner_factory=...)``, and in
subprocesses through a small script that calls ``run_batch`` the same way. Usage errors go through the real
``python -m cli.main`` entry point.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cli.batch import run_batch
from core.errors import CheckpointError
from core.store import JobStore
from tests.batch_harness import RecordingRunner, StderrLines, batch_runner, default_sigint
from tests.family_files import write_header_only

REPO = Path(__file__).resolve().parents[1]


class FakeRunner(RecordingRunner):
    """Prompt "cancel-next:<db>" cancels the next job from another window, "badmodel" raises CheckpointError
    before any step, "boom" raises after the steps."""

    seen: list = []

    def before_steps(self, job):
        if job.request.prompt.startswith("cancel-next:"):
            other = JobStore(job.request.prompt.split(":", 1)[1])
            assert other.cancel(job.id + 1)
            other.close()
        if "badmodel" in job.request.prompt:
            raise CheckpointError(job.request.model, "is not a Stable Diffusion checkpoint")

    def after_steps(self, job):
        if "boom" in job.request.prompt:
            raise RuntimeError("boom")


@pytest.fixture
def setup(tmp_path, monkeypatch):
    run = batch_runner(tmp_path, monkeypatch, FakeRunner)

    def write(name: str, text: str) -> str:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return str(path)

    return run, write, tmp_path


def paths_of(stdout: str) -> list[Path]:
    lines = stdout.splitlines()
    assert all(Path(line).is_file() and line.endswith(".png") for line in lines), stdout
    return [Path(line) for line in lines]


def test_toml_jobs_succeed_and_stdout_has_only_paths(setup):
    run, write, tmp_path = setup
    jobs = write(
        "jobs.toml",
        """
        [[job]]
        model = "fake"
        prompt = "a lighthouse"
        steps = 2
        batch_size = 2

        [[job]]
        model = "fake.safetensors"
        prompt = "a harbour"
        steps = 3
        seed = 77
        """,
    )
    code, out, err = run(jobs)
    assert code == 0, err
    paths = paths_of(out)
    assert len(paths) == 3
    assert all(p.is_relative_to(tmp_path / "out") for p in paths)
    assert paths[2].name.endswith("-77.png")
    assert "step 2/2" in err and "2 of 2 job(s) succeeded" in err
    # the batch went through the shared database, under a queue of its own
    with JobStore(tmp_path / "db.sqlite3") as store:
        jobs_done = store.list_jobs(states=["done"])
        assert len(jobs_done) == 2 and jobs_done[0].queue.startswith("batch-")
        assert {h.path for h in store.history()} == {str(p) for p in paths}


def test_failed_job_gives_exit_1_and_other_jobs_still_run(setup):
    run, write, _ = setup
    jobs = write(
        "jobs.jsonl",
        '{"model": "fake", "prompt": "boom", "steps": 1}\n\n{"model": "fake", "prompt": "fine", "steps": 1}\n',
    )
    code, out, err = run(jobs)
    assert code == 1
    assert len(paths_of(out)) == 1
    assert "[1/2] failed: internal error: RuntimeError: boom" in err
    assert "Traceback" not in err


def test_unloadable_model_gives_exit_3(setup):
    run, write, _ = setup
    jobs = write(
        "jobs.toml", '[[job]]\nmodel = "fake"\nprompt = "badmodel"\n[[job]]\nmodel = "fake"\nsteps = 1\n'
    )
    code, out, err = run(jobs)
    assert code == 3
    assert "is not a Stable Diffusion checkpoint" in err
    assert len(paths_of(out)) == 1  # the other job still ran


def test_missing_model_gives_exit_3_before_anything_runs(setup):
    run, write, tmp_path = setup
    jobs = write("jobs.toml", '[[job]]\nmodel = "fake"\n[[job]]\nmodel = "dreamshaper_8"\n')
    code, out, err = run(jobs)
    assert code == 3
    assert out == ""
    assert "job 2" in err and "dreamshaper_8" in err
    assert FakeRunner.seen == []


def test_every_job_s_missing_model_is_named_in_one_go(setup):
    # a jobs file with several mistyped names is fixed in one edit; a [defaults] model's typo is one line
    run, write, _ = setup
    jobs = write("jobs.toml", '[defaults]\nmodel = "fkae"\n[[job]]\n[[job]]\n[[job]]\nmodel = "fake"\n'
                 '[[job]]\nmodel = "fake"\nprompt = "<lora:nope:1>"\n[[job]]\n[[job]]\nmodel = "dreamshaper_8"\n')
    code, out, err = run(jobs)
    assert code == 3 and out == "" and FakeRunner.seen == []
    lines = err.splitlines()
    assert len(lines) == 4, err
    assert lines[0].startswith(f"darkroom: error: {jobs}: jobs 1, 2 and 5: checkpoint 'fkae' not found in ")
    assert lines[1].startswith(f"darkroom: error: {jobs}: job 4: LoRA 'nope' not found")
    assert lines[2].startswith(f"darkroom: error: {jobs}: job 6: checkpoint 'dreamshaper_8' not found in ")
    assert lines[3] == "darkroom: error: (nothing was run: 5 of 6 jobs name a model that cannot be used)"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[[job]]\nmodel = "fake"\nsteps = \n', ["not valid TOML"]),
        ('[[job]]\nmodel = "fake"\n[[job]]\nmodel = "fake"\nstepz = 3\n', ["job 2", "stepz", "steps"]),
        ('[[job]]\nmodel = "fake"\nsteps = 0\n', ["job 1", "steps", "0", "from 1 to 150"]),
        ('[[job]]\nmodel = "fake"\nsampler = "euler_z"\n', ["sampler", "euler_z", "dpmpp_2m"]),
        ('[[job]]\nmodel = "fake"\npreset = "no-such-preset"\n', ["job 1", "no-such-preset"]),
        ('[[job]]\nprompt = "no model"\n', ["job 1", "model", "required"]),
        ('title = "x"\n', ["unknown top-level key 'title'"]),
        # a first jobs file without its [[job]] header: where the fields go
        ('model = "fake"\nprompt = "a fox"\n', ["'model', 'prompt' are job fields at the top level",
                                                 "put a [[job]] line above a job's fields"]),
        ('steps = 4\n[[job]]\nmodel = "fake"\n', ["'steps' is a job field at the top level", "[defaults]"]),
        ("# nothing here\n", ["no jobs found"]),
    ],
)
def test_input_errors_give_exit_2_naming_file_job_field_value(setup, text, expected):
    run, write, _ = setup
    jobs = write("jobs.toml", text)
    code, out, err = run(jobs)
    assert code == 2
    assert out == ""
    assert err.startswith(f"darkroom: error: {jobs}: ")
    for part in expected:
        assert part in err
    assert FakeRunner.seen == []


def test_every_invalid_job_is_reported_in_one_run(setup):
    run, write, _ = setup
    jobs = write("jobs.toml", '[[job]]\nmodel = "fake"\nsteps = 0\n[[job]]\nmodel = "fake"\n'
                              '[[job]]\nmodel = "fake"\nsampler = "euler_z"\n')
    code, out, err = run(jobs)
    assert code == 2 and out == ""
    lines = err.splitlines()
    assert lines[0].startswith(f"darkroom: error: {jobs}: job 1: steps = 0")
    assert lines[1].startswith(f"darkroom: error: {jobs}: job 3: sampler = 'euler_z'")
    assert lines[2] == "darkroom: error: (nothing was run: 2 of 3 jobs are invalid)"
    assert FakeRunner.seen == []


def test_jsonl_error_names_the_line(setup):
    run, write, _ = setup
    jobs = write("jobs.jsonl", '{"model": "fake"}\n{"model": "fake", "cfg": "high"}\n')
    code, _, err = run(jobs)
    assert code == 2
    assert "line 2" in err and "cfg" in err and "'high'" in err


def test_stdin_jsonl_and_toml(setup):
    run, _, _ = setup
    code, out, err = run("-", stdin='{"model": "fake", "steps": 1, "prompt": "from stdin"}\n')
    assert code == 0, err
    assert len(paths_of(out)) == 1
    assert FakeRunner.seen[-1].prompt == "from stdin"
    code, out, err = run("-", stdin='[[job]]\nmodel = "fake"\nsteps = 1\nprompt = "toml stdin"\n')
    assert code == 0, err
    assert FakeRunner.seen[-1].prompt == "toml stdin"
    code, out, err = run("-", stdin="[[job]\n")
    assert code == 2 and "<stdin>" in err


def test_preset_layers_defaults_preset_job(setup):
    run, write, _ = setup
    from core.presets import find_preset

    preset = find_preset("sd15-fast-ays").fields
    jobs = write(
        "jobs.toml",
        """
        [defaults]
        model = "fake"
        cfg = 3.0
        steps = 30
        negative_prompt = "blurry"

        [[job]]
        preset = "sd15-fast-ays"
        steps = 2

        [[job]]
        steps = 1
        """,
    )
    code, _, err = run(jobs)
    assert code == 0, err
    first, second = FakeRunner.seen
    assert first.steps == 2  # job beats preset
    assert first.sampler == preset["sampler"] and first.schedule == preset["schedule"]
    assert first.cfg == preset["cfg"] != 3.0  # preset beats [defaults]
    assert first.negative_prompt == "blurry"  # [defaults] beats request defaults
    assert (second.cfg, second.steps, second.sampler) == (3.0, 1, "euler")


# ---- subprocesses -----------------------------------------------------------------------------------------------

SCRIPT = """
import json, sys, time
sys.path.insert(0, {repo!r})
from PIL import Image
from cli.batch import run_batch
from core.worker import GeneratedImage

class Slow:
    def run(self, job, ctx):
        for i in range(1, job.request.steps + 1):
            time.sleep(0.02)
            ctx.step(i, job.request.steps)
        return [GeneratedImage(Image.new("RGB", (8, 8)), s, job.request) for s in job.request.image_seeds()]

jobs, models, out, db, report = sys.argv[1:6]
code = run_batch(jobs, models_dirs=[models], output_dir=out, db_path=db, runner_factory=Slow)
with open(report, "w") as f:
    json.dump({{"textual": "textual" in sys.modules, "rich": "rich" in sys.modules}}, f)
sys.exit(code)
"""


def _script(tmp_path: Path) -> list[str]:
    script = tmp_path / "batch_script.py"
    script.write_text(SCRIPT.format(repo=str(REPO)))
    models = tmp_path / "models"
    models.mkdir(exist_ok=True)
    write_header_only(models / "fake.safetensors", "sd15")
    return [
        sys.executable,
        str(script),
        "JOBS",
        str(models),
        str(tmp_path / "out"),
        str(tmp_path / "db.sqlite3"),
        str(tmp_path / "report.json"),
    ]


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ, DARKROOM_HOME=str(tmp_path / "home"), PYTHONPATH=str(REPO))
    env.pop("DARKROOM_MODELS", None)
    return env


def test_subprocess_stdout_is_paths_only(tmp_path):
    jobs = tmp_path / "jobs.toml"
    jobs.write_text('[[job]]\nmodel = "fake"\nsteps = 2\nbatch_count = 2\n')
    cmd = _script(tmp_path)
    cmd[2] = str(jobs)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(tmp_path), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(paths_of(proc.stdout)) == 2
    assert "step 2/2" in proc.stderr


def test_sigint_exits_130_marks_current_interrupted_and_keeps_queue(tmp_path):
    jobs = tmp_path / "jobs.toml"
    jobs.write_text('[[job]]\nmodel = "fake"\nsteps = 150\n[[job]]\nmodel = "fake"\nsteps = 2\n')
    cmd = _script(tmp_path)
    cmd[2] = str(jobs)
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(tmp_path), preexec_fn=default_sigint
    )
    lines = StderrLines(proc)
    try:
        lines.wait_for("[1/2] step 1/150")
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 130
    assert proc.stdout.read() == ""
    rest = lines.rest()
    assert any("job 1 marked interrupted; 1 job(s) not started, marked interrupted" in line for line in rest), rest
    with JobStore(tmp_path / "db.sqlite3") as store:
        states = [j.state for j in sorted(store.list_jobs(), key=lambda j: j.id)]
        assert states == ["interrupted", "interrupted"]  # retryable from the TUI


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--batch", "missing.toml"], 2, "missing.toml: jobs file not found"),
        (["--batch", "BAD"], 2, "stepz"),
        (["--batch", "NOMODEL"], 3, "nothing_like_this"),
        (["--bogus-flag"], 2, "unrecognized arguments"),
    ],
)
def test_entry_point_exit_codes(tmp_path, args, code, message):
    (tmp_path / "bad.toml").write_text('[[job]]\nmodel = "x"\nstepz = 1\n')
    (tmp_path / "nomodel.toml").write_text('[[job]]\nmodel = "nothing_like_this"\n')
    args = [
        {"BAD": str(tmp_path / "bad.toml"), "NOMODEL": str(tmp_path / "nomodel.toml")}.get(a, a) for a in args
    ]
    models = tmp_path / "models"
    models.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "cli.main", *args, "--models-dir", str(models), "--db", str(tmp_path / "db")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=_env(tmp_path),
        timeout=120,
    )
    assert proc.returncode == code, proc.stderr
    assert message in proc.stderr
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr


def test_version():
    proc = subprocess.run(
        [sys.executable, "-m", "cli.main", "--version"], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert proc.returncode == 0
    assert proc.stdout.startswith("darkroom ")


def test_rich_progress_mode_keeps_stdout_clean(setup, tmp_path):
    _, write, _ = setup
    jobs = write("jobs.toml", '[[job]]\nmodel = "fake"\nsteps = 2\nprompt = "[bold]not markup[/bold]"\n')
    out, err = io.StringIO(), io.StringIO()
    code = run_batch(
        jobs,
        models_dirs=[tmp_path / "models"],
        output_dir=tmp_path / "out",
        db_path=tmp_path / "db.sqlite3",
        runner_factory=FakeRunner,
        stdout=out,
        stderr=err,
        rich_progress=True,
    )
    assert code == 0, err.getvalue()
    assert len(paths_of(out.getvalue())) == 1
    assert "[bold]not markup[/bold]" in err.getvalue()  # user text printed literally


def test_a_jobs_file_not_found_names_the_folder_and_a_close_name(setup, monkeypatch):
    run, write, tmp_path = setup
    write("jobs.toml", '[[job]]\nmodel = "fake"\n')
    monkeypatch.chdir(tmp_path)
    code, out, err = run("jobs.tmol")
    assert code == 2 and out == ""
    assert err.strip() == f"darkroom: error: jobs.tmol: jobs file not found in {tmp_path}; did you mean jobs.toml?"
    code, _, err = run(str(tmp_path / "other.toml"))
    assert err.strip() == f"darkroom: error: {tmp_path / 'other.toml'}: jobs file not found"  # nothing close


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _screen(raw: str) -> list[str]:
    """The lines a terminal shows after ``raw``: as much of one as Rich's live display uses (CR, LF, cursor up,
    erase line, column); colours and cursor visibility are ignored."""
    import re

    lines, row, col = [""], 0, 0
    for match in re.finditer(r"\x1b\[([0-9;?]*)([A-Za-z])|\r|\n|[^\x1b\r\n]+|\x1b", raw):
        token, code = match.group(0), match.group(2)
        if code == "A":
            row = max(row - int(match.group(1) or 1), 0)
        elif code == "K":
            lines[row] = "" if match.group(1) == "2" else lines[row][:col]
        elif code == "G":
            col = int(match.group(1) or 1) - 1
        elif token == "\r":
            col = 0
        elif token == "\n":
            row, col = row + 1, 0
            lines.extend([""] * (row + 1 - len(lines)))
        elif not token.startswith("\x1b"):
            line = lines[row].ljust(col)
            lines[row] = line[:col] + token + line[col + len(token):]
            col += len(token)
    return lines


def test_paths_on_the_terminal_of_the_progress_bars_stay_on_screen(setup, tmp_path):
    """stdout and stderr on one terminal (a user running --batch by hand): the live bars' redraws erased the
    path lines printed beside them; they are printed above the bars now."""
    _, write, _ = setup
    jobs = write("jobs.toml", '[defaults]\nmodel = "fake"\nsteps = 2\n' + '[[job]]\nprompt = "x"\n' * 4)
    terminal = _Terminal()
    code = run_batch(jobs, models_dirs=[tmp_path / "models"], output_dir=tmp_path / "out",
                     db_path=tmp_path / "db.sqlite3", runner_factory=FakeRunner, stdout=terminal, stderr=terminal,
                     rich_progress=True)
    assert code == 0
    shown = _screen(terminal.getvalue())
    saved = sorted(str(p) for p in (tmp_path / "out").rglob("*.png"))
    assert len(saved) == 4
    assert sorted(line.strip() for line in shown if line.strip().endswith(".png")) == saved


def test_job_cancelled_from_another_window_does_not_hang_the_batch(setup):
    run, write, tmp_path = setup
    db = tmp_path / "db.sqlite3"
    jobs = write(
        "jobs.toml",
        f'[[job]]\nmodel = "fake"\nsteps = 1\nprompt = "cancel-next:{db}"\n'
        '[[job]]\nmodel = "fake"\nsteps = 1\n[[job]]\nmodel = "fake"\nsteps = 1\n',
    )
    code, out, err = run(jobs)
    assert code == 1
    assert len(paths_of(out)) == 2
    assert "[2/3] failed: cancelled from another window" in err
    assert len(FakeRunner.seen) == 2


def test_a_symlinked_model_given_as_a_relative_path_keeps_its_name(setup):
    run, write, tmp_path = setup
    target = tmp_path / "store" / "3f9a1c.safetensors"
    target.parent.mkdir()
    write_header_only(target, "sd15")
    (tmp_path / "dreamy.safetensors").symlink_to(target)
    jobs = write("jobs.toml", """
        [[job]]
        model = "./dreamy.safetensors"
        steps = 1
        """)
    code, out, err = run(jobs)
    assert code == 0, err
    assert FakeRunner.seen[0].model == str(tmp_path / "dreamy.safetensors")  # not the link's target
    from PIL import Image

    from core.metadata import parse_infotext

    with Image.open(paths_of(out)[0]) as image:
        assert parse_infotext(image.text["parameters"])["Model"] == "dreamy"  # A1111's Model entry


class WarningRunner(RecordingRunner):
    """Logs a core warning mid-job, with a control character in it, as a pipeline stage would."""

    def before_steps(self, job) -> None:
        import logging

        logging.getLogger("core.pipeline").warning("the mask was scaled to \x1b[2J%s", "64x64")


def test_core_warnings_during_a_job_are_darkroom_warning_lines(tmp_path, monkeypatch):
    import logging

    run = batch_runner(tmp_path, monkeypatch, WarningRunner)
    jobs = tmp_path / "jobs.toml"
    jobs.write_text('[[job]]\nmodel = "fake"\nprompt = "a cat"\nsteps = 1\n')
    code, out, err = run(str(jobs))
    assert code == 0, err
    # the jobs file named as in the warnings before the run, so one grep finds both
    assert f"darkroom: warning: {jobs}: job 1: the mask was scaled to \\x1b[2J64x64" in err
    assert "\x1b" not in err
    # the worker's handler goes with the job: nothing of it stays on the core's logger
    assert not logging.getLogger("core").handlers


class CacheWarningRunner(RecordingRunner):
    """Logs the few-step cache warning while the job runs, as the pipeline does for every job."""

    def before_steps(self, job) -> None:
        import logging

        from core.accel.cache_options import cache_warnings

        for warning in cache_warnings(job.request):
            logging.getLogger("core.pipeline").warning("%s", warning)


def test_a_warning_said_before_the_run_is_not_repeated_by_the_run(tmp_path, monkeypatch):
    run = batch_runner(tmp_path, monkeypatch, CacheWarningRunner)
    jobs = tmp_path / "jobs.toml"
    jobs.write_text('[[job]]\nmodel = "fake"\nprompt = "a cat"\nsteps = 3\ndeepcache_interval = 2\n')
    code, out, err = run(str(jobs))
    assert code == 0, err
    assert err.count("DeepCache with 3 steps") == 1, err
    assert f"darkroom: warning: {jobs}: job 1: DeepCache with 3 steps" in err
