"""Image metadata: A1111-style ``parameters`` infotext, our own ``darkroom`` JSON chunk, atomic PNG saving.

Every saved PNG carries two text chunks:

- ``parameters``: the A1111 infotext (prompt, ``Negative prompt:`` line, parameter line), so A1111, Forge,
  Civitai and every other tool that reads A1111 metadata shows the settings;
- ``darkroom``: the full ``GenerationRequest`` as JSON (with this image's seed), which is lossless and is what
  ``read_request`` prefers, plus ``family`` (the model's family, ``"sdxl"``; ``read_family``), which is no
  request field: readers drop it.

Infotext format (the shared reference ``previews-and-metadata.md`` §4), written from its description:
the parameter line is ``Key: value`` entries joined by ``", "`` in A1111's emission order; a value whose text
contains a comma, newline or colon is written as a JSON string literal.

Number formatting: A1111 writes numbers as its UI hands them over, which for whole-number floats like the
default CFG scale is ``7`` and otherwise the shortest decimal (``7.5``, ``0.55``). We write floats the same
way: a whole number without ``.0``, anything else as Python's shortest ``repr``. So ``cfg=7.0`` gives
``CFG scale: 7`` and ``cfg=6.5`` gives ``CFG scale: 6.5``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import re
import secrets
import socket
import time
from collections.abc import Mapping
from importlib import metadata as _importlib_metadata
from pathlib import Path
from typing import Any

from core.detailer_args import from_infotext as detailer_from_infotext
from core.detailer_args import infotext_params
from core.errors import DarkroomError
from core.lora.tags import with_tags
from core.request import GenerationRequest, HiresFix
from core.sampling import SAMPLER_LABELS, SCHEDULE_LABELS


class MetadataError(DarkroomError):
    """An image carries no (usable) generation parameters, or cannot be read or written."""


def _package_version() -> str:
    try:
        return _importlib_metadata.version("darkroom")
    except _importlib_metadata.PackageNotFoundError:
        return "dev"


DEFAULT_VERSION = f"darkroom {_package_version()}"

PARAMETERS_KEY = "parameters"  # A1111's PNG text chunk
DARKROOM_KEY = "darkroom"  # our lossless request JSON
DARKROOM_EXTRA_KEYS = ("family",)  # in the darkroom JSON beside the request fields, dropped when reading it
JOB_KEY = "darkroom-job"  # which queued job saved the image: crash recovery matches it to its history
EXIF_IFD = 0x8769
EXIF_USER_COMMENT = 0x9286

# ---- formatting ---------------------------------------------------------------------------------------------


def format_number(value: float | int) -> str:
    """``7.0`` -> ``7``, ``7.5`` -> ``7.5``, ``0.55`` -> ``0.55`` (see the module docstring)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return repr(value) if isinstance(value, float) else str(value)


def quote(value: object) -> str:
    """A1111's quoting rule: JSON string literal when the text holds a comma, newline or colon."""
    text = format_number(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)
    if any(ch in text for ch in ",\n:"):
        return json.dumps(text, ensure_ascii=False)
    return text


def _model_label(model: str) -> str:
    """A1111's ``Model`` value: the checkpoint's file name without folder or extension."""
    base = model.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    stem, ext = os.path.splitext(base)
    return stem if ext.lower() in (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf") else base


# ``extra`` key of a request read from an image: the model the image was made with, as the image names it, and its
# ``Model hash`` ({"model": "dreamshaper_8", "hash": "879db523c3"}), so whoever runs that model can say when the
# local file of that name is another file. It describes that model only: a job of another model ignores it.
MADE_WITH = "made_with"
_SHORT_HASH_RE = re.compile(r"[0-9a-fA-F]{10,64}")


def with_made_with(request: GenerationRequest, model_hash: str | None) -> GenerationRequest:
    """``request`` (read from an image, or a history entry) with ``extra.made_with`` saying its image's model
    hash, or without one when the image records none (a ``made_with`` a job carried from its own source image
    describes that image, not this one)."""
    extra = {k: v for k, v in request.extra.items() if k != MADE_WITH}
    if model_hash:
        extra[MADE_WITH] = {"model": request.model, "hash": model_hash}
    return request.replace(extra=extra) if extra != dict(request.extra) else request


def expected_model_hash(request: GenerationRequest) -> str | None:
    """The model hash ``request``'s image was made with, when it can be compared with a local file's SHA-256 and
    describes the model the request asks for; else None (see ``model_hash_warning``)."""
    made = request.extra.get(MADE_WITH)
    if not isinstance(made, Mapping):
        return None
    expected, model = made.get("hash"), made.get("model")
    if not isinstance(expected, str) or not _SHORT_HASH_RE.fullmatch(expected) or not isinstance(model, str):
        return None
    if _model_label(model).casefold() != _model_label(request.model).casefold():
        return None  # the job runs another model than the image's (a grid axis, a job's own model)
    return expected


def model_hash_warning(request: GenerationRequest, path: Path | str, sha256: str | None) -> str | None:
    """One sentence when ``request`` comes from an image made with another file than ``path``, the local model
    of the name it asks for, whose SHA-256 (or its first 10 hex digits) is ``sha256``; None when they match or
    cannot be compared: no hash known, another model asked for, or an 8-digit hash of A1111's old algorithm
    (a hash of one 64 KiB block, which no SHA-256 prefix matches)."""
    expected = expected_model_hash(request)
    if expected is None or not sha256:
        return None
    size = min(len(expected), len(sha256))
    if expected[:size].lower() == sha256[:size].lower():
        return None
    return (f"the image was made with model hash {expected}; your {Path(path).name} is {sha256[:10]}: a different "
            "file, the image will not reproduce exactly")


def _vae_label(vae: str) -> str:
    """A1111 writes the VAE's file name (with extension) as ``VAE``."""
    return vae.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]


