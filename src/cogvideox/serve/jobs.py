"""The job queue: video jobs as rows of one table, in SQLite (one machine) or PostgreSQL (many).

Both backends run the same SQL; every operation is a single statement, so each one is atomic on its own
and no transaction spans a round trip. A worker claims the oldest queued job with one UPDATE whose
sub-select picks the row (PostgreSQL adds `FOR UPDATE SKIP LOCKED`, so concurrent claimers take different
rows without waiting on each other; SQLite has a single writer, which serialises claims by itself). A claim
is a lease: the worker renews it while it works, and a job whose lease ran out (its worker died) is claimed
again by the next worker that asks, up to `max_attempts` times.

States: queued -> in_progress -> completed | failed, and queued / in_progress -> cancelled.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cogvideox.errors import CogVideoXError, InputError

ACTIVE = ("queued", "in_progress")
FINISHED = ("completed", "failed", "cancelled")
STATUSES = ACTIVE + FINISHED

# Ids are the only thing from a URL that ever becomes part of a file name, so their shape is fixed.
_ID_PATTERN = re.compile(r"video_[0-9a-f]{24}")

# Upper bounds (seconds) of the generation-time histogram in /metrics.
GENERATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 3600)


def new_job_id() -> str:
    return "video_" + secrets.token_hex(12)


def is_job_id(text: str) -> bool:
    return _ID_PATTERN.fullmatch(text) is not None


@dataclass
class Job:
    """One row of the queue. `params` holds the generation request (prompt, size, frames, seed, ...)."""

    id: str
    model: str
    owner: str
    status: str
    params: dict[str, Any]
    created_at: float
    progress: int = 0
    started_at: float | None = None
    completed_at: float | None = None
    worker: str | None = None
    lease_until: float | None = None
    attempts: int = 0
    error: dict[str, str] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    generation_seconds: float | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Job:
        row = dict(row)
        row.pop("seq", None)
        row["params"] = json.loads(row["params"])
        row["error"] = json.loads(row["error"]) if row["error"] else None
        row["timings"] = json.loads(row["timings"]) if row["timings"] else {}
        return cls(**row)


_COLUMNS = (
    "id TEXT NOT NULL UNIQUE, model TEXT NOT NULL, owner TEXT NOT NULL, status TEXT NOT NULL, "
    "params TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL, progress INTEGER NOT NULL DEFAULT 0, "
    "started_at DOUBLE PRECISION, completed_at DOUBLE PRECISION, worker TEXT, lease_until DOUBLE PRECISION, "
    "attempts INTEGER NOT NULL DEFAULT 0, error TEXT, timings TEXT, generation_seconds DOUBLE PRECISION"
)
_INDEXES = (
    "CREATE INDEX IF NOT EXISTS jobs_claim ON jobs (model, status, seq)",
    "CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (owner, status)",
)


class JobStore:
    """The queue's operations, written once in SQL with `?` placeholders; subclasses run the statements.

    Times are Unix seconds from the caller's clock (machines sharing a PostgreSQL queue keep theirs in sync
    with NTP; a lease is tens of seconds, far above any sane skew).
    """

    lock_clause = ""  # appended to the claim's sub-select
    seq_column = ""  # the auto-incrementing column that orders jobs

    def _run(self, sql: str, params: tuple = ()) -> tuple[list[dict[str, Any]], int]:
        """Execute one statement in its own transaction: (rows it returned, rows it changed)."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def _create_schema(self) -> None:
        self._run(f"CREATE TABLE IF NOT EXISTS jobs ({self.seq_column}, {_COLUMNS})")
        for statement in _INDEXES:
            self._run(statement)

    # -------------------------------------------------------------------------------------------------
    # The API's side

    def create(self, model: str, owner: str, params: dict[str, Any], owner_limit: int | None = None) -> Job | None:
        """Queue a job; None when `owner` already has `owner_limit` active jobs (checked in the same statement)."""
        job = Job(id=new_job_id(), model=model, owner=owner, status="queued", params=params, created_at=time.time())
        values = (job.id, job.model, job.owner, job.status, json.dumps(params), job.created_at)
        insert = "INSERT INTO jobs (id, model, owner, status, params, created_at) "
        if owner_limit is None:
            _, changed = self._run(insert + "VALUES (?, ?, ?, ?, ?, ?)", values)
        else:
            _, changed = self._run(
                insert + "SELECT ?, ?, ?, ?, ?, ? WHERE (SELECT COUNT(*) FROM jobs WHERE owner = ? "
                "AND status IN ('queued', 'in_progress')) < ?",
                (*values, owner, owner_limit),
            )
        return job if changed else None

    def get(self, job_id: str, owner: str | None = None) -> Job | None:
        """The job `job_id`; with `owner`, only if it is that owner's (None for another's, as for no job)."""
        where, params = _where([("id = ?", job_id), ("owner = ?", owner)])
        rows, _ = self._run(f"SELECT * FROM jobs {where}", params)
        return Job.from_row(rows[0]) if rows else None

    def page(
        self, limit: int = 20, after: str | None = None, newest_first: bool = True, owner: str | None = None
    ) -> tuple[list[Job], bool]:
        """Up to `limit` jobs after the job `after` in creation order (with `owner`, that owner's jobs only);
        and whether more follow."""
        order, compare = ("DESC", "<") if newest_first else ("ASC", ">")
        where, params = _where(
            [(f"seq {compare} (SELECT seq FROM jobs WHERE id = ?)", after), ("owner = ?", owner)]
        )
        rows, _ = self._run(f"SELECT * FROM jobs {where} ORDER BY seq {order} LIMIT ?", (*params, limit + 1))
        return [Job.from_row(r) for r in rows[:limit]], len(rows) > limit

    def cancel(self, job_id: str) -> bool:
        """Mark a queued or running job cancelled (its worker notices at its next heartbeat)."""
        _, changed = self._run(
            "UPDATE jobs SET status = 'cancelled', completed_at = ?, lease_until = NULL "
            "WHERE id = ? AND status IN ('queued', 'in_progress')",
            (time.time(), job_id),
        )
        return changed == 1

    def delete(self, job_id: str) -> bool:
        """Remove a finished job's row (the caller removes its file)."""
        _, changed = self._run(
            "DELETE FROM jobs WHERE id = ? AND status IN ('completed', 'failed', 'cancelled')", (job_id,)
        )
        return changed == 1

    def expire(self, before: float, limit: int = 100) -> list[Job]:
        """Remove up to `limit` jobs that finished (completed, failed or cancelled) before `before`, oldest
        first; the removed jobs, whose files the caller removes. Each row goes to one caller only, however
        many servers sweep at once."""
        rows, _ = self._run(
            "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE status IN ('completed', 'failed', "
            "'cancelled') AND completed_at < ? ORDER BY seq LIMIT ?) RETURNING *",
            (before, limit),
        )
        return [Job.from_row(r) for r in sorted(rows, key=lambda r: r["seq"])]  # RETURNING has no order

    def stats(self) -> dict[str, Any]:
        """Jobs by status, and the generation-time histogram of completed jobs (for /metrics)."""
        rows, _ = self._run("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status")
        by_status = dict.fromkeys(STATUSES, 0) | {r["status"]: int(r["n"]) for r in rows}
        buckets = ", ".join(
            f"SUM(CASE WHEN generation_seconds <= {b} THEN 1 ELSE 0 END) AS le_{b}" for b in GENERATION_BUCKETS
        )
        rows, _ = self._run(
            f"SELECT COUNT(*) AS n, SUM(generation_seconds) AS total, {buckets} "
            "FROM jobs WHERE status = 'completed' AND generation_seconds IS NOT NULL"
        )
        row = rows[0]
        histogram = {b: int(row[f"le_{b}"] or 0) for b in GENERATION_BUCKETS}
        return {
            "by_status": by_status,
            "generation": {"count": int(row["n"]), "sum": float(row["total"] or 0.0), "buckets": histogram},
        }

    # -------------------------------------------------------------------------------------------------
    # The workers' side

    def claim(self, worker: str, model: str, lease_seconds: float, max_attempts: int = 3) -> Job | None:
        """Take the oldest job of `model` that is queued or whose lease ran out; None when there is none."""
        now = time.time()
        self._run(
            "UPDATE jobs SET status = 'failed', completed_at = ?, lease_until = NULL, error = ? "
            "WHERE model = ? AND status = 'in_progress' AND lease_until < ? AND attempts >= ?",
            (
                now,
                _error_json("worker_lost", f"the worker stopped answering {max_attempts} times"),
                model,
                now,
                max_attempts,
            ),
        )
        rows, _ = self._run(
            "UPDATE jobs SET status = 'in_progress', worker = ?, lease_until = ?, attempts = attempts + 1, "
            "progress = 0, started_at = ? "
            "WHERE id = (SELECT id FROM jobs WHERE model = ? AND (status = 'queued' OR "
            f"(status = 'in_progress' AND lease_until < ?)) ORDER BY seq LIMIT 1 {self.lock_clause}) "
            "RETURNING *",
            (worker, now + lease_seconds, now, model, now),
        )
        return Job.from_row(rows[0]) if rows else None

    def heartbeat(self, job_id: str, worker: str, lease_seconds: float, progress: int) -> bool:
        """Renew the lease and record progress; False when the job is no longer this worker's to run
        (cancelled, deleted, or taken over after the lease ran out)."""
        _, changed = self._run(
            "UPDATE jobs SET lease_until = ?, progress = ? WHERE id = ? AND worker = ? AND status = 'in_progress'",
            (time.time() + lease_seconds, progress, job_id, worker),
        )
        return changed == 1

    def complete(self, job_id: str, worker: str, timings: dict[str, float]) -> bool:
        now = time.time()
        _, changed = self._run(
            "UPDATE jobs SET status = 'completed', progress = 100, completed_at = ?, lease_until = NULL, "
            "timings = ?, generation_seconds = ? WHERE id = ? AND worker = ? AND status = 'in_progress'",
            (now, json.dumps(timings), sum(timings.values()), job_id, worker),
        )
        return changed == 1

    def fail(self, job_id: str, worker: str, code: str, message: str) -> bool:
        _, changed = self._run(
            "UPDATE jobs SET status = 'failed', completed_at = ?, lease_until = NULL, error = ? "
            "WHERE id = ? AND worker = ? AND status = 'in_progress'",
            (time.time(), _error_json(code, message), job_id, worker),
        )
        return changed == 1

    def release(self, job_id: str, worker: str) -> bool:
        """Hand a job back to the queue untouched (a worker shutting down mid-job)."""
        _, changed = self._run(
            "UPDATE jobs SET status = 'queued', worker = NULL, lease_until = NULL, progress = 0, "
            "attempts = attempts - 1 WHERE id = ? AND worker = ? AND status = 'in_progress'",
            (job_id, worker),
        )
        return changed == 1


