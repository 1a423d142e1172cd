"""The UI thread never imports torch: importing the app, building it from CLI-style arguments with the real
registry/store/worker, mounting it and visiting every screen imports no torch/diffusers/transformers on the
main (UI) thread. An import hook records which thread asks for them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import asyncio, json, sys, threading
from types import SimpleNamespace
from pathlib import Path

importers = []  # (module, thread) for every heavy import, wherever it happens


class Spy:
    def find_spec(self, name, path=None, target=None):
        if name in ("torch", "diffusers", "transformers"):
            importers.append((name, threading.current_thread().name))
        return None


sys.meta_path.insert(0, Spy())

import tui.app
from tui.app import create_app

tmp = Path(sys.argv[1])
(tmp / "models").mkdir()
args = SimpleNamespace(models_dir=[str(tmp / "models")], output_dir=str(tmp / "out"), db=str(tmp / "db.sqlite3"))
app = create_app(args)

async def main():
    async with app.run_test(size=(120, 40)) as pilot:
        for _ in range(500):  # the model scan starts once the form is mounted, after the first frame
            if type(app.screen).__name__ == "NoModelsScreen":
                break
            await pilot.pause(0.02)
        await pilot.press("escape")  # leave the no-models screen
        for key in ("f3", "f4", "f5", "f2"):
            await pilot.press(key)
            await pilot.pause()
        screen_names = type(app.screen).__name__

    on_ui_thread = [name for name, thread in importers if thread == threading.main_thread().name]
    print(json.dumps({"on_ui_thread": on_ui_thread, "screen": screen_names}))

asyncio.run(main())
"""


def test_app_import_and_mount_do_not_import_torch(tmp_path):
    env = dict(os.environ, DARKROOM_HOME=str(tmp_path / "home"), PYTHONPATH=str(ROOT))
    env.pop("DARKROOM_TUI_FAKE_RUNNER", None)
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["screen"] == "GenerateScreen"
    # The worker's own threads may import torch (device status, the runner); the UI thread never does.
    assert report["on_ui_thread"] == []


def test_first_frame_modules_leave_pil_and_textual_image_unimported():
    """Half-cells (what auto picks in a terminal without graphics) need neither textual-image nor PIL before an
    image arrives: their imports (~60 and ~12 ms here) stay off the path to the first paint."""
    script = (
        "import json, sys\n"
        "import tui.app\n"
        "from tui.terminal_graphics import GraphicsSupport\n"
        "from tui.widgets.image import image_class, make_image\n"
        "cls = image_class('auto', probe=lambda: GraphicsSupport(answered=True))\n"
        "make_image(cls, None, id='preview-image')\n"
        "print(json.dumps({'class': cls.__name__, 'textual_image': 'textual_image' in sys.modules,\n"
        "                  'PIL': 'PIL' in sys.modules}))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {
        "class": "HalfBlockImage", "textual_image": False, "PIL": False,
    }
