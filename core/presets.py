"""Presets: named TOML tables of partial request fields.

A preset file holds ``name``, ``description``, a ``family`` (one of ``preset_families()``: sd15, sdxl, flux;
required in built-ins, optional in user presets, where none means "fits every model") and any
``GenerationRequest`` fields (``hires`` and ``extra`` as tables)::

    name = "sd15-balanced"
    description = "DPM++ 2M Karras, 25 steps"
    family = "sd15"
    sampler = "dpmpp_2m"
    schedule = "karras"
    steps = 25

Built-ins ship in the ``presets`` package (read-only), each listed by its family's module (``presets``);
user presets live in ``config_dir()/presets``.
Applying a preset layers request defaults < preset < the job's own fields.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

from core import paths
from core.errors import PresetError, RequestError
from core.request import GenerationRequest, HiresFix, suggest

META_KEYS = ("name", "description", "family")


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    fields: dict[str, Any]
    source: Path | None = None
    builtin: bool = False
    family: str | None = None


# ---- validation ---------------------------------------------------------------------------------------------

_REQUEST_TYPES = typing.get_type_hints(GenerationRequest)
_HIRES_TYPES = typing.get_type_hints(HiresFix)


def _type_problem(key: str, value: Any, hint: Any) -> str | None:
    """Check ``value`` (as TOML gives it) against a dataclass field type; return the complaint or None."""
    args = typing.get_args(hint)
    if type(None) in args:  # "X | None": TOML has no null, so the value must be an X
        hint = next(a for a in args if a is not type(None))
    if hint is int:
        ok, wanted = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif hint is float:
        ok, wanted = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif hint is str:
        ok, wanted = isinstance(value, str), "a string"
    elif hint is bool:
        ok, wanted = isinstance(value, bool), "true or false"
    elif key == "loras":  # the request checks each entry (name, weight, te_weight)
        ok, wanted = isinstance(value, (list, tuple)) and all(isinstance(v, Mapping) for v in value), (
            "a list of tables with name, weight and optionally te_weight")
    elif key == "detailer":  # the request checks each entry (core.detailer_args)
        ok, wanted = isinstance(value, (list, tuple)) and all(isinstance(v, Mapping) for v in value), (
            "a list of tables (the detail passes: model, denoise, ...)")
    elif hint is HiresFix:
        ok, wanted = isinstance(value, Mapping), "a table (scale, upscaler, steps, denoise)"
    else:  # Mapping[str, Any]
        ok, wanted = isinstance(value, Mapping), "a table"
    return None if ok else f"key {key!r} must be {wanted}, got {value!r}"


def validate_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Check preset fields against ``GenerationRequest`` (types, then ranges); return them normalised.

    Raises ``PresetError`` with a message like ``key 'steps' must be an integer, got 'abc'``.
    """
    if not isinstance(fields, Mapping):
        raise PresetError(f"a preset must be a table of request fields, got {fields!r}")
    out: dict[str, Any] = {}
    for key, value in fields.items():
        if key not in _REQUEST_TYPES:
            known = ", ".join(sorted(_REQUEST_TYPES))
            guess = suggest(key, [*_REQUEST_TYPES, "name", "description", "family"])
            hint = f"did you mean {guess!r}? " if guess else ""
            raise PresetError(f"unknown key {key!r} ({hint}valid keys: name, description, family, {known})")
        problem = _type_problem(key, value, _REQUEST_TYPES[key])
        if problem:
            raise PresetError(problem)
        if key == "hires":
            value = dict(value)
            for sub, sub_value in value.items():
                if sub not in _HIRES_TYPES:
                    raise PresetError(f"unknown key 'hires.{sub}' (valid: {', '.join(_HIRES_TYPES)})")
                problem = _type_problem(f"hires.{sub}", sub_value, _HIRES_TYPES[sub])
                if problem:
                    raise PresetError(problem)
                if _HIRES_TYPES[sub] is float:
                    value[sub] = float(sub_value)
        elif key == "extra":
            value = dict(value)
        elif key in ("loras", "detailer"):
            value = [dict(v) for v in value]
        elif _REQUEST_TYPES[key] is float:
            value = float(value)
        out[key] = value
    # Ranges and choices: let the request type judge, with a stand-in model when the preset has none.
    try:
        GenerationRequest.from_dict({"model": "preset-check", **out})
    except RequestError as err:
        raise PresetError(f"key {err.field!r} = {err.value!r} is invalid: {err.valid}") from None
    return out


def preset_families() -> tuple[str, ...]:
    """The families a preset may declare (each family module says whether it takes presets)."""
    from core.models.families import FAMILIES

    return tuple(name for name, f in FAMILIES.items() if f.takes_presets)


