"""The one request type.

A ``GenerationRequest`` is built by the TUI or the batch runner, stored by the queue, run by the worker and
recorded in the image metadata, unchanged. Construction validates every field, so a bad value is reported
(field, value, what is valid) before anything loads.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import random
import re
import stat
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.detailer_args import Detailer, detailers_value
from core.errors import RequestError
from core.lora.tags import LoraRef, TagError, prompt_loras, ref_from_value
from core.sampling import SAMPLER_LABELS, SAMPLERS, SCHEDULE_LABELS, SCHEDULES

MAX_SEED = 2**32 - 1
UPSCALERS = ("latent", "image")
# What the model predicts: "auto" takes the checkpoint's (detection: marker keys, SD2.x's bias guess); "eps" and
# "v" override it for DDPM-trained families (SD1.x, SD2.x, SDXL), e.g. a v-prediction fine-tune detection misses.
PREDICTIONS = ("auto", "eps", "v")
IMG2IMG_DENOISE = 0.75  # img2img strength when a request gives none (A1111's and InvokeAI's default)
# The largest img2img source accepted: 8192 x 8192 = 67 megapixels (twice the largest request side, below PIL's
# own 89 MP bomb warning). Decoding one costs at most 256 MB as RGBA; anything bigger is refused at queue time,
# before it costs gigabytes. Accepted images are scaled to the request's size when the job loads them.
MAX_INIT_IMAGE_PIXELS = 8192 * 8192
REFINER_SWITCH = 0.8  # A1111's "Switch at" default
# Inpainting (A1111's img2img inpaint tab; core/inpaint.py does the work): what fills the masked area before
# sampling, and whether the whole picture or a crop around the mask is worked on.
MASKED_CONTENT = ("original", "fill", "latent_noise", "latent_nothing")
INPAINT_AREAS = ("whole", "only_masked")
MASK_BLUR = 4  # A1111's default (px)
ONLY_MASKED_PADDING = 32  # A1111's "Only masked padding, pixels" default
MAX_OUTPAINT = 2048  # pixels added on one side at most


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RequestError(name, value, f"an integer from {low} to {high}")


def _check_float(name: str, value: Any, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise RequestError(name, value, f"a number from {low} to {high}")


# Display labels (A1111's "Euler a", "DPM++ 2M", "Karras") that people type for an id; used for suggestions only.
_LABELS: dict[str, str] = {**SAMPLER_LABELS, **SCHEDULE_LABELS}

# Field names other tools use (A1111 API, ComfyUI nodes) -> ours; used for suggestions only.
_FIELD_ALIASES = {
    "cfg_scale": "cfg",
    "guidance_scale": "cfg",
    "sampler_name": "sampler",
    "scheduler": "schedule",
    "denoising_strength": "denoise",
    "n_iter": "batch_count",
    "negative": "negative_prompt",
    "checkpoint": "model",
    "ckpt": "model",
    "image": "init_image",
    # A1111's img2img API names for the inpainting fields
    "mask_image": "mask",
    "inpainting_fill": "masked_content",
    "inpaint_full_res": "inpaint_area",
    "inpaint_full_res_padding": "only_masked_padding",
    "inpainting_mask_invert": "invert_mask",
}


def _norm(text: str) -> str:
    return " ".join(text.lower().replace("_", " ").replace("-", " ").split())


def suggest(value: Any, choices: tuple[str, ...] | list[str], aliases: Mapping[str, str] | None = None) -> str | None:
    """The choice a mistyped ``value`` most likely meant, or None."""
    if not isinstance(value, str):
        return None
    key = _norm(value)
    for alias, target in (aliases or {}).items():
        if _norm(alias) == key and target in choices:
            return target
    for choice in choices:
        if key in (_norm(choice), _norm(_LABELS.get(choice, choice))):
            return choice
    close = difflib.get_close_matches(key, [_norm(c) for c in choices], n=1, cutoff=0.6)
    return next((c for c in choices if _norm(c) == close[0]), None) if close else None


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        guess = suggest(value, choices)
        hint = f" (did you mean {guess!r}?)" if guess else ""
        raise RequestError(name, value, "one of " + ", ".join(choices) + hint)


def _check_sampler(name: str, value: Any) -> None:
    """A sampler id; A1111's older labels that name the schedule too ("DPM++ 2M Karras") are answered with
    the two fields, where the closest id alone would be another sampler ("dpm_2_ancestral")."""
    if value not in SAMPLERS and isinstance(value, str):
        # the infotext reader's table of labels; imported here, as core.metadata imports this module
        from core.metadata import split_sampler

        sampler, schedule = split_sampler(value)
        if sampler is not None and schedule is not None:
            raise RequestError(name, value, f"one of {', '.join(SAMPLERS)} (did you mean sampler = {sampler!r} "
                                            f"with schedule = {schedule!r}?)")
    _check_choice(name, value, SAMPLERS)


def _check_text(name: str, value: Any, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str):
        raise RequestError(name, value, "a string" + (" or nothing" if optional else ""))


_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_prompt(name: str, value: Any) -> None:
    """A prompt is text the tokenizer, the database and the PNG can all hold: no lone UTF-16 surrogate (which a
    JSON ``"\\ud83d"`` escape without its second half decodes to; every encoder rejects it)."""
    _check_text(name, value)
    found = _SURROGATE.search(value)
    if found:
        raise RequestError(
            name, value, f"text without lone surrogates; character {found.start() + 1} is {found.group()!r}, "
            "half of a UTF-16 surrogate pair (an emoji or other character cut in two, e.g. a JSON \\ud83d "
            "escape without the \\ude00 after it)"
        )


def _check_model(value: Any) -> None:
    _check_text("model", value)
    if not value.strip():
        raise RequestError("model", value, "the name or path of a checkpoint file")


MAX_TEXT_ENCODERS = 4


def _check_text_encoders(value: Any) -> None:
    shape = "a list of text encoder file names or paths, e.g. ['clip_l', 't5xxl_fp16']"
    if isinstance(value, str):
        raise RequestError("text_encoders", value, f"{shape} (a list, even for one: [{value!r}])")
    if not isinstance(value, (list, tuple)):
        raise RequestError("text_encoders", value, shape)
    if len(value) > MAX_TEXT_ENCODERS:
        raise RequestError("text_encoders", list(value), f"at most {MAX_TEXT_ENCODERS} text encoders")
    seen: set[str] = set()
    for index, name in enumerate(value):
        if not isinstance(name, str) or not name.strip():
            raise RequestError(f"text_encoders[{index}]", name, "the name or path of a text encoder file")
        if name in seen:
            raise RequestError(f"text_encoders[{index}]", name, "a text encoder not already in the list")
        seen.add(name)


def _check_size(name: str, value: Any) -> None:
    _check_int(name, value, 64, 4096)
    if value % 8:
        raise RequestError(name, value, "a multiple of 8 from 64 to 4096")


class _Problems:
    """Runs checks and keeps every RequestError, so one report names every bad field."""

    def __init__(self) -> None:
        self.errors: list[RequestError] = []

    def check(self, check: Callable[..., None], *args: Any) -> None:
        try:
            check(*args)
        except RequestError as error:
            self.errors.extend(error.errors)

    def raise_any(self) -> None:
        if self.errors:
            raise RequestError.combine(self.errors)


def _check_upscaler(name: str, value: Any, builtin: tuple[str, ...] = UPSCALERS) -> None:
    """``builtin`` names, or the name of an upscaler model file (found in the models folders when the job is
    checked); a near miss of a built-in name ("Latent", "laten") is taken as a typo of it."""
    model = "the name of an upscaler model (models/upscale_models, models/ESRGAN)"
    valid = f"{', '.join(builtin)} or {model}" if builtin else model
    if not isinstance(value, str) or not value.strip():
        raise RequestError(name, value, valid)
    if value in builtin:
        return
    guess = suggest(value, builtin)
    if guess is None and builtin:
        # A1111/Forge's labels ("Latent (nearest-exact)", "Lanczos"), mapped as the infotext reader maps them;
        # imported here, as core.metadata imports this module
        from core.metadata import hires_upscaler

        guess = hires_upscaler(value) if hires_upscaler(value) in builtin else None
    if guess is not None or value in UPSCALERS:
        hint = f" (did you mean {guess!r}?)" if guess else ""
        raise RequestError(name, value, valid + hint)


@dataclass(frozen=True)
class Upscale:
    """A standalone upscale job (A1111's Extras tab): ``image`` upscaled by an upscaler model, nothing sampled.
    The request's other fields are the source image's parameters, carried into the saved PNG unchanged."""

    upscaler: str
    image: str = ""  # the image to upscale (an absolute path once a front end resolved it)
    scale: float = 0.0  # 0: the model's own factor; else the source's size times this (Lanczos after the model)

    def __post_init__(self) -> None:
        problems = _Problems()
        problems.check(_check_upscaler, "upscale.upscaler", self.upscaler, ())
        if not isinstance(self.image, str) or not self.image.strip():
            problems.errors.append(RequestError("upscale.image", self.image, "the path of the image to upscale"))
        if self.scale != 0:
            problems.check(_check_float, "upscale.scale", self.scale, 1.0, 8.0)
        problems.raise_any()


def _upscale_from(value: Any) -> Upscale:
    """``{upscaler = "4x-UltraSharp", image = "x.png", scale = 2}`` -> ``Upscale``."""
    if isinstance(value, Upscale):
        return value
    if not isinstance(value, Mapping):
        raise RequestError("upscale", value, "a table with upscaler, image and optionally scale")
    known = {f.name for f in dataclasses.fields(Upscale)}
    unknown = sorted(set(value) - known, key=str)
    if unknown:
        raise RequestError(f"upscale.{unknown[0]}", value[unknown[0]],
                           "not an upscale field; known: upscaler, image, scale")
    if "upscaler" not in value:
        raise RequestError("upscale.upscaler", None, "the name of an upscaler model (required)")
    scale = value.get("scale", 0.0)
    scale = float(scale) if isinstance(scale, int) and not isinstance(scale, bool) else scale
    return Upscale(value["upscaler"], value.get("image", ""), scale)


@dataclass(frozen=True)
class HiresFix:
    """Second pass at a larger size: upscale the first pass, then re-sample at ``denoise``."""

    scale: float = 2.0
    # "latent": upscale latents; "image": decode, resize (Lanczos), re-encode; any other name: an upscaler model
    # (models/upscale_models, ESRGAN, RealESRGAN: core/upscale.py) upscales the decoded image, then Lanczos to size
    upscaler: str = "latent"
    steps: int = 0  # 0 = as many as the first pass
    denoise: float = 0.5

    def __post_init__(self) -> None:
        problems = _Problems()
        problems.check(_check_float, "hires.scale", self.scale, 1.0, 4.0)
        problems.check(_check_upscaler, "hires.upscaler", self.upscaler)
        problems.check(_check_int, "hires.steps", self.steps, 0, 150)
        problems.check(_check_float, "hires.denoise", self.denoise, 0.0, 1.0)
        problems.raise_any()


@dataclass(frozen=True)
class Outpaint:
    """Pixels added on each side of the init image (after it is scaled to the request's size); the new area is
    masked for inpainting. The pipeline adds what rounds the new size to the family's pixel multiple."""

    left: int = 0
    right: int = 0
    top: int = 0
    bottom: int = 0

    def __post_init__(self) -> None:
        problems = _Problems()
        for side in ("left", "right", "top", "bottom"):
            problems.check(_check_int, f"outpaint.{side}", getattr(self, side), 0, MAX_OUTPAINT)
        problems.raise_any()

    @property
    def any(self) -> bool:
        return bool(self.left or self.right or self.top or self.bottom)


def _outpaint_value(value: Any) -> Outpaint | None:
    """``outpaint`` as given (a table of sides, an Outpaint, None) -> an Outpaint, or a RequestError."""
    if value is None or isinstance(value, Outpaint):
        return value
    shape = "a table of pixels per side, e.g. {left = 128, right = 0, top = 0, bottom = 64}"
    if not isinstance(value, Mapping):
        raise RequestError("outpaint", value, shape)
    sides = [f.name for f in dataclasses.fields(Outpaint)]
    # every bad key and side at once: an unknown key ("up") does not hide a bad value on a known side
    errors = []
    for key in sorted(set(value) - set(sides), key=str):
        guess = suggest(key, sides, _SIDE_ALIASES)
        hint = f"did you mean {guess!r}? " if guess else ""
        errors.append(RequestError(f"outpaint.{key}", value[key], f"not a side; {hint}{shape}"))
    try:
        outpaint = Outpaint(**{k: v for k, v in value.items() if k in sides})
    except RequestError as error:
        errors.extend(error.errors)
    if errors:
        raise RequestError.combine(errors)
    return outpaint


_SIDE_ALIASES = {"up": "top", "down": "bottom"}  # how people name the sides they expand


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise RequestError(name, value, "true or false")


@dataclass(frozen=True)
class GenerationRequest:
    """Everything one generation job needs. ``seed = -1`` means random; the queue records the resolved seed."""

    model: str
    prompt: str = ""
    negative_prompt: str = ""
    vae: str | None = None
    # Text encoder files beside a diffusion model kept as separate files (models/text_encoders, models/clip);
    # empty: picked from the folders by type (core.models.split). A list is made a tuple on construction.
    text_encoders: tuple[str, ...] = ()
    sampler: str = "euler"
    schedule: str = "normal"
    steps: int = 20
    cfg: float = 7.0
    seed: int = -1
    width: int = 512
    height: int = 512
    batch_size: int = 1
    batch_count: int = 1
    clip_skip: int = 1
    prediction: str = "auto"
    init_image: str | None = None  # path of the img2img source image
    # img2img strength. None (not given) becomes IMG2IMG_DENOISE with an init image and 1.0 without one, on
    # construction: a built request always holds the number it runs with (stored, shown and recorded in the
    # PNG as such), and an explicit 1.0 for img2img stays 1.0.
    denoise: float | None = None
    hires: HiresFix | None = None
    # LoRAs besides the prompt's <lora:name:weight> tags (batch files: [{name, weight, te_weight}]); a list of
    # tables is turned into LoraRefs on construction.
    loras: tuple[LoraRef, ...] = ()
    # SDXL refiner (A1111's): a second checkpoint that takes over the same latents and sigmas once the share
    # ``refiner_switch`` of the denoising (by timestep, as A1111 and diffusers' denoising_end) is done.
    refiner: str | None = None
    refiner_switch: float = REFINER_SWITCH
    # Flux.1 dev's distilled guidance (Forge's "Distilled CFG Scale"), fed to the model's guidance embedding;
    # None: the family's default (3.5). Schnell has no guidance embedding and ignores it.
    guidance: float | None = None
    # Feature caches (core/accel/feature_cache.py, sampling.md sections 6-7). DeepCache: a full UNet pass every
    # ``deepcache_interval`` network calls (1 = off), the calls between run only the shallow branch
    # ``deepcache_branch`` (0 = cheapest); first-block cache: skip the rest of the network while the first
    # block's residual changes relatively less than ``fbcache_threshold`` (0 = off).
    deepcache_interval: int = 1
    deepcache_branch: int = 0
    fbcache_threshold: float = 0.0
    # Inpainting (with init_image; core/inpaint.py): ``mask`` is an image path, white = repaint (an alpha-only
    # mask: opaque = repaint), blurred by ``mask_blur`` px; ``inpaint_area`` "only_masked" works on the mask's
    # bounding box plus ``only_masked_padding`` px at the job's size and pastes it back. ``outpaint`` pads the
    # image (a table of pixels per side) and masks the new area.
    mask: str | None = None
    mask_blur: int = MASK_BLUR
    inpaint_area: str = "whole"
    only_masked_padding: int = ONLY_MASKED_PADDING
    masked_content: str = "original"
    invert_mask: bool = False
    outpaint: Outpaint | None = None
    # Face/detail passes (ADetailer's tabs, core/detailer.py): up to two tables of core.detailer_args.Detailer
    # fields; a list of tables becomes a tuple of Detailers on construction.
    detailer: tuple[Detailer, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)  # forward-compatible knobs (e.g. accel options)
    # A standalone upscale job: ``upscale.image`` upscaled by a model, nothing sampled (``Upscale``; a table is made
    # one on construction). ``model`` may then be empty: the source had no parameters to carry.
    upscale: Upscale | None = None

    def __post_init__(self) -> None:
        if self.denoise is None:
            object.__setattr__(self, "denoise", IMG2IMG_DENOISE if self.init_image is not None else 1.0)
        problems = _Problems()  # every bad field is reported, not only the first
        if self.upscale is not None:
            problems.check(self._check_upscale)
        if not (self.upscale is not None and self.model == ""):
            problems.check(_check_model, self.model)
        problems.check(_check_prompt, "prompt", self.prompt)
        problems.check(_check_prompt, "negative_prompt", self.negative_prompt)
        problems.check(_check_text, "vae", self.vae, True)
        problems.check(_check_text_encoders, self.text_encoders)
        if isinstance(self.text_encoders, list):
            object.__setattr__(self, "text_encoders", tuple(self.text_encoders))
        problems.check(_check_sampler, "sampler", self.sampler)
        problems.check(_check_choice, "schedule", self.schedule, SCHEDULES)
        problems.check(_check_int, "steps", self.steps, 1, 150)
        problems.check(_check_float, "cfg", self.cfg, 0.0, 30.0)
        problems.check(_check_int, "seed", self.seed, -1, MAX_SEED)
        problems.check(_check_size, "width", self.width)
        problems.check(_check_size, "height", self.height)
        problems.check(_check_int, "batch_size", self.batch_size, 1, 16)
        problems.check(_check_int, "batch_count", self.batch_count, 1, 1000)
        problems.check(_check_int, "clip_skip", self.clip_skip, 1, 12)
        problems.check(_check_choice, "prediction", self.prediction, PREDICTIONS)
        problems.check(_check_text, "init_image", self.init_image, True)
        problems.check(_check_float, "denoise", self.denoise, 0.0, 1.0)
        problems.check(_check_text, "refiner", self.refiner, True)
        problems.check(_check_float, "refiner_switch", self.refiner_switch, 0.01, 1.0)
        if self.guidance is not None:
            problems.check(_check_float, "guidance", self.guidance, 0.0, 30.0)
        problems.check(self._check_caches)
        problems.check(self._check_inpaint)
        detailers, detailer_errors = detailers_value(self.detailer)
        object.__setattr__(self, "detailer", detailers)
        problems.errors.extend(detailer_errors)
        if self.hires is not None and not isinstance(self.hires, HiresFix):
            problems.errors.append(
                RequestError("hires", self.hires, "a HiresFix table (scale, upscaler, steps, denoise)")
            )
        if not isinstance(self.extra, Mapping):
            problems.errors.append(RequestError("extra", self.extra, "a table of extra options"))
        problems.check(self._check_loras)
        problems.raise_any()

    def _check_upscale(self) -> None:
        object.__setattr__(self, "upscale", _upscale_from(self.upscale))

    @property
    def is_upscale(self) -> bool:
        """A standalone upscale job (no sampling)."""
        return self.upscale is not None

    def _check_loras(self) -> None:
        entries = self.loras
        if not isinstance(entries, (list, tuple)):
            raise RequestError("loras", entries, "a list of tables with name, weight and optionally te_weight")
        refs = []
        for index, entry in enumerate(entries):
            try:
                refs.append(ref_from_value(index, entry))
            except ValueError as exc:
                raise RequestError(f"loras[{index}]", entry, str(exc)) from None
        object.__setattr__(self, "loras", tuple(refs))
        for name in ("prompt", "negative_prompt"):
            try:
                prompt_loras(getattr(self, name))
            except TagError as exc:
                raise RequestError(name, getattr(self, name), f"LoRA tags of the form <lora:name:weight>; {exc}") from None
            except TypeError:  # not a string: reported by the prompt check
                pass

    def _check_caches(self) -> None:
        from core.accel.cache_options import MAX_DEEPCACHE_BRANCH, MAX_DEEPCACHE_INTERVAL

        problems = _Problems()
        problems.check(
            _check_int, "deepcache_interval", self.deepcache_interval, 1, MAX_DEEPCACHE_INTERVAL
        )
        problems.check(_check_int, "deepcache_branch", self.deepcache_branch, 0, MAX_DEEPCACHE_BRANCH)
        problems.check(_check_float, "fbcache_threshold", self.fbcache_threshold, 0.0, 1.0)
        if not problems.errors and self.deepcache_interval > 1 and self.fbcache_threshold > 0:
            problems.errors.append(RequestError(
                "fbcache_threshold", self.fbcache_threshold,
                f"0 while DeepCache is on (deepcache_interval = {self.deepcache_interval}); the two caches skip "
                "the same blocks, so choose one (deepcache_interval = 1 turns DeepCache off)",
            ))
        problems.raise_any()

    def _check_inpaint(self) -> None:
        problems = _Problems()
        problems.check(_check_text, "mask", self.mask, True)
        problems.check(_check_int, "mask_blur", self.mask_blur, 0, 64)
        problems.check(_check_choice, "inpaint_area", self.inpaint_area, INPAINT_AREAS)
        problems.check(_check_int, "only_masked_padding", self.only_masked_padding, 0, 256)
        problems.check(_check_choice, "masked_content", self.masked_content, MASKED_CONTENT)
        problems.check(_check_bool, "invert_mask", self.invert_mask)
        try:
            object.__setattr__(self, "outpaint", _outpaint_value(self.outpaint))
        except RequestError as error:
            problems.errors.extend(error.errors)
            object.__setattr__(self, "outpaint", None)
        if self.outpaint is not None and not self.outpaint.any:
            object.__setattr__(self, "outpaint", None)  # nothing to add: no outpainting
        for name in ("mask", "outpaint"):
            value = getattr(self, name)
            if value is not None and self.init_image is None and not problems.errors:
                problems.errors.append(RequestError(
                    name, dataclasses.asdict(value) if name == "outpaint" else value,
                    f"used with an init_image (the image to {'inpaint' if name == 'mask' else 'extend'}); "
                    "set init_image too",
                ))
        if self.outpaint is not None and not problems.errors:
            o = self.outpaint
            for side, size, added in (("width", self.width, o.left + o.right), ("height", self.height, o.top + o.bottom)):
                if isinstance(size, int) and size + added > 4096:
                    problems.errors.append(RequestError(
                        "outpaint", dataclasses.asdict(o),
                        f"at most 4096 pixels of {side} in all; {size} + {added} is {size + added}",
                    ))
        if self.hires is not None and (self.mask is not None or self.outpaint is not None) and not problems.errors:
            problems.errors.append(RequestError(
                "hires", self.hires, "no hires fix when inpainting or outpainting (A1111 has none either; "
                "inpaint_area = \"only_masked\" works on the masked region at the job's full size)",
            ))
        problems.raise_any()

    @property
    def is_inpaint(self) -> bool:
        """A mask or outpainting: the job repaints part of its init image."""
        return self.init_image is not None and (self.mask is not None or self.outpaint is not None)

    def lora_refs(self) -> tuple[LoraRef, ...]:
        """Every LoRA this request uses: the ``loras`` field, then the prompts' tags (in order)."""
        return (*self.loras, *prompt_loras(self.prompt, self.negative_prompt))

    # ---- conversions -------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict; ``from_dict(to_dict())`` round-trips."""
        data = dataclasses.asdict(self)
        data["extra"] = dict(self.extra)
        data["loras"] = [{k: v for k, v in entry.items() if v is not None} for entry in data["loras"]]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], other_keys: tuple[str, ...] = ()) -> GenerationRequest:
        """Build from a dict (TOML job, JSON line, stored row). Unknown keys are errors, naming the key.
        ``other_keys``: keys the caller takes itself (a jobs file's ``preset``), offered for a misspelling too.

        Every problem is reported at once (a ``RequestErrors`` when there are several): unknown keys first,
        then the invalid fields in field order."""
        if not isinstance(data, Mapping):
            raise RequestError("request", data, "a table of request fields")
        unknown: list[RequestError] = []  # keys that are no field: reported first, a typo explains the rest
        errors: list[RequestError] = []
        known = {f.name for f in dataclasses.fields(cls)}
        listed = ", ".join(sorted(known | set(other_keys)))
        for key in sorted(set(data) - known - set(other_keys), key=str):
            guess = suggest(key, sorted(known | set(other_keys)), _FIELD_ALIASES)
            hint = f"did you mean {guess!r}? " if guess else ""
            unknown.append(RequestError(str(key), data[key], f"not a request field; {hint}known fields: {listed}"))
        values = {k: v for k, v in data.items() if k in known}
        if "model" not in values and values.get("upscale") is not None:
            values["model"] = ""  # an upscale job of an image without parameters: no checkpoint to name
        if "model" not in values:
            errors.append(RequestError("model", None, "the name or path of a checkpoint file (required)"))
            values["model"] = "(none)"  # a stand-in, so the other fields are still checked
        hires = values.get("hires")
        if isinstance(hires, Mapping):
            hires_known = {f.name for f in dataclasses.fields(HiresFix)}
            for key in sorted(set(hires) - hires_known, key=str):
                guess = suggest(key, sorted(hires_known))
                hint = f" (did you mean {guess!r}?)" if guess else ""
                unknown.append(RequestError(
                    f"hires.{key}", hires[key], "not a hires field; known: " + ", ".join(sorted(hires_known)) + hint
                ))
            try:
                values["hires"] = HiresFix(**{k: v for k, v in hires.items() if k in hires_known})
            except RequestError as error:
                errors.extend(error.errors)
                values["hires"] = None
        elif hires is not None and not isinstance(hires, HiresFix):
            errors.append(RequestError("hires", hires, "a table with scale, upscaler, steps, denoise"))
            values["hires"] = None
        for key in ("cfg", "denoise", "refiner_switch", "guidance", "fbcache_threshold"):
            if isinstance(values.get(key), int) and not isinstance(values[key], bool):
                values[key] = float(values[key])
        try:
            request = cls(**values)
        except RequestError as error:
            errors.extend(error.errors)
        if unknown or errors:
            order = {name: i for i, name in enumerate(f.name for f in dataclasses.fields(cls))}
            errors.sort(key=lambda e: order.get(e.field.split(".")[0].split("[")[0], len(order)))
            raise RequestError.combine(unknown + errors)
        return request

    def replace(self, **changes: Any) -> GenerationRequest:
        if changes.get("init_image") is not None and "denoise" not in changes and not self.is_img2img and (
            self.denoise == 1.0
        ):
            changes["denoise"] = None  # txt2img's 1.0 says nothing about img2img: take img2img's default
        return dataclasses.replace(self, **changes)

    def with_resolved_seed(self, rng: random.Random | None = None) -> GenerationRequest:
        """Return a copy whose seed is concrete (a random one replaces -1)."""
        if self.seed != -1:
            return self
        return self.replace(seed=(rng or random.SystemRandom()).randint(0, MAX_SEED))

    @property
    def is_img2img(self) -> bool:
        return self.init_image is not None

    def image_seeds(self) -> list[int]:
        """Seed of every image this request makes: image i of the whole job uses seed + i."""
        if self.seed < 0:
            raise ValueError("resolve the seed first (with_resolved_seed)")
        total = self.batch_size * self.batch_count
        return [(self.seed + i) % (MAX_SEED + 1) for i in range(total)]


