"""Image protocol selection (CLI value > DARKROOM_IMAGE_PROTOCOL > auto) and the half-block widget's geometry."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from PIL import Image

from tui.widgets.halfblock import _LEVELS, HalfBlockImage
from tui.widgets.image import ImageProtocolError, image_class, make_image, resolve_protocol


def test_protocol_precedence_and_validation(monkeypatch):
    monkeypatch.delenv("DARKROOM_IMAGE_PROTOCOL", raising=False)
    assert resolve_protocol(None) == "auto"
    monkeypatch.setenv("DARKROOM_IMAGE_PROTOCOL", "Sixel")
    assert resolve_protocol(None) == "sixel"
    assert resolve_protocol("unicode") == "unicode"  # the CLI flag wins over the environment
    with pytest.raises(ImageProtocolError, match="use one of auto, tgp, sixel, halfcell, unicode"):
        resolve_protocol("kitty")


def test_forced_protocols_map_to_widgets():
    import textual_image.widget as tiw

    assert image_class("halfcell") is HalfBlockImage
    assert image_class("unicode") is tiw.UnicodeImage
    assert image_class("tgp") is tiw.TGPImage
    assert image_class("sixel") is tiw.SixelImage


def test_auto_follows_the_terminal_probe():
    import textual_image.widget as tiw

    from tui.terminal_graphics import GraphicsSupport

    def auto(support):
        return image_class("auto", probe=lambda: support)

    assert auto(GraphicsSupport(answered=True, sixel=True)) is tiw.SixelImage
    assert auto(GraphicsSupport(answered=True, tgp=True)) is tiw.TGPImage
    assert auto(GraphicsSupport(answered=True, sixel=True, tgp=True)) is tiw.SixelImage  # Konsole, WezTerm
    assert auto(GraphicsSupport(answered=True)) is HalfBlockImage  # tmux, plain xterm, most SSH clients
    assert auto(GraphicsSupport(answered=False)) is HalfBlockImage  # no reply in time
    assert auto(None) is HalfBlockImage  # not a terminal
    # Not a terminal here: the default probe declines, so half-cells.
    assert image_class("auto") is HalfBlockImage


def test_on_error_is_passed_only_where_supported():
    calls = []
    widget = make_image(HalfBlockImage, None, on_error=calls.append, id="x")  # no on_error parameter
    assert widget.id == "x"

    class WithOnError(HalfBlockImage):
        def __init__(self, image=None, *, on_error=None, **kwargs):
            super().__init__(image, **kwargs)
            self.on_error = on_error

    assert make_image(WithOnError, None, on_error=calls.append).on_error == calls.append


def test_run_app_rejects_a_bad_protocol(capsys, monkeypatch):
    from tui.app import run_app

    monkeypatch.delenv("DARKROOM_IMAGE_PROTOCOL", raising=False)
    assert run_app(SimpleNamespace(image_protocol="kitty", models_dir=None, output_dir=None, db=None)) == 2
    assert "image protocol 'kitty' is invalid" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("size", "box", "cells"),
    [
        ((64, 64), (56, 28), (56, 28)),  # square image: one cell = 1 px wide, 2 px tall
        ((64, 64), (80, 20), (40, 20)),  # height-bound
        ((128, 64), (40, 30), (40, 10)),  # wide image, width-bound
        ((64, 128), (40, 30), (30, 30)),  # tall image
    ],
)
def test_half_block_fit_keeps_aspect(size, box, cells):
    widget = HalfBlockImage(Image.new("RGB", size))
    assert widget.fitted_size(*box) == cells


def test_cli_image_protocol_option_matches_the_widget_choices():
    from cli.main import build_parser
    from tui.widgets.image import PROTOCOLS

    parser = build_parser()
    assert parser.parse_args(["--image-protocol", "sixel"]).image_protocol == "sixel"
    assert parser.parse_args([]).image_protocol is None  # None: the env var, then auto
    action = next(a for a in parser._actions if a.dest == "image_protocol")
    assert tuple(action.choices) == PROTOCOLS
    with pytest.raises(SystemExit):
        parser.parse_args(["--image-protocol", "kitty"])


def cell_colours(widget: HalfBlockImage, width: int, height: int) -> list[tuple]:
    widget._build(width, height)
    return [(seg.style.color, seg.style.bgcolor) for strip in widget._strips for seg in strip if seg.text == "▀"]


@pytest.mark.parametrize(
    ("upper", "lower", "ansi"),
    [
        ((255, 0, 0), (255, 255, 255), (196, 231)),  # cube corners
        ((128, 128, 128), (0, 0, 0), (244, 16)),  # a grey lands on the grey ramp, black on the cube's 16
        ((0, 95, 135), (250, 250, 250), (24, 231)),  # cube levels exactly; near-white to the cube's white
    ],
)
def test_half_blocks_use_the_xterm_palette_in_256_colour_terminals(upper, lower, ansi):
    """In a 256-colour terminal the picture is mapped to palette colours once, so Rich need not convert each
    cell's true colour on every frame (that conversion stalled the UI ~50 ms per noisy preview)."""
    from rich.color import ColorType

    image = Image.new("RGB", (1, 2))
    image.putpixel((0, 0), upper)
    image.putpixel((0, 1), lower)
    widget = HalfBlockImage(image)
    widget._truecolor = lambda: False
    (fg, bg), = cell_colours(widget, 1, 1)
    assert (fg.type, bg.type) == (ColorType.EIGHT_BIT, ColorType.EIGHT_BIT)
    assert (fg.number, bg.number) == ansi
    widget._truecolor = lambda: True  # truecolor terminals keep (6-bit quantised) true colours
    (fg, bg), = cell_colours(widget, 1, 1)
    assert fg.type == ColorType.TRUECOLOR
    assert tuple(fg.triplet) == tuple(_LEVELS[channel] for channel in upper)
