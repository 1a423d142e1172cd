"""The X/Y/Z grid dialog (Ctrl+G on the Generate screen, A1111's "X/Y/Z plot" script): up to three axes, each a
field and its comma-separated values (A1111's ranges for numbers); checked through ``core.grid`` as typed, with
the cell count; returns the axes and every cell's request of the form's request."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Label, Select

from core.errors import RequestError
from core.grid import AXES, FIELDS, expand, parse_axes, parse_values
from core.request import GenerationRequest
from core.text import visible
from tui.widgets.safe_input import Input

PLACEHOLDERS = {
    "seed": "1, 2, 3  or  100-104",
    "steps": "10, 20, 30  or  10-30 (+10)",
    "cfg": "4, 7  or  3-9 (+1.5)  or  1-10 [4]",
    "sampler": "euler, euler_ancestral, dpmpp_2m",
    "schedule": "normal, karras",
    "model": "model-a.safetensors, model-b.safetensors",
    "prompt_sr": "cat, dog, owl  (the first is replaced by each)",
}


class GridScreen(ModalScreen[tuple[dict, list[GenerationRequest]] | None]):
    """Returns ``(axes, cells)`` to queue, or None when cancelled."""

    CSS_PATH = "grid.tcss"
    BINDINGS = [("escape", "dismiss(None)", "Cancel"),
                Binding("ctrl+enter,ctrl+j", "queue", "Queue grid", priority=True)]
    AUTO_FOCUS = "#grid-x-values"

    def __init__(self, request: GenerationRequest, grid_id: str) -> None:
        super().__init__()
        self.request = request
        self.grid_id = grid_id
        self.result: tuple[dict, list[GenerationRequest]] | None = None
        self.problem = ""  # what is wrong with the axes as typed

    def compose(self) -> ComposeResult:
        options = [(label, key) for key, label in FIELDS.items()]
        with Vertical(id="grid-dialog"):
            yield Label("X/Y/Z grid: every combination of the values is queued as a job of the form's "
                        "settings, then the labelled grid image is saved", id="grid-title")
            for name, default in zip(AXES, ("seed", Select.NULL, Select.NULL)):
                with Horizontal(classes="grid-axis"):
                    yield Label(f"{name.upper()}", classes="grid-axis-name")
                    yield Select(options, prompt="(unused)", value=default, allow_blank=True, compact=True,
                                 id=f"grid-{name}-field")
                    yield Input(placeholder=PLACEHOLDERS["seed"] if name == "x" else "values, comma-separated",
                                id=f"grid-{name}-values")
            yield Label("", id="grid-status")
            with Horizontal(id="grid-buttons"):
                yield Button("Queue grid (Ctrl+Enter)", variant="primary", id="grid-queue")
                yield Button("Cancel (Esc)", id="grid-cancel")

    def on_mount(self) -> None:
        self.check()

    def axes(self) -> dict[str, dict[str, Any]]:
        """The axes as typed: ``{name: {field, values}}`` for each axis with a field and some text."""
        axes = {}
        for name in AXES:
            field = self.query_one(f"#grid-{name}-field", Select).value
            text = self.query_one(f"#grid-{name}-values", Input).value
            if not text.strip():
                continue
            if not isinstance(field, str):
                raise RequestError(f"grid.{name}.field", "", "a field for these values: " + ", ".join(FIELDS.values()))
            axes[name] = {"field": field, "values": parse_values(str(field), text, f"grid.{name}")}
        return axes

    def check(self) -> bool:
        """Validate through core.grid; the status line says the cell count or the one problem."""
        status = self.query_one("#grid-status", Label)
        self.result, self.problem = None, ""
        try:
            table = self.axes()
            if not table:  # nothing typed yet is no mistake: say what to do, not that it is invalid
                self.problem = "type values for at least one axis (X, Y, Z)"
                status.update(Text(self.problem))
                status.set_class(False, "-error")
                self.query_one("#grid-queue", Button).disabled = True
                return False
            axes = parse_axes(table)
            cells = expand(self.request, axes, self.grid_id)
        except RequestError as error:
            self.problem = visible(str(error))
            status.update(Text(self.problem, style="bold red"))
            status.set_class(True, "-error")
            self.query_one("#grid-queue", Button).disabled = True
            return False
        self.result = (axes, cells)
        status.update(Text(f"{len(cells)} cell{'s' * (len(cells) != 1)} (at most 1000)"))
        status.set_class(False, "-error")
        self.query_one("#grid-queue", Button).disabled = False
        return True

    @on(Select.Changed)
    def _field_changed(self, event: Select.Changed) -> None:
        name = str(event.select.id).split("-")[1]
        if isinstance(event.value, str):
            self.query_one(f"#grid-{name}-values", Input).placeholder = PLACEHOLDERS[str(event.value)]
        self.check()

    @on(Input.Changed)
    def _values_changed(self) -> None:
        self.check()

    @on(Input.Submitted)
    def _submitted(self) -> None:
        self.action_queue()

    @on(Button.Pressed, "#grid-queue")
    def _queue_pressed(self) -> None:
        self.action_queue()

    @on(Button.Pressed, "#grid-cancel")
    def _cancel_pressed(self) -> None:
        self.dismiss(None)

    def action_queue(self) -> None:
        if not self.check() or self.result is None:
            self.app.notify(self.problem, severity="error", markup=False)
            return
        self.dismiss(self.result)
