"""The face/detail pass (core/detailer.py, core/detectors.py, core/detailer_args.py), with a simulated detector
(neither mediapipe nor ultralytics is installed here): only the detected regions change, each region is exactly
the inpainting job run by hand on the first-pass image with that mask, the confidence threshold and mask steps,
the missing-package messages, field validation, the ADetailer infotext keys and ``--batch`` end to end."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from core import detectors, inpaint
from core.detailer import dilate_erode, region_masks, region_prompts, select, shift
from core.detailer_args import Detailer
from core.detectors import Detection, DetectorError, detector_problem, load_detector
from core.errors import RequestError
from core.lora.tags import LoraRef
from core.metadata import format_infotext, infotext_to_request, read_request
from core.models.registry import ModelRegistry
from core.models.testing import write_random_checkpoint
from core.pipeline import generate, load_model
from core.request import GenerationRequest
from tests.reference import torch_threads

PROMPT, NEGATIVE = "a portrait of a woman in a garden", "blurry"
FACE = (8.0, 8.0, 23.0, 23.0)  # above the threshold below
FAINT = (40.0, 36.0, 55.0, 51.0)  # score 0.2: filtered out at confidence 0.5
HAND = (36.0, 6.0, 51.0, 21.0)


def simulated(image: Image.Image, confidence: float) -> list[Detection]:
    return [Detection(FACE, 0.9), Detection(FAINT, 0.2)]


def two_hands(image: Image.Image, confidence: float) -> list[Detection]:
    return [Detection(HAND, 0.8), Detection(FAINT, 0.7)]


@pytest.fixture(scope="module", autouse=True)
def simulated_detectors():
    detectors.register("sim_face", lambda: simulated)
    detectors.register("sim_hands", lambda: two_hands)
    with torch_threads(1):
        yield
    detectors.unregister("sim_face")
    detectors.unregister("sim_hands")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("detailer")
    models = root / "models"
    (models / "checkpoints").mkdir(parents=True)
    ckpt = write_random_checkpoint(models / "checkpoints" / "tiny-sd15.safetensors", "sd15", "tiny", seed=4)
    return {"root": root, "models": models, "ckpt": ckpt}


@pytest.fixture(scope="module")
def model(files):
    return load_model(files["ckpt"], compute_hash=False)


def base(**changes) -> GenerationRequest:
    fields = dict(model="tiny-sd15", prompt=PROMPT, negative_prompt=NEGATIVE, steps=2, cfg=7.0, seed=5, width=64,
                  height=64)
    return GenerationRequest(**{**fields, **changes})


FACE_PASS = {"model": "sim_face", "confidence": 0.5, "denoise": 0.6, "mask_blur": 4, "dilate_erode": 4}


@pytest.fixture(scope="module")
def runs(model):
    first = generate(model, base())[0][0]
    steps: list[tuple[int, int]] = []
    detailed = generate(model, base(detailer=[FACE_PASS]), on_step=lambda s, t, x: steps.append((s, t)))[0][0]
    return first, detailed, steps


def test_the_pass_changes_only_the_detected_region(runs):
    first, detailed, steps = runs
    [mask] = region_masks(simulated(first, 0.5), Detailer(**FACE_PASS), first.size)
    # the box (corners included) dilated by a 4 px square anchored at its centre: one px before, two after
    assert inpaint.mask_bbox(inpaint.to_tensor(mask)) == (7, 7, 26, 26)
    blurred = inpaint.gaussian_blur(inpaint.to_tensor(mask), 4.0)[0, 0]
    a = inpaint.to_tensor(first)[0]
    b = inpaint.to_tensor(detailed)[0]
    outside = blurred == 0
    assert bool(outside.any()) and torch.equal(a[:, outside], b[:, outside])  # the first pass's pixels
    inside = inpaint.to_tensor(mask)[0, 0] > 0
    assert (a[:, inside] - b[:, inside]).abs().max() > 0.05  # repainted
    # the faint box (score 0.2 < 0.5) was not touched at all
    assert torch.equal(a[:, 36:52, 40:56], b[:, 36:52, 40:56])
    # the region's steps follow the first pass's: 2 + 2 (previews allowed, one image out)
    assert [s for s, _ in steps] == [1, 2, 3, 4] and steps[-1][1] == 4


def test_the_region_is_the_inpainting_job_run_by_hand(runs, model, tmp_path):
    first, detailed, _ = runs
    [mask] = region_masks(simulated(first, 0.5), Detailer(**FACE_PASS), first.size)
    first.save(tmp_path / "first.png")
    mask.save(tmp_path / "mask.png")
    by_hand = base(init_image=str(tmp_path / "first.png"), mask=str(tmp_path / "mask.png"), denoise=0.6,
                   mask_blur=4, inpaint_area="only_masked", only_masked_padding=32)
    assert generate(model, by_hand)[0][0].tobytes() == detailed.tobytes()


def test_each_batch_is_handed_on_detailed_as_soon_as_it_is_made(model, runs):
    """A batch_count 2 job with a detail pass: ``on_images`` gets batch 1's detailed image before batch 2 is
    sampled (the worker saves it then), each one what its seed gives alone, and the steps count on without
    going back (2 + 2 for the first image, then the second's)."""
    _, detailed, _ = runs
    handed: list[list[tuple[Image.Image, int]]] = []
    steps: list[tuple[int, int, int]] = []  # (step, total, batches handed on by then)

    def on_step(step: int, total: int, x0) -> None:
        steps.append((step, total, len(handed)))

    images = generate(model, base(detailer=[FACE_PASS], batch_count=2), on_step=on_step, on_images=handed.append)
    assert [[seed for _, seed in batch] for batch in handed] == [[5], [6]]
    assert handed[0][0][0].tobytes() == detailed.tobytes() == images[0][0].tobytes()
    alone = generate(model, base(detailer=[FACE_PASS], seed=6))[0][0]
    assert handed[1][0][0].tobytes() == alone.tobytes()
    assert [s for s, _, _ in steps] == list(range(1, len(steps) + 1))
    assert all(batches == 0 for s, _, batches in steps if s <= 4)  # the first image's steps, before it was handed
    assert all(total >= step for step, total, _ in steps) and steps[-1][0] == steps[-1][1]


def test_regions_run_one_after_another_with_their_own_prompts_and_seeds(model, runs, tmp_path):
    first = runs[0]
    entry = {"model": "sim_hands", "prompt": "a left hand [SEP] [PROMPT], detailed", "denoise": 0.5,
             "mask_blur": 2, "dilate_erode": 0, "inpaint_padding": 8, "steps": 1, "cfg": 5.0}
    detailed = generate(model, base(detailer=[entry]))[0][0]
    image = first
    for j, (box, prompt) in enumerate(((HAND, "a left hand"), (FAINT, f"{PROMPT}, detailed"))):
        [mask] = region_masks([Detection(box, 1.0)], Detailer(model="x", dilate_erode=0), first.size)
        image.save(tmp_path / f"in{j}.png")
        mask.save(tmp_path / f"m{j}.png")
        hand = base(prompt=prompt, init_image=str(tmp_path / f"in{j}.png"), mask=str(tmp_path / f"m{j}.png"),
                    denoise=0.5, mask_blur=2, inpaint_area="only_masked", only_masked_padding=8, steps=1, cfg=5.0,
                    seed=5 + j)
        image = generate(model, hand)[0][0]
    assert image.tobytes() == detailed.tobytes()


def test_selection_and_mask_steps():
    d = Detailer(model="x", confidence=0.5, mask_min_ratio=0.01, mask_k_largest=2)
    found = [Detection((0, 0, 10, 10), 0.9), Detection((0, 0, 2, 2), 0.9), Detection((0, 0, 30, 30), 0.4),
             Detection((0, 0, 20, 20), 0.6), Detection((0, 0, 5, 5), 0.95)]
    # 0.4 is below the threshold, 2x2 below 1% of 64x64; of the rest the two largest, by ascending area
    assert [x.box for x in select(found, d, (64, 64))] == [(0, 0, 10, 10), (0, 0, 20, 20)]
    one = torch.zeros((1, 1, 8, 8))
    one[..., 3, 3] = 1
    assert torch.nonzero(shift(one, 2, 1)[0, 0]).tolist() == [[2, 5]]  # 2 right, 1 up
    assert int(dilate_erode(one, 3).sum()) == 9 and int(dilate_erode(dilate_erode(one, 3), -3).sum()) == 1
    merged = region_masks(found[:2], Detailer(model="x", dilate_erode=0, mask_merge_invert="merge_and_invert"),
                          (16, 16))
    assert len(merged) == 1 and merged[0].getpixel((5, 5)) == 0 and merged[0].getpixel((12, 12)) == 255
    assert region_prompts("", "job") == ["job"]
    assert region_prompts("a [SEP][PROMPT] b", "job") == ["a", "job b"]


def test_missing_packages_say_what_to_install(monkeypatch, files, tmp_path):
    monkeypatch.setattr(detectors, "_installed", lambda package: False)
    problem = detector_problem("mediapipe_face_full")
    assert problem == ("detector 'mediapipe_face_full' needs the mediapipe package: pip install 'darkroom[detailer]'")
    assert "pip install ultralytics" in detector_problem("face_yolov8n.pt")
    with pytest.raises(DetectorError, match="pip install ultralytics"):
        load_detector("hand_yolov8n.pt")
    assert "mediapipe_face_full, mediapipe_face_short, mediapipe_face_mesh" in detector_problem("mediapipe_hands")
    assert detector_problem("sim_face") is None  # a registered detector needs nothing
    # with ultralytics installed: the YOLO file is looked for in models/adetailer and models/ultralytics
    monkeypatch.setattr(detectors, "_installed", lambda package: True)
    registry = ModelRegistry([files["models"]])
    assert "face_yolov8n.pt" in detector_problem("face_yolov8n.pt", registry)
    (files["models"] / "ultralytics" / "bbox").mkdir(parents=True, exist_ok=True)
    (files["models"] / "ultralytics" / "bbox" / "face_yolov8n.pt").write_bytes(b"not read here")
    registry = ModelRegistry([files["models"]])
    assert detector_problem("face_yolov8n.pt", registry) is None
    assert [m.name for m in registry.detectors()] == ["bbox/face_yolov8n"]


def test_fields_are_validated_with_one_message_each():
    with pytest.raises(RequestError) as caught:
        GenerationRequest.from_dict({"model": "m", "detailer": [
            {"model": "face_yolov8n.pt", "confidence": 1.5, "ad_denoising_strength": 0.3},
            {"model": "hand_yolov8n.pt", "mask_merge_invert": "Merge", "inpaint_width": 100}]})
    text = str(caught.value)
    assert "detailer[0].ad_denoising_strength = 0.3 is invalid: not a detailer field; did you mean 'denoise'?" in text
    assert "detailer[0].confidence = 1.5 is invalid: a number from 0.0 to 1.0" in text
    assert "detailer[1].mask_merge_invert = 'Merge' is invalid: one of none, merge, merge_and_invert" in text
    assert "detailer[1].inpaint_width = 100 is invalid: 0 (the job's) or a multiple of 8" in text
    with pytest.raises(RequestError, match="at most 2 detail passes"):
        GenerationRequest(model="m", detailer=[{"model": "a"}] * 3)
    with pytest.raises(RequestError, match=r"detailer\[0\]\.model = None"):
        GenerationRequest(model="m", detailer=[{"prompt": "face"}])


def test_infotext_has_adetailers_keys_and_reads_back(tmp_path):
    request = base(detailer=[
        {"model": "face_yolov8n.pt", "prompt": "detailed face, smile", "confidence": 0.35, "mask_k_largest": 1},
        {"model": "hand_yolov8n.pt", "inpaint_only_masked": False, "steps": 12, "cfg": 4.5,
         "mask_merge_invert": "merge"}])
    text = format_infotext(request, 5)
    assert ('ADetailer model: face_yolov8n.pt, ADetailer prompt: "detailed face, smile", ADetailer confidence: '
            "0.35, ADetailer mask only top k largest: 1, ADetailer dilate erode: 4, ADetailer mask blur: 4, "
            "ADetailer denoising strength: 0.4, ADetailer inpaint only masked: True, ADetailer inpaint padding: 32, "
            "ADetailer model 2nd: hand_yolov8n.pt") in text
    assert ("ADetailer mask merge invert 2nd: Merge, ADetailer mask blur 2nd: 4, ADetailer denoising strength 2nd: "
            "0.4, ADetailer inpaint only masked 2nd: False, ADetailer use separate steps 2nd: True, ADetailer steps "
            "2nd: 12, ADetailer use separate CFG scale 2nd: True, ADetailer CFG scale 2nd: 4.5") in text
    back = infotext_to_request(text)
    assert back.detailer == request.detailer
    assert not any(key.startswith("ADetailer") for key in back.extra)
    assert GenerationRequest.from_dict(json.loads(json.dumps(request.to_dict()))) == request
    # an A1111 image's ADetailer keys (with its version key, kept in extra)
    a1111 = (f"{PROMPT}\nSteps: 20, Sampler: Euler a, Seed: 1, Size: 512x512, Model: m, ADetailer model: "
             "mediapipe_face_full, ADetailer confidence: 0.3, ADetailer dilate erode: 4, ADetailer mask blur: 4, "
             "ADetailer denoising strength: 0.4, ADetailer inpaint only masked: True, ADetailer inpaint padding: "
             "32, ADetailer version: 24.11.1")
    read = infotext_to_request(a1111)
    assert read.detailer == (Detailer(model="mediapipe_face_full"),) and read.extra["ADetailer version"] == "24.11.1"


def test_batch_runs_the_pass_end_to_end_and_refuses_a_missing_package(files, runs, tmp_path, monkeypatch):
    from cli.batch import run_batch

    monkeypatch.setenv("DARKROOM_HOME", str(tmp_path / "home"))
    job = {"model": "tiny-sd15", "prompt": PROMPT, "negative_prompt": NEGATIVE, "steps": 2, "seed": 5, "width": 64,
           "height": 64, "detailer": [FACE_PASS]}
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps(job))

    def run() -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = run_batch(str(jobs), models_dirs=[files["models"]], output_dir=tmp_path / "out",
                         db_path=tmp_path / "db.sqlite3", stdout=out, stderr=err, rich_progress=False)
        return code, out.getvalue(), err.getvalue()

    code, out, err = run()
    assert code == 0, err
    [path] = out.splitlines()
    assert Image.open(path).convert("RGB").tobytes() == runs[1].tobytes()
    assert "ADetailer model: sim_face" in Image.open(path).text["parameters"]
    assert read_request(path).detailer == (Detailer(**FACE_PASS),)

    job["detailer"] = [{"model": "face_yolov8n.pt"}]
    jobs.write_text(json.dumps(job))
    monkeypatch.setattr(detectors, "_installed", lambda package: False)
    code, out, err = run()
    assert code == 2 and out == ""
    assert "job 1: detailer[0].model: detector 'face_yolov8n.pt' is a YOLO model, which needs the ultralytics " \
           "package: pip install ultralytics" in err
    assert "Traceback" not in err