_FILE_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)
_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.0f} megapixels" if pixels >= 10**7 else f"{pixels / 1e6:.1f} megapixels"


def resolve_init_image(value: str, base_dir: Path | None = None, field: str = "init_image") -> str:
    """An img2img source as given by a user (``~`` and, when ``base_dir`` is given, paths relative to it) ->
    its absolute path, checked now, before the job is queued: it must be a regular file (a folder, FIFO or
    device is named as such and never opened), an image of at most ``MAX_INIT_IMAGE_PIXELS`` (a decompression
    bomb is refused from its declared size, before decoding), and decode completely (a truncated file fails
    here, not when the job runs). Raises RequestError naming ``field`` (the request field or job key given),
    the value, the path looked at and the problem."""
    path = Path(value).expanduser()
    if base_dir is not None and not path.is_absolute():
        path = base_dir / path
    shown = repr(str(path))
    try:
        mode = os.stat(path).st_mode  # follows links; never opens, so a FIFO cannot block
    except (FileNotFoundError, NotADirectoryError):
        raise RequestError(field, value, f"an image file; {shown} does not exist") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte or a lone surrogate in the path
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise RequestError(field, value, f"an image file; {shown} cannot be read ({why})") from None
    for test, kind in _FILE_KINDS:
        if test(mode):
            raise RequestError(field, value, f"an image file; {shown} is {kind}, not a file")
    from PIL import Image, UnidentifiedImageError

    limit = f"an image of at most {_megapixels(MAX_INIT_IMAGE_PIXELS)} (8192 x 8192)"
    try:
        with warnings.catch_warnings():
            # PIL warns above its own limit (and raises above twice it): both are a refusal here
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if width * height > MAX_INIT_IMAGE_PIXELS:
                    raise RequestError(
                        field, value, f"{limit}; {shown} is {width} x {height} "
                        f"({_megapixels(width * height)}): scale it down first"
                    )
                # A truncated or damaged file fails now, cheaply enough for the TUI's queue key: a PNG's every
                # chunk and CRC is read to the end without inflating the pixels (a full decode of 8192 x 8192
                # took 2.9 s); anything else is decoded, a JPEG at 1/8 scale.
                if img.format == "PNG":
                    img.verify()
                else:
                    img.draft("RGB", (64, 64))
                    img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        found = _BOMB_PIXELS.search(str(exc))
        declared = f" declares {_megapixels(int(found.group(1)))}" if found else " declares too many pixels"
        raise RequestError(
            field, value, f"{limit}; {shown}{declared}, too many to decode safely (a decompression bomb?)"
        ) from None
    except UnidentifiedImageError:
        raise RequestError(field, value, f"an image file (PNG, JPEG, WebP); {shown} is not one") from None
    except RequestError:
        raise
    except PermissionError as exc:
        raise RequestError(field, value, f"an image file; {shown} cannot be read ({exc.strerror})") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure on a user's file: truncated, bad data
        raise RequestError(
            field, value, f"an image file that decodes completely; {shown} is truncated or damaged ({exc})"
        ) from None
    return str(path.resolve())


