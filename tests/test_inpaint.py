"""Inpainting and outpainting (core/inpaint.py): the 9-channel UNet against diffusers' inpainting pipeline, the
latent noise mask against a hand-written blend, the "only masked" geometry, outpaint padding, masks, fields and
the infotext."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from core import inpaint
from core.errors import RequestError
from core.masks import load_mask, mask_preview
from core.metadata import format_infotext, infotext_to_request, read_request, save_image
from core.models.testing import write_random_checkpoint
from core.pipeline import (
    PromptCache,
    _denoiser,
    decode,
    encode_images,
    generate,
    image_to_tensor,
    latents_to_images,
    load_model,
    prompt_conditioning,
)
from core.request import GenerationRequest, Outpaint, mask_warnings
from core.sampling.schedules import get_sigmas
from tests.reference import psnr, reference_components, torch_threads

PROMPT, NEGATIVE = "a red door in a white wall", "blurry"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inpaint")
    init = root / "init.png"
    Image.effect_mandelbrot((64, 64), (-2, -1.2, 1, 1.2), 40).convert("RGB").save(init)
    mask = root / "mask.png"
    drawn = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(drawn).rectangle((16, 8, 47, 39), fill=255)
    drawn.save(mask)
    return {
        "root": root, "init": init, "mask": mask,
        "inpaint_ckpt": write_random_checkpoint(root / "sd15-inpainting.safetensors", "sd15", "tiny", seed=3,
                                                inpaint=True),
        "ckpt": write_random_checkpoint(root / "sd15.safetensors", "sd15", "tiny", seed=4),
    }


@pytest.fixture(scope="module")
def normal_model(files):
    return load_model(files["ckpt"], compute_hash=False)


def job(files, **changes) -> GenerationRequest:
    base = dict(model="m", prompt=PROMPT, negative_prompt=NEGATIVE, steps=3, cfg=7.0, seed=5, width=64, height=64,
                init_image=str(files["init"]), mask=str(files["mask"]))
    return GenerationRequest(**{**base, **changes})


# ---- the dedicated inpainting checkpoint --------------------------------------------------------------------


def test_nine_channel_checkpoint_matches_diffusers_inpaint_pipeline(files):
    """Same file, seed and Euler steps as diffusers' StableDiffusionInpaintPipeline (which composites nothing;
    ours with the composite off, mask_blur 0 as diffusers has no blur). 10 steps: diffusers' linspace spacing
    then lands on whole timesteps, where its sigma interpolation and ours agree."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionInpaintPipeline

    request = job(files, steps=10, mask_blur=0, denoise=1.0)
    with torch_threads(1):
        model = load_model(files["inpaint_ckpt"], compute_hash=False)
        assert inpaint.takes_mask_input(model.checkpoint.unet)
        ours = generate(model, request, composite=False)[0][0]
        scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           num_train_timesteps=1000, timestep_spacing="linspace", steps_offset=1)
        pipe = StableDiffusionInpaintPipeline(**reference_components(files["inpaint_ckpt"]), scheduler=scheduler,
                                              safety_checker=None, feature_extractor=None,
                                              requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        ref = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, image=Image.open(files["init"]),
                   mask_image=Image.open(files["mask"]), num_inference_steps=10, strength=1.0, guidance_scale=7.0,
                   generator=torch.Generator().manual_seed(5), height=64, width=64).images[0]
        assert psnr(ours, ref) >= 40
        # strength 0.6: the init image is encoded too (posterior, starting noise, masked-image posterior: the
        # same draws in the same order); diffusers runs 6 of its 10 steps, our 6 steps at denoise 0.6
        ours = generate(model, request.replace(steps=6, denoise=0.6), composite=False)[0][0]
        ref = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, image=Image.open(files["init"]),
                   mask_image=Image.open(files["mask"]), num_inference_steps=10, strength=0.6, guidance_scale=7.0,
                   generator=torch.Generator().manual_seed(5), height=64, width=64).images[0]
        assert psnr(ours, ref) >= 40
        # the composite keeps the unmasked pixels of the original (mask_blur 0: exactly)
        final = generate(model, request.replace(steps=1))[0][0]
    original = Image.open(files["init"]).convert("RGB")
    assert final.getpixel((2, 60)) == original.getpixel((2, 60))
    assert psnr(final.crop((16, 8, 48, 40)), original.crop((16, 8, 48, 40))) < 30


