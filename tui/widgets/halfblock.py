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

from rich.color import Color
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


def _segment(key: bytes) -> Segment:
    segment = _SEGMENTS.get(key)
    if segment is None:
        if len(_SEGMENTS) >= _SEGMENT_LIMIT:
            _SEGMENTS.clear()
        fg = Color.from_rgb(key[0], key[1], key[2])
        bg = Color.from_rgb(key[3], key[4], key[5])
        segment = _SEGMENTS[key] = Segment(UPPER_HALF, Style.from_color(fg, bg))
    return segment


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
        blank = Strip.blank(width)
        if not cells_w or not cells_h:
            self._strips = [blank] * height
            return
        from PIL import Image as PILImage

        image = self._image.resize((cells_w, cells_h * 2), PILImage.Resampling.BILINEAR)
        pixels = image.point(_LEVELS).tobytes()
        row_bytes = cells_w * 3
        pad_left = (width - cells_w) // 2
        pad_right = width - cells_w - pad_left
        top = (height - cells_h) // 2
        self._strips.extend([blank] * top)
        for row in range(cells_h):
            upper = pixels[2 * row * row_bytes:(2 * row + 1) * row_bytes]
            lower = pixels[(2 * row + 1) * row_bytes:(2 * row + 2) * row_bytes]
            segments = [Segment(" " * pad_left)] if pad_left else []
            segments.extend(_segment(upper[x:x + 3] + lower[x:x + 3]) for x in range(0, row_bytes, 3))
            if pad_right:
                segments.append(Segment(" " * pad_right))
            self._strips.append(Strip(segments, width))
        self._strips.extend([blank] * (height - top - cells_h))

    def render_line(self, y: int) -> Strip:
        width, height = self.content_size
        if self._strips_size != (width, height):
            self._build(width, height)
        if 0 <= y < len(self._strips):
            return self._strips[y]
        return Strip.blank(width)
