"""Which widget draws pictures (ours for half-cells, textual-image's for kitty, sixel and Unicode blocks),
chosen once before the app runs.

Asking the terminal what it can draw must happen before ``App.run()`` (afterwards Textual's input thread
swallows the replies), so ``run_app`` calls :func:`prepare_image_protocol` first and the widgets only ever use
the resolved class.
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import DarkroomError

if TYPE_CHECKING:
    from PIL import Image as PILImage

    from tui.terminal_graphics import GraphicsSupport

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


def image_class(protocol: str, probe: Callable[[], GraphicsSupport | None] | None = None) -> type:
    """The widget class for a protocol. Half-cells are drawn by our cached ``HalfBlockImage`` (textual-image's
    own half-cell renderable rebuilds every cell on each render and stalls the UI at preview rates).

    ``auto`` asks the terminal (``probe``, by default :func:`tui.terminal_graphics.probe_terminal`): sixel, then
    the kitty protocol, else half-cells. textual-image is imported only when one of its protocols is used: its
    import probes the terminal again (quickly, since a terminal with graphics answers at once)."""
    from tui.widgets.halfblock import HalfBlockImage

    if protocol == "halfcell":
        return HalfBlockImage
    if protocol == "auto":
        if sys.platform == "win32":
            return _textual_image_auto_class(HalfBlockImage)  # our probe is POSIX-only: textual-image's choice
        from tui.terminal_graphics import probe_terminal

        support = (probe or probe_terminal)()
        if support is None or not (support.sixel or support.tgp):
            return HalfBlockImage
        # The same order as textual-image: Konsole and WezTerm answer the kitty query but draw only sixel right.
        protocol = "sixel" if support.sixel else "tgp"
    tiw = _import_textual_image_widgets()
    _remember_cell_size()
    return {"tgp": tiw.TGPImage, "sixel": tiw.SixelImage, "unicode": tiw.UnicodeImage}[protocol]


def _import_textual_image_widgets() -> Any:
    """``textual_image.widget``, imported without textual-image's own protocol probe.

    On import, ``textual_image.renderable`` asks the terminal one question at a time (DA1 for sixel, then a
    kitty query with a 100 ms timeout) to choose its automatic ``Image`` class, which Darkroom never uses: the
    protocol is already known here (forced, or from the one-round-trip probe). That probe only runs when
    ``sys.__stdout__`` is a terminal, so it is hidden for the duration of that import: this saves the 100 ms
    timeout in terminals without kitty graphics (tmux, with a forced protocol) and one or two round trips over
    SSH. Runs before ``App.run()``, while no other thread writes to the terminal. Should a textual-image version
    fail to import that way, it is imported again normally (with its probe)."""
    if "textual_image.renderable" not in sys.modules:
        saved = sys.__stdout__
        sys.__stdout__ = None  # type: ignore[misc]
        try:
            import textual_image.renderable  # noqa: F401
        except Exception:  # noqa: BLE001 - only a speed-up: the plain import below decides
            for name in [n for n in sys.modules if n.startswith("textual_image.renderable")]:
                del sys.modules[name]
        finally:
            sys.__stdout__ = saved  # type: ignore[misc]
    import textual_image.widget as tiw

    return tiw


def _textual_image_auto_class(half_cells: type) -> type:
    import textual_image.widget as tiw
    from textual_image.renderable import HalfcellImage as HalfcellRenderable
    from textual_image.renderable import Image as AutoRenderable

    return half_cells if AutoRenderable is HalfcellRenderable else tiw.Image


def _remember_cell_size() -> None:
    """textual-image asks the terminal for its cell size in pixels on the first draw, which cannot work once
    Textual reads stdin: ask now (it caches the answer). Private API, hence the broad guard."""
    try:
        from textual_image._terminal import get_cell_size

        get_cell_size()
    except Exception:  # noqa: BLE001 - it falls back to a default cell size by itself
        pass


def prepare_image_protocol(requested: str | None = None) -> type:
    """Probe the terminal now (call before ``App.run()``) and remember the widget class for the app."""
    global _chosen
    _chosen = image_class(resolve_protocol(requested))
    return _chosen


def chosen_image_class() -> type:
    """The class picked by :func:`prepare_image_protocol`, or half-cell if nothing was prepared."""
    return _chosen or image_class("halfcell")


# What the status line calls each widget's way of drawing (--image-protocol names them tgp, sixel, ...).
_LABELS = {"HalfBlockImage": "half-blocks", "TGPImage": "kitty graphics", "UnicodeImage": "block characters"}


def protocol_label(cls: type | None) -> str:
    """How previews are drawn, in words, for the status line; "" for no class or one not known here."""
    if cls is None:
        return ""
    if cls.__module__.endswith(".sixel"):  # textual-image names its sixel widget plain "Image"
        return "sixel"
    return _LABELS.get(cls.__name__, "")


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
