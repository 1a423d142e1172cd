"""``darkroom --batch`` as a scripting user drives it: what comes in on stdin, the output folder, grids and
``--resume``, and the files a job reads (init images as cameras and editors write them)."""

from __future__ import annotations

import io
import os
import textwrap
from pathlib import Path

import pytest

from cli.batch import run_batch
from tests.batch_harness import RecordingRunner, batch_and_writer
from tests.family_files import write_header_only


class Runner(RecordingRunner):
    seen: list = []


@pytest.fixture
def batch(tmp_path, monkeypatch):
    return batch_and_writer(tmp_path, monkeypatch, Runner)


class _BytesStdin(io.TextIOWrapper):
    """stdin as Python opens it in a UTF-8 locale (``en_US.UTF-8``): strict decoding, so a byte that is no
    UTF-8 raises while it is read."""

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data), encoding="utf-8", errors="strict")

    def isatty(self) -> bool:
        return False


@pytest.mark.parametrize("data", [b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", b'[[job]]\nprompt = "caf\xe9"\n'])
def test_stdin_that_is_no_utf8_text_is_one_message_not_a_traceback(tmp_path, monkeypatch, data):
    monkeypatch.setenv("DARKROOM_HOME", str(tmp_path / "home"))
    err = io.StringIO()
    code = run_batch("-", stdin=_BytesStdin(data), stdout=io.StringIO(), stderr=err, models_dirs=[tmp_path],
                     db_path=tmp_path / "db", runner_factory=Runner)
    assert code == 2
    assert err.getvalue() == ("darkroom: error: <stdin>: not a text file (expected TOML or JSON Lines in UTF-8); "
                              "is it the right file?\n")


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_an_output_folder_that_exists_but_cannot_be_written_is_said_before_anything_runs(tmp_path, monkeypatch):
    # /proc/self: a folder that exists and that nobody, root included, can create files in (as a read-only
    # mount, which a test cannot make)
    monkeypatch.setenv("DARKROOM_HOME", str(tmp_path / "home"))
    write_header_only(tmp_path / "fake.safetensors", "sd15")
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"model": "fake", "steps": 1}\n')
    Runner.seen = []
    out, err = io.StringIO(), io.StringIO()
    code = run_batch(str(jobs), models_dirs=[tmp_path], output_dir="/proc/self", db_path=tmp_path / "db",
                     runner_factory=Runner, stdout=out, stderr=err)
    assert (code, out.getvalue(), Runner.seen) == (2, "", [])
    assert err.getvalue() == "darkroom: error: --output-dir /proc/self: the folder cannot be written to\n"


GRID_JOBS = """\
    [grid]
    x = {field = "cfg", values = [5, 7]}

    [[job]]
    model = "fake"
    steps = 1
    seed = -1
    """


@pytest.mark.parametrize("refiner", ["missing", "cut"])
def test_a_refiner_that_is_missing_or_cut_short_is_refused_before_any_job_runs(tmp_path, monkeypatch, refiner):
    """The refiner is a model the job loads as its checkpoint is: like the checkpoint, one that is missing or
    cut short (its download stopped after a byte) is named before anything runs (exit 3), not after the
    jobs before its own have run."""
    monkeypatch.setenv("DARKROOM_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DARKROOM_MODELS", raising=False)
    models = tmp_path / "models"
    write_header_only(models / "xl.safetensors", "sdxl")
    (models / "cut.safetensors").write_bytes(b"{")
    jobs = tmp_path / "jobs.toml"
    jobs.write_text('[[job]]\nmodel = "xl"\nprompt = "first"\nsteps = 1\n'
                    f'[[job]]\nmodel = "xl"\nprompt = "second"\nsteps = 1\nrefiner = "{refiner}"\n')
    Runner.seen = []
    out, err = io.StringIO(), io.StringIO()
    code = run_batch(str(jobs), models_dirs=[models], output_dir=tmp_path / "out", db_path=tmp_path / "db.sqlite3",
                     runner_factory=Runner, stdout=out, stderr=err)
    assert code == 3, err.getvalue()
    assert err.getvalue().startswith(f"darkroom: error: {jobs}: job 2: ")
    if refiner == "cut":
        assert f"{models / 'cut.safetensors'}: the file is only 1 bytes long" in err.getvalue()
    else:
        assert "'missing'" in err.getvalue()
    assert out.getvalue() == "" and Runner.seen == []  # job 1 did not run either


def test_a_grid_of_a_random_seed_records_the_seed_its_cells_used(batch):
    from core.metadata import read_request

    run, write, _ = batch
    code, out, _ = run(write("grid.toml", GRID_JOBS))
    *cells, grid = out.splitlines()
    assert code == 0 and len(cells) == 2
    seed = read_request(cells[0]).seed
    assert seed != -1 and read_request(cells[1]).seed == seed
    assert read_request(grid).seed == seed  # A1111's grid infotext is its first image's, seed and all
    assert not grid.endswith("--1.png")


def test_resume_of_a_finished_grid_prints_its_grid_image_and_saves_no_second_one(tmp_path, monkeypatch):
    monkeypatch.setenv("DARKROOM_HOME", str(tmp_path / "home"))
    write_header_only(tmp_path / "fake.safetensors", "sd15")
    jobs = tmp_path / "grid.toml"
    jobs.write_text(textwrap.dedent(GRID_JOBS))

    def run(resume: bool) -> tuple[int, list[str]]:
        out = io.StringIO()
        code = run_batch(str(jobs), models_dirs=[tmp_path], output_dir=tmp_path / "out", db_path=tmp_path / "db",
                         runner_factory=Runner, stdout=out, stderr=io.StringIO(), resume=resume)
        return code, out.getvalue().splitlines()

    first = run(False)
    assert first[0] == 0 and len(first[1]) == 3
    assert run(True) == first  # every path again, the grid's too
    assert len(list((tmp_path / "out" / "grids").rglob("*.png"))) == 1
    jobs.write_text(textwrap.dedent(GRID_JOBS).replace("[5, 7]", "[5, 8]"))  # another grid: a new image
    code, paths = run(True)
    assert code == 0 and paths[0] == first[1][0] and paths[2] != first[1][2]
    assert len(list((tmp_path / "out" / "grids").rglob("*.png"))) == 2


# ---- init images as cameras and editors write them --------------------------------------------------------------


def _sideways_photo(path):
    """A 32x16 JPEG stored as a phone stores a portrait shot: the sensor's landscape pixels, red on the left,
    and EXIF orientation 6 (turn 90 degrees clockwise to view): upright it is 16x32, red on top."""
    from PIL import Image

    image = Image.new("RGB", (32, 16), "blue")
    image.paste((255, 0, 0), (0, 0, 16, 16))
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(path, quality=95, exif=exif.tobytes())
    return path


def test_an_init_image_is_used_the_way_up_its_exif_orientation_says(tmp_path):
    from core.pipeline import load_init_image

    image, size = load_init_image(str(_sideways_photo(tmp_path / "photo.jpg")), 16, 32, with_size=True)
    assert size == (16, 32)
    top, bottom = image.getpixel((8, 4)), image.getpixel((8, 28))
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]


