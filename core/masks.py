"""Mask images, torch-free (the TUI previews a mask on its UI thread; ``core.inpaint`` samples with it).

A mask is white where the image is repainted. A mask with a varying alpha channel is an alpha-only mask (Gradio's
sketch layer, which A1111 reads: opaque strokes repaint); otherwise its grey level counts. Either way it is made
binary as A1111 does (above 128 is 255).
"""

from __future__ import annotations

import warnings as _warnings

from PIL import Image

from core.errors import DarkroomError
from core.image_files import upright, upright_rgb
from core.request import mask_size_note

PREVIEW_TINT = (255, 40, 40)  # the masked area in the preview: the image half-covered in red


class MaskError(DarkroomError):
    """The mask image cannot be used."""


def binary(mask: Image.Image) -> Image.Image:
    """A1111's rounding: above 128 is 255, the rest 0."""
    return mask.convert("L").point(lambda v: 255 if v > 128 else 0)


def load_mask(path: str, init_size: tuple[int, int] | None = None) -> tuple[Image.Image, list[str]]:
    """The mask file as a binary ``L`` image (255 = repaint) and warnings (a size other than the init image's,
    ``init_size``: it is scaled to it)."""
    try:
        with _warnings.catch_warnings():
            _warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                image = upright(opened)  # the way up the init image is used; 16-bit grey scaled, not clipped
    except FileNotFoundError:
        raise MaskError(f"mask {path!r} does not exist") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise MaskError(f"mask {path!r} is too large to decode safely ({exc})") from None
    except OSError as exc:
        raise MaskError(f"mask {path!r} is not a readable image ({exc})") from None
    if image.mode == "P":
        image = image.convert("RGBA")
    alpha = image.getchannel("A") if "A" in image.getbands() else None
    gray = alpha if alpha is not None and alpha.getextrema() != (255, 255) else image.convert("L")
    note = mask_size_note(path, gray.size, init_size) if init_size is not None else None
    return binary(gray), [note] if note else []


def mask_preview(init_path: str, mask_path: str, invert: bool = False, size: int = 512) -> Image.Image:
    """The init image (scaled to at most ``size`` px) with the area to repaint tinted red: what the form shows
    beside the mask field. Raises ``MaskError`` / ``OSError`` for an unreadable file."""
    with Image.open(init_path) as opened:
        opened.draft("RGB", (size, size))
        init = upright_rgb(opened)
    init.thumbnail((size, size))
    mask, _ = load_mask(mask_path)
    mask = binary(mask.resize(init.size, Image.Resampling.BILINEAR))
    if invert:
        mask = mask.point(lambda v: 255 - v)
    tinted = Image.blend(init, Image.new("RGB", init.size, PREVIEW_TINT), 0.5)
    return Image.composite(tinted, init, mask)