# ---- normal checkpoints: the latent noise mask --------------------------------------------------------------


def test_latent_noise_mask_matches_a_hand_written_blend(files, normal_model):
    """Euler written out: at each step the unmasked input is the init latent noised to sigma, the unmasked x0
    the init latent; the final latents are blended once more. Same draws: posterior, then starting noise."""
    model = normal_model
    request = job(files, mask_blur=2, denoise=0.8)
    with torch_threads(1):
        ours = generate(model, request, composite=False)[0][0]

        pixels = image_to_tensor(Image.open(files["init"]).convert("RGB"), model.device, model.dtype)
        noise = model.noise_sampler([5], 64, 64)
        x0 = encode_images(model, pixels, noise)
        n = noise.initial()
        mask = inpaint.gaussian_blur(inpaint.to_tensor(Image.open(files["mask"]).convert("L")), 2.0).clamp(0, 1)
        m = F.interpolate(mask, size=(8, 8), mode="area").round()  # A1111 rounds the latent mask
        guided = _denoiser(model, prompt_conditioning(model, request, PromptCache(), 64, 64), None, 7.0, 1)
        sigmas = get_sigmas("normal", model.schedule, 3, 0.8, "sd15")
        x = x0 + n * sigmas[0]
        with torch.inference_mode():
            for s, s_next in zip(sigmas[:-1], sigmas[1:]):
                x_in = x * m + (x0 + n * s) * (1 - m)
                d = guided(x_in, s * torch.ones(1)) * m + x0 * (1 - m)
                x = x + (x - d) / s * (s_next - s)
        by_hand = latents_to_images(decode(model, x * m + x0 * (1 - m)))[0]
        plain = generate(model, request.replace(mask=None), composite=False)[0][0]  # img2img, no mask
    assert psnr(ours, by_hand) >= 40
    assert psnr(ours, plain) < 40  # the mask changed the sampling


def test_masked_content_latent_noise_and_nothing_change_the_start(files, normal_model):
    start = torch.ones(1, 4, 8, 8)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1
    nothing = inpaint.masked_content(start, mask, "latent_nothing", [1])
    assert nothing[..., 3, 3].abs().sum() == 0 and bool((nothing[..., 0, 0] == 1).all())
    noisy = inpaint.masked_content(start, mask, "latent_noise", [1])
    from core.sampling.noise import initial_noise

    assert torch.equal(noisy[..., 2:6, 2:6], initial_noise([1], (4, 8, 8))[..., 2:6, 2:6])
    assert torch.equal(inpaint.masked_content(start, mask, "original", [1]), start)


def test_fill_spreads_the_surrounding_colour_into_the_mask():
    image = Image.new("RGB", (64, 64), (200, 40, 10))
    ImageDraw.Draw(image).rectangle((20, 20, 43, 43), fill=(0, 0, 255))
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 20:44, 20:44] = 1
    filled = inpaint.fill_masked(image, mask)
    assert filled.getpixel((32, 32)) == (200, 40, 10) and filled.getpixel((2, 2)) == (200, 40, 10)


def test_an_in_memory_init_image_with_transparency_is_used_as_it_shows_on_white(files, normal_model):
    """``generate(init=...)`` (the detail pass hands its images so) flattens transparency onto white as an init
    image file is: the colour under transparent pixels is not what the job starts from."""
    with Image.open(files["init"]) as opened:
        init = opened.convert("RGB")
    cut = init.convert("RGBA")
    alpha = Image.new("L", init.size, 0)
    alpha.paste(255, (0, 0, 32, 64))
    cut.putalpha(alpha)  # the left half opaque, the right half transparent over the init's own colours
    on_white = Image.new("RGB", init.size, (255, 255, 255))
    on_white.paste(init.crop((0, 0, 32, 64)), (0, 0))
    request = job(files, mask=None, denoise=0.5, steps=2)
    got = generate(normal_model, request, init=cut)[0][0]
    assert got.tobytes() == generate(normal_model, request, init=on_white)[0][0].tobytes()


# ---- only masked: crop and paste back -----------------------------------------------------------------------


