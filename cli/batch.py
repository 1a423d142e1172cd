"""``darkroom --batch JOBS``: run generation jobs without the TUI.

JOBS is a TOML file of ``[[job]]`` tables (plus an optional ``[defaults]`` table), a JSON Lines file (one
request object per line), a JSON file (one object or an array of them), or ``-`` for stdin (detected). Each job may name a ``preset``;
request defaults < ``[defaults]`` < preset < job fields. Relative paths in a job (``init_image``, a ``model`` or
``vae`` written as ``./file`` or ``../file``) are relative to the jobs file's folder (the current folder for stdin).
TOML has no null: ``hires = false`` turns off an inherited hires-fix, ``init_image = ""`` an inherited init image.

An image is a job too: JOBS may be a PNG (JPEG, WebP) that records its parameters (Darkroom's ``darkroom`` JSON, or
an A1111/Forge ``parameters`` infotext), and it runs the job that made that image (its seed, one image; the model
found through the registry as usual). A job's (or ``[defaults]``') ``from_image = "x.png"`` takes the image's
parameters in place of the request defaults, so the full order is: request defaults < ``from_image`` <
``[defaults]`` < preset < the job's own fields.

Every job is validated before anything runs, and every problem of every job is reported in one run, each with its
place: ``[defaults]`` (once) for a bad field a job inherits from there, else ``job 3`` (TOML), ``line 5`` (JSON
Lines) or ``item 2`` (a JSON array).

Output contract: one saved image path per line on stdout, nothing else, each printed as soon as the worker says
its image is saved and recorded (``ImageSaved``: a batch_count job's paths one batch at a time, in seed order; a
job that fails or is interrupted midway has printed the ones it saved), every path once; progress and errors on stderr
(a Rich progress bar on a terminal, plain lines otherwise). Exit codes: 0 all jobs succeeded, 1 a job failed,
2 usage or input error, 3 a model cannot be found or loaded, 4 the job database cannot be used (locked by
another process for longer than the busy timeout, 30 s or ``$DARKROOM_DB_TIMEOUT``; disk full), 130
interrupted (Ctrl-C).

Jobs go through the same SQLite database as the TUI, in a queue of this run's own: an interrupted batch leaves
the jobs it did not finish there, marked interrupted, and the TUI's Queue screen retries them (r) in its queue.

``--resume``: running the same jobs file again with ``--resume`` runs only its jobs that did not finish in an
earlier run (stopped by Ctrl-C, a kill, a crash, a failure or the database). A job is the same job when the
file's absolute path, its place in the file and its fields are unchanged. A job already done is skipped and its
image paths are printed on stdout as if it had run, so a script still gets every path; a job stopped midway
through saving its images makes only the ones it lacks. This module never imports Textual.

``--enhance`` (every job) or a job's ``enhance = true``: a local Ollama-compatible LLM rewrites the prompt just
before the job is queued (``core.enhance``; ``--enhance-url`` / ``--enhance-model``); the image records both
prompts. When it fails, one warning line says why and the job runs with its own prompt.

Model upscalers (``core.upscale``, the optional ``upscale`` extra): ``hires = { upscaler = "4x-UltraSharp" }``
upscales the first pass with the model before the hires pass; a job with ``init_image = "x.png"`` and
``upscale = "4x-UltraSharp"`` (or ``upscale = { upscaler = "...", scale = 2 }``; scale 0 = the model's own) samples
nothing and saves the image upscaled, with the source's parameters (when it records any) and A1111's
``Postprocess upscale by`` / ``Postprocess upscaler``; ``upscale = { upscaler, image, scale }`` names the image
itself. Upscalers are found, and spandrel checked, before any job runs.

X/Y/Z grids (``core.grid``): a top-level ``[grid]`` table (every job), or a job's ``grid`` table, with up to
three axes, e.g. ``x = {field = "cfg", values = [5, 7]}``; ``grid = false`` turns an inherited one off. Every
combination is an ordinary job (numbered in run order, z then y then x); once all of a grid's cells are done
its labelled grid image is saved in ``grids/`` of the output folder and its path printed after the cells'.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import json
import os
import queue as queue_mod
import signal
import stat
import sys
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from core.accel.attention_mode import AttentionModeError
from core.accel.attention_mode import resolve_mode as resolve_attention_mode
from core.accel.compile_mode import CompileModeError
from core.accel.compile_mode import resolve_mode as resolve_compile_mode
from core.accel.memory_mode import MemoryModeError
from core.accel.memory_mode import resolve_mode as resolve_memory_mode
from core.accel.precision_mode import PrecisionModeError
from core.accel.precision_mode import resolve_mode as resolve_precision_mode
from core.detailer_args import detail_loras
from core.errors import CheckpointError, DarkroomError, ModelNotFoundError, PresetError, RequestError
from core.events import (
    ImageSaved,
    JobCancelled,
    JobFailed,
    JobFinished,
    JobStarted,
    JobStep,
    JobWarning,
    Status,
    WorkerStopped,
)
from core.paths import unrecordable_name
from core.request import GenerationRequest, mask_warnings, prompt_syntax_warnings, resolve_init_image
from core.text import visible

EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_USAGE = 2
EXIT_MODEL = 3
EXIT_DATABASE = 4
EXIT_INTERRUPTED = 130
STOP_TIMEOUT = 30.0  # seconds Ctrl-C waits for the current step to end


class BatchInputError(DarkroomError):
    """The jobs file cannot be read or holds an invalid job."""


@dataclass(frozen=True)
class BatchJob:
    index: int  # 1-based, in file order
    request: GenerationRequest
    preset: Any = None  # the core.presets.Preset the job named (directly or through [defaults]), if any
    enhance: bool = False  # the job's ``enhance = true``: a local LLM rewrites its prompt before it is queued
    grid: Any = None  # (grid id, core.grid axes) for a cell of an X/Y/Z grid
    given: frozenset[str] = frozenset()  # the request fields the file set (job, [defaults], preset, from_image)
    notes: tuple[str, ...] = ()  # an image's infotext entries Darkroom does not apply (from_image, --batch x.png)


# ---- reading jobs ---------------------------------------------------------------------------------------------


def _detect_format(text: str, name: str) -> str:
    suffix = Path(name).suffix.lower()
    if suffix == ".toml":
        return "toml"
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            return "jsonl" if stripped.startswith("{") else "toml"
    return "toml"


def _merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if key in ("hires", "extra") and isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def _job_tables(text: str, label: str, fmt: str) -> tuple[list[tuple[str, Any]], dict[str, Any]]:
    """Raw job tables, each with a human name ("job 2" / "line 5"), and the defaults table."""
    if fmt == "toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise BatchInputError(f"{label}: not valid TOML: {exc}") from None
        except RecursionError:
            raise BatchInputError(_too_deep(label)) from None
        unknown = sorted(set(data) - {"job", "defaults", "grid"})
        fields = {f.name for f in dataclasses.fields(GenerationRequest)} | set(_NOT_FIELDS)
        if unknown and set(unknown) <= fields:
            # a job written without its header, the likeliest first jobs file: say where the fields go
            names = ", ".join(repr(key) for key in unknown)
            raise BatchInputError(
                f"{label}: {names} {'are job fields' if len(unknown) > 1 else 'is a job field'} at the top "
                "level; put a [[job]] line above a job's fields (or [defaults] above the fields every job shares)"
            )
        if unknown:
            raise BatchInputError(
                f"{label}: unknown top-level key {unknown[0]!r}; valid: [[job]] tables, one [defaults] table "
                "and one [grid] table"
            )
        jobs = data.get("job", [])
        if not isinstance(jobs, list):
            raise BatchInputError(f"{label}: 'job' must be [[job]] tables")
        defaults = data.get("defaults", {})
        if not isinstance(defaults, Mapping):
            raise BatchInputError(f"{label}: 'defaults' must be a [defaults] table")
        if "grid" in data:
            if "grid" in defaults:
                raise BatchInputError(f"{label}: a [grid] table and a grid in [defaults]: keep one")
            defaults = {**defaults, "grid": data["grid"]}
        return [(f"job {i}", job) for i, job in enumerate(jobs, 1)], dict(defaults)
    try:  # a .json file holding one (pretty-printed) object or an array of them
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    except RecursionError:
        raise BatchInputError(_too_deep(label)) from None
    if isinstance(whole, list):
        return [(f"item {i}", job) for i, job in enumerate(whole, 1)], {}
    if isinstance(whole, Mapping):
        return [("job 1", whole)], {}
    tables = []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            tables.append((f"line {number}", json.loads(stripped)))
        except json.JSONDecodeError as exc:  # reported with every other bad line and job
            tables.append((f"line {number}", _Unreadable(f"not valid JSON: {exc.msg}")))
        except RecursionError:
            tables.append((f"line {number}", _Unreadable(_too_deep(None))))
    return tables, {}


@dataclass(frozen=True)
class _Unreadable:
    """A JSON line that does not parse, kept in its place to be reported with the other problems."""

    problem: str


def _too_deep(label: str | None) -> str:
    # tomllib and json recurse once per level of nesting: thousands of "[[[[" are a RecursionError
    text = ("nested too deeply to read (arrays or tables thousands of levels inside each other); a job is a "
            "flat table of request fields")
    return f"{label}: {text}" if label else text


_RELATIVE_PREFIXES = ("./", "../", ".\\", "..\\")


def _resolve_paths(fields: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """Take relative paths in a job from the jobs file's folder (not from wherever the command ran).

    ``init_image`` is always a path; ``model`` and ``vae`` are names in the models folders unless written as
    ``./x.safetensors`` or ``../x.safetensors``. Resolved paths are absolute, so the stored request (and the
    one recorded in the PNG) still works from any folder.
    """
    for key in ("model", "vae"):
        value = fields.get(key)
        if isinstance(value, str) and value.startswith(_RELATIVE_PREFIXES):
            # absolute without following symlinks: a linked checkpoint keeps its name in the metadata
            fields = {**fields, key: os.path.abspath(base_dir / value)}
    mask = fields.get("mask")  # an inpainting mask: a path, checked like the init image (`mask = ""`: none)
    if isinstance(mask, str):
        fields = {**fields, "mask": resolve_init_image(mask, base_dir, field="mask") if mask.strip() else None}
    init = fields.get("init_image")
    if isinstance(init, str) and not init.strip():  # `init_image = ""` (TOML has no null): txt2img
        return {**fields, "init_image": None}
    if isinstance(init, str):  # checked now: a wrong file fails here, not after the jobs before it have run
        fields = {**fields, "init_image": resolve_init_image(init, base_dir)}
    return fields


def _job_fields(table: Mapping[str, Any]) -> dict[str, Any]:
    """A table's request fields. TOML has no null, so ``hires = false`` is how a job turns off the hires-fix
    that its preset or ``[defaults]`` switched on."""
    return {k: (None if k == "hires" and v is False else v) for k, v in table.items() if k not in _NOT_FIELDS}


_NOT_FIELDS = ("preset", "from_image", "enhance", "grid")  # job keys that are not request fields
_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")  # PNG, JPEG (WebP: RIFF....WEBP)
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def _image_fields(value: Any, base_dir: Path) -> tuple[dict[str, Any], list[str]]:
    """The request an image was made with (Darkroom's own record, or an A1111/Forge infotext), as job fields.

    It is that image's request: its seed, one image (``batch_size`` and ``batch_count`` 1), and no img2img
    strength when it was txt2img (so a job that adds an ``init_image`` gets img2img's default). An A1111/Forge
    img2img infotext records its strength but not its source image: the strength is kept for the job that
    gives the source as its ``init_image``. The infotext's entries Darkroom does not map (``Model hash``,
    ``Variation seed``) describe that image, not the new one: they are not carried into its record, and the ones
    that change an image are returned (``core.metadata.unapplied_entries``) for a warning. Raises
    RequestError for a path that is no readable image, MetadataError for an image without parameters.
    """
    if not isinstance(value, str) or not value.strip():
        raise RequestError("from_image", value, "the path of an image made by Darkroom, A1111 or Forge")
    path = resolve_init_image(value, base_dir, field="from_image")  # a regular file that decodes, not a bomb
    from core.metadata import read_request, unapplied_entries

    fields = read_request(path).to_dict()
    fields.update(batch_size=1, batch_count=1)
    unapplied = unapplied_entries(fields["extra"])
    fields["extra"] = {k: v for k, v in fields["extra"].items() if k.islower()}  # our own notes: grid, enhance
    if fields.get("init_image") is None and fields.get("denoise") == 1.0:
        fields.pop("denoise", None)
    return fields, unapplied


def _upscale_job(
    table: Mapping[str, Any], defaults: Mapping[str, Any], base: Path
) -> tuple[Mapping[str, Any], dict[str, Any] | None]:
    """An upscale job's table with ``upscale`` made a full table (``upscale = "name"`` and the job's
    ``init_image`` as its image, resolved and checked now), and the parameters its source image records (None when
    the job names its model or a from_image; empty for a photo). Other tables pass unchanged. A ``model`` or
    ``from_image`` in ``[defaults]`` is for the sampled jobs and does not replace the source's."""
    value = table.get("upscale", defaults.get("upscale"))
    if value is None or value is False:
        return ({k: v for k, v in table.items() if k != "upscale"} if value is False else table), None
    up = {"upscaler": value} if isinstance(value, str) else dict(value) if isinstance(value, Mapping) else None
    if up is None:
        return table, None  # the request says what an upscale is
    table = dict(table)
    if not up.get("image"):  # the source given as the job's init_image
        up["image"] = table.pop("init_image", None) or defaults.get("init_image")
        if "init_image" in defaults:
            table["init_image"] = ""  # the defaults' init_image was the source, not an img2img input
    if not isinstance(up["image"], str) or not up["image"].strip():
        raise RequestError("upscale.image", up["image"], "the image to upscale (upscale.image, or the job's "
                           "init_image)")
    up["image"] = resolve_init_image(up["image"], base, field="upscale.image")
    table["upscale"] = up
    if any(key in table for key in ("model", "from_image")):
        return table, None
    from core.metadata import MetadataError

    try:
        return table, _image_fields(up["image"], base)[0]
    except MetadataError:
        return table, {}


