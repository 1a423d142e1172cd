"""Queue screen: live table of jobs with cancel, pause/resume, reorder and retry."""

from __future__ import annotations

import time
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Label, Static

from core.events import Event
from core.text import visible
from tui.screens.base import MainScreen

COLUMNS = ("id", "state", "model", "prompt", "progress", "created", "time")


def model_text(app: Any, model: str) -> Text:
    """A job's model with its family (known once the Generate screen has scanned the models), dim."""
    text = Text(visible(model))
    family = (getattr(app, "model_families", None) or {}).get(model)
    if family:
        text.append(f" · {visible(family)}", style="dim")
    return text
ACTIVE = ("pending", "running")


def _clock(stamp: Any) -> str:
    if not stamp:
        return ""
    if isinstance(stamp, int | float):
        return time.strftime("%H:%M:%S", time.localtime(stamp))
    return str(stamp)[11:19] or str(stamp)


def _elapsed(job: Any) -> str:
    start, end = getattr(job, "started", None), getattr(job, "finished", None)
    if isinstance(start, int | float):
        return f"{(end if isinstance(end, int | float) else time.time()) - start:.1f}s"
    return ""


class QueueScreen(MainScreen):
    MODE = "queue"
    BINDINGS = [
        Binding("c,delete", "cancel_job", "Cancel"),
        Binding("p", "toggle_pause", "Pause/Resume"),
        # Minor bindings stay out of the footer so it fits 120 columns (the keys still work; the hint line names them).
        Binding("u,shift+up", "move(-1)", "Move up", show=False),
        Binding("d,shift+down", "move(1)", "Move down", show=False),
        Binding("r", "retry", "Retry"),
    ]
    DEFAULT_CSS = """
    QueueScreen #queue-table { height: 1fr; }
    QueueScreen #job-detail { height: auto; max-height: 8; padding: 0 1; border-top: solid $secondary; }
    """

    def compose_body(self) -> ComposeResult:
        yield Label("Queue", id="queue-title", classes="pane-title")
        table: DataTable = DataTable(id="queue-table", cursor_type="row", zebra_stripes=True)
        yield table
        yield Static("", id="job-detail")

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        for name in COLUMNS:
            table.add_column(name, key=name)
        self.app.job_events.subscribe(self, self._on_job_event)
        self.app.job_progress.subscribe(self, self._on_progress)
        self.refresh_jobs()

    def on_screen_resume(self) -> None:
        self.refresh_jobs()

    def _on_job_event(self, event: Event) -> None:
        self.refresh_jobs()

    def _on_progress(self, progress: Any) -> None:
        table = self.query_one(DataTable)
        key = str(progress.job_id)
        if key in table.rows:
            table.update_cell(key, "progress", f"{progress.step}/{progress.total}")
            job = getattr(self, "jobs", {}).get(progress.job_id)
            if job is not None:
                table.update_cell(key, "time", _elapsed(job))  # the running job's clock keeps counting

    @property
    def table(self) -> DataTable:
        return self.query_one(DataTable)

    def refresh_jobs(self) -> None:
        table = self.table
        try:
            jobs = self.app.store.list_jobs()
        except Exception as error:  # noqa: BLE001
            self.app.notify(f"Could not read the queue: {error}", severity="error", markup=False)
            return
        selected = self.selected_job_id()
        table.clear()
        for job in jobs:
            request = job.request
            progress = self.app.progress.get(job.id)
            if job.state == "running" and progress is not None:
                done = f"{progress.step}/{progress.total}"
            elif job.state == "done":
                done = "done"
            else:
                done = ""
            state = Text(str(job.state))
            if job.state in ("failed", "interrupted"):
                state.stylize("bold red")
            elif job.state == "running":
                state.stylize("bold green")
            prompt = " ".join(visible(request.prompt).split())[:44]
            table.add_row(
                str(job.id), state, model_text(self.app, request.model), Text(prompt), done,
                _clock(getattr(job, "created", None)), _elapsed(job), key=str(job.id),
            )
        if selected is not None and str(selected) in table.rows:
            table.move_cursor(row=table.get_row_index(str(selected)))
        self.jobs = {job.id: job for job in jobs}
        self.show_detail()
        paused = getattr(self.app.worker, "paused", False)
        count = sum(1 for j in jobs if j.state in ACTIVE)
        self.query_one("#queue-title", Label).update(
            f"Queue — {count} active{' — PAUSED (p to resume)' if paused else ''} — u/d move the selected job"
        )

    def on_data_table_row_highlighted(self) -> None:
        self.show_detail()

    def show_detail(self) -> None:
        """Full prompt and, for failed jobs, the error sentence of the highlighted job (plain text)."""
        job = getattr(self, "jobs", {}).get(self.selected_job_id())
        detail = self.query_one("#job-detail", Static)
        if job is None:
            detail.update("No jobs yet: queue one from Generate (F2)." if not getattr(self, "jobs", {}) else "")
            return
        text = Text(f"#{job.id} {visible(job.state)}", style="bold")
        if job.error:
            text.append("  ")
            text.append(visible(job.error, multiline=True), style="red")
        own_queue = getattr(self.app.worker, "queue", "default")
        if getattr(job, "queue", own_queue) != own_queue:
            text.append(f"  from another process's queue ({visible(job.queue)})", style="dim")
            if job.state in ACTIVE:
                text.append(": it runs there", style="dim")
            elif job.state != "done":
                text.append(": r runs it here", style="dim")
        text.append("\n")
        text.append(visible(job.request.prompt, multiline=True))
        detail.update(text)

    def selected_job_id(self) -> int | None:
        table = self.table
        if table.row_count == 0:
            return None
        try:
            key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key
        except Exception:  # noqa: BLE001 - no cursor row
            return None
        return int(key.value) if key.value is not None else None

    def _run(self, what: str, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except Exception as error:  # noqa: BLE001 - a refused action is a notification, not a crash
            self.app.notify(f"Could not {what}: {error}", severity="error", markup=False)
        self.refresh_jobs()

    def action_cancel_job(self) -> None:
        job_id = self.selected_job_id()
        if job_id is None:
            return
        running = job_id == self.app.running_job

        def cancel() -> None:
            if self.app.worker.cancel(job_id):
                self.app.notify(f"Job #{job_id} {'stops at its next step' if running else 'cancelled'}", timeout=2)
            else:
                self.app.notify(f"Job #{job_id} has already ended", severity="warning", timeout=2)

        self._run(f"cancel job #{job_id}", cancel)

    def action_toggle_pause(self) -> None:
        if self.app.worker.paused:
            self._run("resume the queue", self.app.set_queue_paused, False)
            self.app.notify("Queue resumed", timeout=2)
        else:
            self._run("pause the queue", self.app.set_queue_paused, True)
            self.app.notify("Queue paused: the running job finishes, nothing new starts (also after a restart)",
                            timeout=3)

    def action_move(self, delta: int) -> None:
        job_id = self.selected_job_id()
        if job_id is not None:
            def move() -> None:
                if not self.app.worker.move(job_id, delta):
                    self.app.notify(f"Job #{job_id} already runs {'first' if delta < 0 else 'last'}", timeout=2)

            self._run(f"move job #{job_id}", move)
            table = self.table
            if str(job_id) in table.rows:
                table.move_cursor(row=table.get_row_index(str(job_id)))

    def action_retry(self) -> None:
        job_id = self.selected_job_id()
        if job_id is not None:
            self._run(f"retry job #{job_id}", self.app.worker.retry, job_id)
