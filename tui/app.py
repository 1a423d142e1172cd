"""The Darkroom terminal app.

Threads: the core ``Worker`` runs jobs on its own thread (torch is imported there, never here). Its events
arrive through ``Worker.subscribe`` on that thread and are turned into Textual messages with ``post_message``
(thread-safe, non-blocking). Step messages are throttled and marked replaceable so a slow terminal only ever
draws the newest preview.
"""

from __future__ import annotations

import gc
import importlib
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.text import Text
from textual.app import App
from textual.binding import Binding
from textual.message import Message
from textual.reactive import reactive
from textual.signal import Signal

from core.errors import DarkroomError
from core.events import (
    Event,
    JobCancelled,
    JobFailed,
    JobFinished,
    JobQueued,
    JobStarted,
    JobStep,
    JobWarning,
    Status,
    WorkerStopped,
)
from core.text import visible
from tui.commands import DarkroomCommands
from tui.config import load_settings, save_settings
from tui.grids import GridTracker
from tui.screens.base import breakpoint_classes
from tui.screens.generate import GenerateScreen
from tui.widgets.preview import format_progress

# Hidden test hook: "module:attribute" of a runner factory used instead of the real pipeline.
FAKE_RUNNER_ENV = "DARKROOM_TUI_FAKE_RUNNER"
# Hidden benchmark hook: a file path; on exit the app writes first-paint time and event-loop stalls there.
BENCH_ENV = "DARKROOM_TUI_BENCH"
_timestamps: dict[str, float] = {}  # monotonic times of run_app's phases, for the benchmark hook
PREVIEW_INTERVAL = 0.25  # seconds between preview images sent to the UI (~4/s)


class Progress:
    """Latest step of a job, as the UI last saw it."""

    __slots__ = ("job_id", "step", "total", "elapsed", "image_index")

    def __init__(self, job_id: int, step: int, total: int, elapsed: float, image_index: int = 0) -> None:
        self.job_id, self.step, self.total, self.elapsed, self.image_index = (
            job_id, step, total, elapsed, image_index,
        )


class LoopStallProbe:
    """Benchmark aid: how late the event loop wakes a 5 ms sleeper (the UI thread's stalls)."""

    def __init__(self, app: App) -> None:
        import asyncio

        self.app = app
        self.first_paint_at: float | None = None
        self.max_stall = 0.0
        self.max_stall_in_job = 0.0
        self.max_stall_at = self.max_cpu_stall_at = 0.0  # seconds after the first paint
        self.max_cpu_stall = 0.0  # UI-thread CPU time between two wake-ups: work, not preemption by others
        self.max_cpu_stall_in_job = 0.0
        self.samples_in_job = 0
        self.per_job: dict[int, tuple[float, float]] = {}  # job id -> (max wall stall, max UI cpu stall)
        self._task = asyncio.get_running_loop().create_task(self._run())

    def first_paint(self) -> None:
        self.first_paint_at = time.monotonic()

    def stop(self) -> None:
        """Stop measuring: the user asked to quit (tearing down the app is not a stall anyone waits through)."""
        self._task.cancel()

    async def _run(self) -> None:
        import asyncio

        while True:
            start, cpu_start = time.monotonic(), time.thread_time()
            await asyncio.sleep(0.005)
            stall = time.monotonic() - start - 0.005
            cpu = time.thread_time() - cpu_start
            if self.first_paint_at is None:
                continue
            if stall > self.max_stall:
                self.max_stall, self.max_stall_at = stall, start - self.first_paint_at
            if cpu > self.max_cpu_stall:
                self.max_cpu_stall, self.max_cpu_stall_at = cpu, start - self.first_paint_at
            job = getattr(self.app, "running_job", None)
            if job is not None:
                self.max_stall_in_job = max(self.max_stall_in_job, stall)
                self.max_cpu_stall_in_job = max(self.max_cpu_stall_in_job, cpu)
                self.samples_in_job += 1
                wall_max, cpu_max = self.per_job.get(job, (0.0, 0.0))
                self.per_job[job] = (max(wall_max, stall), max(cpu_max, cpu))

    def write(self, path: str) -> None:
        import json

        self._task.cancel()
        Path(path).write_text(json.dumps({
            "first_paint_monotonic": self.first_paint_at,
            "run_app_monotonic": _timestamps.get("run_app"),
            "app_run_monotonic": _timestamps.get("app_run"),
            "max_stall_s": self.max_stall,
            "max_stall_in_job_s": self.max_stall_in_job,
            "max_cpu_stall_s": self.max_cpu_stall,
            "max_stall_at_s": self.max_stall_at,
            "max_cpu_stall_at_s": self.max_cpu_stall_at,
            "max_cpu_stall_in_job_s": self.max_cpu_stall_in_job,
            "samples_in_job": self.samples_in_job,
            "per_job": {str(k): v for k, v in self.per_job.items()},
            "preview_messages_posted": getattr(self.app, "preview_messages_posted", 0),
            "progress_messages_handled": getattr(self.app, "progress_messages_handled", 0),
        }))


