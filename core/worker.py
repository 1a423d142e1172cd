"""The worker: one background thread that owns the device and runs queued jobs one at a time.

Front ends (TUI, batch runner) talk to it through ``submit``/``cancel``/``pause``/... and observe it through
``subscribe`` (events from ``core.events``). The runner that actually generates images is created inside the
worker thread when the first job starts, so torch and the models are never imported on the UI thread.

Two threads per worker:
- the job thread claims jobs from the store (priority, then FIFO), runs them, saves images and history;
- the status thread sends a ``Status`` at least once per ``status_interval`` while busy and on every state
  change, heartbeats the running job, and notices cancels requested through the database by another process.

When the database itself fails (a ``StoreError``: locked by another process past the busy timeout, disk full),
either thread stops both: one ``WorkerStopped`` event carries the message, nothing is retried every second.
The running job stays marked running; the next start's crash recovery (``core.recovery``) ends it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import logging
import os
import sys
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import DarkroomError
from core.events import (
    Event,
    ImageSaved,
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
from core.request import GenerationRequest
from core.runner import GeneratedImage, JobRunner, RunnerUnavailableError, runner_factory
from core.store import Job, JobStore, StoreError

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

try:  # the samplers' own cancel exception, when they define one, so both layers raise the same thing
    from core.sampling import Cancelled as JobCancelledError  # type: ignore[attr-defined]
except ImportError:

    class JobCancelledError(Exception):  # type: ignore[no-redef]
        """Raised by ``JobContext.step`` when the job was cancelled; runners let it propagate."""


class JobContext:
    """Handed to the runner for one job: progress reporting and cancellation."""

    def __init__(self, worker: Worker, job_id: int) -> None:
        self.job_id = job_id
        self._worker = worker
        self._job: Job | None = None  # the claimed job with its seed resolved (set by the worker before run)
        # seed -> path of every image of this job saved and recorded so far, by this run or an earlier one (a
        # retry of a job killed or stopped midway); the worker fills it before the runner starts
        self.saved: dict[int, str] = {}
        self.earlier: frozenset[int] = frozenset()  # the seeds of ``saved`` an earlier run saved
        self.announced: set[int] = set()  # the seeds sent as ImageSaved in this run
        self._started = time.monotonic()
        self._cancel = threading.Event()  # user cancel
        self._interrupt = threading.Event()  # worker stopping without finishing the job
        self.last_step: tuple[int, int] | None = None

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._started

    def is_cancelled(self) -> bool:
        return self._cancel.is_set() or self._interrupt.is_set()

    def check_cancelled(self) -> None:
        if self.is_cancelled():
            raise JobCancelledError(f"job {self.job_id} was cancelled")

    def step(self, step: int, total: int, preview: Image.Image | None = None, image_index: int = 0) -> None:
        """Report a finished sampling step; raises ``JobCancelledError`` once the job is cancelled."""
        self.check_cancelled()
        self.last_step = (step, total)
        self._worker._emit(JobStep(self.job_id, step, total, self.elapsed, preview, image_index))
        self._worker._give_way()

    def set_activity(self, text: str) -> None:
        """What the worker is doing now, e.g. ``"loading model.safetensors"`` (sent as a Status)."""
        self._worker._set_activity(text)

    def has_image(self, seed: int) -> bool:
        """True when this job's image of ``seed`` is saved already (an earlier run of it got that far): the
        runner need not make it again."""
        return seed in self.saved

    def save_images(self, images: Sequence[GeneratedImage]) -> None:
        """Save and record finished images now, before the rest of the job is made, so a crash or kill later
        in the job keeps them (an image of a seed saved before is not saved again)."""
        if self._job is None:
            raise RuntimeError("save_images() before the worker handed the job to a runner")
        self._worker._save(self._job, images, self)


def _default_runner_factory() -> JobRunner:
    return runner_factory()()


def failure_log_path() -> Path:
    from core.paths import data_dir

    return data_dir() / "logs" / "worker.log"


# The longest a job waits between two steps for the UI (Worker.give_way): a screen switch paints in well under
# this, and a job is never held longer by one key.
MAX_GIVE_WAY_S = 0.3
# Claiming the next job failed this many times in a row with an error that is not the database's own (those stop
# the worker at once): the queue cannot go on, so the worker stops with one message instead of retrying forever.
CLAIM_ATTEMPTS = 3

_log_lock = threading.Lock()


def _log_failure(job_id: int, exc: BaseException) -> None:
    """Write the traceback of an unexpected error to the log file (the user sees one sentence)."""
    try:
        path = failure_log_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        with _log_lock, path.open("a", encoding="utf-8") as f:
            f.write(f"--- {_dt.datetime.now().isoformat(timespec='seconds')} job {job_id}\n{text}\n")
    except OSError:
        log.exception("job %s failed and the failure log could not be written", job_id)


def _drop_frames(exc: BaseException) -> None:
    """Clear the tracebacks of ``exc`` and of the exceptions chained to it (cause, context)."""
    pending, seen = [exc], set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        current.__traceback__ = None
        pending += [current.__cause__, current.__context__]


def lower_thread_priority(step: int = 5) -> bool:
    """Lower the calling thread's scheduling priority by ``step`` nice levels. Linux keeps a nice value per
    thread and a new thread starts with its creator's, so the threads this one starts later (torch's intra-op
    pool is made by the first thread that runs a parallel op) inherit it. False where it cannot be done."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + step))
    except (AttributeError, OSError):
        return False
    return True