def _parse_preset(data: Mapping[str, Any], source: Path | None, builtin: bool) -> Preset:
    data = dict(data)
    stem = source.stem if source else ""
    name = data.pop("name", stem)
    description = data.pop("description", "")
    family = data.pop("family", None)
    if not isinstance(name, str) or not name.strip():
        raise PresetError(f"key 'name' must be a non-empty string, got {name!r}")
    if not isinstance(description, str):
        raise PresetError(f"key 'description' must be a string, got {description!r}")
    families = preset_families()
    if family is not None and family not in families:
        raise PresetError(f"key 'family' must be one of {', '.join(families)}, got {family!r}")
    if family is None and builtin:
        raise PresetError(f"key 'family' is required in a built-in preset (one of {', '.join(families)})")
    return Preset(name.strip(), description, validate_fields(data), source, builtin, family)


def fits(preset: Preset, family: str | None) -> bool:
    """Whether ``preset`` suits a model of ``family`` (a preset without a family fits every model; an unknown
    model family, None, is not judged)."""
    return preset.family is None or family is None or preset.family == family


def family_label(family: str | None) -> str:
    from core.models.families import FAMILIES

    spec = FAMILIES.get(family or "")
    return spec.label if spec is not None else str(family)


def family_mismatch(preset: Preset, family: str | None, presets: list[Preset] | None = None) -> str | None:
    """Why ``preset`` does not suit a model of ``family``, naming the presets that do; None when it fits."""
    if fits(preset, family):
        return None
    if presets is None:
        presets, _ = load_presets()
    fitting = [p.name for p in presets if p.family == family]
    label = family_label(family)
    valid = f"presets for {label}: {', '.join(fitting)}" if fitting else f"there are no {label} presets yet"
    return f"preset {preset.name!r} is for {family_label(preset.family)} models, and this model is {label} ({valid})"


# ---- loading ------------------------------------------------------------------------------------------------


def user_presets_dir() -> Path:
    return paths.config_dir() / "presets"


def _builtin_files() -> list[tuple[str, Any]]:
    root = files("presets")
    entries = [(entry.name, entry) for entry in root.iterdir() if entry.name.endswith(".toml")]
    return sorted(entries, key=lambda item: item[0])


def _load_one(label: str, text: str, source: Path | None, builtin: bool) -> Preset:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PresetError(f"{label}: not valid TOML ({exc})") from None
    try:
        return _parse_preset(data, source, builtin)
    except PresetError as err:
        raise PresetError(f"{label}: {err}") from None


def load_presets() -> tuple[list[Preset], list[str]]:
    """All presets (built-ins first, then user presets, each sorted by file name) and the problems found.

    A bad file is reported as ``"<file>: <problem>"`` and skipped; the others still load. A user preset may not
    reuse a built-in's name or another user preset's name.
    """
    presets: list[Preset] = []
    problems: list[str] = []
    seen: dict[str, Preset] = {}
    for file_name, entry in _builtin_files():
        source = Path(str(entry))
        try:
            preset = _load_one(file_name, entry.read_text(encoding="utf-8"), source, True)
        except PresetError as err:
            problems.append(str(err))
            continue
        seen[preset.name] = preset
        presets.append(preset)
    folder = user_presets_dir()
    for path in sorted(folder.glob("*.toml")) if folder.is_dir() else []:
        try:
            preset = _load_one(str(path), path.read_text(encoding="utf-8"), path, False)
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"{path}: cannot read ({exc})")
            continue
        except PresetError as err:
            problems.append(str(err))
            continue
        if preset.name in seen:
            other = seen[preset.name]
            problems.append(
                f"{path}: name {preset.name!r} is already used by "
                + ("a built-in preset" if other.builtin else str(other.source))
            )
            continue
        seen[preset.name] = preset
        presets.append(preset)
    return presets, problems


def _broken_user_preset(name: str) -> str | None:
    """The problem with the user preset file meant by ``name`` (file stem or ``name`` key) if it fails to load.

    Without this, a preset with one bad key would be reported as missing ("no preset named ...").
    """
    folder = user_presets_dir()
    for path in sorted(folder.glob("*.toml")) if folder.is_dir() else []:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            if path.stem == name:
                return f"{path}: cannot read ({exc})"
            continue
        try:
            raw = tomllib.loads(text).get("name")
        except tomllib.TOMLDecodeError:
            raw = None
        if path.stem != name and raw != name:
            continue
        try:
            _load_one(str(path), text, path, False)
        except PresetError as err:
            return str(err)
    return None


def find_preset(name: str, presets: list[Preset] | None = None) -> Preset:
    """A preset by name (or by file name without ``.toml``); unknown names list close matches."""
    if presets is None:
        presets, _ = load_presets()
    for preset in presets:
        if preset.name == name:
            return preset
    for preset in presets:
        if preset.source is not None and preset.source.stem == name:
            return preset
    broken = _broken_user_preset(name)
    if broken is not None:
        raise PresetError(f"preset {name!r} cannot be used: {broken}")
    names = [p.name for p in presets]
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"available: {', '.join(names) or 'none'}"
    raise PresetError(f"no preset named {name!r}; {hint}")


# ---- applying -----------------------------------------------------------------------------------------------


def _request_defaults() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(GenerationRequest):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _as_table(value: Any) -> Any:
    if isinstance(value, HiresFix):
        return dataclasses.asdict(value)
    return dict(value) if isinstance(value, Mapping) else value


