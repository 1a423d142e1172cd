"""``darkroom --list-models``: every checkpoint (and diffusion model) in the models folders with its family,
variant, quantisation (bf16, fp16, fp8, Q8_0, Q4_K, ...) and size, then the text encoders and VAEs found beside
them, each with the kind its keys show, then the upscaler models and the detail pass's YOLO detectors.

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
HEADER = ("name", "family", "variant", "quant", "size", "note")
PART_HEADER = ("part", "kind", "quant", "size", "note")


def model_rows(registry: object) -> list[tuple[str, ...]]:
    """One row per checkpoint: name, family label, variant, quantisation, size, note (why it was not inspected,
    or that the file is a diffusion model alone, whose text encoders and VAE are separate files)."""
    from core.models.families import FAMILIES
    from core.models.registry import human_size, short_dtype

    rows = []
    listed = registry.checkpoints()  # type: ignore[attr-defined]
    used = {m.name: m.path for m in listed}
    hidden = [m for m in getattr(registry, "shadowed", lambda: [])() if m.name in used]
    for model in sorted([*listed, *hidden], key=lambda m: (m.name.lower(), m.name, m not in listed)):
        info = registry.inspect(model)  # type: ignore[attr-defined]
        if info.family in FAMILIES:
            spec = FAMILIES[info.family]
            family, note = spec.label, "" if spec.runnable else "recognised; generating with it is not supported yet"
            if info.split:
                note = "; ".join(n for n in ("diffusion model only (text encoders and VAE are separate files)", note) if n)
        elif info.family is not None:
            family, note = "-", f"{info.label}, not a checkpoint"
        else:
            family, note = "?", f"{info.label}: {info.problem}"
        if model not in listed:  # the name finds another file: say which, and how to reach this one
            note = (f"not used by the name {model.name!r}, which is {used[model.name]}; give this file's path to use "
                    f"it: {model.path}")
        variant = info.variant if info.family in FAMILIES else None
        rows.append((visible(model.name), family, variant or "-", info.quant or short_dtype(info.dtype),
                     human_size(model.size), visible(note)))
    # a dangling or looping link, a FIFO: not listed by the registry, but the user put it there and asks why
    unusable = getattr(registry, "unusable", lambda: [])()
    rows.extend((visible(name), "?", "-", "-", "-", visible(f"unusable: {problem}")) for name, _, problem in unusable)
    return sorted(rows, key=lambda row: row[0].lower())


def part_rows(registry: object) -> list[tuple[str, ...]]:
    """One row per text encoder and VAE file: name (``text_encoders/t5xxl_fp16``), the kind its keys show,
    quantisation, size, note."""
    from core.models.registry import human_size

    rows = []
    for folder, files in (("text_encoders", registry.text_encoders()), ("vae", registry.vaes())):  # type: ignore[attr-defined]
        for model in files:
            info = registry.inspect(model)  # type: ignore[attr-defined]
            kind = info.label if info.part else "-"
            note = "" if info.part else f"{info.label}: {info.problem}" if info.problem else f"{info.label}, not a known part"
            rows.append((visible(f"{folder}/{model.name}"), visible(kind), info.quant or "-", human_size(model.size),
                         visible(note)))
    rows.extend(detector_rows(registry))
    return rows


UPSCALER_HEADER = ("upscaler", "format", "size", "note")


def upscaler_rows(registry: object) -> list[tuple[str, ...]]:
    """One row per upscaler model file (``upscale_models``, ``ESRGAN``, ``RealESRGAN``): name, file format, size,
    and what to install when spandrel, which runs them, is not there. Its architecture shows when it loads (spandrel
    reads it off the weights, which needs torch)."""
    import importlib.util

    from core.models.registry import human_size
    from core.upscale import INSTALL_HINT

    missing = importlib.util.find_spec("spandrel") is None
    note = f"needs spandrel: {INSTALL_HINT}" if missing else ""
    return [(visible(m.name), m.path.suffix.lower().lstrip("."), human_size(m.size), note)
            for m in registry.upscalers()]  # type: ignore[attr-defined]


def detector_rows(registry: object) -> list[tuple[str, ...]]:
    """One row per YOLO detection model of the detail pass (``models/adetailer``, ``models/ultralytics``): a
    pickle only ultralytics opens, so nothing is read from it here; the note says when ultralytics is missing."""
    from core.detectors import INSTALL_ULTRALYTICS, _installed
    from core.models.registry import human_size

    files = registry.detectors() if hasattr(registry, "detectors") else []  # type: ignore[attr-defined]
    note = "" if not files or _installed("ultralytics") else f"needs ultralytics: {INSTALL_ULTRALYTICS}"
    return [(visible(f"detectors/{m.name}"), "YOLO detector", "-", human_size(m.size), note) for m in files]


def _table(rows: list[tuple[str, ...]], out: IO[str]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[-1]]).rstrip(), file=out)


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
    _table([HEADER, *rows], out)
    parts = part_rows(registry)
    if parts:
        print(file=out)
        _table([PART_HEADER, *parts], out)
    upscalers = upscaler_rows(registry)
    if upscalers:
        print(file=out)
        _table([UPSCALER_HEADER, *upscalers], out)
    return EXIT_OK
