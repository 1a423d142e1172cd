"""``darkroom --batch`` with hostile or careless jobs files: deep nesting, every error at once with its location,
bad init images, and an image as a job (``--batch image.png``, ``from_image``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from tests.batch_harness import RecordingRunner, batch_and_writer
from tests.test_request_hostile import png_declaring


class Runner(RecordingRunner):
    seen: list = []


@pytest.fixture
def batch(tmp_path, monkeypatch):
    return batch_and_writer(tmp_path, monkeypatch, Runner)


def a1111_png(path: Path, infotext: str) -> Path:
    info = PngInfo()
    info.add_text("parameters", infotext)
    Image.new("RGB", (16, 16), "blue").save(path, pnginfo=info)
    return path


A1111_TEXT = ("a lighthouse at dusk\nNegative prompt: blurry\nSteps: 12, Sampler: DPM++ 2M, Schedule type: Karras, "
              "CFG scale: 6.5, Seed: 1234, Size: 512x768, Model: fake, Version: v1.10.0")


# ---- nesting ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "text"), [
    ("deep.toml", "[[job]]\nmodel = \"fake\"\nprompt = " + "[" * 20000 + "]" * 20000 + "\n"),
    ("deep.json", "[" * 200000 + "]" * 200000),
    ("deep.jsonl", '{"model": "fake"}\n{"model": ' + "[" * 200000 + "]" * 200000 + "}\n"),
])
def test_a_deeply_nested_jobs_file_is_exit_2_with_one_message(batch, name, text):
    run, write, _ = batch
    jobs = write(name, text)
    code, out, err = run(jobs)
    assert (code, out) == (2, "")
    assert "nested too deeply to read" in err and "Traceback" not in err and len(err.splitlines()) == 1
    where = f"{jobs}: line 2: " if name.endswith(".jsonl") else f"{jobs}: "
    assert err.startswith(f"darkroom: error: {where}nested too deeply")
    assert Runner.seen == []


# ---- every error at once --------------------------------------------------------------------------------------


def test_every_bad_field_of_every_job_is_reported_once_where_it_is(batch):
    run, write, _ = batch
    jobs = write("jobs.toml", """
        [defaults]
        model = "fake"
        steps = 0
        [[job]]
        sampler = "eulr"
        cfg = 99
        [[job]]
        prompt = "fine apart from the defaults"
        [[job]]
        steps = 4
        width = 100
        init_image = "missing.png"
        colour = "red"
    """)
    code, out, err = run(jobs)
    assert (code, out) == (2, "")
    lines = err.splitlines()
    assert [line.split(" is invalid")[0] for line in lines[:-1]] == [
        f"darkroom: error: {jobs}: [defaults]: steps = 0",  # once, not once per job that inherits it
        f"darkroom: error: {jobs}: job 1: sampler = 'eulr'",
        f"darkroom: error: {jobs}: job 1: cfg = 99.0",
        f"darkroom: error: {jobs}: job 3: colour = 'red'",
        f"darkroom: error: {jobs}: job 3: width = 100",
        f"darkroom: error: {jobs}: job 3: init_image = 'missing.png'",
    ]
    assert "missing.png' does not exist" in lines[-2]
    assert lines[-1] == "darkroom: error: (nothing was run: 3 of 3 jobs are invalid)"
    assert Runner.seen == []


def test_an_unknown_preset_and_the_job_s_other_bad_fields_are_reported_together(batch):
    run, write, _ = batch
    jobs = write("jobs.toml", '[[job]]\nmodel = "fake"\npreset = "no-such"\nsteps = 999\n')
    code, _, err = run(jobs)
    lines = err.splitlines()
    assert code == 2 and len(lines) == 3
    assert lines[0].startswith(f"darkroom: error: {jobs}: job 1: ") and "no-such" in lines[0]
    assert lines[1].startswith(f"darkroom: error: {jobs}: job 1: steps = 999 is invalid")
    assert lines[2] == "darkroom: error: (nothing was run: 1 of 1 jobs are invalid)"


def test_jsonl_bad_lines_and_bad_fields_are_all_reported(batch):
    run, write, _ = batch
    jobs = write("jobs.jsonl", '{"model": "fake", "steps": 2}\n{"model": "fake",\n'
                               '{"model": "fake", "cfg": "high", "batch_size": 0}\n')
    code, _, err = run(jobs)
    assert code == 2
    lines = err.splitlines()
    assert lines[0].startswith(f"darkroom: error: {jobs}: line 2: not valid JSON")
    assert lines[1].startswith(f"darkroom: error: {jobs}: line 3: cfg = 'high'")
    assert lines[2].startswith(f"darkroom: error: {jobs}: line 3: batch_size = 0")
    assert lines[3] == "darkroom: error: (nothing was run: 2 of 3 jobs are invalid)"


def test_a_lone_surrogate_in_a_prompt_is_a_clear_error(batch):
    run, write, _ = batch
    jobs = write("jobs.jsonl", '{"model": "fake"}\n{"model": "fake", "prompt": "sunset \\ud83c over the sea"}\n')
    code, _, err = run(jobs)
    assert code == 2
    assert err.startswith(f"darkroom: error: {jobs}: line 2: prompt = ")
    assert "character 8 is '\\ud83c', half of a UTF-16 surrogate pair" in err


# ---- init images ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("init", "message"), [
    (".", "is a folder, not a file"),
    ("/dev/null", "'/dev/null' is a character device, not a file"),
    ("bomb.png", "declares 900 megapixels, too many to decode safely (a decompression bomb?)"),
    ("cut.png", "is truncated or damaged"),
])
def test_a_bad_init_image_is_named_before_anything_runs(batch, init, message):
    run, write, tmp_path = batch
    png_declaring(tmp_path / "bomb.png", 30000, 30000)
    Image.effect_noise((64, 64), 50).convert("RGB").save(tmp_path / "whole.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "whole.png").read_bytes()[:600])
    jobs = write("jobs.toml", f'[[job]]\nmodel = "fake"\nsteps = 1\n[[job]]\nmodel = "fake"\ninit_image = "{init}"\n')
    code, out, err = run(jobs)
    assert (code, out) == (2, "")
    assert err.startswith(f"darkroom: error: {jobs}: job 2: init_image = {init!r} is invalid: ") and message in err
    assert Runner.seen == []


def test_img2img_without_denoise_runs_at_075(batch):
    run, write, tmp_path = batch
    Image.new("RGB", (64, 64), "green").save(tmp_path / "in.png")
    jobs = write("jobs.toml", '[[job]]\nmodel = "fake"\nsteps = 1\ninit_image = "in.png"\n'
                              '[[job]]\nmodel = "fake"\nsteps = 1\ninit_image = "in.png"\ndenoise = 1.0\n')
    code, _, err = run(jobs)
    assert code == 0, err
    assert [r.denoise for r in Runner.seen] == [0.75, 1.0]
    outputs = sorted((tmp_path / "out").rglob("*.png"))
    with Image.open(outputs[0]) as img:  # the image records the strength it was made with
        assert "Denoising strength: 0.75" in img.text["parameters"]
        assert json.loads(img.text["darkroom"])["denoise"] == 0.75


# ---- an image as a job -----------------------------------------------------------------------------------------------


def test_batch_runs_the_job_that_made_a_darkroom_png(batch):
    run, write, tmp_path = batch
    jobs = write("jobs.toml", '[[job]]\nmodel = "fake"\nsteps = 3\nseed = 77\nprompt = "a red fox"\n'
                              'cfg = 5.5\nbatch_size = 2\nsampler = "heun"\n')
    code, out, err = run(jobs)
    assert code == 0, err
    second = out.splitlines()[1]  # the batch's second image: seed 78
    original = Runner.seen[-1]
    code, out, err = run(second)
    assert code == 0, err
    again = Runner.seen[-1]
    assert again == original.replace(seed=78, batch_size=1)  # that image, alone
    assert len(out.splitlines()) == 1


def test_batch_runs_an_a1111_png_and_a_missing_model_is_the_usual_error(batch):
    run, _, tmp_path = batch
    png = a1111_png(tmp_path / "a1111.png", A1111_TEXT)
    code, out, err = run(str(png))
    assert code == 0, err
    request = Runner.seen[-1]
    assert (request.prompt, request.negative_prompt, request.steps, request.sampler, request.schedule) == (
        "a lighthouse at dusk", "blurry", 12, "dpmpp_2m", "karras")
    assert (request.cfg, request.seed, request.width, request.height, request.model) == (6.5, 1234, 512, 768, "fake")
    other = a1111_png(tmp_path / "other.png", A1111_TEXT.replace("Model: fake", "Model: dreamshaper_8"))
    code, out, err = run(str(other))
    assert (code, out) == (3, "")
    assert err.startswith(f"darkroom: error: {other}: job 1: ") and "dreamshaper_8" in err


def test_an_image_without_parameters_is_one_clear_message(batch):
    run, write, tmp_path = batch
    plain = tmp_path / "holiday.png"
    Image.new("RGB", (8, 8)).save(plain)
    code, out, err = run(str(plain))
    assert (code, out) == (2, "")
    assert err == (f"darkroom: error: {plain}: has no generation parameters (no 'darkroom' or 'parameters' "
                   "metadata), so there is no job to run (only an image that records its parameters, as Darkroom, "
                   "A1111 and Forge write them, can be run)\n")
    jobs = write("jobs.toml", '[[job]]\nfrom_image = "holiday.png"\n[[job]]\nfrom_image = "nowhere.png"\n')
    code, out, err = run(jobs)
    lines = err.splitlines()
    assert code == 2
    assert lines[0].startswith(f"darkroom: error: {jobs}: job 1: from_image = 'holiday.png': ")
    assert "has no generation parameters" in lines[0]
    assert lines[1].startswith(f"darkroom: error: {jobs}: job 2: from_image = 'nowhere.png' is invalid: ")
    assert "does not exist" in lines[1]
    bomb = png_declaring(tmp_path / "bomb.png", 30000, 30000)
    code, out, err = run(str(bomb))
    assert code == 2 and "a decompression bomb?" in err and len(err.splitlines()) == 1


def test_a_job_from_an_image_of_another_file_of_its_model_says_so_before_running(batch):
    """The image's Model hash against the local file's, when the hash cache knows it (the worker's load hashes
    the file anyway; nothing is hashed before running): a different file will not reproduce the image."""
    from core.models.hashes import file_sha256
    from tests.family_files import write_header_only

    run, write, tmp_path = batch
    a1111_png(tmp_path / "look.png", A1111_TEXT.replace("Model: fake", "Model hash: 0123456789, Model: fake"))
    write_header_only(tmp_path / "models" / "other.safetensors", "sd15")
    jobs = write("jobs.toml", """
        [[job]]
        from_image = "look.png"
        [[job]]
        from_image = "look.png"
        model = "other"
    """)
    code, _, err = run(jobs)  # the file was never hashed: the job would say it when it loads the model
    assert code == 0 and "model hash" not in err
    sha256 = file_sha256(tmp_path / "models" / "fake.safetensors")
    code, _, err = run(jobs)
    assert code == 0, err
    said = (f"the image was made with model hash 0123456789; your fake.safetensors is {sha256[:10]}: a different "
            "file, the image will not reproduce exactly")
    assert f"darkroom: warning: {jobs}: job 1: {said}\n" in err
    assert "job 2: the image was made" not in err  # job 2 runs another model: the image's hash is not its
    code, _, err = run(str(tmp_path / "look.png"))  # the image as the job
    assert code == 0 and f"job 1: {said}" in err


def test_from_image_is_the_base_that_job_fields_override(batch):
    """request defaults < from_image < [defaults] < preset < the job's own fields."""
    run, write, tmp_path = batch
    a1111_png(tmp_path / "look.png", A1111_TEXT)
    Image.new("RGB", (64, 64), "green").save(tmp_path / "photo.png")
    jobs = write("jobs.toml", """
        [defaults]
        steps = 5
        clip_skip = 2
        [[job]]
        from_image = "look.png"
        cfg = 9
        [[job]]
        from_image = "look.png"
        preset = "sd15-fast-ays"
        prompt = "a lighthouse at noon"
        [[job]]
        from_image = "look.png"
        init_image = "photo.png"
        steps = 2
    """)
    code, _, err = run(jobs)
    assert code == 0, err
    first, second, third = Runner.seen
    # [defaults] go over the image (as over the request defaults), the job's own fields over both
    assert (first.steps, first.cfg, first.clip_skip, first.seed, first.prompt) == (5, 9.0, 2, 1234,
                                                                                   "a lighthouse at dusk")
    assert (first.sampler, first.schedule, first.width, first.height) == ("dpmpp_2m", "karras", 512, 768)
    # the preset's fields go over the image's and [defaults]; the job's own over all
    assert (second.sampler, second.schedule, second.steps) == ("dpmpp_2m", "ays", 10)
    assert (second.prompt, second.negative_prompt, second.seed) == ("a lighthouse at noon", "blurry", 1234)
    # a txt2img image made into img2img takes img2img's default strength
    assert (third.init_image, third.denoise, third.steps) == (str(tmp_path / "photo.png"), 0.75, 2)


