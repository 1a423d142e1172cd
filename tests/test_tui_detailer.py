"""Pilot test of the Generate form's detailer field (the face pass's detector and denoise) and its queue-time
check of the detector's package."""

from __future__ import annotations

import pytest
from textual.widgets import Input

from core import detectors
from tests.test_tui_advanced import gated_app, ready
from tests.tui_fakes import wait_for


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DARKROOM_HOME", str(tmp_path / "home"))


async def test_detailer_field_reaches_the_request_and_a_missing_package_is_said(tmp_path, monkeypatch):
    monkeypatch.setattr(detectors, "_installed", lambda package: False)
    detectors.register("sim_face", lambda: lambda image, confidence: [])
    try:
        app = gated_app(tmp_path)
        async with app.run_test(size=(140, 50)) as pilot:
            screen = await ready(pilot, app)
            screen.query_one("#detailer-model", Input).value = "face_yolov8n.pt"
            with pytest.raises(Exception, match="pip install ultralytics"):
                screen.build_request()
            screen.query_one("#detailer-model", Input).value = "sim_face"
            screen.query_one("#detailer-denoise", Input).value = "0.3"
            await pilot.press("ctrl+j")
            await wait_for(pilot, lambda: len(app.store.list_jobs()) == 1)
            [entry] = app.store.list_jobs()[0].request.detailer
            assert (entry.model, entry.denoise, entry.confidence) == ("sim_face", 0.3, 0.3)
            # a history row's two passes fill the field with the first; the second is kept and sent
            screen.set_form_values({"detailer": [{"model": "sim_face", "denoise": 0.5, "mask_blur": 8},
                                                 {"model": "sim_face", "steps": 4}]})
            assert screen.query_one("#detailer-model", Input).value == "sim_face"
            request = screen.build_request()
            assert [(d.denoise, d.mask_blur, d.steps) for d in request.detailer] == [(0.5, 8, 0), (0.4, 4, 4)]
            screen.query_one("#detailer-model", Input).value = ""
            assert screen.build_request().detailer == ()
    finally:
        detectors.unregister("sim_face")


def test_queue_and_history_name_the_detail_passes():
    from types import SimpleNamespace

    from core.request import GenerationRequest
    from tui.screens.history import describe
    from tui.screens.queue import job_parameters

    request = GenerationRequest(model="m", detailer=[{"model": "face_yolov8n.pt", "prompt": "a smile"},
                                                     {"model": "hand_yolov8n.pt", "denoise": 0.3}])
    said = "face_yolov8n.pt (denoise 0.4, prompt 'a smile'); hand_yolov8n.pt (denoise 0.3)"
    queued = job_parameters(SimpleNamespace(request=request, created=0, started=None, finished=None)).plain
    assert f"detailer {said}" in queued
    assert f"detailer: {said}" in describe({"request": request, "seed": 1, "path": "x.png", "created": 0}).plain


def test_an_images_detail_passes_fill_the_form():
    from core.metadata import infotext_to_request
    from tui.png_settings import form_fill

    request = infotext_to_request("a\nSteps: 20, Sampler: Euler, Seed: 1, Size: 64x64, Model: m, ADetailer model: "
                                  "face_yolov8n.pt, ADetailer denoising strength: 0.35")
    fill = form_fill(request, models=["m"], vaes=[], current_model="m", current_vae=None)
    assert fill.values["detailer"][0]["model"] == "face_yolov8n.pt"
    assert "detailer face_yolov8n.pt (denoise 0.35)" in fill.filled


def test_the_detailer_field_completes_the_detectors_found():
    import asyncio

    from tui.screens.generate import NamesSuggester

    names = ["mediapipe_face_full", "mediapipe_face_short", "face_yolov8n.pt"]
    suggester = NamesSuggester(lambda: names)
    assert asyncio.run(suggester.get_suggestion("face")) == "face_yolov8n.pt"
    assert asyncio.run(suggester.get_suggestion("mediapipe_face_s")) == "mediapipe_face_short"
    assert asyncio.run(suggester.get_suggestion("hand")) is None


async def test_a_missing_detector_package_is_said_with_the_forms_other_bad_fields(tmp_path, monkeypatch):
    """One queue names every problem: the package to install came only once the other fields were fixed."""
    monkeypatch.setattr(detectors, "_installed", lambda package: False)
    app = gated_app(tmp_path)
    async with app.run_test(size=(140, 50)) as pilot:
        screen = await ready(pilot, app)
        screen.query_one("#detailer-model", Input).value = "mediapipe_face_full"
        screen.query_one("#steps", Input).value = "0"
        with pytest.raises(Exception) as caught:
            screen.build_request()
        lines = str(caught.value).splitlines()
        assert lines[0].startswith("Steps: steps = 0 is invalid")
        assert lines[1] == ("Detailer: detailer[0].model = 'mediapipe_face_full' is invalid: detector "
                            "'mediapipe_face_full' needs the mediapipe package: pip install 'darkroom[detailer]'")
