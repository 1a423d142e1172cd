"""X/Y/Z grids queued from the TUI: every cell is an ordinary job; when the last one has finished, the grid
image is drawn and saved (``core.grid.save_grid``) in a thread worker and recorded in the history, where it is
the grid's entry.

The store keeps each grid until its image is saved (``JobStore.add_grid``): a grid whose cells end after the
app was closed or killed is finished by the next start (``GridTracker.restore``). A cell that failed, was
cancelled or was interrupted leaves its grid waiting: retrying that job (Queue screen) queues the cell again,
and the grid image is saved once it finishes."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from core.events import Event, JobCancelled, JobFailed, JobFinished, JobQueued
from core.request import GenerationRequest

ELSEWHERE_CHECK_S = 2.0  # how often the state of a restored cell run by another process is read


def _position(cell: Mapping[str, Any]) -> tuple:
    """A cell's place in its grid from its ``extra["grid"]``."""
    return tuple(cell.get(name, 0) for name in ("x", "y", "z"))


@dataclass
class PendingGrid:
    grid_id: str
    axes: Mapping[str, Any]
    request: GenerationRequest  # the form's request the cells vary
    cells: dict[int, dict] = field(default_factory=dict)  # job id -> its grid position (extra["grid"])
    paths: dict[int, str] = field(default_factory=dict)  # job id -> its first image
    lost: set[int] = field(default_factory=set)  # jobs that ended without an image

    def replace_cell(self, job_id: int, cell: dict) -> None:
        """``job_id`` is now the job of ``cell``'s place (a retry of the job that held it)."""
        for old in [j for j, c in self.cells.items() if _position(c) == _position(cell)]:
            del self.cells[old]
            self.paths.pop(old, None)
            self.lost.discard(old)
        self.cells[job_id] = cell


