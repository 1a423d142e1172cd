"""X/Y/Z grids (A1111's "X/Y/Z plot"): one job varied over up to three fields, every combination an ordinary
job, and a labelled grid image of the results.

An axis is ``{field, values}`` with ``field`` one of ``FIELDS``. ``prompt_sr`` is A1111's "Prompt S/R": the
first value is searched for in the prompt and the negative prompt, and each value replaces it (the first
value's cell is the prompt as written). Cells run z outermost, then y, then x, as A1111 does; each cell is a
``GenerationRequest`` whose ``extra["grid"]`` says which grid and cell it is. ``grid_image`` draws x labels
above the columns, y labels left of the rows, and one block per z value side by side with its label on top.
"""

from __future__ import annotations

import csv
import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from core.errors import RequestError
from core.request import GenerationRequest

# field -> A1111's axis label (what the grid writes before a value; Prompt S/R, sampler and model: value only)
FIELDS = {
    "seed": "Seed",
    "steps": "Steps",
    "cfg": "CFG Scale",
    "sampler": "Sampler",
    "schedule": "Schedule type",
    "model": "Checkpoint name",
    "prompt_sr": "Prompt S/R",
}
AXES = ("x", "y", "z")
_VALUE_ONLY = ("sampler", "model", "prompt_sr")
MAX_CELLS = 1000


_NUMBER = r"[+-]?\d+(?:\.\d*)?"
# A1111's ranges: ``1-5`` (step 1), ``20-40 (+10)`` / ``10-1 (-3)`` (step), ``1-10 [4]`` (that many values)
_RANGE_RE = re.compile(rf"^({_NUMBER})\s*-\s*({_NUMBER})\s*(?:\(\s*([+-]\s*\d+(?:\.\d*)?)\s*\)|\[\s*(\d+)\s*\])?$")
_NUMERIC = {"seed": int, "steps": int, "cfg": float}
_NUMBERS_VALID = "numbers, or ranges as 1-5, 20-40 (+10), 10-1 (-3) or 1-10 [4]"


def _range(item: str, kind: type, where: str) -> list[Any]:
    match = _RANGE_RE.match(item)
    if match is None:
        try:
            return [kind(item)]
        except ValueError:
            raise RequestError(where, item, _NUMBERS_VALID) from None
    start, end = float(match.group(1)), float(match.group(2))
    if kind is int and not (start.is_integer() and end.is_integer()):
        raise RequestError(where, item, "whole numbers: " + _NUMBERS_VALID)
    if match.group(4) is not None:  # [count]: evenly spaced from start to end
        count = int(match.group(4))
        if not 1 <= count <= MAX_CELLS:
            raise RequestError(where, item, f"a count from 1 to {MAX_CELLS} in [ ]")
        values = [start + (end - start) * i / (count - 1) for i in range(count)] if count > 1 else [start]
        return [int(round(v)) if kind is int else round(v, 6) for v in values]
    step = float(match.group(3).replace(" ", "")) if match.group(3) else (1.0 if end >= start else -1.0)
    if step == 0 or (end - start) * step < 0 or (kind is int and not step.is_integer()):
        raise RequestError(where, item, "a step that goes from the first number towards the second")
    count = int((end - start) / step + 1e-9) + 1
    if count > MAX_CELLS:
        raise RequestError(where, item, f"at most {MAX_CELLS} values")
    return [int(start + i * step) if kind is int else round(start + i * step, 6) for i in range(count)]


def parse_values(field: str, text: str, where: str = "grid.x") -> list[Any]:
    """A1111's comma-separated axis values: texts (quoted with " when they hold a comma) for sampler,
    schedule, model and Prompt S/R; numbers or ranges (``1-5``, ``20-40 (+10)``, ``1-10 [4]``) for seed,
    steps and cfg. Empty items are skipped."""
    items = [item.strip() for row in csv.reader([text], skipinitialspace=True) for item in row]
    items = [item for item in items if item]
    if not items:
        raise RequestError(where, text, "one or more values separated by commas")
    kind = _NUMERIC.get(field)
    if kind is None:
        return items
    values: list[Any] = []
    for item in items:
        values.extend(_range(item, kind, where))
        if len(values) > MAX_CELLS:
            raise RequestError(where, text, f"at most {MAX_CELLS} values")
    return values