def mask_size_note(path: str, mask_size: tuple[int, int], init_size: tuple[int, int]) -> str | None:
    """The warning for a mask whose size is not its init image's (it is scaled to it), or None."""
    if tuple(mask_size) == tuple(init_size):
        return None
    return (f"mask {path} is {mask_size[0]}x{mask_size[1]} but the init image is {init_size[0]}x{init_size[1]}: "
            "the mask is scaled to the image")


def mask_warnings(request: GenerationRequest) -> list[str]:
    """What to say before an inpainting job runs (a mask of another size than its init image), from the files'
    headers."""
    if request.mask is None or request.init_image is None:
        return []
    from PIL import Image

    from core.image_files import upright_size

    try:
        with Image.open(request.mask) as mask, Image.open(request.init_image) as init:
            note = mask_size_note(request.mask, upright_size(mask), upright_size(init))
    except (OSError, ValueError):  # an unreadable file fails the job with its own message
        return []
    return [note] if note else []


def prompt_syntax_warnings(*prompts: str) -> list[str]:
    """One sentence for each prompt whose A1111 prompt editing or alternation (``[from:to:when]``, ``[a|b]``)
    cannot be read, naming the groups (``[]`` if there is none): the grammar fails on the whole prompt (an
    unclosed bracket, a ``|`` outside ``[...]``), so A1111 and Darkroom use it as plain (weighted) text."""
    from core.models.prompt_schedule import unreadable_groups

    warnings = []
    for prompt in prompts:
        groups = unreadable_groups(prompt)
        if groups:
            warnings.append(f"{', '.join(groups)} in the prompt: not read as prompt editing or alternation (check "
                            "for an unclosed bracket or a '|' outside [a|b]), so it is used as text")
    return warnings


