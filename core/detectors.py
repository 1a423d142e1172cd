"""Detectors for the detail pass: image -> regions (box, score, optional mask), behind one small interface.

A detector is a callable ``detect(image, confidence) -> list[Detection]``. Which one a ``detailer`` entry's
``model`` names, in this order:

- a detector registered with ``register`` (tests register simulated ones; nothing else needs to change);
- ``mediapipe_face_full`` / ``mediapipe_face_short``: mediapipe's face detector (its full-range and short-range
  models ship inside the ``mediapipe`` package, ADetailer's names), ``mediapipe_face_mesh`` /
  ``mediapipe_face_mesh_eyes_only``: its face mesh (the landmarks' convex hull is the mask):
  ``pip install 'darkroom[detailer]'``;
- anything else is a YOLO detection (or segmentation) model file such as ``face_yolov8n.pt`` /
  ``hand_yolov8n.pt`` in ``models/adetailer`` or ``models/ultralytics`` (``ModelRegistry.find_detector``), run by
  the ``ultralytics`` package (``pip install ultralytics``). Such a ``.pt`` file is a pickle, and ultralytics
  loads it with its own ``torch.load`` (as ADetailer does): it can run code, so use files from sources you
  trust. Darkroom itself never unpickles it.

``detector_problem`` (torch-free, no import of either package: ``importlib.util.find_spec``) says at queue time
what is missing, so ``--batch`` exits 2 before any model loads and the TUI refuses to queue.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import DarkroomError

if TYPE_CHECKING:  # the TUI imports this module for its names before the first paint, which needs no PIL
    from PIL import Image

# ADetailer's mediapipe names: FaceDetection's model_selection (1: full range, 5 m; 0: short range, 2 m), and
# FaceMesh's landmarks (the face's outline, or the eyes' alone) as the region's mask
MEDIAPIPE_MODELS = {"mediapipe_face_full": 1, "mediapipe_face_short": 0, "mediapipe_face_mesh": "mesh",
                    "mediapipe_face_mesh_eyes_only": "eyes"}
INSTALL_MEDIAPIPE = "pip install 'darkroom[detailer]'"
INSTALL_ULTRALYTICS = "pip install ultralytics"


class DetectorError(DarkroomError):
    """A detail pass's detector cannot be used (package missing, model file not found)."""


@dataclass(frozen=True)
class Detection:
    """One detected region: ``box`` (x1, y1, x2, y2) in pixels of the image, its ``score`` in [0, 1], and a
    segmentation ``mask`` (``L``, the image's size, 255 = the region) when the model gives one, else None (the
    box is the mask)."""

    box: tuple[float, float, float, float]
    score: float
    mask: Image.Image | None = None


Detector = Callable[["Image.Image", float], list[Detection]]

_REGISTERED: dict[str, Callable[[], Detector]] = {}


def register(name: str, factory: Callable[[], Detector]) -> None:
    """Make ``name`` a detector (``factory()`` builds it when a job uses it); replaces one of that name."""
    _REGISTERED[name] = factory


def unregister(name: str) -> None:
    _REGISTERED.pop(name, None)


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def _is_mediapipe(name: str) -> bool:
    return name.lower().startswith("mediapipe")


def detector_problem(name: str, registry: Any = None) -> str | None:
    """Why the detector ``name`` cannot run here (one sentence saying what to install or where to put the
    file), or None. Torch-free; imports neither mediapipe nor ultralytics."""
    if name in _REGISTERED:
        return None
    if _is_mediapipe(name):
        if name not in MEDIAPIPE_MODELS:
            return (f"detector {name!r} is not one of mediapipe's face detectors Darkroom runs: "
                    + ", ".join(MEDIAPIPE_MODELS))
        if not _installed("mediapipe"):
            return f"detector {name!r} needs the mediapipe package: {INSTALL_MEDIAPIPE}"
        return None
    if not _installed("ultralytics"):
        return (f"detector {name!r} is a YOLO model, which needs the ultralytics package: {INSTALL_ULTRALYTICS} "
                f"(or use mediapipe_face_full after {INSTALL_MEDIAPIPE})")
    if registry is not None:
        try:
            registry.find_detector(name)
        except DarkroomError as exc:
            folders = ", ".join(str(d) for d in registry.part_dirs("detector"))
            return f"detector {name!r}: {exc} (YOLO .pt files go in {folders})"
    return None


def request_problems(request: Any, registry: Any = None) -> list[str]:
    """``detector_problem`` for each of a request's ``detailer`` entries, naming the entry."""
    out = []
    for index, entry in enumerate(getattr(request, "detailer", ())):
        problem = detector_problem(entry.model, registry)
        if problem is not None:
            out.append(f"detailer[{index}].model: {problem}")
    return out