def test_batch_merges_a_detail_prompts_lora_and_names_a_missing_one(files, model, tmp_path, monkeypatch):
    """Through the runner: the registry finds the detail prompt's LoRA in loras/ and the image is the pass
    with it merged; a LoRA that is not there fails that job with a message naming it."""
    from cli.batch import EXIT_MODEL, run_batch
    from core.lora.files import LoraFileCache
    from core.lora.patch import activate
    from core.models.testing import write_random_lora

    monkeypatch.setenv("DARKROOM_HOME", str(tmp_path / "home"))
    models = tmp_path / "models"
    (models / "checkpoints").mkdir(parents=True)
    (models / "checkpoints" / files["ckpt"].name).symlink_to(files["ckpt"])
    lora_file = write_random_lora(models / "loras" / "face.safetensors", seed=7, strength=1.0)
    entry = {**FACE_PASS, "prompt": "<lora:face:1> a detailed face"}
    job = {"model": "tiny-sd15", "prompt": PROMPT, "negative_prompt": NEGATIVE, "steps": 2, "seed": 5, "width": 64,
           "height": 64, "detailer": [entry]}
    jobs = tmp_path / "jobs.jsonl"

    def run(*entries) -> tuple[int, str, str]:
        jobs.write_text("\n".join(json.dumps({**job, "detailer": [e]}) for e in entries))
        out, err = io.StringIO(), io.StringIO()
        code = run_batch(str(jobs), models_dirs=[models], output_dir=tmp_path / "out",
                         db_path=tmp_path / "db.sqlite3", stdout=out, stderr=err, rich_progress=False)
        return code, out.getvalue(), err.getvalue()

    code, out, err = run(entry)
    assert code == 0, err
    [path] = out.splitlines()
    files_cache = LoraFileCache()
    expected = generate(model, base(detailer=[entry]),
                        use_loras=lambda refs: activate(model.loras, refs, lambda name: lora_file, files_cache))[0][0]
    assert Image.open(path).convert("RGB").tobytes() == expected.tobytes()
    # a detail prompt's missing LoRA is found before any job runs, as a job prompt's is
    code, out, err = run(entry, {**entry, "prompt": "<lora:nosuch:1> a face"})
    assert code == EXIT_MODEL and out == "" and "Traceback" not in err
    assert "job 2: LoRA 'nosuch' not found in" in err and "started" not in err


