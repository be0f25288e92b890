"""Job processor — a durable job queue on sqlite with workers, in the spirit of RQ, Sidekiq, BullMQ.

What it teaches
  - Work that happens later: `POST /jobs` only records the job (202 Accepted); workers claim
    it, run it and record the outcome. The queue is one sqlite table, so it survives a crash and
    any number of processes can share it (`python level05/job_processor.py worker --db PATH`).
  - The atomic claim: one `UPDATE … WHERE id = (SELECT … ORDER BY priority DESC, run_at, id
    LIMIT 1) RETURNING *` inside a write transaction. sqlite lets one writer in at a time, across
    threads and processes, so two workers can never take the same job.
  - Leases, not locks: a claimed job belongs to its worker until `lease_until`, which a heartbeat
    thread pushes forward while the job runs. A worker that dies (kill -9) stops renewing it;
    once it expires the job is claimed again. Delivery is at-least-once: a job may run twice,
    never zero times. Every write a worker makes is fenced by `worker = me AND status =
    'running'`, so a worker that lost its lease cannot overwrite the job's new owner.
  - Failure handling: a failed attempt is retried after `backoff_s · 2^(n−1)`, ±20 % jitter (so
    a thousand jobs that failed together do not retry together), at most `backoff_max_s`; after
    `max_attempts` the job is `dead` (the dead-letter set), until `POST /jobs/{id}/retry`.
    A job past its `timeout_s` fails its attempt.
  - Cooperative control: a job's code reports progress through its `JobContext`; that is where
    it learns that it was cancelled, timed out, lost its lease, or that its worker is stopping.
  - A job's state is an enum and its moves one table (`MOVES`), which the SQL is written from:
    a move the table does not allow matches no row, and the API answers it with 409.

Standards: HTML Living Standard §9.2 (Server-Sent Events), RFC 9110 (202 Accepted, Location),
the IETF draft "The Idempotency-Key HTTP Header Field", RFC 9457 (problem details).

Left out: job dependencies and workflows, cron schedules, rate limits per type, unique-job
locks, a dashboard, priorities beyond 0–9, hard (forced) timeouts: a job that never reports
progress is not interrupted. job_processor.md's "In production" says who does those.

The queue (`Queue`, `JobType`, `JobContext`, `WorkerPool`, `JOBS_SCHEMA`) is imported by
level05's email_queue and notification_queue, which register job types of their own.

    python level05/job_processor.py [--workers N] [--lease-s S] [--backoff-s S] [--db PATH]
    python level05/job_processor.py worker --db PATH [--workers N]
"""
import argparse
import datetime
import enum
import hashlib
import json
import math
import os
import random
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Callable, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any folder

from lib import (App, BadRequest, Conflict, NotFound, ValidationFailed, json_response, no_content,
                 trace_event)
from lib.app import bounded, exit_usage_error
from lib.listing import Sort, SortKey, list_params, page
from lib.request import Query, utc_timestamp
from lib.response import StreamingResponse, json_body
from lib.routing import PAGE, PAGE_ANSWER
from lib.storage import Database, StorageError, default_db_path
from lib.validation import Choice, Field, Integer, Invalid, Text, body_schema, validate
from level04.feature_flags import EventStream
from level04.url_shortener import Instant

app = App("job_processor", "A durable job queue on sqlite: atomic claims, leases, retries with "
          "backoff, dead letters, priorities, progress over Server-Sent Events.", port=8017)

# =============================================================================================
# States and the moves between them
# =============================================================================================


class Status(enum.StrEnum):
    QUEUED = "queued"            # due: the next free worker takes it
    SCHEDULED = "scheduled"      # waiting for its run_at
    RUNNING = "running"          # a worker holds its lease
    SUCCEEDED = "succeeded"
    FAILED = "failed"            # an attempt failed; the next is due at next_run_at
    DEAD = "dead"                # out of attempts: the dead-letter set, until retried
    CANCELLED = "cancelled"


FINAL = {Status.SUCCEEDED, Status.DEAD, Status.CANCELLED}   # an event stream ends on these


class Move(NamedTuple):
    sources: tuple
    target: Status


# Every way a job changes state. The SQL that makes a move only touches rows in its sources
# (`status IN (...)` is written from this table), so an illegal move changes nothing.
MOVES = {
    "promote": Move((Status.SCHEDULED,), Status.QUEUED),           # run_at has come
    "claim": Move((Status.QUEUED, Status.FAILED), Status.RUNNING),
    "succeed": Move((Status.RUNNING,), Status.SUCCEEDED),
    "fail": Move((Status.RUNNING,), Status.FAILED),                # attempts left: retry later
    "bury": Move((Status.RUNNING,), Status.DEAD),                  # no attempts left
    "release": Move((Status.RUNNING,), Status.QUEUED),             # the worker stopped or died
    "cancel": Move((Status.QUEUED, Status.SCHEDULED, Status.FAILED), Status.CANCELLED),
    "stop_cancelled": Move((Status.RUNNING,), Status.CANCELLED),   # seen at a progress report
    "retry": Move((Status.DEAD,), Status.QUEUED),
}


def sources(move):
    """`status IN ('queued', 'failed')` for a move: the states it may start from."""
    return "status IN (%s)" % ", ".join(f"'{status}'" for status in MOVES[move].sources)


def require_move(move, status, job_id):
    if status not in MOVES[move].sources:
        raise Conflict(f"job {job_id} is {status}; {move} takes a job that is "
                       + " or ".join(MOVES[move].sources))


JOB_COLUMNS = ("id", "type", "payload", "status", "priority", "run_at", "attempts",
               "max_attempts", "timeout_s", "progress", "result", "error", "worker",
               "cancel_requested", "created_at", "started_at", "finished_at", "updated_at")