HIRES_UPSCALER_LABELS = {"latent": "Latent", "image": "Lanczos"}
# A1111's inpainting values ("Masked content", "Inpaint area"; "original" and "Whole picture" are not written)
MASKED_CONTENT_LABELS = {"original": "original", "fill": "fill", "latent_noise": "latent noise",
                         "latent_nothing": "latent nothing"}
INPAINT_AREA_LABELS = {"whole": "Whole picture", "only_masked": "Only masked"}


def format_infotext(
    request: GenerationRequest,
    seed: int,
    *,
    model_hash: str | None = None,
    extra: Mapping[str, object] | None = None,
    version: str = DEFAULT_VERSION,
) -> str:
    """The A1111 ``parameters`` text for one image of ``request`` made with ``seed``.

    ``extra`` entries (e.g. ``{"Lora hashes": "detail: 0123456789ab"}``) go after the built-in keys and before
    ``Version``, in their order; a ``None`` value is left out.
    """
    params: dict[str, object | None] = {
        "Steps": request.steps,
        "Sampler": SAMPLER_LABELS[request.sampler],
        "Schedule type": SCHEDULE_LABELS[request.schedule],
        "CFG scale": request.cfg,
        # Forge's key for Flux.1 dev's distilled guidance; the runner fills in the default the model used.
        "Distilled CFG Scale": request.guidance,
        "Seed": seed,
        "Size": f"{request.width}x{request.height}",
        "Model hash": model_hash,
        "Model": _model_label(request.model),
        "VAE": _vae_label(request.vae) if request.vae else None,
        # Our key (Forge writes "Module 1: ae, Module 2: clip_l, ..."): the text encoders of a split model
        "Text encoders": ", ".join(_vae_label(t) for t in request.text_encoders) or None,
        "Denoising strength": None,
        "Clip skip": request.clip_skip if request.clip_skip > 1 else None,
        # Our key (A1111 has none): only an override of the model's own prediction type is worth recording.
        "Prediction": request.prediction if request.prediction != "auto" else None,
    }
    # An upscale job of an image that had no parameters: only what the upscale did (``extra``) is true of it.
    generated = getattr(request, "upscale", None) is None or bool(request.model)
    if not generated:
        params = {}
    if request.is_inpaint and generated:  # A1111's keys, in the order it sets them
        params["Mask mode"] = "Inpaint not masked" if request.invert_mask else None
        params["Mask blur"] = request.mask_blur or None
        if request.inpaint_area == "only_masked":
            params["Inpaint area"] = INPAINT_AREA_LABELS["only_masked"]
            params["Masked area padding"] = request.only_masked_padding
        if request.masked_content != "original":
            params["Masked content"] = MASKED_CONTENT_LABELS[request.masked_content]
        o = request.outpaint
        if o is not None:  # our key (A1111's outpainting scripts record none); kept in extra when read back
            params["Outpaint"] = f"left {o.left}, right {o.right}, top {o.top}, bottom {o.bottom}"
    hires = request.hires if generated else None
    if request.is_img2img and generated:
        params["Denoising strength"] = request.denoise
    elif hires is not None:
        # A1111's txt2img writes the second pass's strength as "Denoising strength".
        params["Denoising strength"] = hires.denoise
    if hires is not None:
        params["Hires upscale"] = hires.scale
        params["Hires steps"] = hires.steps or None  # 0 = same as the first pass, which A1111 leaves out
        # an upscaler model by its name, as A1111 lists it (the file name without extension: "4x-UltraSharp")
        params["Hires upscaler"] = HIRES_UPSCALER_LABELS.get(hires.upscaler) or _model_label(hires.upscaler)
        if request.is_img2img:
            # A1111 has no img2img + hires; keep the second strength under our own key.
            params["Hires denoising strength"] = hires.denoise
    if request.refiner and generated:
        # A1111 (modules/processing_scripts/refiner.py): "Refiner: <checkpoint>, Refiner switch at: 0.8"
        params["Refiner"] = _model_label(request.refiner)
        params["Refiner switch at"] = request.refiner_switch
    original = request.extra.get("original_prompt")
    if isinstance(original, str) and original != request.prompt:
        params["Original prompt"] = original  # our key: the prompt as written before a local LLM enhanced it
    # Our keys (A1111 has no feature caches): written only when a cache is on.
    if request.deepcache_interval > 1:
        params["DeepCache interval"] = request.deepcache_interval
        params["DeepCache branch"] = request.deepcache_branch
    if request.fbcache_threshold > 0:
        params["First block cache threshold"] = request.fbcache_threshold
    params.update(infotext_params(request.detailer))  # ADetailer's keys (" 2nd" for the second pass)
    for key, value in (extra or {}).items():
        # A new key goes last; a built-in key we left empty (e.g. "Model hash") is filled in its own position.
        # The values we computed from the request win, so ``extra`` cannot contradict the request.
        if params.get(str(key)) is None:
            params[str(key)] = value
    params.pop("Version", None)
    params["Version"] = version

    entries = []
    for key, value in params.items():
        if value is None:
            continue
        text = quote(value)
        entries.append(key if text == key else f"{key}: {text}")

    prompt = request.prompt
    if request.loras and generated:
        # the job's or preset's list of LoRAs as tags after the prompt: A1111, Forge and every infotext reader
        # (ours without the darkroom chunk too) apply only the prompt's tags, so the image would not reproduce
        prompt = with_tags(prompt, request.loras)
    lines = [prompt]
    if request.negative_prompt:
        lines.append(f"Negative prompt: {request.negative_prompt}")
    lines.append(", ".join(entries))
    return "\n".join(lines).strip()


