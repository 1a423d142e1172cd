"""A fast half-block image widget (``▀`` with the upper pixel as foreground, the lower as background).

textual-image's ``HalfcellImage`` rebuilds every cell through its Rich renderable on each render (~70 ms for a
56x28-cell preview here), which stalls the UI thread when previews arrive several times a second. This widget
resizes once per image or size change (PIL, C code), builds the strips with cached colours and serves
``render_line`` from that cache. It keeps the image's aspect ratio (a cell shows one pixel column and two pixel
rows, so half-block pixels are square) and centres it in its content region.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.color import Color, ColorType
from rich.color_triplet import ColorTriplet
from rich.segment import Segment
from rich.style import Style
from textual.strip import Strip
from textual.widget import Widget

if TYPE_CHECKING:  # PIL is imported on the first image: the empty first frame does not need it (~12 ms)
    from PIL import Image as PILImage

UPPER_HALF = "▀"
# Cells are drawn from a shared cache of segments keyed by the (quantised) colour pair. A fresh Style, two
# Colors and a Segment per cell per frame was ~9k objects a frame; Textual's strips cache themselves, so that
# garbage died in full GC collections of ~100 ms. Quantising to 6 bits a channel is invisible at preview size.
_LEVELS = [((v >> 2) * 255 + 31) // 63 for v in range(256)] * 3  # 64 levels, keeping 0 and 255 exact
_SEGMENTS: dict[bytes, Segment] = {}
_SEGMENT_LIMIT = 60_000
# Blank cells carry an empty Style, never None: with NO_COLOR set Textual runs every line through its
# Monochrome filter, which reads each segment's style and failed on a None (the app died drawing a preview).
_PLAIN = Style.null()
# In a 256-colour terminal (tmux without COLORTERM=truecolor, most SSH sessions) Rich converts every true colour
# to the palette on output, ~10 us a colour, and noisy early previews have thousands of distinct colours. Mapping
# the picture onto the xterm palette once, in C (PIL), is cheaper and leaves only 240x240 distinct cells.
_CUBE = (0, 95, 135, 175, 215, 255)
_XTERM_COLOURS = [(r, g, b) for r in _CUBE for g in _CUBE for b in _CUBE] + [(8 + 10 * i,) * 3 for i in range(24)]
_PALETTE_SEGMENTS: dict[bytes, Segment] = {}
_palette_image: Any = None


def _xterm_palette_image() -> Any:
    """A P-mode image holding the 240 fixed xterm colours (16-255; 0-15 follow the user's theme, so unused)."""
    global _palette_image
    if _palette_image is None:
        from PIL import Image as PILImage

        flat = [channel for colour in _XTERM_COLOURS for channel in colour]
        flat += flat[-3:] * (256 - len(_XTERM_COLOURS))  # pad with the last grey: never nearer than itself
        _palette_image = PILImage.new("P", (1, 1))
        _palette_image.putpalette(flat)
    return _palette_image


def _palette_segment(key: bytes) -> Segment:
    """The cell for two palette indices (upper, lower pixel) from :func:`_xterm_palette_image`."""
    segment = _PALETTE_SEGMENTS.get(key)
    if segment is None:
        upper, lower = (_PALETTE_COLOURS[min(index, len(_XTERM_COLOURS) - 1)] for index in key)
        segment = _PALETTE_SEGMENTS[key] = Segment(UPPER_HALF, Style.from_color(upper, lower))
    return segment


def _palette_colour(index: int) -> Color:
    """xterm colour ``16 + index`` carrying its RGB too: Textual converts colours without RGB to true colour
    (through the theme) before output, and Rich would then convert them back to the palette, cell by cell."""
    return Color(f"color({16 + index})", ColorType.EIGHT_BIT, number=16 + index,
                 triplet=ColorTriplet(*_XTERM_COLOURS[index]))


def _segment(key: bytes) -> Segment:
    segment = _SEGMENTS.get(key)
    if segment is None:
        if len(_SEGMENTS) >= _SEGMENT_LIMIT:
            _SEGMENTS.clear()
        segment = _SEGMENTS[key] = Segment(UPPER_HALF, Style.from_color(_true_colour(key[:3]), _true_colour(key[3:])))
    return segment


_PALETTE_COLOURS = [_palette_colour(index) for index in range(len(_XTERM_COLOURS))]
_HEX = [f"{value:02x}" for value in range(256)]


def _true_colour(rgb: bytes) -> Color:
    """``Color.from_rgb`` without its formatting calls (a third of the cost of drawing a noisy preview)."""
    r, g, b = rgb
    return Color(f"#{_HEX[r]}{_HEX[g]}{_HEX[b]}", ColorType.TRUECOLOR, triplet=ColorTriplet(r, g, b))


class HalfBlockImage(Widget):
    DEFAULT_CSS = """
    HalfBlockImage { width: 1fr; height: 1fr; }
    """

    def __init__(
        self,
        image: Any = None,
        *,
        name: str | None = None,
        id: str | None = None,
        classes: str | None = None,
        disabled: bool = False,
    ) -> None:
        super().__init__(name=name, id=id, classes=classes, disabled=disabled)
        self._image: PILImage.Image | None = None
        self._strips: list[Strip] = []
        self._strips_size: tuple[int, int] | None = None
        self.image = image

    @property
    def image(self) -> PILImage.Image | None:
        return self._image

    @image.setter
    def image(self, value: Any) -> None:
        if value is None:
            self._image = None
            self._strips_size = None
            self.refresh()
            return
        from PIL import Image as PILImage

        if isinstance(value, PILImage.Image):
            self._image = value if value.mode == "RGB" else value.convert("RGB")
        else:
            with PILImage.open(Path(value)) as opened:
                self._image = opened.convert("RGB")
        self._strips_size = None
        self.refresh()

    def fitted_size(self, width: int, height: int) -> tuple[int, int]:
        """Largest (cells wide, cells high) showing the whole image at its aspect ratio."""
        if self._image is None or width <= 0 or height <= 0:
            return 0, 0
        image_w, image_h = self._image.size
        cells_w = min(width, max(1, round(2 * height * image_w / image_h)))
        cells_h = min(height, max(1, round(cells_w * image_h / (2 * image_w))))
        return cells_w, cells_h

    def _build(self, width: int, height: int) -> None:
        self._strips_size = (width, height)
        self._strips = []
        cells_w, cells_h = self.fitted_size(width, height)
        blank = Strip.blank(width, _PLAIN)
        if not cells_w or not cells_h:
            self._strips = [blank] * height
            return
        from PIL import Image as PILImage

        image = self._image.resize((cells_w, cells_h * 2), PILImage.Resampling.BILINEAR)
        if self._truecolor():
            pixels, depth, cell = image.point(_LEVELS).tobytes(), 3, _segment
        else:
            indexed = image.quantize(palette=_xterm_palette_image(), dither=PILImage.Dither.NONE)
            pixels, depth, cell = indexed.tobytes(), 1, _palette_segment
        row_bytes = cells_w * depth
        pad_left = (width - cells_w) // 2
        pad_right = width - cells_w - pad_left
        top = (height - cells_h) // 2
        self._strips.extend([blank] * top)
        for row in range(cells_h):
            upper = pixels[2 * row * row_bytes:(2 * row + 1) * row_bytes]
            lower = pixels[(2 * row + 1) * row_bytes:(2 * row + 2) * row_bytes]
            segments = [Segment(" " * pad_left, _PLAIN)] if pad_left else []
            segments.extend(cell(upper[x:x + depth] + lower[x:x + depth]) for x in range(0, row_bytes, depth))
            if pad_right:
                segments.append(Segment(" " * pad_right, _PLAIN))
            self._strips.append(Strip(segments, width))
        self._strips.extend([blank] * (height - top - cells_h))

    def _truecolor(self) -> bool:
        try:
            system = self.app.console.color_system
        except Exception:  # noqa: BLE001 - not mounted in an app (tests building strips directly)
            return True
        return system in ("truecolor", None)

    def render_line(self, y: int) -> Strip:
        width, height = self.content_size
        if self._strips_size != (width, height):
            self._build(width, height)
        if 0 <= y < len(self._strips):
            return self._strips[y]
        return Strip.blank(width, _PLAIN)