def test_crop_region_pads_then_matches_the_job_aspect_inside_the_image():
    # padded (68, 168, 182, 252) is 114 x 84: heightened about its centre to 114 x 114
    assert inpaint.crop_region((100, 200, 150, 220), 32, (512, 512), (512, 512)) == (68, 153, 182, 267)
    # at the top edge the grown region shifts down; a 2:1 job widens a square box
    assert inpaint.crop_region((0, 0, 20, 10), 0, (64, 64), (64, 64)) == (0, 0, 20, 20)
    assert inpaint.crop_region((40, 40, 60, 60), 0, (128, 64), (64, 64)) == (24, 40, 64, 60)


def test_only_masked_works_on_the_crop_at_full_size_and_pastes_it_back(files, normal_model):
    request = job(files, inpaint_area="only_masked", only_masked_padding=4, mask_blur=2, width=64, height=64)
    original = Image.open(files["init"]).convert("RGB")
    prepared = inpaint.prepare(request, original, original.size, 8)
    # the blurred mask reaches 2.5 sigma past the rectangle; + 4 padding; widened to square inside 64 x 64
    x1, y1, x2, y2 = prepared.crop
    assert (x2 - x1) == (y2 - y1) and x1 <= 16 - 4 and y1 == 0 and x2 >= 48 + 4
    assert prepared.work_image.size == (64, 64) and prepared.work_mask.shape[-2:] == (64, 64)
    red = Image.new("RGB", (64, 64), (255, 0, 0))
    done = prepared.finish([red])[0]
    assert done.size == original.size
    assert done.getpixel((32, 24)) == (255, 0, 0)  # inside the mask: the generated pixels
    assert done.getpixel((62, 62)) == original.getpixel((62, 62))  # outside the crop: the original
    with torch_threads(1):
        image = generate(normal_model, request.replace(steps=2))[0][0]
    assert image.size == (64, 64) and image.getpixel((62, 62)) == original.getpixel((62, 62))


def test_only_masked_with_an_empty_mask_is_plain_img2img(files, tmp_path):
    empty = tmp_path / "empty.png"
    Image.new("L", (64, 64), 0).save(empty)
    request = job(files, mask=str(empty), inpaint_area="only_masked")
    assert inpaint.prepare(request, Image.open(files["init"]).convert("RGB"), (64, 64), 8) is None



def test_whole_picture_with_an_empty_mask_says_nothing_is_repainted(files, tmp_path):
    empty, full = tmp_path / "empty.png", tmp_path / "full.png"
    Image.new("L", (64, 64), 0).save(empty)
    Image.new("L", (64, 64), 255).save(full)
    init = Image.open(files["init"]).convert("RGB")
    for request in (job(files, mask=str(empty)), job(files, mask=str(full), invert_mask=True)):
        assert any("the mask is empty" in w for w in inpaint.prepare(request, init, (64, 64), 8).warnings)
    assert inpaint.prepare(job(files), init, (64, 64), 8).warnings == ()
    outpaint = job(files, mask=str(empty), outpaint={"left": 16})  # the new area is repainted
    assert inpaint.prepare(outpaint, init, (64, 64), 8).warnings == ()

# ---- outpainting --------------------------------------------------------------------------------------------


def test_outpaint_pads_to_the_pixel_multiple_and_masks_the_new_area(files, normal_model):
    request = job(files, mask=None, outpaint={"left": 20, "bottom": 8}, mask_blur=0)
    assert inpaint.outpaint_padding(request, 16) == (32, 0, 0, 16)  # 84 -> 96 wide, 72 -> 80 high
    assert inpaint.outpaint_padding(request, 8) == (24, 0, 0, 8)
    original = Image.open(files["init"]).convert("RGB")
    prepared = inpaint.prepare(request, original, original.size, 8)
    assert prepared.canvas.size == (88, 72) == (prepared.width, prepared.height)
    # the new pixels repeat the edge; the mask is the new area only
    assert prepared.canvas.getpixel((0, 5)) == original.getpixel((0, 5))
    assert prepared.canvas.getpixel((34, 71)) == original.getpixel((10, 63))
    assert prepared.overlay.getpixel((5, 5)) == 255 and prepared.overlay.getpixel((40, 70)) == 255
    assert prepared.overlay.getpixel((40, 30)) == 0
    with torch_threads(1):
        image = generate(normal_model, request.replace(steps=2))[0][0]
    assert image.size == (88, 72)
    assert image.getpixel((54, 30)) == original.getpixel((30, 30))  # the original, shifted by the left padding


