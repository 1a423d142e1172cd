"""Regression tests for problems found by using ``darkroom --batch`` the way a user would.

Each test names the behaviour a user relies on; the fake runner keeps them fast (no torch models).
"""

from __future__ import annotations

import io
import os
import stat
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from cli.batch import run_batch
from tests.batch_harness import RecordingRunner, StderrLines, batch_runner, default_sigint
from tests.family_files import write_header_only


@pytest.fixture
def batch(tmp_path, monkeypatch):
    return batch_runner(tmp_path, monkeypatch, RecordingRunner), tmp_path


def _write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return str(path)


# ---- init_image paths ------------------------------------------------------------------------------------------


def test_relative_init_image_is_taken_from_the_jobs_file_folder(batch, monkeypatch):
    run, tmp_path = batch
    project = tmp_path / "project"
    (project / "inputs").mkdir(parents=True)
    Image.new("RGB", (64, 64), "red").save(project / "inputs" / "start.png")
    jobs = _write(
        project / "jobs.toml",
        """
        [[job]]
        model = "fake"
        steps = 1
        init_image = "inputs/start.png"
        denoise = 0.5
        """,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the user runs the batch from some other folder
    code, out, err = run(jobs)
    assert code == 0, err
    # the stored (and PNG-recorded) request carries the absolute path, so "generate again" works anywhere
    assert RecordingRunner.seen[0].init_image == str((project / "inputs" / "start.png").resolve())


def test_relative_model_and_vae_paths_are_taken_from_the_jobs_file_folder(batch, monkeypatch):
    run, tmp_path = batch
    project = tmp_path / "project"
    (project / "ckpt").mkdir(parents=True)
    write_header_only(project / "ckpt" / "mine.safetensors", "sd15")
    (tmp_path / "vaes").mkdir()
    write_header_only(tmp_path / "vaes" / "v.safetensors", "vae")
    jobs = _write(
        project / "jobs.toml",
        """
        [[job]]
        model = "./ckpt/mine.safetensors"
        vae = "../vaes/v.safetensors"
        steps = 1

        [[job]]
        model = "fake"
        steps = 1
        """,
    )
    monkeypatch.chdir(tmp_path / "vaes")  # anywhere else
    code, _, err = run(jobs)
    assert code == 0, err
    first, second = RecordingRunner.seen
    assert first.model == str((project / "ckpt" / "mine.safetensors").resolve())
    assert first.vae == str((tmp_path / "vaes" / "v.safetensors").resolve())
    assert second.model == "fake"  # a name in the models folders stays a name


def test_stdin_init_image_is_relative_to_the_current_folder(batch, monkeypatch):
    run, tmp_path = batch
    Image.new("RGB", (64, 64)).save(tmp_path / "here.png")
    monkeypatch.chdir(tmp_path)
    code, _, err = run("-", stdin='{"model": "fake", "steps": 1, "init_image": "here.png"}\n')
    assert code == 0, err
    assert RecordingRunner.seen[0].init_image == str((tmp_path / "here.png").resolve())


def test_empty_init_image_means_txt2img(batch):
    run, tmp_path = batch
    Image.new("RGB", (64, 64)).save(tmp_path / "start.png")
    jobs = _write(
        tmp_path / "jobs.toml",
        '[defaults]\ninit_image = "start.png"\n[[job]]\nmodel = "fake"\nsteps = 1\ninit_image = ""\n',
    )
    code, _, err = run(jobs)
    assert code == 0, err
    assert RecordingRunner.seen[0].init_image is None and not RecordingRunner.seen[0].is_img2img


def test_missing_init_image_is_an_input_error_before_anything_runs(batch):
    run, tmp_path = batch
    jobs = _write(
        tmp_path / "jobs" / "jobs.toml",
        """
        [[job]]
        model = "fake"
        steps = 1

        [[job]]
        model = "fake"
        init_image = "nope.png"
        """,
    )
    code, out, err = run(jobs)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "job 2" in err and "init_image" in err and str(tmp_path / "jobs" / "nope.png") in err
    assert RecordingRunner.seen == []


def test_init_image_that_is_not_an_image_is_an_input_error_before_anything_runs(batch):
    run, tmp_path = batch
    (tmp_path / "notes.png").write_text("not a picture")
    jobs = _write(
        tmp_path / "jobs.toml",
        '[[job]]\nmodel = "fake"\nsteps = 1\n[[job]]\nmodel = "fake"\ninit_image = "notes.png"\n',
    )
    code, out, err = run(jobs)
    assert code == 2 and out == ""
    assert "job 2" in err and "init_image = 'notes.png'" in err and "is not one" in err
    assert RecordingRunner.seen == []


# ---- misspellings get a suggestion --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "field", "meant"),
    [
        ('sampler = "euler_a"', "sampler", "euler_ancestral"),  # sd.cpp's name
        ('sampler = "Euler a"', "sampler", "euler_ancestral"),  # A1111's label
        ('sampler = "DPM++ 2M"', "sampler", "dpmpp_2m"),
        ('sampler = "dpmpp2m"', "sampler", "dpmpp_2m"),
        ('schedule = "Karras"', "schedule", "karras"),
        ('schedule = "Align Your Steps"', "schedule", "ays"),
        ("stepz = 3", "stepz", "steps"),
        ('presett = "sd15-balanced"', "presett", "preset"),  # a jobs file's own keys are offered too
        ('from_imge = "x.png"', "from_imge", "from_image"),
        ('scheduler = "karras"', "scheduler", "schedule"),  # ComfyUI's field name
        ("cfg_scale = 5", "cfg_scale", "cfg"),  # A1111 API's field name
        ('negative = "blur"', "negative", "negative_prompt"),
        ("hires = { scale = 2, upscalr = 'latent' }", "hires.upscalr", "upscaler"),
    ],
)
def test_misspelled_names_suggest_the_close_match(batch, line, field, meant):
    run, tmp_path = batch
    jobs = _write(tmp_path / "jobs.toml", f'[[job]]\nmodel = "fake"\n{line}\n')
    code, out, err = run(jobs)
    assert code == 2 and out == ""
    assert err.startswith(f"darkroom: error: {jobs}: job 1: {field} = ")
    assert f"did you mean {meant!r}?" in err
    assert err.count("\n") == 1


