"""The preview pane: the running job's x0 preview each step, then the final image, with a progress line."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Center, Vertical
from textual.widgets import Label, ProgressBar, Static

from core.text import visible
from tui.widgets.image import chosen_image_class, make_image


def format_progress(step: int, total: int, elapsed: float) -> str:
    """``step 5/20 · 2.50 it/s · ETA 6s`` (rate and ETA only once there is something to divide)."""
    parts = [f"step {step}/{total}"]
    if step > 0 and elapsed > 0:
        rate = step / elapsed
        parts.append(f"{rate:.2f} it/s" if rate >= 1 else f"{1 / rate:.2f} s/it")
        remaining = max(total - step, 0) / rate
        parts.append(f"ETA {format_duration(remaining)}")
    return " · ".join(parts)


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class PreviewPane(Vertical):
    """Shows one job at a time; ``image_class`` is injected by tests (deterministic half-cell drawing)."""

    DEFAULT_CSS = """
    PreviewPane { width: 1fr; height: 1fr; border: round $primary; padding: 0 1; }
    PreviewPane #preview-title { width: 1fr; height: 1; color: $text-muted; }
    PreviewPane #preview-box { width: 1fr; height: 1fr; align: center middle; }
    PreviewPane #preview-image { width: 1fr; height: 1fr; }
    PreviewPane #preview-image.textual-image { width: auto; height: auto; }
    PreviewPane #preview-empty { width: 1fr; height: 1fr; content-align: center middle; color: $text-muted; }
    PreviewPane ProgressBar { width: 1fr; }
    PreviewPane ProgressBar Bar { width: 1fr; }  /* shrinks first, so "100%" always fits a narrow pane */
    PreviewPane #preview-stats { width: 1fr; height: 1; text-wrap: nowrap; text-overflow: ellipsis; }
    """

    def __init__(self, image_class: type | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._image_class = image_class
        self.job_id: int | None = None
        self.frames_drawn = 0

    def compose(self) -> ComposeResult:
        yield Label("Preview", id="preview-title")
        with Center(id="preview-box"):
            yield Static("Nothing generated yet.\nQueue a job with Ctrl+Enter.", id="preview-empty")
            image = make_image(self._image_class or chosen_image_class(), None, id="preview-image",
                               on_error=self._on_image_error)
            image.display = False
            yield image
        yield ProgressBar(total=1, show_eta=False, id="preview-progress")
        yield Label("", id="preview-stats")

    @property
    def image_widget(self):
        return self.query_one("#preview-image")

    def _on_image_error(self, error: Exception) -> None:
        self.app.notify(f"Could not draw the preview: {error}", severity="warning", markup=False)

    running = False  # a job's steps are being shown (start_job .. finish)

    def start_job(self, job_id: int, prompt: str) -> None:
        self.job_id = job_id
        self.running = True
        title = Text(f"Job #{job_id}: ")
        title.append(visible(prompt[:200]) or "(empty prompt)")
        self._job_title = title
        self.query_one("#preview-title", Label).update(title, layout=False)
        self.query_one("#preview-stats", Label).update("starting…", layout=False)
        self.query_one(ProgressBar).update(total=1, progress=0)

    def show_loras(self, refs: Any) -> None:
        """The running job's LoRAs after its title ("LoRAs: name 0.8, other 0.5/1"; te weight first when it
        differs, as in the tag)."""
        if not refs:
            return
        shown = ", ".join(f"{ref.name} {ref.te:g}/{ref.unet:g}" if ref.te != ref.unet else f"{ref.name} {ref.unet:g}"
                          for ref in refs)
        text = Text(f"[LoRAs: {visible(shown)}] ", style="bold")  # first: a long prompt is cut at the end
        text.append_text(getattr(self, "_job_title", Text("")))
        self.query_one("#preview-title", Label).update(text, layout=False)

    def show_last(self, prompt: str, image: Any) -> None:
        """The newest image from an earlier session, before any job of this one has started."""
        title = Text("Last image: ")
        title.append(visible(prompt[:200]) or "(empty prompt)")
        self.query_one("#preview-title", Label).update(title, layout=False)
        self.query_one("#preview-stats", Label).update("from the history (F5)", layout=False)
        self.show_image(image)

    def show_mask(self, name: str, image: Any) -> None:
        """The init image with the mask's area tinted (the Generate form's inpainting fields)."""
        title = Text("Mask: ")
        title.append(visible(name))
        self.query_one("#preview-title", Label).update(title, layout=False)
        self.query_one("#preview-stats", Label).update("red: the area to repaint", layout=False)
        self.show_image(image)

    def show_step(self, job_id: int, step: int, total: int, elapsed: float, preview: Any = None) -> None:
        if job_id != self.job_id:
            self.job_id = job_id
        self.query_one(ProgressBar).update(total=max(total, 1), progress=step)
        self.query_one("#preview-stats", Label).update(format_progress(step, total, elapsed), layout=False)
        if preview is not None:
            self.show_image(preview)

    def show_image(self, image: Any) -> None:
        widget = self.image_widget
        widget.image = image
        widget.display = True
        self.query_one("#preview-empty").display = False
        self.frames_drawn += 1

    def finish(self, text: str, complete: bool = True) -> None:
        """The job ended: ``text`` says how; the bar fills only for a finished job (a stopped or failed one
        stays at the step it reached, not at 100 % as if its picture were done)."""
        self.running = False
        self.query_one("#preview-stats", Label).update(Text(visible(text)), layout=False)
        bar = self.query_one(ProgressBar)
        if bar.total and complete:
            bar.update(progress=bar.total)