def _where(conditions: list[tuple[str, Any]]) -> tuple[str, tuple]:
    """A WHERE clause of the conditions whose value is not None (each with one `?`), and its values:
    built in Python, because PostgreSQL cannot type a parameter in `? IS NULL`."""
    used = [(sql, value) for sql, value in conditions if value is not None]
    if not used:
        return "", ()
    return "WHERE " + " AND ".join(sql for sql, _ in used), tuple(value for _, value in used)


def _error_json(code: str, message: str) -> str:
    return json.dumps({"code": code, "message": message})


class SQLiteStore(JobStore):
    """The queue in one SQLite file in WAL mode: readers never block the writer, no server to run.

    Each thread has its own connection (sqlite3 connections are not shared across threads); concurrent
    writers wait up to `busy_timeout` for the file's write lock.
    """

    seq_column = "seq INTEGER PRIMARY KEY AUTOINCREMENT"

    def __init__(self, path: str | Path, busy_timeout: float = 30.0) -> None:
        self.path = Path(path)
        self.busy_timeout = busy_timeout
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._run("PRAGMA journal_mode = WAL")
            self._create_schema()
        except (OSError, sqlite3.Error) as e:  # a folder, a file of another kind, a path that cannot be made
            self.close()
            raise InputError(f"cannot open the SQLite queue at {self.path} ({e}); give --db a SQLite file that "
                             "can be created or opened, or a postgresql:// URL") from None

    def _connection(self) -> sqlite3.Connection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = sqlite3.connect(
                self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False
            )
            connection.row_factory = sqlite3.Row
            # FULL: a job acknowledged to a client survives a power cut, not only a killed process.
            connection.execute("PRAGMA synchronous = FULL")
            self._local.connection = connection
            with self._lock:
                self._connections.append(connection)
        return connection

    def _run(self, sql, params=()):
        cursor = self._connection().execute(sql, params)
        rows = [dict(r) for r in cursor.fetchall()]
        return rows, cursor.rowcount

    def close(self) -> None:
        with self._lock:
            for connection in self._connections:
                connection.close()
            self._connections.clear()
        self._local = threading.local()


