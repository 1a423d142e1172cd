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

# Below WIDE columns the table drops "time" (the progress column shows it once a job has ended) and "created"
# (in the detail pane), so it fits an 80-column window; the model and prompt get what is left.
WIDE = 100
COLUMNS = ("id", "state", "model", "seed", "size", "progress", "time", "created", "prompt")
NARROW_COLUMNS = ("id", "state", "model", "seed", "size", "progress", "prompt")
FIXED_WIDTHS = {"id": 4, "state": 11, "seed": 10, "size": 9, "progress": 7, "time": 7, "created": 8}
MIN_NAME = 12  # the fewest characters of a model's name kept before its family is left out of the column
MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft", ".gguf")


def model_text(app: Any, model: str, width: int) -> Text:
    """A job's model, shortened to ``width``, with its family (known once the Generate screen has scanned the
    models), dim."""
    family = (getattr(app, "model_families", None) or {}).get(model)
    suffix = f" · {visible(family)}" if family else ""
    name_length = len(short_model(visible(model), 10**6))
    if suffix and width - len(suffix) < min(name_length, MIN_NAME):
        suffix = ""  # a narrow column: the name ("flux1-dev-…") tells jobs apart, "fl…8 · Flux.1 dev" did not
    text = Text(short_model(visible(model), max(width - len(suffix), 4)))
    if suffix:
        text.append(suffix, style="dim")
    return text


ACTIVE = ("pending", "running")
# Jobs to act on (r retries them) are always listed; of the ones done or cancelled, only the newest: the table
# is rebuilt on every job event, and months of jobs (2000 rows: 0.23 s) froze the UI at each image.
KEPT = ("pending", "running", "failed", "interrupted")
RECENT_ENDED = 200