# ---- parsing ------------------------------------------------------------------------------------------------

# key: a word character then word characters, spaces, '-' or '/'; value: a non-empty double-quoted string
# (backslash escapes allowed) or a run of non-comma characters; then a comma or the end.
_PARAM_RE = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE_RE = re.compile(r"^(\d+)x(\d+)$")
_NEGATIVE_PREFIX = "Negative prompt:"


def parse_infotext(text: str) -> dict[str, str]:
    """Split an A1111 infotext into ``{"Prompt", "Negative prompt", <parameter keys>}``.

    Only the keys present are returned (A1111's defaults for absent keys are applied by
    ``infotext_to_request``). A ``WxH`` value becomes ``Key-1`` and ``Key-2``.
    """
    lines = text.strip().split("\n")
    result: dict[str, str] = {}
    param_line = lines[-1] if lines else ""
    matches = _PARAM_RE.findall(param_line)
    if len(matches) >= 3:
        lines = lines[:-1]
    else:
        matches = []

    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    in_negative = False
    for line in lines:
        line = line.strip()
        if not in_negative and line.startswith(_NEGATIVE_PREFIX):
            in_negative = True
            line = line[len(_NEGATIVE_PREFIX) :].strip()
        (negative_lines if in_negative else prompt_lines).append(line)
    result["Prompt"] = "\n".join(prompt_lines)
    result["Negative prompt"] = "\n".join(negative_lines)

    for key, raw in matches:
        value = raw.strip()
        if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
            try:
                decoded = json.loads(value)
                value = decoded if isinstance(decoded, str) else value
            except json.JSONDecodeError:
                pass
        size = _SIZE_RE.match(value)
        if size:
            result[f"{key}-1"] = size.group(1)
            result[f"{key}-2"] = size.group(2)
        else:
            result[key] = value
    return result


def _norm(label: str) -> str:
    return " ".join(label.lower().replace("_", " ").split())


# A1111 label, our id, and the aliases A1111, sd.cpp and old infotexts use -> our id.
_SAMPLER_BY_NAME: dict[str, str] = {}
for _id, _label in SAMPLER_LABELS.items():
    _SAMPLER_BY_NAME[_norm(_label)] = _id
    _SAMPLER_BY_NAME[_norm(_id)] = _id
    _SAMPLER_BY_NAME[_norm("k_" + _id)] = _id
for _alias, _id in {
    "k_euler_a": "euler_ancestral",
    "euler_a": "euler_ancestral",
    "k_dpm_2_a": "dpm_2_ancestral",
    "dpm2": "dpm_2",
    "dpm2_a": "dpm_2_ancestral",
    "k_dpmpp_2s_a": "dpmpp_2s_ancestral",
    "dpm++2s_a": "dpmpp_2s_ancestral",
    "dpm++2m": "dpmpp_2m",
    "dpm++2m_sde": "dpmpp_2m_sde",
    "dpm++_2m": "dpmpp_2m",
    "unipc": "uni_pc",
    "ddim_trailing": "ddim",
}.items():
    _SAMPLER_BY_NAME[_norm(_alias)] = _id

_SCHEDULE_BY_NAME: dict[str, str] = {}
for _id, _label in SCHEDULE_LABELS.items():
    _SCHEDULE_BY_NAME[_norm(_label)] = _id
    _SCHEDULE_BY_NAME[_norm(_id)] = _id