def test_a_16_bit_grey_init_image_keeps_its_tones(tmp_path):
    from PIL import Image

    from core.pipeline import load_init_image

    grey = Image.new("I;16", (8, 8), 40000)  # 61 % grey; clipped to 8 bits it was white
    grey.save(tmp_path / "grey16.png")
    red, green, blue = load_init_image(str(tmp_path / "grey16.png"), 8, 8).getpixel((2, 2))
    assert red == green == blue and abs(red - 40000 / 65535 * 255) < 1


def test_a_mask_drawn_on_the_upright_photo_fits_it(tmp_path):
    from PIL import Image

    from core.masks import load_mask
    from core.request import GenerationRequest, mask_warnings

    photo = _sideways_photo(tmp_path / "photo.jpg")
    Image.new("L", (16, 32), 255).save(tmp_path / "mask.png")  # drawn over the photo as every viewer shows it
    request = GenerationRequest(model="m", init_image=str(photo), mask=str(tmp_path / "mask.png"), denoise=0.5)
    assert mask_warnings(request) == []
    sideways_mask = tmp_path / "mask.jpg"  # a mask saved with the camera's orientation tag is turned up too
    _sideways_photo(sideways_mask)
    mask, notes = load_mask(str(sideways_mask), (16, 32))
    assert notes == [] and mask.size == (16, 32)


def _cut_out(mode: str):
    """An 8x8 image as editors save a cut-out: the left half opaque red, the right half transparent with black
    (the colour editors leave) under it; in ``mode`` (RGBA, LA: grey instead of red, P: a transparent index)."""
    from PIL import Image

    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    rgba.paste((255, 0, 0, 255), (0, 0, 4, 8))
    if mode == "LA":
        return rgba.convert("LA")
    if mode == "P":
        image = Image.new("P", (8, 8), 0)
        image.putpalette([0, 0, 0, 255, 0, 0])
        image.paste(1, (0, 0, 4, 8))
        image.info["transparency"] = 0
        return image
    return rgba


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_an_init_image_with_transparency_is_used_as_it_shows_on_white(tmp_path, mode):
    """A1111 flattens an img2img image onto white: the colour under transparent pixels is not what the job
    starts from (img2img, inpaint and outpaint read it through load_init_image, an upscale job and the mask
    preview through upright_rgb, the one reader)."""
    from PIL import Image

    from core.image_files import upright_rgb
    from core.pipeline import load_init_image

    _cut_out(mode).save(tmp_path / "cut.png")
    with Image.open(tmp_path / "cut.png") as opened:
        assert opened.mode == mode
        upscale_source = upright_rgb(opened)
    for image in (load_init_image(str(tmp_path / "cut.png"), 8, 8), upscale_source):
        assert image.mode == "RGB"
        assert image.getpixel((6, 4)) == (255, 255, 255)  # transparent: white, not the black under it
        left = image.getpixel((1, 4))
        assert left == ((255, 0, 0) if mode != "LA" else (76, 76, 76))  # opaque pixels as they are


