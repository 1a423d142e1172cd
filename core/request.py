"""The one request type.

A ``GenerationRequest`` is built by the TUI or the batch runner, stored by the queue, run by the worker and
recorded in the image metadata, unchanged. Construction validates every field, so a bad value is reported
(field, value, what is valid) before anything loads.
"""

from __future__ import annotations

import dataclasses
import difflib
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import RequestError
from core.sampling import SAMPLER_LABELS, SAMPLERS, SCHEDULE_LABELS, SCHEDULES

MAX_SEED = 2**32 - 1
UPSCALERS = ("latent", "image")


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


def _check_text(name: str, value: Any, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str):
        raise RequestError(name, value, "a string" + (" or nothing" if optional else ""))


@dataclass(frozen=True)
class HiresFix:
    """Second pass at a larger size: upscale the first pass, then re-sample at ``denoise``."""

    scale: float = 2.0
    upscaler: str = "latent"  # "latent": upscale latents; "image": decode, resize (Lanczos), re-encode
    steps: int = 0  # 0 = as many as the first pass
    denoise: float = 0.5

    def __post_init__(self) -> None:
        _check_float("hires.scale", self.scale, 1.0, 4.0)
        _check_choice("hires.upscaler", self.upscaler, UPSCALERS)
        _check_int("hires.steps", self.steps, 0, 150)
        _check_float("hires.denoise", self.denoise, 0.0, 1.0)


@dataclass(frozen=True)
class GenerationRequest:
    """Everything one generation job needs. ``seed = -1`` means random; the queue records the resolved seed."""

    model: str
    prompt: str = ""
    negative_prompt: str = ""
    vae: str | None = None
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
    init_image: str | None = None  # path of the img2img source image
    denoise: float = 1.0  # img2img strength; 1.0 for txt2img
    hires: HiresFix | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)  # forward-compatible knobs (e.g. accel options)

    def __post_init__(self) -> None:
        _check_text("model", self.model)
        if not self.model.strip():
            raise RequestError("model", self.model, "the name or path of a checkpoint file")
        _check_text("prompt", self.prompt)
        _check_text("negative_prompt", self.negative_prompt)
        _check_text("vae", self.vae, optional=True)
        _check_choice("sampler", self.sampler, SAMPLERS)
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_int("steps", self.steps, 1, 150)
        _check_float("cfg", self.cfg, 0.0, 30.0)
        _check_int("seed", self.seed, -1, MAX_SEED)
        for name in ("width", "height"):
            value = getattr(self, name)
            _check_int(name, value, 64, 4096)
            if value % 8:
                raise RequestError(name, value, "a multiple of 8 from 64 to 4096")
        _check_int("batch_size", self.batch_size, 1, 16)
        _check_int("batch_count", self.batch_count, 1, 1000)
        _check_int("clip_skip", self.clip_skip, 1, 12)
        _check_text("init_image", self.init_image, optional=True)
        _check_float("denoise", self.denoise, 0.0, 1.0)
        if self.hires is not None and not isinstance(self.hires, HiresFix):
            raise RequestError("hires", self.hires, "a HiresFix table (scale, upscaler, steps, denoise)")
        if not isinstance(self.extra, Mapping):
            raise RequestError("extra", self.extra, "a table of extra options")

    # ---- conversions -------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict; ``from_dict(to_dict())`` round-trips."""
        data = dataclasses.asdict(self)
        data["extra"] = dict(self.extra)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GenerationRequest:
        """Build from a dict (TOML job, JSON line, stored row). Unknown keys are errors, naming the key."""
        if not isinstance(data, Mapping):
            raise RequestError("request", data, "a table of request fields")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            guess = suggest(unknown[0], sorted(known), _FIELD_ALIASES)
            hint = f"did you mean {guess!r}? " if guess else ""
            raise RequestError(
                unknown[0], data[unknown[0]], f"not a request field; {hint}known fields: " + ", ".join(sorted(known))
            )
        if "model" not in data:
            raise RequestError("model", None, "the name or path of a checkpoint file (required)")
        values = dict(data)
        hires = values.get("hires")
        if isinstance(hires, Mapping):
            hires_known = {f.name for f in dataclasses.fields(HiresFix)}
            bad = sorted(set(hires) - hires_known)
            if bad:
                guess = suggest(bad[0], sorted(hires_known))
                hint = f" (did you mean {guess!r}?)" if guess else ""
                raise RequestError(
                    f"hires.{bad[0]}", hires[bad[0]], "not a hires field; known: " + ", ".join(sorted(hires_known)) + hint
                )
            values["hires"] = HiresFix(**hires)
        elif hires is not None and not isinstance(hires, HiresFix):
            raise RequestError("hires", hires, "a table with scale, upscaler, steps, denoise")
        if "cfg" in values and isinstance(values["cfg"], int) and not isinstance(values["cfg"], bool):
            values["cfg"] = float(values["cfg"])
        return cls(**values)

    def replace(self, **changes: Any) -> GenerationRequest:
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


def resolve_init_image(value: str, base_dir: Path | None = None) -> str:
    """An img2img source as given by a user (``~`` and, when ``base_dir`` is given, paths relative to it) ->
    its absolute path, checked now, before the job is queued: the file must exist and open as an image.
    Only the header is read. Raises RequestError naming the value and the path looked at."""
    path = Path(value).expanduser()
    if base_dir is not None and not path.is_absolute():
        path = base_dir / path
    if not path.is_file():
        raise RequestError("init_image", value, f"an image file; {str(path)!r} does not exist")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path):
            pass
    except (OSError, UnidentifiedImageError):
        raise RequestError("init_image", value, f"an image file (PNG, JPEG, WebP); {str(path)!r} is not one") from None
    return str(path.resolve())


_EXTRA_NETWORK = re.compile(r"<(?:lora|lyco):[^>]*>", re.IGNORECASE)  # A1111's LoRA prompt tags
# A1111 prompt editing [from:to:when] / [to:when] and alternation [a|b]: a square group (not escaped) whose
# text ends in ":number" or holds a "|".
_PROMPT_EDITING = re.compile(r"(?<!\\)\[[^\[\]]*(?::\s*[\d.]+\s*|\|[^\[\]]*)\]")


def prompt_syntax_warnings(*prompts: str) -> list[str]:
    """One sentence for each kind of A1111 prompt syntax Darkroom does not apply yet, naming what was found
    (``[]`` if there is none). The job still runs; these pieces are read as ordinary (weighted) text."""
    text = " ".join(prompts)
    warnings = []
    tags = sorted(set(_EXTRA_NETWORK.findall(text)))
    if tags:
        warnings.append(f"{', '.join(tags)} in the prompt: LoRA tags are not supported yet, so they are encoded "
                        "as plain prompt text")
    edits = sorted(set(_PROMPT_EDITING.findall(text)))
    if edits:
        warnings.append(f"{', '.join(edits)} in the prompt: prompt editing and alternation ([from:to:when], "
                        "[a|b]) are not supported yet, so they are read as down-weighted text")
    return warnings