def load_detector(name: str, registry: Any = None) -> Detector:
    """The detector ``name`` (see the module's docstring), or a ``DetectorError`` saying what is missing."""
    if name in _REGISTERED:
        return _REGISTERED[name]()
    problem = detector_problem(name, registry)
    if problem is not None:
        raise DetectorError(problem)
    if _is_mediapipe(name):
        kind = MEDIAPIPE_MODELS[name]
        return _mediapipe_mesh(kind == "eyes") if isinstance(kind, str) else _mediapipe_detector(kind)
    path = registry.find_detector(name) if registry is not None else Path(name)
    return _yolo_detector(Path(path))


def _mediapipe_detector(selection: int) -> Detector:
    def detect(image: Image.Image, confidence: float) -> list[Detection]:
        import mediapipe as mp
        import numpy as np  # mediapipe's own dependency (it takes arrays); imported only where mediapipe is

        width, height = image.size
        with mp.solutions.face_detection.FaceDetection(
            model_selection=selection, min_detection_confidence=confidence
        ) as faces:
            result = faces.process(np.asarray(image.convert("RGB")))
        out = []
        for found in result.detections or []:
            box = found.location_data.relative_bounding_box
            x1, y1 = max(box.xmin, 0.0) * width, max(box.ymin, 0.0) * height
            x2 = min(box.xmin + box.width, 1.0) * width
            y2 = min(box.ymin + box.height, 1.0) * height
            out.append(Detection((x1, y1, x2, y2), float(found.score[0])))
        return out

    return detect


def convex_hull(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The convex hull of ``points`` (Andrew's monotone chain), counter-clockwise."""
    pts = sorted(set(points))
    if len(pts) <= 2:
        return pts

    def half(seq: list[tuple[float, float]]) -> list[tuple[float, float]]:
        out: list[tuple[float, float]] = []
        for p in seq:
            while len(out) >= 2 and ((out[-1][0] - out[-2][0]) * (p[1] - out[-2][1])
                                     - (out[-1][1] - out[-2][1]) * (p[0] - out[-2][0])) <= 0:
                out.pop()
            out.append(p)
        return out[:-1]

    return half(pts) + half(pts[::-1])


def _mediapipe_mesh(eyes_only: bool) -> Detector:
    def detect(image: Image.Image, confidence: float) -> list[Detection]:
        import mediapipe as mp
        import numpy as np  # mediapipe's own dependency (it takes arrays); imported only where mediapipe is
        from PIL import Image, ImageDraw

        mesh = mp.solutions.face_mesh
        width, height = image.size
        with mesh.FaceMesh(static_image_mode=True, max_num_faces=20, min_detection_confidence=confidence) as faces:
            result = faces.process(np.asarray(image.convert("RGB")))
        groups = ([sorted({i for edge in mesh.FACEMESH_LEFT_EYE for i in edge}),
                   sorted({i for edge in mesh.FACEMESH_RIGHT_EYE for i in edge})] if eyes_only else [None])
        out = []
        for face in result.multi_face_landmarks or []:
            points = [(p.x * width, p.y * height) for p in face.landmark]
            mask = Image.new("L", image.size, 0)
            draw = ImageDraw.Draw(mask)
            for group in groups:
                chosen = points if group is None else [points[i] for i in group]
                draw.polygon(convex_hull(chosen), fill=255)
            box = mask.getbbox()
            if box is not None:  # no score in a mesh: its detection passed min_detection_confidence
                out.append(Detection(tuple(float(v) for v in box), 1.0, mask))
        return out

    return detect


_YOLO: dict[str, Any] = {}  # path -> the loaded ultralytics model (one per file, kept while the process runs)


def _yolo_detector(path: Path) -> Detector:
    def detect(image: Image.Image, confidence: float) -> list[Detection]:
        model = _YOLO.get(str(path))
        if model is None:
            from ultralytics import YOLO  # loads the .pt pickle itself (torch.load), as ADetailer relies on

            model = _YOLO[str(path)] = YOLO(str(path))
        result = model(image.convert("RGB"), conf=confidence, verbose=False)[0]
        boxes = result.boxes.xyxy.tolist()
        scores = result.boxes.conf.tolist()
        masks: list[Image.Image | None] = [None] * len(boxes)
        if getattr(result, "masks", None) is not None:  # a segmentation model: its masks at the image's size
            import torch.nn.functional as F

            from core.inpaint import to_image

            data = result.masks.data.float().cpu()[:, None]
            data = F.interpolate(data, size=(image.height, image.width), mode="bilinear", align_corners=False)
            masks = [to_image((m[None] > 0.5).float()) for m in data]
        return [Detection(tuple(b), float(s), m) for b, s, m in zip(boxes, scores, masks, strict=False)]

    return detect