class _JobWarnings(logging.Handler):
    """The core's warnings logged on the job's own thread, as ``JobWarning`` events for the front ends (which
    show them as they show any job text); other threads' records and other levels are not the job's."""

    def __init__(self, emit: Callable[[str], None]) -> None:
        super().__init__(logging.WARNING)
        self.emit_text = emit
        self.thread = threading.get_ident()

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno == logging.WARNING and record.thread == self.thread

    def handle(self, record: logging.LogRecord) -> bool:
        if self.filter(record):
            return super().handle(record)
        # not the job's: where it went without this handler (Python's last resort, when nothing is configured)
        last = logging.lastResort
        if last is not None and not logging.getLogger().handlers and record.levelno >= last.level:
            last.handle(record)
        return False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.emit_text(record.getMessage())
        except Exception:  # noqa: BLE001 - a subscriber's failure is logged by _emit; never fail the job for it
            self.handleError(record)


@contextlib.contextmanager
def _job_warnings(emit: Callable[[str], None]) -> Iterator[None]:
    handler = _JobWarnings(emit)
    core = logging.getLogger("core")
    core.addHandler(handler)
    try:
        yield
    finally:
        core.removeHandler(handler)


class Worker:
    """Runs the jobs of one queue of a ``JobStore`` on a background thread."""

    def __init__(
        self,
        store: JobStore,
        runner: JobRunner | Callable[[], JobRunner] | None = None,
        *,
        output_dir: Path | None = None,
        queue: str = "default",
        private_queue: bool = False,
        status_interval: float = 1.0,
        yield_cpu: bool = False,
    ) -> None:
        self.store = store
        # Interactive front ends (the TUI): the job thread, and the CPU threads torch starts from it, yield the
        # CPU to the UI thread and the terminal, so a key is answered at once while a CPU job keeps every core
        # busy; idle cores still go to the job, so it runs as fast when nobody types.
        self.yield_cpu = yield_cpu
        self.queue = queue
        # A private queue (a batch run's) is this process's alone: its pending jobs are marked as owned, so
        # they become interrupted (and retryable elsewhere) once this process is gone.
        self.private_queue = private_queue
        self.status_interval = status_interval
        # absolute: history rows and printed paths must still point at the image from another folder
        self._output_dir = Path(output_dir).absolute() if output_dir is not None else None
        self._runner_spec = runner
        self._runner: JobRunner | None = None
        self._subscribers: list[Callable[[Event], None]] = []
        self._sub_lock = threading.Lock()
        self._emit_lock = threading.RLock()  # subscribers see one event at a time, in order
        self._wake = threading.Event()
        self._status_dirty = threading.Event()
        self._stop = threading.Event()
        self._loop_done = threading.Event()
        self._finish_current = False
        self._paused = False
        self._give_way_until = 0.0  # monotonic time until which the job waits between steps (give_way)
        self._current: JobContext | None = None
        self._activity = "idle"
        self._device: Any = None
        self._thread: threading.Thread | None = None
        self._status_thread: threading.Thread | None = None
        self._failures: OrderedDict[int, BaseException] = OrderedDict()
        self._fatal_lock = threading.Lock()
        self.fatal_error: StoreError | None = None  # why the worker stopped by itself (see WorkerStopped)

    # ---- control (any thread) ----------------------------------------------------------------------------

    @property
    def output_dir(self) -> Path:
        if self._output_dir is None:
            from core.paths import default_output_dir

            self._output_dir = default_output_dir().absolute()
        return self._output_dir

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def current_job_id(self) -> int | None:
        ctx = self._current
        return ctx.job_id if ctx else None

    def start(self) -> None:
        if self.running:
            return
        self._stop.clear()
        self._loop_done.clear()
        self.fatal_error = None
        self._finish_current = False
        self._thread = threading.Thread(target=self._job_loop, name="darkroom-worker", daemon=True)
        self._status_thread = threading.Thread(
            target=self._status_loop, name="darkroom-worker-status", daemon=True
        )
        self._thread.start()
        self._status_thread.start()

    def stop(self, *, finish_current: bool = False, timeout: float | None = None) -> None:
        """Stop after the current job (``finish_current``) or interrupt it at its next step.

        An interrupted job is marked ``interrupted`` (retryable); pending jobs stay pending.
        """
        self._finish_current = finish_current
        self._stop.set()
        ctx = self._current
        if ctx is not None and not finish_current:
            ctx._interrupt.set()
        self._wake.set()
        self._status_dirty.set()
        for thread in (self._thread, self._status_thread):
            # ident None: never started (a signal's exception came between the two starts in ``start``)
            if thread is not None and thread.ident is not None and thread is not threading.current_thread():
                thread.join(timeout)
        ctx = self._current
        if ctx is not None and self._thread is not None and self._thread.is_alive() and not finish_current:
            # The runner is stuck inside a step; record the job as interrupted now (the job thread's own
            # later update only applies to running jobs, so it cannot undo this).
            try:
                self.store.mark_interrupted(ctx.job_id)
            except StoreError:
                pass  # the next start's recovery ends it

    def submit(self, request: GenerationRequest, *, priority: int = 0, source_key: str | None = None) -> int:
        """Queue a request (a seed of -1 is resolved when the job starts); returns the job id.
        ``source_key``: the batch file line it comes from (``core.store.source_key``)."""
        job_id = self.store.add_job(
            request, priority=priority, queue=self.queue, owned=self.private_queue, source_key=source_key
        )
        self._emit(JobQueued(job_id, request))
        self._wake.set()
        self._status_dirty.set()
        return job_id

    def cancel(self, job_id: int) -> bool:
        """Cancel a pending job now, or a running one at its next step. False if it already ended."""
        if not self.store.cancel(job_id):
            return False
        ctx = self._current
        if ctx is not None and ctx.job_id == job_id:
            ctx._cancel.set()
        job = self.store.get_job(job_id)
        if job is not None and job.state == "cancelled":
            self._emit(JobCancelled(job_id))
        self._status_dirty.set()
        return True

    def give_way(self, seconds: float) -> None:
        """The UI is about to do a burst of work (an F-key screen switch): the running job waits at its next
        step boundary until ``seconds`` from now have passed (at most ``MAX_GIVE_WAY_S``).

        Sampling holds the GIL for most of each step (many small torch calls), so a UI thread competing with
        it gets about half the interpreter and a 100 ms repaint takes 200+; waiting a fraction of a second
        at one step boundary costs the job that much once and lets the repaint run at full speed. Any thread.
        """
        until = time.monotonic() + min(max(seconds, 0.0), MAX_GIVE_WAY_S)
        self._give_way_until = max(self._give_way_until, until)

    def _give_way(self) -> None:
        """On the worker thread, between steps: sleep (releasing the GIL) while a ``give_way`` lasts."""
        remaining = self._give_way_until - time.monotonic()
        if remaining > 0:
            time.sleep(min(remaining, MAX_GIVE_WAY_S))

    def pause(self) -> None:
        """Hold before the next job (the running one finishes)."""
        self._paused = True
        self._status_dirty.set()

    def resume(self) -> None:
        self._paused = False
        self._wake.set()
        self._status_dirty.set()

    def retry(self, job_id: int) -> int:
        """Run an ended job again, in this worker's queue (it may come from a batch run's)."""
        job_id = self.store.retry(job_id, queue=self.queue, owned=self.private_queue)
        job = self.store.get_job(job_id)
        if job is not None:
            self._emit(JobQueued(job_id, job.request))
        self._wake.set()
        self._status_dirty.set()
        return job_id

    def move(self, job_id: int, delta: int) -> bool:
        """Move a pending job in run order; False if it is already at that end of the queue."""
        moved = self.store.move(job_id, delta)
        self._status_dirty.set()
        return moved

    def subscribe(self, callback: Callable[[Event], None]) -> Callable[[], None]:
        """Call ``callback(event)`` for every event (from the worker's threads); returns an unsubscribe."""
        with self._sub_lock:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._sub_lock:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)

        return unsubscribe

    def failure(self, job_id: int) -> BaseException | None:
        """The exception a recent job failed with (the batch runner maps model errors to an exit code)."""
        return self._failures.get(job_id)

    # ---- internals ---------------------------------------------------------------------------------------

    def _emit(self, event: Event) -> None:
        with self._sub_lock:
            subscribers = list(self._subscribers)
        with self._emit_lock:
            for callback in subscribers:
                try:
                    callback(event)
                except Exception:
                    log.exception("event subscriber %r failed", callback)

    def _set_activity(self, text: str) -> None:
        if text != self._activity:
            self._activity = text
            self._status_dirty.set()

    def _fatal(self, exc: StoreError) -> None:
        """The database cannot be used: stop both threads and say so once."""
        with self._fatal_lock:
            if self.fatal_error is not None:
                return
            self.fatal_error = exc
        # info, not error: the front end shows the event's message, and Python's last-resort handler would print
        # an error record to stderr a second time
        log.info("the worker stopped: %s", exc)
        ctx = self._current
        self._stop.set()
        if ctx is not None:
            ctx._interrupt.set()  # stop generating: its images could not be recorded
        self._wake.set()
        self._status_dirty.set()
        self._emit(WorkerStopped(ctx.job_id if ctx else None, str(exc)))

    def _job_loop(self) -> None:
        if self.yield_cpu:
            lower_thread_priority()
        try:
            try:
                from core.recovery import recover

                recover(self.store, self.output_dir)
            except StoreError as exc:
                self._fatal(exc)
            except Exception:
                log.exception("job recovery failed")
            claim_failures = 0  # unexpected errors in a row from claiming: a fault that does not go away
            while not self._stop.is_set():
                if self._paused:
                    self._set_activity("paused")
                    self._wake.wait()
                    self._wake.clear()
                    continue
                self._wake.clear()
                try:
                    job = self.store.claim_next(self.queue, output_dir=self.output_dir)
                except StoreError as exc:
                    self._fatal(exc)
                    break
                except Exception as exc:
                    claim_failures += 1
                    if claim_failures >= CLAIM_ATTEMPTS:  # it would fail every second, forever, a traceback each
                        self._fatal(StoreError(f"claiming the next job failed {claim_failures} times in a row "
                                               f"({type(exc).__name__}: {exc})"))
                        break
                    log.warning("claiming a job failed (%s: %s); trying again", type(exc).__name__, exc)
                    job = None
                else:
                    claim_failures = 0
                if job is None:
                    self._set_activity("idle")
                    # Poll too: another process may add jobs to this queue.
                    self._wake.wait(timeout=1.0)
                    continue
                self._run_job(job)
        finally:
            self._set_activity("idle")
            self._loop_done.set()
            self._status_dirty.set()  # wake the status thread so it sees the stop now

    def _get_runner(self) -> JobRunner:
        if self._runner is None:
            spec = self._runner_spec if self._runner_spec is not None else _default_runner_factory
            # An object with run() is the runner; anything else (a class, a function) is its factory.
            is_runner = hasattr(spec, "run") and not isinstance(spec, type)
            if not is_runner:
                from core.accel.torch_import import import_torch

                import_torch()  # before the factory's own imports can pull torch in the plain way
            self._runner = spec if is_runner else spec()
        return self._runner

    def _remember_failure(self, job_id: int, exc: BaseException) -> None:
        """Keep what a job failed with (its type, for the batch runner's exit code), without its traceback: the
        traceback's frames hold the failed job's tensors (latents, activations: GPU memory) for as long as the
        exception is kept. Call it once the traceback is logged."""
        _drop_frames(exc)
        self._failures[job_id] = exc
        while len(self._failures) > 100:
            self._failures.popitem(last=False)

    def _run_job(self, job: Job) -> None:
        ctx = JobContext(self, job.id)
        self._current = ctx
        if self._stop.is_set() and not self._finish_current:
            ctx._interrupt.set()
        try:
            if self.store.is_cancel_requested(job.id):
                ctx._cancel.set()
            request = job.request.with_resolved_seed()
            if request != job.request:
                self.store.update_request(job.id, request)
                job = dataclasses.replace(job, request=request)
        except StoreError as exc:  # the database went away under us
            self._fatal(exc)
            self._current = None
            return
        except Exception as exc:
            self._end_failed_or_stop(job.id, exc)
            self._current = None
            return
        self._emit(JobStarted(job.id, request))
        self._set_activity("starting")
        try:
            ctx._job = job
            # a retry of a job killed or stopped midway: what it saved then is kept, not made again
            ctx.saved = {h.seed: h.path for h in self.store.job_history(job.id)
                         if h.seed is not None and Path(h.path).is_file()}
            ctx.earlier = frozenset(ctx.saved)
            self._announce(ctx)  # a front end printing paths gets those too, once, before the new ones
            ctx.check_cancelled()
            runner = self._get_runner()
            ctx.check_cancelled()
            self._set_activity("generating")
            with _job_warnings(lambda text: self._emit(JobWarning(job.id, text))):
                images = runner.run(job, ctx)
            self._set_activity("saving")
            self._save(job, images, ctx)
            self._announce(ctx, final=True)
            paths, seeds = _job_images(request, ctx.saved)
            self.store.finish(job.id)
            self._emit(JobFinished(job.id, tuple(paths), tuple(seeds), ctx.elapsed))
        except Exception as exc:
            self._announce(ctx, final=True)  # what it saved before it stopped is kept: say so first
            try:
                if isinstance(exc, StoreError):
                    raise exc
                if self.fatal_error is not None:
                    pass  # the status thread met a database failure: no more writes (each could wait 30 s)
                elif ctx._interrupt.is_set():
                    self.store.mark_interrupted(job.id)
                    self._emit(JobCancelled(job.id))
                elif ctx._cancel.is_set() or isinstance(exc, JobCancelledError):
                    self.store.mark_cancelled(job.id)
                    self._emit(JobCancelled(job.id))
                else:
                    self._end_failed(job.id, exc)
            except StoreError as store_exc:
                self._fatal(store_exc)
        finally:
            self._current = None
            self._set_activity("idle")
            self._status_dirty.set()

    def _end_failed_or_stop(self, job_id: int, exc: Exception) -> None:
        try:
            self._end_failed(job_id, exc)
        except StoreError as store_exc:
            self._fatal(store_exc)

    def _end_failed(self, job_id: int, exc: Exception) -> None:
        if isinstance(exc, DarkroomError):
            message = str(exc)
        else:
            message = f"internal error: {type(exc).__name__}: {exc}"
            _log_failure(job_id, exc)
        self._remember_failure(job_id, exc)
        self.store.fail(job_id, message)
        self._emit(JobFailed(job_id, message))

    def _save(self, job: Job, images: Sequence[GeneratedImage], ctx: JobContext) -> None:
        """Save and record each image (atomically, its parameters embedded), add it to ``ctx.saved`` (seed ->
        path) and send its ``ImageSaved``; one whose seed ``ctx.saved`` has already (saved earlier in this job,
        or by an earlier run of it that was killed or stopped midway) is not saved again."""
        from core.metadata import save_image
        from core.recovery import job_tag

        tag = job_tag(job)
        saved = ctx.saved
        for item in images:
            if item.seed in saved:
                continue
            path = save_image(
                item.image, item.request, item.seed, self.output_dir, model_hash=item.model_hash, job_tag=tag,
                family=getattr(item, "family", None),
                extra=getattr(item, "extra", None) or None,
            )
            self.store.add_history(job.id, path, item.request, item.seed, item.model_hash, item.timings)
            saved[item.seed] = str(path)
            self._announce(ctx)

    def _announce(self, ctx: JobContext, *, final: bool = False) -> None:
        """Send an ``ImageSaved`` for each image of the job saved and not sent yet, in seed order: up to the
        first seed not saved yet, or (``final``: the job ended, however) all of them."""
        if ctx._job is None:  # not handed to a runner yet: nothing can have been saved
            return
        for seed in _ready_seeds(ctx._job.request, ctx.saved, ctx.announced, final=final):
            ctx.announced.add(seed)
            self._emit(ImageSaved(ctx.job_id, ctx.saved[seed], seed, earlier=seed in ctx.earlier))

    def _status_loop(self) -> None:
        # Say at once what the worker is doing: importing torch takes seconds on a cold disk, and the first full
        # status (device, memory, backend) needs it. Then send that full status without waiting for a change.
        if "torch" not in sys.modules:
            try:
                queue_length = self.store.pending_count(self.queue)
            except Exception:  # a StoreError comes back at the next query and stops the worker there
                queue_length = 0
            self._emit(Status(job_id=None, activity="starting: importing torch", device="…",
                              attention_backend="…", dtype="…", queue_length=queue_length, paused=self._paused))
        self._status_dirty.set()
        while True:
            dirty = self._status_dirty.wait(timeout=self.status_interval)
            self._status_dirty.clear()
            stopping = self._loop_done.is_set()
            ctx = self._current
            if self.fatal_error is not None:
                return  # the job thread met a database failure and said so
            if ctx is not None:
                try:
                    self.store.heartbeat(ctx.job_id)
                    if not ctx._cancel.is_set() and self.store.is_cancel_requested(ctx.job_id):
                        ctx._cancel.set()  # cancelled from another process through the database
                except StoreError as exc:
                    self._fatal(exc)
                    return
                except Exception:
                    log.exception("heartbeat failed")
            if dirty or ctx is not None or stopping:
                try:
                    self._emit(self._make_status(ctx))
                except StoreError as exc:
                    self._fatal(exc)
                    return
                except Exception:
                    log.exception("status update failed")
            if stopping:
                return

    def _make_status(self, ctx: JobContext | None) -> Status:
        # torch is imported here, on the status thread, never on the caller's (UI) thread, and gently: a plain
        # import would hold the GIL (and so freeze the UI) for ~200 ms at a time.
        from core.accel.torch_import import import_torch

        import_torch()
        from core.accel import device as devices

        runner = self._runner
        device = getattr(runner, "device", None)
        if device is None:
            if self._device is None:
                self._device = devices.pick_device()
            device = self._device
        used, peak, total = devices.memory_stats(device)
        # before the runner exists: the dtype its precision will pick (the factory carries it)
        dtype = getattr(runner, "dtype", None) or devices.compute_dtype(
            device, precision=getattr(self._runner_spec, "precision", "auto"))
        # The runner's attention dispatcher says what each layer of the last job used ("sage 20 / sdpa 13");
        # before any runner exists nothing has run yet; a runner without one runs plain SDPA.
        dispatcher = getattr(runner, "attention", None)
        if runner is None:
            backend = "–"
        elif hasattr(dispatcher, "summary"):
            backend = dispatcher.summary()
        else:
            backend = "sdpa"
        if runner is not None and getattr(getattr(runner, "compiler", None), "enabled", False):
            # the compiled denoiser's attention is inductor's (its layers bypass the dispatcher): the summary
            # counts the rest only (the VAE, the text encoders)
            backend = f"compiled + {backend}"
        extra: dict[str, str] = {}
        if ctx is not None and ctx.last_step is not None:
            extra["step"] = f"{ctx.last_step[0]}/{ctx.last_step[1]}"
        return Status(
            job_id=ctx.job_id if ctx else None,
            activity="paused" if self._paused and ctx is None else self._activity,
            device=str(device),
            memory_used=used,
            memory_peak=peak,
            memory_total=total,
            attention_backend=backend,
            dtype=devices.dtype_name(dtype) if not isinstance(dtype, str) else dtype,
            loaded_model=getattr(runner, "loaded_model", None),
            queue_length=self.store.pending_count(self.queue),
            paused=self._paused,
            extra=extra,
        )


