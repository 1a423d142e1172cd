"""Filling the Generate form from what a PNG knows: the path a terminal pastes for a dropped file, the form
values and the words saying what was filled and what was not, and the Ctrl+O dialog and History's Use
settings with Pilot."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from textual.widgets import Checkbox, Input, Select, TextArea

from core.metadata import read_request
from core.request import GenerationRequest
from tests.tui_fakes import FakeRunner, make_app, screen_text, wait_for
from tui.png_settings import NO_MODEL, form_fill, path_from_text

A1111 = (
    "a castle <lora:detail:0.8>, (golden hour:1.2)\n"
    "Negative prompt: blurry\n"
    "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1234, Size: 512x768, "
    "Model hash: 879db523c3, Model: dreamshaper_8, VAE: vae-ft-mse-840000-ema-pruned.safetensors, "
    "Clip skip: 2, Version: v1.10.1"
)


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DARKROOM_HOME", str(tmp_path / "home"))


def a1111_png(path: Path, text: str = A1111) -> Path:
    info = PngInfo()
    info.add_text("parameters", text)
    # written beside and moved in: a test rewrites a job's image that the Generate screen may be reading
    partial = path.with_name(f".partial-{path.name}")
    Image.new("RGB", (8, 8), "blue").save(partial, format="PNG", pnginfo=info)
    partial.replace(path)
    return path


# ---- the path a terminal pastes -------------------------------------------------------------------------------

def test_path_from_text_takes_what_terminals_paste_for_a_dropped_file(tmp_path, monkeypatch):
    spaced = a1111_png(tmp_path / "my image.png")
    quoted_name = a1111_png(tmp_path / "it's.png")
    for pasted in (f"'{spaced}' ", f'"{spaced}"', str(spaced).replace(" ", "\\ "), f"file://{tmp_path}/my%20image.png",
                   f"  {spaced}\n", f"'{spaced}' '{tmp_path}/other.png'"):  # several files: the first
        assert path_from_text(pasted) == str(spaced), pasted
    assert path_from_text(f"'{tmp_path}/it'\\''s.png' ") == str(quoted_name)  # a quote, as a shell quotes it
    assert path_from_text(str(quoted_name)) == str(quoted_name)  # the text names a file: taken as it is
    monkeypatch.setenv("HOME", str(tmp_path))
    assert path_from_text("~/my\\ image.png") == str(spaced)
    assert path_from_text("'unbalanced.png") == "unbalanced.png" and path_from_text("  ") == ""


# ---- the form values and what is said --------------------------------------------------------------------------

def test_form_fill_from_an_a1111_infotext_says_what_was_filled_and_what_was_not(tmp_path):
    request = read_request(a1111_png(tmp_path / "a.png"), model_fallback=NO_MODEL)
    fill = form_fill(request, models=["sd15/dreamshaper_8.safetensors", "other"], vaes=["sdxl_vae"],
                     current_model="other", current_vae=None)
    values = fill.values
    assert values["model"] == "sd15/dreamshaper_8.safetensors"  # A1111's Model: is the file name alone
    assert (values["sampler"], values["schedule"], values["steps"], values["cfg"], values["seed"]) == (
        "dpmpp_2m", "karras", 28, 6.5, 1234)
    assert (values["width"], values["height"], values["clip_skip"], values["seed_lock"]) == (512, 768, 2, True)
    assert "vae" not in values and "extra" not in values and "batch_size" not in values
    said = "; ".join(fill.not_used)
    assert "the VAE vae-ft-mse-840000-ema-pruned.safetensors named in the image is not in your models folders " \
           "(kept the built-in one)" in said
    assert "not used by Darkroom: Version" in said  # the model hash is compared, when the file is known
    assert "model sd15/dreamshaper_8.safetensors" in fill.filled
    assert "DPM++ 2M Karras, 28 steps, CFG 6.5, seed 1234 (locked), 512×768" in fill.filled

    unknown = form_fill(request.replace(model="juggernautXL"), models=["other"], vaes=[], current_model="other",
                        current_vae="sdxl_vae")
    assert "model" not in unknown.values  # the form keeps its own
    assert "the model juggernautXL named in the image is not in your models folders (kept other)" in unknown.not_used
    sampler = read_request(a1111_png(tmp_path / "b.png", "x\nSteps: 20, Sampler: DDIM CFG++, Model: other"))
    assert "sampler DDIM CFG++ is not available (Euler used)" in form_fill(
        sampler, models=["other"], vaes=[], current_model=None, current_vae=None).not_used
    nomodel = read_request(a1111_png(tmp_path / "c.png", "x\nSteps: 20"), model_fallback=NO_MODEL)
    assert "the image names no model (kept other)" in form_fill(
        nomodel, models=["other"], vaes=[], current_model="other", current_vae=None).not_used


def test_form_fill_says_when_the_local_model_of_that_name_is_another_file(tmp_path):
    from core.models.hashes import file_sha256

    request = read_request(a1111_png(tmp_path / "a.png"), model_fallback=NO_MODEL)  # Model hash: 879db523c3
    other = tmp_path / "dreamshaper_8.safetensors"
    other.write_bytes(b"another version of dreamshaper_8")
    names = ["sd15/dreamshaper_8.safetensors"]
    files = {names[0]: other}

    def fill(req=request):
        return form_fill(req, models=names, vaes=[], current_model=None, current_vae=None, model_files=files)

    unknown = fill()  # never hashed: nothing is read on the UI thread, the file is named for hashing elsewhere
    assert unknown.unhashed == other and not any("model hash" in line for line in unknown.not_used)
    sha256 = file_sha256(other)
    known = fill()
    assert known.unhashed is None
    assert (f"the image was made with model hash 879db523c3; your dreamshaper_8.safetensors is {sha256[:10]}: a "
            "different file, the image will not reproduce exactly") in known.not_used
    same = fill(request.replace(extra={**request.extra, "made_with": {"model": "dreamshaper_8", "hash": sha256[:10]}}))
    assert same.unhashed is None and not any("model hash" in line for line in same.not_used)
    old_a1111 = fill(request.replace(extra={"made_with": {"model": "dreamshaper_8", "hash": "879db523"}}))
    assert old_a1111.unhashed is None and not any("model hash" in line for line in old_a1111.not_used)


def test_form_fill_drops_an_init_image_that_is_gone(tmp_path):
    source = tmp_path / "src.png"
    Image.new("RGB", (8, 8)).save(source)
    request = GenerationRequest(model="m", init_image=str(source), denoise=0.6, seed=3)
    assert form_fill(request, models=["m"], vaes=[], current_model="m", current_vae=None).values["init_image"] \
        == str(source)
    source.unlink()
    fill = form_fill(request, models=["m"], vaes=[], current_model="m", current_vae=None)
    assert fill.values["init_image"] is None
    assert f"the init image {source} is not there any more (txt2img)" in fill.not_used



def test_form_fill_says_an_a1111_img2img_image_needs_its_source(tmp_path):
    """An img2img infotext records its strength but not its source image: the notice says the job is txt2img
    until the source is chosen, where it said nothing of it (a txt2img image says nothing either)."""
    text = A1111.replace("Clip skip: 2,", "Denoising strength: 0.45, Mask blur: 4, Clip skip: 2,")
    request = read_request(a1111_png(tmp_path / "i2i.png", text))
    fill = form_fill(request, models=["dreamshaper_8"], vaes=[], current_model=None, current_vae=None)
    assert fill.values["denoise"] == 0.45 and fill.values["init_image"] is None
    assert any("made by img2img (denoise 0.45) from a source image it does not record" in n for n in fill.not_used)
    plain = form_fill(read_request(a1111_png(tmp_path / "t2i.png")), models=["dreamshaper_8"], vaes=[],
                      current_model=None, current_vae=None)
    assert not any("img2img" in n for n in plain.not_used)


def test_form_fill_writes_a_jobs_list_of_loras_as_prompt_tags():
    """A Darkroom image of a job with a ``loras`` list (a jobs file's, a preset's): the form has no list, so the
    LoRAs go into the prompt as tags, weights exact, where they were dropped (another image)."""
    request = GenerationRequest(model="m", prompt="a cat <lora:paper:-0.3>", seed=1,
                                loras=[{"name": "ink", "weight": 0.7, "te_weight": 0.25}])
    fill = form_fill(request, models=["m"], vaes=[], current_model="m", current_vae=None)
    assert fill.values["prompt"] == "a cat <lora:paper:-0.3> <lora:ink:0.25:0.7>" and "loras" not in fill.values
    assert "its LoRAs as tags in the prompt (ink)" in fill.filled
    again = GenerationRequest(model="m", prompt=fill.values["prompt"], seed=1)
    assert sorted(again.lora_refs(), key=str) == sorted(request.lora_refs(), key=str)

# ---- Pilot: Ctrl+O on Generate, Use settings on History -----------------------------------------------------

async def ready(pilot, app):
    screen = app.get_generate_screen()
    await wait_for(pilot, lambda: screen.query_one("#model", Select).value == "fake-model.safetensors")
    return screen


def question(app) -> str:
    """The open dialog's question (long paths wrap on the screen)."""
    return str(app.screen.query_one("#question").render())