def test_no_suggestion_when_nothing_is_close(batch):
    run, tmp_path = batch
    jobs = _write(tmp_path / "jobs.toml", '[[job]]\nmodel = "fake"\nsampler = "zzz"\n')
    code, _, err = run(jobs)
    assert code == 2
    assert "did you mean" not in err and "euler_ancestral" in err  # the valid list is still there


# ---- folder options are checked before anything runs -------------------------------------------------------


def _run_with(tmp_path, jobs: str, **kwargs) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    options = {"models_dirs": [tmp_path / "models"], "output_dir": tmp_path / "out", **kwargs}
    code = run_batch(
        jobs, db_path=tmp_path / "db.sqlite3", runner_factory=RecordingRunner, stdout=out, stderr=err, **options
    )
    return code, out.getvalue(), err.getvalue()


def test_missing_models_dir_is_a_usage_error_naming_it(batch):
    _, tmp_path = batch
    jobs = _write(tmp_path / "jobs.toml", '[[job]]\nmodel = "fake"\nsteps = 1\n')
    code, out, err = _run_with(tmp_path, jobs, models_dirs=[tmp_path / "models", tmp_path / "modles"])
    assert code == 2 and out == ""
    assert err == f"darkroom: error: --models-dir {tmp_path / 'modles'}: no such folder\n"
    assert RecordingRunner.seen == []


def test_output_dir_that_is_a_file_fails_before_generating(batch):
    _, tmp_path = batch
    jobs = _write(tmp_path / "jobs.toml", '[[job]]\nmodel = "fake"\nsteps = 1\n')
    code, out, err = _run_with(tmp_path, jobs, output_dir=jobs)
    assert code == 2 and out == ""
    assert err.startswith(f"darkroom: error: --output-dir {jobs}: cannot create the folder")
    assert "a file, not a folder" in err
    assert RecordingRunner.seen == []  # no job spent time generating an image it could not save


def test_output_dir_is_created_when_missing(batch):
    _, tmp_path = batch
    jobs = _write(tmp_path / "jobs.toml", '[[job]]\nmodel = "fake"\nsteps = 1\n')
    code, out, err = _run_with(tmp_path, jobs, output_dir=tmp_path / "new" / "deeper")
    assert code == 0, err
    assert Path(out.strip()).is_relative_to(tmp_path / "new" / "deeper")


# ---- saved images get ordinary file permissions ------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "umask") or os.name != "posix", reason="POSIX permissions")
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_png_has_the_users_default_permissions(tmp_path, umask):
    from core.metadata import read_request, save_image
    from core.request import GenerationRequest

    old = os.umask(umask)
    try:
        path = save_image(Image.new("RGB", (8, 8)), GenerationRequest(model="m", seed=3), 3, tmp_path)
    finally:
        os.umask(old)
    # like any file the user creates (A1111 and ComfyUI outputs are 0644 under the usual umask), not mkstemp's 0600
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert read_request(path).seed == 3
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp or claim files left behind