def test_list_models_lists_the_detectors(files, tmp_path, monkeypatch):
    from cli.list_models import list_models

    (files["models"] / "adetailer").mkdir(exist_ok=True)
    (files["models"] / "adetailer" / "hand_yolov8n.pt").write_bytes(b"\0" * 2048)
    monkeypatch.setattr(detectors, "_installed", lambda package: False)
    out, err = io.StringIO(), io.StringIO()
    assert list_models([files["models"]], out, err) == 0, err.getvalue()
    [line] = [line for line in out.getvalue().splitlines() if "hand_yolov8n" in line]
    assert line.startswith("detectors/hand_yolov8n") and "YOLO detector" in line
    assert line.endswith("needs ultralytics: pip install ultralytics")


def test_presets_and_toml_jobs_take_the_field(tmp_path):
    from cli.batch import parse_jobs
    from core.presets import PresetError, validate_fields

    fields = validate_fields({"detailer": [{"model": "face_yolov8n.pt", "denoise": 0.3}]})
    assert GenerationRequest.from_dict({"model": "m", **fields}).detailer == (
        Detailer(model="face_yolov8n.pt", denoise=0.3),)
    with pytest.raises(PresetError, match=r"detailer\[0\]\.denoise"):
        validate_fields({"detailer": [{"model": "face_yolov8n.pt", "denoise": 3}]})
    text = ('[[job]]\nmodel = "m"\nprompt = "a"\n[[job.detailer]]\nmodel = "face_yolov8n.pt"\nprompt = "a face"\n'
            '[[job.detailer]]\nmodel = "hand_yolov8n.pt"\nconfidence = 0.5\n')
    [parsed] = parse_jobs(text, "jobs.toml", base_dir=tmp_path)
    assert [(d.model, d.prompt, d.confidence) for d in parsed.request.detailer] == [
        ("face_yolov8n.pt", "a face", 0.3), ("hand_yolov8n.pt", "", 0.5)]