def _lazy_screen(module: str, name: str) -> Callable[[], Any]:
    """A mode's screen, its module imported on the first switch to it: only the Generate screen is needed
    for the first frame, and every import before it delays that frame."""

    def make() -> Any:
        return getattr(importlib.import_module(module), name)()

    return make


# The screens not shown at start are built in the background this long after start, one every
# PREBUILD_BETWEEN_S: after the first frame and the worker's start, so neither is delayed.
PREBUILD_AFTER_S = 1.5
PREBUILD_BETWEEN_S = 0.3
# How long a running job waits at its next step boundary when the user switches screens (Worker.give_way).
SWITCH_GIVE_WAY_S = 0.25


def finished_text(job_id: int, paths: list[str]) -> str:
    """Where the job's images went, said as it ends: a new user's first question after the first job (the
    History's o copies a path later)."""
    if not paths:
        return f"Job #{job_id} finished"
    folders = {str(Path(path).parent) for path in paths}
    if len(paths) == 1:
        where = f"saved {paths[0]}"
    else:
        where = f"{len(paths)} images saved in {folders.pop()}" if len(folders) == 1 else f"{len(paths)} images saved"
    return f"Job #{job_id} finished: {where}"  # notify makes the path's control characters visible


class DarkroomApp(App[int]):
    # The Generate screen's rules load with the app's: a screen's own CSS_PATH re-parses the whole stylesheet
    # when the screen mounts, before the first frame.
    CSS_PATH = ["app.tcss", "screens/generate.tcss"]
    TITLE = "Darkroom"
    COMMANDS = App.COMMANDS | {DarkroomCommands}
    MODES = {
        "generate": GenerateScreen,
        "presets": _lazy_screen("tui.screens.presets", "PresetsScreen"),
        "queue": _lazy_screen("tui.screens.queue", "QueueScreen"),
        "history": _lazy_screen("tui.screens.history", "HistoryScreen"),
    }
    DEFAULT_MODE = "generate"
    # Size classes on every screen, for layouts that still work in an 80x24 SSH window (see the .tcss files).
    # Below -wide the footer's keys are spaced closer (app.tcss): the roomier spacing starts where the longest
    # footer (History's, with its copy keys) fits with it.
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (72, "-medium"), (124, "-wide")]
    VERTICAL_BREAKPOINTS = [(0, "-short"), (30, "-tall")]
    BINDINGS = [
        # Named in the screen tabs at the top, so the footer keeps its room for each screen's own keys.
        Binding("f2", "switch_mode('generate')", "Generate", show=False),
        Binding("f3", "switch_mode('presets')", "Presets", show=False),
        Binding("f4", "switch_mode('queue')", "Queue", show=False),
        Binding("f5", "switch_mode('history')", "History", show=False),
        # From any screen, also while typing; in the footer only while a job runs (see check_action).
        Binding("ctrl+s", "stop_job", "Stop job", priority=True),
        # The same key while idle: the binding above is disabled with its footer entry, and this one, never
        # shown, says that no job is running (Textual tries a key's bindings in order).
        Binding("ctrl+s", "stop_job('idle')", "Stop job", show=False, priority=True),
        Binding("ctrl+q", "quit", "Quit", priority=True),
        # Not a priority binding: in a text field Ctrl+Z undoes; anywhere else it suspends (fg resumes).
        Binding("ctrl+z", "suspend_process", "Suspend", show=False),
    ]

    # repaint=False: the status bar watches these and redraws itself. An App reactive that repaints marks the
    # whole screen dirty, and a full-screen render on every step was the largest UI stall during a job.
    status: reactive[Status | None] = reactive(None, always_update=True, repaint=False)
    progress_line: reactive[str] = reactive("", repaint=False)

    class CoreEvent(Message):
        """A worker event other than a step (never dropped)."""

        def __init__(self, event: Event) -> None:
            super().__init__()
            self.event = event

    class JobProgress(Message):
        """One step of a job; a newer one replaces a queued older one so stale previews drop."""

        def __init__(self, event: JobStep) -> None:
            super().__init__()
            self.event = event

        def can_replace(self, message: Message) -> bool:
            # Drop this (older) message when a newer step of the same job is queued, unless that would lose a
            # preview image the newer one does not carry.
            return (
                isinstance(message, DarkroomApp.JobProgress)
                and message.event.job_id == self.event.job_id
                and (message.event.preview is not None or self.event.preview is None)
            )

    def __init__(
        self,
        worker: Any,
        registry: Any,
        *,
        image_class: type | None = None,
        settings_file: Path | None = None,
        presets_api: Any = None,
        start_worker: bool = True,
    ) -> None:
        super().__init__()
        self.worker = worker
        self.store = worker.store
        self.registry = registry
        self.image_class = image_class
        self.settings_file = settings_file
        self.presets_api = presets_api
        self.start_worker = start_worker
        self.settings: dict[str, Any] = load_settings(settings_file)
        self.job_events: Signal[Event] = Signal(self, "job_events")
        self._signal_handlers: list[tuple[Any, int]] = []  # (event loop, SIGHUP/SIGTERM) from _handle_hangup
        self.job_progress: Signal[Progress] = Signal(self, "job_progress")
        self.progress: dict[int, Progress] = {}
        self.running_job: int | None = None
        self.generate_screen: GenerateScreen | None = None
        self.pending_history_search: str | None = None
        self.grids = GridTracker(self)  # X/Y/Z grids queued here, until their grid image is saved
        self.preview_messages_posted = 0
        self.progress_messages_handled = 0
        self._unsubscribe: Callable[[], None] | None = None
        self._last_preview_sent = 0.0
        self._stopped = False
        self._frozen_modules = len(sys.modules)
        self._frozen_model: str | None = None
        self._stop_lock = threading.Lock()
        self.prebuild_screens = True  # see _prebuild_next_screen
        self._laid_out: set[str] = set()  # modes whose prebuilt screen was laid out (_lay_out_in_background)

    # ---- lifecycle -----------------------------------------------------------------------------------------

    def on_mount(self) -> None:
        self._unsubscribe = self.worker.subscribe(self._on_worker_event)
        self.app_resume_signal.subscribe(self, self._repaint_after_resume)
        self._handle_hangup()
        if os.environ.get(BENCH_ENV):  # first, so the mark is not delayed by the after-paint work below
            self._bench = LoopStallProbe(self)
            self.call_after_refresh(self._bench.first_paint)
        # Start the worker after the first frame: its threads import torch, which would compete for the GIL
        # with the first paint.
        self.call_after_refresh(self._start_worker)
        self.call_after_refresh(self._first_screen_styled)
        if self.prebuild_screens:
            self.set_timer(PREBUILD_AFTER_S, self._prebuild_next_screen)

    def _prebuild_next_screen(self) -> None:
        """Build one not yet visited screen (Presets, Queue, History) in the background, in the next turn draw
        it off screen (_lay_out_in_background), then go on with the next screen.

        A screen's first visit imports its module, parses its stylesheet and builds its widgets: 0.5-1.5 s
        during a job (bench/bench_tui.py --switch-rounds), against well under 100 ms for a later visit. Done
        here, one screen per turn with keys handled in between, the first F-key is as fast as the later ones.
        Textual builds a mode's screen only when it is entered; ``_init_mode`` is the step of ``switch_mode``
        that does it without making the screen current (skipped, lazy as before, if Textual lacks it).
        """
        init_mode = getattr(self, "_init_mode", None)
        if init_mode is None or self._exit or not self.is_running:
            return
        generate = self.generate_screen
        if generate is not None and not generate.settled:  # the form and its model list come first
            self.set_timer(PREBUILD_BETWEEN_S, self._prebuild_next_screen)
            return
        waiting = False  # a screen built in an earlier turn that has not finished mounting
        for mode in self.MODES:
            stack = self._screen_stacks.get(mode)
            if stack and mode != self.current_mode and mode not in self._laid_out:
                if not stack[0].is_mounted:
                    waiting = True
                    continue
                self._laid_out.add(mode)
                self._lay_out_in_background(stack[0])
                self.set_timer(PREBUILD_BETWEEN_S, self._prebuild_next_screen)
                return
            if mode not in self._screen_stacks and mode != self.current_mode:
                # A new screen counts as "CSS out of date" (-1), and _init_mode then re-applies the whole
                # stylesheet to the *current* screen (a 0.5 s stall here, measured) while the new screen keeps
                # its stale count, so its first visit does it again. The new screen's own CSS is loaded and
                # applied as its widgets mount, so both are redundant: mark the app's CSS as seen for the call
                # and the new screen as up to date after it.
                seen = self._css_update_count
                self._css_update_count = -1
                try:
                    init_mode(mode)
                finally:
                    self._css_update_count = seen
                for screen in self._screen_stacks.get(mode, []):
                    screen._css_update_count = seen
                    # this width's classes before its footer builds its keys: their spacing depends on them
                    screen.update_classes(breakpoint_classes(self, *self.size))
                self.set_timer(PREBUILD_BETWEEN_S, self._prebuild_next_screen)
                return
        if waiting:
            self.set_timer(PREBUILD_BETWEEN_S, self._prebuild_next_screen)

    def _lay_out_in_background(self, screen: Any) -> None:
        """Give a screen built in the background its layout and draw its widgets once, off screen.

        Textual renders only the current screen, so a prebuilt screen's first visit rendered every line of
        every widget for the first time: 2-3x a later visit, which finds most lines cached (bench/bench_tui.py).
        ``_refresh_layout`` is the step a visit runs (it arranges the widgets as they are now: the screen's
        data may have arrived since it was built); the compositor's update rendered here is discarded, only the
        current screen is ever displayed.
        """
        if self._exit or not screen.is_attached:
            return
        screen._refresh_layout(self.size)
        screen._compositor.render_update(full=True)

    def _first_screen_styled(self) -> None:
        """Textual's start-up stylesheet pass runs before the first screen has mounted, so that screen keeps
        the "never styled" count (-1) and the first switch back to it (F2 after visiting another screen)
        re-parsed and re-applied the whole stylesheet: 450 ms during a job, the slowest F-key of all
        (bench/bench_tui.py). Its widgets were styled as they mounted, after that pass (as the screens built in
        _prebuild_next_screen are): mark it up to date. A theme change since then has its own pass queued,
        which still runs and counts again."""
        screen = self.screen
        if screen.is_mounted and screen._css_update_count == -1:
            screen._css_update_count = self._css_update_count

    def _freeze_new_modules(self) -> None:
        """The worker's threads import torch and the pipeline's modules after startup, then load models: long-
        lived objects that every full collection on the UI thread would walk again (20-100 ms stalls, measured
        with bench_tui.py). When many modules appeared or another model was loaded, freeze what exists, without
        collecting: a full collection here, with torch loaded, is itself a ~270 ms UI stall. Freezing a model
        costs nothing later: an unloaded model is freed by reference counting (our networks hold no reference
        cycles; tests/test_checkpoint.py checks), and the pipeline collects on its own thread when it switches."""
        status = self.status
        loaded = status.loaded_model if status is not None else None
        if len(sys.modules) > self._frozen_modules + 50 or loaded != self._frozen_model:
            gc.freeze()
            self._frozen_modules = len(sys.modules)
            self._frozen_model = loaded

    def _start_worker(self) -> None:
        # Everything built so far (modules, CSS, widgets) lives as long as the app: move it out of the cyclic
        # collector's reach so full (gen 2) collections stay short instead of stalling the UI ~100 ms. No
        # collection first: it would stall the UI just after the first paint (~90 ms CPU here) to free the
        # little garbage startup leaves.
        gc.freeze()
        gc.enable()  # run_app turns the collector off until the first frame is painted
        self._frozen_modules = len(sys.modules)
        if self.start_worker and not self._stopped:
            try:
                self.grids.restore()  # before any cell can end: grids an earlier run left without their image
            except Exception as error:  # noqa: BLE001 - the database failed: the queue still runs
                self.notify(f"Could not read the open X/Y/Z grids: {error}", severity="error", markup=False)
            try:  # jobs queued when the app was last closed run again at once: say so, or they start unasked
                left = self.store.pending_count(getattr(self.worker, "queue", None))
            except Exception:  # noqa: BLE001 - a note only: the worker says what is wrong with the database
                left = 0
            try:
                jobs = f"{left} job{'s' * (left != 1)}"
                if self.settings.get("queue_paused") is True:  # paused when the app was last left
                    self.worker.pause()
                    self.notify("The queue is paused, as you left it" + (f", with {jobs} waiting" if left else "")
                                + ": p on the Queue screen (F4) resumes it", timeout=6)
                elif left:
                    self.notify(f"Running {jobs} left in the queue from last time (F4 lists them; p there pauses "
                                "the queue)", timeout=6)
                self.worker.start()
            except Exception as error:  # a worker that cannot start must not take the UI down
                self.notify(f"The worker could not start: {error}", severity="error", markup=False)

    def on_unmount(self) -> None:
        try:
            if getattr(self, "_bench", None) is not None:
                self._bench.write(os.environ[BENCH_ENV])
            self.save_form_settings()
            if self._unsubscribe is not None:
                self._unsubscribe()
                self._unsubscribe = None
            self.stop_worker(finish_current=False)
        finally:
            # Only once the worker has stopped: removing a handler restores the default action, and a second
            # SIGHUP (the shell passes the terminal's on to its jobs) or a SIGTERM during the stop killed the
            # app with its job left 'running'. The loop may outlive the app (tests run several).
            for loop, signum in self._signal_handlers:
                loop.remove_signal_handler(signum)
            self._signal_handlers.clear()
        gc.unfreeze()
        gc.enable()

    def stop_worker(self, finish_current: bool) -> None:
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        try:
            self.worker.stop(finish_current=finish_current, timeout=None if finish_current else 10)
        except Exception:  # noqa: BLE001 - quitting must always work
            pass

    def save_form_settings(self) -> None:
        try:
            screen = self.get_generate_screen()
            if screen is not None and screen.is_mounted:
                try:
                    self.settings.update(screen.form_values())
                except Exception:  # noqa: BLE001 - being torn down: keep the values tracked so far
                    pass
            save_settings(self.settings, self.settings_file)
        except Exception:  # noqa: BLE001 - settings are a convenience, never a reason to crash
            pass

    def notify(
        self,
        message: str,
        *,
        title: str = "",
        severity: Any = "information",
        timeout: float | None = None,
        markup: bool = False,
    ) -> None:
        """Every notification of every screen: messages carry prompts, file, model and tensor names, so they
        are shown with control characters made visible and, unless a caller asks, never parsed as markup."""
        super().notify(visible(message, multiline=True), title=visible(title), severity=severity,
                       timeout=timeout, markup=markup)

    def action_suspend_process(self) -> None:
        # Textual stops the process with SIGSTOP, which nothing resumes where no job-control shell started it
        # (`tmux new-session darkroom`, an ssh command): the pane would stay frozen. Such a process leads its
        # own session (its group is the session); a shell's job is a group of its own within the shell's.
        if sys.platform != "win32" and os.getpgrp() == os.getsid(0):
            self.notify("Ctrl+Z suspends only when Darkroom was started from a shell (there is none to go back "
                        "to here); Ctrl+Q quits", timeout=5)
            return
        super().action_suspend_process()

    def _handle_hangup(self) -> None:
        """SIGHUP (the terminal or SSH link closed) and SIGTERM quit as Ctrl+Q then 'leave it' does: the
        running job is marked interrupted at its next step (on_unmount stops the worker). The default action
        killed the process at once, leaving the job 'running' until a later start's recovery. Signals that are
        ignored (nohup) stay so."""
        import asyncio
        import signal

        loop = asyncio.get_running_loop()
        for name in ("SIGHUP", "SIGTERM"):
            signum = getattr(signal, name, None)
            try:
                if signum is not None and signal.getsignal(signum) is signal.SIG_DFL:
                    loop.add_signal_handler(signum, self.exit, None, 128 + signum)
                    self._signal_handlers.append((loop, signum))
            except (NotImplementedError, RuntimeError, ValueError):  # Windows, or not the main thread
                pass

    def _repaint_after_resume(self, _app: Any) -> None:
        # fg after Ctrl+Z: Textual enters the alternate screen again, which starts blank, and repaints only
        # what changed (the status line, on its 1 s tick): the rest stayed blank until something moved.
        self.screen.refresh(self.screen.region)

    def action_help_quit(self) -> None:
        # Ctrl+C (Textual's binding: Ctrl+C copies in a text field and never quits). Textual's own hint is markup
        # ("Press [b]ctrl+q[/b] ..."), which notify above never parses: it showed the tags.
        self.notify("Ctrl+Q quits Darkroom (Ctrl+C copies the selection in a text field)",
                    title="Do you want to quit?")

    def switch_mode(self, mode: str) -> Any:
        if mode != self.current_mode:
            # The repaint that follows is the UI's biggest burst of work; a running job steps aside for it
            # (it otherwise holds the GIL for most of each step: 200+ ms switches instead of < 100).
            self.worker.give_way(SWITCH_GIVE_WAY_S)
        self._switching_mode = True
        try:
            return super().switch_mode(mode)
        finally:
            self._switching_mode = False

    def delay_update(self, delay: float = 0.05) -> None:
        # Textual's switch_mode holds every paint for 50 ms to mask the transition. Our screens are built once
        # and resume complete, so there is nothing to mask, and the hold (longer on a busy event loop: it ends
        # on a timer) was the largest part of the F-key-to-paint latency during a job (bench_tui.py).
        if not getattr(self, "_switching_mode", False):
            super().delay_update(delay)

    def get_generate_screen(self) -> GenerateScreen | None:
        """The Generate screen once it has been mounted (it registers itself)."""
        return self.generate_screen

    # ---- worker thread -> UI -------------------------------------------------------------------------------

    def _on_worker_event(self, event: Event) -> None:
        """Runs on the worker thread: wrap, throttle previews, post. Must stay cheap."""
        if isinstance(event, JobStep):
            preview = event.preview
            now = time.monotonic()
            if preview is not None:
                if now - self._last_preview_sent < PREVIEW_INTERVAL and event.step < event.total:
                    preview = None
                else:
                    self._last_preview_sent = now
                    self.preview_messages_posted += 1
            if preview is not event.preview:
                event = JobStep(event.job_id, event.step, event.total, event.elapsed, preview, event.image_index)
            self.post_message(self.JobProgress(event))
        else:
            self.post_message(self.CoreEvent(event))

    @property
    def closing(self) -> bool:
        """From ``exit()`` on (the screens' widgets may be half removed by then) and once no screen is left."""
        return not self.screen_stack or not self.screen.is_attached

    def on_darkroom_app_job_progress(self, message: JobProgress) -> None:
        event = message.event
        self.progress_messages_handled += 1
        progress = Progress(event.job_id, event.step, event.total, event.elapsed, event.image_index)
        self.progress[event.job_id] = progress
        self.progress_line = f"job #{event.job_id} " + format_progress(event.step, event.total, event.elapsed)
        screen = self.get_generate_screen()
        if screen is not None and screen.is_mounted and not self.closing:
            screen.show_step(event)
        self.job_progress.publish(progress)

    def on_darkroom_app_core_event(self, message: CoreEvent) -> None:
        event = message.event
        if self.closing:  # the store has the event, there is nothing to update
            return
        if isinstance(event, WorkerStopped):
            self.database_failed(event.error)
            return
        if isinstance(event, Status):
            self.status = event
            self._freeze_new_modules()
            return
        if isinstance(event, JobStarted):
            self.running_job = event.job_id
            self.refresh_bindings()  # the footer shows the stop key
        elif isinstance(event, JobFinished | JobFailed | JobCancelled):
            if self.running_job == event.job_id:
                self.running_job = None
                self.progress_line = ""
                self.refresh_bindings()
            self.grids.job_ended(event)
            if isinstance(event, JobFinished):
                self.notify(finished_text(event.job_id, event.paths), markup=False, timeout=5)
            elif isinstance(event, JobFailed):
                self.notify(f"Job #{event.job_id} failed: {event.error}", severity="error", markup=False,
                            timeout=8)
        elif isinstance(event, JobWarning):
            # the text can quote a prompt or a file name: notify shows control characters, and no markup here
            self.notify(f"Job #{event.job_id}: {event.text}", severity="warning", markup=False, timeout=6)
        elif isinstance(event, JobQueued):
            self.grids.job_queued(event)
        screen = self.get_generate_screen()
        if screen is not None and screen.is_mounted:
            screen.show_event(event)
        self.job_events.publish(event)

    def database_failed(self, error: str) -> None:
        """The job database cannot be used (locked by another process too long, disk full): nothing can be
        queued or recorded, so leave with that one message (printed after the screen is restored)."""
        self.exit(return_code=1, message=Text(f"darkroom: error: {visible(error, multiline=True)}"))

    def _handle_exception(self, error: Exception) -> None:
        from core.store import StoreError

        if isinstance(error, StoreError):  # a screen's query met the failing database: its message, no traceback
            self.database_failed(str(error))
            return
        super()._handle_exception(error)

    # ---- actions -------------------------------------------------------------------------------------------

    def submit(self, request: Any, priority: int = 0) -> int | None:
        """Queue a request; every failure becomes a notification."""
        try:
            job_id = self.worker.submit(request, priority=priority)
        except DarkroomError as error:
            self.notify(str(error), severity="error", markup=False)
            return None
        except Exception as error:  # noqa: BLE001
            self.notify(f"Could not queue the job: {error}", severity="error", markup=False)
            return None
        self.notify(f"Queued job #{job_id}", timeout=2)
        return job_id

    def set_queue_paused(self, paused: bool) -> None:
        """Pause (the running job finishes, nothing new starts) or resume; remembered across restarts."""
        if paused:
            self.worker.pause()
        else:
            self.worker.resume()
        self.settings["queue_paused"] = paused
        self.save_form_settings()

    def load_into_generate(self, values: dict[str, Any]) -> None:
        screen = self.get_generate_screen()
        self.settings.update(values)
        self.switch_mode("generate")
        if screen is not None and screen.is_mounted:
            screen.set_form_values(values)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "stop_job" and not parameters and self.running_job is None:
            return False  # hidden from the footer; the key still answers (the binding with 'idle')
        return True

    def action_stop_job(self, _key: str = "") -> None:
        """Cancel the running job (it stops at its next step); the queue goes on with the next one."""
        job_id = self.running_job
        if job_id is None:
            self.notify("No job is running.", timeout=2)
            return
        try:
            stopped = self.worker.cancel(job_id)
        except Exception as error:  # noqa: BLE001 - a refused action is a notification, not a crash
            self.notify(f"Could not stop job #{job_id}: {error}", severity="error", markup=False)
            return
        self.notify(f"Job #{job_id} stops at its next step" if stopped else f"Job #{job_id} has already ended",
                    timeout=2)

    async def action_quit(self) -> None:
        if getattr(self, "_bench", None) is not None:
            self._bench.stop()
        if self.running_job is None:
            self.exit(0)
            return

        def decided(choice: str | None) -> None:
            if choice is None:
                return
            self.notify("Waiting for the running job to finish…" if choice == "finish" else "Stopping…")
            self.run_worker(lambda: self._stop_then_exit(choice == "finish"), thread=True, group="quit")

        from tui.screens.quit import QuitScreen

        self.push_screen(QuitScreen(self.running_job), decided)

    def _stop_then_exit(self, finish_current: bool) -> None:
        self.save_form_settings_from_thread()
        self.stop_worker(finish_current=finish_current)
        self.call_from_thread(self.exit, 0)

    def save_form_settings_from_thread(self) -> None:
        self.call_from_thread(self.save_form_settings)