for _alias, _id in {
    "uniform": "normal",  # A1111's "Uniform" is the model's own evenly spaced timesteps
    "sgmuniform": "sgm_uniform",
    "align_your_steps": "ays",
    "ddim": "ddim_uniform",
}.items():
    _SCHEDULE_BY_NAME[_norm(_alias)] = _id

# A1111's "Automatic" schedule per sampler (sampling.md §1); the rest use the model's own spacing.
_AUTOMATIC_SCHEDULE = {
    "dpm_2": "karras",
    "dpm_2_ancestral": "karras",
    "dpmpp_2s_ancestral": "karras",
    "dpmpp_sde": "karras",
    "dpmpp_2m": "karras",
    "dpmpp_2m_sde": "exponential",
    "dpmpp_3m_sde": "exponential",
}


def split_sampler(label: str) -> tuple[str | None, str | None]:
    """``"DPM++ 2M Karras"`` -> (dpmpp_2m, karras); ``"euler_a karras"`` (sd.cpp) likewise; unknown -> None."""
    name = _norm(label)
    if name in _SAMPLER_BY_NAME:
        return _SAMPLER_BY_NAME[name], None
    words = name.split(" ")
    for cut in range(len(words) - 1, 0, -1):
        head, tail = " ".join(words[:cut]), " ".join(words[cut:])
        if head in _SAMPLER_BY_NAME and tail in _SCHEDULE_BY_NAME:
            return _SAMPLER_BY_NAME[head], _SCHEDULE_BY_NAME[tail]
    return None, None


_UPSCALE_KEYS = ("Hires upscale", "Hires resize-1", "Hires resize-2")
_CONSUMED = {
    "Prompt",
    "Negative prompt",
    "Steps",
    "Sampler",
    "Schedule type",
    "CFG scale",
    "Distilled CFG Scale",
    "Seed",
    "Size-1",
    "Size-2",
    "Model",
    "VAE",
    "Text encoders",
    "Clip skip",
    "Prediction",
    "Denoising strength",
    "Hires upscale",
    "Hires steps",
    "Hires upscaler",
    "Hires denoising strength",
    "Refiner",
    "Refiner switch at",
    "DeepCache interval",
    "DeepCache branch",
    "First block cache threshold",
    "Mask mode",
    "Mask blur",
    "Inpaint area",
    "Masked area padding",
    "Masked content",
}
_SHORT_HASH = re.compile(r"\s*\[[0-9a-fA-F]{8,}\]$")  # A1111 writes the refiner as "name [0123456789]"


def _number(params: Mapping[str, str], key: str, kind: type) -> Any:
    value = params[key].strip()
    try:
        if kind is float:
            return float(value)
        try:
            return int(value)
        except ValueError:
            number = float(value)  # "20.0" from writers that print every number as a float
            if not number.is_integer():
                raise
            return int(number)
    except ValueError:
        raise MetadataError(f"infotext entry {key!r} is {value!r}, which is not a number") from None


# A1111's upscalers that are no model file: its latent modes, and plain resizes (Lanczos is our "image")
_PLAIN_RESIZES = ("none", "lanczos", "nearest")


def hires_upscaler(label: str) -> str:
    """An infotext's ``Hires upscaler`` as a request's: ``Latent*`` -> latent, a plain resize -> image, any other
    name is an upscaler model's (``4x-UltraSharp``), looked up in the models folders when the job runs."""
    text = label.strip()
    if text.lower().startswith("latent"):
        return "latent"
    if not text or text.lower() in _PLAIN_RESIZES:
        return "image"
    return text