JOBS_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS jobs (
    id               INTEGER PRIMARY KEY,   -- also the FIFO order among equals
    type             TEXT NOT NULL,
    payload          TEXT NOT NULL,         -- JSON, checked against the type's fields
    status           TEXT NOT NULL,
    priority         INTEGER NOT NULL,      -- 0–9, higher first
    run_at           REAL NOT NULL,         -- unix time the job (or its next attempt) is due
    attempts         INTEGER NOT NULL DEFAULT 0,   -- started so far
    max_attempts     INTEGER NOT NULL,
    timeout_s        REAL NOT NULL,
    progress         INTEGER NOT NULL DEFAULT 0,   -- 0–100
    result           TEXT,                  -- JSON, once succeeded
    error            TEXT,                  -- the last failed attempt's error
    worker           TEXT,                  -- who holds (or last held) the lease
    lease_until      REAL,                  -- unix time; past it the job may be claimed again
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    idempotency_key  TEXT UNIQUE,
    request_hash     TEXT,                  -- what the key was first used for
    created_at       REAL NOT NULL,
    started_at       REAL,
    finished_at      REAL,
    updated_at       REAL NOT NULL
);
-- The claim reads this index in its order and stops at the first due row. The queue's
-- statements name their index (INDEXED BY): left to itself the planner took jobs_by_status and
-- sorted every waiting job on each claim (1.1 ms a claim with 2,000 waiting, 0.14 ms this way);
-- should an index stop fitting, sqlite refuses the statement instead of scanning quietly.
CREATE INDEX IF NOT EXISTS jobs_claim ON jobs (priority DESC, run_at, id) WHERE {sources("claim")};
CREATE INDEX IF NOT EXISTS jobs_scheduled ON jobs (run_at) WHERE {sources("promote")};
CREATE INDEX IF NOT EXISTS jobs_leases ON jobs (lease_until) WHERE status = 'running';
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status);
CREATE INDEX IF NOT EXISTS jobs_by_type ON jobs (type);
CREATE INDEX IF NOT EXISTS jobs_done ON jobs (finished_at) WHERE status = 'succeeded';