def _job_images(request: GenerationRequest, saved: dict[int, str]) -> tuple[list[str], list[int]]:
    """The job's saved images as (paths, seeds): in the request's seed order (image i has seed + i), then any
    seed outside it (a runner may return fewer or other images)."""
    order = {seed: i for i, seed in enumerate(request.image_seeds())} if request.seed >= 0 else {}
    seeds = sorted(saved, key=lambda seed: (seed not in order, order.get(seed, 0)))
    return [saved[seed] for seed in seeds], seeds


def _ready_seeds(request: GenerationRequest, saved: dict[int, str], sent: set[int], *, final: bool) -> list[int]:
    """The seeds of ``saved`` not in ``sent`` that can be sent now in the job's seed order (``_job_images``'s):
    every one when ``final``; else those before the first of the request's seeds not saved yet (an earlier
    run's image after it waits for it), and a seed outside the request's only once all of those are saved."""
    ordered = [seed for seed in _job_images(request, saved)[1] if seed not in sent]
    seeds = request.image_seeds()
    first_missing = next((i for i, seed in enumerate(seeds) if seed not in saved), None)
    if final or first_missing is None:
        return ordered
    ready = set(seeds[:first_missing])
    return [seed for seed in ordered if seed in ready]


# Re-exported: runners and tests written against the worker import these names from here.
__all__ = ["GeneratedImage", "JobContext", "JobRunner", "RunnerUnavailableError", "Worker"]
