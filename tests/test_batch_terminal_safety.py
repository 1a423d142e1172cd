"""``darkroom --batch`` stderr, plain and Rich: prompts, model and file names, jobs-file field names, tensor
names in errors and warnings are printed with control characters made visible (core.text.visible)."""

from __future__ import annotations

import io
import textwrap
import unicodedata

import pytest

from cli.batch import run_batch
from core.errors import CheckpointError
from tests.batch_harness import RecordingRunner, batch_runner
from tests.family_files import write_header_only

EVIL = "\x1b]0;pwned\x07\x1b[2J"  # sets the terminal's title, then clears the screen
SHOWN = "\\x1b]0;pwned\\x07\\x1b[2J"
TOML_EVIL = "\\u001b]0;pwned\\u0007\\u001b[2J"  # the same, written in a TOML string
MODEL = f"ev{EVIL}\u202eil.safetensors"
MODEL_SHOWN = f"ev{SHOWN}\\u202eil.safetensors"
# controls without square brackets, for text inside a [from:to:when] group
BARE_TOML_EVIL, BARE_SHOWN = "\\u001b7\\u0007", "\\x1b7\\x07"


class FailingRunner(RecordingRunner):
    seen: list = []

    def after_steps(self, job):
        if "fail" in job.request.prompt:
            raise CheckpointError(job.request.model, f"tensor model.{EVIL}.weight has the wrong shape")


def raw_controls(text: str) -> list[str]:
    return [ch for ch in text if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp") and ch != "\n"]


@pytest.fixture
def batch(tmp_path, monkeypatch):
    """``run(jobs_toml, rich) -> (code, stdout, stderr)``, with a hostile model file in the models folder."""
    plain = batch_runner(tmp_path, monkeypatch, FailingRunner)
    write_header_only(tmp_path / "models" / MODEL, "sd15")

    def run(text: str, rich: bool, name: str = "jobs.toml") -> tuple[int, str, str]:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        if not rich:
            return plain(str(path))
        out, err = io.StringIO(), io.StringIO()
        code = run_batch(str(path), models_dirs=[tmp_path / "models"], output_dir=tmp_path / "out",
                         db_path=tmp_path / "db.sqlite3", runner_factory=FailingRunner, stdout=out,
                         stderr=err, rich_progress=True)
        return code, out.getvalue(), err.getvalue()

    return run


@pytest.mark.parametrize("rich", [False, True], ids=["plain", "rich"])
def test_prompts_model_names_warnings_and_errors(batch, rich):
    code, out, err = batch(
        f"""
        [[job]]
        model = "ev{TOML_EVIL}\\u202eil.safetensors"
        prompt = "a fox {TOML_EVIL} [x{BARE_TOML_EVIL}:y:0.5"
        steps = 1
        [[job]]
        model = "ev{TOML_EVIL}\\u202eil.safetensors"
        prompt = "fail {TOML_EVIL}"
        steps = 1
        """,
        rich,
    )
    assert code == 3, err  # the second job's checkpoint error
    assert raw_controls(err) == []
    words = "".join(err.split())  # Rich wraps long lines at its width

    def shown(piece: str) -> bool:
        return "".join(piece.split()) in words

    assert shown(f'"a fox {SHOWN}')  # the started line's prompt
    assert shown(MODEL_SHOWN)  # its model
    assert shown(f"[x{BARE_SHOWN}:y:0.5 in the prompt")  # the warning (an unclosed edit) quotes the prompt
    assert shown(f"{MODEL_SHOWN}: tensor model.{SHOWN}.weight has the wrong shape")  # the job's error
    assert len(out.splitlines()) == 1  # stdout: the first job's image path, untouched


@pytest.mark.parametrize("rich", [False, True], ids=["plain", "rich"])
def test_a_hostile_field_name_in_the_jobs_file(batch, rich):
    code, _, err = batch(f'[[job]]\nmodel = "x"\n"st{TOML_EVIL}eps" = 3\n', rich)
    assert code == 2
    assert raw_controls(err) == []
    assert f"st{SHOWN}eps = 3 is invalid" in err


def test_a_hostile_jobs_file_name(batch):
    code, _, err = batch("not [valid toml", rich=False, name=f"jobs{EVIL}.toml")
    assert code == 2
    assert raw_controls(err) == []
    assert f"jobs{SHOWN}.toml: not valid TOML" in err


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal", [False, True], ids=["pipe", "terminal"])
def test_image_paths_are_raw_on_a_pipe_and_visible_on_a_terminal(tmp_path, monkeypatch, terminal):
    batch_runner(tmp_path, monkeypatch, FailingRunner)  # the private home and models folder
    jobs = tmp_path / "jobs.toml"
    jobs.write_text('[[job]]\nmodel = "fake"\nsteps = 1\n', encoding="utf-8")
    out = _Terminal() if terminal else io.StringIO()
    code = run_batch(str(jobs), models_dirs=[tmp_path / "models"], output_dir=tmp_path / f"out{EVIL}",
                     db_path=tmp_path / "db.sqlite3", runner_factory=FailingRunner, stdout=out,
                     stderr=io.StringIO(), rich_progress=False)
    assert code == 0
    (line,) = out.getvalue().splitlines()
    assert (f"out{SHOWN}" in line) if terminal else (f"out{EVIL}" in line)  # a pipe gets the real path


@pytest.mark.parametrize("rich", [False, True], ids=["plain", "rich"])
def test_emoji_codes_in_a_prompt_stay_as_written(batch, rich):
    # "[cat:dog:0.5]" is A1111 prompt editing; Rich's emoji codes would print it as "[cat🐶0.5]"
    code, _, err = batch(
        f"""
        [[job]]
        model = "ev{TOML_EVIL}\\u202eil.safetensors"
        prompt = "[cat:dog:0.5] :smile: face"
        steps = 1
        """,
        rich,
    )
    assert code == 0, err
    assert "[cat:dog:0.5] :smile: face" in " ".join(err.split())