def test_a_16_bit_grey_init_images_transparent_level_is_white_and_only_that_level(tmp_path):
    """A 16-bit grey PNG's tRNS names a 16-bit level: it is matched before the scaling to 8 bits (after it,
    1000 / 257 matched no pixel, and a level rounding like its neighbours would have taken them too)."""
    import numpy as np
    from PIL import Image

    from core.image_files import upright_rgb
    from core.pipeline import load_init_image

    levels = np.full((8, 8), 40000, dtype=np.uint16)
    levels[:, 4:] = 1000  # the right half transparent
    levels[:, 0] = 1001  # one level above it: opaque
    image = Image.fromarray(levels)
    image.save(tmp_path / "grey16.png", transparency=1000)
    with Image.open(tmp_path / "grey16.png") as opened:
        assert opened.mode == "I;16" and opened.info["transparency"] == 1000
        upscale_source = upright_rgb(opened)
    for shown in (load_init_image(str(tmp_path / "grey16.png"), 8, 8), upscale_source):
        assert shown.mode == "RGB" and shown.getpixel((6, 4)) == (255, 255, 255)
        assert shown.getpixel((0, 4)) == (3, 3, 3) and shown.getpixel((2, 4)) == (155, 155, 155)


def test_a_half_transparent_init_pixel_is_mixed_with_white(tmp_path):
    from PIL import Image

    from core.pipeline import load_init_image

    Image.new("RGBA", (4, 4), (0, 0, 200, 128)).save(tmp_path / "half.png")
    red, green, blue = load_init_image(str(tmp_path / "half.png"), 4, 4).getpixel((1, 1))
    assert red == green and abs(red - 127) <= 1 and abs(blue - (200 * 128 + 255 * 127) / 255) <= 1


def test_an_alpha_only_mask_is_still_read_from_its_alpha(tmp_path):
    """The flattening is for the image's pixels: a mask keeps its alpha as the repaint area (opaque = repaint),
    here the cut-out's opaque half, whatever colour is under it."""
    from core.masks import load_mask

    _cut_out("RGBA").save(tmp_path / "mask.png")
    mask, _ = load_mask(str(tmp_path / "mask.png"))
    assert mask.getpixel((1, 4)) == 255 and mask.getpixel((6, 4)) == 0


# ---- the models folders -----------------------------------------------------------------------------------------


def test_list_models_shows_a_checkpoint_that_another_of_the_same_name_hides(tmp_path):
    from cli.list_models import list_models
    from tests.family_files import write_header_only

    used = write_header_only(tmp_path / "checkpoints" / "dup.safetensors", "sd15")
    hidden = write_header_only(tmp_path / "Stable-diffusion" / "dup.safetensors", "sdxl")
    out, err = io.StringIO(), io.StringIO()
    assert list_models([tmp_path], out, err) == 0
    rows = [line for line in out.getvalue().splitlines() if line.startswith("dup ")]
    assert len(rows) == 2 and rows[0].split()[1] == "SD1.x" and rows[1].split()[1] == "SDXL"
    assert rows[1].endswith(f"not used by the name 'dup', which is {used}; give this file's path to use it: {hidden}")


def test_list_models_names_links_that_lead_nowhere(tmp_path):
    from cli.list_models import list_models
    from tests.family_files import write_header_only

    folder = tmp_path / "checkpoints"
    write_header_only(folder / "good.safetensors", "sd15")
    (folder / "loop_a.safetensors").symlink_to("loop_b.safetensors")
    (folder / "loop_b.safetensors").symlink_to("loop_a.safetensors")
    (folder / "on_usb.safetensors").symlink_to(tmp_path / "unmounted" / "model.safetensors")
    out, err = io.StringIO(), io.StringIO()
    assert list_models([tmp_path], out, err) == 0
    rows = {line.split()[0]: line for line in out.getvalue().splitlines()[1:] if line.strip()}
    assert "good" in rows and "loop" in rows["loop_a"] and "loop" in rows["loop_b"]
    assert rows["on_usb"].endswith(f"unusable: it is a symbolic link to {str(tmp_path / 'unmounted' / 'model.safetensors')!r}, "
                                   "which does not exist")


def test_list_models_into_a_closed_pipe_exits_quietly(tmp_path):
    import subprocess
    import sys

    from tests.family_files import write_header_only

    write_header_only(tmp_path / "checkpoints" / "good.safetensors", "sd15")
    read_end, write_end = os.pipe()
    os.close(read_end)  # `| head` that has already read what it wanted
    try:
        result = subprocess.run(
            [sys.executable, "-c", "import sys; from cli.main import main; sys.exit(main())", "--list-models",
             "--models-dir", str(tmp_path)],
            stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60,
            cwd=Path(__file__).resolve().parents[1],
        )
    finally:
        os.close(write_end)
    assert result.returncode == 0 and result.stderr == ""