# ---- masks, fields, infotext --------------------------------------------------------------------------------


def test_alpha_only_and_rgb_masks_and_a_size_warning(tmp_path):
    alpha = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    ImageDraw.Draw(alpha).rectangle((0, 0, 15, 31), fill=(0, 0, 0, 255))  # black but opaque: repaint
    alpha.save(tmp_path / "alpha.png")
    mask, notes = load_mask(str(tmp_path / "alpha.png"), (32, 32))
    assert mask.getpixel((4, 4)) == 255 and mask.getpixel((28, 4)) == 0 and notes == []
    rgb = Image.new("RGB", (16, 16), (0, 0, 0))
    ImageDraw.Draw(rgb).rectangle((8, 0, 15, 15), fill=(255, 255, 255))
    rgb.save(tmp_path / "rgb.png")
    mask, notes = load_mask(str(tmp_path / "rgb.png"), (32, 32))
    assert mask.getpixel((12, 4)) == 255 and mask.getpixel((2, 4)) == 0
    assert notes == ["mask " + str(tmp_path / "rgb.png") + " is 16x16 but the init image is 32x32: "
                     "the mask is scaled to the image"]
    Image.new("RGB", (32, 32)).save(tmp_path / "init.png")
    request = GenerationRequest(model="m", init_image=str(tmp_path / "init.png"), mask=str(tmp_path / "rgb.png"))
    assert mask_warnings(request) == notes
    # the form's preview: the init image, red where it is repainted (the mask scaled to it)
    preview = mask_preview(str(tmp_path / "init.png"), str(tmp_path / "rgb.png"))
    assert preview.size == (32, 32) and preview.getpixel((4, 4)) == (0, 0, 0)
    assert preview.getpixel((28, 4)) == (127, 20, 20)
    assert mask_preview(str(tmp_path / "init.png"), str(tmp_path / "rgb.png"), invert=True).getpixel((28, 4)) == (0, 0, 0)


@pytest.mark.parametrize("fields, message", [
    ({"mask": "m.png"}, "mask = 'm.png' is invalid: used with an init_image"),
    ({"init_image": "i.png", "masked_content": "latent noise"}, "did you mean 'latent_noise'?"),
    ({"init_image": "i.png", "inpaint_area": "only masked"}, "did you mean 'only_masked'?"),
    ({"init_image": "i.png", "mask_blur": 65}, "mask_blur = 65 is invalid: an integer from 0 to 64"),
    ({"init_image": "i.png", "invert_mask": "yes"}, "invert_mask = 'yes' is invalid: true or false"),
    ({"init_image": "i.png", "outpaint": {"lft": 8}}, "outpaint.lft = 8 is invalid: not a side"),
    ({"init_image": "i.png", "outpaint": {"left": -1}}, "outpaint.left = -1 is invalid: an integer from 0"),
    # an unknown side does not hide a bad value on a known one, and the usual names of the sides are understood
    ({"init_image": "i.png", "outpaint": {"up": 8, "left": -1}}, "outpaint.up = 8 is invalid: not a side; did you "
     "mean 'top'?"),
    ({"init_image": "i.png", "outpaint": {"up": 8, "left": -1}}, "outpaint.left = -1 is invalid: an integer from 0"),
    ({"init_image": "i.png", "width": 4000, "outpaint": {"left": 200}}, "at most 4096 pixels of width"),
    ({"init_image": "i.png", "mask": "m.png", "hires": {"scale": 2.0}}, "no hires fix when inpainting"),
    ({"init_image": "i.png", "inpainting_fill": 1}, "not a request field; did you mean 'masked_content'?"),
])
def test_inpaint_fields_are_validated(fields, message):
    with pytest.raises(RequestError) as caught:
        GenerationRequest.from_dict({"model": "m", **fields})
    assert message in str(caught.value)


