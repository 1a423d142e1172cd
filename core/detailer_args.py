"""The face/detail pass's settings (ADetailer's tabs), torch-free: the request field ``detailer`` and its infotext.

A request holds up to ``MAX_DETAILERS`` ``Detailer`` entries, each what one ADetailer tab sets (Bing-su/adetailer,
read for its field names, defaults and infotext keys): the detector ``model``, the prompts (empty = the job's,
``[PROMPT]`` = the job's inserted, ``[SEP]`` = one prompt per region in order), the detection filters
(``confidence``, the area ratios, the k largest), the mask steps (offset, ``dilate_erode``, merge/invert,
``mask_blur``) and the inpainting of each region (``denoise``, only masked + ``inpaint_padding``, its own size,
steps and CFG; 0 / None = the job's). ``core.detailer`` runs it; ``core.detectors`` finds the detector.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from core.errors import RequestError

if TYPE_CHECKING:
    from core.lora.tags import LoraRef

MAX_DETAILERS = 2  # ADetailer's default number of tabs ("Max models" 2)
MERGE_INVERT = ("none", "merge", "merge_and_invert")
_MERGE_LABELS = {"none": "None", "merge": "Merge", "merge_and_invert": "Merge and Invert"}


def _int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RequestError(name, value, f"an integer from {low} to {high}")


def _float(name: str, value: Any, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise RequestError(name, value, f"a number from {low} to {high}")


@dataclass(frozen=True)
class Detailer:
    """One detail pass (one ADetailer tab). Its values are checked by ``problems(where)``, ``where`` naming the
    entry in messages (``detailer[0]``): the request reports them with its other fields."""

    model: str
    prompt: str = ""
    negative_prompt: str = ""
    confidence: float = 0.3
    mask_k_largest: int = 0  # 0 = every region
    mask_min_ratio: float = 0.0  # of the image's area
    mask_max_ratio: float = 1.0
    x_offset: int = 0  # px, right
    y_offset: int = 0  # px, up (ADetailer's direction)
    dilate_erode: int = 4  # px; negative erodes
    mask_merge_invert: str = "none"
    mask_blur: int = 4
    denoise: float = 0.4
    inpaint_only_masked: bool = True
    inpaint_padding: int = 32
    inpaint_width: int = 0  # 0 = the job's width (ADetailer: "use inpaint width height" off)
    inpaint_height: int = 0
    steps: int = 0  # 0 = the job's steps
    cfg: float | None = None  # None = the job's CFG scale

    def problems(self, where: str) -> list[RequestError]:
        out: list[RequestError] = []

        def check(fn: Any, *args: Any) -> None:
            try:
                fn(*args)
            except RequestError as error:
                out.append(error)

        if not isinstance(self.model, str) or not self.model.strip():
            out.append(RequestError(f"{where}.model", self.model, "a detector: mediapipe_face_full, "
                                    "mediapipe_face_short or a YOLO file such as face_yolov8n.pt"))
        for name in ("prompt", "negative_prompt"):
            if not isinstance(getattr(self, name), str):
                out.append(RequestError(f"{where}.{name}", getattr(self, name), "a string (empty = the job's)"))
        check(_float, f"{where}.confidence", self.confidence, 0.0, 1.0)
        check(_int, f"{where}.mask_k_largest", self.mask_k_largest, 0, 100)
        check(_float, f"{where}.mask_min_ratio", self.mask_min_ratio, 0.0, 1.0)
        check(_float, f"{where}.mask_max_ratio", self.mask_max_ratio, 0.0, 1.0)
        check(_int, f"{where}.x_offset", self.x_offset, -4096, 4096)
        check(_int, f"{where}.y_offset", self.y_offset, -4096, 4096)
        check(_int, f"{where}.dilate_erode", self.dilate_erode, -128, 128)
        if self.mask_merge_invert not in MERGE_INVERT:
            out.append(RequestError(f"{where}.mask_merge_invert", self.mask_merge_invert,
                                    "one of " + ", ".join(MERGE_INVERT)))
        check(_int, f"{where}.mask_blur", self.mask_blur, 0, 64)
        check(_float, f"{where}.denoise", self.denoise, 0.0, 1.0)
        if not isinstance(self.inpaint_only_masked, bool):
            out.append(RequestError(f"{where}.inpaint_only_masked", self.inpaint_only_masked, "true or false"))
        check(_int, f"{where}.inpaint_padding", self.inpaint_padding, 0, 256)
        for name in ("inpaint_width", "inpaint_height"):
            value = getattr(self, name)
            if value != 0:
                try:
                    _int(f"{where}.{name}", value, 64, 4096)
                    if value % 8:
                        raise RequestError(f"{where}.{name}", value, "")
                except RequestError:
                    out.append(RequestError(f"{where}.{name}", value,
                                            "0 (the job's) or a multiple of 8 from 64 to 4096"))
        check(_int, f"{where}.steps", self.steps, 0, 150)
        if self.cfg is not None:
            check(_float, f"{where}.cfg", self.cfg, 0.0, 30.0)
        if not out and self.mask_min_ratio > self.mask_max_ratio:
            out.append(RequestError(f"{where}.mask_min_ratio", self.mask_min_ratio,
                                    f"at most mask_max_ratio ({self.mask_max_ratio})"))
        return out


_FIELDS = tuple(f.name for f in dataclasses.fields(Detailer))
_SHAPE = ("a list of at most 2 tables (ADetailer's tabs), e.g. [{model = \"face_yolov8n.pt\", denoise = 0.4}]")


def detailers_value(value: Any) -> tuple[tuple[Detailer, ...], list[RequestError]]:
    """The request's ``detailer`` as given (a list of tables or ``Detailer``s; one table alone is taken as a
    list of one) -> the entries and every problem, each naming ``detailer[i].field``."""
    if value is None:
        return (), []
    if isinstance(value, (Mapping, Detailer)):
        value = [value]
    if not isinstance(value, (list, tuple)):
        return (), [RequestError("detailer", value, _SHAPE)]
    if len(value) > MAX_DETAILERS:
        return (), [RequestError("detailer", list(value), f"at most {MAX_DETAILERS} detail passes; {_SHAPE}")]
    out, errors = [], []
    for index, entry in enumerate(value):
        where = f"detailer[{index}]"
        if isinstance(entry, Mapping):
            unknown = sorted(set(entry) - set(_FIELDS), key=str)
            for key in unknown:
                guess = _suggest(str(key))
                hint = f"did you mean {guess!r}? " if guess else ""
                errors.append(RequestError(f"{where}.{key}", entry[key],
                                           f"not a detailer field; {hint}known: " + ", ".join(_FIELDS)))
            if "model" not in entry:
                errors.append(RequestError(f"{where}.model", None, "a detector name (required), e.g. "
                                           "\"face_yolov8n.pt\" or \"mediapipe_face_full\""))
                continue
            fields = {k: v for k, v in entry.items() if k in _FIELDS}
            for key in ("confidence", "mask_min_ratio", "mask_max_ratio", "denoise", "cfg"):
                if isinstance(fields.get(key), int) and not isinstance(fields[key], bool):
                    fields[key] = float(fields[key])
            entry = Detailer(**fields)
        elif not isinstance(entry, Detailer):
            errors.append(RequestError(where, entry, "a table with model and the detail pass's settings"))
            continue
        errors.extend(entry.problems(where))
        out.append(entry)
    return tuple(out), errors


_ALIASES = {"ad_" + name: name for name in _FIELDS} | {
    "ad_denoising_strength": "denoise", "denoising_strength": "denoise", "ad_cfg_scale": "cfg",
    "cfg_scale": "cfg", "ad_inpaint_only_masked_padding": "inpaint_padding", "padding": "inpaint_padding",
}


def _suggest(key: str) -> str | None:
    import difflib

    if key in _ALIASES:
        return _ALIASES[key]
    close = difflib.get_close_matches(key, _FIELDS, n=1, cutoff=0.6)
    return close[0] if close else None


def summary(detailers: tuple[Detailer, ...]) -> str:
    """One line for the queue and History: each pass's detector with its strength (and its prompt when set)."""
    parts = []
    for d in detailers:
        text = f"{d.model} (denoise {d.denoise:g}"
        parts.append(text + (f", prompt {d.prompt!r})" if d.prompt else ")"))
    return "; ".join(parts)