def messages(app, severity=None):
    return [n.message for n in app._notifications if severity is None or n.severity == severity]


async def test_ctrl_o_fills_the_form_from_a_dropped_png_and_says_what_was_not_filled(tmp_path, monkeypatch):
    png = a1111_png(tmp_path / "from webui.png")
    monkeypatch.chdir(tmp_path)
    app = make_app(tmp_path, FakeRunner(gate=threading.Event()))
    async with app.run_test(size=(140, 45)) as pilot:
        screen = await ready(pilot, app)
        await pilot.press("ctrl+o")
        await pilot.pause()
        assert "drop the file here" in screen_text(app)
        await pilot.press(*"nothing.png", "enter")  # relative: from the current directory, and it says so
        await wait_for(pilot, lambda: "no such file" in question(app))
        assert f"{tmp_path / 'nothing.png'}: no such file (a relative path is taken from the current directory, " \
               f"{tmp_path})" in question(app)
        answer = app.screen.query_one("#answer", Input)
        assert answer.value == "nothing.png"  # asked again, the text kept
        answer.value = ""
        await pilot.press(*f"'{png}' ", "enter")  # what a terminal pastes when the file is dropped on it
        await wait_for(pilot, lambda: screen.query_one("#steps", Input).value == "28")
        assert app.screen is screen
        assert screen.query_one("#prompt", TextArea).text.startswith("a castle <lora:detail:0.8>")
        assert screen.query_one("#negative_prompt", TextArea).text == "blurry"
        assert (screen.query_one("#sampler", Select).value, screen.query_one("#schedule", Select).value) == (
            "dpmpp_2m", "karras")
        assert [screen.query_one(f"#{n}", Input).value for n in ("cfg", "seed", "width", "height", "clip_skip")] \
            == ["6.5", "1234", "512", "768", "2"]
        assert screen.query_one("#seed-lock", Checkbox).value is True
        assert screen.query_one("#model", Select).value == "fake-model.safetensors"  # kept
        filled = [m for m in messages(app, "information") if m.startswith("Filled from from webui.png: ")]
        assert filled and "seed 1234 (locked)" in filled[0]
        warning = next(m for m in messages(app, "warning") if m.startswith("Not filled: "))
        assert "the model dreamshaper_8 named in the image is not in your models folders " \
               "(kept fake-model.safetensors)" in warning
        assert "LoRA" not in warning  # LoRA tags are applied now; the prompt keeps them
        await pilot.press("ctrl+j")  # what was filled queues as it is
        await wait_for(pilot, lambda: len(app.store.list_jobs()) == 1)
        job = app.store.list_jobs()[0].request
        assert (job.model, job.steps, job.seed, job.width, job.height, job.extra) == (
            "fake-model.safetensors", 28, 1234, 512, 768, {})


