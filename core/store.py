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
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import DarkroomError
from core.request import GenerationRequest

STATES = ("pending", "running", "done", "failed", "cancelled", "interrupted")
FINAL_STATES = ("done", "failed", "cancelled", "interrupted")
log = logging.getLogger(__name__)

RETRYABLE_STATES = ("failed", "interrupted", "cancelled")

# A running job whose heartbeat is older than this is treated as abandoned even if its pid is alive
# (the pid may have been reused). Workers heartbeat about once a second.
DEFAULT_STALE_AFTER = 120.0

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
]
SCHEMA_VERSION = len(MIGRATIONS)


class StoreError(DarkroomError):
    """The database cannot be used (newer schema, unreadable file)."""


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

    def __init__(self, path: Path | str | None = None, *, stale_after: float = DEFAULT_STALE_AFTER) -> None:
        if path is None:
            from core.paths import database_path

            path = database_path()
        self.path = Path(path)
        self.stale_after = stale_after
        self._local = threading.local()
        self._all_connections: list[sqlite3.Connection] = []
        self._conn_lock = threading.Lock()
        self._host = socket.gethostname()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._migrate()

    # ---- connections and transactions --------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            try:
                # Autocommit mode: transactions are explicit BEGIN IMMEDIATE ... COMMIT below.
                conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
                conn.row_factory = sqlite3.Row
                conn.execute("PRAGMA busy_timeout = 30000")
                conn.execute("PRAGMA foreign_keys = ON")
                conn.execute("PRAGMA synchronous = NORMAL")
                if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    conn.execute("PRAGMA journal_mode = WAL")
            except sqlite3.DatabaseError as exc:
                raise StoreError(f"{self.path}: cannot open the job database ({exc})") from exc
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

    def _migrate(self) -> None:
        conn = self._conn()
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
    def schema_version(self) -> int:
        return self._conn().execute("PRAGMA user_version").fetchone()[0]

    # ---- jobs --------------------------------------------------------------------------------------------

    def add_job(
        self, request: GenerationRequest, *, priority: int = 0, queue: str = "default", owned: bool = False
    ) -> int:
        """Queue a request; ``owned``: the queue is this process's own (see the module docstring)."""
        if not isinstance(request, GenerationRequest):
            raise TypeError("add_job needs a GenerationRequest")
        conn = self._conn()
        owner_pid, owner_host = (os.getpid(), self._host) if owned else (None, None)
        with self._write():
            position = conn.execute("SELECT COALESCE(MAX(position), 0) + 1 FROM jobs").fetchone()[0]
            cur = conn.execute(
                "INSERT INTO jobs (queue, state, priority, position, request, created, owner_pid, owner_host) "
                "VALUES (?, 'pending', ?, ?, ?, ?, ?, ?)",
                (queue, int(priority), position, _request_json(request), time.time(), owner_pid, owner_host),
            )
            return int(cur.lastrowid)

    def claim_next(self, queue: str = "default") -> Job | None:
        """Atomically take the next pending job (highest priority, then oldest) and mark it running."""
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
                    "owner_host = ?, cancel_requested = 0, error = NULL, finished = NULL WHERE id = ?",
                    (now, now, os.getpid(), self._host, row["id"]),
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
            )

    def heartbeat(self, job_id: int) -> None:
        with self._write() as conn:
            conn.execute(
                "UPDATE jobs SET heartbeat = ? WHERE id = ? AND state = 'running'", (time.time(), job_id)
            )

    def update_request(self, job_id: int, request: GenerationRequest) -> None:
        """Store the request back (the worker records the resolved seed when a job starts)."""
        with self._write() as conn:
            conn.execute("UPDATE jobs SET request = ? WHERE id = ?", (_request_json(request), job_id))

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

    def is_cancel_requested(self, job_id: int) -> bool:
        row = self._conn().execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return bool(row and row[0])

    def retry(self, job_id: int, queue: str | None = None) -> int:
        """Put a failed, interrupted or cancelled job back at the end of ``queue`` (default: its own queue);
        returns its id. A worker retries into its own queue, so a job of an ended batch run runs there."""
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
                "error = NULL, owner_pid = NULL, owner_host = NULL, heartbeat = NULL, cancel_requested = 0, "
                "queue = COALESCE(?, queue) WHERE id = ?",
                (position, queue, job_id),
            )
        return job_id

    def interrupt_pending(self, queue: str, reason: str) -> int:
        """Mark every pending job of ``queue`` interrupted (its process stops without running them); returns
        how many. They stay retryable, from the TUI's Queue screen for instance."""
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE jobs SET state = 'interrupted', finished = ?, error = ? WHERE queue = ? AND state = 'pending'",
                (time.time(), reason, queue),
            )
            return cur.rowcount

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

    def get_job(self, job_id: int) -> Job | None:
        row = self._conn().execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job_from_row(row) if row else None

    def list_jobs(self, states: Iterable[str] | None = None, queue: str | None = None) -> list[Job]:
        """Running first, then pending in run order, then the ended ones, most recently ended first."""
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
        return _parse_rows(self._conn().execute(sql, args).fetchall(), _job_from_row)

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

    def recover(self) -> list[int]:
        """Mark running jobs whose owner is gone (dead pid, or stale heartbeat) as interrupted.

        Jobs owned by a live process with a fresh heartbeat, including this one, are left alone.
        """
        now = time.time()
        recovered = []
        with self._write() as conn:
            rows = conn.execute(
                "SELECT id, state, owner_pid, owner_host, heartbeat FROM jobs "
                "WHERE state = 'running' OR (state = 'pending' AND owner_pid IS NOT NULL)"
            ).fetchall()
            for row in rows:
                dead = (
                    row["owner_host"] == self._host
                    and row["owner_pid"] is not None
                    and not pid_alive(row["owner_pid"])
                )
                if row["state"] == "pending":  # queued in a private queue whose process is gone
                    if not dead:
                        continue
                    error = "not started: the process that queued it stopped"
                else:
                    stale = row["heartbeat"] is None or now - row["heartbeat"] > self.stale_after
                    if not (stale or dead):
                        continue
                    error = "interrupted: the process running it stopped"
                conn.execute(
                    "UPDATE jobs SET state = 'interrupted', finished = ?, error = ? WHERE id = ?",
                    (now, error, row["id"]),
                )
                recovered.append(int(row["id"]))
        return recovered

    # ---- history -----------------------------------------------------------------------------------------

    def add_history(
        self,
        job_id: int | None,
        path: Path | str,
        request: GenerationRequest,
        seed: int | None = None,
        model_hash: str | None = None,
        timings: Mapping[str, float] | None = None,
    ) -> int:
        with self._write() as conn:
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

    def history(self, search: str | None = None, limit: int = 100, offset: int = 0) -> list[HistoryEntry]:
        """Newest first; ``search`` matches a substring of the prompt (case-insensitive for ASCII)."""
        sql, args = "SELECT * FROM history", []
        if search:
            sql += " WHERE prompt LIKE ? ESCAPE '\\'"
            args.append(f"%{_escape_like(search)}%")
        sql += " ORDER BY created DESC, id DESC LIMIT ? OFFSET ?"
        args.extend([int(limit), int(offset)])
        return _parse_rows(self._conn().execute(sql, args).fetchall(), _history_from_row)

    def get_history(self, history_id: int) -> HistoryEntry | None:
        row = self._conn().execute("SELECT * FROM history WHERE id = ?", (history_id,)).fetchone()
        return _history_from_row(row) if row else None

    def delete_history(self, history_id: int) -> bool:
        """Forget one history row (the image file is left on disk)."""
        with self._write() as conn:
            return conn.execute("DELETE FROM history WHERE id = ?", (history_id,)).rowcount > 0


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error); takes the write lock up front."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.conn.execute("COMMIT")
        else:
            self.conn.execute("ROLLBACK")