-- Every change of a job's status or progress, as the job then was: what GET /jobs/{id}/events
-- sends. A trigger writes them, in the transaction of the change, whichever process made it.
CREATE TABLE IF NOT EXISTS job_events (
    id      INTEGER PRIMARY KEY,           -- the SSE event id: Last-Event-ID resumes after it
    job_id  INTEGER NOT NULL,
    kind    TEXT NOT NULL,                 -- status or progress
    job     TEXT NOT NULL,                 -- JSON: the job's columns after the change
    at      REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS job_events_by_job ON job_events (job_id, id);
CREATE INDEX IF NOT EXISTS job_events_by_time ON job_events (at);
CREATE TRIGGER IF NOT EXISTS job_changed AFTER UPDATE OF status, progress ON jobs
WHEN NEW.status IS NOT OLD.status OR NEW.progress IS NOT OLD.progress
BEGIN
    INSERT INTO job_events (job_id, kind, job, at) VALUES (NEW.id,
        CASE WHEN NEW.status IS NOT OLD.status THEN 'status' ELSE 'progress' END,
        json_object({", ".join(f"'{column}', NEW.{column}" for column in JOB_COLUMNS)}),
        NEW.updated_at);
END;
"""

# =============================================================================================
# Job types and the context a job runs in
# =============================================================================================


class JobType(NamedTuple):
    """A kind of job: its name, the function that runs it (`run(context) -> result`, a JSON
    value) and the fields its payload takes (lib.validation declarations)."""
    name: str
    run: Callable
    payload: dict
    description: str = ""


class JobFailed(Exception):
    """Raised by a job to fail its attempt with a message (no traceback in the log); the job
    is retried after its backoff while it has attempts left."""
    retry = True


class JobRefused(JobFailed):
    """A failure that no retry can mend (a recipient refused for good: SMTP 5xx, HTTP 4xx):
    the job is dead at once, whatever attempts it has left."""
    retry = False


class JobTimedOut(JobFailed):
    """The job ran past its timeout_s: the attempt fails."""


class JobCancelled(Exception):
    """The job was cancelled while it ran; seen at a progress report."""


class JobReleased(Exception):
    """The worker is stopping and the job did not finish in time: it goes back to the queue."""


class LeaseLost(Exception):
    """Another worker owns the job now (our lease expired): stop, write nothing."""


class JobContext:
    """What a running job sees: its `payload` and `attempt`, `report_progress(percent)` and
    `sleep(seconds)`. Both are check points: they raise `JobCancelled`, `JobTimedOut`,
    `JobReleased` or `LeaseLost` when the job must stop, so a job that reports now and then
    can be cancelled, timed out and released at shutdown."""

    def __init__(self, queue, row, worker, abandon):
        self.queue = queue
        self.worker = worker
        self.job_id = row["id"]
        self.payload = json.loads(row["payload"])
        self.attempt = row["attempts"]
        self.timeout_s = row["timeout_s"]
        self.deadline = time.monotonic() + row["timeout_s"]
        self.abandon = abandon      # set when the worker stops and waited long enough
        self.lease_lost = False     # set by the heartbeat when the renewal found no row
        self.progress = 0

    def check(self):
        if self.abandon.is_set():
            raise JobReleased()
        if self.lease_lost:
            raise LeaseLost()
        if time.monotonic() >= self.deadline:
            raise JobTimedOut(f"timed out after {self.timeout_s:g} s")

    def report_progress(self, percent):
        self.check()
        percent = max(0, min(100, int(percent)))
        if percent == self.progress:
            return
        self.progress = percent
        cancel_requested = self.queue.report_progress(self.job_id, self.worker, percent)
        if cancel_requested is None:
            self.lease_lost = True
            raise LeaseLost()
        if cancel_requested:
            raise JobCancelled()

    def sleep(self, seconds):
        """Wait, but no longer than the job's deadline, and not through a shutdown."""
        self.check()
        if self.abandon.wait(max(0.0, min(seconds, self.deadline - time.monotonic()))):
            raise JobReleased()
        self.check()


# =============================================================================================
# The queue: plain functions over one sqlite file
# =============================================================================================

DEFAULT_MAX_ATTEMPTS = 5
DEFAULT_TIMEOUT_S = 300.0
JITTER = 0.2            # ±20 % on every backoff
IDLE_POLL_S = 0.1       # an idle worker looks for due jobs this often (other processes enqueue too)
EVENTS_KEPT_S = 3600.0  # job events older than this are deleted (by the heartbeat, once a minute)


def now_text(when):
    return None if when is None else utc_timestamp(when, timespec="milliseconds")


def request_hash(*parts):
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


class Queue:
    """The job queue on a `lib.storage.Database` whose schema includes `JOBS_SCHEMA`.

    Producers call `enqueue`; workers (`WorkerPool`) call `claim`, `renew_lease`,
    `report_progress`, and one of `complete`, `fail`, `stop_cancelled`, `release`; the API calls
    `cancel`, `retry`, `get`, `stats`. Only jobs of the registered `types` are claimed, so
    projects with different job types can share one file."""

    def __init__(self, db, types, *, lease_s=30.0, backoff_s=1.0, backoff_max_s=300.0):
        self.db = db
        self.types = {job_type.name: job_type for job_type in types}
        self.lease_s = lease_s
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.work = threading.Condition()   # wakes an idle worker of this process on enqueue
        self._type_list = ", ".join("?" * len(self.types))

    # --- producing --------------------------------------------------------------------------

    def enqueue(self, type_name, payload, *, priority=0, run_at=None,
                max_attempts=DEFAULT_MAX_ATTEMPTS, timeout_s=DEFAULT_TIMEOUT_S,
                idempotency_key=None):
        """Store a new job; returns (row, created). With an `idempotency_key` already used for
        the same request, the job made then, not a new one (created False); used for another
        request, a 422. One write transaction, so concurrent twins make one job."""
        now = time.time()
        due = now if run_at is None else run_at
        status = Status.SCHEDULED if due > now else Status.QUEUED
        fingerprint = request_hash(type_name, payload, priority, run_at, max_attempts, timeout_s)
        with self.db.transaction() as conn:
            if idempotency_key is not None:
                row = conn.execute("SELECT * FROM jobs WHERE idempotency_key = ?",
                                   (idempotency_key,)).fetchone()
                if row is not None:
                    if row["request_hash"] != fingerprint:
                        raise ValidationFailed(
                            {"Idempotency-Key": "was used for a different job"},
                            "this Idempotency-Key was used for a different request")
                    return row, False
            row = conn.execute(
                "INSERT INTO jobs (type, payload, status, priority, run_at, max_attempts, "
                "timeout_s, idempotency_key, request_hash, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING *",
                (type_name, json.dumps(payload), status, priority, due, max_attempts, timeout_s,
                 idempotency_key, fingerprint if idempotency_key else None, now, now)).fetchone()
        self.wake_one()
        return row, True

    # --- consuming --------------------------------------------------------------------------

    def has_work(self, now):
        """Whether a claim could find something: a read, so idle workers take no write lock."""
        row = self.db.query_one(
            f"SELECT EXISTS (SELECT 1 FROM jobs INDEXED BY jobs_claim WHERE {sources('claim')} "
            f"AND run_at <= ?) OR EXISTS (SELECT 1 FROM jobs INDEXED BY jobs_scheduled WHERE "
            f"{sources('promote')} AND run_at <= ?) OR EXISTS (SELECT 1 FROM jobs INDEXED BY "
            f"jobs_leases WHERE status = 'running' AND lease_until < ?)",
            (now, now, now))
        return bool(row[0])

    def claim(self, worker):
        """Take the next due job for `worker`, or None. One write transaction: the expired
        leases are taken back, due scheduled jobs queued, and one job marked running with a
        fresh lease, all before any other writer (thread or process) gets in."""
        now = time.time()
        if not self.has_work(now):
            return None
        with self.db.transaction() as conn:
            self.reclaim_expired_leases(conn, now)
            conn.execute(f"UPDATE jobs INDEXED BY jobs_scheduled SET status = 'queued', "
                         f"updated_at = ? WHERE {sources('promote')} AND run_at <= ?", (now, now))
            return conn.execute(
                f"UPDATE jobs SET status = 'running', attempts = attempts + 1, worker = ?, "
                f"lease_until = ?, started_at = ?, updated_at = ?, progress = 0 "
                f"WHERE id = (SELECT id FROM jobs INDEXED BY jobs_claim WHERE {sources('claim')} "
                f"AND run_at <= ? AND type IN ({self._type_list}) "
                f"ORDER BY priority DESC, run_at, id LIMIT 1) "
                f"RETURNING *",
                (worker, now + self.lease_s, now, now, now, *self.types)).fetchone()

    def reclaim_expired_leases(self, conn, now):
        """Running jobs whose worker stopped renewing the lease (it crashed, or was killed):
        back to the queue, due now; the attempt counts, so a job that kills its worker every
        time ends dead instead of looping forever. One whose cancel was asked for (its worker
        died before it could see that) is cancelled instead of run again."""
        rows = conn.execute(
            "UPDATE jobs INDEXED BY jobs_leases SET status = CASE WHEN cancel_requested THEN "
            "'cancelled' WHEN attempts >= max_attempts THEN 'dead' ELSE 'queued' END, "
            "finished_at = CASE WHEN cancel_requested OR attempts >= max_attempts THEN ? END, "
            "error = 'the lease expired: worker ' || worker || ' stopped renewing it', "
            "lease_until = NULL, run_at = ?, updated_at = ? "
            "WHERE status = 'running' AND lease_until < ? RETURNING id, status",
            (now, now, now, now)).fetchall()
        for job_id, status in rows:
            log(f"job {job_id}: lease expired, {'queued again' if status == 'queued' else status}")

    def renew_lease(self, job_id, worker):
        """The heartbeat: push the lease forward. False when the job is no longer ours."""
        return self.db.execute(
            "UPDATE jobs SET lease_until = ? WHERE id = ? AND worker = ? AND status = 'running'",
            (time.time() + self.lease_s, job_id, worker)).rowcount == 1

    def report_progress(self, job_id, worker, percent):
        """Record progress; returns whether a cancel was asked for, or None when the job is no
        longer ours. (Only the heartbeat renews the lease: one mechanism, tested alone.)"""
        rows = self.db.execute_returning(
            "UPDATE jobs SET progress = ?, updated_at = ? WHERE id = ? AND worker = ? AND "
            "status = 'running' RETURNING cancel_requested", (percent, time.time(), job_id, worker))
        return bool(rows[0][0]) if rows else None

    def _finish(self, move, job_id, worker, assignments, params):
        now = time.time()
        return self.db.execute(
            f"UPDATE jobs SET status = '{MOVES[move].target}', {assignments}, "
            f"updated_at = ? WHERE id = ? AND worker = ? AND "
            f"{sources(move)}", (*params, now, job_id, worker)).rowcount == 1

    def complete(self, job_id, worker, result):
        return self._finish("succeed", job_id, worker,
                            "result = ?, progress = 100, lease_until = NULL, finished_at = ?",
                            (json.dumps(result), time.time()))

    def stop_cancelled(self, job_id, worker):
        return self._finish("stop_cancelled", job_id, worker,
                            "lease_until = NULL, finished_at = ?", (time.time(),))

    def release(self, job_id, worker):
        """Give the job back unfinished (its worker is stopping): queued, due now, and the
        attempt given back, since the job did not fail."""
        return self._finish("release", job_id, worker,
                            "attempts = attempts - 1, worker = NULL, lease_until = NULL, "
                            "run_at = ?", (time.time(),))

    def backoff(self, attempt):
        """Seconds until the retry after failed attempt n: backoff_s · 2^(n−1), ±20 %, capped."""
        return min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1)
                   * random.uniform(1 - JITTER, 1 + JITTER))

    def fail(self, job_id, worker, error, retry=True):
        """Record a failed attempt: `failed` with the next attempt due after the backoff, or
        `dead` when it was the last or `retry` is False. Returns the new status (None: no
        longer ours)."""
        now = time.time()
        with self.db.transaction() as conn:
            row = conn.execute("SELECT attempts, max_attempts FROM jobs WHERE id = ? AND "
                               "worker = ? AND status = 'running'", (job_id, worker)).fetchone()
            if row is None:
                return None
            move = "bury" if not retry or row["attempts"] >= row["max_attempts"] else "fail"
            due = now if move == "bury" else now + self.backoff(row["attempts"])
            conn.execute(f"UPDATE jobs SET status = '{MOVES[move].target}', error = ?, "
                         f"run_at = ?, lease_until = NULL, finished_at = ?, "
                         f"updated_at = ? WHERE id = ?",
                         (error[:2000], due, now if move == "bury" else None, now, job_id))
        return MOVES[move].target

    def release_all(self, workers):
        """Whatever these workers still hold goes back to the queue (the last step of a stop)."""
        released = 0
        for worker in workers:
            released += self.db.execute(
                "UPDATE jobs SET status = 'queued', attempts = attempts - 1, worker = NULL, "
                "lease_until = NULL, run_at = ?, updated_at = ? "
                "WHERE worker = ? AND status = 'running'",
                (time.time(), time.time(), worker)).rowcount
        return released

    def prune_events(self, older_than_s=EVENTS_KEPT_S):
        """Events are for streams that are watching now: after an hour they go."""
        return self.db.execute("DELETE FROM job_events WHERE at < ?",
                               (time.time() - older_than_s,)).rowcount

    # --- waking idle workers of this process ------------------------------------------------

    def wake_one(self):
        with self.work:
            self.work.notify()

    def wake_all(self):
        with self.work:
            self.work.notify_all()

    def wait_for_work(self, timeout):
        with self.work:
            self.work.wait(timeout)

    # --- the API's side ---------------------------------------------------------------------

    def get(self, job_id):
        return self.db.query_one("SELECT * FROM jobs WHERE id = ?", (job_id,))

    def cancel(self, job_id):
        """queued, scheduled or failed → cancelled at once; running → cancel_requested, which
        the job sees at its next progress report; anything else → 409."""
        now = time.time()
        with self.db.transaction() as conn:
            row = conn.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise NotFound(f"no job {job_id}")
            if row["status"] == Status.RUNNING:
                conn.execute("UPDATE jobs SET cancel_requested = 1, updated_at = ? WHERE id = ?",
                             (now, job_id))
            else:
                require_move("cancel", row["status"], job_id)
                conn.execute(f"UPDATE jobs SET status = 'cancelled', finished_at = ?, "
                             f"updated_at = ? WHERE id = ? AND {sources('cancel')}",
                             (now, now, job_id))
            return conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()

    def retry(self, job_id):
        """dead → queued, attempts from 0."""
        now = time.time()
        with self.db.transaction() as conn:
            row = conn.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise NotFound(f"no job {job_id}")
            require_move("retry", row["status"], job_id)
            row = conn.execute(f"UPDATE jobs SET status = 'queued', attempts = 0, run_at = ?, "
                               f"finished_at = NULL, progress = 0, updated_at = ? WHERE id = ? "
                               f"AND {sources('retry')} RETURNING *",
                               (now, now, job_id)).fetchone()
        self.wake_one()
        return row

    def stats(self):
        now = time.time()
        with self.db.reading() as conn:
            by_status = dict.fromkeys(Status, 0)
            by_status.update(conn.execute("SELECT status, count(*) FROM jobs GROUP BY status"))
            by_type = dict(conn.execute("SELECT type, count(*) FROM jobs GROUP BY type"))
            (done,), = conn.execute("SELECT count(*) FROM jobs WHERE status = 'succeeded' AND "
                                    "finished_at >= ?", (now - 60,))
            (oldest,), = conn.execute("SELECT min(run_at) FROM jobs WHERE status = 'queued'")
        return {"by_status": by_status, "by_type": by_type, "done_last_minute": done,
                "oldest_queued_age_s": None if oldest is None else round(max(0.0, now - oldest), 3)}


