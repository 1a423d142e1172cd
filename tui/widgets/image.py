"""Which textual-image widget draws pictures, chosen once before the app runs.

textual-image picks its protocol when ``textual_image.renderable`` is first imported, by querying the terminal
on stdin/stdout. That must happen before ``App.run()`` (afterwards Textual's input thread swallows the replies),
so ``run_app`` calls :func:`prepare_image_protocol` first and the widgets only ever use the resolved class.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import DarkroomError

if TYPE_CHECKING:
    from PIL import Image as PILImage

PROTOCOLS = ("auto", "tgp", "sixel", "halfcell", "unicode")
ENV_VAR = "DARKROOM_IMAGE_PROTOCOL"

_chosen: type | None = None


class ImageProtocolError(DarkroomError):
    pass


def resolve_protocol(requested: str | None = None) -> str:
    """CLI value first, then ``DARKROOM_IMAGE_PROTOCOL``, then ``auto``."""
    value = (requested or os.environ.get(ENV_VAR) or "auto").strip().lower()
    if value not in PROTOCOLS:
        raise ImageProtocolError(f"image protocol {value!r} is invalid: use one of {', '.join(PROTOCOLS)}")
    return value


def image_class(protocol: str) -> type:
    """The widget class for a protocol. Anything but ``halfcell`` imports textual-image, which probes the
    terminal on first import. Half-cells are drawn by our cached ``HalfBlockImage`` (textual-image's own
    half-cell renderable rebuilds every cell on each render and stalls the UI at preview rates)."""
    from tui.widgets.halfblock import HalfBlockImage

    if protocol == "halfcell":
        return HalfBlockImage
    import textual_image.widget as tiw
    from textual_image.renderable import HalfcellImage as HalfcellRenderable
    from textual_image.renderable import Image as AutoRenderable

    if protocol == "auto":
        return HalfBlockImage if AutoRenderable is HalfcellRenderable else tiw.Image
    return {"tgp": tiw.TGPImage, "sixel": tiw.SixelImage, "unicode": tiw.UnicodeImage}[protocol]


def prepare_image_protocol(requested: str | None = None) -> type:
    """Probe the terminal now (call before ``App.run()``) and remember the widget class for the app."""
    global _chosen
    _chosen = image_class(resolve_protocol(requested))
    return _chosen


def chosen_image_class() -> type:
    """The class picked by :func:`prepare_image_protocol`, or half-cell if nothing was prepared."""
    return _chosen or image_class("halfcell")


def is_textual_image(cls: type) -> bool:
    return cls.__module__.startswith("textual_image")


def make_image(cls: type, image: Any = None, *, on_error: Callable[[Exception], None] | None = None, **kwargs: Any):
    """Build an image widget; ``on_error`` is passed only where textual-image supports it (0.13+)."""
    if on_error is not None and "on_error" in inspect.signature(cls.__init__).parameters:
        kwargs["on_error"] = on_error
    if is_textual_image(cls):
        # textual-image sizes itself from CSS ``auto`` (fit, keep aspect); ours fills its box and letterboxes.
        kwargs["classes"] = (kwargs.get("classes", "") + " textual-image").strip()
    return cls(image, **kwargs)


def load_rgb_thumbnail(path: str | Path, max_side: int) -> PILImage.Image:
    """Read a saved image fully (the file can be closed or replaced afterwards) as RGB, shrunk to fit
    ``max_side``. Runs on a worker thread; raises OSError for a missing or unreadable file."""
    from PIL import Image

    with Image.open(Path(path)) as image:
        image.load()
        rgb = image.convert("RGB")
    rgb.thumbnail((max_side, max_side))
    return rgb
