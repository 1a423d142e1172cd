"""Nothing half-done after kill -9: a worker killed at each point of saving a job's images, then recovery.

Each case runs a real worker in a subprocess that SIGKILLs itself at one point (a hook in save_image, or in
the store), then checks what the next start finds: every image in place is recorded exactly once, no temp or
claim file is left, the job is done when all its images are recorded (else interrupted), and a retry makes
only the images it lacks, so no image exists twice.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from core import metadata
from core.events import JobFinished, Status
from core.recovery import job_tag, recover
from core.request import GenerationRequest
from core.store import JobStore
from core.worker import GeneratedImage, Worker

REPO = Path(__file__).resolve().parents[1]
SEEDS = [10, 11, 12]

KILLED_WORKER = """
import os, signal, sys, time
from PIL import Image
from core import metadata
from core.request import GenerationRequest
from core.store import JobStore
from core.events import Status
from core.worker import GeneratedImage, Worker

db, out, point, at_image = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
images = [0]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def hook(where):
    if where == "written":
        images[0] += 1
    if where == point and images[0] == at_image:
        die()

metadata._save_hook = hook
store = JobStore(db)
if point == "recorded":  # just after the history row of image `at_image` is committed
    add_history = store.add_history
    def recorded(*args, **kwargs):
        add_history(*args, **kwargs)
        if images[0] == at_image:
            die()
    store.add_history = recorded
if point == "finish":  # every image saved and recorded, the job not yet marked done
    store.finish = lambda job_id: die()

class Runner:
    def run(self, job, ctx):
        ctx.step(1, 1)
        return [GeneratedImage(Image.new("RGB", (8, 8), (i * 60, 0, 0)), seed, job.request)
                for i, seed in enumerate(job.request.image_seeds())]