def render_job(row):
    waiting = row["status"] in (Status.QUEUED, Status.SCHEDULED, Status.FAILED)
    return {"id": row["id"], "type": row["type"], "payload": json.loads(row["payload"]),
            "status": row["status"], "priority": row["priority"], "attempts": row["attempts"],
            "max_attempts": row["max_attempts"], "timeout_s": float(row["timeout_s"]),
            "progress": row["progress"],
            "result": None if row["result"] is None else json.loads(row["result"]),
            "error": row["error"], "worker": row["worker"],
            "cancel_requested": bool(row["cancel_requested"]),
            "next_run_at": now_text(row["run_at"]) if waiting else None,
            "created_at": now_text(row["created_at"]), "started_at": now_text(row["started_at"]),
            "finished_at": now_text(row["finished_at"]), "updated_at": now_text(row["updated_at"])}


def log(line):
    sys.stderr.write(f"{utc_timestamp(timespec='milliseconds')} {line}\n")


# =============================================================================================
# Workers: threads that claim and run jobs, with one heartbeat thread renewing their leases
# =============================================================================================

class WorkerPool:
    """`count` worker threads on `queue`, named `<label>-<n>@<host>:<pid>` (unique across
    processes: the name is what fences a worker's writes). `stop()` stops claiming, waits up
    to `stop_timeout` for running jobs to finish, then releases what is left to the queue."""

    def __init__(self, queue, count, *, label, poll_s=IDLE_POLL_S, stop_timeout=5.0):
        self.queue = queue
        self.poll_s = poll_s
        self.stop_timeout = stop_timeout
        self.names = [f"{label}-{n}@{socket.gethostname()}:{os.getpid()}"
                      for n in range(1, count + 1)]
        self.stopping = threading.Event()   # claim nothing more
        self.abandon = threading.Event()    # the wait is over: running jobs stop at their next check
        self.stopped = threading.Event()    # the heartbeat's end
        self.running = {}                   # worker name → JobContext
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._work, args=(name,), name=name, daemon=True)
                        for name in self.names]
        self.heartbeat = threading.Thread(target=self._renew_leases, name="heartbeat", daemon=True)

    def start(self):
        if not self.threads:
            return
        for thread in self.threads:
            thread.start()
        self.heartbeat.start()

    def _work(self, name):
        while not self.stopping.is_set():
            try:
                row = self.queue.claim(name)
                if row is None:
                    self.queue.wait_for_work(self.poll_s)
                else:
                    self._run(name, row)
            except Exception as error:  # the database is locked or full: the lease covers the job
                log(f"{name}: {type(error).__name__}: {error}")
                self.stopping.wait(self.poll_s)

    def _run(self, name, row):
        job_type = self.queue.types[row["type"]]
        context = JobContext(self.queue, row, name, self.abandon)
        what = f"job {row['id']} {row['type']}"
        log(f"{what}: attempt {row['attempts']} started by {name}")
        started = time.monotonic()
        with self.lock:
            self.running[name] = context
        try:
            result = job_type.run(context)
        except JobCancelled:
            self.queue.stop_cancelled(row["id"], name)
            log(f"{what}: cancelled while running")
        except JobReleased:
            self.queue.release(row["id"], name)
            log(f"{what}: released unfinished, queued again")
        except LeaseLost:
            log(f"{what}: lease lost to another worker; its outcome is theirs")
        except Exception as error:
            if not isinstance(error, JobFailed):
                traceback.print_exc()
            status = self.queue.fail(row["id"], name, f"{type(error).__name__}: {error}",
                                     retry=getattr(error, "retry", True))
            log(f"{what}: attempt {row['attempts']} failed ({error}): {status}")
        else:
            self.queue.complete(row["id"], name, result)
            log(f"{what}: succeeded in {time.monotonic() - started:.3f} s")
        finally:
            with self.lock:
                del self.running[name]

    def _renew_leases(self):
        pruned_at = time.monotonic()
        while not self.stopped.wait(self.queue.lease_s / 3):
            with self.lock:
                contexts = list(self.running.values())
            try:
                for context in contexts:
                    if not self.queue.renew_lease(context.job_id, context.worker):
                        context.lease_lost = True
                if time.monotonic() - pruned_at > 60:
                    pruned_at = time.monotonic()
                    self.queue.prune_events()
            except Exception as error:  # locked or full: try again at the next beat
                log(f"heartbeat: {type(error).__name__}: {error}")

    def stop(self):
        if not self.threads:
            return
        self.stopping.set()
        self.queue.wake_all()
        deadline = time.monotonic() + self.stop_timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if any(thread.is_alive() for thread in self.threads):
            self.abandon.set()
            for thread in self.threads:
                thread.join(1.0)
        released = self.queue.release_all(self.names)   # a job that never reached a check point
        if released:
            log(f"released {released} unfinished jobs to the queue")
        self.stopped.set()


