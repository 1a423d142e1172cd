"""Hostile text through every screen: prompts, model, file, preset and field names with escape sequences,
bidi overrides and lone controls reach the terminal with those characters made visible (core.text.visible),
never raw.

Each check reads what the compositor would send to the terminal (``screen_text``), so a widget anywhere on the
screen that shows raw text fails it, not only the widget the test looked for.
"""

from __future__ import annotations

import unicodedata

import pytest
from PIL import Image
from textual.widgets import Select

from core.errors import CheckpointError
from core.request import GenerationRequest
from tests.tui_fakes import FakeRunner, make_app, screen_text, wait_for

EVIL = "\x1b]0;pwned\x07\x1b[2J"  # sets the window (tmux pane) title, then clears the screen
SHOWN = "\\x1b]0;pwned\\x07\\x1b[2J"
BIDI = "\u202egnp.exe\u2069"
PROMPT = f"a red fox {EVIL} {BIDI} \x9b6n end"
MODEL = f"evil{EVIL}{BIDI}.safetensors"
ERROR = CheckpointError(f"/models/{MODEL}", f"tensor model.{EVIL}.weight has the wrong shape")


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("DARKROOM_HOME", str(tmp_path / "home"))


def raw_controls(text: str) -> list[str]:
    """Characters a terminal would obey or hide (the screen's own line breaks aside)."""
    return [ch for ch in text
            if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp") and ch not in "\n\u200c\u200d"]


def assert_safe(app, *expected: str) -> str:
    text = screen_text(app)
    assert raw_controls(text) == [], f"raw control characters on the {app.current_mode} screen"
    flat = text.replace("\n", "")
    for piece in expected:
        assert piece in flat, f"{piece!r} not shown on the {app.current_mode} screen:\n{text}"
    return text


def hostile_request(**kw) -> GenerationRequest:
    return GenerationRequest(model=MODEL, prompt=PROMPT, negative_prompt=f"neg {EVIL}", steps=2, seed=3, **kw)


def write_hostile_preset() -> None:
    from core.presets import user_presets_dir

    folder = user_presets_dir()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "evil\udcff.toml").write_text(  # a file name that is not UTF-8 (byte 0xff): a lone surrogate
        'name = "pre\\u001b]0;pwned\\u0007set"\n'
        'description = "desc \\u001b[2J \\u202eabc"\n'
        'steps = 12\n',
        encoding="utf-8",
    )
    # an unknown field: its name is in the warning
    (folder / "bad.toml").write_text('name = "bad"\n"st\\u001b[2Jepz" = 3\n', encoding="utf-8")