Worker._make_status = lambda self, ctx: Status(job_id=None)  # no torch import in this test process
worker = Worker(store, Runner(), output_dir=out, status_interval=0.05)
worker.submit(GenerationRequest(model="fake.safetensors", prompt="p", seed=10, batch_count=3, steps=1))
worker.start()
time.sleep(60)
"""


class Runner:
    def __init__(self) -> None:
        self.runs = 0

    def run(self, job, ctx):
        self.runs += 1
        ctx.step(1, 1)
        return [GeneratedImage(Image.new("RGB", (8, 8)), s, job.request) for s in job.request.image_seeds()]


def _kill_worker_at(tmp_path: Path, point: str, at_image: int) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO), DARKROOM_HOME=str(tmp_path / "home"))
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_WORKER, str(tmp_path / "db.sqlite3"), str(tmp_path / "out"), point,
         str(at_image)],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == -9, proc.stderr  # it died at the hook, not some other way


def _files(out: Path) -> tuple[list[Path], list[Path]]:
    """(numbered images, hidden temp/claim files) in the output folder."""
    every = [p for p in out.rglob("*") if p.is_file()]
    return sorted(p for p in every if not p.name.startswith(".")), sorted(p for p in every if p.name.startswith("."))


def _run_retry(store: JobStore, out: Path, job_id: int) -> tuple[JobFinished, Runner]:
    runner = Runner()
    worker = Worker(store, runner, output_dir=out, status_interval=0.05)
    done = threading.Event()
    finished: list[JobFinished] = []
    worker.subscribe(lambda e: (finished.append(e), done.set()) if isinstance(e, JobFinished) else None)
    worker._make_status = lambda ctx: Status(job_id=None)
    worker.retry(job_id)
    worker.start()
    assert done.wait(20)
    worker.stop(timeout=10)
    return finished[0], runner


@pytest.mark.parametrize(
    ("point", "at_image", "recorded_before", "in_place"),
    [
        ("written", 1, 0, 0),  # temp file written, no number claimed yet
        ("claimed", 2, 1, 1),  # temp file and claim of image 2 left
        ("renamed", 1, 0, 1),  # image 1 in place, not in the history
        ("renamed", 3, 2, 3),  # the last image in place, not in the history
        ("recorded", 2, 2, 2),  # image 2 recorded; image 3 never started
        ("finish", 3, 3, 3),  # every image recorded, the job still marked running
    ],
)
def test_kill_at_each_point_of_saving(tmp_path, monkeypatch, point, at_image, recorded_before, in_place):
    monkeypatch.setenv("DARKROOM_HOME", str(tmp_path / "home"))
    out = tmp_path / "out"
    _kill_worker_at(tmp_path, point, at_image)
    images, hidden = _files(out)
    assert len(images) == in_place
    with JobStore(tmp_path / "db.sqlite3") as store:
        (job,) = store.list_jobs()
        assert job.state == "running" and job.output_dir == str(out.absolute())
        assert len(store.job_history(job.id)) == recorded_before

        report = recover(store, out)  # what the next start does

        assert report.jobs == [job.id]
        history = store.job_history(job.id)
        assert sorted(h.path for h in history) == sorted(map(str, images))  # nothing orphaned
        assert len(report.images) == in_place - recorded_before
        assert _files(out)[1] == [] and sorted(report.removed) == hidden  # no temp or claim file left
        assert sorted(h.seed for h in history) == SEEDS[:in_place]
        assert all(h.request.prompt == "p" for h in history)
        expected_state = "done" if in_place == len(SEEDS) else "interrupted"
        assert store.get_job(job.id).state == expected_state
        assert recover(store, out).jobs == []  # idempotent

        if expected_state == "interrupted":
            finished, runner = _run_retry(store, out, job.id)
            assert runner.runs == 1
            images, hidden = _files(out)
            assert len(images) == len(SEEDS) and hidden == []  # the images it had were not made again
            history = store.job_history(job.id)
            assert sorted(h.seed for h in history) == SEEDS and len({h.path for h in history}) == len(SEEDS)
            assert sorted(finished.paths) == sorted(map(str, images))  # every image of the job is reported
            assert store.get_job(job.id).state == "done"


def test_a_live_process_keeps_its_temp_and_claim_files(tmp_path):
    day = tmp_path / "out" / "2026-01-02"
    day.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = metadata._host_tag()
    mine_tmp = day / f".tmp-{host}-{os.getpid()}-{'a' * 16}.png"
    dead_tmp = day / f".tmp-{host}-{dead.pid}-{'b' * 16}.png"
    other_host_tmp = day / f".tmp-0badc0de-{dead.pid}-{'c' * 16}.png"
    mine_claim, dead_claim = day / ".00007.claim", day / ".00008.claim"
    mine_claim.write_text(f"{host} {os.getpid()}")
    dead_claim.write_text(f"{host} {dead.pid}")
    old_legacy, new_legacy = day / f".tmp-{'d' * 16}.png", day / f".tmp-{'e' * 16}.png"  # no owner in the name
    empty_claim = day / ".00009.claim"  # killed between creating and writing it
    unrelated = day / ".hidden-by-the-user"
    for path in (mine_tmp, dead_tmp, other_host_tmp, old_legacy, new_legacy, empty_claim, unrelated):
        path.write_bytes(b"")
    hour_ago = time.time() - 2 * 3600
    os.utime(old_legacy, (hour_ago, hour_ago))
    os.utime(empty_claim, (hour_ago, hour_ago))
    removed = metadata.remove_stale_files(tmp_path / "out")
    assert sorted(removed) == sorted([dead_tmp, dead_claim, old_legacy, empty_claim])
    for kept in (mine_tmp, mine_claim, other_host_tmp, new_legacy, unrelated):
        assert kept.exists()


def test_temp_and_claim_files_name_their_owner(tmp_path, monkeypatch):
    seen: list[list[Path]] = []
    monkeypatch.setattr(metadata, "_save_hook", lambda where: seen.append(sorted((tmp_path / "o").rglob(".*"))))
    req = GenerationRequest(model="m.safetensors", prompt="p", seed=3)
    tag = {"job": 1, "created": 2.5}
    path = metadata.save_image(Image.new("RGB", (4, 4)), req, 3, tmp_path / "o", job_tag=tag)
    (written,), (claim, claimed_tmp), (claim_at_rename,) = seen
    assert written == claimed_tmp and written.name.startswith(f".tmp-{metadata._host_tag()}-{os.getpid()}-")
    assert claim.name == ".00000.claim" and claim == claim_at_rename
    assert _files(tmp_path / "o") == ([path], [])
    assert metadata.find_job_images(tmp_path / "o", tag, time.time() - 5, time.time()) == [(path, req, 3, None)]
    # the same job id of another database (another creation time) is not this job
    assert metadata.find_job_images(tmp_path / "o", {"job": 1, "created": 9.0}, time.time() - 5, time.time()) == []


def test_recovery_leaves_a_live_process_s_running_job_alone(tmp_path):
    out = tmp_path / "out"
    with JobStore(tmp_path / "db.sqlite3") as store:
        job_id = store.add_job(GenerationRequest(model="m.safetensors", prompt="p", seed=1))
        job = store.claim_next(output_dir=out)
        metadata.save_image(Image.new("RGB", (4, 4)), job.request, 1, out, job_tag=job_tag(job))
        report = recover(store, out)
        assert report.jobs == [] and report.images == []
        assert store.get_job(job_id).state == "running" and store.job_history(job_id) == []


def test_an_image_recorded_by_recovery_is_not_recorded_twice_by_a_worker_that_wakes_up(tmp_path):
    """A worker frozen past stale_after (its pid alive) is taken over; if it then records its image, the
    history still has it once."""
    out = tmp_path / "out"
    with JobStore(tmp_path / "db.sqlite3", stale_after=0.0) as store:
        job_id = store.add_job(GenerationRequest(model="m.safetensors", prompt="p", seed=1))
        job = store.claim_next(output_dir=out)
        path = metadata.save_image(Image.new("RGB", (4, 4)), job.request, 1, out, job_tag=job_tag(job))
        time.sleep(0.01)
        report = recover(store, out)
        assert report.images == [str(path)] and store.get_job(job_id).state == "done"
        first = store.job_history(job_id)[0].id
        assert store.add_history(job_id, path, job.request, 1) == first
        assert len(store.job_history(job_id)) == 1