# ---- infotext (ADetailer's keys; the second tab's end in " 2nd") ----------------------------------------------

# (our field, ADetailer's infotext name, written unless it equals this value; None: always written)
_KEYS: tuple[tuple[str, str, Any], ...] = (
    ("model", "ADetailer model", None),
    ("prompt", "ADetailer prompt", ""),
    ("negative_prompt", "ADetailer negative prompt", ""),
    ("confidence", "ADetailer confidence", None),
    ("mask_k_largest", "ADetailer mask only top k largest", 0),
    ("mask_min_ratio", "ADetailer mask min ratio", 0.0),
    ("mask_max_ratio", "ADetailer mask max ratio", 1.0),
    ("x_offset", "ADetailer x offset", 0),
    ("y_offset", "ADetailer y offset", 0),
    ("dilate_erode", "ADetailer dilate erode", None),
    ("mask_merge_invert", "ADetailer mask merge invert", "none"),
    ("mask_blur", "ADetailer mask blur", None),
    ("denoise", "ADetailer denoising strength", None),
    ("inpaint_only_masked", "ADetailer inpaint only masked", None),
    ("inpaint_padding", "ADetailer inpaint padding", None),
)


def suffix(index: int) -> str:
    """ADetailer's key suffix of tab ``index``: none for the first, `` 2nd`` for the second, ..."""
    if index == 0:
        return ""
    n = index + 1
    end = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f" {n}{end}"