def infotext_to_request(text: str, *, model_fallback: str | None = None) -> GenerationRequest:
    """Turn an A1111 infotext back into a request.

    Sampler labels (current, legacy ``"DPM++ 2M Karras"``, aliases like ``k_euler_a``) and schedule labels map
    to our ids; ``Schedule type: Automatic`` (or none) means the sampler's A1111 default. A sampler or schedule
    we do not implement falls back to ``euler`` / ``normal`` and its text is kept in ``extra`` under its key.
    Every key we do not map (``Lora hashes``, ``Version``, ...) is kept in ``extra``; ``Model hash`` becomes
    ``extra.made_with`` (``with_made_with``).
    """
    params = parse_infotext(text)
    fields: dict[str, Any] = {"prompt": params["Prompt"], "negative_prompt": params["Negative prompt"]}
    extra: dict[str, Any] = {}

    model = params.get("Model") or model_fallback
    if not model:
        raise MetadataError("the infotext names no model (no 'Model:' entry); pass the checkpoint to use")
    fields["model"] = model
    if params.get("VAE"):
        fields["vae"] = params["VAE"]
    if params.get("Text encoders"):
        fields["text_encoders"] = [t.strip() for t in params["Text encoders"].split(",") if t.strip()]

    sampler, schedule = None, None
    if "Sampler" in params:
        sampler, schedule = split_sampler(params["Sampler"])
        if sampler is None:
            extra["Sampler"] = params["Sampler"]
    sampler = sampler or "euler"
    schedule_text = params.get("Schedule type", "Automatic")
    if _norm(schedule_text) == "automatic":
        schedule = schedule or _AUTOMATIC_SCHEDULE.get(sampler, "normal")
    elif _norm(schedule_text) in _SCHEDULE_BY_NAME:
        schedule = _SCHEDULE_BY_NAME[_norm(schedule_text)]
    else:
        extra["Schedule type"] = schedule_text
        schedule = _AUTOMATIC_SCHEDULE.get(sampler, "normal")
    fields["sampler"], fields["schedule"] = sampler, schedule

    if "Steps" in params:
        fields["steps"] = _number(params, "Steps", int)
    if "CFG scale" in params:
        fields["cfg"] = _number(params, "CFG scale", float)
    if "Distilled CFG Scale" in params:
        fields["guidance"] = _number(params, "Distilled CFG Scale", float)
    if "Seed" in params:
        fields["seed"] = _number(params, "Seed", int)
    if "Size-1" in params and "Size-2" in params:
        fields["width"] = _number(params, "Size-1", int)
        fields["height"] = _number(params, "Size-2", int)
    if "Clip skip" in params:
        fields["clip_skip"] = max(1, _number(params, "Clip skip", int))
    if params.get("Prediction", "").strip() in ("eps", "v"):
        fields["prediction"] = params["Prediction"].strip()
    if params.get("Refiner"):
        fields["refiner"] = _SHORT_HASH.sub("", params["Refiner"])
        if "Refiner switch at" in params:
            fields["refiner_switch"] = _number(params, "Refiner switch at", float)
    for key, name, kind in (
        ("DeepCache interval", "deepcache_interval", int),
        ("DeepCache branch", "deepcache_branch", int),
        ("First block cache threshold", "fbcache_threshold", float),
    ):
        if key in params:
            fields[name] = _number(params, key, kind)

    _inpaint_fields(params, fields, extra)
    detailer_tables, detailer_keys = detailer_from_infotext(params)
    if detailer_tables:
        fields["detailer"] = detailer_tables
    has_hires = any(key in params for key in _UPSCALE_KEYS)
    strength = _number(params, "Denoising strength", float) if "Denoising strength" in params else None
    if has_hires:
        hires: dict[str, Any] = {}
        if "Hires upscale" in params:
            hires["scale"] = _number(params, "Hires upscale", float)
        elif "Hires resize-1" in params and "width" in fields:
            hires["scale"] = round(_number(params, "Hires resize-1", int) / fields["width"], 4)
        if "Hires steps" in params:
            hires["steps"] = _number(params, "Hires steps", int)
        upscaler = params.get("Hires upscaler")
        if upscaler is not None:
            hires["upscaler"] = hires_upscaler(upscaler)
            if upscaler not in HIRES_UPSCALER_LABELS.values() and hires["upscaler"] in HIRES_UPSCALER_LABELS:
                extra["Hires upscaler"] = upscaler
        if "Hires denoising strength" in params:
            hires["denoise"] = _number(params, "Hires denoising strength", float)
            if strength is not None:
                fields["denoise"] = strength
        elif strength is not None:
            hires["denoise"] = strength
        fields["hires"] = HiresFix(**hires)
    elif strength is not None:
        fields["denoise"] = strength

    for key, value in params.items():
        if key in _CONSUMED or key in detailer_keys:
            continue
        if key.endswith("-1") and key[:-2] + "-2" in params:
            extra[key[:-2]] = f"{value}x{params[key[:-2] + '-2']}"
        elif key.endswith("-2") and key[:-2] + "-1" in params:
            continue
        else:
            extra[key] = value
    model_hash = extra.pop("Model hash", None)  # the image's model, told apart from another of its name
    fields["extra"] = extra
    return with_made_with(GenerationRequest(**fields), model_hash)


# Infotext entries that only describe the image (hashes, versions, what was mapped already): nothing to apply
_RECORD_ONLY = {"Model hash", "Version", "Lora hashes", "TI hashes", "Hashes", "Hires resize", "Original prompt",
                "ADetailer version", "User"}


def unapplied_entries(extra: Mapping[str, Any]) -> list[str]:
    """The entries of an image's infotext (a request's ``extra``, as ``infotext_to_request`` keeps them) that
    change the image and that Darkroom does not apply (``Variation seed: 99``, ``RNG: CPU``, ``Hires sampler``,
    a sampler it does not have), as ``Key: value``: a job made from the image makes another one."""
    out = []
    for key, value in extra.items():
        if key in _RECORD_ONLY or key.islower() or value in (None, ""):  # lower case: our own notes
            continue
        text = str(value)
        out.append(f"{key}: {text if len(text) <= 40 else text[:39] + '…'}")
    return out


