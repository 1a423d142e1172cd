"""Always-visible status line: device, memory, attention backend, dtype, loaded model, queue, activity."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from core.events import Status
from core.text import visible
from tui.widgets.image import protocol_label


def format_bytes(value: int) -> str:
    if value <= 0:
        return "–"
    gib = value / 2**30
    return f"{gib:.1f}G" if gib >= 1 else f"{value / 2**20:.0f}M"


def status_text(status: Status | None, progress: str = "", width: int | None = None, images: str = "") -> Text:
    """Plain Text (model names are file names: never markup, control characters made visible). Given the
    ``width`` it has, a line that would not fit drops how ``images`` are drawn ("previews: half-blocks"),
    then the memory peak and total and the "attention:" label, then the attention kernel and dtype, then
    shortens the model name, so the queue and what the worker is doing (the end of the line) stay in view."""
    if status is None:
        return Text(" starting the worker…", style="dim")
    if status.device == "…":  # the worker's first word, before torch is imported (no device facts yet)
        text = Text(no_wrap=True, overflow="ellipsis")
        text.append(" starting ", style="bold reverse")
        text.append(f" {visible(status.activity.removeprefix('starting: '))}…  queue {status.queue_length}")
        return text
    # Tensor memory on a GPU, the process's resident memory on the CPU (what the worker reports for each).
    memory = f"{'RAM' if status.device.startswith('cpu') else 'VRAM'} {format_bytes(status.memory_used)}"
    full_mem = f"{memory} peak {format_bytes(status.memory_peak)} of {format_bytes(status.memory_total)}"
    attention = visible(status.attention_backend)
    activity = "paused" if status.paused and status.activity == "idle" else visible(status.activity)
    model = visible(status.loaded_model or "–")

    def line(mem: str, facts: str, model_name: str | None) -> Text:
        # One line that never wraps: a wrapped status bar (height 1) showed only its first line.
        text = Text(no_wrap=True, overflow="ellipsis")
        text.append(f" {visible(status.device)} ", style="bold reverse")
        text.append(f" {mem}  {facts}")
        if model_name is not None:
            text.append(f"model {model_name}  ")
        text.append(f"queue {status.queue_length}{' (paused)' if status.paused else ''}  ")
        text.append(activity, style="bold")
        if progress:
            text.append(f" · {progress}")  # visible separator: "generating · job #4 step 12/20"
        return text

    dtype = visible(status.dtype)
    text = line(full_mem, f"attention: {attention}  {dtype}  " + (f"previews: {images}  " if images else ""), model)
    if width is None or text.cell_len <= width:
        return text
    text = line(full_mem, f"attention: {attention}  {dtype}  ", model)  # how previews are drawn goes first
    if text.cell_len <= width:
        return text
    text = line(memory, f"{attention}  {dtype}  ", model)
    if text.cell_len <= width:
        return text
    text = line(memory, "", model)  # the attention kernel and dtype: the least needed while narrow
    excess = text.cell_len - width
    if excess > 0:  # the model name gives way, down to a few letters, then goes
        keep = len(model) - excess - 1
        text = line(memory, "", model[:keep] + "…" if keep >= 6 else None)
    return text


class StatusBar(Static):
    """Reads ``app.status`` and ``app.progress_line``; re-renders on change and once a second."""

    DEFAULT_CSS = """
    StatusBar { height: 1; width: 1fr; background: $panel; color: $text; }
    """

    def on_mount(self) -> None:
        self.watch(self.app, "status", self._refresh_text)
        self.watch(self.app, "progress_line", self._refresh_text)
        self.set_interval(1.0, self._refresh_text)

    def on_resize(self) -> None:
        self._refresh_text()  # its short or full form follows the width

    def _refresh_text(self, *_: object) -> None:
        app = self.app
        self.update(status_text(getattr(app, "status", None), getattr(app, "progress_line", ""),
                                self.size.width or None, protocol_label(getattr(app, "image_class", None))),
                    layout=False)