def parse_jobs(
    text: str, label: str, fmt: str | None = None, base_dir: Path | str | None = None
) -> list[BatchJob]:
    """Validate every job up front, so nothing runs when any job is wrong.

    ``base_dir`` is the folder relative paths in jobs (``init_image``, ``from_image``, ``./`` model and VAE
    paths) are taken from: the jobs file's own folder, or the current folder for stdin.
    """
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    text = text.removeprefix("\ufeff")  # the byte-order mark Windows editors put at the start of UTF-8 files
    tables, defaults = _job_tables(text, label, fmt or _detect_format(text, label))
    if not tables:
        raise BatchInputError(f"{label}: no jobs found (expected [[job]] tables or one JSON object per line)")
    return _build_jobs(tables, defaults, label, base)


def _build_jobs(
    tables: list[tuple[str, Any]], defaults: dict[str, Any], label: str, base: Path
) -> list[BatchJob]:
    """Every problem of every job is reported in one run, each where it is: ``[defaults]`` for a bad field
    that the job takes from there (once, not once per job), else the job (``job 3``, ``line 5``)."""
    jobs = []
    problems: list[str] = []
    invalid = 0
    for name, table in tables:
        here: list[str] = []

        def report(field: str, text: str, table: Any = table, here: list[str] = here, name: str = name) -> None:
            root = field.split(".")[0]
            inherited = isinstance(table, Mapping) and root not in table and root in defaults
            line = f"{label}: {'[defaults]' if inherited else name}: {text}"
            here.append(line)
            if line not in problems:
                problems.append(line)

        if isinstance(table, _Unreadable):
            report("", table.problem)
        elif not isinstance(table, Mapping):
            report("", f"a job must be a table of request fields, not {table!r}")
        else:
            used: dict[str, Any] = {}
            request = _build_request(table, defaults, base, report, used)
            enhance = table.get("enhance", defaults.get("enhance", False))
            if not isinstance(enhance, bool):
                report("enhance", f"enhance = {enhance!r} is invalid: true or false")
            grid = table.get("grid", defaults.get("grid", False))
            cells: list[tuple[GenerationRequest, Any]] = [(request, None)] if request is not None else []
            if grid is not False and request is not None:
                from core.grid import expand, parse_axes

                try:
                    axes = parse_axes(grid)
                    grid_id = f"{label}: {name}"
                    cells = [(cell, (grid_id, axes)) for cell in expand(request, axes, grid_id)]
                except RequestError as exc:
                    report("grid", str(exc))
            if not here:
                for cell, grid_of in cells:  # cells of a grid are ordinary jobs, numbered in run order
                    jobs.append(BatchJob(len(jobs) + 1, cell, used.get("preset"), enhance, grid_of,
                                         used.get("given", frozenset()), used.get("notes", ())))
        invalid += bool(here)
    if problems:
        problems.sort(key=lambda line: not line.startswith(f"{label}: [defaults]: "))  # shared ones first
        more = f"\n(nothing was run: {invalid} of {len(tables)} jobs are invalid)" if len(problems) > 1 else ""
        raise BatchInputError("\n".join(problems) + more)
    return jobs


