"""Infotext format/parse against the A1111 rules in the reference, PNG save/read, atomicity, counters."""

from __future__ import annotations

import datetime as dt
import json
import os
import struct
import threading
import zlib
from pathlib import Path

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from core import metadata
from core.errors import DarkroomError
from core.metadata import (
    MetadataError,
    format_infotext,
    infotext_to_request,
    model_hash_warning,
    parse_infotext,
    read_request,
    save_image,
)
from core.request import GenerationRequest, HiresFix

# The illustrative infotext from /work/shared/reference/previews-and-metadata.md §4 (A1111's order and quoting).
REFERENCE_EXAMPLE = (
    "a lighthouse at dusk, oil painting\n"
    "Negative prompt: blurry, lowres\n"
    "Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x768, "
    'Model hash: 0123456789, Model: myModel, Lora hashes: "detail: 0123456789ab", Version: v1.10.1'
)
DAY = dt.datetime(2026, 11, 25, 12, 0)


def example_request(**changes) -> GenerationRequest:
    base = GenerationRequest(
        model="myModel.safetensors",
        prompt="a lighthouse at dusk, oil painting",
        negative_prompt="blurry, lowres",
        sampler="dpmpp_2m",
        schedule="karras",
        steps=25,
        cfg=7.0,
        width=512,
        height=768,
    )
    return base.replace(**changes)


def small_image(color=(200, 30, 60)) -> Image.Image:
    return Image.new("RGB", (16, 8), color)


