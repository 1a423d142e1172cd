"""History's "upscale this image" key: it asks which upscaler model and queues an upscale job carrying the image's
parameters (the fake runner stands in for the pipeline; tests/test_upscale_jobs.py runs the real one)."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import ModelNotFoundError
from core.request import GenerationRequest
from tests.tui_fakes import FakeModel, FakeRegistry, make_app, wait_for


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DARKROOM_HOME", str(tmp_path / "home"))


class UpscalerRegistry(FakeRegistry):
    def __init__(self, upscalers: list[str]) -> None:
        super().__init__()
        self.upscaler_names = upscalers

    def upscalers(self) -> list[FakeModel]:
        return [FakeModel(n, Path("/models/upscale_models") / f"{n}.pth") for n in self.upscaler_names]

    def suggested_dir(self, kind: str) -> Path:
        return Path("/data/webui/models") / {"upscaler": "ESRGAN"}[kind]

    def find_upscaler(self, name: str) -> Path:
        raise ModelNotFoundError(f"upscaler {name!r} not found in /models/upscale_models; close matches: "
                                 + ", ".join(self.upscaler_names))


async def test_upscale_key_queues_an_upscale_job_of_the_selected_image(tmp_path):
    registry = UpscalerRegistry([])
    app = make_app(tmp_path, registry=registry)
    async with app.run_test(size=(140, 45)) as pilot:
        app.submit(GenerationRequest(model="fake-model.safetensors", prompt="a red fox", steps=2, seed=7))
        await wait_for(pilot, lambda: len(app.store.history()) == 1)
        await pilot.press("f5")
        await pilot.pause()
        source = app.store.history()[0]
        await pilot.press("u")  # none installed: says where they go, in full (the models folder's layout)
        await wait_for(pilot, lambda: any(str(n.message).endswith("in /data/webui/models/ESRGAN")
                                          for n in app._notifications))
        registry.upscaler_names = ["4x-UltraSharp", "RealESRGAN_x4plus"]
        await pilot.press("u")
        await wait_for(pilot, lambda: app.screen.query_one("#answer").value == "4x-UltraSharp")
        assert "4x-UltraSharp, RealESRGAN_x4plus" in str(app.screen.query_one("#question").render())
        await pilot.press("ctrl+u", *"4x-UltraShrp", "enter")  # a typo: said, nothing queued
        await wait_for(pilot, lambda: "close matches: 4x-UltraSharp" in " ".join(
            str(n.message) for n in app._notifications))
        assert len(app.store.history()) == 1
        await pilot.press("u")
        await wait_for(pilot, lambda: app.screen.query_one("#answer").value == "4x-UltraSharp")
        await pilot.press("enter")
        await wait_for(pilot, lambda: len(app.store.history()) == 2)
        job = app.store.history()[0].request
        assert job.upscale.upscaler == "4x-UltraSharp" and job.upscale.image == source.path
        assert (job.prompt, job.seed, job.model) == ("a red fox", source.seed, "fake-model.safetensors")



def test_use_settings_keeps_a_hires_upscaler_model_only_when_it_is_installed():
    from core.request import HiresFix
    from tui.png_settings import form_fill

    request = GenerationRequest(model="fake-model", prompt="p", hires=HiresFix(2.0, "4x-UltraSharp", 0, 0.4))
    here = form_fill(request, models=["fake-model"], vaes=[], current_model=None, current_vae=None,
                     upscalers=["4x-UltraSharp"])
    assert here.values["hires"]["upscaler"] == "4x-UltraSharp" and "hires fix ×2 (4x-UltraSharp" in " ".join(here.filled)
    gone = form_fill(request, models=["fake-model"], vaes=[], current_model=None, current_vae=None)
    assert gone.values["hires"]["upscaler"] == "latent"
    assert "the hires upscaler 4x-UltraSharp is not in your models folders (latent used)" in gone.not_used
    from core.request import Upscale

    upscaled = form_fill(request.replace(upscale=Upscale("4x-UltraSharp", "/out/1.png")), models=["fake-model"],
                         vaes=[], current_model=None, current_vae=None, upscalers=["4x-UltraSharp"])
    assert "upscale" not in upscaled.values and any("upscaled with 4x-UltraSharp" in n for n in upscaled.not_used)


def test_queue_details_say_what_an_upscale_job_does_with_names_made_visible():
    from types import SimpleNamespace

    from core.request import HiresFix, Upscale
    from tui.screens.queue import job_parameters

    request = GenerationRequest(model="", upscale=Upscale("4x-Ultra\x1b[2JSharp", "/out/00001-7.png", 2.0),
                                hires=HiresFix(2.0, "4x\x1b[31m", 0, 0.5))
    text = job_parameters(SimpleNamespace(request=request, created=0, started=None, finished=None)).plain
    assert text.startswith("upscale /out/00001-7.png with 4x-Ultra\\x1b[2JSharp ×2\n")
    assert "hires ×2 4x\\x1b[31m" in text and "\x1b" not in text