def _build_request(
    table: Mapping[str, Any], defaults: Mapping[str, Any], base: Path, report: Callable[[str, str], None],
    used: dict[str, Any] | None = None,
) -> GenerationRequest | None:
    """One job's request: request defaults < its ``from_image`` < ``[defaults]`` < its preset < its own fields.
    Every problem goes to ``report(field, text)``; None when there was one. ``used["preset"]`` gets the
    preset applied (its family is checked against the model's before anything loads)."""
    from core.metadata import MetadataError

    layer = _job_fields(defaults)
    try:
        table, source = _upscale_job(table, defaults, base)
    except RequestError as exc:
        report("upscale", str(exc))
        return None
    if source is not None:
        # an upscale job samples nothing: its PNG records the source's parameters as they are (A1111's Extras
        # tab does the same), not the [defaults] meant for the sampled jobs (a photo's: none)
        layer = source
    image = table.get("from_image", defaults.get("from_image") if source is None else None)
    if image is not None:
        try:  # the image stands in for the request defaults: all the rest of the file goes over it
            fields, unapplied = _image_fields(image, base)
            layer = _merge(fields, layer)
            if used is not None:
                used["notes"] = tuple(unapplied)
        except RequestError as exc:
            report("from_image", str(exc))
            return None
        except MetadataError as exc:
            report("from_image", f"from_image = {image!r}: {exc}")
            return None
    job_fields = _job_fields(table)
    preset = table.get("preset", defaults.get("preset"))
    try:
        if preset is not None:
            if not isinstance(preset, str):
                raise RequestError("preset", preset, "the name of a preset")
            from core.presets import apply_preset, find_preset

            # [defaults] < preset < job: the defaults go under the preset's own fields.
            found = find_preset(preset)
            if used is not None:
                used["preset"] = found
            found = dataclasses.replace(found, fields=_merge(layer, found.fields))
            fields = apply_preset(found, job_fields)
        else:
            fields = _merge(layer, job_fields)
    except (RequestError, PresetError) as exc:
        report("preset", str(exc))
        fields = _merge(layer, job_fields)  # the job's other fields are still checked
    errors: list[RequestError] = []
    try:
        resolved = _resolve_paths(fields, base)
    except RequestError as exc:  # a bad init_image: the other fields are still checked
        errors.extend(exc.errors)
        resolved = fields
    if used is not None:
        used["given"] = frozenset(resolved)
    try:
        request = GenerationRequest.from_dict(resolved, other_keys=_NOT_FIELDS)
    except RequestError as exc:
        errors[:0] = exc.errors
        request = None
    except TypeError as exc:  # e.g. a hires value the dataclass cannot take
        report("", str(exc))
        return None
    for error in errors:
        report(error.field, str(error))
    return None if errors else request


def _where_instead(path: Path) -> str:
    """For a jobs file that is not there: the folder a relative path was looked for in, and a jobs file of a
    close name in that folder ("jobs.tmol": did you mean jobs.toml?)."""
    import difflib

    folder = path.parent if path.parent.is_dir() else None
    where = "" if path.is_absolute() else f" in {visible(Path.cwd() / path.parent)}"
    names = [p.name for p in folder.iterdir() if p.suffix.lower() in (".toml", ".jsonl", ".json")] if folder else []
    close = difflib.get_close_matches(path.name, sorted(names), n=1, cutoff=0.8)  # a typo, not any .toml
    return where + (f"; did you mean {visible(path.parent / close[0])}?" if close else "")


def load_jobs(source: str, stdin: IO[str] | None = None) -> tuple[list[BatchJob], str]:
    """Read JOBS (a path or ``-``); returns the jobs and the label used in messages."""
    if source == "-":
        stream = stdin or sys.stdin
        if stream.isatty():  # typed by hand (or `-` by mistake): say why nothing happens
            print("darkroom: reading jobs from stdin; end with Ctrl-D (Ctrl-Z Enter on Windows)", file=sys.stderr)
        try:  # decoded here, as a file is: a stdin that decodes strictly (a UTF-8 locale) would raise mid-read
            raw = getattr(stream, "buffer", None)
            text = raw.read().decode("utf-8") if raw is not None else stream.read()
        except UnicodeDecodeError:
            raise BatchInputError(f"<stdin>: {_NOT_TEXT}") from None
        return parse_jobs(text, "<stdin>"), "<stdin>"
    path = Path(source)
    if _is_image(path):
        return _image_jobs(path, source), source
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BatchInputError(f"{source}: jobs file not found{_where_instead(path)}") from None
    except IsADirectoryError:
        raise BatchInputError(f"{source}: is a folder; give a .toml, .jsonl or .json jobs file") from None
    except UnicodeDecodeError:
        raise BatchInputError(f"{source}: {_NOT_TEXT}") from None
    except OSError as exc:
        raise BatchInputError(f"{source}: cannot read the jobs file ({exc.strerror or exc})") from None
    return parse_jobs(text, source, base_dir=path.parent), source


_NOT_TEXT = "not a text file (expected TOML or JSON Lines in UTF-8); is it the right file?"


