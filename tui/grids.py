"""X/Y/Z grids queued from the TUI: every cell is an ordinary job; when the last one has finished, the grid
image is drawn and saved (``core.grid.save_grid``) in a thread worker and recorded in the history, where it is
the grid's entry."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from core.events import Event, JobCancelled, JobFailed, JobFinished
from core.request import GenerationRequest


@dataclass
class PendingGrid:
    grid_id: str
    axes: Mapping[str, Any]
    request: GenerationRequest  # the form's request the cells vary
    cells: dict[int, dict] = field(default_factory=dict)  # job id -> its grid position (extra["grid"])
    paths: dict[int, str] = field(default_factory=dict)  # job id -> its first image
    lost: int = 0  # cells that failed or were cancelled


class GridTracker:
    """The app's grids in progress (this session's: a grid whose cells finish after a restart gets no image)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.pending: dict[str, PendingGrid] = {}
        self.of_job: dict[int, str] = {}

    @staticmethod
    def new_id() -> str:
        return f"tui {time.strftime('%Y-%m-%d %H:%M:%S')} {time.monotonic_ns() % 10**9:09d}"

    def queue(self, request: GenerationRequest, axes: Mapping[str, Any], cells: Sequence[GenerationRequest]) -> int:
        """Queue ``cells`` (``core.grid.expand`` of ``request``); returns how many were queued. Runs on the UI
        thread, so no cell's end event is handled before it is registered here."""
        grid_id = str(cells[0].extra["grid"]["id"])
        grid = self.pending[grid_id] = PendingGrid(grid_id, axes, request)
        for cell in cells:
            try:
                job_id = self.app.worker.submit(cell)
            except Exception as error:  # noqa: BLE001 - the database failed: the cells queued so far still run
                self.app.notify(f"Could not queue the grid's cell {len(grid.cells) + 1} of {len(cells)}: {error}",
                                severity="error", markup=False)
                grid.lost += len(cells) - len(grid.cells)
                break
            grid.cells[job_id] = dict(cell.extra["grid"])
            self.of_job[job_id] = grid_id
        if grid.cells:
            first, last = min(grid.cells), max(grid.cells)
            self.app.notify(f"Queued an X/Y/Z grid: {len(grid.cells)} cells (jobs #{first}–#{last})", timeout=4)
        else:
            del self.pending[grid_id]
        return len(grid.cells)

    def job_ended(self, event: Event) -> None:
        """A JobFinished, JobFailed or JobCancelled event (UI thread)."""
        if not isinstance(event, JobFinished | JobFailed | JobCancelled) or event.job_id not in self.of_job:
            return
        grid = self.pending[self.of_job.pop(event.job_id)]
        if isinstance(event, JobFinished) and event.paths:
            grid.paths[event.job_id] = event.paths[0]
        else:
            grid.lost += 1
        if any(job_id in self.of_job for job_id in grid.cells):
            return  # cells still to run
        del self.pending[grid.grid_id]
        if grid.lost:
            self.app.notify(f"X/Y/Z grid: no grid image ({grid.lost} of its cells have no image)",
                            severity="warning", timeout=8)
            return
        self.app.run_worker(lambda: self._save(grid), thread=True, group="grid-image", exit_on_error=False)

    def _save(self, grid: PendingGrid) -> None:
        """Thread worker: draw and save the grid image, record it in the history."""
        from core.grid import save_grid

        cells = [(grid.cells[job_id], path) for job_id, path in grid.paths.items()]
        try:
            path = save_grid(cells, grid.axes, grid.request, grid.grid_id, self.app.worker.output_dir,
                             self.app.store)
        except Exception as error:  # noqa: BLE001 - a cell image deleted meanwhile, a full disk: said, not raised
            self.app.call_from_thread(self.app.notify, f"Could not save the X/Y/Z grid image: {error}",
                                      severity="error", markup=False)
            return
        self.app.call_from_thread(self._saved, str(path))

    def _saved(self, path: str) -> None:
        self.app.notify(f"X/Y/Z grid saved: {path}", markup=False, timeout=6)
        refresh = getattr(self.app.screen, "refresh_history", None)
        if refresh is not None:  # History is showing: the grid's entry now shows the grid image
            refresh()