async def test_hostile_text_is_visible_everywhere(tmp_path):
    image = tmp_path / f"img{EVIL}.png"
    Image.new("RGB", (16, 16), (20, 40, 200)).save(image)
    write_hostile_preset()
    app = make_app(tmp_path, FakeRunner(fail_with=ERROR), models=[MODEL], start_worker=False)
    app.store.add_history(None, image, hostile_request())
    async with app.run_test(size=(160, 50), notifications=True) as pilot:
        screen = app.get_generate_screen()
        # Generate: the "Last image" caption (the newest history image), the model Select, the preset picker
        await wait_for(pilot, lambda: screen.preview.frames_drawn == 1)
        await wait_for(pilot, lambda: screen.query_one("#model", Select).value == MODEL)
        await pilot.pause()
        caption = str(screen.query_one("#preview-title").render())
        assert caption.startswith("Last image: a red fox " + SHOWN) and raw_controls(caption) == []
        assert_safe(app, "Last image: a red fox " + SHOWN, "\\u202egnp.exe\\u2069", "\\x9b6n", "evil" + SHOWN)

        # a job that fails with a tensor name in its error: the preview, the notification, the status bar
        app.submit(hostile_request())
        app.worker.start()
        await wait_for(pilot, lambda: app.store.list_jobs() and app.store.list_jobs()[0].state == "failed")
        await pilot.pause()
        assert_safe(app, "Job #1: a red fox " + SHOWN, f"tensor model.{SHOWN}.weight")
        app.clear_notifications()

        # Queue: the table (model, prompt) and the detail pane (error, full prompt)
        await pilot.press("f4")
        await pilot.pause()
        assert_safe(app, "evil" + SHOWN, "a red fox " + SHOWN, f"model.{SHOWN}.weight")

        # History: the list, the parameters, the file name; the path notification and the delete dialog
        await pilot.press("f5")
        await wait_for(pilot, lambda: "neg" in str(app.screen.query_one("#details-text").render()))
        assert_safe(app, "a red fox " + SHOWN, "neg " + SHOWN, "model: evil" + SHOWN)
        assert f"img{SHOWN}.png" in str(app.screen.query_one("#details-text").render())  # wrapped on screen
        app.clear_notifications()
        await pilot.press("o")
        await pilot.pause()
        assert_safe(app, f"img{SHOWN}.png")
        await pilot.press("x")
        await pilot.pause()
        assert_safe(app, "Delete")
        assert f"Delete {tmp_path}/img{SHOWN}.png?" in str(app.screen.query_one("#question").render())
        await pilot.press("escape")

        # Load it into the form: the prompt editor and the other fields show the text, and keep it unchanged
        await pilot.press("l")
        await wait_for(pilot, lambda: app.current_mode == "generate")
        await pilot.pause()
        assert_safe(app, "a red fox ␛]0;pwned␇␛[2J")
        assert screen.query_one("#prompt").text == PROMPT  # what is sent is what was written

        # Presets: a name, a description and an unknown field name from a preset file
        await pilot.press("f3")
        await wait_for(pilot, lambda: app.screen.presets)
        await pilot.pause()
        assert_safe(app, "pre\\x1b]0;pwned\\x07set", "st\\x1b[2Jepz")
        app.clear_notifications()
        await pilot.press("end")
        await pilot.pause()
        assert_safe(app, "pre\\x1b]0;pwned\\x07set  (user", "desc \\x1b[2J \\u202eabc")
        assert "evil\\udcff.toml)" in str(app.screen.query_one("#preset-description").render())
        await pilot.press("r")  # the rename dialog: the question and the name in its input field
        await pilot.pause()
        assert_safe(app, "Rename preset pre\\x1b]0;pwned\\x07set to:", "pre␛]0;pwned␇set")


def test_no_screen_builds_textual_input_fields_directly():
    """Every Input and TextArea of the UI is tui.widgets.safe_input's (Textual's draw their value raw)."""
    import ast
    from pathlib import Path

    import tui

    offenders = []
    for path in Path(tui.__file__).parent.rglob("*.py"):
        if path.name == "safe_input.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("textual.widgets"):
                offenders += [f"{path.name}: {a.name}" for a in node.names if a.name in ("Input", "TextArea")]
            elif isinstance(node, ast.Attribute) and node.attr in ("Input", "TextArea"):
                if isinstance(node.value, ast.Name) and node.value.id == "widgets":
                    offenders.append(f"{path.name}: widgets.{node.attr}")
    assert offenders == []


def test_status_bar_no_models_screen_and_command_palette_show_names_visibly(tmp_path):
    from core.events import Status
    from tui.screens.no_models import no_models_text
    from tui.widgets.status_bar import status_text

    status = Status(None, activity=f"loading {MODEL}", loaded_model=MODEL)
    starting = Status(None, device="…", activity=f"starting: {EVIL}")
    for text in (status_text(status).plain, status_text(starting).plain,
                 no_models_text([tmp_path / f"models{EVIL}"]).plain):
        assert raw_controls(text) == [] and SHOWN in text


async def test_command_palette_lists_hostile_names_visibly(tmp_path):
    from tui.commands import DarkroomCommands

    app = make_app(tmp_path, models=[MODEL], start_worker=False)
    async with app.run_test(size=(120, 40)) as pilot:
        screen = app.get_generate_screen()
        await wait_for(pilot, lambda: screen.query_one("#model", Select).value == MODEL)
        titles = [title for title, _, _ in DarkroomCommands(app.screen)._commands(f"fox {EVIL}")]
        assert f"Model: evil{SHOWN}\\u202egnp.exe\\u2069.safetensors" in titles
        assert f"History: search fox {SHOWN}" in titles
        assert all(raw_controls(title) == [] for title in titles)
