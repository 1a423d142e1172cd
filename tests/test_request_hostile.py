"""Hostile and careless input to the request type: every bad field at once, lone surrogates, img2img's default
strength, and init images that are bombs, huge, truncated, folders or devices."""

from __future__ import annotations

import io
import json
import os
import struct
import threading
import zlib
from pathlib import Path

import pytest
from PIL import Image

from core.errors import RequestError, RequestErrors
from core.metadata import format_infotext
from core.request import IMG2IMG_DENOISE, MAX_INIT_IMAGE_PIXELS, GenerationRequest, resolve_init_image


def png_declaring(path: Path, width: int, height: int) -> Path:
    """A small valid PNG whose IHDR is patched to declare ``width`` x ``height`` (CRC fixed): a bomb on paper."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


# ---- every bad field in one report -------------------------------------------------------------------------------


def test_every_invalid_field_is_reported_at_once():
    with pytest.raises(RequestErrors) as caught:
        GenerationRequest.from_dict({
            "model": "m", "steps": 0, "cfg": 99, "width": 63, "colour": "red", "sampler": "eulr",
            "hires": {"scale": 9, "bogus": 1},
        })
    error = caught.value
    fields = [e.field for e in error.errors]
    assert fields == ["colour", "hires.bogus", "sampler", "steps", "cfg", "width", "hires.scale"]
    lines = str(error).splitlines()
    assert len(lines) == 7 and lines[0].startswith("colour = 'red' is invalid: not a request field")
    assert "steps = 0 is invalid: an integer from 1 to 150" in lines
    assert "did you mean 'euler'?" in lines[2]
    # code written for one RequestError still works: it is one, with the first field's details
    assert isinstance(error, RequestError) and (error.field, error.value) == ("colour", "red")


def test_missing_model_is_reported_with_the_other_fields():
    with pytest.raises(RequestErrors) as caught:
        GenerationRequest.from_dict({"steps": "many", "height": 4100})
    assert [e.field for e in caught.value.errors] == ["model", "steps", "height"]


def test_one_bad_field_is_a_plain_request_error_as_before():
    with pytest.raises(RequestError) as caught:
        GenerationRequest(model="m", steps=0)
    assert type(caught.value) is RequestError and caught.value.errors == [caught.value]
    assert str(caught.value) == "steps = 0 is invalid: an integer from 1 to 150"
    with pytest.raises(RequestErrors) as caught:  # the constructor collects too
        GenerationRequest(model=" ", width=100, clip_skip=0)
    assert [e.field for e in caught.value.errors] == ["model", "width", "clip_skip"]


# ---- lone surrogates ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_a_lone_surrogate_in_a_prompt_names_the_field_and_position(field):
    data = json.loads('{"model": "m", "' + field + '": "a cat \\ud83d, smiling"}')  # an emoji cut in half
    with pytest.raises(RequestError) as caught:
        GenerationRequest.from_dict(data)
    assert caught.value.field == field
    assert "character 7 is '\\ud83d', half of a UTF-16 surrogate pair" in str(caught.value)
    str(caught.value).encode("utf-8")  # the message itself is printable anywhere
    ok = json.loads('{"model": "m", "prompt": "a cat \\ud83d\\ude00"}')  # a whole pair is one character
    assert GenerationRequest.from_dict(ok).prompt == "a cat \U0001f600"


# ---- img2img strength ----------------------------------------------------------------------------------------------


def test_img2img_without_denoise_takes_075_and_an_explicit_1_stays():
    assert IMG2IMG_DENOISE == 0.75
    img2img = GenerationRequest(model="m", init_image="/x.png")
    assert img2img.denoise == 0.75
    assert GenerationRequest(model="m").denoise == 1.0  # txt2img: the whole schedule
    explicit = GenerationRequest(model="m", init_image="/x.png", denoise=1.0)
    assert explicit.denoise == 1.0
    assert GenerationRequest.from_dict({"model": "m", "init_image": "/x.png"}).denoise == 0.75
    for request in (img2img, explicit, GenerationRequest(model="m")):
        data = json.loads(json.dumps(request.to_dict()))  # as the store keeps it
        assert GenerationRequest.from_dict(data) == request and data["denoise"] == request.denoise
    # a row stored before the default changed holds its number, and keeps it
    old_row = {**explicit.to_dict(), "denoise": 1.0}
    assert GenerationRequest.from_dict(old_row).denoise == 1.0
    # the number used is what the image records
    assert "Denoising strength: 0.75" in format_infotext(img2img, 1)
    assert "Denoising strength: 1," in format_infotext(explicit, 1)


def test_switching_a_txt2img_request_to_img2img_takes_the_img2img_default():
    txt2img = GenerationRequest(model="m")
    assert txt2img.replace(init_image="/x.png").denoise == 0.75
    assert txt2img.replace(init_image="/x.png", denoise=1.0).denoise == 1.0
    assert GenerationRequest(model="m", init_image="/a.png", denoise=0.3).replace(init_image="/b.png").denoise == 0.3
    assert txt2img.replace(steps=5).denoise == 1.0


# ---- hostile init images ---------------------------------------------------------------------------------------------


def test_pil_limit_is_the_real_default():
    # the bomb tests below go through PIL's own default limit, not a lowered one
    assert Image.MAX_IMAGE_PIXELS == int(1024 * 1024 * 1024 // 4 // 3)
    assert MAX_INIT_IMAGE_PIXELS < Image.MAX_IMAGE_PIXELS


@pytest.mark.parametrize(("size", "what"), [
    ((30000, 30000), "declares 900 megapixels, too many to decode safely (a decompression bomb?)"),  # PIL raises
    ((10000, 10000), "declares 100 megapixels, too many to decode safely"),  # PIL only warns: refused too
    ((9000, 8000), "is 9000 x 8000 (72 megapixels): scale it down first"),  # under PIL's limits, over ours
])
def test_a_decompression_bomb_or_huge_image_is_refused_naming_the_limit(tmp_path, size, what):
    path = png_declaring(tmp_path / "big.png", *size)
    with pytest.raises(RequestError) as caught:
        resolve_init_image(str(path))
    message = str(caught.value)
    assert caught.value.field == "init_image"
    assert "an image of at most 67 megapixels (8192 x 8192)" in message and what in message


def test_an_image_at_the_limit_is_not_refused_for_its_size(tmp_path):
    path = png_declaring(tmp_path / "edge.png", 8192, 8192)  # declares exactly the limit (its data is 8x8)
    assert resolve_init_image(str(path)) == str(path.resolve())


def test_a_truncated_image_is_caught_at_queue_time(tmp_path):
    whole = tmp_path / "whole.png"
    Image.effect_noise((128, 128), 64).convert("RGB").save(whole)
    data = whole.read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 2])
    with Image.open(cut) as img:  # the header alone looks fine: only decoding finds it
        assert img.size == (128, 128)
    with pytest.raises(RequestError, match=r"an image file that decodes completely; .*cut.png' is truncated"):
        resolve_init_image(str(cut))
    damaged = bytearray(data)
    damaged[len(data) // 2] ^= 0xFF  # one flipped byte inside the pixel data: its chunk's CRC no longer matches
    (tmp_path / "flipped.png").write_bytes(bytes(damaged))
    with pytest.raises(RequestError, match="truncated or damaged"):
        resolve_init_image(str(tmp_path / "flipped.png"))
    jpeg = tmp_path / "cut.jpg"
    buffer = io.BytesIO()
    Image.effect_noise((256, 256), 64).convert("RGB").save(buffer, format="JPEG")
    jpeg.write_bytes(buffer.getvalue()[:3000])
    with pytest.raises(RequestError, match="truncated or damaged"):
        resolve_init_image(str(jpeg))
    assert resolve_init_image(str(whole)) == str(whole.resolve())


def test_folders_and_devices_are_named_and_never_opened(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RequestError, match=r"an image file; '\.' is a folder, not a file"):
        resolve_init_image(".")
    with pytest.raises(RequestError, match=r"is a folder"):
        resolve_init_image(".", tmp_path)
    with pytest.raises(RequestError, match=r"'/dev/null' is a character device, not a file"):
        resolve_init_image("/dev/null")
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    with pytest.raises(RequestError, match=r"zero.png' is a character device"):
        resolve_init_image("zero.png", tmp_path)
    os.mkfifo(tmp_path / "pipe.png")
    result: list[BaseException] = []
    thread = threading.Thread(target=lambda: result.append(_raises(resolve_init_image, "pipe.png", tmp_path)))
    thread.daemon = True
    thread.start()
    thread.join(5)
    assert not thread.is_alive(), "a FIFO init image blocked"
    assert "is a named pipe (FIFO), not a file" in str(result[0])
    with pytest.raises(RequestError, match="does not exist"):
        resolve_init_image("missing.png", tmp_path)
    with pytest.raises(RequestError, match="cannot be read"):
        resolve_init_image("bad\0name.png", tmp_path)


def _raises(fn, *args) -> BaseException:
    try:
        fn(*args)
    except BaseException as exc:  # noqa: BLE001 - the test looks at it
        return exc
    raise AssertionError("no error")


def test_a_job_refuses_a_bomb_put_in_place_after_it_was_queued(tmp_path):
    from core.pipeline import InitImageError, load_init_image

    path = png_declaring(tmp_path / "swapped.png", 30000, 30000)
    with pytest.raises(InitImageError, match="too large to decode safely"):
        load_init_image(str(path), 64, 64)
    big = tmp_path / "big.jpg"
    Image.effect_noise((2048, 1536), 64).convert("RGB").save(big)
    assert load_init_image(str(big), 256, 192).size == (256, 192)  # decoded at a reduced scale, then resized


@pytest.mark.parametrize("size", [(30000, 30000), (10000, 10000)])
def test_reading_parameters_from_a_bomb_or_a_device_is_a_metadata_error(tmp_path, size):
    from core.metadata import MetadataError, read_request

    bomb = png_declaring(tmp_path / "bomb.png", *size)
    with pytest.raises(MetadataError, match="too many pixels to open safely"):
        read_request(bomb)
    with pytest.raises(MetadataError, match="not an image file"):
        read_request("/dev/null")
    with pytest.raises(MetadataError, match="not an image file"):
        read_request(tmp_path)