def test_a_region_job_takes_the_pass_settings_and_the_familys_size_multiple():
    from core.detailer import region_request

    job = base(prompt="<lora:detail:0.5> a portrait", batch_size=2, cfg=6.0)
    d = Detailer(model="x", inpaint_width=72, steps=3, denoise=0.3, inpaint_only_masked=False)
    region = region_request(job, d, "<lora:other:1> a face", "", 9, multiple=16)
    assert (region.width, region.height, region.steps, region.cfg, region.denoise) == (80, 64, 3, 6.0, 0.3)
    assert (region.inpaint_area, region.batch_size, region.seed, region.detailer) == ("whole", 1, 9, ())
    # a detail prompt's tags are its regions' LoRAs, with the job's loras list, in place of the job prompt's
    listed = LoraRef("listed", 0.8, 0.8)
    region = region_request(job.replace(loras=(listed,)), d, "<lora:other:1> a face", "", 9, multiple=16)
    assert region.prompt == " a face" and region.lora_refs() == (listed, LoraRef("other", 1.0))
    # one without tags keeps every LoRA of the job
    region = region_request(job.replace(loras=(listed,)), d, "a face", "", 9)
    assert region.lora_refs() == (listed, LoraRef("detail", 0.5))


def test_a_detail_prompts_lora_tag_is_merged_for_its_region_and_the_jobs_set_merged_back(model, runs, tmp_path):
    """``<lora:face:1>`` in the detail prompt: the region is the inpainting job run by hand with that LoRA merged
    (and differs from the same pass without it); afterwards the job's (empty) set is merged again."""
    from core.lora.files import LoraFileCache
    from core.lora.patch import activate
    from core.models.testing import write_random_lora

    lora_file = write_random_lora(tmp_path / "face.safetensors", seed=7, strength=1.0)
    files = LoraFileCache()

    def use_loras(refs):
        activate(model.loras, refs, lambda name: lora_file, files)

    used = []
    entry = {**FACE_PASS, "prompt": "<lora:face:1> a detailed face"}
    detailed = generate(model, base(detailer=[entry]), use_loras=lambda refs: (used.append(tuple(refs)),
                                                                               use_loras(refs)))[0][0]
    face = LoraRef("face", 1.0)
    assert used == [(face,), ()] and model.loras.requested == ()
    first = runs[0]
    [mask] = region_masks(simulated(first, 0.5), Detailer(**FACE_PASS), first.size)
    first.save(tmp_path / "first.png")
    mask.save(tmp_path / "mask.png")
    by_hand = base(prompt=" a detailed face", loras=(face,), init_image=str(tmp_path / "first.png"),
                   mask=str(tmp_path / "mask.png"), denoise=0.6, mask_blur=4, inpaint_area="only_masked",
                   only_masked_padding=32)
    use_loras(by_hand.lora_refs())
    try:
        assert generate(model, by_hand)[0][0].tobytes() == detailed.tobytes()
    finally:
        use_loras(())
    without = generate(model, base(detailer=[{**entry, "prompt": "a detailed face"}]))[0][0]
    assert without.tobytes() != detailed.tobytes()
    # without a way to merge LoRAs (a bare generate() call), the tag is one clear error, not ignored
    with pytest.raises(RequestError, match=r"detailer\[0\]\.prompt"):
        generate(model, base(detailer=[entry]))