# ---- family-specific fields ---------------------------------------------------------------------------------


def family_fields() -> dict[str, tuple[str, ...]]:
    """Every family-specific request field -> the families that take it (``ModelFamily.request_fields``)."""
    from core.models.families import FAMILIES

    out: dict[str, tuple[str, ...]] = {}
    for family in FAMILIES.values():
        for name in family.request_fields:
            out[name] = (*out.get(name, ()), family.name)
    return out


_DEFAULTS: dict[str, Any] = {
    f.name: f.default for f in dataclasses.fields(GenerationRequest) if f.default is not dataclasses.MISSING
}


def family_problems(fields: GenerationRequest | Mapping[str, Any], family: str) -> list[RequestError]:
    """The family-specific fields set in ``fields`` (a request, or a job's fields) that a model of ``family``
    does not take, each as a RequestError naming the field, the model's family and the fields it does take.

    A field is set when it differs from the request's default (``refiner = None`` is not set). A family name
    that is not a registered family (a LoRA file given as the model) gives no problems here: loading says why.
    """
    from core.models.families import FAMILIES

    spec = FAMILIES.get(family)
    if spec is None:
        return []
    values = fields.to_dict() if isinstance(fields, GenerationRequest) else dict(fields)
    problems: list[RequestError] = []
    for problem in (sampler_problem(values.get("sampler", "euler"), family),
                    schedule_problem(values.get("schedule", "normal"), family)):
        if problem is not None:
            problems.append(problem)
    for side in ("width", "height"):  # Flux: 8x VAE then 2x2 patches, so multiples of 16
        value = values.get(side)
        if isinstance(value, int) and not isinstance(value, bool) and value % spec.pixel_multiple:
            problems.append(RequestError(side, value, f"a multiple of {spec.pixel_multiple} for {spec.label} models"))
    for name, owners in family_fields().items():
        if name in spec.request_fields or name not in values:
            continue
        value = values[name]
        if name in _DEFAULTS and value == _DEFAULTS[name]:
            continue
        takers = ", ".join(FAMILIES[o].label for o in owners)
        own = ", ".join(spec.request_fields) or "none"
        problems.append(RequestError(
            name, value, f"only for {takers} models, and this model is {spec.label} "
            f"({spec.label}'s family-specific fields: {own})"
        ))
    return problems