# ---- progress shows prompts as written -----------------------------------------------------------------------


def test_progress_shows_the_prompt_as_written_on_one_line(batch):
    run, tmp_path = batch
    # TOML "\\(" is the two characters \( : A1111's escaped parenthesis
    jobs = _write(
        tmp_path / "jobs.toml",
        '[[job]]\nmodel = "fake"\nsteps = 1\nprompt = "a \\\\(hat\\\\), (red:1.2)\\nsecond\\u001b[31m line"\n',
    )
    code, _, err = run(jobs)
    assert code == 0, err
    started = next(line for line in err.splitlines() if "started:" in line)
    assert started.endswith('"a \\(hat\\), (red:1.2) second\\x1b[31m line"')  # the ESC shown, not obeyed
    assert "\x1b" not in err


# ---- switching only the VAE keeps the loaded checkpoint ------------------------------------------------------


def test_switching_the_vae_reloads_only_the_vae(tmp_path, monkeypatch):
    import numpy as np
    import torch
    from safetensors.torch import load_file, save_file

    import core.pipeline as pipeline
    from core.models.testing import write_random_checkpoint
    from core.request import GenerationRequest

    models = tmp_path / "models"
    write_random_checkpoint(models / "checkpoints" / "tiny.safetensors", "sd15", "tiny", seed=0)
    donor = tmp_path / "donor.safetensors"
    write_random_checkpoint(donor, "sd15", "tiny", seed=1)
    vae_keys = {k: v for k, v in load_file(donor).items() if k.startswith("first_stage_model.")}
    (models / "vae").mkdir()
    save_file(vae_keys, models / "vae" / "other-vae.safetensors")

    loads = []
    real_load = pipeline.load_model
    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: loads.append(a) or real_load(*a, **k))

    def vae_weights(runner, vae):
        req = GenerationRequest(model="tiny", prompt="a cat", vae=vae, width=64, height=64)
        model = runner.ensure_model(req)
        runner.cache.encode(model, req.prompt, req.clip_skip)
        return {k: v.clone() for k, v in model.checkpoint.vae.state_dict().items()}

    def same(a, b):
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    runner = pipeline.PipelineRunner([models], previews=False)
    own = vae_weights(runner, None)
    swapped = vae_weights(runner, "other-vae")
    back = vae_weights(runner, None)
    assert len(loads) == 1  # one checkpoint load for all three jobs
    assert (runner.cache.misses, runner.cache.hits) == (1, 2)  # the prompt was encoded once
    assert same(back, own) and not same(swapped, own)
    # the swapped-in VAE is exactly what loading checkpoint + VAE from scratch gives
    assert same(swapped, vae_weights(pipeline.PipelineRunner([models], previews=False), "other-vae"))
    req = GenerationRequest(model="tiny", prompt="a cat", vae="other-vae", steps=1, seed=5, width=64, height=64)
    image = pipeline.generate(runner.ensure_model(req), req, cache=runner.cache)[0][0]
    assert np.asarray(image).shape == (64, 64, 3)  # and the swapped model still generates


# ---- Ctrl-C outside the job loop -----------------------------------------------------------------------------


class _TypingUser(io.StringIO):
    """A terminal on stdin where the user presses Ctrl-C instead of typing jobs."""

    def isatty(self) -> bool:
        return True

    def read(self, *args):
        raise KeyboardInterrupt


def test_ctrl_c_while_reading_jobs_from_a_terminal_exits_130_without_traceback(monkeypatch, capsys, tmp_path):
    from cli.main import main

    monkeypatch.setenv("DARKROOM_HOME", str(tmp_path))
    monkeypatch.setattr("sys.stdin", _TypingUser())
    assert main(["--batch", "-"]) == 130
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        "darkroom: reading jobs from stdin; end with Ctrl-D (Ctrl-Z Enter on Windows)",
        "darkroom: interrupted",
    ]


# ---- settings that would do nothing are pointed out -----------------------------------------------------------