async def test_an_image_of_another_version_of_the_local_model_is_said_once_hashed_off_the_ui_thread(tmp_path):
    from core.models.hashes import cached_sha256
    from tests.tui_fakes import FakeRegistry

    models = tmp_path / "models"
    models.mkdir()
    local = models / "dreamshaper_8.safetensors"
    local.write_bytes(b"another dreamshaper_8")
    png = a1111_png(tmp_path / "a.png")  # Model hash: 879db523c3
    registry = FakeRegistry(["fake-model.safetensors", "dreamshaper_8.safetensors"], search_dirs=[models])
    app = make_app(tmp_path, start_worker=False, registry=registry)
    async with app.run_test(size=(140, 45)) as pilot:
        screen = await ready(pilot, app)
        screen.read_image_settings(str(png))
        await wait_for(pilot, lambda: screen.query_one("#model", Select).value == "dreamshaper_8.safetensors")

        def said() -> str | None:
            return next((m for m in messages(app, "warning") if m.startswith("The image was made with")), None)

        await wait_for(pilot, lambda: said() is not None)
        sha256 = cached_sha256(local)  # hashed once, for the job that loads it too
        assert sha256 is not None
        assert said() == (f"The image was made with model hash 879db523c3; your dreamshaper_8.safetensors is "
                          f"{sha256[:10]}: a different file, the image will not reproduce exactly")
        app._notifications.clear()
        screen.read_image_settings(str(png))  # known now: said with what was not filled, nothing hashed
        await wait_for(pilot, lambda: any(m.startswith("Not filled: ") for m in messages(app, "warning")))
        warning = next(m for m in messages(app, "warning") if m.startswith("Not filled: "))
        assert f"the image was made with model hash 879db523c3; your dreamshaper_8.safetensors is {sha256[:10]}" \
            in warning