def _is_image(path: Path) -> bool:
    """A regular file named or starting like a PNG, JPEG or WebP (never opened when it is a pipe: jobs can come
    from ``<(...)``)."""
    if not path.is_file():
        return False
    if path.suffix.lower() in _IMAGE_SUFFIXES:
        return True
    try:
        with path.open("rb") as handle:
            head = handle.read(12)
    except OSError:
        return False  # read_text says why
    return head.startswith(_IMAGE_MAGIC) or (head.startswith(b"RIFF") and head[8:12] == b"WEBP")


def _image_jobs(path: Path, source: str) -> list[BatchJob]:
    """``--batch image.png``: the job that made the image, from the parameters it records."""
    from core.metadata import MetadataError

    try:
        _image_fields(str(path), Path.cwd())  # said here, in words for an image given as the jobs
    except RequestError as exc:
        raise BatchInputError(f"{source}: cannot be run as a job: {exc.valid}") from None
    except MetadataError as exc:
        text = str(exc).removeprefix(f"{path.expanduser().resolve()}: ")
        raise BatchInputError(
            f"{source}: {text}, so there is no job to run (only an image that records its parameters, as "
            "Darkroom, A1111 and Forge write them, can be run)"
        ) from None
    return _build_jobs([("job 1", {"from_image": str(path.expanduser().resolve())})], {}, source, path.parent)


def _family_mismatches(
    jobs: Sequence[BatchJob], checkpoints: Mapping[int, Path], registry: Any, label: str
) -> list[str]:
    """Every job whose preset or family-specific fields do not fit its model's family, read from the model's
    header (torch-free, cached per file) before anything loads: one line per problem, naming the job, the
    model and its family, and what would be valid. A file that is not inspected here (a .ckpt) is left to the
    loader, which says why when the job runs; one whose header is broken or whose data is cut short was
    refused before this."""
    from core.presets import family_mismatch, load_presets
    from core.request import family_problems

    lines: list[str] = []
    presets = None
    for job in jobs:
        if job.index not in checkpoints:  # an upscale job samples nothing
            continue
        info = registry.inspect(checkpoints[job.index])
        if not info.is_family:
            continue
        where = f"{label}: job {job.index}: model {job.request.model!r} ({info.label})"
        if job.preset is not None:
            if presets is None:
                presets, _ = load_presets()
            problem = family_mismatch(job.preset, info.family, presets)
            if problem:  # the preset's own fields would only repeat it
                lines.append(f"{where}: {problem}")
                continue
        lines.extend(f"{where}: {err}" for err in family_problems(job.request, info.family))
        if job.request.refiner:  # a refiner of another latent space (SD1.x under SDXL) failed only when it ran
            from core.models.families import FAMILIES
            from core.models.family import refiner_problem

            theirs = registry.inspect(registry.find_checkpoint(job.request.refiner))
            if theirs.is_family and info.family in FAMILIES and theirs.family in FAMILIES:
                problem = refiner_problem(FAMILIES[info.family], FAMILIES[theirs.family], job.request.refiner)
                if problem is not None:
                    lines.append(f"{where}: {problem}")
    return lines


def _apply_family(
    jobs: Sequence[BatchJob], checkpoints: Mapping[int, Path], registry: Any, warn: Callable[[int, str], None]
) -> list[BatchJob]:
    """Each job with its model family's own defaults for the fields the file left out (Flux: cfg 1), and a
    warning for what the family does differently from what the prompt asks (Flux ignores A1111 weights)."""
    from core.request import family_warnings, with_family_defaults

    out = []
    for job in jobs:
        info = registry.inspect(checkpoints[job.index]) if job.index in checkpoints else None
        if info is not None and info.is_family:
            for warning in family_warnings(job.request, info.family):
                warn(job.index, warning)
            job = dataclasses.replace(job, request=with_family_defaults(job.request, info.family, job.given))
        out.append(job)
    return out


# ---- the runner -------------------------------------------------------------------------------------------------


def pipeline_runner_factory(
    registry: Any, models_dirs: Sequence[Path] | None, attention: str = "auto", memory: str = "auto",
    compile: str = "off", precision: str = "auto",
) -> Callable[[], Any]:
    """The real pipeline's factory (``core.runner``), built inside the worker thread; a seam tests replace.
    ``attention``: its dispatcher's mode; ``memory``: its memory mode (``core.accel.memory_mode``);
    ``precision``: the networks' dtype (``core.accel.precision_mode``)."""
    from core.runner import runner_factory

    # nobody sees previews here, and a TAESD preview is not free
    return runner_factory(models_dirs, registry=registry, previews=False, attention=attention, memory=memory,
                          compile=compile, precision=precision)


# ---- progress ---------------------------------------------------------------------------------------------------


