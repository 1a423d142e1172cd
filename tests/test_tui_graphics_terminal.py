"""The app in a pseudo-terminal that answers like kitty, like a sixel terminal, or like one without graphics.

The script on the master side plays the terminal: it answers the queries Darkroom and textual-image write
(kitty graphics query, primary device attributes, cell size) and records everything the app draws. After a job
with the fake runner the drawing must be kitty graphics commands, sixel data, or half-block cells, as probed.
This checks the bytes the app sends, not how a real kitty or sixel terminal shows them.
"""

from __future__ import annotations

import sys

import pytest

from tests.fake_terminal import (
    DA1_QUERY,
    KITTY_IMAGE,
    KITTY_QUERY,
    SIXEL_DATA,
    app_in_terminal,
    wait_for_generate_screen,
)

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX")


# konsole: answers the kitty query and offers sixel, but draws only sixel right (textual-image's order).
@pytest.mark.parametrize("kind", ["kitty", "sixel", "konsole", "plain"])
def test_auto_detection_draws_the_preview_with_the_probed_protocol(tmp_path, kind):
    with app_in_terminal(tmp_path, kind) as (process, terminal):
        startup = wait_for_generate_screen(terminal)
        # One round trip decides the protocol: textual-image's own probe (a DA1 and a kitty query, the latter
        # waiting 100 ms where nobody answers) is not run again when its widgets are imported.
        assert len(DA1_QUERY.findall(startup)) == 1
        assert len(KITTY_QUERY.findall(startup)) == 1
        before = len(terminal.text())
        terminal.type(b"\n")  # Ctrl+J queues the job
        drawn = terminal.wait_for(lambda out: b"done in" in out[before:], "the finished job")[before:]
        if kind in ("sixel", "konsole"):
            # The "finished" notification sits over the image for its 5 s, and a sixel terminal cannot draw an
            # image partly covered, so the picture comes once the notification is gone.
            drawn = terminal.wait_for(lambda out: SIXEL_DATA.search(out[before:]), "the sixel image", 15)[before:]
        sixel, kitty = SIXEL_DATA.search(drawn), KITTY_IMAGE.search(drawn)
        if kind in ("sixel", "konsole"):
            assert sixel and not kitty
        elif kind == "kitty":
            assert kitty and not sixel
        else:
            assert not sixel and not kitty
            assert "▀".encode() in drawn  # half-block cells
        terminal.type(b"\x11")  # Ctrl+Q
        assert process.wait(timeout=30) == 0


def test_a_forced_protocol_asks_the_terminal_nothing(tmp_path):
    """--image-protocol unicode in a terminal without graphics (tmux, say): no probe at all, so no 100 ms wait
    for a kitty reply that never comes; the preview is drawn with textual-image's Unicode blocks."""
    with app_in_terminal(tmp_path, "plain", "--image-protocol", "unicode") as (process, terminal):
        startup = wait_for_generate_screen(terminal)
        assert not DA1_QUERY.search(startup) and not KITTY_QUERY.search(startup)
        before = len(terminal.text())
        terminal.type(b"\n")
        drawn = terminal.wait_for(lambda out: b"done in" in out[before:], "the finished job")[before:]
        assert not SIXEL_DATA.search(drawn) and not KITTY_IMAGE.search(drawn)
        terminal.type(b"\x11")
        assert process.wait(timeout=30) == 0