async def test_a_file_without_parameters_is_named_and_asked_again(tmp_path):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    app = make_app(tmp_path, start_worker=False)
    async with app.run_test(size=(140, 45)) as pilot:
        screen = await ready(pilot, app)
        screen.action_open_png()
        await pilot.pause()
        app.screen.query_one("#answer", Input).value = f"file://{plain}"
        await pilot.press("enter")
        await wait_for(pilot, lambda: "has no generation parameters" in question(app))
        assert str(plain) in question(app)
        await pilot.press("escape")
        assert app.screen is screen


async def test_history_use_settings_reads_the_images_own_png(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=(140, 45)) as pilot:
        await ready(pilot, app)
        app.submit(GenerationRequest(model="fake-model.safetensors", prompt="from the database", steps=2, seed=5))
        await wait_for(pilot, lambda: len(app.store.history()) == 1)
        path = Path(app.store.history()[0].path)
        # The file says something else than its history row (edited, or a PNG from elsewhere moved in): its own
        # parameters win.
        a1111_png(path, "from the file\nSteps: 9, Sampler: Euler a, CFG scale: 4, Seed: 77, Size: 640x640, "
                        "Model: fake-model")
        await pilot.press("f5")
        await pilot.pause()
        history = app.screen
        await pilot.press("l")
        generate = app.get_generate_screen()
        await wait_for(pilot, lambda: app.screen is generate and generate.query_one("#steps", Input).value == "9")
        assert generate.query_one("#prompt", TextArea).text == "from the file"
        assert [generate.query_one(f"#{n}", Input).value for n in ("seed", "cfg", "width")] == ["77", "4.0", "640"]
        assert generate.query_one("#sampler", Select).value == "euler_ancestral"
        assert any(m.startswith(f"Filled from {path.name}: ") for m in messages(app, "information"))
        assert not messages(app, "warning")  # Model: fake-model is the listed fake-model.safetensors

        path.unlink()  # gone: the history entry is used, and the message says so
        await pilot.press("f5")
        await pilot.pause()
        assert app.screen is history
        await pilot.press("l")
        await wait_for(pilot, lambda: app.screen is generate and generate.query_one("#steps", Input).value == "2")
        assert generate.query_one("#prompt", TextArea).text == "from the database"
        assert generate.query_one("#seed", Input).value == "5"
        warning = next(m for m in messages(app, "warning") if m.startswith("Not filled: "))
        assert "the image's own parameters could not be read" in warning and "the history entry was used" in warning