def test_the_mediapipe_and_ultralytics_adapters_against_stand_in_packages(monkeypatch, files):
    """Neither package is installed here: stand-ins with their APIs' shapes (mediapipe's FaceDetection with
    relative boxes, ultralytics' YOLO results with xyxy boxes, scores and segmentation masks) check the
    adapters' conversions."""
    import sys
    import types
    from types import SimpleNamespace

    calls: dict = {}

    class FaceDetection:
        def __init__(self, model_selection: int, min_detection_confidence: float) -> None:
            calls["mediapipe"] = (model_selection, min_detection_confidence)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def process(self, array):
            calls["array"] = array.shape
            box = SimpleNamespace(xmin=0.25, ymin=0.5, width=0.25, height=0.25)
            return SimpleNamespace(detections=[SimpleNamespace(
                location_data=SimpleNamespace(relative_bounding_box=box), score=[0.8])])

    class FaceMesh(FaceDetection):
        def __init__(self, static_image_mode: bool, max_num_faces: int, min_detection_confidence: float) -> None:
            calls["mesh"] = (static_image_mode, min_detection_confidence)

        def process(self, array):  # a diamond of four landmarks (0-3) and two "eyes" (4-5, 6-7) inside it
            rel = [(0.5, 0.25), (0.75, 0.5), (0.5, 0.75), (0.25, 0.5), (0.375, 0.375), (0.4375, 0.4375),
                   (0.5625, 0.375), (0.625, 0.4375), (0.5, 0.5)]
            return SimpleNamespace(multi_face_landmarks=[
                SimpleNamespace(landmark=[SimpleNamespace(x=x, y=y) for x, y in rel])])

    mesh = SimpleNamespace(FaceMesh=FaceMesh, FACEMESH_LEFT_EYE={(4, 5)}, FACEMESH_RIGHT_EYE={(6, 7)})
    mediapipe = types.ModuleType("mediapipe")
    mediapipe.solutions = SimpleNamespace(face_detection=SimpleNamespace(FaceDetection=FaceDetection),
                                          face_mesh=mesh)

    class YOLO:
        def __init__(self, path: str) -> None:
            calls["yolo"] = path

        def __call__(self, image, conf, verbose):
            calls["conf"] = conf
            data = torch.zeros((1, 16, 16))
            data[0, 4:8, 8:12] = 1
            return [SimpleNamespace(boxes=SimpleNamespace(xyxy=torch.tensor([[16.0, 8.0, 24.0, 16.0]]),
                                                          conf=torch.tensor([0.7])),
                                    masks=SimpleNamespace(data=data))]

    ultralytics = types.ModuleType("ultralytics")
    ultralytics.YOLO = YOLO
    monkeypatch.setitem(sys.modules, "mediapipe", mediapipe)
    monkeypatch.setitem(sys.modules, "ultralytics", ultralytics)
    monkeypatch.setattr(detectors, "_installed", lambda package: True)
    monkeypatch.setattr(detectors, "_YOLO", {})  # the stand-in model is not kept past this test
    image = Image.new("RGB", (64, 32))

    [face] = load_detector("mediapipe_face_short")(image, 0.4)
    assert calls["mediapipe"] == (0, 0.4) and calls["array"] == (32, 64, 3)
    assert face.box == (16.0, 16.0, 32.0, 24.0) and face.score == 0.8 and face.mask is None

    square = Image.new("RGB", (64, 64))
    [outline] = load_detector("mediapipe_face_mesh")(square, 0.3)
    assert calls["mesh"] == (True, 0.3) and outline.box == (16.0, 16.0, 49.0, 49.0)  # the hull, filled
    assert outline.mask.getpixel((32, 32)) == 255 and outline.mask.getpixel((18, 18)) == 0  # a diamond
    [eyes] = load_detector("mediapipe_face_mesh_eyes_only")(square, 0.3)
    assert eyes.box == (24.0, 24.0, 41.0, 29.0) and eyes.mask.getpixel((32, 26)) == 0  # two eyes, apart

    (files["models"] / "adetailer").mkdir(exist_ok=True)
    (files["models"] / "adetailer" / "person_yolov8n-seg.pt").write_bytes(b"ultralytics' own")
    [person] = load_detector("person_yolov8n-seg.pt", ModelRegistry([files["models"]]))(image, 0.25)
    assert calls["yolo"].endswith("person_yolov8n-seg.pt") and calls["conf"] == 0.25
    assert person.box == (16.0, 8.0, 24.0, 16.0) and person.score == pytest.approx(0.7)
    assert person.mask.size == (64, 32)  # the 16x16 mask scaled to the image: columns 32-47, rows 8-15
    assert inpaint.mask_bbox(inpaint.to_tensor(person.mask)) == (32, 8, 48, 16)


def test_an_inpainting_job_keeps_only_the_regions_touching_its_mask(tmp_path):
    from core.detailer import inside_job_mask

    job_mask = Image.new("L", (32, 32), 0)
    job_mask.paste(255, (0, 0, 8, 8))
    job_mask.save(tmp_path / "mask.png")
    touching, apart = Image.new("L", (64, 64), 0), Image.new("L", (64, 64), 0)
    touching.paste(255, (10, 10, 20, 20))  # in the scaled mask's 16x16 corner
    apart.paste(255, (40, 40, 50, 50))
    assert inside_job_mask([touching, apart], str(tmp_path / "mask.png")) == [touching]
