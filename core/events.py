"""The worker's event stream: what front ends (TUI, batch runner) observe.

Events are small frozen dataclasses posted from the worker thread. Subscribers must be quick and
thread-safe (the TUI wraps each in a Textual message; the batch runner puts them on a queue).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

    from core.request import GenerationRequest


@dataclass(frozen=True)
class Event:
    job_id: int | None


@dataclass(frozen=True)
class JobQueued(Event):
    request: GenerationRequest


@dataclass(frozen=True)
class JobStarted(Event):
    request: GenerationRequest  # seed already resolved


@dataclass(frozen=True)
class JobStep(Event):
    step: int  # 1-based step just finished, counted over the whole job (all passes)
    total: int
    elapsed: float  # seconds since the job started
    preview: Image.Image | None = None  # cheap x0 preview (latent->RGB), None when previews are off
    image_index: int = 0  # which image of the batch count is being sampled


@dataclass(frozen=True)
class ImageSaved(Event):
    """One image of the job is saved and recorded in the history: sent as soon as it is, before the job ends
    (a batch_count job sends one per image as each batch is made). Each image of a job is sent once per run,
    in the job's seed order (image i has seed + i: one whose seed comes after a seed not made yet waits for it
    until the job ends), and before the job's ``JobFinished`` / ``JobFailed`` / ``JobCancelled``. A retried or
    resumed job sends the images an earlier run of it saved too (at its start, with ``earlier`` set: they were in
    the history already), so a front end that prints paths gets every one of the job's images."""

    path: str
    seed: int
    earlier: bool = False  # saved by an earlier run of this job (killed or stopped midway), not made now


@dataclass(frozen=True)
class JobFinished(Event):
    # every image of the job (each sent as an ImageSaved before this), in seed order
    paths: tuple[str, ...]
    seeds: tuple[int, ...]
    elapsed: float


@dataclass(frozen=True)
class JobFailed(Event):
    error: str  # one user-facing sentence, never a traceback


@dataclass(frozen=True)
class JobWarning(Event):
    """Something the running job does differently from what was asked (a prompt cut at the text encoder's
    length, a mask scaled): the core's ``logging`` warnings from the job's thread, one sentence each."""

    text: str  # may quote user text or file names: shown with control characters made visible, never as markup


@dataclass(frozen=True)
class JobCancelled(Event):
    pass


@dataclass(frozen=True)
class WorkerStopped(Event):
    """The worker stopped for good because the job database cannot be used (locked by another process for
    longer than the busy timeout, disk full, I/O error). Sent once; ``job_id`` is the job it was running, if
    any (left for recovery at the next start). Front ends show ``error`` and exit."""

    error: str  # one user-facing sentence naming the database file and what to do


@dataclass(frozen=True)
class Status(Event):
    """Device and worker state; sent at least once a second while the worker is busy."""

    activity: str = "idle"  # "idle", "loading <model>", "generating", "paused"
    device: str = "cpu"
    memory_used: int = 0  # bytes: VRAM on CUDA, process RSS on CPU
    memory_peak: int = 0
    memory_total: int = 0
    attention_backend: str = "sdpa"
    dtype: str = "float32"
    loaded_model: str | None = None
    queue_length: int = 0
    paused: bool = False
    extra: dict[str, str] = field(default_factory=dict)