@dataclass(frozen=True)
class GridAxis:
    field: str
    values: tuple[Any, ...]

    def label(self, value: Any) -> str:
        if self.field in _VALUE_ONLY:
            return str(value)
        return f"{FIELDS[self.field]}: {value}"


def parse_axes(value: Any) -> dict[str, GridAxis]:
    """``{"x": {"field": ..., "values": [...]}, "y": ..., "z": ...}`` (any of them) -> axes by name."""
    if not isinstance(value, Mapping) or not value:
        raise RequestError("grid", value, "a table with x, y and/or z = {field = ..., values = [...]}")
    unknown = sorted(set(value) - set(AXES), key=str)
    if unknown:
        raise RequestError("grid", unknown[0], "an axis name: x, y or z")
    axes = {}
    for name in AXES:
        if name not in value:
            continue
        axis = value[name]
        where = f"grid.{name}"
        if not isinstance(axis, Mapping) or set(axis) != {"field", "values"}:
            raise RequestError(where, axis, "a table {field = ..., values = [...]}")
        field, values = axis["field"], axis["values"]
        if field not in FIELDS:
            raise RequestError(f"{where}.field", field, "one of " + ", ".join(FIELDS))
        if not isinstance(values, list) or not values:
            raise RequestError(f"{where}.values", values, "a non-empty list of values")
        if field == "prompt_sr" and not all(isinstance(v, str) for v in values):
            raise RequestError(f"{where}.values", values, "texts: the first is searched for, each replaces it")
        axes[name] = GridAxis(field, tuple(values))
    fields = [a.field for a in axes.values()]
    if len(set(fields)) != len(fields):
        raise RequestError("grid", value, "a different field on each axis")
    cells = 1
    for axis in axes.values():
        cells *= len(axis.values)
    if cells > MAX_CELLS:
        sizes = " x ".join(f"{len(axis.values)} {name}" for name, axis in axes.items())
        raise RequestError("grid", f"{sizes} = {cells} cells", f"at most {MAX_CELLS} cells")
    return axes


def _apply(request: GenerationRequest, axis: GridAxis, value: Any) -> GenerationRequest:
    if axis.field == "prompt_sr":
        search = axis.values[0]
        if search not in request.prompt and search not in request.negative_prompt:
            raise RequestError("grid Prompt S/R", search, "text found in the prompt or the negative prompt")
        return request.replace(prompt=request.prompt.replace(search, value),
                               negative_prompt=request.negative_prompt.replace(search, value))
    return request.replace(**{axis.field: value})


def expand(request: GenerationRequest, axes: Mapping[str, GridAxis], grid_id: str) -> list[GenerationRequest]:
    """Every cell's request, z outermost then y then x. A value a field cannot take is a ``RequestError``
    naming the axis."""
    named = [(name, axes[name]) for name in ("z", "y", "x") if name in axes]
    cells = []
    for combo in itertools.product(*(range(len(axis.values)) for _, axis in named)):
        cell = request
        position = {}
        for (name, axis), index in zip(named, combo):
            try:
                cell = _apply(cell, axis, axis.values[index])
            except RequestError as exc:
                raise RequestError(f"grid.{name} ({axis.field})", axis.values[index], exc.valid) from None
            except (TypeError, ValueError) as exc:
                raise RequestError(f"grid.{name} ({axis.field})", axis.values[index], str(exc)) from None
            position[name] = index
        cells.append(cell.replace(extra={**cell.extra, "grid": {"id": grid_id, **position}}))
    return cells


