"""Generate screen: the request form on the left, the live preview on the right."""

from __future__ import annotations

import dataclasses
import importlib
import os
import random
from pathlib import Path
from typing import Any

from rich.text import Text
from textual import events, on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.suggester import Suggester
from textual.widget import Widget
from textual.widgets import Button, Checkbox, Collapsible, Label, Select, Switch

from core.detailer_args import Detailer
from core.detectors import MEDIAPIPE_MODELS
from core.errors import DarkroomError, RequestError
from core.events import Event, ImageSaved, JobCancelled, JobFailed, JobFinished, JobStarted, JobStep
from core.request import (
    IMG2IMG_DENOISE,
    INPAINT_AREAS,
    MAX_SEED,
    UPSCALERS,
    GenerationRequest,
    HiresFix,
    family_fields,
    family_problems,
    family_warnings,
    prompt_syntax_warnings,
    resolve_init_image,
    sampler_problem,
    schedule_problem,
)
from core.sampling import SAMPLER_LABELS, SCHEDULE_LABELS
from core.text import visible
from tui.screens.base import MainScreen
from tui.widgets.footer import StableFooter
from tui.widgets.preview import PreviewPane
from tui.widgets.safe_input import Input, TextArea

SIZE_PRESETS = [
    (512, 512), (512, 768), (768, 512), (640, 640), (768, 768), (832, 1216), (1216, 832),
    (896, 1152), (1152, 896), (1024, 1024),
]
# Form fields shown as Inputs: name -> (label, type)
NUMBER_FIELDS = {
    "steps": int, "cfg": float, "seed": int, "width": int, "height": int, "batch_size": int, "batch_count": int,
}
# Advanced section: request fields (clip skip, img2img strength) and hires-fix fields as Inputs.
ADVANCED_NUMBER_FIELDS = {"clip_skip": int, "denoise": float, "mask_blur": int}
HIRES_NUMBER_FIELDS = {"scale": float, "steps": int, "denoise": float}
# Request fields the form has no widget for but keeps and sends (from presets, history, an image's parameters).
KEPT_FIELDS = ("deepcache_interval", "deepcache_branch", "fbcache_threshold",
               "only_masked_padding", "masked_content", "invert_mask", "outpaint")
# ... and the model's own ones (an SDXL image's refiner, a prediction override): kept by a preset, dropped when a
# model of a family that does not take them is chosen
MODEL_KEPT_FIELDS = ("refiner", "refiner_switch", "prediction")
FORM_FIELDS = ("model", "prompt", "negative_prompt", "sampler", "schedule", *NUMBER_FIELDS, "vae", "clip_skip",
               "init_image", "denoise", "mask", "mask_blur", "inpaint_area", "hires")
INPAINT_AREA_CHOICES = [("whole picture", "whole"), ("only masked", "only_masked")]
# What each request field is called in the form, for error messages (in form order).
FORM_LABELS = {
    "loras": "LoRA",
    "model": "Model", "prompt": "Prompt", "negative_prompt": "Negative prompt", "sampler": "Sampler",
    "schedule": "Schedule", "steps": "Steps", "cfg": "CFG", "seed": "Seed", "width": "Size (width)",
    "height": "Size (height)", "batch_size": "Batch (images)", "batch_count": "Batch (batches)", "vae": "VAE",
    "clip_skip": "Clip", "init_image": "Init", "denoise": "Denoise", "mask": "Mask", "mask_blur": "Mask blur",
    "inpaint_area": "Mask area", "hires.scale": "Hires scale",
    "hires.upscaler": "Hires upscaler", "hires.steps": "Hires steps", "hires.denoise": "Hires denoise",
    "guidance": "Guidance", "detailer[0].model": "Detailer", "detailer[0].denoise": "Detailer denoise",
}
# Rows shown only for the families that use their field: field -> row id. ``guidance`` (Flux.1 dev's distilled
# guidance) shows for a family that names it in ``request_fields``; a field in a family's ``ignored_fields``
# (Flux ignores clip skip) is hidden for it.
FAMILY_ROWS = {"guidance": "guidance-row", "clip_skip": "clip-row"}
# UI-only entries of form_values() (kept in the last-used settings, never sent or saved into presets).
UI_ONLY_FIELDS = ("seed_lock", "advanced_open")
DEFAULTS = GenerationRequest(model="none").to_dict()
HIRES_DEFAULTS = dataclasses.asdict(HiresFix())
DETAILER_DEFAULTS = Detailer(model="-")  # the face/detail pass (ADetailer's first tab): model and denoise here
BUILTIN_VAE = ""  # Select value of "the checkpoint's own VAE" (request.vae = None)
ADVANCED_WIDGET_DEFAULTS: dict[str, Any] = {
    "vae": BUILTIN_VAE, "clip_skip": str(DEFAULTS["clip_skip"]), "init_image": "", "denoise": str(IMG2IMG_DENOISE),
    "mask": "", "mask_blur": str(DEFAULTS["mask_blur"]), "inpaint_area": DEFAULTS["inpaint_area"],
    "hires-enabled": False, "hires-scale": str(HIRES_DEFAULTS["scale"]), "hires-upscaler": HIRES_DEFAULTS["upscaler"],
    "hires-steps": str(HIRES_DEFAULTS["steps"]), "hires-denoise": str(HIRES_DEFAULTS["denoise"]),
    "detailer-model": "", "detailer-denoise": str(DETAILER_DEFAULTS.denoise),
}


def _parse(raw: Any, kind: type) -> Any:
    """A form value as ``kind``; text that is not one stays text, for the request's check to name the field and
    its valid range ("steps = '' is invalid: an integer from 1 to 150"), as it does for a jobs file."""
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        return kind(raw)
    text = str(raw).strip()
    try:
        return kind(text)
    except ValueError:
        return text


class NamesSuggester(Suggester):
    """Completes a field from a list that changes (the detectors found by the model scan)."""

    def __init__(self, names: Any) -> None:
        super().__init__(use_cache=False, case_sensitive=False)
        self.names = names  # () -> the current names

    async def get_suggestion(self, value: str) -> str | None:
        return next((n for n in self.names() if n.lower().startswith(value) and n.lower() != value), None)


def sets_advanced(values: dict[str, Any]) -> bool:
    """Whether ``values`` (a preset, a history row, the restored form) set something in the advanced section,
    which is then shown, so no setting is invisible."""
    return bool(values.get("hires") or values.get("init_image") or values.get("mask") or values.get("vae")
                or values.get("detailer") or (isinstance(values.get("clip_skip"), int)
                                              and values["clip_skip"] != DEFAULTS["clip_skip"]))


def presets_module(app: Any) -> Any:
    return getattr(app, "presets_api", None) or importlib.import_module("core.presets")


def notify_preset_problems(app: Any, problems: list[Any]) -> None:
    """Say each preset file that could not be loaded once, not at every reload: the Generate form and the
    Presets screen both read the folder (again after each save, rename or delete), and each had said every
    broken file again. A file fixed and broken again is said again; the Presets screen keeps listing them."""
    said = getattr(app, "_preset_problems_said", set())
    for problem in map(str, problems or []):
        if problem not in said:
            app.notify(problem, severity="warning", markup=False)
    app._preset_problems_said = set(map(str, problems or []))


def inspect_models(registry: Any, models: list[Any]) -> dict[str, Any]:
    """Model name -> its ``ModelInfo`` (family from the header; the registry caches it per file). Runs in the
    model-scan worker thread: a large folder's headers are never read on the UI thread."""
    inspect = getattr(registry, "inspect", None)
    if inspect is None:  # a registry without inspection (an older fake): no families shown
        return {}
    out: dict[str, Any] = {}
    for model in models:
        try:
            out[str(model.name)] = inspect(model)
        except Exception:  # noqa: BLE001 - a listing nicety: the model is still listed, without a family
            continue
    return out


