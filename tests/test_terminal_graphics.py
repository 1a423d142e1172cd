"""The one-round-trip terminal probe: reply parsing, and a real pseudo-terminal answering like kitty, a sixel
terminal, tmux, or nothing at all."""

from __future__ import annotations

import io
import os
import sys
import termios
import threading

import pytest

from tui.terminal_graphics import (
    DA1_QUERY,
    TGP_QUERY,
    GraphicsSupport,
    parse_replies,
    query_graphics,
)

KITTY_OK = b"\x1b_Gi=31;OK\x1b\\"
KITTY_DA1 = b"\x1b[?62;c"
SIXEL_DA1 = b"\x1b[?64;1;2;4;6;9;15;16;17;18;21;22;28;29c"  # xterm -ti vt340 / foot style
TMUX_DA1 = b"\x1b[?1;2c"


@pytest.mark.parametrize(
    ("replies", "expected"),
    [
        (KITTY_OK + KITTY_DA1, GraphicsSupport(answered=True, tgp=True)),
        (SIXEL_DA1, GraphicsSupport(answered=True, sixel=True)),
        (TMUX_DA1, GraphicsSupport(answered=True)),
        (b"\x1b_Gi=31;ENOTSUPPORTED:no\x1b\\" + KITTY_DA1, GraphicsSupport(answered=True)),
        (b"ab" + KITTY_OK + b"c" + KITTY_DA1, GraphicsSupport(answered=True, tgp=True)),  # keys typed meanwhile
        (KITTY_DA1 + KITTY_OK, GraphicsSupport(answered=True)),  # a kitty reply after DA1 answers nothing asked
        (b"\x1b[?4c", GraphicsSupport(answered=True)),  # the first number is the terminal class, not a feature
    ],
)
def test_parse_replies(replies, expected):
    assert parse_replies(replies) == expected


@pytest.mark.parametrize("partial", [b"", KITTY_OK, b"\x1b[?62;4", KITTY_OK + b"\x1b[?6"])
def test_incomplete_replies_wait_for_more(partial):
    assert parse_replies(partial) is None


def fake_terminal(master: int, answer: bytes | None, received: list[bytes]) -> threading.Thread:
    """Reads the queries from the pty's master side and answers (in two pieces, as a slow link might)."""

    def serve() -> None:
        data = b""
        while not data.endswith(DA1_QUERY):
            data += os.read(master, 1024)
        received.append(data)
        if answer:
            os.write(master, answer[:3])
            os.write(master, answer[3:])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


@pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX")
@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (KITTY_OK + KITTY_DA1, GraphicsSupport(answered=True, tgp=True)),
        (SIXEL_DA1, GraphicsSupport(answered=True, sixel=True)),
        (TMUX_DA1, GraphicsSupport(answered=True)),
        (None, GraphicsSupport(answered=False)),
    ],
)
def test_query_over_a_pseudo_terminal(answer, expected):
    master, slave = os.openpty()
    try:
        before = termios.tcgetattr(slave)
        received: list[bytes] = []
        server = fake_terminal(master, answer, received)
        support = query_graphics(slave, slave, timeout=0.3 if answer is None else 10)
        server.join(5)
        assert support == expected
        assert received == [TGP_QUERY + DA1_QUERY]  # both questions in one write, kitty's first
        assert termios.tcgetattr(slave) == before  # echo and line mode restored
    finally:
        os.close(master)
        os.close(slave)


def test_probe_declines_without_a_terminal(monkeypatch):
    from tui import terminal_graphics

    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.setattr(sys, "__stdout__", io.StringIO())  # output redirected to a file or pipe
    assert terminal_graphics.probe_terminal() is None
    monkeypatch.setenv("TERM", "dumb")
    assert terminal_graphics.probe_terminal() is None


@pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX")
@pytest.mark.parametrize(
    ("env", "kitty_asked"),
    [
        ({"TERM": "xterm-256color"}, True),
        ({"TERM": "xterm-256color", "TMUX": "/tmp/tmux-1000/default,42,0"}, False),
        ({"TERM": "screen-256color"}, False),  # tmux or screen at the far end of an SSH link
        ({"TERM": "tmux-256color"}, False),
        ({"TERM": "xterm-256color", "STY": "1234.pts-0.box"}, False),  # GNU screen
    ],
)
def test_a_multiplexer_is_asked_da1_alone(monkeypatch, env, kitty_asked):
    """tmux takes the kitty query's APC string for the pane title (its status line showed
    "Gi=31,s=1,v=1,a=q,..."), screen for its hardstatus; both answer DA1 themselves."""
    from tui import terminal_graphics

    for key in ("TMUX", "STY"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    master, slave = os.openpty()
    try:
        with open(slave, "rb", buffering=0, closefd=False) as tty_in, \
                open(slave, "w", closefd=False) as tty_out:
            monkeypatch.setattr(sys, "__stdin__", tty_in)
            monkeypatch.setattr(sys, "__stdout__", tty_out)
            received: list[bytes] = []
            server = fake_terminal(master, TMUX_DA1, received)
            support = terminal_graphics.probe_terminal(timeout=10)
            server.join(5)
        assert support == GraphicsSupport(answered=True)
        assert received == [(TGP_QUERY if kitty_asked else b"") + DA1_QUERY]
    finally:
        os.close(master)
        os.close(slave)