def test_from_image_of_an_a1111_img2img_keeps_its_strength_for_the_source_given_as_init_image(batch):
    """A1111's img2img infotext records Denoising strength, never its source image: given the source as the
    job's init_image, the job is that img2img again (it ran at img2img's default 0.75, not the image's 0.4)."""
    run, write, tmp_path = batch
    text = A1111_TEXT.replace(", Model: fake,", ", Model: fake, Denoising strength: 0.4,")
    a1111_png(tmp_path / "redo.png", text)
    Image.new("RGB", (64, 64), "green").save(tmp_path / "photo.png")
    jobs = write("jobs.toml", '[[job]]\nfrom_image = "redo.png"\ninit_image = "photo.png"\n')
    code, _, err = run(jobs)
    assert code == 0, err
    (job,) = Runner.seen
    assert (job.init_image, job.denoise, job.seed) == (str(tmp_path / "photo.png"), 0.4, 1234)


def test_an_images_entries_that_darkroom_does_not_apply_are_named_before_it_runs(batch):
    """--batch of a webui PNG with a variation seed, CPU noise and a hires sampler: the job runs, and one
    warning names what will not be the same (its hashes and version describe the image and are not named); the
    entries are not carried into the new request (its darkroom record), where they were, unused."""
    run, write, tmp_path = batch
    text = A1111_TEXT.replace(", Model: fake,", ", Model hash: 0123456789, Model: fake, Variation seed: 99, RNG: CPU, "
                              'Hires prompt: "a castle, detailed", Lora hashes: "x: 0123456789ab",')
    png = a1111_png(tmp_path / "webui.png", text)
    code, _, err = run(str(png))
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert warnings == [f"darkroom: warning: {png}: job 1: the image's Variation seed: 99; RNG: CPU; Hires prompt: a "
                        "castle, detailed are not applied by Darkroom, so the new image will differ from it"]
    # nor are they carried into the new image's record: re-running that image would warn of what it did not use
    assert set(Runner.seen[0].extra) == {"made_with"}  # the model hash to compare, and nothing else of it
    code, _, err = run(str(a1111_png(tmp_path / "plain.png", A1111_TEXT)))
    assert code == 0 and "warning" not in err, err
