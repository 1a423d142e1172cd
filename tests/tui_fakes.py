"""Test doubles for the terminal app: a fake runner (no torch), a fake model registry, an app factory.

Also used by ``tui/app.py`` when the hidden ``DARKROOM_TUI_FAKE_RUNNER=tests.tui_fakes:FakeRunner`` is set
(the tmux end-to-end test and the screenshot/benchmark scripts).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# textual-image caches the cell size on first use; pin it so half-cell drawings are the same everywhere.
os.environ.setdefault("TEXTUAL_CELL_WIDTH", "10")
os.environ.setdefault("TEXTUAL_CELL_HEIGHT", "20")

from PIL import Image  # noqa: E402


def gradient(width: int, height: int, seed: int, progress: float = 1.0) -> Image.Image:
    """A deterministic picture: colours from the seed, contrast growing with ``progress`` (0..1)."""
    import numpy as np

    r0, g0, b0 = (seed * 97) % 256, (seed * 57) % 256, (seed * 31) % 256
    y, x = np.mgrid[0:height, 0:width]
    t = (x + y) / max(width + height - 2, 1)
    k = progress * t
    rgb = np.stack([(r0 * (1 - k) + 255 * k), (g0 * (1 - t) + 40 * t), (b0 + 200 * k * (x % 2))], axis=-1)
    return Image.fromarray((rgb.astype(np.int64) % 256).astype(np.uint8), "RGB")


class FakeRunner:
    """Emits every step with a small preview and makes deterministic images, each batch handed to
    ``ctx.save_images`` when made (as the pipeline does) and all returned; optionally waits on a gate before
    each step (tests cancel/pause deterministically) or fails with a message."""

    def __init__(
        self,
        delay: float = 0.0,
        preview_size: int = 16,
        gate: threading.Event | None = None,
        fail_with: Exception | None = None,
    ) -> None:
        # The environment knobs let bench/ and the tmux test shape jobs without code (seconds per step,
        # preview and final image sizes in pixels).
        self.delay = float(os.environ.get("DARKROOM_FAKE_DELAY", delay))
        self.preview_size = int(os.environ.get("DARKROOM_FAKE_PREVIEW", preview_size))
        self.image_size = int(os.environ.get("DARKROOM_FAKE_SIZE", 64))
        self.gate = gate
        self.fail_with = fail_with
        self.started = threading.Event()
        self.jobs_run: list[int] = []

    def run(self, job: Any, ctx: Any) -> list[Any]:
        from core.worker import GeneratedImage

        self.started.set()
        request = job.request.with_resolved_seed()
        total = request.steps * request.batch_count
        seeds = request.image_seeds()
        images = []
        for batch in range(request.batch_count):
            for step in range(request.steps):
                if self.gate is not None:
                    while not self.gate.wait(0.05):
                        ctx.check_cancelled()
                if self.delay:
                    time.sleep(self.delay)
                done = batch * request.steps + step + 1
                preview = gradient(self.preview_size, self.preview_size, seeds[0], done / total)
                ctx.step(done, total, preview=preview, image_index=batch)
            if self.fail_with is not None:
                raise self.fail_with
            made = [GeneratedImage(gradient(self.image_size, self.image_size, seed), seed, request, model_hash="fakehash")
                    for seed in seeds[batch * request.batch_size:(batch + 1) * request.batch_size]]
            if hasattr(ctx, "save_images"):  # each batch saved when made, as the pipeline does (ImageSaved)
                ctx.save_images(made)
            images += made
        self.jobs_run.append(job.id)
        return images


@dataclass(frozen=True)
class FakeModel:
    name: str
    path: Path
    size: int = 0


class FakeRegistry:
    def __init__(self, names: list[str] | None = None, search_dirs: list[Path] | None = None) -> None:
        self.names = ["fake-model.safetensors"] if names is None else names
        self.search_dirs = search_dirs or [Path("/models/Stable-diffusion")]

    def checkpoints(self) -> list[FakeModel]:
        return [FakeModel(n, self.search_dirs[0] / n) for n in self.names]


def make_app(
    tmp_path: Path, runner: Any = None, *, models: list[str] | None = None, registry: Any = None,
    prebuild_screens: bool = False, **kwargs: Any
) -> Any:
    """A DarkroomApp on a fresh store under ``tmp_path`` with the fake runner and the half-block image widget
    (deterministic; textual-image's TGP/Sixel widgets write to the real stdout and never go in tests).
    ``registry`` replaces the fake registry (a real ``ModelRegistry`` over header-only files of several
    families, ``tests/family_files.py``). The screens not shown at start are built in the background only with
    ``prebuild_screens`` (tests/test_tui_switch.py): elsewhere it would add their build to every test."""
    from core.store import JobStore
    from core.worker import Worker
    from tui.app import DarkroomApp
    from tui.widgets.halfblock import HalfBlockImage

    store = JobStore(tmp_path / "db.sqlite3")
    worker = Worker(store, runner if runner is not None else FakeRunner(), output_dir=tmp_path / "out",
                    status_interval=0.2)
    app = DarkroomApp(worker, registry or FakeRegistry(models), image_class=HalfBlockImage,
                      settings_file=tmp_path / "settings.json", **kwargs)
    app.prebuild_screens = prebuild_screens
    return app


async def wait_for(pilot: Any, predicate: Any, timeout: float = 10.0) -> None:
    """Let the app run until ``predicate()`` holds (events come from the worker thread). A widget it queries
    that is not mounted yet (the Generate form mounts after the first frame) counts as "not yet"."""
    from textual.css.query import NoMatches

    def holds() -> bool:
        try:
            return bool(predicate())
        except NoMatches:
            return False

    deadline = time.monotonic() + timeout
    while not holds():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await pilot.pause(0.02)


def screen_text(app: Any, styles: bool = False) -> str:
    """What the terminal shows now, as plain text (same compositor output ``export_screenshot`` draws);
    ``styles``: with the ANSI colours and attributes of every cell."""
    import io

    from rich.console import Console

    width, height = app.size
    console = Console(width=width, height=height, file=io.StringIO(), force_terminal=True,
                      color_system="truecolor", record=True, legacy_windows=False, safe_box=False)
    console.print(app.screen._compositor.render_update(full=True, screen_stack=app._background_screens))
    return console.export_text(styles=styles)