def infotext_params(detailers: tuple[Detailer, ...]) -> dict[str, Any]:
    """The infotext entries of the request's detail passes, as ADetailer writes them."""
    out: dict[str, Any] = {}
    for index, d in enumerate(detailers):
        end = suffix(index)
        for name, key, skip in _KEYS:
            value = getattr(d, name)
            if name == "inpaint_padding" and not d.inpaint_only_masked:
                continue  # ADetailer drops the padding with only masked off
            if skip is not None and value == skip:
                continue
            if name == "mask_merge_invert":
                value = _MERGE_LABELS[value]
            elif name == "inpaint_only_masked":
                value = "True" if value else "False"
            out[key + end] = value
        if d.inpaint_width or d.inpaint_height:
            out["ADetailer use inpaint width height" + end] = "True"
            out["ADetailer inpaint width" + end] = d.inpaint_width or None
            out["ADetailer inpaint height" + end] = d.inpaint_height or None
        if d.steps:
            out["ADetailer use separate steps" + end] = "True"
            out["ADetailer steps" + end] = d.steps
        if d.cfg is not None:
            out["ADetailer use separate CFG scale" + end] = "True"
            out["ADetailer CFG scale" + end] = d.cfg
    return out


def from_infotext(params: Mapping[str, str]) -> tuple[list[dict[str, Any]], set[str]]:
    """ADetailer's infotext entries -> the ``detailer`` tables (in tab order) and the keys read. A key whose
    value cannot be read stays unread (the caller keeps it in ``extra``)."""
    tables: list[dict[str, Any]] = []
    used: set[str] = set()
    for index in range(MAX_DETAILERS):
        end = suffix(index)
        if "ADetailer model" + end not in params:
            continue
        table: dict[str, Any] = {}
        for name, key, _ in _KEYS:
            if key + end not in params:
                continue
            raw = params[key + end].strip() if name not in ("prompt", "negative_prompt") else params[key + end]
            value = _read(name, raw)
            if value is not None:
                table[name] = value
                used.add(key + end)
        pairs = (("ADetailer use inpaint width height", (("ADetailer inpaint width", "inpaint_width"),
                                                          ("ADetailer inpaint height", "inpaint_height"))),
                 ("ADetailer use separate steps", (("ADetailer steps", "steps"),)),
                 ("ADetailer use separate CFG scale", (("ADetailer CFG scale", "cfg"),)))
        for switch, values in pairs:
            if params.get(switch + end, "").strip().lower() != "true":
                continue
            used.add(switch + end)
            for key, name in values:
                if key + end in params:
                    value = _read(name, params[key + end].strip())
                    if value is not None:
                        table[name] = value
                        used.add(key + end)
        tables.append(table)
    return tables, used


def _read(name: str, raw: str) -> Any:
    kind = type(getattr(Detailer, name, None)) if name not in ("model", "cfg") else (str if name == "model" else float)
    try:
        if name in ("prompt", "negative_prompt", "model"):
            return raw
        if name == "mask_merge_invert":
            return next((ours for ours, label in _MERGE_LABELS.items() if label.lower() == raw.lower()), None)
        if name == "inpaint_only_masked":
            return {"true": True, "false": False}.get(raw.lower())
        if kind is float:
            return float(raw)
        return int(float(raw)) if float(raw).is_integer() else None
    except ValueError:
        return None


def detail_loras(detailers: Sequence[Detailer]) -> list[LoraRef]:
    """The LoRAs the tags in the detail prompts name (front ends check they exist before queueing)."""
    from core.lora.tags import prompt_loras

    return [ref for d in detailers for ref in prompt_loras(d.prompt, d.negative_prompt)]