def sampler_problem(sampler: str, family: str) -> RequestError | None:
    """A ``RequestError`` when ``family``'s sampling cannot run ``sampler`` (a flow model and a sampler that
    adds variance-exploding noise: ancestral, SDE, LCM), naming the samplers it takes; else None."""
    from core.models.families import FAMILIES

    spec = FAMILIES.get(family)
    allowed = getattr(getattr(spec, "sampling", None), "samplers", ())
    if spec is None or not allowed or sampler in allowed:
        return None
    return RequestError(
        "sampler", sampler, f"one of {', '.join(allowed)} for {spec.label} models (flow matching: the ancestral, "
        "SDE and LCM samplers add noise the way of DDPM models, which a flow model's sigmas do not follow)"
    )


def schedule_problem(schedule: str, family: str) -> RequestError | None:
    """A ``RequestError`` when ``schedule`` needs levels ``family`` has none of (Align Your Steps: a family
    module's ``ays_levels``; the flow models have none); else None. ``family_problems`` asks it before a job is
    queued, so a Flux job with ``ays`` is refused then, not when it runs."""
    from core.models.families import FAMILIES

    spec = FAMILIES.get(family)
    if schedule != "ays" or (spec is not None and spec.ays_levels is not None):
        return None
    have = [f.label for f in FAMILIES.values() if f.ays_levels is not None]
    return RequestError("schedule", "ays", f"Align Your Steps has levels for {', '.join(have)} models only")