def _shown(prompt: str, limit: int = 60) -> str:
    """A prompt on one line, as the user wrote it (``repr`` would double A1111's ``\\(`` escapes), with
    control characters made visible: newlines would break the one-line-per-event log, escapes drive the
    terminal."""
    text = " ".join(visible(prompt).split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f'"{text}"'


class _PlainProgress:
    """One line per event, steps at most once a second: readable in logs and CI."""

    def __init__(self, err: IO[str], total_jobs: int, label: str = "") -> None:
        self.err = err
        self.total = total_jobs
        self.where = f"{label}: " if label else ""  # the jobs file, as the warnings before the run name it
        self._last_step = 0.0
        self._last_activity = ""
        self._steps_of = ""  # a resumed job's steps count only the images still to make: said beside them

    def _say(self, text: str) -> None:
        # Every progress line holds a prompt, model name or error that came from a file: shown, not obeyed.
        print(visible(text), file=self.err, flush=True)

    def message(self, text: str) -> None:
        self._say(text)

    def started(self, n: int, request: GenerationRequest, kept: int = 0) -> None:
        """``kept``: the images of the job an earlier run saved (``--resume``), which it does not make again."""
        if request.upscale is not None:
            self._say(f"[{n}/{self.total}] started: upscale {request.upscale.image} with {request.upscale.upscaler}")
        else:
            self._say(f"[{n}/{self.total}] started: {request.model}, seed {request.seed}, {_shown(request.prompt)}")
        images = request.batch_size * request.batch_count
        self._steps_of = f" (for the other {images - kept})" if 0 < kept < images else ""
        if self._steps_of:
            self._say(f"[{n}/{self.total}] resuming: {kept} of {images} images already saved, making the other "
                      f"{images - kept}")
        self._last_step = 0.0

    def activity(self, n: int, text: str) -> None:
        # Long silent phases (loading a checkpoint, compiling the denoiser) get a line; routine ones do not.
        # A memory plan other than the default ("generating · memory: model offload (est. ...)") gets one too.
        if (text.startswith(("loading", "compiling")) or "memory:" in text) and text != self._last_activity:
            self._say(f"[{n}/{self.total}] {text}")
        self._last_activity = text

    def step(self, n: int, step: int, total: int) -> None:
        now = time.monotonic()
        if step == 1 or step == total or now - self._last_step >= 1.0:
            self._last_step = now
            self._say(f"[{n}/{self.total}] step {step}/{total}{self._steps_of}")

    def finished(self, n: int, count: int, elapsed: float) -> None:
        self._say(f"[{n}/{self.total}] done: {count} image(s) in {elapsed:.1f} s")

    def failed(self, n: int, error: str) -> None:
        self._say(f"[{n}/{self.total}] failed: {error}")

    def skipped(self, n: int, count: int) -> None:
        self._say(f"[{n}/{self.total}] skipped: done in an earlier run ({count} image(s))")

    def warning(self, n: int, text: str) -> None:
        self._say(f"darkroom: warning: {self.where}job {n}: {text}")

    def close(self) -> None:
        pass


def _same_terminal(a: IO[str], b: IO[str]) -> bool:
    """Whether two streams write to one terminal (stdout and stderr both on the same tty)."""
    if a is b:
        return True
    try:
        return os.path.samestat(os.fstat(a.fileno()), os.fstat(b.fileno()))
    except (OSError, ValueError, AttributeError):  # no file descriptor (a StringIO): not the same
        return False


def _live_bars_fit(out: IO[str], err: IO[str]) -> bool:
    """Whether progress goes in Rich's live bars, else one line per event. Bars need stderr on a terminal
    that can redraw: with TERM=dumb (an editor's shell buffer) Rich draws nothing until the end, so a long job
    showed no step at all. And nothing may write beside them: a piped stdout (``| cat``, ``| tee list.txt``)
    is often printed on the same terminal, where the bars' redraws erased its path lines."""
    if not (hasattr(err, "isatty") and err.isatty()):
        return False
    if os.environ.get("TERM", "").lower() in ("dumb", "unknown"):  # what Rich counts as not interactive
        return False
    try:
        return not stat.S_ISFIFO(os.fstat(out.fileno()).st_mode)
    except (OSError, ValueError, AttributeError):  # no file descriptor (a StringIO): nothing beside the bars
        return True


class _RichProgress(_PlainProgress):
    """A live progress bar on a terminal (Rich, imported only here)."""

    def __init__(self, err: IO[str], total_jobs: int, label: str = "") -> None:
        super().__init__(err, total_jobs, label)
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        # emoji=False: ":dog:" in "[cat:dog:0.5]" is prompt editing, not an emoji code
        self.console = Console(file=err, highlight=False, emoji=False)
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        )
        self.overall = self.progress.add_task("jobs", total=total_jobs)
        self.current: Any = None
        self.progress.start()

    def _say(self, text: str) -> None:
        # prompts are user text: never markup, control characters shown
        self.console.print(visible(text), markup=False, highlight=False)

    def print_path(self, text: str) -> None:
        """An image path above the bars, on one line however long (a hard wrap would break it for copying)."""
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def started(self, n: int, request: GenerationRequest, kept: int = 0) -> None:
        super().started(n, request, kept)
        self.current = self.progress.add_task(f"job {n}/{self.total}{self._steps_of}", total=None)

    def step(self, n: int, step: int, total: int) -> None:
        if self.current is not None:
            self.progress.update(self.current, completed=step, total=total)

    def _end(self) -> None:
        if self.current is not None:
            self.progress.remove_task(self.current)
            self.current = None
        self.progress.advance(self.overall)

    def finished(self, n: int, count: int, elapsed: float) -> None:
        self._end()
        super().finished(n, count, elapsed)

    def failed(self, n: int, error: str) -> None:
        self._end()
        super().failed(n, error)

    def skipped(self, n: int, count: int) -> None:
        self._end()
        super().skipped(n, count)

    def close(self) -> None:
        self.progress.stop()


# ---- running ----------------------------------------------------------------------------------------------------


def _queue_jobs(
    worker: Any,
    jobs: Sequence[BatchJob],
    jobs_source: str,
    resume: bool,
    number: dict[int, int],
    failed: set[int],
    progress: _PlainProgress,
    enhance: Any = None,
    enhance_all: bool = False,
    grid_seeds: dict[str, int] | None = None,
    resumed: dict[int, int] | None = None,
) -> Any:
    """Queue this run's jobs; yields ``(job, paths)`` for a job skipped by ``--resume`` (done before, its
    images still there) and ``(job, None)`` for one queued. Each job records its ``source_key``, so a later
    ``--resume`` finds it; with ``resume``, a job that an earlier run left failed or interrupted is retried
    (the same job: the images it saved before are not made again; ``resumed`` gets job id -> their number)."""
    from core.recovery import recover
    from core.store import source_key

    keys = {job.index: source_key(jobs_source, job.index, job.request) for job in jobs} if jobs_source != "-" else {}
    earlier: dict[str, Any] = {}
    if resume:
        recover(worker.store, worker.output_dir)  # a job killed after its last image was saved is done
        earlier = worker.store.jobs_by_source(keys.values())
    # An X/Y/Z grid's cells share one seed, as A1111's and the TUI's grids do: a -1 is drawn once per grid, or
    # taken from the cells an earlier run of this file made, so that a resumed grid stays one seed.
    # ``grid_seeds`` (grid id -> seed) is filled for the caller: the grid image records that seed.
    grid_seeds = {} if grid_seeds is None else grid_seeds
    for job in jobs:
        made = earlier.get(keys.get(job.index, "")) if job.grid is not None else None
        if made is not None and made.request.seed != -1:
            grid_seeds.setdefault(job.grid[0], made.request.seed)
    for job in jobs:
        key = keys.get(job.index)
        before = earlier.get(key) if key else None
        if before is not None and before.state == "done":
            paths = [h.path for h in worker.store.job_history(before.id)]
            if paths and all(Path(p).is_file() for p in paths):
                yield job, paths
                continue
            before = None  # its images were deleted since: make them again
        if before is not None and before.state in ("pending", "running"):
            # queued in the TUI (a retry from its Queue screen) or running in another live batch run
            number[before.id] = job.index
            failed.add(before.id)
            progress.failed(job.index, f"not run again: it is already queued or running elsewhere (job #{before.id})")
            continue
        if before is not None:
            # what it saved before is not made again: its progress says so (and counts the rest)
            kept = len({h.seed for h in worker.store.job_history(before.id)
                        if h.seed is not None and Path(h.path).is_file()})
            job_id = worker.retry(before.id)
            number[job_id] = job.index
            if kept and resumed is not None:
                resumed[job_id] = kept
        else:
            request = job.request
            if job.grid is not None and request.seed == -1:
                request = request.replace(seed=grid_seeds.setdefault(job.grid[0], request.with_resolved_seed().seed))
            if enhance is not None and (enhance_all or job.enhance):  # the key stays the file's own job
                from core.enhance import enhance_request

                progress.message(f"[{job.index}/{progress.total}] enhancing the prompt ({enhance.model})")
                request, problem = enhance_request(request, enhance)
                if problem:
                    progress.warning(job.index, problem)
            number[worker.submit(request, source_key=key)] = job.index
        yield job, None


def _save_grids(jobs: Sequence[BatchJob], paths_of: Mapping[int, list[str]], output_dir: Any,
                store: Any = None, grid_seeds: Mapping[str, int] | None = None,
                skipped: frozenset[int] = frozenset()) -> list[str]:
    """Save the labelled image of every grid whose cells all finished (``core.grid.save_grid``, in ``grids/``
    of the output folder, recorded in ``store``'s history); returns each grid's path, or a
    ``darkroom: warning:`` line for a grid with missing cells (no grid image then). A grid whose cells were
    all ``skipped`` (done in an earlier run: ``--resume``) has its image from then, when it is still there."""
    from core.grid import grid_record, save_grid

    groups: dict[str, list[BatchJob]] = {}
    for job in jobs:
        if job.grid is not None:
            groups.setdefault(job.grid[0], []).append(job)
    results = []
    for grid_id, cells in groups.items():
        missing = [job.index for job in cells if not paths_of.get(job.index)]
        if missing:
            results.append(f"darkroom: warning: {grid_id}: no grid image ({len(missing)} of its {len(cells)} "
                           "cells have no image)")
            continue
        images = [(job.request.extra["grid"], paths_of[job.index][0]) for job in cells]
        # the first cell's request stands for the grid (A1111's grid infotext is its first image's), with the
        # seed its cells were made with in place of a -1
        base = cells[0].request
        if base.seed == -1 and grid_id in (grid_seeds or {}):
            base = base.replace(seed=grid_seeds[grid_id])
        if store is not None and all(job.index in skipped for job in cells):
            record = grid_record(base, cells[0].grid[1], grid_id)
            earlier = [h.path for h in store.grid_images(grid_id) if h.request == record and Path(h.path).is_file()]
            if earlier:
                results.append(earlier[0])
                continue
        path = save_grid(images, cells[0].grid[1], base, grid_id, Path(output_dir) / "grids", store)
        results.append(str(path))
    return results


