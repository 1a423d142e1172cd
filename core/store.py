"""Durable job queue and image history in one SQLite file.

Several processes may share the database at once (a TUI and a ``darkroom --batch`` run), so:
- the file is in WAL mode with a busy timeout, and every write is a short ``BEGIN IMMEDIATE`` transaction;
- each thread gets its own connection (sqlite3 connections must not be shared across threads mid-transaction);
- a running job records its owner's pid, host and a heartbeat, so ``recover()`` can tell a job whose process
  died (-> interrupted) from one that another live process is still working on (left alone);
- a job queued into a process's private queue (a ``darkroom --batch`` run) records that process as its owner
  while still pending: only that process runs it, so when it is gone ``recover()`` marks the job interrupted
  too, where a retry (by any worker, into its own queue) can pick it up. Jobs of the shared ``default`` queue
  have no owner until they run: any later TUI session runs them.

The schema is versioned with ``PRAGMA user_version``; ``MIGRATIONS[i]`` upgrades version ``i`` to ``i + 1``.
Never edit a shipped migration: append a new one.

Every failure of SQLite itself (a write lock another process holds longer than the busy timeout, a full disk, an
I/O error, a read-only or damaged file) is raised as a ``StoreError`` whose message names the database file and
says what to do; callers never see ``sqlite3`` exceptions. The busy timeout is 30 s, or
``$DARKROOM_DB_TIMEOUT`` seconds, or the ``busy_timeout`` argument.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from core.errors import DarkroomError
from core.request import GenerationRequest

STATES = ("pending", "running", "done", "failed", "cancelled", "interrupted")
FINAL_STATES = ("done", "failed", "cancelled", "interrupted")
log = logging.getLogger(__name__)

RETRYABLE_STATES = ("failed", "interrupted", "cancelled")

# A running job whose heartbeat is older than this is treated as abandoned even if its pid is alive
# (the pid may have been reused). Workers heartbeat about once a second.
DEFAULT_STALE_AFTER = 120.0
# How long a write waits for another process's write lock before giving up with a StoreError.
DEFAULT_BUSY_TIMEOUT = 30.0
BUSY_TIMEOUT_ENV = "DARKROOM_DB_TIMEOUT"

MIGRATIONS: list[list[str]] = [
    # 0 -> 1: jobs and history
    [
        """
        CREATE TABLE jobs (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            queue TEXT NOT NULL DEFAULT 'default',
            state TEXT NOT NULL CHECK (state IN
                ('pending', 'running', 'done', 'failed', 'cancelled', 'interrupted')),
            priority INTEGER NOT NULL DEFAULT 0,
            position INTEGER NOT NULL,
            request TEXT NOT NULL,
            created REAL NOT NULL,
            started REAL,
            finished REAL,
            error TEXT,
            owner_pid INTEGER,
            owner_host TEXT,
            heartbeat REAL,
            cancel_requested INTEGER NOT NULL DEFAULT 0
        )
        """,
        "CREATE INDEX jobs_claim ON jobs (queue, state, priority DESC, position, id)",
        """
        CREATE TABLE history (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            job_id INTEGER REFERENCES jobs (id) ON DELETE SET NULL,
            path TEXT NOT NULL,
            request TEXT NOT NULL,
            prompt TEXT NOT NULL DEFAULT '',
            seed INTEGER,
            model_hash TEXT,
            timings TEXT NOT NULL DEFAULT '{}',
            created REAL NOT NULL
        )
        """,
        "CREATE INDEX history_created ON history (created DESC, id DESC)",
    ],
    # 1 -> 2: where a job saves its images (crash recovery looks there for images saved but not recorded) and
    # which line of which batch file it came from (``darkroom --batch --resume``)
    [
        "ALTER TABLE jobs ADD COLUMN output_dir TEXT",
        "ALTER TABLE jobs ADD COLUMN source_key TEXT",
        "CREATE INDEX jobs_source_key ON jobs (source_key)",
        "CREATE INDEX history_job ON history (job_id)",
    ],
    # 2 -> 3: the TUI's X/Y/Z grids until their grid image is saved, so one whose cells end after a restart
    # still gets its image (its cells are ordinary jobs carrying ``extra["grid"]["id"]``)
    [
        "CREATE TABLE grids (id TEXT PRIMARY KEY, axes TEXT NOT NULL, request TEXT NOT NULL, created REAL NOT NULL)",
    ],
]
SCHEMA_VERSION = len(MIGRATIONS)


class StoreError(DarkroomError):
    """The database cannot be used (newer schema, locked too long, disk full, unreadable file)."""


def _busy_timeout_default() -> float:
    try:
        value = float(os.environ.get(BUSY_TIMEOUT_ENV, DEFAULT_BUSY_TIMEOUT))
    except ValueError:
        return DEFAULT_BUSY_TIMEOUT
    return value if value >= 0 else DEFAULT_BUSY_TIMEOUT


def describe_sqlite_error(path: Path, exc: sqlite3.Error, busy_timeout: float) -> str:
    """One sentence naming the database and what to do, for an error SQLite raised on it."""
    name = getattr(exc, "sqlite_errorname", None) or ""
    text = str(exc).lower()
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in text:
        return (
            f"{path}: the job database is locked: another process has held its write lock for more than "
            f"{busy_timeout:g} s; close the other Darkroom window or batch run that uses it (or pass another --db) "
            "and start again"
        )
    if name == "SQLITE_FULL" or "disk is full" in text:
        return (
            f"{path}: the disk holding the job database is full; free some space and start again (images already "
            "saved are kept and recorded at the next start)"
        )
    if name.startswith("SQLITE_IOERR") or "disk i/o error" in text:
        return (
            f"{path}: the job database cannot be read or written (disk I/O error); check that its disk is present, "
            "writable and not full, then start again"
        )
    if name.startswith("SQLITE_READONLY") or "readonly" in text or "read-only" in text:
        return f"{path}: the job database is read-only; make the file and its folder writable or pass another --db"
    if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")) or "malformed" in text or "not a database" in text:
        return f"{path}: is not a usable job database ({exc}); move it aside or pass another --db"
    if name.startswith("SQLITE_CANTOPEN") or "unable to open" in text:
        return f"{path}: cannot open the job database ({exc}); check the folder exists and is writable"
    return f"{path}: the job database failed ({exc})"


_F = TypeVar("_F", bound=Callable[..., Any])


def _db_call(method: _F) -> _F:
    """Turn SQLite's own exceptions raised by a JobStore method into a StoreError naming the file."""

    @functools.wraps(method)
    def wrapper(self: JobStore, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as exc:
            raise StoreError(describe_sqlite_error(self.path, exc, self.busy_timeout)) from exc

    return wrapper  # type: ignore[return-value]


class JobStateError(DarkroomError):
    """A job operation does not fit the job's current state (e.g. retrying a finished job)."""


@dataclass(frozen=True)
class Job:
    id: int
    queue: str
    state: str
    priority: int
    position: int
    request: GenerationRequest
    created: float
    started: float | None = None
    finished: float | None = None
    error: str | None = None
    owner_pid: int | None = None
    owner_host: str | None = None
    heartbeat: float | None = None
    cancel_requested: bool = False
    output_dir: str | None = None  # the folder its worker saves images in (set when it starts)
    source_key: str | None = None  # the batch file line it came from (see ``source_key``)


@dataclass(frozen=True)
class FoundImage:
    """An image a job saved that its history may lack (found by crash recovery in the output folder)."""

    path: str
    request: GenerationRequest
    seed: int
    model_hash: str | None = None


def source_key(file: Path | str, index: int, request: GenerationRequest) -> str:
    """Identifies job ``index`` of a batch file: the file's absolute path, the index and the request as given
    (before a random seed is resolved), so ``--resume`` finds it again only if that job did not change."""
    data = json.dumps([str(Path(file).absolute()), int(index), request.to_dict()], sort_keys=True)
    return hashlib.sha256(data.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class HistoryEntry:
    id: int
    job_id: int | None
    path: str
    request: GenerationRequest
    seed: int | None
    model_hash: str | None
    timings: dict[str, float] = field(default_factory=dict)
    created: float = 0.0


def _request_json(request: GenerationRequest) -> str:
    return json.dumps(request.to_dict(), sort_keys=True)


def _job_from_row(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"],
        queue=row["queue"],
        state=row["state"],
        priority=row["priority"],
        position=row["position"],
        request=GenerationRequest.from_dict(json.loads(row["request"])),
        created=row["created"],
        started=row["started"],
        finished=row["finished"],
        error=row["error"],
        owner_pid=row["owner_pid"],
        owner_host=row["owner_host"],
        heartbeat=row["heartbeat"],
        cancel_requested=bool(row["cancel_requested"]),
        output_dir=row["output_dir"],
        source_key=row["source_key"],
    )


def _history_from_row(row: sqlite3.Row) -> HistoryEntry:
    return HistoryEntry(
        id=row["id"],
        job_id=row["job_id"],
        path=row["path"],
        request=GenerationRequest.from_dict(json.loads(row["request"])),
        seed=row["seed"],
        model_hash=row["model_hash"],
        timings=json.loads(row["timings"] or "{}"),
        created=row["created"],
    )


def _parse_rows(rows: list[sqlite3.Row], parse: Any) -> list[Any]:
    """Rows whose stored request this version rejects are left out of listings (and logged)."""
    out = []
    for row in rows:
        try:
            out.append(parse(row))
        except (DarkroomError, ValueError, TypeError) as exc:
            log.warning("skipping unreadable row %s: %s", row["id"], exc)
    return out


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def pid_alive(pid: int) -> bool:
    """True when a process with this pid exists on this host and is not a zombie."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OSError:
        return False
    # A killed child that nobody has reaped yet still answers kill(0); it is dead all the same.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


class JobStore:
    """Queue and history over one SQLite file; safe to use from several threads and processes."""

    def __init__(
        self,
        path: Path | str | None = None,
        *,
        stale_after: float = DEFAULT_STALE_AFTER,
        busy_timeout: float | None = None,
    ) -> None:
        if path is None:
            from core.paths import database_path

            path = database_path()
        self.path = Path(path)
        self.stale_after = stale_after
        self.busy_timeout = _busy_timeout_default() if busy_timeout is None else float(busy_timeout)
        self._local = threading.local()
        self._all_connections: list[sqlite3.Connection] = []
        self._conn_lock = threading.Lock()
        self._host = socket.gethostname()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"{self.path}: cannot create the folder of the job database ({exc.strerror or exc})"
            ) from None
        self._migrate()

    # ---- connections and transactions --------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            try:
                # Autocommit mode: transactions are explicit BEGIN IMMEDIATE ... COMMIT below.
                conn = sqlite3.connect(
                    self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False
                )
                conn.row_factory = sqlite3.Row
                conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
                conn.execute("PRAGMA foreign_keys = ON")
                conn.execute("PRAGMA synchronous = NORMAL")
                if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    conn.execute("PRAGMA journal_mode = WAL")
            except sqlite3.Error as exc:
                raise StoreError(describe_sqlite_error(self.path, exc, self.busy_timeout)) from exc
            self._local.conn = conn
            with self._conn_lock:
                self._all_connections.append(conn)
        return conn

    def _write(self) -> _Transaction:
        return _Transaction(self._conn())

    def close(self) -> None:
        """Close every connection this store opened (in any thread)."""
        with self._conn_lock:
            for conn in self._all_connections:
                try:
                    conn.close()
                except sqlite3.Error:
                    pass
            self._all_connections.clear()
        self._local = threading.local()

    def __enter__(self) -> JobStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @_db_call
    def _migrate(self) -> None:
        conn = self._conn()
        if conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
            return  # up to date: opening needs no write lock (another process may hold it a while)
        with self._write():
            # Re-read inside the write lock: another process may have migrated while we waited.
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path}: the job database has schema version {version}, newer than this "
                    f"Darkroom understands ({SCHEMA_VERSION}); upgrade Darkroom or use another --db"
                )
            for index in range(version, SCHEMA_VERSION):
                for statement in MIGRATIONS[index]:
                    conn.execute(statement)
            if version != SCHEMA_VERSION:
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @property
    @_db_call
    def schema_version(self) -> int:
        return self._conn().execute("PRAGMA user_version").fetchone()[0]

    # ---- jobs --------------------------------------------------------------------------------------------

    @_db_call
    def add_job(
        self,
        request: GenerationRequest,
        *,
        priority: int = 0,
        queue: str = "default",
        owned: bool = False,
        source_key: str | None = None,
    ) -> int:
        """Queue a request; ``owned``: the queue is this process's own (see the module docstring);
        ``source_key``: the batch file line it comes from (``core.store.source_key``)."""
        if not isinstance(request, GenerationRequest):
            raise TypeError("add_job needs a GenerationRequest")
        conn = self._conn()
        owner_pid, owner_host = (os.getpid(), self._host) if owned else (None, None)
        with self._write():
            position = conn.execute("SELECT COALESCE(MAX(position), 0) + 1 FROM jobs").fetchone()[0]
            cur = conn.execute(
                "INSERT INTO jobs (queue, state, priority, position, request, created, owner_pid, owner_host, "
                "source_key) VALUES (?, 'pending', ?, ?, ?, ?, ?, ?, ?)",
                (
                    queue, int(priority), position, _request_json(request), time.time(), owner_pid, owner_host,
                    source_key,
                ),
            )
            return int(cur.lastrowid)

    @_db_call
    def claim_next(self, queue: str = "default", output_dir: Path | str | None = None) -> Job | None:
        """Atomically take the next pending job (highest priority, then oldest) and mark it running;
        ``output_dir`` (where the images will go) is recorded for crash recovery."""
        conn = self._conn()
        while True:
            now = time.time()
            with self._write():
                row = conn.execute(
                    "SELECT * FROM jobs WHERE queue = ? AND state = 'pending' "
                    "ORDER BY priority DESC, position, id LIMIT 1",
                    (queue,),
                ).fetchone()
                if row is None:
                    return None
                try:
                    job = _job_from_row(row)
                except (DarkroomError, ValueError, TypeError) as exc:
                    # Written by another version with values this one rejects: fail it, take the next.
                    conn.execute(
                        "UPDATE jobs SET state = 'failed', finished = ?, error = ? WHERE id = ?",
                        (now, f"the stored request cannot be used: {exc}", row["id"]),
                    )
                    continue
                conn.execute(
                    "UPDATE jobs SET state = 'running', started = ?, heartbeat = ?, owner_pid = ?, "
                    "owner_host = ?, cancel_requested = 0, error = NULL, finished = NULL, "
                    "output_dir = COALESCE(?, output_dir) WHERE id = ?",
                    (now, now, os.getpid(), self._host, str(output_dir) if output_dir else None, row["id"]),
                )
            return dataclasses.replace(
                job,
                state="running",
                started=now,
                heartbeat=now,
                owner_pid=os.getpid(),
                owner_host=self._host,
                cancel_requested=False,
                error=None,
                finished=None,
                output_dir=str(output_dir) if output_dir else job.output_dir,
            )

    @_db_call
    def heartbeat(self, job_id: int) -> None:
        with self._write() as conn:
            conn.execute(
                "UPDATE jobs SET heartbeat = ? WHERE id = ? AND state = 'running'", (time.time(), job_id)
            )

    @_db_call
    def update_request(self, job_id: int, request: GenerationRequest) -> None:
        """Store the request back (the worker records the resolved seed when a job starts)."""
        with self._write() as conn:
            conn.execute("UPDATE jobs SET request = ? WHERE id = ?", (_request_json(request), job_id))

    @_db_call
    def _end_running(self, job_id: int, state: str, error: str | None = None) -> bool:
        # Only a running job can end; a job already marked interrupted by stop()/recover() stays so.
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE jobs SET state = ?, error = ?, finished = ?, cancel_requested = 0 "
                "WHERE id = ? AND state = 'running'",
                (state, error, time.time(), job_id),
            )
            return cur.rowcount > 0

    def finish(self, job_id: int) -> bool:
        return self._end_running(job_id, "done")

    def fail(self, job_id: int, error: str) -> bool:
        return self._end_running(job_id, "failed", error)

    def mark_cancelled(self, job_id: int) -> bool:
        """A running job stopped because its cancel was requested."""
        return self._end_running(job_id, "cancelled")

    def mark_interrupted(self, job_id: int) -> bool:
        """A running job stopped by the worker shutting down (retryable, unlike a user cancel)."""
        return self._end_running(job_id, "interrupted")

    @_db_call
    def cancel(self, job_id: int) -> bool:
        """Pending -> cancelled now; running -> ``cancel_requested`` for its worker. False otherwise."""
        with self._write() as conn:
            row = conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return False
            if row["state"] == "pending":
                conn.execute(
                    "UPDATE jobs SET state = 'cancelled', finished = ? WHERE id = ?", (time.time(), job_id)
                )
                return True
            if row["state"] == "running":
                conn.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
                return True
            return False

    @_db_call
    def is_cancel_requested(self, job_id: int) -> bool:
        row = self._conn().execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return bool(row and row[0])

    @_db_call
    def retry(self, job_id: int, queue: str | None = None, *, owned: bool = False) -> int:
        """Put a failed, interrupted or cancelled job back at the end of ``queue`` (default: its own queue);
        returns its id. A worker retries into its own queue, so a job of an ended batch run runs there;
        ``owned`` as in ``add_job`` (a batch run's own queue)."""
        owner_pid, owner_host = (os.getpid(), self._host) if owned else (None, None)
        with self._write() as conn:
            row = conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise JobStateError(f"job {job_id} does not exist")
            if row["state"] not in RETRYABLE_STATES:
                raise JobStateError(
                    f"job {job_id} is {row['state']}; only {', '.join(RETRYABLE_STATES)} jobs can be retried"
                )
            position = conn.execute("SELECT COALESCE(MAX(position), 0) + 1 FROM jobs").fetchone()[0]
            conn.execute(
                "UPDATE jobs SET state = 'pending', position = ?, started = NULL, finished = NULL, "
                "error = NULL, owner_pid = ?, owner_host = ?, heartbeat = NULL, cancel_requested = 0, "
                "queue = COALESCE(?, queue) WHERE id = ?",
                (position, owner_pid, owner_host, queue, job_id),
            )
        return job_id

    @_db_call
    def interrupt_pending(self, queue: str, reason: str) -> int:
        """Mark every pending job of ``queue`` interrupted (its process stops without running them); returns
        how many. They stay retryable, from the TUI's Queue screen for instance."""
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE jobs SET state = 'interrupted', finished = ?, error = ? WHERE queue = ? AND state = 'pending'",
                (time.time(), reason, queue),
            )
            return cur.rowcount

    @_db_call
    def move(self, job_id: int, delta: int) -> bool:
        """Move a pending job ``delta`` places in run order (negative = sooner); False if it is already first
        (or last) and so cannot move.

        Passing a job of another priority takes that job's priority, so the new order is what runs.
        """
        if delta == 0:
            return False
        with self._write() as conn:
            row = conn.execute("SELECT queue, state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise JobStateError(f"job {job_id} does not exist")
            if row["state"] != "pending":
                raise JobStateError(f"job {job_id} is {row['state']}; only pending jobs can be moved")
            rows = conn.execute(
                "SELECT id, priority, position FROM jobs WHERE queue = ? AND state = 'pending' "
                "ORDER BY priority DESC, position, id",
                (row["queue"],),
            ).fetchall()
            order = [r["id"] for r in rows]
            priority = {r["id"]: r["priority"] for r in rows}
            positions = sorted(r["position"] for r in rows)
            old = order.index(job_id)
            new = max(0, min(len(order) - 1, old + delta))
            if new == old:
                return False
            passed = order[new]  # the last job it overtakes (moving up) or falls behind (moving down)
            order.pop(old)
            order.insert(new, job_id)
            conn.execute("UPDATE jobs SET priority = ? WHERE id = ?", (priority[passed], job_id))
            for jid, pos in zip(order, positions):
                conn.execute("UPDATE jobs SET position = ? WHERE id = ?", (pos, jid))
        return True

    @_db_call
    def get_job(self, job_id: int) -> Job | None:
        row = self._conn().execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job_from_row(row) if row else None

    @_db_call
    def list_jobs(self, states: Iterable[str] | None = None, queue: str | None = None,
                  limit: int | None = None) -> list[Job]:
        """Running first, then pending in run order, then the ended ones, most recently ended first; at most
        ``limit`` of them."""
        where, args = [], []
        if states is not None:
            states = list(states)
            bad = [s for s in states if s not in STATES]
            if bad:
                raise ValueError(f"unknown job state {bad[0]!r}; valid: {', '.join(STATES)}")
            where.append(f"state IN ({', '.join('?' * len(states))})")
            args.extend(states)
        if queue is not None:
            where.append("queue = ?")
            args.append(queue)
        sql = "SELECT * FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += (
            " ORDER BY CASE state WHEN 'running' THEN 0 WHEN 'pending' THEN 1 ELSE 2 END,"
            " CASE WHEN state = 'pending' THEN -priority ELSE 0 END,"
            " CASE WHEN state IN ('running', 'pending') THEN 0 ELSE -COALESCE(finished, created) END, position, id"
        )
        if limit is not None:
            sql += " LIMIT ?"
            args.append(int(limit))
        return _parse_rows(self._conn().execute(sql, args).fetchall(), _job_from_row)

    @_db_call
    def pending_count(self, queue: str | None = None) -> int:
        if queue is None:
            row = self._conn().execute("SELECT COUNT(*) FROM jobs WHERE state = 'pending'").fetchone()
        else:
            row = (
                self._conn()
                .execute("SELECT COUNT(*) FROM jobs WHERE state = 'pending' AND queue = ?", (queue,))
                .fetchone()
            )
        return int(row[0])

    def _abandoned(self, row: sqlite3.Row, now: float) -> str | None:
        """Why recover() takes this job over (its error text), or None when its owner may still be at it."""
        dead = row["owner_host"] == self._host and row["owner_pid"] is not None and not pid_alive(row["owner_pid"])
        if row["state"] == "pending":  # queued in a private queue whose process is gone
            return "not started: the process that queued it stopped" if dead else None
        stale = row["heartbeat"] is None or now - row["heartbeat"] > self.stale_after
        return "interrupted: the process running it stopped" if stale or dead else None

    @_db_call
    def abandoned_jobs(self) -> list[Job]:
        """Running jobs whose owner is gone: those ``recover()`` would end (crash recovery looks for the images
        they saved before passing them to ``recover``)."""
        now = time.time()
        rows = self._conn().execute("SELECT * FROM jobs WHERE state = 'running'").fetchall()
        return _parse_rows([r for r in rows if self._abandoned(r, now)], _job_from_row)

    @_db_call
    def recover(self, found: Mapping[int, Iterable[FoundImage]] | None = None) -> list[int]:
        """End the jobs whose owner is gone (dead pid, or stale heartbeat); returns their ids.

        ``found``: images such a job saved (job id -> images), from its output folder; those its history lacks
        are recorded. A job with every image recorded is then ``done`` (killed after its last save), any other
        ``interrupted`` (retryable; a retry does not make again the images it already has). Pending jobs of a
        private queue whose process is gone become interrupted. Jobs owned by a live process with a fresh
        heartbeat, including this one, are left alone. All in one transaction, so two processes recovering at
        once record nothing twice.
        """
        now = time.time()
        recovered = []
        found = found or {}
        with self._write() as conn:
            rows = conn.execute(
                "SELECT * FROM jobs WHERE state = 'running' OR (state = 'pending' AND owner_pid IS NOT NULL)"
            ).fetchall()
            for row in rows:
                error = self._abandoned(row, now)
                if error is None:
                    continue
                state = "interrupted"
                if row["state"] == "running":
                    recorded = {
                        r["path"] for r in conn.execute("SELECT path FROM history WHERE job_id = ?", (row["id"],))
                    }
                    for image in found.get(row["id"], ()):
                        if image.path not in recorded:
                            self._insert_history(conn, row["id"], image.path, image.request, image.seed,
                                                 image.model_hash, {})
                            recorded.add(image.path)
                    if self._all_images_recorded(conn, row):
                        state, error = "done", None
                conn.execute(
                    "UPDATE jobs SET state = ?, finished = ?, error = ? WHERE id = ?",
                    (state, now, error, row["id"]),
                )
                recovered.append(int(row["id"]))
        return recovered

    @staticmethod
    def _all_images_recorded(conn: sqlite3.Connection, row: sqlite3.Row) -> bool:
        try:
            seeds = set(GenerationRequest.from_dict(json.loads(row["request"])).image_seeds())
        except (DarkroomError, ValueError, TypeError):  # unreadable, or killed before its seed was resolved
            return False
        recorded = {r[0] for r in conn.execute("SELECT seed FROM history WHERE job_id = ?", (row["id"],))}
        return seeds <= recorded

    @_db_call
    def jobs_by_source(self, keys: Iterable[str]) -> dict[str, Job]:
        """The latest job queued from each batch file line (``source_key``), for ``--resume``."""
        out: dict[str, Job] = {}
        conn = self._conn()
        for key in set(keys):
            row = conn.execute(
                "SELECT * FROM jobs WHERE source_key = ? ORDER BY id DESC LIMIT 1", (key,)
            ).fetchone()
            if row is not None:
                jobs = _parse_rows([row], _job_from_row)
                if jobs:
                    out[key] = jobs[0]
        return out

    # ---- history -----------------------------------------------------------------------------------------

    @_db_call
    def add_history(
        self,
        job_id: int | None,
        path: Path | str,
        request: GenerationRequest,
        seed: int | None = None,
        model_hash: str | None = None,
        timings: Mapping[str, float] | None = None,
    ) -> int:
        """Record a saved image; recording the same image of the same job again returns the existing row (a
        worker that was frozen past ``stale_after`` may record an image that crash recovery already did)."""
        with self._write() as conn:
            if job_id is not None:
                row = conn.execute(
                    "SELECT id FROM history WHERE job_id = ? AND path = ?", (job_id, str(path))
                ).fetchone()
                if row is not None:
                    return int(row[0])
            return self._insert_history(conn, job_id, path, request, seed, model_hash, timings)

    @staticmethod
    def _insert_history(
        conn: sqlite3.Connection,
        job_id: int | None,
        path: Path | str,
        request: GenerationRequest,
        seed: int | None,
        model_hash: str | None,
        timings: Mapping[str, float] | None,
    ) -> int:
        cur = conn.execute(
            "INSERT INTO history (job_id, path, request, prompt, seed, model_hash, timings, created) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                job_id,
                str(path),
                _request_json(request),
                request.prompt,
                seed if seed is not None else request.seed,
                model_hash,
                json.dumps(dict(timings or {})),
                time.time(),
            ),
        )
        return int(cur.lastrowid)

    @_db_call
    def history(self, search: str | None = None, limit: int = 100, offset: int = 0) -> list[HistoryEntry]:
        """Newest first; ``search`` matches a substring of the prompt or the file's path (case-insensitive for
        ASCII), or the seed: a file name from a file manager, a day's folder or a seed finds its image too."""
        sql, args = "SELECT * FROM history", []
        if search:
            sql += " WHERE prompt LIKE ? ESCAPE '\\' OR path LIKE ? ESCAPE '\\'"
            args.extend([f"%{_escape_like(search)}%"] * 2)
            digits = search.strip()
            # ASCII digits that fit SQLite's integer: '²' is a digit int() refuses, and a long run of digits
            # (a timestamp in a file name) overflowed, so the search failed instead of matching the path
            if digits.isascii() and digits.isdigit() and int(digits) < 2**63:
                sql += " OR seed = ?"
                args.append(int(digits))
        sql += " ORDER BY created DESC, id DESC LIMIT ? OFFSET ?"
        args.extend([int(limit), int(offset)])
        return _parse_rows(self._conn().execute(sql, args).fetchall(), _history_from_row)

    @_db_call
    def job_history(self, job_id: int) -> list[HistoryEntry]:
        """The images recorded for one job, in the order they were saved."""
        rows = self._conn().execute("SELECT * FROM history WHERE job_id = ? ORDER BY id", (job_id,)).fetchall()
        return _parse_rows(rows, _history_from_row)

    @_db_call
    def grid_images(self, grid_id: str) -> list[HistoryEntry]:
        """The grid images saved for ``grid_id`` (history rows of no job), newest first."""
        rows = self._conn().execute(
            "SELECT * FROM history WHERE job_id IS NULL AND json_extract(request, '$.extra.grid.id') = ? "
            "AND json_extract(request, '$.extra.grid.image') ORDER BY id DESC", (grid_id,)
        ).fetchall()
        return _parse_rows(rows, _history_from_row)

    @_db_call
    def get_history(self, history_id: int) -> HistoryEntry | None:
        row = self._conn().execute("SELECT * FROM history WHERE id = ?", (history_id,)).fetchone()
        return _history_from_row(row) if row else None

    @_db_call
    def delete_history(self, history_id: int) -> bool:
        """Forget one history row (the image file is left on disk)."""
        with self._write() as conn:
            return conn.execute("DELETE FROM history WHERE id = ?", (history_id,)).rowcount > 0

    # ---- X/Y/Z grids awaiting their grid image -------------------------------------------------------------

    @_db_call
    def add_grid(self, grid_id: str, axes: Mapping[str, Any], request: GenerationRequest) -> None:
        """Record a grid before its cells are queued: ``axes`` as ``core.grid.axes_table`` writes them,
        ``request`` the one its cells vary (what the grid image records)."""
        with self._write() as conn:
            conn.execute(
                "INSERT INTO grids (id, axes, request, created) VALUES (?, ?, ?, ?)",
                (grid_id, json.dumps(dict(axes), sort_keys=True), _request_json(request), time.time()),
            )

    @_db_call
    def open_grids(self) -> list[tuple[str, dict[str, Any], GenerationRequest]]:
        """The grids whose image is not saved yet, oldest first: ``(id, axes, request)``."""
        rows = self._conn().execute("SELECT * FROM grids ORDER BY created, id").fetchall()
        return _parse_rows(
            rows, lambda row: (row["id"], json.loads(row["axes"]), GenerationRequest.from_dict(json.loads(row["request"])))
        )

    @_db_call
    def grid_cells(self, grid_id: str) -> list[Job]:
        """Every job queued as a cell of ``grid_id`` (a cell queued again too), oldest first."""
        rows = self._conn().execute(
            "SELECT * FROM jobs WHERE json_extract(request, '$.extra.grid.id') = ? ORDER BY id", (grid_id,)
        ).fetchall()
        return _parse_rows(rows, _job_from_row)

    @_db_call
    def add_grid_image(self, grid_id: str, path: Path | str, request: GenerationRequest, seed: int | None) -> int:
        """Record a saved grid image in the history and forget its open grid in one transaction, so a reader
        (or the next start after a kill) never sees the image recorded while the grid still waits for it."""
        with self._write() as conn:
            history_id = self._insert_history(conn, None, path, request, seed, None, None)
            conn.execute("DELETE FROM grids WHERE id = ?", (grid_id,))
            return history_id

    @_db_call
    def close_grid(self, grid_id: str) -> bool:
        """Forget a grid (its image is saved, or it cannot get one); False when it was not open."""
        with self._write() as conn:
            return conn.execute("DELETE FROM grids WHERE id = ?", (grid_id,)).rowcount > 0


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error); takes the write lock up front."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            try:
                self.conn.execute("COMMIT")
                return
            except sqlite3.Error:
                self._rollback()  # e.g. the disk filled up: leave no transaction open on this connection
                raise
        self._rollback()

    def _rollback(self) -> None:
        # SQLite may already have rolled back by itself (a full disk, an I/O error): never mask the real error.
        if self.conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("ROLLBACK")