def _inpaint_fields(params: Mapping[str, str], fields: dict[str, Any], extra: dict[str, Any]) -> None:
    """A1111's inpainting keys -> request fields (the mask file itself is not in an infotext); a value we do not
    know stays in ``extra`` under its key."""
    if "Mask blur" in params:
        fields["mask_blur"] = _number(params, "Mask blur", int)
    if "Masked area padding" in params:
        fields["only_masked_padding"] = _number(params, "Masked area padding", int)
    for key, name, labels in (("Inpaint area", "inpaint_area", INPAINT_AREA_LABELS),
                              ("Masked content", "masked_content", MASKED_CONTENT_LABELS)):
        if key in params:
            found = next((ours for ours, label in labels.items() if _norm(label) == _norm(params[key])), None)
            if found is None:
                extra[key] = params[key]
            else:
                fields[name] = found
    if "Mask mode" in params:
        fields["invert_mask"] = _norm(params["Mask mode"]) == "inpaint not masked"


# ---- saving -------------------------------------------------------------------------------------------------

_NUMBERED_RE = re.compile(r"^(\d{5,})-")
_CLAIM_RE = re.compile(r"^\.(\d{5,})\.claim$")
_DAY_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
# ``.tmp-<host tag>-<pid>-<random>.png``: the pid and host say whose it is, so only a dead process's is removed
_TEMP_RE = re.compile(r"^\.tmp-(?:([0-9a-f]{8})-(\d+)-)?[0-9a-f]{16}\.png$")
# A file whose owner cannot be told (an empty claim: killed between creating and writing it; a temp file of an
# older version) is stale once this old: a claim lives for a rename, a temp file for one save.
UNOWNED_STALE_AFTER = 3600.0
# A pid can be reused by an unrelated process; no save takes this long, so an older file is stale anyway.
OWNED_STALE_AFTER = 24 * 3600.0


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def _owner_text() -> str:
    return f"{_host_tag()} {os.getpid()}"


def _highest_number(folder: Path) -> int:
    highest = -1
    for entry in os.scandir(folder):
        match = _NUMBERED_RE.match(entry.name) or _CLAIM_RE.match(entry.name)
        if match:
            highest = max(highest, int(match.group(1)))
    return highest


def _number_taken(folder: Path, number: int) -> bool:
    prefix = f"{number:05d}-"
    return any(entry.name.startswith(prefix) for entry in os.scandir(folder))


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a directory; the rename is still atomic
    finally:
        os.close(fd)


def _png_info(
    request: GenerationRequest,
    seed: int,
    model_hash: str | None,
    extra: Mapping | None,
    job_tag: Mapping[str, Any] | None = None,
    family: str | None = None,
):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    # add_text writes tEXt for Latin-1 text and iTXt (UTF-8) otherwise.
    info.add_text(PARAMETERS_KEY, format_infotext(request, seed, model_hash=model_hash, extra=extra))
    record = request.replace(seed=seed).to_dict()
    if family:
        record["family"] = family
    info.add_text(DARKROOM_KEY, json.dumps(record, ensure_ascii=False))
    if job_tag is not None:
        info.add_text(JOB_KEY, json.dumps(dict(job_tag), sort_keys=True))
    return info


def _create_temp(folder: Path) -> tuple[int, Path]:
    """A new hidden temp file, created like any user file (0666 minus the umask).

    ``tempfile.mkstemp`` would make it 0600, and the rename would keep that: images other users, a web
    server or a file-sharing service could not read. Its name carries this process's pid (and a host tag), so
    ``remove_stale_files`` removes it only once this process is gone.
    """
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_BINARY", 0)
    while True:
        path = folder / f".tmp-{_host_tag()}-{os.getpid()}-{secrets.token_hex(8)}.png"
        try:
            return os.open(path, flags, 0o666), path
        except FileExistsError:
            continue
        except OSError as exc:
            raise MetadataError(f"cannot save the image in {folder}: {exc.strerror or exc}") from None