def png_chunks(path: Path) -> list[tuple[bytes, bytes]]:
    """Raw (type, data) chunks of a PNG, read without Pillow."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        chunks.append((kind, body))
        pos += 12 + length
    return chunks


# ---- format -------------------------------------------------------------------------------------------------


def test_reference_example_line_exact():
    text = format_infotext(
        example_request(model="checkpoints/sd15/myModel.safetensors"),
        1234,
        model_hash="0123456789",
        extra={"Lora hashes": "detail: 0123456789ab"},
        version="v1.10.1",
    )
    assert text == REFERENCE_EXAMPLE


def test_number_formatting_and_optional_keys():
    req = example_request(negative_prompt="", cfg=6.5, clip_skip=2, sampler="euler_ancestral", schedule="normal")
    text = format_infotext(req, 7, version="v")
    # no "Negative prompt:" line when empty, no Model hash when unknown, Clip skip only when > 1
    assert text == (
        "a lighthouse at dusk, oil painting\n"
        "Steps: 25, Sampler: Euler a, Schedule type: Normal, CFG scale: 6.5, Seed: 7, Size: 512x768, "
        "Model: myModel, Clip skip: 2, Version: v"
    )
    assert "Clip skip" not in format_infotext(req.replace(clip_skip=1), 7)


def test_quoting_of_values_with_comma_colon_newline():
    req = example_request(model="v1: base, pruned.ckpt", negative_prompt="")
    text = format_infotext(
        req, 1, extra={"Note": 'say "hi"\nbye', "Plain": "no-quotes here", "Empty": None}, version="v"
    )
    line = text.splitlines()[-1]
    assert 'Model: "v1: base, pruned"' in line
    assert 'Note: "say \\"hi\\"\\nbye"' in line  # JSON string literal with escapes
    assert "Plain: no-quotes here" in line
    assert "Empty" not in line
    # the prompt line is never quoted, even with commas
    assert text.splitlines()[0] == "a lighthouse at dusk, oil painting"
    # and it parses back to the original values
    params = parse_infotext(text)
    assert params["Model"] == "v1: base, pruned"
    assert params["Note"] == 'say "hi"\nbye'


def test_multiline_prompts():
    req = example_request(prompt="line one,\nline two", negative_prompt="bad,\nworse")
    text = format_infotext(req, 3, version="v")
    assert text.startswith("line one,\nline two\nNegative prompt: bad,\nworse\nSteps: 25, ")
    params = parse_infotext(text)
    assert params["Prompt"] == "line one,\nline two"
    assert params["Negative prompt"] == "bad,\nworse"


def test_hires_and_img2img_entries():
    hires = example_request(hires=HiresFix(scale=2.0, upscaler="latent", steps=0, denoise=0.55))
    line = format_infotext(hires, 1, version="v").splitlines()[-1]
    assert line.endswith(
        "Model: myModel, Denoising strength: 0.55, Hires upscale: 2, Hires upscaler: Latent, Version: v"
    )
    with_steps = hires.replace(hires=HiresFix(scale=1.5, upscaler="image", steps=12, denoise=0.3))
    line = format_infotext(with_steps, 1, version="v").splitlines()[-1]
    assert "Denoising strength: 0.3, Hires upscale: 1.5, Hires steps: 12, Hires upscaler: Lanczos, Version" in line

    img2img = example_request(init_image="/tmp/in.png", denoise=0.75)
    line = format_infotext(img2img, 1, version="v").splitlines()[-1]
    assert "Model: myModel, Denoising strength: 0.75, Version: v" in line
    txt2img = format_infotext(example_request(), 1, version="v")
    assert "Denoising strength" not in txt2img


def test_extra_fills_empty_builtin_slot_in_place_and_cannot_override():
    line = format_infotext(example_request(), 5, extra={"Model hash": "abcdef0123", "Seed": 99}, version="v")
    assert "Size: 512x768, Model hash: abcdef0123, Model: myModel" in line
    assert "Seed: 5," in line and "99" not in line


# ---- parse --------------------------------------------------------------------------------------------------


def test_parse_reference_example():
    assert parse_infotext(REFERENCE_EXAMPLE) == {
        "Prompt": "a lighthouse at dusk, oil painting",
        "Negative prompt": "blurry, lowres",
        "Steps": "25",
        "Sampler": "DPM++ 2M",
        "Schedule type": "Karras",
        "CFG scale": "7",
        "Seed": "1234",
        "Size-1": "512",
        "Size-2": "768",
        "Model hash": "0123456789",
        "Model": "myModel",
        "Lora hashes": "detail: 0123456789ab",
        "Version": "v1.10.1",
    }


def test_parse_last_line_needs_three_entries():
    params = parse_infotext("a cat\nstyle: oil, mood: calm")
    assert params == {"Prompt": "a cat\nstyle: oil, mood: calm", "Negative prompt": ""}
    only_params = parse_infotext("Steps: 20, Sampler: Euler, Seed: 3")
    assert only_params["Prompt"] == "" and only_params["Seed"] == "3"


def test_parse_bad_quoted_value_kept_raw():
    params = parse_infotext('p\nSteps: 20, Seed: 1, Odd: "\\q"')
    assert params["Odd"] == '"\\q"'


# ---- infotext -> request ------------------------------------------------------------------------------------


def test_infotext_to_request_reference_example():
    req = infotext_to_request(REFERENCE_EXAMPLE)
    assert req == example_request(
        model="myModel",
        seed=1234,
        extra={"made_with": {"model": "myModel", "hash": "0123456789"}, "Lora hashes": "detail: 0123456789ab",
               "Version": "v1.10.1"},
    )


@pytest.mark.parametrize(
    ("sampler", "schedule_entry", "expected"),
    [
        ("DPM++ 2M Karras", "", ("dpmpp_2m", "karras")),  # pre-1.9 label with the schedule in it
        ("DPM++ 2M", "", ("dpmpp_2m", "karras")),  # Automatic -> the sampler's default
        ("DPM++ 2M SDE", ", Schedule type: Automatic", ("dpmpp_2m_sde", "exponential")),
        ("Euler a", "", ("euler_ancestral", "normal")),
        ("k_euler_a", "", ("euler_ancestral", "normal")),
        ("euler_a karras", "", ("euler_ancestral", "karras")),  # stable-diffusion.cpp
        ("DPM++ 2M", ", Schedule type: Align Your Steps", ("dpmpp_2m", "ays")),
        ("UniPC", ", Schedule type: SGM Uniform", ("uni_pc", "sgm_uniform")),
        ("LCM", ", Schedule type: Uniform", ("lcm", "normal")),
        ("IPNDM", ", Schedule type: Karras", ("ipndm", "karras")),  # Forge / ComfyUI ids ipndm, ipndm_v
        ("IPNDM_V", "", ("ipndm_v", "normal")),
    ],
)
def test_sampler_and_schedule_labels(sampler, schedule_entry, expected):
    text = f"p\nSteps: 20, Sampler: {sampler}{schedule_entry}, CFG scale: 7, Seed: 1, Size: 512x512"
    req = infotext_to_request(text, model_fallback="m")
    assert (req.sampler, req.schedule) == expected
    assert "Sampler" not in req.extra


def test_unknown_sampler_and_schedule_kept_in_extra():
    text = "p\nSteps: 20, Sampler: Restart, Schedule type: KL Optimal, CFG scale: 7, Seed: 1, Size: 512x512"
    req = infotext_to_request(text, model_fallback="m")
    assert (req.sampler, req.schedule) == ("euler", "normal")
    assert req.extra == {"Sampler": "Restart", "Schedule type": "KL Optimal"}


def test_sdcpp_style_numbers_and_hires_fields():
    text = (
        "castle\nSteps: 30, Sampler: Euler, CFG scale: 7.000000, Seed: 42, Size: 640x448, Model: m, "
        "Clip skip: 2, Denoising strength: 0.45, Hires upscale: 1.5, Hires steps: 10, Hires upscaler: Latent (bicubic), "
        "Hires resize: 960x672, VAE: vae-ft-mse.safetensors"
    )
    req = infotext_to_request(text)
    assert req.cfg == 7.0 and req.steps == 30 and (req.width, req.height) == (640, 448) and req.clip_skip == 2
    assert req.hires == HiresFix(scale=1.5, upscaler="latent", steps=10, denoise=0.45)
    assert req.denoise == 1.0 and req.vae == "vae-ft-mse.safetensors"
    assert req.extra == {"Hires upscaler": "Latent (bicubic)", "Hires resize": "960x672"}


def test_img2img_strength_and_missing_model():
    req = infotext_to_request("p\nSteps: 20, Sampler: Euler, Seed: 3, Denoising strength: 0.6", model_fallback="fb")
    assert req.denoise == 0.6 and req.hires is None and req.model == "fb"
    with pytest.raises(MetadataError, match="names no model"):
        infotext_to_request("p\nSteps: 20, Sampler: Euler, Seed: 3")
    with pytest.raises(MetadataError, match="'Steps' is 'many'"):
        infotext_to_request("p\nSteps: many, Sampler: Euler, Seed: 3, Model: m")


@pytest.mark.parametrize(
    "req",
    [
        example_request(seed=11),
        example_request(prompt="multi\nline, prompt", negative_prompt="", cfg=4.5, clip_skip=2, seed=12),
        example_request(
            model="odd: name, v2", sampler="euler_ancestral", schedule="exponential", seed=13,
            hires=HiresFix(scale=1.5, upscaler="image", steps=8, denoise=0.35),
        ),
        example_request(sampler="lcm", schedule="sgm_uniform", steps=4, cfg=1.5, seed=14),
        example_request(init_image="x.png", denoise=0.4, seed=15, hires=HiresFix(denoise=0.25)),
    ],
)
def test_format_then_parse_round_trip(req):
    back = infotext_to_request(format_infotext(req, req.seed, version="v9"))
    # A1111's Model entry is the file name without extension; the init image path is not in infotext.
    expected = req.replace(model=req.model.removesuffix(".safetensors"), init_image=None, extra={"Version": "v9"})
    assert back == expected


# ---- save / read --------------------------------------------------------------------------------------------


def test_save_read_round_trip(tmp_path):
    req = example_request(
        seed=-1, batch_size=2, vae="vae/ft-mse.safetensors", hires=HiresFix(scale=1.25, steps=3),
        extra={"attention": "sdpa"},
    )
    path = save_image(small_image(), req, 4242, tmp_path, model_hash="0123456789", now=DAY)
    assert path == tmp_path / "2026-11-25" / "00000-4242.png"
    # the image's model hash rides along, for whoever runs that model again
    made_with = {"made_with": {"model": req.model, "hash": "0123456789"}}
    assert read_request(path) == req.replace(seed=4242, extra={**req.extra, **made_with})
    with Image.open(path) as img:
        assert img.size == (16, 8) and img.getpixel((3, 3)) == (200, 30, 60)
        assert img.text["parameters"] == format_infotext(req, 4242, model_hash="0123456789")
        assert json.loads(img.text["darkroom"])["seed"] == 4242


def test_a_darkroom_image_says_its_own_model_hash_not_the_one_its_job_carried(tmp_path):
    """A job made from another image (``from_image``) carries that image's ``made_with``; the new image was made
    with the local file, whose hash its own text records: that is what reading it back says."""
    source = {"made_with": {"model": "myModel", "hash": "aaaaaaaaaa"}, "Version": "v1.10.1"}
    req = example_request(extra=source)
    made = save_image(small_image(), req, 1, tmp_path, model_hash="bbbbbbbbbb", now=DAY)
    assert read_request(made).extra == {"made_with": {"model": req.model, "hash": "bbbbbbbbbb"}, "Version": "v1.10.1"}
    unhashed = save_image(small_image(), req, 2, tmp_path, now=DAY)  # no hash recorded: nothing to compare with
    assert read_request(unhashed).extra == {"Version": "v1.10.1"}


def test_model_hash_warning_compares_only_what_can_be_compared():
    sha = "0123456789" + "ab" * 27
    req = infotext_to_request("p\nSteps: 20, Seed: 1, Model hash: 0123456789, Model: dream")
    assert model_hash_warning(req, "/m/dream.safetensors", sha) is None  # the same file
    assert model_hash_warning(req, "/m/dream.safetensors", sha.upper()[:10]) is None  # A1111 writes lower case
    other = "f" * 64
    assert model_hash_warning(req, "/m/dream.safetensors", other) == (
        "the image was made with model hash 0123456789; your dream.safetensors is ffffffffff: a different file, "
        "the image will not reproduce exactly")
    assert model_hash_warning(req.replace(model="sd15/Dream.safetensors"), "/m/Dream.safetensors", other)
    assert model_hash_warning(req, "/m/dream.safetensors", None) is None  # not hashed yet
    assert model_hash_warning(req.replace(model="juggernaut"), "/m/juggernaut.safetensors", other) is None
    old = infotext_to_request("p\nSteps: 20, Seed: 1, Model hash: 01234567, Model: dream")  # A1111's old hash
    assert model_hash_warning(old, "/m/dream.safetensors", other) is None
    odd = infotext_to_request("p\nSteps: 20, Seed: 1, Model hash: \x1b[31m, Model: dream")
    assert model_hash_warning(odd, "/m/dream.safetensors", other) is None


def test_non_latin1_prompt_is_itxt_and_reads_back(tmp_path):
    req = example_request(prompt="灯台、夕暮れ — ☂", negative_prompt="ぼやけた")
    path = save_image(small_image(), req, 9, tmp_path, now=DAY)
    chunks = png_chunks(path)
    itxt = {body.split(b"\0", 1)[0]: body for kind, body in chunks if kind == b"iTXt"}
    assert set(itxt) == {b"parameters", b"darkroom"}
    assert "灯台、夕暮れ — ☂".encode() in itxt[b"parameters"]  # uncompressed UTF-8
    assert read_request(path) == req.replace(seed=9)
    plain = save_image(small_image(), example_request(prompt="café"), 9, tmp_path, now=DAY)
    assert {kind for kind, _ in png_chunks(plain)} >= {b"tEXt"}  # Latin-1 fits tEXt


def test_read_a1111_png_and_fallback_without_darkroom_chunk(tmp_path):
    path = tmp_path / "a1111.png"
    info = PngInfo()
    info.add_text("parameters", REFERENCE_EXAMPLE)
    small_image().save(path, pnginfo=info)
    assert read_request(path) == infotext_to_request(REFERENCE_EXAMPLE)

    broken = tmp_path / "broken.png"
    info = PngInfo()
    info.add_text("darkroom", "{not json")
    info.add_text("parameters", REFERENCE_EXAMPLE)
    small_image().save(broken, pnginfo=info)
    assert read_request(broken).seed == 1234

    newer = tmp_path / "newer.png"
    info = PngInfo()
    info.add_text("darkroom", json.dumps({**example_request().to_dict(), "seed": 5, "future_knob": 1}))
    info.add_text("parameters", REFERENCE_EXAMPLE)
    small_image().save(newer, pnginfo=info)
    assert read_request(newer).seed == 1234  # from the infotext
    info = PngInfo()
    info.add_text("darkroom", json.dumps({**example_request().to_dict(), "future_knob": 1}))
    small_image().save(newer, pnginfo=info)
    with pytest.raises(MetadataError, match="stored request is not usable here .*future_knob"):
        read_request(newer)


def test_read_comfyui_with_and_without_parameters(tmp_path):
    only_graph = tmp_path / "comfy.png"
    info = PngInfo()
    info.add_text("prompt", json.dumps({"3": {"class_type": "KSampler"}}))
    info.add_text("workflow", json.dumps({"nodes": []}))
    small_image().save(only_graph, pnginfo=info)
    with pytest.raises(MetadataError, match="ComfyUI workflow"):
        read_request(only_graph)

    with_params = tmp_path / "comfy-a1111.png"
    info.add_text("parameters", REFERENCE_EXAMPLE)
    small_image().save(with_params, pnginfo=info)
    assert read_request(with_params).prompt == "a lighthouse at dusk, oil painting"


def test_read_errors_are_darkroom_errors(tmp_path):
    bare = tmp_path / "bare.png"
    small_image().save(bare)
    with pytest.raises(MetadataError, match="no generation parameters"):
        read_request(bare)
    text = tmp_path / "notes.png"
    text.write_text("hello")
    with pytest.raises(DarkroomError, match="not an image"):
        read_request(text)
    with pytest.raises(DarkroomError, match="no such file"):
        read_request(tmp_path / "missing.png")


@pytest.mark.parametrize(("fmt", "endian"), [("JPEG", "utf-16-be"), ("WEBP", "utf-16-be"), ("JPEG", "utf-16-le")])
def test_read_exif_user_comment(tmp_path, fmt, endian):
    infotext = REFERENCE_EXAMPLE.replace("lighthouse", "phare é")
    exif = Image.Exif()
    exif.get_ifd(metadata.EXIF_IFD)[metadata.EXIF_USER_COMMENT] = b"UNICODE\0" + infotext.encode(endian)
    path = tmp_path / f"a1111.{fmt.lower()}"
    small_image().save(path, format=fmt, exif=exif)
    assert read_request(path) == infotext_to_request(infotext)


def test_failed_rename_leaves_no_file(tmp_path, monkeypatch):
    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(metadata.os, "replace", broken_replace)
    with pytest.raises(MetadataError, match="No space left"):
        save_image(small_image(), example_request(), 1, tmp_path, now=DAY)
    assert os.listdir(tmp_path / "2026-11-25") == []  # no final file, no temp file, no claim marker


def test_failed_encode_leaves_no_file(tmp_path):
    class Exploding:
        def save(self, handle, **kwargs):
            handle.write(b"\x89PNG partial")
            raise OSError(5, "Input/output error")

    with pytest.raises(MetadataError):
        save_image(Exploding(), example_request(), 1, tmp_path, now=DAY)
    assert os.listdir(tmp_path / "2026-11-25") == []


def test_counter_continues_after_highest_and_ignores_other_files(tmp_path):
    day = tmp_path / "2026-11-25"
    day.mkdir()
    (day / "00041-77.png").write_bytes(b"x")
    (day / "notes.txt").write_text("x")
    (day / "123-short.png").write_bytes(b"x")  # not a 5-digit counter
    paths = [save_image(small_image(), example_request(), seed, tmp_path, now=DAY) for seed in (5, 5, 6)]
    assert [p.name for p in paths] == ["00042-5.png", "00043-5.png", "00044-6.png"]
    other_day = save_image(small_image(), example_request(), 5, tmp_path, now=DAY + dt.timedelta(days=1))
    assert other_day == tmp_path / "2026-11-26" / "00000-5.png"


@pytest.mark.parametrize("stale_scan", [False, True])
def test_concurrent_saves_never_collide(tmp_path, monkeypatch, stale_scan):
    if stale_scan:
        # Every saver believes the folder is empty, so only the O_EXCL claim keeps numbers apart.
        monkeypatch.setattr(metadata, "_highest_number", lambda folder: -1)
    results: list[Path] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    barrier = threading.Barrier(6)

    def worker(index: int) -> None:
        try:
            barrier.wait()
            for k in range(4):
                path = save_image(small_image((index, k, 0)), example_request(), 1000 + index, tmp_path, now=DAY)
                with lock:
                    results.append(path)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    numbers = sorted(int(p.name.split("-")[0]) for p in results)
    assert numbers == list(range(24))
    folder = tmp_path / "2026-11-25"
    assert sorted(os.listdir(folder)) == sorted(p.name for p in results)  # no leftovers
    for path in results:
        index = int(path.stem.split("-")[1]) - 1000
        with Image.open(path) as img:
            assert img.getpixel((0, 0))[0] == index


def test_a_jobs_list_of_loras_is_written_as_prompt_tags_so_infotext_readers_apply_them():
    """A1111, Forge and our own infotext reader apply only the prompt's tags: a job's (or preset's) ``loras``
    list goes after the prompt as tags, with its weights exactly, so the infotext alone makes the same job."""
    request = GenerationRequest(model="m", prompt="a cat <lora:paper:-0.3>", seed=1, loras=[
        {"name": "ink", "weight": 0.7, "te_weight": 0.25}, {"name": "lcm", "weight": 1.0}])
    text = format_infotext(request, 1)
    assert text.splitlines()[0] == "a cat <lora:paper:-0.3> <lora:ink:0.25:0.7> <lora:lcm:1>"
    back = infotext_to_request(text)
    assert back.loras == () and sorted(back.lora_refs(), key=str) == sorted(request.lora_refs(), key=str)
    assert format_infotext(request.replace(loras=()), 1).splitlines()[0] == "a cat <lora:paper:-0.3>"