# =============================================================================================
# The demo job types
# =============================================================================================

def run_sleep(context):
    """Sleep `ms`, reporting progress at least every quarter second (up to 100 reports)."""
    seconds = context.payload["ms"] / 1000
    steps = min(100, math.ceil(seconds / 0.25))
    for step in range(1, steps + 1):
        context.sleep(seconds / steps)
        context.report_progress(100 * step // steps)
    return {"slept_ms": context.payload["ms"]}


def run_hash(context):
    """CPU work: SHA-256 applied `rounds` times to `data`, reporting each percent done."""
    digest, rounds = context.payload["data"].encode(), context.payload["rounds"]
    every = max(1, rounds // 100)
    for done in range(rounds):
        if done % every == 0:
            context.report_progress(100 * done // rounds)
        digest = hashlib.sha256(digest).digest()
    return {"sha256": digest.hex(), "rounds": rounds}


def run_fail(context):
    """Fail the first `times` attempts, then succeed: retries and dead letters to watch."""
    if context.attempt <= context.payload["times"]:
        raise JobFailed(f"failing on purpose: attempt {context.attempt} of the first "
                        f"{context.payload['times']}")
    return {"succeeded_on_attempt": context.attempt}


REPORT_ROW_S = 0.001   # a stand-in for reading one row of a large table


def run_report(context):
    """A long job with a result: totals over `rows` made-up sales, 1 ms a row."""
    rows = context.payload["rows"]
    every = max(1, rows // 100)
    total = largest = 0
    for row in range(1, rows + 1):
        amount = row * 7919 % 10007          # cents, spread but repeatable
        total, largest = total + amount, max(largest, amount)
        if row % every == 0 or row == rows:
            context.sleep(every * REPORT_ROW_S)
            context.report_progress(100 * row // rows)
    return {"rows": rows, "total_cents": total, "max_cents": largest}


DEMO_TYPES = [
    JobType("sleep", run_sleep, {"ms": Integer(0, 600_000, required=True)},
            "waits ms milliseconds (0–600000)"),
    JobType("hash", run_hash, {"data": Text(0, 10_000, strip=False, required=True),
                               "rounds": Integer(1, 1_000_000, default=1000)},
            "SHA-256 of data, rounds times (CPU work, with progress)"),
    JobType("fail", run_fail, {"times": Integer(0, 25, default=1)},
            "fails its first `times` attempts, then succeeds"),
    JobType("report", run_report, {"rows": Integer(1, 100_000, default=100)},
            "a long job (1 ms a row) with progress and a result"),
]

# =============================================================================================
# Validating a new job
# =============================================================================================


class Seconds(Field):
    def __init__(self, low, high, **kw):
        super().__init__(**kw)
        self.low, self.high = low, high

    def shape(self):
        return {"type": "number", "exclusiveMinimum": self.low, "maximum": self.high}

    def clean(self, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not self.low < value <= self.high:
            raise Invalid(f"must be a number of seconds above {self.low}, at most {self.high}")
        return float(value)


class Payload(Field):
    """A type's payload: a JSON object, whose fields the type checks (`payload.ms`)."""

    def __init__(self, fields, **kw):
        super().__init__(**kw)
        self.fields = fields

    def shape(self):
        return body_schema(self.fields)

    def clean(self, value):
        if not isinstance(value, dict):
            raise Invalid("must be an object")
        return value


def new_job_fields(job_type=None, type_names=()):
    """The fields of `POST /jobs`: for one type (its OpenAPI variant), or for any."""
    names = [job_type.name] if job_type else list(type_names)
    payload = job_type.payload if job_type else {}
    return {
        "type": Choice(names, required=True,
                       description=job_type.description if job_type else "a registered job type"),
        "payload": Payload(payload, default=dict,
                           required=any(field.required for field in payload.values())),
        "priority": Integer(0, 9, default=0, description="higher runs first"),
        "run_at": Instant(nullable=True, description="when it is due (default: now)"),
        "max_attempts": Integer(1, 25, default=DEFAULT_MAX_ATTEMPTS),
        "timeout_s": Seconds(0, 86_400, default=DEFAULT_TIMEOUT_S,
                             description="an attempt running longer fails"),
    }


SERVER_OWNED = {"id", "status", "attempts", "progress", "result", "error", "worker",
                "created_at", "started_at", "finished_at", "updated_at", "next_run_at"}


def validate_new_job(data, types):
    """The job's options and its payload checked by its type, every bad field named at once."""
    errors = {}
    try:
        values = validate(data, new_job_fields(type_names=types), read_only=SERVER_OWNED)
    except ValidationFailed as failure:
        errors.update((error["field"], error["message"]) for error in failure.errors)
        values = {}
    job_type = types.get(data.get("type")) if isinstance(data.get("type"), str) else None
    payload = data.get("payload", {})
    if job_type is not None and isinstance(payload, dict):
        try:
            values["payload"] = validate(payload, job_type.payload)
        except ValidationFailed as failure:
            errors.update((f"payload.{error['field']}", error["message"])
                          for error in failure.errors)
    if errors:
        raise ValidationFailed(errors)
    return values


def unix_time(text):
    """`2026-11-24T06:41:00Z` (what `Instant` returns) as seconds since the epoch."""
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


MAX_IDEMPOTENCY_KEY = 255


def idempotency_key(request):
    key = request.header("Idempotency-Key")
    if key is None:
        return None
    if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY or not key.isascii() or not key.isprintable():
        message = f"must be 1–{MAX_IDEMPOTENCY_KEY} printable ASCII characters"
        raise BadRequest(f"Idempotency-Key {message}",
                         errors=[{"field": "Idempotency-Key", "message": message}])
    return key


# =============================================================================================
# Job events: Server-Sent Events of one job, on feature_flags' polling stream
# =============================================================================================

class JobEvents(EventStream):
    """`status` and `progress` events of one job, each with the job as `GET /jobs/{id}` showed
    it then, read from `job_events` after event id `cursor` (a worker in another process
    writes them too). The stream ends after a final status."""

    def __init__(self, queue, job_id, cursor, first=b""):
        super().__init__(app, cursor)
        self.queue, self.job_id = queue, job_id
        self.first = first          # the job's current status, when not resuming

    def pending(self):
        rows = self.queue.db.query("SELECT id, kind, job FROM job_events WHERE job_id = ? AND "
                                   "id > ? ORDER BY id LIMIT 100", (self.job_id, self.cursor))
        pieces = []
        for event_id, kind, job in rows:
            job = json.loads(job)
            pieces.append(sse_event(event_id, kind, job))
            self.cursor = event_id
            if kind == "status" and job["status"] in FINAL:
                self.finished = True
                break
        return b"".join(pieces)

    def opening(self):
        return f": events of job {self.job_id}\n\n".encode() + self.first


def sse_event(event_id, kind, job):
    data = json_body(render_job(job)).decode()
    return f"id: {event_id}\nevent: {kind}\ndata: {data}\n\n".encode()


# =============================================================================================
# Routes
# =============================================================================================

def nullable(schema):
    return {**schema, "type": [schema["type"], "null"]}


TIME = {"type": "string", "format": "date-time"}
JOB_SCHEMA = {  # what render_job answers, for /openapi.json
    "type": "object",
    "required": ["id", "type", "payload", "status", "priority", "attempts", "max_attempts",
                 "timeout_s", "progress", "result", "error", "worker", "cancel_requested",
                 "next_run_at", "created_at", "started_at", "finished_at", "updated_at"],
    "properties": {
        "id": {"type": "integer"}, "type": {"type": "string"}, "payload": {"type": "object"},
        "status": {"enum": list(Status)}, "priority": {"type": "integer"},
        "attempts": {"type": "integer"}, "max_attempts": {"type": "integer"},
        "timeout_s": {"type": "number"},
        "progress": {"type": "integer", "minimum": 0, "maximum": 100},
        "result": {"description": "what the job returned, once succeeded"},
        "error": nullable({"type": "string"}), "worker": nullable({"type": "string"}),
        "cancel_requested": {"type": "boolean"}, "next_run_at": nullable(TIME),
        "created_at": TIME, "started_at": nullable(TIME), "finished_at": nullable(TIME),
        "updated_at": TIME}}
JOB_PAGE = {**PAGE_ANSWER, "properties": {**PAGE_ANSWER["properties"],
                                          "items": {"type": "array", "items": JOB_SCHEMA}}}
# One event of the stream (OpenAPI describes an event stream's events one at a time).
JOB_EVENT = {"type": "object", "required": ["id", "event", "data"],
             "properties": {"id": {"type": "string", "pattern": "^[0-9]+$"},
                            "event": {"enum": ["status", "progress"]},
                            "data": {"type": "string", "contentMediaType": "application/json",
                                     "contentSchema": JOB_SCHEMA}}}

NEWEST = Sort("newest", SortKey("id", int, descending=True))
STATUS_FILTER = Query("status", "only jobs in this state", tuple(Status))
TYPE_FILTER = Query("type", "only jobs of this type", tuple(t.name for t in DEMO_TYPES))
ONE_JOB = {404: "No such job"}
JOB_ID = {"job_id": {"minimum": 1}}


def job_answer(row, status=200, headers=None):
    return json_response(render_job(row), status, headers)


@app.post("/jobs", status=202, body_limit=64 * 1024, response_schema=JOB_SCHEMA,
          request_schema={"oneOf": [body_schema(new_job_fields(job_type))
                                    for job_type in DEMO_TYPES]},
          responses={202: "Queued (or scheduled); Location: /jobs/{id}",
                     200: "The job this Idempotency-Key made before",
                     400: "An Idempotency-Key that is not 1–255 printable ASCII characters",
                     422: "An unknown type, a payload its type cannot take, a bad option, or "
                          "an Idempotency-Key used for another request"})
def create_job(request):
    """Enqueue a job (optional Idempotency-Key header: the same key answers the same job)"""
    queue = app.state.queue
    key = idempotency_key(request)
    values = validate_new_job(request.json_object(), queue.types)
    run_at = values.get("run_at")
    row, created = queue.enqueue(
        values["type"], values["payload"], priority=values["priority"],
        run_at=None if run_at is None else unix_time(run_at),
        max_attempts=values["max_attempts"], timeout_s=values["timeout_s"], idempotency_key=key)
    trace_event(f"job {row['id']} {'enqueued' if created else 'found by its Idempotency-Key'}")
    return job_answer(row, 202 if created else 200, {"Location": f"/jobs/{row['id']}"})


@app.get("/jobs", query=[*PAGE, STATUS_FILTER, TYPE_FILTER], response_schema=JOB_PAGE)
def list_jobs(request):
    """List jobs, newest first (filters: status, type)"""
    limit, cursor = list_params(request, NEWEST.shape)
    where, params = NEWEST.after(cursor) if cursor else ("1", [])
    conditions, values = [where], list(params)
    for query in (STATUS_FILTER, TYPE_FILTER):
        value = query.read(request)
        if value is not None:
            conditions.append(f"{query.name} = ?")   # the name comes from the code
            values.append(value)
    rows = app.state.queue.db.query(f"SELECT * FROM jobs WHERE {' AND '.join(conditions)} "
                                    f"ORDER BY {NEWEST.order_by} LIMIT ?", [*values, limit + 1])
    return page(rows, limit, NEWEST.cursor_values, render_job)


@app.get("/jobs/{job_id:int}", path_schemas=JOB_ID, response_schema=JOB_SCHEMA,
         responses={200: "The job", **ONE_JOB})
def read_job(request, job_id):
    """A job: status, attempts, progress, result, error, next_run_at"""
    row = app.state.queue.get(job_id)
    if row is None:
        raise NotFound(f"no job {job_id}")
    return job_answer(row)


@app.post("/jobs/{job_id:int}/cancel", path_schemas=JOB_ID, response_schema=JOB_SCHEMA,
          responses={200: "Cancelled, or (running) cancel_requested until its next progress "
                          "report", **ONE_JOB, 409: "Already succeeded, dead or cancelled"})
def cancel_job(request, job_id):
    """Cancel a job (a running one stops at its next progress report)"""
    return job_answer(app.state.queue.cancel(job_id))


@app.post("/jobs/{job_id:int}/retry", path_schemas=JOB_ID, response_schema=JOB_SCHEMA,
          responses={200: "Queued again, attempts from 0", **ONE_JOB, 409: "Not dead"})
def retry_job(request, job_id):
    """Give a dead job a new set of attempts"""
    return job_answer(app.state.queue.retry(job_id))


@app.get("/jobs/{job_id:int}/events", path_schemas=JOB_ID, media_type="text/event-stream",
         response_schema=JOB_EVENT, status=200,
         responses={200: "Server-Sent Events `status` and `progress`, data = the job; the "
                         "stream ends after the final status", **ONE_JOB,
                    204: "Last-Event-ID names the final event: nothing more will come",
                    400: "A Last-Event-ID that is not an event id"})
def job_events(request, job_id):
    """A job's status and progress as they change (Server-Sent Events)"""
    queue = app.state.queue
    row = queue.db.query_one("SELECT *, (SELECT coalesce(max(id), 0) FROM job_events WHERE "
                             "job_id = jobs.id) AS last_event FROM jobs WHERE id = ?", (job_id,))
    if row is None:
        raise NotFound(f"no job {job_id}")
    last = request.header("Last-Event-ID")
    if last is None:   # start with where the job stands now (one statement: one snapshot)
        stream = JobEvents(queue, job_id, row["last_event"],
                           sse_event(row["last_event"], "status", row))
        stream.finished = row["status"] in FINAL
    elif last.isascii() and last.isdigit() and len(last) < 19:
        if row["status"] in FINAL and int(last) >= row["last_event"]:
            return no_content()   # all seen: 204 tells an EventSource to stop reconnecting
        stream = JobEvents(queue, job_id, int(last))
    else:
        raise BadRequest("Last-Event-ID must be an event id this stream sent",
                         errors=[{"field": "Last-Event-ID", "message": "is not an event id"}])
    return StreamingResponse(stream, headers={"Cache-Control": "no-store"},
                             content_type="text/event-stream")


@app.get("/queue/stats")
def queue_stats(request):
    """Jobs by status and type, done in the last minute, the oldest queued job's wait"""
    return app.state.queue.stats()


# =============================================================================================
# Command line: the server, and `worker` processes
# =============================================================================================

def add_queue_flags(parser, *, workers_default, workers_min):
    workers = bounded(int, f"a number of workers ({workers_min}–64)", at_least=workers_min,
                      at_most=64)
    parser.add_argument("--workers", type=workers, default=workers_default,
                        help=f"worker threads (default {workers_default}"
                             f"{'; 0: the API only' if workers_min == 0 else ''})")
    parser.add_argument("--lease-s", type=bounded(float, "a duration from 0.1 to 3600 s",
                                                  at_least=0.1, at_most=3600), default=30.0,
                        help="a claimed job's lease, renewed by heartbeats every third of it; "
                             "a crashed worker's job runs again after it (default 30)")
    parser.add_argument("--backoff-s", type=bounded(float, "a duration from 0.01 to 3600 s",
                                                    at_least=0.01, at_most=3600), default=1.0,
                        help="retry n waits backoff·2^(n−1) ±20 %% (default 1)")
    parser.add_argument("--backoff-max-s", type=bounded(float, "a duration from 0.01 to 86400 s",
                                                        at_least=0.01, at_most=86_400),
                        default=300.0, help="the longest wait before a retry (default 300)")
    parser.add_argument("--poll-s", type=bounded(float, "a duration from 0.01 to 60 s",
                                                 at_least=0.01, at_most=60),
                        default=IDLE_POLL_S, help=f"how often an idle worker looks for due "
                                                  f"jobs (default {IDLE_POLL_S})")
    parser.add_argument("--stop-timeout", type=bounded(float, "a duration from 0 to 3600 s",
                                                       at_least=0, at_most=3600), default=5.0,
                        help="on SIGTERM, how long running jobs may take to finish before "
                             "they are released back to the queue (default 5)")


def start_queue(db, args, label):
    queue = Queue(db, DEMO_TYPES, lease_s=args.lease_s, backoff_s=args.backoff_s,
                  backoff_max_s=args.backoff_max_s)
    return queue, WorkerPool(queue, args.workers, label=label, poll_s=args.poll_s,
                             stop_timeout=args.stop_timeout)


def worker_main(argv):
    """`job_processor.py worker`: worker threads and no HTTP, on a database a server shares."""
    from lib.runner import on_stop_signals
    parser = argparse.ArgumentParser(prog="job_processor.py worker",
                                     description="Run workers on a job_processor database.")
    parser.add_argument("--db", default=default_db_path(app.name),
                        help=f"the server's sqlite file (default data/{app.name}.sqlite3)")
    add_queue_flags(parser, workers_default=2, workers_min=1)
    args = parser.parse_args(argv)
    try:
        db = Database(args.db, JOBS_SCHEMA)
    except StorageError as error:
        exit_usage_error(str(error))
    queue, pool = start_queue(db, args, "worker")
    stop = threading.Event()
    on_stop_signals(stop.set)
    pool.start()
    log(f"worker process {os.getpid()}: {args.workers} workers on {args.db}")
    while not stop.wait(1.0):
        pass
    pool.stop()
    db.close()
    log(f"worker process {os.getpid()}: stopped")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        return worker_main(argv[1:])
    parser = app.arg_parser(database=True)
    parser.epilog = ("More workers, in their own processes, on the same file: "
                     "job_processor.py worker --db PATH [--workers N] (see worker --help).")
    add_queue_flags(parser, workers_default=2, workers_min=0)
    args = parser.parse_args(argv)
    db = app.open_database(args, JOBS_SCHEMA)
    app.state.queue, pool = start_queue(db, args, "server")
    app.on_listening.append(pool.start)     # not before: a port in use exits with jobs untouched
    app.shutdown_hooks.append(pool.stop)    # hooks run in reverse: before the database closes
    app.run(args)


if __name__ == "__main__":
    main()