class GridTracker:
    """The grids in progress: queued here, or left open in the store by an earlier run (``restore``)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.pending: dict[str, PendingGrid] = {}
        self.of_job: dict[int, str] = {}  # the cells still to end -> their grid
        self.elsewhere: set[int] = set()  # of those, the ones running in another (or a killed) process at restore

    @staticmethod
    def new_id() -> str:
        return f"tui {time.strftime('%Y-%m-%d %H:%M:%S')} {time.monotonic_ns() % 10**9:09d}"

    def queue(self, request: GenerationRequest, axes: Mapping[str, Any], cells: Sequence[GenerationRequest]) -> int:
        """Queue ``cells`` (``core.grid.expand`` of ``request``); returns how many were queued. Runs on the UI
        thread, so no cell's end event is handled before it is registered here."""
        from core.grid import axes_table

        grid_id = str(cells[0].extra["grid"]["id"])
        try:
            self.app.store.add_grid(grid_id, axes_table(axes), request)
        except Exception as error:  # noqa: BLE001 - the database failed: nothing is queued, said once
            self.app.notify(f"Could not queue the grid: {error}", severity="error", markup=False)
            return 0
        grid = self.pending[grid_id] = PendingGrid(grid_id, axes, request)
        for cell in cells:
            try:
                job_id = self.app.worker.submit(cell)
            except Exception as error:  # noqa: BLE001 - the database failed: the cells queued so far still run
                self.app.notify(f"Could not queue the grid's cell {len(grid.cells) + 1} of {len(cells)}: {error}; "
                                "the cells queued run without a grid image", severity="error", markup=False)
                self._drop(grid)
                return len(grid.cells)
            grid.cells[job_id] = dict(cell.extra["grid"])
            self.of_job[job_id] = grid_id
        first, last = min(grid.cells), max(grid.cells)
        self.app.notify(f"Queued an X/Y/Z grid: {len(grid.cells)} cells (jobs #{first}–#{last})", timeout=4)
        return len(grid.cells)

    def restore(self) -> None:
        """Take up the grids an earlier run left open (UI thread, before the worker starts): the newest job of
        each cell (one queued again has several) that is still to run is awaited; a grid whose cells all have
        their image is finished now."""
        from core.grid import parse_axes

        for grid_id, axes, request in self.app.store.open_grids():
            try:
                grid = PendingGrid(grid_id, parse_axes(axes), request)
            except Exception:  # noqa: BLE001 - written by another version: nothing to draw it with
                self.app.store.close_grid(grid_id)
                continue
            for job in self.app.store.grid_cells(grid_id):  # oldest first: a newer job takes over its place
                grid.replace_cell(job.id, dict(job.request.extra["grid"]))
                if job.state in ("pending", "running"):
                    self.of_job[job.id] = grid_id
                    if job.state == "running":  # not this app's worker, which has not started yet
                        self.elsewhere.add(job.id)
                elif (path := self._first_image(job)) is not None:
                    grid.paths[job.id] = path
                else:
                    grid.lost.add(job.id)
            for job_id in [j for j in self.of_job if self.of_job[j] == grid_id and j not in grid.cells]:
                del self.of_job[job_id]  # an older job of a cell queued again: the cell waits on the newer one
            self.pending[grid_id] = grid
            if not grid.cells:
                self._drop(grid)
            elif not any(job_id in self.of_job for job_id in grid.cells) and not grid.lost:
                self._finish(grid)
        self.elsewhere &= set(self.of_job)  # a running job whose cell was queued again is the retry's
        if self.elsewhere:
            self.app.set_timer(ELSEWHERE_CHECK_S, self.check_elsewhere)

    def job_queued(self, event: Event) -> None:
        """A JobQueued event (UI thread): a waiting grid's cell queued again (a retry) becomes that cell's job."""
        if not isinstance(event, JobQueued) or event.job_id in self.of_job:
            return  # not queued, or a cell ``queue`` registered itself
        cell = event.request.extra.get("grid")
        grid = self.pending.get(cell.get("id")) if isinstance(cell, Mapping) and not cell.get("image") else None
        if grid is None:
            return
        grid.replace_cell(event.job_id, dict(cell))
        self.of_job[event.job_id] = grid.grid_id
        self.elsewhere.discard(event.job_id)  # queued here again: its end is this worker's event

    def job_ended(self, event: Event) -> None:
        """A JobFinished, JobFailed or JobCancelled event (UI thread)."""
        if isinstance(event, JobFinished | JobFailed | JobCancelled):
            self._cell_ended(event.job_id, event.paths[0] if isinstance(event, JobFinished) and event.paths else None)

    def check_elsewhere(self) -> None:
        """Timer (UI thread): the restored cells another process was running (or was killed running) end without
        an event here, so their state is read: crash recovery makes a killed one interrupted, or done."""
        for job_id in list(self.elsewhere):
            job = self.app.store.get_job(job_id)
            if job is not None and job.state in ("pending", "running"):
                continue
            self.elsewhere.discard(job_id)
            self._cell_ended(job_id, self._first_image(job))
        if self.elsewhere:
            self.app.set_timer(ELSEWHERE_CHECK_S, self.check_elsewhere)

    def _first_image(self, job: Any) -> str | None:
        """An ended cell's first image: a done job's first recorded one, else (or none recorded) None."""
        images = self.app.store.job_history(job.id) if job is not None and job.state == "done" else []
        return images[0].path if images else None

    def _cell_ended(self, job_id: int, path: str | None) -> None:
        """A cell's job ended, with its first image or none."""
        if job_id not in self.of_job:
            return
        grid = self.pending[self.of_job.pop(job_id)]
        if job_id not in grid.cells:
            return  # its cell was queued again meanwhile: the retry decides
        if path is not None:
            grid.paths[job_id] = path
        else:
            grid.lost.add(job_id)
        if any(other in self.of_job for other in grid.cells):
            return  # cells still to run
        if grid.lost:  # kept: a retry of the lost cells finishes the grid
            lost = len(grid.lost)
            self.app.notify(f"X/Y/Z grid: no grid image yet: {lost} of its {len(grid.cells)} cells "
                            f"{'has' if lost == 1 else 'have'} no image; retrying {'it' if lost == 1 else 'them'} "
                            "on the Queue screen (F4) finishes the grid", severity="warning", timeout=8)
            return
        self._finish(grid)

    def _drop(self, grid: PendingGrid) -> None:
        """Forget a grid that cannot get its image (its cells run on as ordinary jobs)."""
        self.pending.pop(grid.grid_id, None)
        for job_id in grid.cells:
            self.of_job.pop(job_id, None)
        self.app.store.close_grid(grid.grid_id)

    def _finish(self, grid: PendingGrid) -> None:
        """Every cell has its image: save the grid image in a thread worker. The store forgets the grid only
        once its image is saved, so an app killed in between saves it at the next start."""
        del self.pending[grid.grid_id]
        self.app.run_worker(lambda: self._save(grid), thread=True, group="grid-image", exit_on_error=False)

    def _save(self, grid: PendingGrid) -> None:
        """Thread worker: draw and save the grid image, record it in the history."""
        from core.grid import save_grid

        cells = [(grid.cells[job_id], path) for job_id, path in grid.paths.items()]
        try:
            path = save_grid(cells, grid.axes, grid.request, grid.grid_id, self.app.worker.output_dir,
                             self.app.store)
        except Exception as error:  # noqa: BLE001 - a cell image deleted meanwhile, a full disk: said, not raised
            with contextlib.suppress(Exception):  # a database that failed the record: the grid stays open for
                self.app.store.close_grid(grid.grid_id)  # the next start, and the failure is said all the same
            self.app.call_from_thread(self.app.notify, f"Could not save the X/Y/Z grid image: {error}",
                                      severity="error", markup=False)
            return
        self.app.call_from_thread(self._saved, str(path))  # the store closed the grid with the image's record

    def _saved(self, path: str) -> None:
        self.app.notify(f"X/Y/Z grid saved: {path}", markup=False, timeout=6)
        refresh = getattr(self.app.screen, "refresh_history", None)
        if refresh is not None:  # History is showing: the grid's entry now shows the grid image
            refresh()