# A1111 emphasis: an unescaped ( or [ (weighting, "(word:1.2)", "[word]") or the BREAK keyword.
_EMPHASIS = re.compile(r"(?<!\\)[(\[]|\bBREAK\b")


def family_warnings(request: GenerationRequest, family: str) -> list[str]:
    """What a model of ``family`` does differently from what the request's text asks (one sentence each; the job
    still runs): Flux reads A1111 weights and ignores them, as Forge does."""
    from core.models.families import FAMILIES

    spec = FAMILIES.get(family)
    if spec is None or spec.prompt_weights:
        return []
    from core.lora.tags import strip_tags

    if not any(_EMPHASIS.search(strip_tags(p)) for p in (request.prompt, request.negative_prompt)):
        return []
    return [f"{spec.label} models take plain text: the A1111 weights in the prompt ((word:1.2), [word], BREAK) "
            "are ignored, their words are kept"]


def with_family_defaults(request: GenerationRequest, family: str, given: Any = None) -> GenerationRequest:
    """``request`` with ``family``'s own defaults (``ModelFamily.request_defaults``, Flux: cfg 1) for the
    fields that ``given`` (the fields a job or form set; None: none known) does not name and the request leaves
    at the general default."""
    from core.models.families import FAMILIES

    spec = FAMILIES.get(family)
    if spec is None or not spec.request_defaults:
        return request
    given = set(given or ())
    changes = {
        name: value for name, value in spec.request_defaults.items()
        if name not in given and getattr(request, name) == _DEFAULTS.get(name)
    }
    return request.replace(**changes) if changes else request
