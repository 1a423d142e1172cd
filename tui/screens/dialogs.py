"""Small modal dialogs: yes/no confirmation and a one-line text prompt."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Grid
from textual.screen import ModalScreen
from textual.widgets import Button, Label

from core.text import visible
from tui.widgets.safe_input import Input


class ConfirmScreen(ModalScreen[bool]):
    """A question naming a file or preset: shown as plain text with control characters made visible."""

    BINDINGS = [("escape", "dismiss(False)", "Cancel"), ("y", "dismiss(True)", "Yes")]
    AUTO_FOCUS = "#no"  # Enter right after the question cancels: deleting takes y or a deliberate choice

    def __init__(self, question: str, confirm_label: str = "Delete") -> None:
        super().__init__()
        self.question = question
        self.confirm_label = confirm_label

    def compose(self) -> ComposeResult:
        with Grid(id="dialog", classes="two-buttons"):
            yield Label(Text(visible(self.question, multiline=True)), id="question")
            yield Button(f"{self.confirm_label} (y)", variant="error", id="yes")
            yield Button("Cancel (Esc)", id="no")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")


class TextPromptScreen(ModalScreen[str | None]):
    BINDINGS = [("escape", "dismiss(None)", "Cancel")]

    def __init__(self, question: str, value: str = "", placeholder: str = "") -> None:
        super().__init__()
        self.question = question
        self.value = value
        self.placeholder = placeholder

    def compose(self) -> ComposeResult:
        with Grid(id="dialog", classes="two-buttons"):
            yield Label(Text(visible(self.question, multiline=True)), id="question")
            yield Input(self.value, placeholder=self.placeholder, id="answer")
            yield Button("OK", variant="primary", id="ok")
            yield Button("Cancel", id="cancel")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "ok":
            self.dismiss(self.query_one(Input).value.strip() or None)
        else:
            self.dismiss(None)