def family_spec(family: str | None) -> Any:
    from core.models.families import FAMILIES

    return FAMILIES.get(family or "")


def model_option(name: str, info: Any) -> Text:
    """A model as the picker lists it: its name, then its family and quantisation (or why the file was not
    inspected), dim."""
    text = Text(visible(name))
    if info is not None:
        quant = getattr(info, "quant", None) if getattr(info, "is_family", False) else None
        text.append(f"  {visible(info.label)}" + (f" {visible(quant)}" if quant else ""), style="dim")
    return text


def refit_size(width: int, height: int, choices: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """The family's size choice with the aspect ratio closest to ``width`` x ``height`` (the first on ties)."""
    import math

    ratio = math.log(width / height) if width > 0 and height > 0 else 0.0
    return min(choices, key=lambda size: abs(math.log(size[0] / size[1]) - ratio))



class FormSelect(Select):
    """The form's Select: tolerates the app quitting while the form is still being mounted.

    The form mounts in chunks after the first frame; if the app exits mid-mount, Select's own mount
    handler looks for a child that was never composed and raises. Skip it then (the app is going away).
    """

    def _on_mount(self, event: events.Mount) -> None:
        if self.app._exit or not self.app.is_running or not self.is_attached:
            event.prevent_default()

class GenerateScreen(MainScreen):
    MODE = "generate"
    DEFER_FOOTER = True
    AUTO_FOCUS = "#prompt"
    WIDE_ONLY = frozenset({"grid", "toggle_lock"})
    BINDINGS = [
        Binding("ctrl+enter,ctrl+j", "queue", "Queue job", priority=True),
        Binding("ctrl+r", "dice", "Random seed"),
        # In the footer from WIDE_FOOTER columns too: at 80, with a job running, it cut "^s Stop job" to
        # "^s St" (the seed's checkbox says "lock"); the key answers at any width through the hidden one.
        Binding("ctrl+l", "toggle_lock", "Lock seed"),
        Binding("ctrl+l", "toggle_lock('key')", "Lock seed", show=False),
        Binding("ctrl+o", "open_png", "Open PNG"),
        Binding("ctrl+n", "networks", "LoRAs", show=False),  # the footer is full at 80 columns: the label says it
        # The X/Y/Z grid: in the footer from WIDE_FOOTER columns (at 80 it would push Quit out); the key
        # answers at any width through the second, hidden binding.
        Binding("ctrl+g", "grid", "X/Y/Z grid"),
        Binding("ctrl+g", "grid('key')", "X/Y/Z grid", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        # Request fields the form does not show (``extra``) travel unchanged, e.g. from history.
        self.hidden_fields: dict[str, Any] = {}
        self.models: list[Any] = []
        self.vae_names: list[str] = []
        self.detector_names: list[str] = list(MEDIAPIPE_MODELS)  # + YOLO files, from the model scan
        # The advanced fields' widget values ("#id" -> value), kept here until those widgets are mounted.
        self._advanced_mounted = False
        self._advanced_pending: dict[str, Any] = dict(ADVANCED_WIDGET_DEFAULTS)
        self._detailer_rest: list[dict[str, Any]] = []  # the detailer entries as last filled in (history, preset)
        self.presets: list[Any] = []
        self._models_loaded = False
        self._form_mounted = False  # every form widget mounted (the first frame has only the prompts)
        self._form_ready = False  # mounted and filled from the saved settings
        self._pending_values: dict[str, Any] = {}  # values set before the form was mounted
        self._final_path: str | None = None  # the job's image the preview is to show (the newest saved)
        self._final_job: int | None = None  # the job whose saved images the preview showed (ImageSaved)
        self._chunks: list[list[Widget]] = []
        self._advanced_left: list[Widget] | None = None
        self._save_timer: Any = None
        self._init_image_note: str | None = None  # set by build_request when a relative path was resolved
        self._pending_image: tuple[Any, str, str | None] | None = None  # an image's settings, until models load
        self.model_infos: dict[str, Any] = {}  # model name -> registry ModelInfo (family from the header)
        # The family the width/height in the form were chosen for: choosing a model of another family moves the
        # size to that family's (see _model_chosen). None: not known (left alone).
        self._size_family: str | None = None
        self._size_restored = False  # the form's size came from the saved settings (set on mount)

    def compose_body(self) -> ComposeResult:
        # The first frame holds only what the user needs at once: the prompts (focused), the Queue button and
        # the preview. Building and styling the rest of the form (selects, inputs, the advanced section) took
        # ~400 ms of CPU before the first paint; it is mounted right after it, in small chunks
        # (see _mount_next_chunk) so no single slice blocks the UI for long.
        with Horizontal(id="generate-body"):
            with VerticalScroll(id="form"):
                yield Label("Prompt  (Ctrl+N: LoRAs, embeddings)")
                yield TextArea(id="prompt", soft_wrap=True, show_line_numbers=False)
                yield Label("Negative prompt")
                yield TextArea(id="negative_prompt", soft_wrap=True, show_line_numbers=False)
                yield Label("", id="hidden-note", classes="hint")
                yield Button("Queue  (Ctrl+Enter)", variant="primary", id="queue")
            yield PreviewPane(image_class=getattr(self.app, "image_class", None), id="preview")

    def _form_chunks(self) -> list[list[Widget]]:
        """The rest of the form in mount order, a few widgets per chunk (each chunk is one UI-thread slice)."""

        def row(*widgets: Widget) -> Horizontal:
            return Horizontal(*widgets, classes="row")

        guidance_row = Horizontal(
            Label("Guidance", classes="field-label"),
            Input("", type="number", id="guidance", classes="short", compact=True, placeholder="3.5",
                  tooltip="distilled guidance (Flux.1 dev); empty: the model's default"),
            classes="row", id="guidance-row",
        )
        guidance_row.display = False  # until a model of a family that takes it is chosen
        return [
            [FormSelect([], prompt="model", id="model", allow_blank=True, compact=True),
             FormSelect([], prompt="apply a preset…", id="preset-picker", allow_blank=True, compact=True)],
            [row(FormSelect([(label, key) for key, label in SAMPLER_LABELS.items()], id="sampler",
                        allow_blank=False, value="euler", compact=True),
                 FormSelect([(label, key) for key, label in SCHEDULE_LABELS.items()], id="schedule",
                        allow_blank=False, value="normal", compact=True))],
            [row(Label("Steps", classes="field-label"),
                 Input("20", type="integer", id="steps", classes="short", compact=True),
                 Label("CFG", classes="field-label"),
                 Input("7.0", type="number", id="cfg", classes="short", compact=True)),
             row(Label("Seed", classes="field-label"),
                 Input("-1", type="integer", id="seed", classes="seed", compact=True),
                 Button("dice", id="dice", classes="icon", tooltip="Random seed (Ctrl+R)", compact=True),
                 Checkbox("lock", id="seed-lock", tooltip="Keep this seed after queueing (Ctrl+L)", compact=True)),
             guidance_row],
            [row(Label("Size", classes="field-label"),
                 Input("512", type="integer", id="width", classes="short", compact=True),
                 Label("×", classes="times"),
                 Input("512", type="integer", id="height", classes="short", compact=True),
                 FormSelect([(f"{w}×{h}", f"{w}x{h}") for w, h in SIZE_PRESETS], prompt="size…",
                        id="size-preset", allow_blank=True, compact=True))],
            [row(Label("Batch", classes="field-label"),
                 Input("1", type="integer", id="batch_size", classes="short", tooltip="images per batch",
                       compact=True),
                 Label("×", classes="times"),
                 Input("1", type="integer", id="batch_count", classes="short", tooltip="batches", compact=True))],
            # Open from the start when the restored settings open it: expanded later, Textual's Collapsible
            # scrolls itself into view, which pushed the focused prompt above the top of the form.
            [Collapsible(title="Advanced: img2img, inpaint, hires, VAE", id="advanced",
                         collapsed=not (self._pending_values.get("advanced_open") is True
                                        or sets_advanced(self._pending_values)))],
        ]

    def _advanced_rows(self) -> list[Widget]:
        def row(*widgets: Widget) -> Horizontal:
            return Horizontal(*widgets, classes="row")

        return [
            row(Label("VAE", classes="field-label"),
                FormSelect([("built-in", BUILTIN_VAE)], id="vae", allow_blank=False, value=BUILTIN_VAE, compact=True,
                       tooltip="VAE used to decode (built-in: the checkpoint's own)")),
            Horizontal(Label("Clip", classes="field-label"),
                       Input("1", type="integer", id="clip_skip", classes="short", compact=True,
                             tooltip="clip skip: 1 = last CLIP layer, 2 = the one before, …"),
                       classes="row", id="clip-row"),
            row(Label("Init", classes="field-label"),
                Input("", id="init_image", placeholder="img2img: path of a source image", compact=True,
                      classes="path")),
            row(Label("Denoise", classes="field-label"),
                Input(str(IMG2IMG_DENOISE), type="number", id="denoise", classes="short", compact=True,
                      tooltip="img2img strength: 0 keeps the image, 1 ignores it")),
            row(Label("Mask", classes="field-label"),
                Input("", id="mask", placeholder="inpaint: mask image (white = repaint)", compact=True,
                      classes="path")),
            row(Label("Blur", classes="field-label"),
                Input(str(DEFAULTS["mask_blur"]), type="integer", id="mask_blur", classes="short", compact=True,
                      tooltip="mask blur in pixels (A1111's default 4)"),
                Label("Area", classes="field-label"),
                FormSelect(INPAINT_AREA_CHOICES, id="inpaint_area", allow_blank=False,
                           value=DEFAULTS["inpaint_area"], compact=True,
                           tooltip="only masked: the masked region at the full size, pasted back")),
            row(Label("Hires", classes="field-label"),
                Switch(False, id="hires-enabled", tooltip="second pass at a larger size"),
                Label("off", id="hires-state", classes="switch-state"),
                Label("Scale", classes="field-label"),
                Input(str(HIRES_DEFAULTS["scale"]), type="number", id="hires-scale", classes="short", compact=True),
                FormSelect([(u, u) for u in UPSCALERS], id="hires-upscaler", allow_blank=False,
                       value=HIRES_DEFAULTS["upscaler"], compact=True,
                       tooltip="latent: upscale latents; image: decode, resize, re-encode; an upscaler model: "
                       "decode, upscale with it, resize, re-encode")),
            row(Label("Steps", classes="field-label"),
                Input(str(HIRES_DEFAULTS["steps"]), type="integer", id="hires-steps", classes="short", compact=True,
                      tooltip="0 = as many as the first pass"),
                Label("Denoise", classes="field-label"),
                Input(str(HIRES_DEFAULTS["denoise"]), type="number", id="hires-denoise", classes="short",
                      compact=True)),
            row(Label("Detailer", classes="field-label"),
                Input("", id="detailer-model", compact=True, classes="path",
                      suggester=NamesSuggester(lambda: self.detector_names),
                      placeholder="face pass: detector (face_yolov8n.pt, mediapipe_face_full); empty = off"),
                Label("Denoise", classes="field-label"),
                Input(str(DETAILER_DEFAULTS.denoise), type="number", id="detailer-denoise", classes="short",
                      compact=True, tooltip="the detected regions' inpainting strength (ADetailer's 0.4)")),
        ]

    def on_mount(self) -> None:
        self.app.generate_screen = self
        settings = dict(getattr(self.app, "settings", {}) or {})
        self._pending_values = settings
        self._size_restored = "width" in settings or "height" in settings  # else the first model's family decides
        for name in ("prompt", "negative_prompt"):  # the prompts are in the first frame: fill them now
            if isinstance(settings.get(name), str):
                self.query_one(f"#{name}", TextArea).load_text(settings[name])
        self._chunks = self._form_chunks()
        self.call_after_refresh(self._mount_next_chunk)

    async def _mount_next_chunk(self) -> None:
        """Mount one chunk of the form, then let a frame paint (and keys be handled) before the next.

        The app can start quitting during any ``await`` here; then nothing more is mounted or filled in
        (a half-mounted form has widgets missing).
        """
        if self.quitting():
            return
        if not self.query(StableFooter):
            await self.mount(StableFooter())
            if self.quitting():
                return
            self.refresh_bindings()  # the footer draws the keys when the bindings signal fires
            self.call_after_refresh(self._mount_next_chunk)
            return
        if self._chunks:
            await self.query_one("#form").mount_all(self._chunks.pop(0), before="#hidden-note")
            if not self.quitting():
                self.call_after_refresh(self._mount_next_chunk)
            return
        if not self._advanced_mounted:
            # Collapsed, the advanced fields are not visible: they come last, two rows at a time.
            if self._advanced_left is None:
                self._advanced_left = self._advanced_rows()
            await self.query_one("#advanced Contents").mount_all(self._advanced_left[:2])
            if self.quitting():
                return
            del self._advanced_left[:2]
            if not self._advanced_left:
                self._advanced_mounted = True
                self._write_advanced_state(self._advanced_pending)
            self.call_after_refresh(self._mount_next_chunk)
            return
        self._form_mounted = True
        self._show_family_rows(family_spec(self.model_family()))
        pending, self._pending_values = self._pending_values, {}
        if pending:
            self.set_form_values(pending)
        self._set_vae_options()
        self._form_ready = True
        # The model and preset scans run in threads, started only now so they don't compete with the form.
        self.load_models()
        self.load_presets()
        self.load_last_image()

    @property
    def settled(self) -> bool:
        """The whole form is mounted and the model list is in: what the app waits for before building the other
        screens in the background (DarkroomApp._prebuild_next_screen)."""
        return bool(self._form_ready and self._models_loaded)

    # ---- background loading (file system scans stay off the UI thread) ------------------------------------

    @work(thread=True, exclusive=True, group="models")
    def load_models(self, rescan: bool = False) -> None:
        try:
            if rescan and hasattr(self.app.registry, "refresh"):
                self.app.registry.refresh()
            models = list(self.app.registry.checkpoints())
            vaes = list(self.app.registry.vaes()) if hasattr(self.app.registry, "vaes") else []
            upscalers = [str(m.name) for m in self.app.registry.upscalers()] if hasattr(
                self.app.registry, "upscalers") else []
            found = list(self.app.registry.detectors()) if hasattr(self.app.registry, "detectors") else []
            # the detail pass's detectors for the Detailer field's completion: mediapipe's and the YOLO files
            self.detector_names = [*MEDIAPIPE_MODELS, *(Path(m.path).name for m in found)]
            error = None
        except Exception as exc:  # noqa: BLE001 - shown, not raised
            models, vaes, upscalers, error = [], [], [], str(exc)
        infos = inspect_models(self.app.registry, models)
        self.call_from_worker_thread(self._models_ready, models, error, vaes, rescan, infos, upscalers)

    def _models_ready(self, models: list[Any], error: str | None, vaes: list[Any] | None = None,
                      rescan: bool = False, infos: dict[str, Any] | None = None,
                      upscalers: list[str] | None = None) -> None:
        self._set_upscaler_options(upscalers or [])
        self.models = models
        self.model_infos = dict(infos or {})
        # name -> family label, for the screens that show a job's model (Queue, History)
        self.app.model_families = {name: info.label for name, info in self.model_infos.items()
                                   if getattr(info, "is_family", False)}
        self.vae_names = [str(v.name) for v in vaes or []]
        self._set_vae_options()
        self._models_loaded = True
        select = self.query_one("#model", Select)
        wanted = self.app.settings.get("model") if hasattr(self.app, "settings") else None
        select.set_options([(model_option(str(m.name), self.model_infos.get(str(m.name))), str(m.name))
                            for m in models])
        names = [str(m.name) for m in models]
        # The size in the form belongs to the saved model; a fresh form's 512x512 is SD1.x's.
        settings = getattr(self.app, "settings", {}) or {}
        self._size_family = (self.family_of(wanted) if wanted in names
                             else "sd15" if "width" not in settings and "height" not in settings else None)
        if wanted in names:
            select.value = wanted
        elif names:  # the first model Darkroom can run, else the first of a known family, else the first
            runnable = [n for n in names if getattr(family_spec(self.family_of(n)), "runnable", False)]
            known = [n for n in names if self.family_of(n) is not None]
            select.value = (runnable or known or names)[0]
        self._model_chosen()
        if error:
            self.app.notify(f"Could not scan the models folders: {error}", severity="error", markup=False)
        unusable = self._unusable_models()
        if not models or unusable is not None:
            from tui.screens.no_models import NoModelsScreen

            if rescan:
                self.app.notify("Still no checkpoints in the folders listed.", severity="warning", timeout=4)
            self.app.push_screen(NoModelsScreen(list(getattr(self.app.registry, "search_dirs", [])), unusable))
        elif rescan:
            self.app.notify(f"Found {len(models)} checkpoint{'s' * (len(models) != 1)}", timeout=3)
        if self._pending_image is not None:
            pending, self._pending_image = self._pending_image, None
            self.apply_image_request(*pending)

    def _set_upscaler_options(self, names: list[str]) -> None:
        """The hires upscalers: latent, image, then the upscaler models found (models/upscale_models, ESRGAN)."""
        self.upscaler_names = names
        select = self.query_one("#hires-upscaler", Select)
        current = select.value
        select.set_options([(u, u) for u in UPSCALERS] + [(n, n) for n in names])
        select.value = current if current in (*UPSCALERS, *names) else HIRES_DEFAULTS["upscaler"]

    def _unusable_models(self) -> list[tuple[str, str]] | None:
        """When every file listed was inspected and none is a checkpoint (only LoRAs, VAEs, broken files in
        the checkpoint folders): each one's name and what it is; None otherwise (a .ckpt is not inspected and
        may be fine)."""
        if not self.models or len(self.model_infos) < len(self.models):
            return None
        out = []
        for model in self.models:
            info = self.model_infos[str(model.name)]
            if info.is_family or info.label == "not inspected":
                return None
            out.append((str(model.name), info.problem or f"{info.label}, not a checkpoint"))
        return out

    @work(thread=True, exclusive=True, group="presets")
    def load_presets(self) -> None:
        try:
            presets, problems = presets_module(self.app).load_presets()
        except Exception as exc:  # noqa: BLE001
            presets, problems = [], [str(exc)]
        self.call_from_worker_thread(self._presets_ready, presets, problems)

    def _presets_ready(self, presets: list[Any], problems: list[Any]) -> None:
        self.presets = presets
        self._set_preset_options()
        notify_preset_problems(self.app, problems)

    def fitting_presets(self) -> list[Any]:
        """The presets that suit the chosen model's family (all of them while it is not known)."""
        family = self.model_family()
        return [p for p in self.presets if getattr(p, "family", None) in (None, family) or family is None]

    def _set_preset_options(self) -> None:
        options = [(Text(visible(p.name)), p.name) for p in self.fitting_presets()]
        self.query_one("#preset-picker", Select).set_options(options)

    # ---- the model's family ---------------------------------------------------------------------------------

    def family_of(self, name: Any) -> str | None:
        """The family (``sd15``, ``sdxl``, ...) of the model ``name`` from its header, None when not known."""
        info = self.model_infos.get(name) if isinstance(name, str) else None
        return info.family if info is not None and getattr(info, "is_family", False) else None

    def model_family(self) -> str | None:
        """The family of the model chosen in the form (None: no model, or one whose family is not known)."""
        if not self._form_mounted:
            return None
        return self.family_of(self.query_one("#model", Select).value)

    @on(Select.Changed, "#model")
    def _model_select_changed(self) -> None:
        if self._models_loaded:
            self._model_chosen()

    def _model_chosen(self) -> None:
        """A model was chosen: the size choices and presets follow its family, and the size too when the family
        differs from the one the current size was chosen for and the size is not already within 20% of the
        family's default area (as InvokeAI does): the family's size with the closest aspect ratio, so a
        512x768 portrait for SD1.x becomes 832x1216 for SDXL."""
        family = self.model_family()
        spec = family_spec(family)
        self._show_family_rows(spec)
        self._refit_sampling(spec)
        self._drop_foreign_fields()
        self._show_hidden_fields()
        self._set_preset_options()
        choices = spec.size_choices if spec is not None else SIZE_PRESETS
        self.query_one("#size-preset", Select).set_options([(f"{w}×{h}", f"{w}x{h}") for w, h in choices])
        if spec is None or family == self._size_family:
            return
        before, self._size_family = self._size_family, family
        self._refit_defaults(family_spec(before), spec)
        width_input, height_input = self.query_one("#width", Input), self.query_one("#height", Input)
        if before is None:
            if not self._size_restored:  # a first start: the family's own size
                width_input.value, height_input.value = (str(v) for v in spec.default_size)
            return  # else the size the user left last time
        try:
            width, height = int(width_input.value), int(height_input.value)
        except ValueError:
            width, height = spec.default_size
        default_area = spec.default_size[0] * spec.default_size[1]
        if abs(width * height / default_area - 1) <= 0.2:  # already about the family's area (InvokeAI's test)
            return
        new = refit_size(width, height, choices)
        if new != (width, height):
            width_input.value, height_input.value = str(new[0]), str(new[1])
            self.app.notify(f"Size {width}×{height} → {new[0]}×{new[1]} for {spec.label}", timeout=3)

    def _show_family_rows(self, spec: Any) -> None:
        """Show the rows of the fields the chosen model's family uses, hide the others (no family known: the
        general form, without the family-specific rows)."""
        specific = family_fields()
        for name, row_id in FAMILY_ROWS.items():
            if name in specific:  # shown for the families that take it
                shown = spec is not None and name in spec.request_fields
            else:  # shown unless the family ignores it
                shown = spec is None or name not in spec.ignored_fields
            for row in self.query(f"#{row_id}"):  # the advanced rows mount last
                row.display = shown

    def _refit_sampling(self, spec: Any) -> None:
        """A sampler or schedule the chosen family cannot run (an ancestral sampler or Align Your Steps on a flow
        model, left by an SD preset) moves to the default, or the family's first choice; says so. The queue
        check refuses them too, but a model choice should not leave the form in a state that is refused."""
        if spec is None:
            return
        for name, problem, labels, choices in (
            ("sampler", sampler_problem, SAMPLER_LABELS, getattr(spec.sampling, "samplers", ()) or SAMPLER_LABELS),
            ("schedule", schedule_problem, SCHEDULE_LABELS, SCHEDULE_LABELS),
        ):
            select = self.query_one(f"#{name}", Select)
            value = select.value
            if not isinstance(value, str) or problem(value, spec.name) is None:
                continue
            fallback = next(c for c in (DEFAULTS[name], *choices) if problem(c, spec.name) is None)
            select.value = fallback
            self.app.notify(f"{FORM_LABELS[name]} {labels.get(value, value)} → {labels.get(fallback, fallback)} "
                            f"for {spec.label}", timeout=3)

    def _refit_defaults(self, before: Any, spec: Any) -> None:
        """Fields the new family has its own default for (Flux: CFG 1) move to it when they sit at the general
        default, and back when leaving such a family with the field still at its default; says so."""
        for name, value in spec.request_defaults.items():
            if name in NUMBER_FIELDS and self._number(name) == DEFAULTS[name]:
                self.query_one(f"#{name}", Input).value = str(value)
                self.app.notify(f"{FORM_LABELS[name]} {DEFAULTS[name]:g} → {value:g} for {spec.label}", timeout=3)
        for name, value in (before.request_defaults.items() if before is not None else ()):
            if name in NUMBER_FIELDS and name not in spec.request_defaults and self._number(name) == value:
                self.query_one(f"#{name}", Input).value = str(DEFAULTS[name])

    def _number(self, name: str) -> Any:
        try:
            return NUMBER_FIELDS[name](self.query_one(f"#{name}", Input).value.strip())
        except ValueError:
            return None

    def reload_presets(self) -> None:
        self.load_presets()

    def _set_vae_options(self, wanted: Any = None) -> None:
        """Built-in + the registry's VAEs, plus ``wanted`` when it is a name or path from elsewhere (history,
        a preset) so it is kept rather than silently dropped."""
        current = self._advanced_state()["vae"] if wanted is None else wanted
        if not self._advanced_mounted:
            self._advanced_pending["vae"] = current
            return
        select = self.query_one("#vae", Select)
        names = list(self.vae_names)
        if isinstance(current, str) and current and current not in names:
            names.append(current)
        select.set_options([("built-in", BUILTIN_VAE), *((Text(visible(n)), n) for n in names)])
        select.value = current if isinstance(current, str) and current in names else BUILTIN_VAE

    def _advanced_state(self) -> dict[str, Any]:
        """The advanced fields' widget values, from the widgets once mounted."""
        if not self._advanced_mounted:
            return dict(self._advanced_pending)
        state: dict[str, Any] = {}
        for key in ADVANCED_WIDGET_DEFAULTS:
            widget = self.query_one(f"#{key}")
            state[key] = widget.value
        return state

    def _write_advanced_state(self, state: dict[str, Any]) -> None:
        if not self._advanced_mounted:
            self._advanced_pending.update(state)
            return
        for key, value in state.items():
            if key == "vae":
                self._set_vae_options(value)
            else:
                self.query_one(f"#{key}").value = value

    # ---- form <-> values -----------------------------------------------------------------------------------

    def form_values(self) -> dict[str, Any]:
        """Current form as request-field values (numbers parsed where they parse) plus UI-only state."""
        values: dict[str, Any] = dict(self.hidden_fields)
        if not self._form_mounted:
            values.update(self._pending_values)
        values["prompt"] = self.query_one("#prompt", TextArea).text
        values["negative_prompt"] = self.query_one("#negative_prompt", TextArea).text
        if not self._form_mounted:
            return values
        for name in ("model", "sampler", "schedule"):
            value = self.query_one(f"#{name}", Select).value
            if isinstance(value, str):  # every option is a string; blank is a sentinel (BLANK, or NULL in 8.x)
                values[name] = value
        for name, kind in NUMBER_FIELDS.items():
            raw = self.query_one(f"#{name}", Input).value.strip()
            try:
                values[name] = kind(raw)
            except ValueError:
                values[name] = raw
        guidance = self.query_one("#guidance", Input)
        raw = guidance.value.strip()
        if not self.query_one("#guidance-row").display:
            values["guidance"] = None  # the chosen model takes no distilled guidance
        else:
            try:
                values["guidance"] = float(raw) if raw else None
            except ValueError:
                values["guidance"] = raw
        values["seed_lock"] = self.query_one("#seed-lock", Checkbox).value
        state = self._advanced_state()
        vae = state["vae"]
        values["vae"] = vae if isinstance(vae, str) and vae != BUILTIN_VAE else None
        for name, kind in ADVANCED_NUMBER_FIELDS.items():
            raw = str(state[name]).strip()
            try:
                values[name] = kind(raw)
            except ValueError:
                values[name] = raw
        values["init_image"] = str(state["init_image"]).strip() or None
        values["mask"] = str(state["mask"]).strip() or None
        if isinstance(state["inpaint_area"], str):
            values["inpaint_area"] = state["inpaint_area"]
        if state["hires-enabled"]:
            hires: dict[str, Any] = {"upscaler": state["hires-upscaler"]}
            for name, kind in HIRES_NUMBER_FIELDS.items():
                raw = str(state[f"hires-{name}"]).strip()
                try:
                    hires[name] = kind(raw)
                except ValueError:
                    hires[name] = raw
            values["hires"] = hires
        else:
            values["hires"] = None
        detector = str(state["detailer-model"]).strip()
        rest = [dict(entry) for entry in self._detailer_rest]  # a history row's other detailer settings stay
        if detector:
            raw = str(state["detailer-denoise"]).strip()
            try:
                denoise: Any = float(raw)
            except ValueError:
                denoise = raw
            values["detailer"] = [{**(rest[0] if rest else {}), "model": detector, "denoise": denoise}, *rest[1:]]
        else:
            values["detailer"] = None  # off (None: left out of a saved preset, like an unset VAE)
        values["advanced_open"] = not self.query_one("#advanced", Collapsible).collapsed
        return values

    def set_form_values(self, values: dict[str, Any]) -> None:
        """Fill the form from request fields (a preset, a history row, the saved settings)."""
        for name in ("prompt", "negative_prompt"):
            if isinstance(values.get(name), str):
                self.query_one(f"#{name}", TextArea).load_text(values[name])
        if not self._form_mounted:  # applied once the rest of the form is mounted
            self._pending_values.update({k: v for k, v in values.items() if k not in ("prompt", "negative_prompt")})
            return
        for name, options in (("sampler", SAMPLER_LABELS), ("schedule", SCHEDULE_LABELS)):
            if values.get(name) in options:
                self.query_one(f"#{name}", Select).value = values[name]
        model = values.get("model")
        if isinstance(model, str) and model:
            select = self.query_one("#model", Select)
            if any(str(m.name) == model for m in self.models):
                if "width" in values or "height" in values:  # a history row's or an image's size is that model's
                    self._size_family = self.family_of(model)
                select.value = model
            elif self._models_loaded:
                self.app.notify(f"Model {model} is not in the models folders", severity="warning",
                                markup=False)
        for name in NUMBER_FIELDS:
            if name in values and values[name] is not None and not isinstance(values[name], bool):
                self.query_one(f"#{name}", Input).value = str(values[name])
        if "guidance" in values and not isinstance(values["guidance"], bool):
            self.query_one("#guidance", Input).value = "" if values["guidance"] is None else str(values["guidance"])
        if isinstance(values.get("seed_lock"), bool):
            self.query_one("#seed-lock", Checkbox).value = values["seed_lock"]
        self._set_advanced_values(values)
        if "extra" in values:
            self.hidden_fields["extra"] = values["extra"]
        for name in (*KEPT_FIELDS, *MODEL_KEPT_FIELDS):
            if name in values:
                self.hidden_fields[name] = values[name]
        self._drop_foreign_fields()
        self._show_hidden_fields()

    def _drop_foreign_fields(self) -> None:
        """The kept fields of another family than the chosen model's (an SDXL image's refiner once an SD1.x
        model is chosen) are let go: the form has no widget to clear them, and the queue would refuse them."""
        spec = family_spec(self.model_family())
        if spec is None:
            return
        specific = family_fields()
        for name in MODEL_KEPT_FIELDS:
            if name in specific and name not in spec.request_fields:
                self.hidden_fields.pop(name, None)

    def _set_advanced_values(self, values: dict[str, Any]) -> None:
        state: dict[str, Any] = {}
        if "vae" in values and (values["vae"] is None or isinstance(values["vae"], str)):
            state["vae"] = values["vae"] or BUILTIN_VAE
        for name in ADVANCED_NUMBER_FIELDS:
            if name == "denoise" and values.get(name) == 1.0 and not values.get("init_image"):
                continue  # a txt2img job's (or older settings') 1.0 is no img2img strength: keep the field's own
            if name in values and values[name] is not None and not isinstance(values[name], bool):
                state[name] = str(values[name])
        if "init_image" in values and (values["init_image"] is None or isinstance(values["init_image"], str)):
            state["init_image"] = values["init_image"] or ""
        if "mask" in values and (values["mask"] is None or isinstance(values["mask"], str)):
            state["mask"] = values["mask"] or ""
        if values.get("inpaint_area") in INPAINT_AREAS:
            state["inpaint_area"] = values["inpaint_area"]
        if "hires" in values:
            hires = values["hires"]
            if isinstance(hires, HiresFix):
                hires = dataclasses.asdict(hires)
            if isinstance(hires, dict):
                state["hires-enabled"] = True
                hires = {**HIRES_DEFAULTS, **hires}  # a preset may set only some hires keys
                for name in HIRES_NUMBER_FIELDS:
                    if hires.get(name) is not None and not isinstance(hires[name], bool):
                        state[f"hires-{name}"] = str(hires[name])
                if hires.get("upscaler") in (*UPSCALERS, *getattr(self, "upscaler_names", ())):
                    state["hires-upscaler"] = hires["upscaler"]
            elif hires is None:
                state["hires-enabled"] = False
        if isinstance(values.get("detailer"), (list, tuple)):
            entries = [dataclasses.asdict(e) if isinstance(e, Detailer) else dict(e)
                       for e in values["detailer"] if isinstance(e, (Detailer, dict))]
            self._detailer_rest = entries
            state["detailer-model"] = str(entries[0].get("model", "")) if entries else ""
            if entries and isinstance(entries[0].get("denoise"), (int, float)):
                state["detailer-denoise"] = str(entries[0]["denoise"])
        self._write_advanced_state(state)
        advanced = self.query_one("#advanced", Collapsible)
        if isinstance(values.get("advanced_open"), bool):
            advanced.collapsed = not values["advanced_open"]
        if sets_advanced(values):
            advanced.collapsed = False

    def _show_hidden_fields(self) -> None:
        """One line naming the request fields this form does not edit but will send (from presets/history)."""
        parts = []
        for name, value in self.hidden_fields.items():
            if value in (None, {}) or value == DEFAULTS.get(name):
                continue
            if isinstance(value, dict):
                value = ", ".join(f"{k} {v}" for k, v in value.items())
            parts.append(f"{name}: {value}")
        note = Text(visible("also: " + "; ".join(parts))) if parts else ""
        self.query_one("#hidden-note", Label).update(note)

    def build_request(self) -> GenerationRequest:
        """The form as a request, or a DarkroomError listing every bad field at once, one line each, by the
        label it has in the form."""
        values = self.form_values()
        for name in UI_ONLY_FIELDS:
            values.pop(name, None)
        errors: list[RequestError] = []

        def parse(target: dict[str, Any], key: str, kind: type) -> None:
            target[key] = _parse(target.get(key), kind)

        no_model = "model" not in values
        if no_model:
            values["model"] = "(none)"
        for name, kind in NUMBER_FIELDS.items():
            parse(values, name, kind)
        parse(values, "clip_skip", int)
        init_image = values["init_image"]
        if init_image is None:
            values["denoise"] = DEFAULTS["denoise"]  # txt2img: the img2img strength does not apply
        else:
            parse(values, "denoise", float)
            try:
                values["init_image"] = self._resolve_init_image(init_image)
            except RequestError as error:
                errors.append(error)
        if values.get("mask") is not None and init_image is not None:  # without one: the request says why
            try:
                values["mask"] = resolve_init_image(values["mask"], Path(os.getcwd()), field="mask")
            except RequestError as error:
                errors.append(error)
        if values["hires"] is not None:
            values["hires"] = dict(values["hires"])
            for name, kind in HIRES_NUMBER_FIELDS.items():
                parse(values["hires"], name, kind)
        request: GenerationRequest | None = None
        try:
            request = GenerationRequest.from_dict(values)
        except RequestError as error:
            errors.extend(error.errors)
        # the checks against the model and the installed packages run on the fields as typed too, so one
        # queue names every problem (a detector package to install beside a bad denoise), as --batch does
        info = self.model_infos.get(values["model"])
        if getattr(info, "label", None) == "unreadable":  # cut short, a broken header: it would only fail
            errors.append(RequestError("model", values["model"], f"the file cannot be loaded: {info.problem}"))
        family = self.family_of(values["model"])
        bad = {e.field for e in errors}
        if family is not None:  # the same family check as --batch: a field of another family (SDXL's refiner)
            errors.extend(e for e in family_problems(request or values, family) if e.field not in bad)
        if request is not None:
            errors.extend(self._lora_problems(request, family))
            errors.extend(self._parts_problems(request))
        from core.detectors import detector_problem

        entries = request.detailer if request is not None else values.get("detailer") or ()
        for index, entry in enumerate(entries):  # a detector package to install, said now
            model = entry.get("model") if isinstance(entry, dict) else getattr(entry, "model", None)
            problem = detector_problem(model) if isinstance(model, str) and model else None
            if problem is not None and f"detailer[{index}].model" not in bad:
                errors.append(RequestError(f"detailer[{index}].model", model, problem))
        if no_model or errors:
            order = list(FORM_LABELS)
            errors.sort(key=lambda e: order.index(e.field) if e.field in order else len(order))
            lines = ["Choose a model first (no checkpoint is selected)."] if no_model else []
            lines += [f"{FORM_LABELS.get(e.field, e.field)}: {e}" for e in errors]
            raise DarkroomError("\n".join(lines))
        return request

    def _lora_problems(self, request: GenerationRequest, family: str | None) -> list[RequestError]:
        """A LoRA of the request that is in no LoRA folder, or whose keys say it is for another family than the
        model's (read from its header, cached; the batch pre-check says the same before anything runs)."""
        from core.errors import ModelNotFoundError
        from core.models.parts import with_article
        from core.presets import family_label

        registry = self.app.registry
        find, inspect = getattr(registry, "find_lora", None), getattr(registry, "inspect", None)
        if find is None:
            return []
        problems: list[RequestError] = []
        for ref in {ref.name: ref for ref in request.lora_refs()}.values():
            try:
                path = find(ref.name)
            except ModelNotFoundError as error:
                problems.append(RequestError("loras", ref.name, str(error)))
                continue
            base = getattr(inspect(path), "base", None) if inspect is not None and family is not None else None
            if base is not None and base != family:
                problems.append(RequestError("loras", ref.name, f"{path.name} is {with_article(family_label(base))} "
                                             f"LoRA (by its keys), but the model is {family_label(family)}"))
        return problems

    def _parts_problems(self, request: GenerationRequest) -> list[RequestError]:
        """A part a diffusion model kept alone needs that is in no folder (Flux.1's T5, Z-Image's Qwen3, a VAE),
        or a named one that is no such part: said now, as --batch says it before anything runs; the job was
        queued and failed when it ran, after the jobs before it."""
        from core.errors import ModelNotFoundError
        from core.models.split import resolve_parts

        find = getattr(self.app.registry, "find_checkpoint", None)
        if find is None:
            return []
        try:
            resolve_parts(self.app.registry, find(request.model), request.text_encoders, request.vae)
        except RequestError as error:
            return [error]
        except ModelNotFoundError as error:
            return [RequestError("model", request.model, str(error))]
        return []

    def _resolve_init_image(self, value: str) -> str:
        """The init image's absolute path. A relative one is taken from the current directory (the folder
        Darkroom was started in), which the message says, so a wrong guess is visible."""
        cwd = os.getcwd()
        relative = not Path(value).expanduser().is_absolute()
        try:
            path = resolve_init_image(value, Path(cwd))
        except RequestError as error:
            if not relative:
                raise
            raise RequestError("init_image", value,
                               f"{error.valid} (a relative path is taken from the current directory, {cwd})") from None
        if relative:
            self._init_image_note = f"Init image {value}: a relative path, taken from the current directory: {path}"
        return path

    # ---- actions -------------------------------------------------------------------------------------------

    def action_queue(self) -> None:
        if not self._form_ready:
            self.app.notify("The form is still loading; try again in a moment.", timeout=2)
            return
        self._init_image_note = None
        try:
            request = self.build_request()
        except DarkroomError as error:
            self.app.notify(str(error), severity="error", markup=False)
            return
        if self.app.settings.get("enhance_prompts") is True:
            self.app.notify("Enhancing the prompt with the local LLM; the job is queued when it answers.",
                            timeout=4)
            self.enhance_and_queue(request)
        elif self.app.submit(request) is None:
            return
        if self._init_image_note:  # the field now shows the path that was used (and is saved as such)
            self._write_advanced_state({"init_image": request.init_image})
            self.app.notify(self._init_image_note, markup=False, timeout=6)
        family = self.family_of(request.model)
        for warning in [*prompt_syntax_warnings(request.prompt, request.negative_prompt),
                        *(family_warnings(request, family) if family else [])]:
            self.app.notify(warning, severity="warning", markup=False, timeout=8)
        self.app.settings.update(self.form_values())
        self.app.save_form_settings()
        if not self.query_one("#seed-lock", Checkbox).value and request.seed != -1:
            self.action_dice()

    @work(thread=True, group="enhance")
    def enhance_and_queue(self, request: GenerationRequest) -> None:
        """The local LLM rewrites the prompt in a worker thread (it takes seconds), then the job is queued on
        the UI thread; when it fails the job is queued with its prompt as written and one warning says why."""
        from core.enhance import EnhanceSettings, enhance_request

        settings = EnhanceSettings.from_env(self.app.settings.get("enhance_url"), self.app.settings.get("enhance_model"))
        enhanced, problem = enhance_request(request, settings)
        self.app.call_from_thread(self._queue_enhanced, enhanced, problem)

    def _queue_enhanced(self, request: GenerationRequest, problem: str | None) -> None:
        if problem:
            self.app.notify(problem, severity="warning", markup=False, timeout=8)
        self.app.submit(request)

    def action_dice(self) -> None:
        if not self._form_mounted:
            return
        self.query_one("#seed", Input).value = str(random.randint(0, MAX_SEED))

    def action_toggle_lock(self, _key: str = "") -> None:
        if not self._form_mounted:
            return
        self.query_one("#seed-lock", Checkbox).toggle()

    @on(Input.Changed)
    @on(TextArea.Changed)
    @on(Select.Changed)
    @on(Checkbox.Changed)
    @on(Switch.Changed)
    @on(Collapsible.Toggled)
    def _form_changed(self) -> None:
        """Keep the app's last-used settings current; the file is written at most every half second."""
        if not self._form_ready:
            return
        self.app.settings.update(self.form_values())
        if self._save_timer is None:
            self._save_timer = self.set_timer(0.5, self._write_settings)

    def _write_settings(self) -> None:
        self._save_timer = None
        self.app.save_form_settings()

    @on(Input.Changed, "#mask, #init_image")
    def _mask_changed(self) -> None:
        """A mask and its init image that both open are previewed (the area to repaint tinted red) where the
        images are shown, unless a job is running there."""
        if not self._form_ready or self.preview.running:
            return
        state = self._advanced_state()
        init, mask = str(state["init_image"]).strip(), str(state["mask"]).strip()
        if init and mask:
            self.preview_mask(init, mask, bool(self.hidden_fields.get("invert_mask")))

    @work(thread=True, exclusive=True, group="mask-preview")
    def preview_mask(self, init: str, mask: str, invert: bool = False) -> None:
        from core.masks import mask_preview

        base = Path(os.getcwd())
        try:
            paths = [str(p if p.is_absolute() else base / p) for p in (Path(init).expanduser(), Path(mask).expanduser())]
            if not all(Path(p).is_file() for p in paths):
                return
            image = mask_preview(*paths, invert=invert)
        except Exception:  # noqa: BLE001 - a half-typed path or an unreadable file: nothing to preview yet
            return
        self.app.call_from_thread(self._show_mask_preview, Path(mask).name, image)

    def _show_mask_preview(self, name: str, image: Any) -> None:
        if not self.preview.running:
            self.preview.show_mask(name, image)

    @on(Button.Pressed, "#queue")
    def _queue_pressed(self) -> None:
        self.action_queue()

    @on(Button.Pressed, "#dice")
    def _dice_pressed(self) -> None:
        self.action_dice()

    @on(Checkbox.Changed, "#seed-lock")
    def _lock_changed(self, event: Checkbox.Changed) -> None:
        # In 256-colour terminals the box's on/off colours are hard to tell apart: the word says it too.
        event.checkbox.label = "locked" if event.value else "lock"

    @on(Switch.Changed, "#hires-enabled")
    def _hires_changed(self, event: Switch.Changed) -> None:
        # Like the seed lock: the switch's colours alone are hard to read in 256-colour terminals.
        self.query_one("#hires-state", Label).update("on" if event.value else "off")

    @on(Select.Changed, "#size-preset")
    def _size_chosen(self, event: Select.Changed) -> None:
        if isinstance(event.value, str):
            width, height = event.value.split("x")
            self.query_one("#width", Input).value = width
            self.query_one("#height", Input).value = height

    @on(Select.Changed, "#preset-picker")
    def _preset_chosen(self, event: Select.Changed) -> None:
        preset = next((p for p in self.presets if p.name == event.value), None)
        if preset is not None:
            self.apply_preset(preset)

    def apply_preset(self, preset: Any) -> None:
        family = self.model_family()
        if family is not None and getattr(preset, "family", None) not in (None, family):
            problem = presets_module(self.app).family_mismatch(preset, family, self.presets)
            self.app.notify(f"Not applied: {problem}", severity="error", markup=False, timeout=6)
            return
        values = dict(preset.fields)
        values.setdefault("hires", None)  # a preset without hires-fix turns it off
        for name in KEPT_FIELDS:  # ... and one without a feature cache turns that off
            values.setdefault(name, DEFAULTS[name])
        self.set_form_values(values)
        self._add_preset_loras(values.get("loras") or ())
        self.app.notify(f"Applied preset {preset.name}", markup=False, timeout=2)

    def _add_preset_loras(self, entries: Any) -> None:
        """A preset's LoRAs (the LCM-LoRA of an LCM preset) become tags in the prompt, where the user sees and
        edits them; one already there is left as written."""
        from tui.screens.networks import lora_tag

        prompt = self.query_one("#prompt", TextArea)
        text = prompt.text
        for entry in entries:
            name = str(entry.get("name", "")) if isinstance(entry, dict) else ""
            if not name or f"<lora:{name.lower()}:" in text.lower() or f"<lora:{name.lower()}>" in text.lower():
                continue
            te = entry.get("te_weight")
            tag = lora_tag(name, float(entry.get("weight", 1.0)))
            if te is not None:
                tag = f"<lora:{name}:{float(te):g}:{float(entry.get('weight', 1.0)):g}>"
            text = f"{text.rstrip()} {tag}" if text.strip() else tag
        if text != prompt.text:
            prompt.load_text(text)

    # ---- settings from an image (A1111's PNG Info) ---------------------------------------------------------

    def action_networks(self) -> None:
        """The LoRA / embedding picker; what it returns goes into the prompt at the cursor."""
        from tui.screens.networks import NetworksScreen

        self.app.push_screen(NetworksScreen(self.app.registry, self.model_family()), self._insert_network)

    def action_grid(self, _key: str = "") -> None:
        """The X/Y/Z grid dialog over the request the queue key would submit (its seed fixed once, as A1111
        does, so the cells differ only in the axes' fields); every cell is queued as a job."""
        from tui.screens.grid import GridScreen

        if not self._form_ready:
            self.app.notify("The form is still loading; try again in a moment.", timeout=2)
            return
        try:
            request = self.build_request().with_resolved_seed()
        except DarkroomError as error:
            self.app.notify(str(error), severity="error", markup=False)
            return

        def chosen(result: Any) -> None:
            if result is not None:
                self.app.grids.queue(request, *result)

        self.app.push_screen(GridScreen(request, self.app.grids.new_id()), chosen)

    def _insert_network(self, text: str | None) -> None:
        if not text:
            return
        prompt = self.query_one("#prompt", TextArea)
        row, column = prompt.cursor_location
        line = prompt.document.get_line(row)
        before, after = line[:column], line[column:]
        # A space on each side where a word would touch the tag (a tag glued to a word reads as one token).
        prompt.insert((" " if before and not before.endswith((" ", ",")) else "") + text
                      + (" " if after and not after.startswith((" ", ",")) else ""))
        prompt.focus()

    def action_open_png(self, value: str = "", problem: str = "") -> None:
        """Ask for an image (typed, pasted, or dropped on the terminal) and fill the form from its parameters."""
        from tui.screens.dialogs import TextPromptScreen

        question = ("Fill the form from an image's parameters (Darkroom, A1111, Forge).\n"
                    "Path of the PNG, or drop the file here:")

        def answered(text: str | None) -> None:
            if text:
                self.read_image_settings(text)

        self.app.push_screen(TextPromptScreen(f"{problem}\n\n{question}" if problem else question, value=value,
                                              placeholder="image.png"), answered)

    @work(thread=True, exclusive=True, group="png-settings")
    def read_image_settings(self, text: str) -> None:
        """Read the image's request off the UI thread; a file that cannot be read asks again, saying why."""
        from core.metadata import read_request
        from tui.png_settings import NO_MODEL, path_from_text

        path = Path(path_from_text(text))
        relative = not path.is_absolute()
        if relative:  # as the init image: from the folder Darkroom was started in
            path = Path(os.getcwd()) / path
        try:
            if not path.is_file():
                where = f" (a relative path is taken from the current directory, {os.getcwd()})" if relative else ""
                raise DarkroomError(f"{path}: no such file{where}")
            request = read_request(path, model_fallback=NO_MODEL)
        except DarkroomError as error:
            self.call_from_worker_thread(self.action_open_png, text.strip(), str(error))
            return
        except Exception as error:  # noqa: BLE001 - e.g. a decompression bomb: said, never a crash
            self.call_from_worker_thread(self.action_open_png, text.strip(),
                                         f"{path}: cannot read it ({type(error).__name__}: {error})")
            return
        self.call_from_worker_thread(self.apply_image_request, request, path.name, None)

    def apply_image_request(self, request: GenerationRequest, source: str, note: str | None = None) -> None:
        """Fill the form from a request read from an image and say what was filled and what was not."""
        from tui.png_settings import form_fill

        if not self._models_loaded:  # matched against the models folders once they are scanned
            self._pending_image = (request, source, note)
            return
        current = self.form_values()
        fill = form_fill(request, models=[str(m.name) for m in self.models], vaes=self.vae_names,
                         current_model=current.get("model"), current_vae=current.get("vae"),
                         upscalers=getattr(self, "upscaler_names", ()),
                         model_files={str(m.name): m.path for m in self.models if hasattr(m, "path")})
        self.set_form_values(fill.values)
        self.app.settings.update(self.form_values())
        self.app.notify(f"Filled from {source}: " + "; ".join(fill.filled), markup=False, timeout=10)
        not_used = ([note] if note else []) + fill.not_used
        if not_used:
            self.app.notify("Not filled: " + "; ".join(not_used), severity="warning", markup=False, timeout=12)
        if fill.unhashed is not None:
            self.compare_model_hash(request, fill.unhashed)

    @work(thread=True, exclusive=True, group="model-hash")
    def compare_model_hash(self, request: GenerationRequest, path: Path) -> None:
        """Hash the local model a filled image names (never done before: the hash cache had no entry), off the
        UI thread, and say when it is another file than the image's; the job that loads it then finds the hash
        cached."""
        from textual.worker import get_current_worker

        from core.metadata import model_hash_warning
        from core.models.hashes import file_sha256

        try:
            sha256 = file_sha256(path)
        except (DarkroomError, OSError):  # gone or unreadable: the job that loads it will say so
            return
        warning = model_hash_warning(request, path, sha256)
        if warning is not None and not get_current_worker().is_cancelled:  # not after another image was filled
            self.call_from_worker_thread(self._say_model_hash, warning)

    def _say_model_hash(self, warning: str) -> None:
        self.app.notify(warning[0].upper() + warning[1:], severity="warning", markup=False, timeout=12)

    # ---- job events from the app ---------------------------------------------------------------------------

    @property
    def preview(self) -> PreviewPane:
        return self.query_one(PreviewPane)

    def show_step(self, event: JobStep) -> None:
        if self._has_preview():
            self.preview.show_step(event.job_id, event.step, event.total, event.elapsed, event.preview)

    def _has_preview(self) -> bool:
        # The worker's events keep coming while the app shuts down and the screen's widgets are removed.
        return bool(self.query(PreviewPane))

    def show_event(self, event: Event) -> None:
        if not self._has_preview():
            return
        if isinstance(event, JobStarted):
            self.preview.start_job(event.job_id, event.request.prompt)
            self.preview.show_loras(event.request.lora_refs())
        elif isinstance(event, ImageSaved) and event.job_id == self.preview.job_id:
            # each image of the job as it is saved: the newest stays shown until the next image's steps
            self._final_job = event.job_id
            self.load_final(event.path, event.job_id)
        elif isinstance(event, JobFinished) and event.job_id == self.preview.job_id:
            self.preview.finish(f"done in {event.elapsed:.1f}s · seeds {', '.join(map(str, event.seeds))}")
            if event.paths and self._final_job != event.job_id:  # none came as it was saved
                self.load_final(event.paths[-1], event.job_id)
        elif isinstance(event, JobFailed) and event.job_id == self.preview.job_id:
            self.preview.finish(f"failed: {event.error}", complete=False)
        elif isinstance(event, JobCancelled) and event.job_id == self.preview.job_id:
            self.preview.finish("cancelled", complete=False)

    def load_final(self, path: str, job_id: int) -> None:
        """Show a finished image of the job (read off the UI thread); a newer one asked for meanwhile wins."""
        self._final_path = path
        self._load_final(path, job_id)

    @work(thread=True, exclusive=True, group="final-image")
    def _load_final(self, path: str, job_id: int) -> None:
        from tui.widgets.image import load_rgb_thumbnail

        try:
            final = load_rgb_thumbnail(path, 1024)
        except OSError as error:
            self.app.call_from_thread(
                self.app.notify, f"Could not open {path}: {error}", severity="warning", markup=False
            )
            return
        self.call_from_worker_thread(self._show_final, final, job_id, path)

    def _show_final(self, image: Any, job_id: int, path: str) -> None:
        if self.preview.job_id == job_id and self._final_path == path:
            self.preview.show_image(image)

    @work(thread=True, exclusive=True, group="final-image")
    def load_last_image(self) -> None:
        """On start, the newest image of the history fills the empty preview (until a job starts)."""
        from tui.widgets.image import load_rgb_thumbnail

        try:
            newest = self.app.store.history(limit=1)
            image = load_rgb_thumbnail(newest[0].path, 1024) if newest else None
        except Exception:  # noqa: BLE001 - a convenience: a moved or unreadable file just leaves it empty
            return
        if image is not None:
            self.call_from_worker_thread(self._show_last, image, newest[0])

    def _show_last(self, image: Any, entry: Any) -> None:
        if self.preview.job_id is None:  # no job has started meanwhile
            self.preview.show_last(entry.request.prompt, image)
