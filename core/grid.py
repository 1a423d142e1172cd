"""X/Y/Z grids (A1111's "X/Y/Z plot"): one job varied over up to three fields, every combination an ordinary
job, and a labelled grid image of the results.

An axis is ``{field, values}`` with ``field`` one of ``FIELDS``. ``prompt_sr`` is A1111's "Prompt S/R": the
first value is searched for in the prompt and the negative prompt, and each value replaces it (the first
value's cell is the prompt as written). Cells run z outermost, then y, then x, as A1111 does; each cell is a
``GenerationRequest`` whose ``extra["grid"]`` says which grid and cell it is. ``grid_image`` draws x labels
above the columns, y labels left of the rows, and one block per z value side by side with its label on top.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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
        raise RequestError("grid", value, f"at most {MAX_CELLS} cells ({cells} asked for)")
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
