"""Quitting while a job runs: finish it first, or leave it interrupted in the queue."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Grid
from textual.screen import ModalScreen
from textual.widgets import Button, Label


class QuitScreen(ModalScreen[str | None]):
    BINDINGS = [
        ("f", "dismiss('finish')", "Finish, then quit"),
        ("l", "dismiss('interrupt')", "Quit, leave interrupted"),
        ("escape,s", "dismiss(None)", "Stay"),
    ]

    def __init__(self, job_id: int) -> None:
        super().__init__()
        self.job_id = job_id

    def compose(self) -> ComposeResult:
        with Grid(id="dialog"):
            yield Label(
                f"Job #{self.job_id} is still running. Finish it before quitting, or stop now and leave it "
                "interrupted in the queue (retry it later from the Queue screen)?",
                id="question",
            )
            yield Button("Finish it (f)", variant="primary", id="finish")
            yield Button("Leave it (l)", variant="warning", id="interrupt")
            yield Button("Stay (Esc)", id="stay")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss({"finish": "finish", "interrupt": "interrupt"}.get(event.button.id or ""))
