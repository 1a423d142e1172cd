"""Crash recovery at start: nothing a killed process left half-done stays so.

A worker saves each image of a job as soon as the runner has made it, going through these points
(``core.metadata.save_image`` then ``JobStore.add_history``), and a ``kill -9`` can land between any two:

1. the PNG is being written to ``.tmp-<host>-<pid>-<random>.png``;
2. its number is claimed with ``.NNNNN.claim`` (holding the pid);
3. it is renamed into place as ``NNNNN-<seed>.png`` (it carries a ``darkroom-job`` chunk naming the job);
4. its history row is committed;
5. after the job's last image, the job is marked done.

``recover`` runs when a worker starts (and before ``darkroom --batch --resume`` decides what to skip). For every
running job whose process is gone it looks in the job's output folder for images tagged with it that the history
lacks (point 3 passed, 4 not) and records them; a job with every image recorded is then ``done`` (point 4 of its
last image passed, 5 not), any other ``interrupted``, and a retry makes only the images it lacks (the worker tells
the runner which seeds are recorded, ``RunContext.has_image``). Then the temp and claim files of dead processes
(points 1-3) are removed; a live process's, such as another batch run saving right now, are left alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.store import FoundImage, Job, JobStore

log = logging.getLogger(__name__)


def job_tag(job: Job) -> dict[str, Any]:
    """What a saved image records of its job: the id, and the creation time so that a job with the same id in
    another database whose images go to the same folder is not taken for it."""
    return {"job": job.id, "created": job.created}


@dataclass
class RecoveryReport:
    jobs: list[int] = field(default_factory=list)  # jobs ended (done or interrupted)
    images: list[str] = field(default_factory=list)  # images found in place and recorded in the history
    removed: list[Path] = field(default_factory=list)  # stale temp and claim files removed


def recover(store: JobStore, output_dir: Path | str | None = None) -> RecoveryReport:
    """Finish what dead processes left half-done (see the module docstring). Raises ``StoreError`` when the
    database cannot be used; file problems are skipped (logged), never fatal."""
    from core.metadata import find_job_images, remove_stale_files

    abandoned = store.abandoned_jobs()
    found: dict[int, list[FoundImage]] = {}
    for job in abandoned:
        folder = job.output_dir or output_dir
        if folder is None or job.started is None:
            continue
        # Its images were written between its start and its last sign of life (the heartbeat, about once a
        # second; a heartbeat older than stale_after makes a job abandoned anyway).
        until = max(job.heartbeat or job.started, job.started) + store.stale_after
        try:
            images = find_job_images(folder, job_tag(job), job.started, until)
        except Exception:  # noqa: BLE001 - a folder we cannot read must not stop the start
            log.exception("looking for the images of job %s in %s failed", job.id, folder)
            continue
        found[job.id] = [FoundImage(str(path), job.request, seed, model_hash) for path, _, seed, model_hash in images]
    before = {job_id: {h.path for h in store.job_history(job_id)} for job_id in found}
    report = RecoveryReport(jobs=store.recover(found))
    for job_id, images in found.items():
        if job_id in report.jobs:
            report.images.extend(i.path for i in images if i.path not in before[job_id])
    folders = {Path(output_dir)} if output_dir is not None else set()
    folders.update(Path(job.output_dir) for job in abandoned if job.output_dir)
    for folder in sorted(folders):
        try:
            report.removed.extend(remove_stale_files(folder))
        except Exception:  # noqa: BLE001
            log.exception("removing stale temp files in %s failed", folder)
    if report.images:
        log.info("recovered %d image(s) saved but not recorded: %s", len(report.images), report.images)
    return report
