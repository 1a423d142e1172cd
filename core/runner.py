"""The runner contract: what the worker hands a runner, what a runner returns, and the one factory.

The worker (``core/worker.py``) owns the queue and the thread; the pipeline (``core/pipeline.py``) owns the
models. Neither imports the other: both depend on this module only. The worker calls
``runner.run(job, ctx)`` with a ``RunContext`` (progress, cancellation) and saves the ``GeneratedImage``s it
gets back; a runner that makes several images hands each to ``ctx.save_images`` as soon as it is finished (so a
kill later in the job loses none) and skips those ``ctx.has_image`` says an earlier run saved. ``runner_factory`` is the only place that builds the real pipeline runner, for the TUI, for
``--batch`` and for the worker's default; it is called inside the worker thread, so torch is never imported
on a UI thread. This module imports neither torch nor PIL.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from core.errors import DarkroomError
from core.request import GenerationRequest

if TYPE_CHECKING:
    from PIL import Image

    from core.store import Job


class RunnerUnavailableError(DarkroomError):
    """The generation pipeline cannot be created."""


@dataclass
class GeneratedImage:
    """One finished image of a job, with what the worker records beside it."""

    image: Image.Image
    seed: int
    request: GenerationRequest
    model_hash: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    family: str | None = None  # the model's family ("sd15", "sdxl"), recorded in the image's darkroom chunk
    extra: dict[str, str] = field(default_factory=dict)  # more infotext fields (``Lora hashes``)


class RunContext(Protocol):
    """What a runner may ask of the worker while it runs one job (``core.worker.JobContext`` implements it)."""

    job_id: int

    def is_cancelled(self) -> bool: ...

    def check_cancelled(self) -> None: ...

    def step(self, step: int, total: int, preview: Image.Image | None = None, image_index: int = 0) -> None:
        """Report a finished step; raises the worker's cancel exception once the job is cancelled."""

    def set_activity(self, text: str) -> None: ...

    def has_image(self, seed: int) -> bool:
        """This job's image of ``seed`` is saved already (an earlier run of the job got that far)."""

    def save_images(self, images: Sequence[GeneratedImage]) -> None:
        """Save and record these finished images of the job now, so a kill later in the job keeps them."""


class JobRunner(Protocol):
    def run(self, job: Job, ctx: RunContext) -> list[GeneratedImage]: ...


def make_runner(
    models_dirs: Sequence[Path | str] | None = None,
    *,
    registry: Any = None,
    device: Any = None,
    previews: bool = True,
    attention: str = "auto",
    memory: str = "auto",
    compile: str = "off",
    precision: str = "auto",
) -> JobRunner:
    """The real pipeline runner (imports torch). ``registry`` wins over ``models_dirs`` when both are given."""
    try:
        from core.pipeline import PipelineRunner
    except ImportError as exc:
        raise RunnerUnavailableError(
            f"the generation pipeline (core.pipeline.PipelineRunner) is not available: {exc}"
        ) from None
    dirs = [Path(p) for p in models_dirs] if models_dirs else None
    return PipelineRunner(dirs, registry=registry, device=device, previews=previews, attention=attention,
                          memory=memory, compile=compile, precision=precision)


def runner_factory(
    models_dirs: Sequence[Path | str] | None = None,
    *,
    registry: Any = None,
    previews: bool = True,
    attention: str = "auto",
    memory: str = "auto",
    compile: str = "off",
    precision: str = "auto",
) -> Callable[[], JobRunner]:
    """A zero-argument factory for ``Worker(store, runner_factory(...))``: the runner is built on first use,
    inside the worker thread. ``previews=False`` where nobody sees them (``--batch``): a TAESD preview is not
    free. ``attention``: the mode of the runner's attention dispatcher (auto, sage, xformers, sdpa); ``memory``:
    its memory mode (auto, gpu, lowvram, sequential: ``core.accel.memory_mode``); ``compile``: how the denoiser
    is compiled (``core.accel.compile_mode``: off, auto, torch, stable-fast); ``precision``: the networks' dtype
    (``core.accel.precision_mode``: auto, fp32, bf16, fp16)."""

    def factory() -> JobRunner:
        return make_runner(models_dirs, registry=registry, previews=previews, attention=attention, memory=memory,
                           compile=compile, precision=precision)

    factory.precision = precision  # the worker's status names the dtype before the runner is built
    return factory