def short_model(model: str, width: int) -> str:
    """The checkpoint's file name without its folders and extension, cut in the middle to ``width``: the
    start and the end (version, variant) are what tell models apart."""
    name = str(model).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    for suffix in MODEL_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
            break
    if len(name) <= width:
        return name
    tail = (width - 1) // 3
    return name[: width - 1 - tail] + "…" + (name[-tail:] if tail else "")


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def column_widths(total: int, rows: int = 0) -> dict[str, int]:
    """Content widths of the model and prompt columns in a table ``total`` cells wide (each column also has
    one cell of padding either side; two more are kept for the vertical scrollbar)."""
    names = COLUMNS if total >= WIDE else NARROW_COLUMNS
    fixed = sum(FIXED_WIDTHS.get(n, 0) for n in names) + 2 * len(names) + 2
    left = max(total - fixed, 16)
    model = min(max(left // 2, 8), 32)
    return {"model": model, "prompt": max(left - model, 8)}


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


def job_parameters(job: Any) -> Text:
    """The job's request, compact (the detail pane has a few lines): model, the numbers, what is set in the
    advanced section, the times, then the prompts. Plain Text: names and prompts are never markup."""
    request = job.request
    seed = "random" if request.seed == -1 else str(request.seed)
    lines = [
        f"model {visible(request.model)}",
        f"seed {seed} · {request.width}×{request.height} · {request.steps} steps · cfg {request.cfg:g} · "
        f"{request.sampler}/{request.schedule} · batch {request.batch_size}×{request.batch_count}",
    ]
    extras = []
    if request.vae:
        extras.append(f"vae {visible(request.vae)}")
    if request.clip_skip != 1:
        extras.append(f"clip skip {request.clip_skip}")
    if request.init_image:
        extras.append(f"init {visible(request.init_image)} (denoise {request.denoise:g})")
    if request.is_inpaint:
        if request.mask:
            area = "only masked" if request.inpaint_area == "only_masked" else "whole picture"
            extras.append(f"mask {visible(request.mask)} (blur {request.mask_blur}, {area})")
        if request.outpaint is not None:
            o = request.outpaint
            extras.append(f"outpaint left {o.left}, right {o.right}, top {o.top}, bottom {o.bottom}")
    if request.hires is not None:
        hires = request.hires
        extras.append(f"hires ×{hires.scale:g} {visible(hires.upscaler)}, {hires.steps or request.steps} steps, "
                      f"denoise {hires.denoise:g}")
    if request.detailer:
        from core.detailer_args import summary

        extras.append(f"detailer {visible(summary(request.detailer))}")
    if extras:
        lines.append(" · ".join(extras))
    if request.upscale is not None:  # an upscale job: nothing above is run, it is the source's record
        scale = f" ×{request.upscale.scale:g}" if request.upscale.scale else ""
        lines.insert(0, f"upscale {visible(request.upscale.image)} with {visible(request.upscale.upscaler)}{scale}")
    times = [f"created {_clock(job.created)}"]
    if job.started:
        times.append(f"started {_clock(job.started)}")
    if _elapsed(job):
        times.append(("took " if job.finished else "running ") + _elapsed(job))
    lines.append(" · ".join(times))
    text = Text("\n".join(lines), style="dim")
    text.append("\n")
    text.append(visible(request.prompt, multiline=True) or "(empty prompt)")
    if request.negative_prompt:
        text.append("\nnegative: ", style="dim")
        text.append(visible(request.negative_prompt, multiline=True))
    return text


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
    QueueScreen #job-detail { height: auto; max-height: 9; padding: 0 1; border-top: solid $secondary; }
    QueueScreen.-short #job-detail { max-height: 7; }
    """

    def compose_body(self) -> ComposeResult:
        yield Label("Queue", id="queue-title", classes="pane-title")
        table: DataTable = DataTable(id="queue-table", cursor_type="row", zebra_stripes=True)
        yield table
        yield Static("", id="job-detail")

    def on_mount(self) -> None:
        if self.quitting():  # built in the background (DarkroomApp._prebuild_next_screen) as the app quits
            return
        self._set_columns()
        self.app.job_events.subscribe(self, self._on_job_event)
        self.app.job_progress.subscribe(self, self._on_progress)
        self.refresh_jobs()

    def _set_columns(self) -> bool:
        """The columns for this width; True when they changed (the rows must be added again)."""
        table = self.query_one(DataTable)
        names = COLUMNS if self.app.size.width >= WIDE else NARROW_COLUMNS
        if tuple(str(key.value) for key in table.columns) == names:
            return False
        table.clear(columns=True)
        for name in names:
            table.add_column(name, key=name)
        return True

    def on_resize(self) -> None:
        self._set_columns()
        if getattr(self, "jobs", None) is not None:
            self.refresh_jobs()

    def on_screen_resume(self) -> None:
        # The table is kept current by the job events while hidden; reading the queue again (for other
        # processes' jobs) waits for the first frame, so the F-key paints at once.
        self.call_after_refresh(self.refresh_jobs)

    def _on_job_event(self, event: Event) -> None:
        self.refresh_jobs()

    def _on_progress(self, progress: Any) -> None:
        table = self.query_one(DataTable)
        key = str(progress.job_id)
        if key in table.rows:
            table.update_cell(key, "progress", f"{progress.step}/{progress.total}")
            job = getattr(self, "jobs", {}).get(progress.job_id)
            if job is not None and "time" in table.columns:
                table.update_cell(key, "time", _elapsed(job))  # the running job's clock keeps counting
            if job is not None and self.selected_job_id() == progress.job_id:
                self.show_detail()  # its "running Ns" counts with the table's clock

    @property
    def table(self) -> DataTable:
        return self.query_one(DataTable)

    def refresh_jobs(self) -> None:
        table = self.table
        try:
            jobs = self.app.store.list_jobs(states=KEPT)
            ended = self.app.store.list_jobs(states=("done", "cancelled"), limit=RECENT_ENDED + 1)
        except Exception as error:  # noqa: BLE001
            self.app.notify(f"Could not read the queue: {error}", severity="error", markup=False)
            return
        older = len(ended) > RECENT_ENDED  # done jobs beyond those listed (their images are in the History)
        fresher = {j.id for j in ended}  # a job that ended between the two reads: the second has it as it is
        jobs = [j for j in jobs if j.id not in fresher]
        jobs = [*(j for j in jobs if j.state in ACTIVE), *sorted(  # the store's order: most recently ended first
            [*(j for j in jobs if j.state not in ACTIVE), *ended[:RECENT_ENDED]],
            key=lambda j: (-(j.finished if j.finished is not None else j.created), j.position, j.id))]
        selected = self.selected_job_id()
        self._set_columns()
        wide = "time" in table.columns
        widths = column_widths(self.app.size.width)
        table.clear()
        for job in jobs:
            request = job.request
            progress = self.app.progress.get(job.id)
            if job.state == "running" and progress is not None:
                done = f"{progress.step}/{progress.total}"
            elif job.state == "done" and wide:
                done = "done"
            elif job.state in ACTIVE or wide:
                done = ""
            else:
                done = _elapsed(job)  # no time column: how long the ended job took
            state = Text(str(job.state))
            if job.state in ("failed", "interrupted"):
                state.stylize("bold red")
            elif job.state == "running":
                state.stylize("bold green")
            cells = {
                "id": str(job.id), "state": state,
                "model": model_text(self.app, request.model, widths["model"]),
                "seed": "random" if request.seed == -1 else str(request.seed),
                "size": f"{request.width}×{request.height}", "progress": done,
                "time": _elapsed(job), "created": _clock(getattr(job, "created", None)),
                "prompt": Text(_cut(" ".join(visible(request.prompt).split()), widths["prompt"])),
            }
            table.add_row(*(cells[str(key.value)] for key in table.columns), key=str(job.id))
        if selected is not None and str(selected) in table.rows:
            table.move_cursor(row=table.get_row_index(str(selected)))
        self.jobs = {job.id: job for job in jobs}
        self.show_detail()
        paused = getattr(self.app.worker, "paused", False)
        count = sum(1 for j in jobs if j.state in ACTIVE)
        self.query_one("#queue-title", Label).update(
            f"Queue — {count} active{' — PAUSED (p to resume)' if paused else ''} — u/d move the selected job"
            + (f" — the last {RECENT_ENDED} done shown" if older else "")  # every image is in the History
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
        kept = self._kept_images(job)
        if kept:
            text.append(f"  {kept}", style="dim")
        text.append("\n")
        text.append_text(job_parameters(job))
        detail.update(text)

    def _kept_images(self, job: Any) -> str:
        """For a job of several images that ended before its last: how many it saved (each image is saved as
        it is made), and that a retry makes only the rest; empty otherwise."""
        request = job.request
        total = request.batch_size * request.batch_count
        if job.state not in ("cancelled", "failed", "interrupted") or total < 2:
            return ""
        try:
            kept = len(self.app.store.job_history(job.id))
        except Exception:  # noqa: BLE001 - a detail line, never an error
            return ""
        rest = f"; r makes the other {total - kept}" if kept < total else ""
        return f"kept {kept} of {total} images (History){rest}"

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
        if job_id is None:
            return
        job = getattr(self, "jobs", {}).get(job_id)
        if job is not None and job.state in ("done", "pending", "running"):
            # retry is for a job that did not finish; say what the user may have meant instead
            hint = ("to make it again, History's g (Again) queues it as a new job" if job.state == "done"
                    else "it has not ended; c cancels it")
            self.app.notify(f"Job #{job_id} is {job.state}: {hint}", severity="warning", timeout=4)
            return
        self._run(f"retry job #{job_id}", self.app.worker.retry, job_id)