def test_infotext_writes_a1111_keys_and_reads_them_back(files, tmp_path):
    request = job(files, mask_blur=7, inpaint_area="only_masked", only_masked_padding=48,
                  masked_content="latent_noise", invert_mask=True, outpaint={"right": 64}, denoise=0.5)
    text = format_infotext(request, 5)
    assert ("Denoising strength: 0.5, Mask mode: Inpaint not masked, Mask blur: 7, Inpaint area: Only masked, "
            "Masked area padding: 48, Masked content: latent noise, "
            'Outpaint: "left 0, right 64, top 0, bottom 0"') in text
    back = infotext_to_request(text)
    assert (back.mask_blur, back.inpaint_area, back.only_masked_padding, back.masked_content, back.invert_mask) == (
        7, "only_masked", 48, "latent_noise", True)
    assert back.extra["Outpaint"] == "left 0, right 64, top 0, bottom 0"  # no init image in an infotext
    # A1111 leaves its defaults out: blur 4 stays ours, "Whole picture" and "original" are not written
    plain = format_infotext(job(files), 5)
    assert "Mask blur: 4" in plain and "Inpaint area" not in plain and "Masked content" not in plain
    # the darkroom chunk keeps every field, the outpaint table too
    saved = save_image(Image.new("RGB", (8, 8)), request, 5, tmp_path)
    assert read_request(saved) == request.replace(seed=5)
    assert json.loads(json.dumps(request.to_dict()))["outpaint"] == {"left": 0, "right": 64, "top": 0, "bottom": 0}
    assert GenerationRequest.from_dict(request.to_dict()).outpaint == Outpaint(right=64)


def test_batch_jobs_take_mask_paths_relative_to_the_jobs_file(files, tmp_path):
    from cli.batch import parse_jobs

    Image.open(files["mask"]).save(tmp_path / "m.png")
    Image.open(files["init"]).save(tmp_path / "i.png")
    text = ('[[job]]\nmodel = "m"\ninit_image = "i.png"\nmask = "m.png"\nmask_blur = 8\n'
            'inpaint_area = "only_masked"\noutpaint = {left = 16}\n')
    [parsed] = parse_jobs(text, "jobs.toml", base_dir=tmp_path)
    assert parsed.request.mask == str((tmp_path / "m.png").resolve())
    assert (parsed.request.mask_blur, parsed.request.inpaint_area) == (8, "only_masked")
    assert parsed.request.outpaint == Outpaint(left=16)
    with pytest.raises(Exception, match="mask"):
        parse_jobs(text.replace('"m.png"', '"missing.png"'), "jobs.toml", base_dir=tmp_path)


def test_sdxl_inpainting_checkpoint_runs_only_masked(files):
    """An SDXL inpainting file (9-channel UNet, by keys) samples the crop with its size conditioning and pastes
    it back: outside the crop the original stays."""
    path = write_random_checkpoint(files["root"] / "sdxl-inpainting.safetensors", "sdxl", "tiny", seed=6,
                                   inpaint=True)
    request = job(files, steps=2, inpaint_area="only_masked", only_masked_padding=0, mask_blur=0,
                  mask=str(files["root"] / "corner.png"))
    corner = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(corner).rectangle((0, 0, 15, 15), fill=255)
    corner.save(files["root"] / "corner.png")
    with torch_threads(1):
        model = load_model(path, compute_hash=False)
        assert model.checkpoint.info.variant == "inpaint" and inpaint.takes_mask_input(model.checkpoint.unet)
        image = generate(model, request)[0][0]
    original = Image.open(files["init"]).convert("RGB")
    assert image.size == (64, 64) and image.getpixel((40, 40)) == original.getpixel((40, 40))
    assert psnr(image.crop((0, 0, 16, 16)), original.crop((0, 0, 16, 16))) < 30


def test_outpainting_up_to_the_largest_size(files):
    """64 + 2 x 2016 = 4096 wide: the work request (its size now holds the padding) is still a valid request."""
    request = job(files, mask=None, outpaint={"left": 2016, "right": 2016}, mask_blur=0)
    prepared = inpaint.prepare(request, Image.open(files["init"]).convert("RGB"), (64, 64), 8)
    work = prepared.work_request(request)
    assert (work.width, work.height, work.outpaint, work.init_image) == (4096, 64, None, request.init_image)


def test_the_memory_estimate_counts_the_outpainted_size(files, normal_model):
    from core.accel.memory import estimate_job

    plain = estimate_job(normal_model, job(files, mask=None, outpaint=None))
    wider = estimate_job(normal_model, job(files, mask=None, outpaint={"left": 64}))
    assert (plain.latent_hw, wider.latent_hw) == ((8, 8), (8, 16)) and wider.denoise > plain.denoise