def _job_numbers(indices: list[int]) -> str:
    """'job 3', 'jobs 1, 2 and 5', 'jobs 1-40' (a run of numbers), for one problem shared by several jobs."""
    if len(indices) == 1:
        return f"job {indices[0]}"
    if indices == list(range(indices[0], indices[-1] + 1)):
        return f"jobs {indices[0]}-{indices[-1]}"
    if len(indices) > 8:
        return f"jobs {', '.join(map(str, indices[:8]))} and {len(indices) - 8} more"
    return f"jobs {', '.join(map(str, indices[:-1]))} and {indices[-1]}"


class Hangup(KeyboardInterrupt):
    """SIGHUP (the terminal closed: an SSH link dropped, a window shut) or SIGTERM: the run stops as it does on
    Ctrl-C (the current job marked interrupted, its saved images kept), where the default action killed the
    process at once and left the job 'running' until the next start's recovery."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what the shell reports for a process the signal killed

    def __str__(self) -> str:
        return "the terminal closed (SIGHUP)" if self.signum == signal.SIGHUP else "SIGTERM"


def _raise_hangup(signum: int, frame: Any) -> None:
    raise Hangup(signum)


def _ignore_signals(*names: str) -> None:
    """Ignore these signals from now on (the stop of a run under way; :func:`_stops_on_hangup` restores SIGHUP's
    and SIGTERM's handlers when ``run_batch`` returns)."""
    for name in names:
        signum = getattr(signal, name, None)  # no SIGHUP on Windows
        if signum is not None:
            with contextlib.suppress(ValueError):  # only the main thread may set handlers
                signal.signal(signum, signal.SIG_IGN)


def _stops_on_hangup(run: Callable[..., int]) -> Callable[..., int]:
    """``run`` with SIGHUP and SIGTERM raising :class:`Hangup` in the main thread while it runs. A signal that
    is ignored stays so (``nohup darkroom --batch ...`` keeps running after the terminal closes)."""

    @functools.wraps(run)
    def wrapper(*args: Any, **kwargs: Any) -> int:
        saved: dict[int, Any] = {}
        for name in ("SIGHUP", "SIGTERM"):
            signum = getattr(signal, name, None)  # no SIGHUP on Windows
            if signum is None:
                continue
            with contextlib.suppress(ValueError):  # only the main thread may set handlers
                if signal.getsignal(signum) is signal.SIG_DFL:
                    saved[signum] = signal.signal(signum, _raise_hangup)
        try:
            return run(*args, **kwargs)
        finally:
            for signum, handler in saved.items():
                signal.signal(signum, handler)

    return wrapper


@_stops_on_hangup
def run_batch(
    jobs_source: str,
    *,
    models_dirs: Sequence[Path | str] | None = None,
    output_dir: Path | str | None = None,
    db_path: Path | str | None = None,
    runner_factory: Callable[[], Any] | None = None,
    stdin: IO[str] | None = None,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
    rich_progress: bool | None = None,
    resume: bool = False,
    attention: str | None = None,
    lowvram: bool = False,
    enhance: bool = False,
    enhance_settings: Any = None,
    compile: str | None = None,
    precision: str | None = None,
) -> int:
    """Run every job in ``jobs_source``; returns the exit code. ``runner_factory`` replaces the pipeline;
    ``resume`` skips the jobs an earlier run of the same file finished (see the module docstring);
    ``attention`` forces an attention kernel (None: ``$DARKROOM_ATTENTION``, else auto); ``lowvram`` forces
    model offload at least (else ``$DARKROOM_MEMORY``, else auto: chosen per job from its memory estimate);
    ``compile`` is the denoiser's compile mode (None: ``$DARKROOM_COMPILE``, else off)."""
    out = stdout or sys.stdout
    err = stderr or sys.stderr

    def error(text: str) -> None:
        for line in text.split("\n"):  # one "darkroom: error:" line per problem
            # file, field and tensor names in the message come from files: control characters made visible
            print(f"darkroom: error: {visible(line)}", file=err, flush=True)

    if resume and jobs_source == "-":
        error("--resume needs a jobs file: jobs read from stdin cannot be told apart from one run to the next")
        return EXIT_USAGE
    try:
        attention_mode = resolve_attention_mode(attention)
        compile_mode = resolve_compile_mode(compile)
        precision_mode = resolve_precision_mode(precision)
    except (AttentionModeError, CompileModeError, PrecisionModeError) as exc:
        error(str(exc))
        return EXIT_USAGE
    try:
        memory_mode = resolve_memory_mode(lowvram)
    except MemoryModeError as exc:
        error(str(exc))
        return EXIT_USAGE
    try:
        jobs, label = load_jobs(jobs_source, stdin)
    except BatchInputError as exc:
        error(str(exc))
        return EXIT_USAGE

    dirs = [Path(d).expanduser() for d in models_dirs] if models_dirs else None
    for folder in dirs or []:
        if not folder.is_dir():  # a typo here would otherwise read as "no checkpoint files in ..."
            error(f"--models-dir {folder}: {'not a folder' if folder.exists() else 'no such folder'}")
            return EXIT_USAGE
    out_dir = Path(output_dir).expanduser() if output_dir else None
    if out_dir is not None and (why := unrecordable_name(out_dir)) is not None:
        error(f"--output-dir {out_dir}: {why}")  # error() shows the undecodable bytes visibly
        return EXIT_USAGE
    if out_dir is not None:
        try:  # find out now, not after the first job has spent minutes generating
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            why = "it is a file, not a folder" if out_dir.is_file() else exc.strerror or str(exc)
            error(f"--output-dir {out_dir}: cannot create the folder ({why})")
            return EXIT_USAGE
        if not os.access(out_dir, os.W_OK | os.X_OK):  # a read-only mount or another user's folder
            error(f"--output-dir {out_dir}: the folder cannot be written to")
            return EXIT_USAGE
    if dirs:
        # A pipeline that builds its own registry finds the same folders.
        os.environ["DARKROOM_MODELS"] = os.pathsep.join(str(d) for d in dirs)
    from core.models.registry import ModelRegistry

    registry = ModelRegistry(dirs)
    announced: dict[int, set[str]] = {}  # each job's warnings said before it runs: the run does not repeat them

    def warn(index: int, text: str) -> None:
        announced.setdefault(index, set()).add(text)
        print(visible(f"darkroom: warning: {label}: job {index}: {text}"), file=err, flush=True)

    for job in jobs:
        for warning in [*prompt_syntax_warnings(job.request.prompt, job.request.negative_prompt),
                        *mask_warnings(job.request)]:
            warn(job.index, warning)
        if job.notes:  # an image's parameters (from_image, --batch x.png): say what will not be the same
            warn(job.index, f"the image's {'; '.join(job.notes)} {'is' if len(job.notes) == 1 else 'are'} not "
                 "applied by Darkroom, so the new image will differ from it")
        if not job.request.is_img2img and job.request.denoise != 1.0:
            # a silent no-op otherwise; people often mean the hires-fix strength
            warn(job.index, f"denoise = {job.request.denoise} has no effect without init_image (the hires-fix "
                 "strength is hires.denoise)")
    from core.accel import cache_options
    from core.lora import LoraError
    from core.lora.check import check_lora
    from core.metadata import expected_model_hash, model_hash_warning
    from core.models.families import get_family
    from core.models.hashes import cached_sha256
    from core.models.split import resolve_parts
    from core.upscale import INSTALL_HINT, is_model_upscaler

    checkpoints: dict[int, Path] = {}
    unusable: dict[str, list[int]] = {}  # problem -> the jobs it is in (a [defaults] model: every job)
    for job in jobs:
        try:
            hires = job.request.hires
            upscaler = job.request.upscale.upscaler if job.request.is_upscale else (
                hires.upscaler if hires is not None and is_model_upscaler(hires.upscaler) else None)
            if upscaler is not None:  # found, and spandrel there to run it, before any job runs
                registry.find_upscaler(upscaler)
                missing = [m for m in ("spandrel", "torchvision") if importlib.util.find_spec(m) is None]
                if missing:  # (a torchvision built for another torch shows only when the job imports it)
                    raise ModelNotFoundError(f"upscaler {upscaler!r} needs spandrel and torchvision, and "
                                             f"{' and '.join(missing)} is not installed; install it with {INSTALL_HINT}")
            if job.request.is_upscale:
                continue  # nothing is sampled: the source's checkpoint need not be here
            checkpoint = checkpoints[job.index] = registry.find_checkpoint(job.request.model)
            refiner = [registry.find_checkpoint(job.request.refiner)] if job.request.refiner else []
            for path in (checkpoint, *refiner):
                info = registry.inspect(path)
                if info.label == "unreadable":  # a cut-off download, a broken header: no job of it could load
                    raise ModelNotFoundError(f"{path}: {info.problem}")  # as the loader would say it
            # the text encoders and VAE of a diffusion model kept alone: named, or found by type (said at load)
            resolve_parts(registry, checkpoint, job.request.text_encoders, job.request.vae)
            if expected_model_hash(job.request) is not None:  # a job from an image: its model, or another file?
                # said now when the file's hash is cached (never hashed here); else by the job, which hashes it
                mismatch = model_hash_warning(job.request, checkpoint, cached_sha256(checkpoint))
                if mismatch is not None:
                    warn(job.index, mismatch)
            # found, and made for the checkpoint's family, before any job runs (the detail prompts' tags too)
            for ref in {ref.name: ref for ref in (*job.request.lora_refs(), *detail_loras(job.request.detailer))}.values():
                for warning in check_lora(registry.find_lora(ref.name), checkpoint, ref.name, job.request.model):
                    warn(job.index, warning)
            if cache_options.requested(job.request):  # a cache that cannot help this model/run says so
                info = registry.inspect(checkpoint)
                family = get_family(info.family) if info.is_family else None
                for warning in cache_options.cache_warnings(job.request, family):
                    warn(job.index, warning)
        except (ModelNotFoundError, LoraError, RequestError) as exc:
            # every job's missing model in one go, as the field checks do: a jobs file with three mistyped
            # names is fixed in one edit, not three runs
            unusable.setdefault(str(exc), []).append(job.index)
    if unusable:
        lines = [f"{label}: {_job_numbers(indices)}: {problem}" for problem, indices in unusable.items()]
        count = sum(len(indices) for indices in unusable.values())
        more = f"\n(nothing was run: {count} of {len(jobs)} jobs name a model that cannot be used)"
        error("\n".join(lines) + (more if count > 1 else ""))
        return EXIT_MODEL
    mismatches = _family_mismatches(jobs, checkpoints, registry, label)
    from core.detectors import request_problems as detector_problems

    # the detail pass's detectors: a package to install or a YOLO file to add is said before anything loads
    mismatches += [f"{label}: job {job.index}: {problem}" for job in jobs
                   for problem in detector_problems(job.request, registry)]
    if mismatches:
        error("\n".join(mismatches))
        return EXIT_USAGE
    jobs = _apply_family(jobs, checkpoints, registry, warn)

    if runner_factory is None:
        if importlib.util.find_spec("core.pipeline") is None:
            error("the generation pipeline (core/pipeline.py) is not part of this installation")
            return EXIT_JOB_FAILED
        runner_factory = pipeline_runner_factory(registry, dirs, attention_mode, memory_mode, compile_mode,
                                                 precision_mode)

    from core.store import JobStore, StoreError
    from core.worker import Worker

    try:
        store = JobStore(Path(db_path).expanduser() if db_path else None)
    except DarkroomError as exc:
        error(str(exc))
        return EXIT_DATABASE if isinstance(exc, StoreError) else EXIT_USAGE
    queue_name = f"batch-{os.getpid()}-{int(time.time())}"
    worker = Worker(
        store,
        runner_factory,
        output_dir=out_dir,
        queue=queue_name,
        private_queue=True,
    )
    events: queue_mod.Queue = queue_mod.Queue()
    worker.subscribe(events.put)
    number: dict[int, int] = {}  # job id -> index in the file
    use_rich = rich_progress if rich_progress is not None else _live_bars_fit(out, err)
    progress: _PlainProgress = (_RichProgress if use_rich else _PlainProgress)(err, len(jobs), label)
    stdout_ok = True
    # The paths are the output (raw, for pipes); on a terminal they are shown like any other name.
    out_is_terminal = hasattr(out, "isatty") and out.isatty()
    # Rich's live bars redraw over lines written beside them: on their terminal a path goes above them (as
    # Rich's own stdout redirect does); paths printed straight to it vanished under the next redraw.
    above_bars = out_is_terminal and isinstance(progress, _RichProgress) and _same_terminal(out, err)

    def emit_paths(paths: Sequence[str]) -> None:
        nonlocal stdout_ok
        for path in paths:
            if stdout_ok:
                try:
                    if above_bars:
                        progress.print_path(visible(path))
                    else:
                        print(visible(path) if out_is_terminal else path, file=out, flush=True)
                except OSError:  # BrokenPipeError (`| head`), EIO (the terminal closed): go on, stop printing
                    stdout_ok = False

    printed: dict[int, set[str]] = {}  # job id -> the paths printed as its ImageSaved events came

    def image_saved(event: ImageSaved) -> None:
        # printed as soon as it is saved: a script reading stdout, or a run killed later in a long job, has it
        # without waiting for the job's end
        if event.path not in printed.setdefault(event.job_id, set()):
            printed[event.job_id].add(event.path)
            emit_paths([event.path])

    def saved_while_stopping() -> None:
        """The paths of the ImageSaved events still queued when the run stops early (Ctrl-C, the database):
        the images a job kept as it stopped are printed all the same."""
        while True:
            try:
                event = events.get_nowait()
            except queue_mod.Empty:
                return
            if isinstance(event, ImageSaved) and event.job_id in number:
                image_saved(event)

    failed: set[int] = set()
    paths_of: dict[int, list[str]] = {}  # job index -> its saved images, once it finished (for grids)
    grid_seeds: dict[str, int] = {}  # grid id -> the seed its cells share
    skipped: set[int] = set()  # jobs done in an earlier run (--resume)
    resumed: dict[int, int] = {}  # job id -> the images of it an earlier run saved (--resume)
    try:
        enhancer = None
        if enhance or any(job.enhance for job in jobs):
            from core.enhance import EnhanceSettings

            enhancer = enhance_settings or EnhanceSettings.from_env()
        queued = _queue_jobs(worker, jobs, jobs_source, resume, number, failed, progress, enhancer, enhance,
                             grid_seeds, resumed)
        for job, skipped_paths in queued:
            if skipped_paths is not None:
                progress.skipped(job.index, len(skipped_paths))
                skipped.add(job.index)
                emit_paths(skipped_paths)
                paths_of[job.index] = list(skipped_paths)
    except StoreError as exc:
        progress.close()
        error(str(exc))
        store.close()
        return EXIT_DATABASE

    remaining = set(number) - failed
    last_check = time.monotonic()
    model_failed = False
    database_error: str | None = None
    try:
        # inside: a signal whose handler runs while start() returns (the job may already be in its first step)
        # stops the run like one that comes later
        worker.start()
        while remaining:
            try:
                event = events.get(timeout=0.2)
            except queue_mod.Empty:
                if time.monotonic() - last_check >= 1.0:
                    last_check = time.monotonic()
                    # A job cancelled from another process (the TUI's queue screen) before it started
                    # never reaches this worker, so no event will come for it.
                    try:
                        for job_id in list(remaining):
                            job = store.get_job(job_id)
                            if job is not None and job.state == "cancelled" and job.started is None:
                                remaining.discard(job_id)
                                failed.add(job_id)
                                progress.failed(number[job_id], "cancelled from another window")
                    except StoreError as exc:
                        database_error = str(exc)
                        break
                continue
            if isinstance(event, WorkerStopped):  # the database failed: nothing more can run or be recorded
                database_error = event.error
                break
            n = number.get(event.job_id) if event.job_id is not None else None
            if n is None:
                continue
            if isinstance(event, Status):
                progress.activity(n, event.activity)
            elif isinstance(event, JobStarted):
                progress.started(n, event.request, resumed.get(event.job_id, 0))
            elif isinstance(event, JobStep):
                progress.step(n, event.step, event.total)
            elif isinstance(event, JobWarning):
                if event.text not in announced.get(n, ()):
                    progress.warning(n, event.text)
            elif isinstance(event, ImageSaved):
                image_saved(event)
            elif isinstance(event, JobFinished):
                remaining.discard(event.job_id)
                progress.finished(n, len(event.paths), event.elapsed)
                # each came with its ImageSaved; one that did not is printed now, so none is lost or doubled
                emit_paths([path for path in event.paths if path not in printed.get(event.job_id, ())])
                paths_of[n] = list(event.paths)
            elif isinstance(event, JobFailed):
                remaining.discard(event.job_id)
                failed.add(event.job_id)
                exc = worker.failure(event.job_id)
                if isinstance(exc, (CheckpointError, ModelNotFoundError)):
                    model_failed = True
                progress.failed(n, event.error)
            elif isinstance(event, JobCancelled):
                remaining.discard(event.job_id)
                failed.add(event.job_id)
                progress.failed(n, "cancelled")
    except KeyboardInterrupt as interrupt:
        hangup = interrupt if isinstance(interrupt, Hangup) else None
        if hangup is not None and hangup.signum == getattr(signal, "SIGHUP", None):
            # A closed terminal is said twice (the kernel, then the shell passing it to its jobs): the second
            # SIGHUP is the same news, not a "quit now" that would skip waiting for the step.
            _ignore_signals("SIGHUP")
        current = worker.current_job_id
        code = hangup.exit_code if hangup is not None else EXIT_INTERRUPTED

        def report() -> None:
            # Nobody else runs this run's queue: what did not start is interrupted, like the current job, and
            # every one of them can be retried from the TUI (which runs it in its own queue).
            try:
                not_started = store.interrupt_pending(queue_name, "not started: the batch run was interrupted")
            except StoreError as exc:  # the next start's recovery marks them
                error(str(exc))
                return
            where = ""
            if current in number:
                # its saved images are on stdout already; say so, or "interrupted" reads as all of it lost
                job = next((j for j in jobs if j.index == number[current]), None)
                total = job.request.batch_size * job.request.batch_count if job is not None else 0
                kept = len(printed.get(current, ()))
                note = f" ({kept} of its {total} images kept; --resume makes the rest)" if kept and total > 1 else ""
                where = f"job {number[current]} marked interrupted{note}; "
            tell(
                f"darkroom: {where}{not_started} job(s) not started, marked interrupted; the same command with "
                f"--resume runs just those, or retry them from the Queue screen of darkroom (F4, r) with the "
                f"database {visible(store.path)}"
            )

        def tell(text: str) -> None:
            # After SIGHUP the terminal is gone and writing to it fails (EIO): the stop goes on all the same.
            with contextlib.suppress(OSError):
                print(text, file=err, flush=True)

        try:  # everything up to the end of the stop: a second Ctrl-C may come at any point
            with contextlib.suppress(OSError):
                progress.close()
            tell(f"darkroom: {hangup}; stopping the current job..." if hangup is not None else
                 "darkroom: interrupted; stopping the current job (Ctrl-C again to quit now)...")
            worker.stop(finish_current=False, timeout=STOP_TIMEOUT)
            stuck = worker.running  # a step that outlasted the timeout
        except KeyboardInterrupt:  # a second Ctrl-C (or SIGTERM): do not wait for the step to end
            # and nothing may stop what follows: os._exit is the one safe way out while the worker is in a step
            # (a SIGTERM raised in report() left the interpreter to exit under it, the job left 'running')
            _ignore_signals("SIGINT", "SIGHUP", "SIGTERM")
            stuck = True
        saved_while_stopping()
        if stuck:
            # Record the job now and leave at once: a normal interpreter exit while the worker thread is inside
            # torch aborts the process ("terminate called without an active exception", exit -6) and would
            # leave the job marked running.
            if current is not None:
                store.mark_interrupted(current)
            report()
            with contextlib.suppress(Exception):
                out.flush()
            os._exit(code)
        report()
        store.close()
        return code
    if database_error is not None:
        progress.close()
        error(database_error)
        worker.stop(finish_current=False, timeout=STOP_TIMEOUT)
        saved_while_stopping()
        print(
            f"darkroom: {len(remaining)} of {len(jobs)} job(s) not finished; once the database works again, the "
            "same command with --resume runs just those",
            file=err,
            flush=True,
        )
        if worker.running:  # a step that outlasted the timeout: leave now (see the Ctrl-C case above)
            with contextlib.suppress(Exception):
                out.flush()
            os._exit(EXIT_DATABASE)
        store.close()
        return EXIT_DATABASE
    progress.close()
    worker.stop(finish_current=True, timeout=30)
    store.close()
    for problem_or_path in _save_grids(jobs, paths_of, worker.output_dir, worker.store, grid_seeds,
                                       frozenset(skipped)):
        if problem_or_path.startswith("darkroom: "):
            print(visible(problem_or_path), file=err, flush=True)
        else:
            emit_paths([problem_or_path])
    done = len(jobs) - len(failed)
    print(f"darkroom: {done} of {len(jobs)} job(s) succeeded", file=err, flush=True)
    if model_failed:
        return EXIT_MODEL
    return EXIT_JOB_FAILED if failed else EXIT_OK
