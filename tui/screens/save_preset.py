"""The "Save current" dialog of the Presets screen: the preset's name and which of the form's fields it keeps.

A preset here is a set of settings applied over the form, so by default it leaves out what belongs to one
picture: the prompts, the seed and the init image (A1111's styles keep prompts; those are what a style is).
"""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Grid, Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Checkbox, Label

from core.request import IMG2IMG_DENOISE, GenerationRequest
from core.text import visible
from tui.widgets.safe_input import Input

# Left out unless ticked: they describe one picture, not a way of making pictures.
LEFT_OUT_BY_DEFAULT = ("prompt", "negative_prompt", "seed", "init_image", "mask", "outpaint")
# Left out unless ticked when the form has no init image and they are at their defaults: they do nothing for
# txt2img, and a preset that kept them would reset the img2img settings of a form it is applied to later.
IMG2IMG_DEFAULTS = {**{k: v for k, v in GenerationRequest(model="-").to_dict().items()
                       if k in ("mask_blur", "inpaint_area", "masked_content", "invert_mask", "only_masked_padding")},
                    "denoise": IMG2IMG_DENOISE}


def ticked_by_default(fields: dict[str, Any]) -> set[str]:
    """The fields the dialog ticks before the user changes anything."""
    def untouched_img2img(name: str) -> bool:
        return not fields.get("init_image") and name in IMG2IMG_DEFAULTS and fields[name] == IMG2IMG_DEFAULTS[name]

    return {k for k in fields if k not in LEFT_OUT_BY_DEFAULT and not untouched_img2img(k)}


def shown_value(value: Any) -> str:
    """A preset field's value in words on one line: a table (hires) as ``scale 2.0, upscaler latent``, a list
    of tables (loras) one after another with ``;``, never Python's ``{'scale': 2.0}``."""
    if isinstance(value, dict):
        value = ", ".join(f"{k} {v}" for k, v in value.items())
    elif isinstance(value, (list, tuple)) and value and all(isinstance(v, dict) for v in value):
        value = "; ".join(shown_value(v) for v in value)
    return visible(" ".join(str(value).split()))  # prompts and paths: control characters made visible


def _shown(value: Any, width: int = 24) -> str:
    text = shown_value(value)
    return text if len(text) <= width else text[: width - 1] + "…"


class TickBox(Checkbox):
    """A checkbox whose state is in the glyph (X or blank), not only in colours that 256-colour terminals
    render alike."""

    @property
    def BUTTON_INNER(self) -> str:  # noqa: N802 - Textual's class attribute, read per render
        return "X" if self.value else " "


class SavePresetScreen(ModalScreen[tuple[str, dict[str, Any]] | None]):
    """Returns ``(name, kept fields)``, or None when cancelled."""

    BINDINGS = [("escape", "dismiss(None)", "Cancel")]
    DEFAULT_CSS = """
    SavePresetScreen { align: center middle; }
    SavePresetScreen #save-dialog {
        width: 76; max-width: 100%; height: auto; max-height: 100%;
        border: thick $primary 80%; background: $surface; padding: 0 1;
    }
    SavePresetScreen #question { width: 1fr; height: auto; }
    SavePresetScreen #keep-title { margin: 1 0 0 0; }
    SavePresetScreen #keep-fields { grid-size: 2; grid-gutter: 0 1; height: auto; max-height: 12;
                                    overflow-y: auto; grid-rows: 1; }
    SavePresetScreen #keep-fields Checkbox { width: 1fr; }
    SavePresetScreen .actions { height: auto; margin: 1 0 0 0; }
    SavePresetScreen .actions Button { width: 1fr; }
    """

    def __init__(self, fields: dict[str, Any], name: str = "", problem: str = "",
                 kept: set[str] | None = None) -> None:
        super().__init__()
        self.fields = fields
        self.name_value = name
        self.problem = problem
        self.kept = ticked_by_default(fields) if kept is None else kept

    def compose(self) -> ComposeResult:
        question = "Save the current Generate settings as preset:"
        with Vertical(id="save-dialog"):
            yield Label(Text(visible(f"{self.problem}\n{question}" if self.problem else question, multiline=True)),
                        id="question")
            yield Input(self.name_value, placeholder="preset name", id="answer")
            yield Label("Keep in the preset (space ticks):", id="keep-title")
            with Grid(id="keep-fields"):
                for name, value in self.fields.items():
                    yield TickBox(Text(f"{name}: {_shown(value)}"), name in self.kept, id=f"keep-{name}",
                                  compact=True)
            with Horizontal(classes="actions"):
                yield Button("Save", variant="primary", id="ok", compact=True)
                yield Button("Cancel (Esc)", id="cancel", compact=True)

    def chosen(self) -> dict[str, Any]:
        return {name: value for name, value in self.fields.items()
                if self.query_one(f"#keep-{name}", Checkbox).value}

    def _save(self) -> None:
        name = self.query_one("#answer", Input).value.strip()
        if not name:
            self.dismiss(None)
            return
        chosen = self.chosen()
        if not chosen:
            self.query_one("#question", Label).update("Tick at least one field to keep.\n"
                                                      "Save the current Generate settings as preset:")
            return
        self.dismiss((name, chosen))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self._save()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "ok":
            self._save()
        else:
            self.dismiss(None)