def _text_size(draw: ImageDraw.ImageDraw, text: str, font: Any) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def grid_image(
    cells: Mapping[tuple[int, int, int], Image.Image], axes: Mapping[str, GridAxis]
) -> tuple[Image.Image, dict[tuple[int, int, int], tuple[int, int, int, int]]]:
    """The labelled grid of ``cells`` keyed by (x, y, z) value indices (missing axes: index 0), and each
    cell's box in it."""
    from core.text import visible

    counts = [len(axes[name].values) if name in axes else 1 for name in AXES]
    first = next(iter(cells.values()))
    cw, ch = first.size
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad = 6

    def label(name: str, index: int) -> str:
        return visible(axes[name].label(axes[name].values[index])) if name in axes else ""

    line = max(_text_size(probe, "Ag", font)[1], 10) + 2 * pad
    left = max((_text_size(probe, label("y", j), font)[0] for j in range(counts[1])), default=0) + 2 * pad
    left = left if "y" in axes else 0
    top = line if "x" in axes else 0
    ztop = line if "z" in axes else 0
    block_w, block_h = left + counts[0] * cw, ztop + top + counts[1] * ch
    gap = 2 * pad if counts[2] > 1 else 0
    out = Image.new("RGB", (counts[2] * block_w + (counts[2] - 1) * gap, block_h), "white")
    draw = ImageDraw.Draw(out)
    boxes = {}
    for k in range(counts[2]):
        ox = k * (block_w + gap)
        if "z" in axes:
            text = label("z", k)
            draw.text((ox + left + (counts[0] * cw - _text_size(draw, text, font)[0]) // 2, pad), text,
                      fill="black", font=font)
        for i in range(counts[0]):
            if "x" in axes:
                text = label("x", i)
                draw.text((ox + left + i * cw + (cw - _text_size(draw, text, font)[0]) // 2, ztop + pad), text,
                          fill="black", font=font)
        for j in range(counts[1]):
            if "y" in axes:
                draw.text((ox + pad, ztop + top + j * ch + (ch - line) // 2 + pad), label("y", j), fill="black",
                          font=font)
            for i in range(counts[0]):
                box = (ox + left + i * cw, ztop + top + j * ch, ox + left + (i + 1) * cw, ztop + top + (j + 1) * ch)
                boxes[(i, j, k)] = box
                image = cells.get((i, j, k))
                if image is not None:
                    out.paste(image.convert("RGB").resize((cw, ch)), box[:2])
    return out, boxes


def cells_of(paths: Sequence[tuple[dict, str]]) -> dict[tuple[int, int, int], str]:
    """``(grid position, image path)`` pairs -> path by (x, y, z)."""
    return {(pos.get("x", 0), pos.get("y", 0), pos.get("z", 0)): path for pos, path in paths}


def axes_table(axes: Mapping[str, GridAxis]) -> dict[str, dict[str, Any]]:
    """The axes as ``parse_axes`` reads them (what a grid image records)."""
    return {name: {"field": axis.field, "values": list(axis.values)} for name, axis in axes.items()}


def grid_record(request: GenerationRequest, axes: Mapping[str, GridAxis], grid_id: str) -> GenerationRequest:
    """The request a grid image records: its base ``request`` with ``extra["grid"]`` = ``{id, image, axes}``."""
    return request.replace(extra={**request.extra, "grid": {"id": grid_id, "image": True,
                                                            "axes": axes_table(axes)}})


def save_grid(
    cells: Sequence[tuple[dict, str]], axes: Mapping[str, GridAxis], request: GenerationRequest, grid_id: str,
    output_dir: Path | str, store: Any = None,
) -> Path:
    """Draw the grid of ``cells`` (``(grid position, image path)`` pairs) and save it atomically with
    ``core.metadata.save_image`` in ``output_dir``: the PNG carries ``request`` (the grid's base request) with
    ``extra["grid"]`` = ``{id, image: True, axes}`` and A1111's ``Script: X/Y/Z plot, X Type, X Values``
    infotext. ``store``: the image is also recorded in its history (shown as the grid's entry) and the
    store's open grid ``grid_id``, if any, is closed with it."""
    from core.metadata import save_image

    images = {}
    for key, path in cells_of(cells).items():
        with Image.open(path) as opened:
            images[key] = opened.convert("RGB")
    grid, _ = grid_image(images, axes)
    record = grid_record(request, axes, grid_id)
    infotext: dict[str, str] = {"Script": "X/Y/Z plot"}
    for name, axis in axes.items():
        infotext[f"{name.upper()} Type"] = FIELDS[axis.field]
        infotext[f"{name.upper()} Values"] = ", ".join(str(v) for v in axis.values)
    path = save_image(grid, record, record.seed, Path(output_dir), extra=infotext)
    if store is not None:
        store.add_grid_image(grid_id, path, record, record.seed)
    return path
