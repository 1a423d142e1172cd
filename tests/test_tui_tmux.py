"""End to end in a real terminal: the ``darkroom`` CLI under tmux with the fake runner. Types a prompt, queues
it with Ctrl+J (what Ctrl+Enter sends in most terminals), waits for the image, checks the history gained it and
that the app quits cleanly."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=True).stdout


def wait_screen(session: str, predicate, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = tmux("capture-pane", "-p", "-t", session)
        if predicate(text):
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"screen never matched; last screen:\n{text}")
        time.sleep(0.2)


def test_queue_a_prompt_in_a_real_terminal(tmp_path):
    from core.store import JobStore

    session = f"darkroom-test-{uuid.uuid4().hex[:8]}"
    db = tmp_path / "db.sqlite3"
    env = {
        "DARKROOM_HOME": str(tmp_path / "home"),
        "DARKROOM_TUI_FAKE_RUNNER": "tests.tui_fakes:FakeRunner",
        "PYTHONPATH": str(ROOT),
        "TERM": "xterm-256color",
    }
    exports = " ".join(f"{k}={v}" for k, v in env.items())
    # COLUMNS/LINES (pytest sets them) would override the real terminal size inside tmux.
    command = (f"cd {ROOT} && env -u COLUMNS -u LINES {exports} {sys.executable} -m cli.main --db {db} "
               f"--output-dir {tmp_path / 'out'}; echo DARKROOM-EXITED $?; sleep 30")
    tmux("new-session", "-d", "-s", session, "-x", "120", "-y", "40", command)
    try:
        wait_screen(session, lambda s: "Queue  (Ctrl+Enter)" in s and "fake-model" in s)
        # The terminal probe sent nothing tmux takes for a pane title (its status line shows that title).
        assert "Gi=" not in tmux("display-message", "-p", "-t", session, "#{pane_title}")
        prompt = "a tmux [lighthouse] (dusk:1.2)"
        tmux("send-keys", "-t", session, "-l", prompt)
        wait_screen(session, lambda s: prompt in s)
        tmux("send-keys", "-t", session, "C-j")
        screen = wait_screen(session, lambda s: "done in" in s)
        assert f"Job #1: {prompt}" in screen  # shown literally, brackets and all
        history = JobStore(db).history()
        assert len(history) == 1 and history[0].request.prompt == prompt
        assert Path(history[0].path).is_file()
        tmux("send-keys", "-t", session, "F5")
        wait_screen(session, lambda s: "search prompts" in s and prompt in s)
        tmux("send-keys", "-t", session, "C-q")
        wait_screen(session, lambda s: "DARKROOM-EXITED 0" in s)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


@pytest.mark.slow
def test_real_pipeline_with_a_tiny_checkpoint_in_a_real_terminal(tmp_path):
    """No fake: the real worker runner (core.pipeline, torch in the worker thread) on a tiny random SD1.5
    checkpoint found through --models-dir, driven from the keyboard."""
    import json

    from core.models.testing import write_random_checkpoint
    from core.store import JobStore

    write_random_checkpoint(tmp_path / "models" / "checkpoints" / "tiny.safetensors", "sd15", "tiny", seed=0)
    config = tmp_path / "home" / "config"
    config.mkdir(parents=True)
    (config / "tui-settings.json").write_text(json.dumps({"steps": 2, "width": 64, "height": 64, "seed": 5,
                                                          "seed_lock": True}))
    session = f"darkroom-test-{uuid.uuid4().hex[:8]}"
    db = tmp_path / "db.sqlite3"
    command = (f"cd {ROOT} && env -u COLUMNS -u LINES DARKROOM_HOME={tmp_path / 'home'} PYTHONPATH={ROOT} "
               f"{sys.executable} -m cli.main --models-dir {tmp_path / 'models'} --db {db} "
               f"--output-dir {tmp_path / 'out'}; echo DARKROOM-EXITED $?; sleep 30")
    tmux("new-session", "-d", "-s", session, "-x", "120", "-y", "40", command)
    try:
        wait_screen(session, lambda s: "Queue  (Ctrl+Enter)" in s and "tiny" in s)
        tmux("send-keys", "-t", session, "-l", "a tiny real job")
        wait_screen(session, lambda s: "a tiny real job" in s)
        tmux("send-keys", "-t", session, "C-j")
        screen = wait_screen(session, lambda s: "done in" in s or "failed" in s, timeout=90)
        assert "done in" in screen, screen
        assert "model tiny" in screen  # the status bar reports the loaded model
        (row,) = JobStore(db).history()
        assert row.request.model == "tiny" and row.seed == 5 and Path(row.path).is_file()
        tmux("send-keys", "-t", session, "C-q")
        wait_screen(session, lambda s: "DARKROOM-EXITED 0" in s)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
