"""Pilot test of the Generate form's inpainting fields (mask, blur, area), its mask preview and History."""

from __future__ import annotations

import pytest
from PIL import Image, ImageDraw
from textual.widgets import Input, Select

from tests.test_tui_advanced import gated_app, ready
from tests.tui_fakes import wait_for
from tui.screens.history import describe


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DARKROOM_HOME", str(tmp_path / "home"))


async def test_mask_fields_reach_the_request_and_the_mask_is_previewed(tmp_path):
    source, mask = tmp_path / "source.png", tmp_path / "mask.png"
    Image.new("RGB", (64, 64), (0, 0, 255)).save(source)
    drawn = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(drawn).rectangle((0, 0, 31, 63), fill=255)
    drawn.save(mask)
    app = gated_app(tmp_path)
    async with app.run_test(size=(140, 50)) as pilot:
        screen = await ready(pilot, app)
        screen.query_one("#init_image", Input).value = str(source)
        screen.query_one("#mask", Input).value = str(mask)
        screen.query_one("#mask_blur", Input).value = "9"
        screen.query_one("#inpaint_area", Select).value = "only_masked"
        # the preview pane shows the init image, red where it is repainted
        await wait_for(pilot, lambda: screen.preview.image_widget.image is not None)
        shown = screen.preview.image_widget.image
        assert shown.getpixel((8, 8))[0] > 100 and shown.getpixel((56, 8)) == (0, 0, 255)
        await pilot.press("ctrl+j")
        await wait_for(pilot, lambda: len(app.store.list_jobs()) == 1)
        request = app.store.list_jobs()[0].request
        assert (request.mask, request.mask_blur, request.inpaint_area) == (str(mask), 9, "only_masked")
    details = describe({"request": request, "seed": 1, "path": "x.png", "created": 0}).plain
    assert f"mask: {mask}" in details and "mask_blur: 9" in details and "inpaint_area: only_masked" in details


def test_queue_details_name_the_mask_and_the_outpainting():
    from types import SimpleNamespace

    from core.request import GenerationRequest
    from tui.screens.queue import job_parameters

    request = GenerationRequest(model="m", init_image="/in.png", mask="/mask.png", mask_blur=6,
                                inpaint_area="only_masked", outpaint={"left": 64})
    text = job_parameters(SimpleNamespace(request=request, created=0, started=None, finished=None)).plain
    assert "mask /mask.png (blur 6, only masked)" in text and "outpaint left 64, right 0, top 0, bottom 0" in text


def test_form_fill_drops_a_mask_that_is_gone_and_one_without_its_image(tmp_path):
    from core.request import GenerationRequest
    from tui.png_settings import form_fill

    source, mask = tmp_path / "src.png", tmp_path / "mask.png"
    Image.new("RGB", (8, 8)).save(source)
    Image.new("L", (8, 8), 255).save(mask)
    request = GenerationRequest(model="m", init_image=str(source), mask=str(mask), outpaint={"top": 8}, seed=3)

    def fill():
        return form_fill(request, models=["m"], vaes=[], current_model="m", current_vae=None)

    assert fill().values["mask"] == str(mask) and f"mask {mask}" in fill().filled
    mask.unlink()
    assert fill().values["mask"] is None
    assert f"the mask {mask} is not there any more (img2img of the whole image)" in fill().not_used
    source.unlink()
    assert (fill().values["mask"], fill().values["outpaint"], fill().values["init_image"]) == (None, None, None)