def apply_preset(preset_or_name: Preset | str, job: Mapping[str, Any]) -> dict[str, Any]:
    """Request fields for ``job`` with the preset applied: request defaults < preset < job.

    ``hires`` and ``extra`` tables are merged key by key (a job may change just ``hires.denoise``); a job's
    ``hires = None`` turns hires-fix off; a job's ``loras`` are added to the preset's. A ``preset`` key in the job is dropped. The result feeds
    ``GenerationRequest.from_dict``.
    """
    preset = find_preset(preset_or_name) if isinstance(preset_or_name, str) else preset_or_name
    merged = _request_defaults()
    for layer in (preset.fields, job):
        for key, value in layer.items():
            if key == "preset":
                continue
            value = _as_table(value)
            old = merged.get(key)
            if key in ("hires", "extra") and isinstance(value, dict) and isinstance(old, dict):
                merged[key] = {**old, **value}
            elif key == "loras" and old and value is not None:
                # a job's LoRAs join the preset's (an LCM-LoRA preset keeps its LoRA); the same name: the job's
                named = {_lora_name(v) for v in value}
                merged[key] = [v for v in old if _lora_name(v) not in named] + list(value)
            else:
                merged[key] = value
    if isinstance(merged.get("hires"), dict):
        merged["hires"] = {**dataclasses.asdict(HiresFix()), **merged["hires"]}
    return merged


def _lora_name(entry: Any) -> Any:
    return entry.get("name") if isinstance(entry, Mapping) else getattr(entry, "name", entry)


# ---- user presets -------------------------------------------------------------------------------------------

_UNSAFE = re.compile(r"[^a-z0-9._-]+")


def _file_stem(name: str) -> str:
    stem = _UNSAFE.sub("-", name.strip().lower()).strip(".-_")[:64]
    return stem or "preset"


def _user_presets() -> list[Preset]:
    return [p for p in load_presets()[0] if not p.builtin]


def _check_writable(name: str, presets: list[Preset]) -> Preset | None:
    for preset in presets:
        if preset.name == name:
            if preset.builtin:
                raise PresetError(f"preset {name!r} is built-in and read-only; save a copy under another name")
            return preset
    return None


def save_user_preset(
    name: str, fields: Mapping[str, Any], *, description: str = "", family: str | None = None
) -> Path:
    """Write (or overwrite) the user preset ``name``; return its file. ``fields`` are request fields and may
    also carry ``description`` and ``family``."""
    fields = dict(fields)
    fields.pop("name", None)
    description = fields.pop("description", description)
    family = fields.pop("family", family)
    if not isinstance(name, str) or not name.strip():
        raise PresetError(f"a preset name must be a non-empty string, got {name!r}")
    name = name.strip()
    preset = _parse_preset({"name": name, "description": description, "family": family, **fields}, None, False)
    existing = _check_writable(name, load_presets()[0])
    if existing is not None and existing.source is not None:
        path = existing.source
    else:
        path = _free_path(name)
    _write(path, preset)
    return path


def _free_path(name: str, reuse: Path | None = None) -> Path:
    """``<safe name>.toml`` in the user folder, numbered when another preset's file already has that name."""
    folder = user_presets_dir()
    folder.mkdir(parents=True, exist_ok=True)
    stem, n = _file_stem(name), 1
    path = folder / f"{stem}.toml"
    while path.exists() and path != reuse:
        n += 1
        path = folder / f"{stem}-{n}.toml"
    return path


def _write(path: Path, preset: Preset) -> None:
    import tomli_w

    data: dict[str, Any] = {"name": preset.name, "description": preset.description}
    if preset.family:
        data["family"] = preset.family
    data.update(preset.fields)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(tomli_w.dumps(data), encoding="utf-8")
    tmp.replace(path)


def _find_user(name: str) -> Preset:
    presets = load_presets()[0]
    preset = _check_writable(name, presets)
    if preset is None:
        find_preset(name, [p for p in presets if not p.builtin])  # raises with close matches
        raise PresetError(f"no user preset named {name!r}")  # pragma: no cover - find_preset raised
    return preset


def rename_user_preset(old: str, new: str) -> Path:
    """Rename a user preset (its file follows the new name); return the new file."""
    preset = _find_user(old)
    if not isinstance(new, str) or not new.strip():
        raise PresetError(f"a preset name must be a non-empty string, got {new!r}")
    new = new.strip()
    if new != old and any(p.name == new for p in load_presets()[0]):
        raise PresetError(f"cannot rename {old!r} to {new!r}: a preset with that name exists")
    assert preset.source is not None
    renamed = Preset(new, preset.description, preset.fields, None, False, preset.family)
    path = _free_path(new, reuse=preset.source)
    _write(path, renamed)  # write the new file before removing the old one
    if path != preset.source:
        preset.source.unlink()
    return path


def delete_user_preset(name: str) -> None:
    preset = _find_user(name)
    assert preset.source is not None
    preset.source.unlink()