def test_denoise_without_init_image_warns_but_runs(batch):
    run, tmp_path = batch
    Image.new("RGB", (64, 64)).save(tmp_path / "start.png")
    jobs = _write(
        tmp_path / "jobs.toml",
        """
        [defaults]
        model = "fake"
        steps = 1
        denoise = 0.4

        [[job]]
        prompt = "txt2img"

        [[job]]
        prompt = "img2img"
        init_image = "start.png"
        """,
    )
    code, out, err = run(jobs)
    assert code == 0, err
    assert len(out.splitlines()) == 2
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert warnings == [
        f"darkroom: warning: {jobs}: job 1: denoise = 0.4 has no effect without init_image "
        "(the hires-fix strength is hires.denoise)"
    ]


# ---- files saved by Windows editors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("jobs.toml", '[[job]]\r\nmodel = "fake"\r\nsteps = 1\r\nprompt = "bom toml"\r\n'),
        ("jobs.jsonl", '{"model": "fake", "steps": 1, "prompt": "bom jsonl"}\r\n'),
    ],
)
def test_jobs_file_with_a_utf8_bom_and_crlf_reads(batch, name, text):
    run, tmp_path = batch
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    code, out, err = run(str(path))
    assert code == 0, err
    assert RecordingRunner.seen[0].prompt.startswith("bom ")


def test_stdin_with_a_utf8_bom_reads(batch):
    run, _ = batch
    code, _, err = run("-", stdin='\ufeff{"model": "fake", "steps": 1}\n')
    assert code == 0, err


# ---- a second Ctrl-C while the current step finishes -----------------------------------------------------------

_STUCK_SCRIPT = """
import sys, time
sys.path.insert(0, {repo!r})
import cli.batch
from cli.batch import run_batch
cli.batch.STOP_TIMEOUT = float(sys.argv[5])

class StuckStep:
    def run(self, job, ctx):
        ctx.step(1, 2)
        time.sleep(60)  # one very slow step: a full-size model on a CPU

jobs, models, out, db = sys.argv[1:5]
sys.exit(run_batch(jobs, models_dirs=[models], output_dir=out, db_path=db, runner_factory=StuckStep))
"""


@pytest.mark.parametrize("presses", [2, 1])
def test_ctrl_c_during_a_slow_step_quits_and_records_the_job_interrupted(tmp_path, presses):
    """Two presses: quit now. One press and a step that outlasts the stop timeout: quit after the timeout.

    Either way: exit 130, no abort, the job recorded interrupted, the next one still pending."""
    import signal
    import subprocess
    import sys
    import time

    from core.store import JobStore

    repo = Path(__file__).resolve().parents[1]
    script = tmp_path / "stuck.py"
    script.write_text(_STUCK_SCRIPT.format(repo=str(repo)))
    (tmp_path / "models").mkdir()
    write_header_only(tmp_path / "models" / "fake.safetensors", "sd15")
    jobs = _write(tmp_path / "jobs.toml", '[[job]]\nmodel = "fake"\nsteps = 2\n[[job]]\nmodel = "fake"\n')
    db = tmp_path / "db.sqlite3"
    timeout = "30" if presses == 2 else "1"
    cmd = [sys.executable, str(script), jobs, str(tmp_path / "models"), str(tmp_path / "out"), str(db), timeout]
    env = dict(os.environ, DARKROOM_HOME=str(tmp_path / "home"))
    env.pop("DARKROOM_MODELS", None)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=default_sigint)
    lines = StderrLines(proc)
    try:
        lines.wait_for("[1/2] step 1/2")
        proc.send_signal(signal.SIGINT)
        lines.wait_for("Ctrl-C again", timeout=30)
        sent = time.monotonic()
        if presses == 2:
            proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=30)
        waited = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(0.2)
    rest = lines.rest()
    assert code == 130, rest
    assert waited < 20  # did not sit out the 60 s step
    assert not any("Traceback" in line for line in rest), rest
    assert any("job 1 marked interrupted; 1 job(s) not started, marked interrupted" in line for line in rest), rest
    with JobStore(db) as store:
        assert [j.state for j in sorted(store.list_jobs(), key=lambda j: j.id)] == ["interrupted", "interrupted"]


# ---- a relative --output-dir ---------------------------------------------------------------------------------------


def test_relative_output_dir_gives_absolute_paths_in_stdout_and_history(batch, monkeypatch):
    from core.store import JobStore

    _, tmp_path = batch
    jobs = _write(tmp_path / "jobs.toml", '[[job]]\nmodel = "fake"\nsteps = 1\n')
    monkeypatch.chdir(tmp_path)
    code, out, err = _run_with(tmp_path, jobs, output_dir="renders")
    assert code == 0, err
    printed = Path(out.strip())
    assert printed.is_absolute() and printed.is_relative_to(tmp_path / "renders") and printed.is_file()
    with JobStore(tmp_path / "db.sqlite3") as store:
        # the TUI, started from any other folder, opens the image from its history row
        assert [h.path for h in store.history()] == [str(printed)]


