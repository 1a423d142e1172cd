"""A pseudo-terminal that plays kitty, a sixel terminal, Konsole or a plain terminal, with the app inside.

``FakeTerminal`` sits on the master side: it answers the queries Darkroom and textual-image write (kitty
graphics query, primary device attributes, cell size) the way the chosen terminal would, and records every
byte the app draws. Used by tests/test_tui_graphics_terminal.py and bench/bench_tui.py (POSIX only).
"""

from __future__ import annotations

import fcntl
import os
import re
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS, COLUMNS, CELL_W, CELL_H = 40, 120, 10, 20

KITTY_QUERY = re.compile(rb"\x1b_Gi=(\d+),[^\x1b]*a=q[^\x1b]*\x1b\\")
DA1_QUERY = re.compile(rb"\x1b\[0?c")
CELL_SIZE_QUERY = re.compile(rb"\x1b\[16t")
SIXEL_DATA = re.compile(rb"\x1bP[0-9;]*q.{20,}?\x1b\\", re.S)
# Image data sent to the terminal (a query carries only a 4-character payload).
KITTY_IMAGE = re.compile(rb"\x1b_G[^\x1b;]*f=[^\x1b;]*;[A-Za-z0-9+/=]{20,}")


class FakeTerminal:
    """Reads the app's output from the master side and answers its queries like the chosen terminal."""

    def __init__(self, master: int, kind: str) -> None:
        self.master, self.kind = master, kind
        self.output = bytearray()
        self._answered = 0  # how far into the output queries have been answered
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:
                return
            if not chunk:
                return
            with self._lock:
                self.output += chunk
                self._answer()

    def _answer(self) -> None:
        pending = bytes(self.output[self._answered:])
        queries = []
        for pattern in (KITTY_QUERY, DA1_QUERY, CELL_SIZE_QUERY):
            queries += [(match.start(), pattern, match) for match in pattern.finditer(pending)]
        last_end = 0
        for _, pattern, match in sorted(queries, key=lambda q: q[0]):
            if pattern is KITTY_QUERY and self.kind in ("kitty", "konsole"):
                os.write(self.master, b"\x1b_Gi=" + match.group(1) + b";OK\x1b\\")
            elif pattern is DA1_QUERY:
                os.write(self.master, b"\x1b[?62;4;22c" if self.kind in ("sixel", "konsole") else b"\x1b[?62;22c")
            elif pattern is CELL_SIZE_QUERY:
                os.write(self.master, f"\x1b[6;{CELL_H};{CELL_W}t".encode())
            last_end = max(last_end, match.end())
        self._answered += last_end

    def text(self) -> bytes:
        with self._lock:
            return bytes(self.output)

    def wait_for(self, predicate, what: str, timeout: float = 60.0) -> bytes:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            data = self.text()
            if predicate(data):
                return data
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; last output: {self.text()[-1500:]!r}")

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)


def _controlling_terminal() -> None:
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


@contextmanager
def app_in_terminal(
    tmp_path: Path, kind: str, *extra_args: str, env_extra: Mapping[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen, FakeTerminal]]:
    """The app (fake runner) in a pseudo-terminal played by ``FakeTerminal(kind)``; killed if still running."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, COLUMNS * CELL_W, ROWS * CELL_H))
    env = {key: value for key, value in os.environ.items()
           if key not in ("COLUMNS", "LINES", "DARKROOM_IMAGE_PROTOCOL", "TEXTUAL_CELL_WIDTH",
                          "TEXTUAL_CELL_HEIGHT", "TMUX", "STY")}
    env.update({
        "DARKROOM_HOME": str(tmp_path / "home"), "DARKROOM_TUI_FAKE_RUNNER": "tests.tui_fakes:FakeRunner",
        "DARKROOM_FAKE_PREVIEW": "32", "DARKROOM_FAKE_DELAY": "0.05", "PYTHONPATH": str(ROOT),
        "TERM": "xterm-256color", "COLORTERM": "truecolor", **(env_extra or {}),
    })
    process = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "--db", str(tmp_path / "db.sqlite3"), "--output-dir",
         str(tmp_path / "out"), *extra_args],
        cwd=ROOT, env=env, stdin=slave, stdout=slave, stderr=slave, preexec_fn=_controlling_terminal,
    )
    os.close(slave)
    try:
        yield process, FakeTerminal(master, kind)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(master)


def wait_for_generate_screen(terminal: FakeTerminal) -> bytes:
    return terminal.wait_for(lambda out: b"fake-model" in out and b"Queue" in out, "the Generate screen")
