"""Fill the Generate form from what a PNG knows (A1111's PNG Info, ComfyUI's drag and drop).

The image's parameters are read by ``core.metadata.read_request`` (Darkroom, A1111, Forge and EXIF infotext);
this module only turns that request into form values and says, in words, what was filled and what was not:
a model or VAE that is not in the models folders keeps the form's own, A1111 prompt syntax Darkroom does not apply yet is named, a
sampler Darkroom does not have falls back to Euler.
"""

from __future__ import annotations

import os
import shlex
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.lora.tags import with_tags
from core.metadata import MADE_WITH, expected_model_hash, model_hash_warning
from core.models.hashes import cached_sha256
from core.request import GenerationRequest, prompt_syntax_warnings
from core.sampling import SAMPLER_LABELS, SCHEDULE_LABELS

# read_request's model for an infotext without a "Model:" entry (never a real checkpoint name)
NO_MODEL = "(no model named in the image)"
_MODEL_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf")


def path_from_text(text: str) -> str:
    """A path as typed, pasted or dropped on the terminal (which pastes a dropped file as its path: quoted
    ``'/a b.png'``, backslash-escaped ``/a\\ b.png``, or a ``file://`` URL, often with a trailing space).
    The text itself wins when it names a file; otherwise the first path in it, unquoted; ``~`` expanded."""
    raw = text.strip()
    if not raw or Path(raw).expanduser().is_file():
        return str(Path(raw).expanduser()) if raw else ""
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"" and Path(raw[1:-1]).expanduser().is_file():
        return str(Path(raw[1:-1]).expanduser())  # e.g. a quoted Windows path, whose \ are not escapes
    try:
        words = shlex.split(raw)
    except ValueError:  # an unbalanced quote: take the text without it
        words = [raw.strip("'\"")]
    first = words[0] if words else raw
    if first.lower().startswith("file://"):
        parsed = urllib.parse.urlparse(first)
        first = urllib.parse.unquote(parsed.path)
        if len(first) > 2 and first[0] == "/" and first[2] == ":":  # file:///C:/x.png
            first = first[1:]
    return str(Path(first).expanduser())


@dataclass
class FormFill:
    """Form values from an image, with what was filled and what was not (for the notifications)."""

    values: dict[str, Any]
    filled: list[str] = field(default_factory=list)
    not_used: list[str] = field(default_factory=list)
    # the local model file whose hash is not known yet, to compare with the image's off the UI thread
    unhashed: Path | None = None


def _label(name: str) -> str:
    """A model's file name without folder or extension, lower case: how A1111 names it in ``Model:``."""
    base = name.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    stem, ext = os.path.splitext(base)
    return (stem if ext.lower() in _MODEL_EXTENSIONS else base).lower()


def match_name(wanted: str, names: Sequence[str]) -> str | None:
    """The listed model ``wanted`` means: the same name, else the one listed file with its file name."""
    if wanted in names:
        return wanted
    same = [n for n in names if _label(n) == _label(wanted)]
    return same[0] if len(same) == 1 else None