class PostgresStore(JobStore):
    """The queue in a PostgreSQL database shared by any number of API servers and workers."""

    seq_column = "seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"
    lock_clause = "FOR UPDATE SKIP LOCKED"

    def __init__(self, url: str, max_connections: int = 10, connect_timeout: float = 10.0) -> None:
        import psycopg
        from psycopg.rows import dict_row
        from psycopg_pool import ConnectionPool, PoolTimeout

        where = re.sub(r"//[^@/]*@", "//", url)  # no password in messages
        advice = "is the server running, and are the user, password and database right?"
        # One connection first: a server that is down or refuses the login is said once, with its reason,
        # rather than after the pool's retries, each logged as a warning.
        try:
            psycopg.connect(url, connect_timeout=max(2, math.ceil(connect_timeout))).close()
        except psycopg.Error as e:
            raise CogVideoXError(f"cannot connect to PostgreSQL at {where} ({_connect_failure(e)}): {advice}") from None
        self._pool = ConnectionPool(
            url,
            min_size=1,
            max_size=max_connections,
            kwargs={"autocommit": True, "row_factory": dict_row},
            open=True,
            timeout=30,
        )
        try:
            self._pool.wait(timeout=connect_timeout)
        except PoolTimeout:
            self._pool.close()
            raise CogVideoXError(
                f"cannot connect to PostgreSQL at {where} within {connect_timeout:g} s: {advice}"
            ) from None
        # Two processes starting at once may both create the table; the loser's error is harmless.
        try:
            self._create_schema()
        except Exception:
            time.sleep(0.5)
            self._create_schema()

    def _run(self, sql, params=()):
        with self._pool.connection() as connection:
            cursor = connection.execute(sql.replace("?", "%s"), params)
            rows = cursor.fetchall() if cursor.description is not None else []
            return rows, cursor.rowcount

    def close(self) -> None:
        self._pool.close()


def open_store(db: str | None, data_dir: str | Path) -> JobStore:
    """The store a `--db` value names: a postgresql:// URL, a SQLite file path, or None for
    `<data_dir>/jobs.sqlite3`."""
    if db is None:
        return SQLiteStore(Path(data_dir) / "jobs.sqlite3")
    if db.startswith(("postgresql://", "postgres://")):
        return PostgresStore(db)
    if db.startswith("sqlite:///"):
        db = db.removeprefix("sqlite:///")
    elif re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", db):
        scheme = db.split("://", 1)[0]
        raise InputError(
            f"--db {scheme}:// is not supported; give a postgresql:// URL, a sqlite:/// URL or a SQLite file path"
        )
    return SQLiteStore(db)


def _connect_failure(e: Exception) -> str:
    """libpq's reason for a failed connection, in a few words: 'Connection refused', 'password
    authentication failed for user "x"', without the host and port the message names already."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    reason = first.rsplit("failed: ", 1)[-1]
    return " ".join(re.sub(r"^(FATAL|ERROR):\s*", "", reason).split())