# ---- construction from CLI arguments ---------------------------------------------------------------------------


def _runner_factory(args: Any) -> Callable[[], Any]:
    """The runner is built inside the worker thread, so torch is never imported on the UI thread."""
    from core.accel.attention_mode import resolve_mode
    from core.accel.compile_mode import resolve_mode as resolve_compile
    from core.accel.memory_mode import resolve_mode as resolve_memory_mode
    from core.accel.precision_mode import resolve_mode as resolve_precision

    attention = resolve_mode(getattr(args, "attention", None))  # a bad $DARKROOM_ATTENTION stops us here
    memory = resolve_memory_mode(bool(getattr(args, "lowvram", False)))  # and a bad $DARKROOM_MEMORY
    compile_mode = resolve_compile(getattr(args, "compile", None))
    precision = resolve_precision(getattr(args, "precision", None))
    fake = os.environ.get(FAKE_RUNNER_ENV)
    if fake:
        module_name, _, attr = fake.partition(":")

        def make_fake() -> Any:
            return getattr(importlib.import_module(module_name), attr or "FakeRunner")()

        return make_fake

    from core.runner import runner_factory

    models_dirs = [Path(p) for p in (getattr(args, "models_dir", None) or [])] or None
    return runner_factory(models_dirs, attention=attention, memory=memory, compile=compile_mode,
                          precision=precision)


