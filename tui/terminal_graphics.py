"""Which image protocols the terminal speaks, asked in one round trip before the app starts.

Two queries are written together: a kitty graphics protocol (TGP) query action, then Primary Device
Attributes (DA1). Every terminal answers DA1, and answers in order, so when the DA1 reply arrives we know
everything: a TGP reply before it means kitty graphics; a ``4`` among the DA1 attributes means sixel. This is
the detection kitty's documentation recommends, and it never waits for a timeout in terminals that lack
graphics (tmux, most SSH clients): textual-image's own probe asks one question at a time and waits 100 ms for
a TGP answer that never comes, which was most of Darkroom's time to first paint.

Input typed while the reply is awaited is lost, as with every such probe; the wait is a few milliseconds.

Inside tmux or GNU screen only DA1 is asked: a multiplexer answers DA1 itself and takes the kitty query's APC
string for a title (tmux's pane title, which its default status line shows; screen's hardstatus), so users saw
"Gi=31,s=1,v=1,a=q,..." there, and kitty graphics cannot reach the outer terminal through it anyway.
"""

from __future__ import annotations

import os
import re
import select
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass

TGP_QUERY_ID = 31
# A 1x1 RGB image, queried (a=q), never stored or shown; kitty replies "\x1b_Gi=31;OK\x1b\\".
TGP_QUERY = f"\x1b_Gi={TGP_QUERY_ID},s=1,v=1,a=q,t=d,f=24;AAAA\x1b\\".encode()
DA1_QUERY = b"\x1b[c"
_DA1_REPLY = re.compile(rb"\x1b\[\?([0-9;]*)c")
_TGP_REPLY = re.compile(rb"\x1b_Gi=" + str(TGP_QUERY_ID).encode() + rb";([^\x1b]*)\x1b\\")


@dataclass(frozen=True)
class GraphicsSupport:
    answered: bool  # False: no DA1 reply in time (not a terminal, or a very slow link)
    sixel: bool = False
    tgp: bool = False


def parse_replies(data: bytes) -> GraphicsSupport | None:
    """The support read from the terminal's replies, or None while the DA1 reply is still incomplete."""
    da1 = _DA1_REPLY.search(data)
    if da1 is None:
        return None
    attributes = da1.group(1).split(b";")
    tgp = _TGP_REPLY.search(data, 0, da1.start())
    return GraphicsSupport(answered=True, sixel=b"4" in attributes[1:],
                           tgp=tgp is not None and tgp.group(1) == b"OK")


def in_multiplexer(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether a terminal multiplexer (tmux, GNU screen) is what answers, here or at the end of an SSH link
    (there only ``TERM`` tells: tmux and screen set it to ``screen*`` or ``tmux*``)."""
    term = environ.get("TERM", "")
    return bool(environ.get("TMUX") or environ.get("STY")) or term.startswith(("screen", "tmux"))


def query_graphics(fd_in: int, fd_out: int, timeout: float = 0.5, ask_kitty: bool = True) -> GraphicsSupport:
    """Ask the terminal on ``fd_out`` and read its replies from ``fd_in`` (a tty), within ``timeout``;
    without ``ask_kitty``, DA1 alone (sixel)."""
    import termios

    saved = termios.tcgetattr(fd_in)
    raw = termios.tcgetattr(fd_in)
    raw[3] &= ~(termios.ICANON | termios.ECHO)  # replies must not echo or wait for a newline
    raw[6][termios.VMIN], raw[6][termios.VTIME] = 0, 0
    termios.tcsetattr(fd_in, termios.TCSANOW, raw)
    try:
        os.write(fd_out, (TGP_QUERY if ask_kitty else b"") + DA1_QUERY)
        data = b""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([fd_in], [], [], left)
            if not ready:
                break
            chunk = os.read(fd_in, 256)
            if not chunk:
                break
            data += chunk
            support = parse_replies(data)
            if support is not None:
                return support
        return GraphicsSupport(answered=False)
    finally:
        termios.tcsetattr(fd_in, termios.TCSANOW, saved)


def probe_terminal(timeout: float = 0.5) -> GraphicsSupport | None:
    """Query the process's own terminal; None where this probe does not apply (not a tty, Windows, a dumb
    terminal), so the caller can choose without it."""
    if sys.platform == "win32" or os.environ.get("TERM", "") in ("dumb", ""):
        return None
    stdin, stdout = sys.__stdin__, sys.__stdout__
    if stdin is None or stdout is None:
        return None
    try:
        if not (stdin.isatty() and stdout.isatty()):
            return None
        stdout.flush()
        return query_graphics(stdin.fileno(), stdout.fileno(), timeout, ask_kitty=not in_multiplexer())
    except (OSError, ValueError, ImportError):
        return None
