"""``darkroom --list-models``: every checkpoint in the models folders with its family, variant, dtype and size.

Families come from each file's header (``core.models.detect``, torch-free); a file that cannot be inspected
says why in the last column. Never imports Textual or torch.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from core.text import visible

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_MODEL = 3
HEADER = ("name", "family", "variant", "dtype", "size", "note")


def model_rows(registry: object) -> list[tuple[str, ...]]:
    """One row per checkpoint: name, family label, variant, dtype, size, note (why it was not inspected)."""
    from core.models.families import FAMILIES
    from core.models.registry import human_size, short_dtype

    rows = []
    for model in registry.checkpoints():  # type: ignore[attr-defined]
        info = registry.inspect(model)  # type: ignore[attr-defined]
        if info.family in FAMILIES:
            spec = FAMILIES[info.family]
            family, note = spec.label, "" if spec.runnable else "recognised; generating with it is not supported yet"
        elif info.family is not None:
            family, note = "-", f"{info.label}, not a checkpoint"
        else:
            family, note = "?", f"{info.label}: {info.problem}"
        variant = info.variant if info.family in FAMILIES else None
        rows.append((visible(model.name), family, variant or "-", short_dtype(info.dtype),
                     human_size(model.size), visible(note)))
    return rows


def list_models(
    models_dirs: Sequence[Path | str] | None, out: IO[str] | None = None, err: IO[str] | None = None
) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    from core.models.registry import ModelRegistry

    dirs = [Path(d).expanduser() for d in models_dirs] if models_dirs else None
    for folder in dirs or []:
        if not folder.is_dir():
            print(f"darkroom: error: --models-dir {visible(folder)}: "
                  f"{'not a folder' if folder.exists() else 'no such folder'}", file=err)
            return EXIT_USAGE
    registry = ModelRegistry(dirs)
    rows = model_rows(registry)
    if not rows:
        searched = ", ".join(visible(d) for d in registry.kind_search_dirs("checkpoint")) or "(no folders)"
        print(f"darkroom: no checkpoints found in {searched} (pass --models-dir or set DARKROOM_MODELS)", file=err)
        return EXIT_MODEL
    widths = [max(len(row[i]) for row in [HEADER, *rows]) for i in range(len(HEADER) - 1)]
    for row in [HEADER, *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[-1]]).rstrip(), file=out)
    return EXIT_OK