def _fake_registry() -> Any:
    from types import SimpleNamespace

    class FakeRegistry:
        search_dirs = [Path("fake-models")]

        def checkpoints(self) -> list[Any]:
            return [SimpleNamespace(name="fake-model.safetensors", path=Path("fake-model.safetensors"), size=0)]

    return FakeRegistry()


def create_app(args: Any, image_class: type | None = None) -> DarkroomApp:
    from core.paths import default_output_dir, unrecordable_name
    from core.store import JobStore
    from core.worker import Worker

    models_dirs = [Path(p) for p in (getattr(args, "models_dir", None) or [])] or None
    if os.environ.get(FAKE_RUNNER_ENV) and models_dirs is None:  # with --models-dir: the real listing
        registry = _fake_registry()
    else:
        from core.models.registry import ModelRegistry

        registry = ModelRegistry(models_dirs)
    store = JobStore(getattr(args, "db", None))
    output_dir = getattr(args, "output_dir", None) or default_output_dir()
    if (why := unrecordable_name(output_dir)) is not None:  # no job could be recorded, none would run
        raise DarkroomError(f"--output-dir {output_dir}: {why}")
    worker = Worker(store, _runner_factory(args), output_dir=output_dir, yield_cpu=True)
    return DarkroomApp(worker, registry, image_class=image_class)


def run_app(args: Any) -> int:
    """Entry point used by ``cli/main.py``. Returns the process exit code."""
    _timestamps["run_app"] = time.monotonic()
    # No cyclic garbage collection until the first frame is painted (DarkroomApp._start_worker collects once,
    # freezes and turns it back on): building the first screen allocates tens of thousands of objects, and the
    # collections they trigger delay the first paint while freeing nothing.
    gc.disable()
    from tui.widgets.image import prepare_image_protocol

    try:
        # Probe the terminal for kitty/sixel support now: after App.run() Textual owns stdin.
        image_class = prepare_image_protocol(getattr(args, "image_protocol", None))
        app = create_app(args, image_class=image_class)
    except DarkroomError as error:
        gc.enable()
        print(f"darkroom: {visible(error)}", file=sys.stderr)
        return 2
    _timestamps["app_run"] = time.monotonic()
    result = app.run()
    return int(result or app.return_code or 0)