# ---- turning hires-fix off for one job ----------------------------------------------------------------------------


def test_hires_false_turns_off_the_hires_fix_of_a_preset_or_defaults(batch):
    run, tmp_path = batch
    jobs = _write(
        tmp_path / "jobs.toml",
        """
        [defaults]
        model = "fake"
        steps = 1
        hires = { scale = 1.5 }

        [[job]]
        prompt = "defaults"

        [[job]]
        prompt = "off"
        hires = false

        [[job]]
        prompt = "preset off"
        preset = "sd15-hires"
        hires = false
        steps = 1
        """,
    )
    code, _, err = run(jobs)
    assert code == 0, err
    on, off, preset_off = RecordingRunner.seen
    assert on.hires is not None and on.hires.scale == 1.5
    assert off.hires is None and preset_off.hires is None
    assert preset_off.sampler == "dpmpp_2m"  # the rest of the preset still applies


# ---- the README's jobs file example is valid ------------------------------------------------------------------------


def test_readme_jobs_example_parses(tmp_path, monkeypatch):
    from cli.batch import parse_jobs

    monkeypatch.setenv("DARKROOM_HOME", str(tmp_path / "home"))
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    example = readme.split("```toml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "inputs").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "inputs" / "lighthouse.png")
    first, second = (job.request for job in parse_jobs(example, "README.md", "toml", base_dir=tmp_path))
    assert (first.sampler, first.schedule, first.seed, first.batch_count) == ("dpmpp_2m", "karras", -1, 4)
    assert first.negative_prompt == second.negative_prompt == "blurry, lowres"
    assert second.init_image == str((tmp_path / "inputs" / "lighthouse.png").resolve())
    assert second.hires is not None and second.hires.scale == 2.0


def test_lora_tags_name_a_lora_that_must_exist(batch):
    run, tmp_path = batch
    jobs = _write(
        tmp_path / "jobs.toml",
        '[[job]]\nmodel = "fake"\nsteps = 1\nprompt = "a cat (no tags)"\n'
        '[[job]]\nmodel = "fake"\nsteps = 1\nprompt = "a cat <lora:detail:0.8>, <LORA:detail:0.8>"\n',
    )
    code, out, err = run(jobs)
    assert code == 3, err  # checked before any job runs
    assert out == "" and "job 2: LoRA 'detail' not found: there is no LoRA folder" in err


# ---- .json files: an array of jobs, or one pretty-printed job ---------------------------------------------------


def test_json_array_and_pretty_printed_object(batch):
    run, tmp_path = batch
    array = tmp_path / "jobs.json"
    array.write_text('[\n  {"model": "fake", "steps": 1, "prompt": "one"},\n  {"model": "fake", "steps": 1}\n]\n')
    code, out, err = run(str(array))
    assert code == 0, err
    assert len(out.splitlines()) == 2 and RecordingRunner.seen[0].prompt == "one"
    single = tmp_path / "job.json"
    single.write_text('{\n  "model": "fake",\n  "steps": 1,\n  "prompt": "pretty"\n}\n')
    code, out, err = run(str(single))
    assert code == 0, err
    assert RecordingRunner.seen[-1].prompt == "pretty"
    bad = tmp_path / "bad.json"
    bad.write_text('[{"model": "fake"}, {"model": "fake", "stepz": 2}]')
    code, _, err = run(str(bad))
    assert code == 2 and f"{bad}: item 2: stepz" in err


def test_jobs_path_that_is_a_folder_or_binary_gets_a_plain_message(batch):
    run, tmp_path = batch
    code, out, err = run(str(tmp_path))
    assert (code, out) == (2, "")
    assert err == f"darkroom: error: {tmp_path}: is a folder; give a .toml, .jsonl or .json jobs file\n"
    binary = tmp_path / "weights.bin"
    binary.write_bytes(b"\x00\xff\xfe" * 100)
    code, out, err = run(str(binary))
    assert (code, out) == (2, "")
    assert err.startswith(f"darkroom: error: {binary}: not a text file") and "codec" not in err
    png = tmp_path / "picture.png"  # an image is a job (tests/test_batch_images.py); one without parameters:
    Image.new("RGB", (8, 8)).save(png)
    code, out, err = run(str(png))
    assert (code, out) == (2, "")
    assert err.startswith(f"darkroom: error: {png}: has no generation parameters") and "codec" not in err