def _make_claim(path: Path) -> None:
    """Create ``path`` exclusively (FileExistsError when taken) and write our owner into it."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        os.write(fd, _owner_text().encode("ascii"))
    finally:
        os.close(fd)


# Test hook: called with the name of each point of save_image as it is passed ("written", "claimed", "renamed"),
# so a test can kill the process exactly there.
_save_hook: Any = None


def _at(point: str) -> None:
    if _save_hook is not None:
        _save_hook(point)


def save_image(
    image: Any,
    request: GenerationRequest,
    seed: int,
    output_dir: Path,
    *,
    model_hash: str | None = None,
    extra: Mapping | None = None,
    now: _dt.datetime | None = None,
    job_tag: Mapping[str, Any] | None = None,
    family: str | None = None,
) -> Path:
    """Save ``image`` (a PIL image) as ``output_dir/YYYY-MM-DD/NNNNN-<seed>.png`` and return the path.

    The file is written to a hidden temp file in the same folder, fsynced and renamed into place, so a reader
    never sees a partial PNG. The counter NNNNN is claimed with an exclusive ``.NNNNN.claim`` marker (created
    with O_EXCL, holding the owner's pid) for the moment of the rename, so two threads or processes saving at
    once never share a number. ``job_tag`` (the worker's job id and creation time) is stored in a
    ``darkroom-job`` text chunk: if the process dies between the rename and recording the image in the
    history, ``find_job_images`` finds it at the next start. A process killed mid-save leaves a temp file or a
    claim that ``remove_stale_files`` removes once it is gone.
    """
    day = (now or _dt.datetime.now()).strftime("%Y-%m-%d")
    folder = Path(output_dir) / day
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MetadataError(f"cannot create the output folder {folder}: {exc.strerror or exc}") from None
    info = _png_info(request, seed, model_hash, extra, job_tag, family)

    fd, tmp = _create_temp(folder)
    claim: Path | None = None
    try:
        with os.fdopen(fd, "wb") as handle:
            image.save(handle, format="PNG", pnginfo=info)
            handle.flush()
            os.fsync(handle.fileno())
        _at("written")
        number = _highest_number(folder) + 1
        while True:
            claim = folder / f".{number:05d}.claim"
            try:
                _make_claim(claim)
            except FileExistsError:
                claim = None
                number += 1
                continue
            # Someone may have finished with this number (and dropped its claim) since we scanned.
            if _number_taken(folder, number):
                claim.unlink()
                claim = None
                number = max(number + 1, _highest_number(folder) + 1)
                continue
            break
        _at("claimed")
        final = folder / f"{number:05d}-{seed}.png"
        os.replace(tmp, final)
        _fsync_dir(folder)
        _at("renamed")
        return final
    except OSError as exc:
        raise MetadataError(f"cannot save the image in {folder}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if claim is not None:
            with contextlib.suppress(FileNotFoundError):
                claim.unlink()


# ---- after a crash ------------------------------------------------------------------------------------------


def _day_folders(output_dir: Path) -> list[Path]:
    try:
        return sorted(Path(e.path) for e in os.scandir(output_dir) if e.is_dir() and _DAY_RE.match(e.name))
    except OSError:
        return []


def _owner_gone(host: str | None, pid: int | None, age: float) -> bool:
    """Is the process that made a temp or claim file gone? Unknown owners go by age alone."""
    from core.store import pid_alive  # the one definition of "alive" (it reads /proc for zombies)

    if host is None or pid is None:
        return age > UNOWNED_STALE_AFTER
    if host != _host_tag():
        return age > OWNED_STALE_AFTER  # another machine's (a shared folder): its pids mean nothing here
    return not pid_alive(pid) or age > OWNED_STALE_AFTER


def _claim_owner(path: Path) -> tuple[str | None, int | None]:
    try:
        host, pid = path.read_text(encoding="ascii").split()
        return host, int(pid)
    except (OSError, ValueError):
        return None, None


def remove_stale_files(output_dir: Path | str, *, now: float | None = None) -> list[Path]:
    """Remove the ``.tmp-*.png`` and ``.NNNNN.claim`` files that processes killed mid-save left in the day
    folders of ``output_dir``; returns what was removed. A live process's files (another batch run saving at
    this moment) are left alone."""
    now = time.time() if now is None else now
    removed = []
    for folder in _day_folders(Path(output_dir)):
        try:
            entries = [e for e in os.scandir(folder) if e.name.startswith(".")]
        except OSError:
            continue
        for entry in entries:
            temp = _TEMP_RE.match(entry.name)
            if temp is None and not _CLAIM_RE.match(entry.name):
                continue
            try:
                age = now - entry.stat(follow_symlinks=False).st_mtime
            except OSError:
                continue
            if temp is not None:
                host, pid = temp.group(1), int(temp.group(2)) if temp.group(2) else None
            else:
                host, pid = _claim_owner(Path(entry.path))
            if _owner_gone(host, pid, age):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


def find_job_images(
    output_dir: Path | str, job_tag: Mapping[str, Any], since: float, until: float
) -> list[tuple[Path, GenerationRequest, int, str | None]]:
    """The images in ``output_dir`` whose ``darkroom-job`` chunk is ``job_tag``: ``(path, request, seed,
    model hash)`` each. Only files of the day folders from ``since`` to ``until`` (epoch seconds) and written
    in that time are opened, so this stays quick in a folder of thousands of images."""
    from PIL import Image

    first = _dt.date.fromtimestamp(since - 60)
    last = _dt.date.fromtimestamp(until + 60)
    wanted = json.dumps(dict(job_tag), sort_keys=True)
    found = []
    for folder in _day_folders(Path(output_dir)):
        try:
            day = _dt.date.fromisoformat(folder.name)
        except ValueError:
            continue
        if not first <= day <= last:
            continue
        try:
            entries = [e for e in os.scandir(folder) if _NUMBERED_RE.match(e.name) and e.name.endswith(".png")]
        except OSError:
            continue
        for entry in entries:
            try:
                mtime = entry.stat().st_mtime
                if not since - 5 <= mtime <= until + 5:
                    continue
                with Image.open(entry.path) as img:
                    texts = dict(getattr(img, "text", {}))
            except Exception:  # noqa: BLE001 - anything unreadable is not one of ours
                continue
            if texts.get(JOB_KEY) != wanted:
                continue
            try:
                request = _darkroom_request(json.loads(texts[DARKROOM_KEY]))
            except (KeyError, ValueError, TypeError, AttributeError, DarkroomError):
                continue
            model_hash = parse_infotext(texts.get(PARAMETERS_KEY, "")).get("Model hash") or None
            found.append((Path(entry.path), request, request.seed, model_hash))
    return sorted(found)


# ---- reading ------------------------------------------------------------------------------------------------


def _decode_user_comment(value: bytes | str) -> str:
    """EXIF UserComment: an 8-byte character-code prefix, then the text (``UNICODE`` = UTF-16)."""
    if isinstance(value, str):
        return value
    prefix, body = value[:8], value[8:]
    if prefix == b"UNICODE\0":
        big, little = body.decode("utf-16-be", "replace"), body.decode("utf-16-le", "replace")
        # piexif (A1111) writes big-endian; some writers use little-endian. Pick the one that reads as text.
        return big if sum(c < "\u0100" for c in big) >= sum(c < "\u0100" for c in little) else little
    if prefix == b"ASCII\0\0\0":
        return body.decode("latin-1")
    try:
        return body.decode("utf-8") if len(value) > 8 else value.decode("utf-8")
    except UnicodeDecodeError:
        return body.decode("latin-1")


def _read_texts(path: Path) -> tuple[dict[str, str], str | None]:
    """PNG text chunks and the EXIF UserComment (JPEG, WebP, PNG) of an image file."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    if path.exists() and not path.is_file():  # a folder, FIFO or device: never opened (a FIFO would block)
        raise MetadataError(f"{path}: not an image file (a folder or a device)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            texts = {str(k): v for k, v in getattr(img, "text", {}).items() if isinstance(v, str)}
            if not texts:
                texts = {str(k): v for k, v in img.info.items() if isinstance(v, str)}
            comment = None
            try:
                exif = img.getexif()
                raw = exif.get_ifd(EXIF_IFD).get(EXIF_USER_COMMENT)
                if raw:
                    comment = _decode_user_comment(raw).strip("\0").strip() or None
            except Exception:  # noqa: BLE001 - a broken EXIF block just means "no comment"
                comment = None
    except FileNotFoundError:
        raise MetadataError(f"{path}: no such file") from None
    except UnidentifiedImageError:
        raise MetadataError(f"{path}: not an image file Darkroom can read (PNG, JPEG or WebP)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise MetadataError(f"{path}: declares too many pixels to open safely (a decompression bomb?)") from None
    except OSError as exc:
        raise MetadataError(f"{path}: cannot read the image ({exc})") from None
    return texts, comment


def _darkroom_request(data: Mapping[str, Any]) -> GenerationRequest:
    """The request in a ``darkroom`` chunk's JSON (its ``family`` and other non-request keys dropped)."""
    return GenerationRequest.from_dict({k: v for k, v in data.items() if k not in DARKROOM_EXTRA_KEYS})


def read_family(path: Path | str) -> str | None:
    """The model family an image's ``darkroom`` chunk records (``"sdxl"``), None when it records none."""
    texts, _comment = _read_texts(Path(path))
    try:
        family = json.loads(texts.get(DARKROOM_KEY, "")).get("family")
    except (ValueError, AttributeError):
        return None
    return family if isinstance(family, str) else None


def read_request(path: Path | str, *, model_fallback: str | None = None) -> GenerationRequest:
    """The generation request stored in an image.

    Prefers our ``darkroom`` JSON chunk; otherwise an A1111-style ``parameters`` text (A1111, Forge, Fooocus,
    ComfyUI nodes that write it), otherwise an EXIF UserComment infotext (A1111's JPEG/WebP).
    """
    path = Path(path)
    texts, comment = _read_texts(path)
    if DARKROOM_KEY in texts:
        try:
            data = json.loads(texts[DARKROOM_KEY])
        except json.JSONDecodeError:
            data = None
        if isinstance(data, Mapping):
            try:
                request = _darkroom_request(data)
                # the hash this image's own text records: the chunk's extra may carry a source image's
                return with_made_with(request, parse_infotext(texts.get(PARAMETERS_KEY, "")).get("Model hash"))
            except DarkroomError as err:
                # e.g. a field from a newer Darkroom: the A1111 text below still describes the image
                if not texts.get(PARAMETERS_KEY, "").strip():
                    raise MetadataError(f"{path}: the stored request is not usable here ({err})") from None
    for infotext in (texts.get(PARAMETERS_KEY), comment):
        if infotext and infotext.strip():
            return infotext_to_request(infotext, model_fallback=model_fallback)
    if "prompt" in texts or "workflow" in texts:
        raise MetadataError(
            f"{path}: has only a ComfyUI workflow and no A1111 'parameters' text, so there are no generation "
            "parameters Darkroom can read"
        )
    raise MetadataError(f"{path}: has no generation parameters (no 'darkroom' or 'parameters' metadata)")