def form_fill(request: GenerationRequest, *, models: Sequence[str], vaes: Sequence[str],
              current_model: str | None, current_vae: str | None, upscalers: Sequence[str] = (),
              model_files: Mapping[str, Path] | None = None) -> FormFill:
    """The Generate form's values for ``request`` read from an image (its seed is the image's own).

    ``model_files`` (model name -> file) lets the image's model hash be compared with the matched file's, when
    the hash cache knows it (``cached_sha256``: a stat and the small cache file, never the model); when it does
    not, ``FormFill.unhashed`` names the file to hash elsewhere."""
    values: dict[str, Any] = request.to_dict()
    # How many images to make is the form's business, not the picture's; unmapped infotext entries (Version,
    # Model hash, ...) describe the old image and are not sent with new jobs.
    for name in ("batch_size", "batch_count", "extra"):
        values.pop(name)
    upscale = values.pop("upscale", None)  # an upscaled image: the form makes its source, not the upscale
    extra = dict(request.extra)
    fill = FormFill(values)
    filled, not_used = fill.filled, fill.not_used
    filled.append("prompt" + (" and negative prompt" if request.negative_prompt else ""))
    values.pop("loras", None)  # the form has no list of LoRAs: a job's or preset's list goes in as tags
    if request.loras:
        values["prompt"] = with_tags(request.prompt, request.loras)
        filled.append("its LoRAs as tags in the prompt (" + ", ".join(ref.name for ref in request.loras) + ")")

    model = match_name(request.model, models)
    keep = f"kept {current_model}" if current_model else "choose one"
    if request.model == NO_MODEL:
        not_used.append(f"the image names no model ({keep})")
    elif model is None:
        not_used.append(f"the model {request.model} named in the image is not in your models folders ({keep})")
    if model is None:
        values.pop("model")
    else:
        values["model"] = model
        filled.append(f"model {model}")
        path = (model_files or {}).get(model)
        if path is not None and expected_model_hash(request) is not None:
            sha256 = cached_sha256(path)
            if sha256 is None:
                fill.unhashed = path
            elif (warning := model_hash_warning(request, path, sha256)) is not None:
                not_used.append(warning)

    if "Sampler" in extra:
        not_used.append(f"sampler {extra.pop('Sampler')} is not available (Euler used)")
    if "Schedule type" in extra:
        not_used.append(f"schedule {extra.pop('Schedule type')} is not available "
                        f"({SCHEDULE_LABELS[request.schedule]} used)")
    filled.append(f"{SAMPLER_LABELS[request.sampler]} {SCHEDULE_LABELS[request.schedule]}, {request.steps} steps, "
                  f"CFG {request.cfg:g}, seed {request.seed} (locked), {request.width}×{request.height}")
    values["seed_lock"] = True  # the image's own seed: reproduce it until the user rolls a new one
    if request.clip_skip > 1:
        filled.append(f"clip skip {request.clip_skip}")
    if request.refiner is not None:  # SDXL's second model: kept and sent with the job (the form has no row)
        refiner = match_name(request.refiner, models)
        if refiner is None:
            values["refiner"] = None
            not_used.append(f"the refiner {request.refiner} named in the image is not in your models folders "
                            "(no refiner)")
        else:
            values["refiner"] = refiner
            filled.append(f"refiner {refiner} from {request.refiner_switch:g}")
    if request.prediction != "auto":
        filled.append(f"prediction {request.prediction}")
    if request.detailer:
        from core.detailer_args import summary

        filled.append(f"detailer {summary(request.detailer)}")

    if request.vae is None:
        filled.append("built-in VAE")
    else:
        vae = match_name(request.vae, vaes)
        if vae is None:
            values.pop("vae")
            kept = f"kept {current_vae}" if current_vae else "kept the built-in one"
            not_used.append(f"the VAE {request.vae} named in the image is not in your models folders ({kept})")
        else:
            values["vae"] = vae
            filled.append(f"VAE {vae}")

    if request.init_image is not None:
        if Path(request.init_image).is_file():
            filled.append(f"init image {request.init_image}, denoise {request.denoise:g}")
        else:
            values["init_image"] = None
            not_used.append(f"the init image {request.init_image} is not there any more (txt2img)")
        if request.mask is not None and values["init_image"] is not None and Path(request.mask).is_file():
            filled.append(f"mask {request.mask}")
        elif request.mask is not None:  # no mask without its image: the form would refuse to queue it
            values["mask"] = None
            if values["init_image"] is not None:
                not_used.append(f"the mask {request.mask} is not there any more (img2img of the whole image)")
        if request.outpaint is not None and values["init_image"] is None:
            values["outpaint"] = None
    elif request.denoise != 1.0:  # A1111's img2img infotext: the strength, never the source image
        not_used.append(f"the image was made by img2img (denoise {request.denoise:g}) from a source image it does "
                        "not record: choose that image as the init image (Advanced) to redo it; txt2img otherwise")
    if request.hires is not None:
        upscaler = request.hires.upscaler
        if upscaler not in ("latent", "image"):  # an upscaler model (4x-UltraSharp): is it here?
            found = match_name(upscaler, upscalers)
            if found is None:
                not_used.append(f"the hires upscaler {upscaler} is not in your models folders (latent used)")
                upscaler = "latent"
            values["hires"] = {**values["hires"], "upscaler": found or upscaler}
            upscaler = found or upscaler
        filled.append(f"hires fix ×{request.hires.scale:g} ({upscaler}, "
                      f"denoise {request.hires.denoise:g})")
        if "Hires upscaler" in extra:
            not_used.append(f"hires upscaler {extra.pop('Hires upscaler')} is not available "
                            f"({request.hires.upscaler} used)")
    else:
        filled.append("no hires fix")

    if upscale:
        not_used.append(f"the image is its source upscaled with {upscale['upscaler']}: the source's settings were "
                        "filled (History's u upscales again)")
    not_used.extend(prompt_syntax_warnings(request.prompt, request.negative_prompt))
    extra = {k: v for k, v in extra.items() if v not in (None, "") and k != MADE_WITH}  # the hash is used above
    if extra:
        not_used.append("not used by Darkroom: " + ", ".join(extra))
    return fill
