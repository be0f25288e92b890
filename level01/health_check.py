"""Health check — a server that proves it is alive, and shows how *alive* differs from *ready*.

Three questions, three endpoints, each answered by a different kind of code:

    GET /health        Is the process up? The cheapest possible answer: no I/O, no lock, no
                       query. It is the first thing the benchmark measures.
    GET /health/live   Should this process be restarted? Only when it cannot answer at all, so
                       liveness looks at nothing outside the process: a database outage is not
                       cured by restarting every replica at once.
    GET /health/ready  Should traffic be sent here? Only when every check passes: the sqlite file
                       opens afresh and grants the write lock, and the disk under it has room.
                       Checks run at once, each in its own thread; one that has not answered
                       within `--check-timeout` counts as failed, so the probe itself answers
                       promptly even when a dependency hangs. From SIGTERM on it answers 503 at
                       once, so that load balancers stop sending traffic before the server stops
                       (`--shutdown-delay` keeps serving meanwhile).

Standards: RFC 9110 §15.6.4 (503) and §10.2.3 (Retry-After), RFC 9111 §5.2.2.5 (`Cache-Control:
no-store`: no cache may keep a health answer), RFC 9457 problem details for the 503s; the
endpoint shapes are the ones Kubernetes probes and load balancers expect (any 2xx is healthy).
Left out: the draft `application/health+json` format, per-check sub-resources, authentication of
the health endpoints, a separate startup probe (the README says what each would add).

    python level01/health_check.py [--db PATH] [--check-timeout S] [--min-free-mb N]
                                   [--shutdown-delay S] [--trace] [--server threaded]
"""
import contextvars
import functools
import shutil
import sqlite3
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any folder

from lib import App, ServiceUnavailable, trace_event
from lib.app import bounded
from lib.request import utc_timestamp
from lib.storage import masked_sql

app = App("health_check", "Liveness and readiness: is the process up, and may it take traffic?",
          port=8001)

# This service stores nothing: its database is there to be checked, the way a real service
# checks the database it depends on.
SCHEMA = ""

DEFAULT_CHECK_TIMEOUT = 0.5  # s: a readiness check slower than this has failed
DEFAULT_MIN_FREE_MB = 64     # MiB free under the database folder, or the disk check fails
LOCK_WAIT = 2.0              # s the db check waits for sqlite's write lock before giving up itself

STARTED_MONOTONIC = time.monotonic()  # uptime on the monotonic clock: NTP may step the wall clock


STARTED_AT = utc_timestamp(app.started_at)


# --- the checks --------------------------------------------------------------------------------


class CheckFailed(Exception):
    """A check's own verdict, with a reason fit to show in the probe's answer."""


def check_database(uri):
    """Open the sqlite file as a new process would, take the write lock, read the schema.

    A fresh connection, not the server's own: an open connection keeps working on a file that
    was deleted or replaced under it, which is exactly the failure to catch. `mode=rw` refuses to
    create a missing file. `BEGIN IMMEDIATE` waits for the write lock, so a writer that holds it
    (a migration, a backup) makes this check slow and the timeout in `run_checks` decides.
    Its statements go into the request's trace like any other SQL (a no-op without --trace)."""
    conn = sqlite3.connect(uri, uri=True, timeout=LOCK_WAIT, isolation_level=None)
    conn.set_trace_callback(lambda statement: trace_event(masked_sql(statement)))
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()  # reads the header and schema
        conn.execute("ROLLBACK")
    finally:
        conn.close()


def check_free_disk(folder, min_free_mb):
    """Enough room for sqlite to grow its write-ahead log: a full disk fails every write."""
    free_mb = shutil.disk_usage(folder).free // 2**20
    if free_mb < min_free_mb:
        raise CheckFailed(f"{free_mb} MiB free, below the minimum of {min_free_mb} MiB")


def failure_reason(error):
    """A short reason for the answer. The health endpoints are public, so paths and the text
    of unexpected errors stay out (sqlite's messages name no path)."""
    if isinstance(error, (CheckFailed, sqlite3.Error)):
        return str(error)
    if isinstance(error, OSError):
        return error.strerror or type(error).__name__
    return type(error).__name__


class Check:
    """One readiness check: a function that returns when the dependency is usable and raises
    when it is not, run in a thread of its own so that a hung dependency cannot hang the probe.

    Single flight: while a run is still going (a probe stopped waiting for it after the
    timeout), later probes wait on that same run instead of starting another, so a dependency
    that hangs costs one thread, not one per probe."""

    def __init__(self, name, probe):
        self.name = name
        self.probe = probe
        self.passing = True     # the last verdict, to log only the changes
        self._running = None    # the Future of the run in progress
        self._lock = threading.Lock()

    def start(self):
        with self._lock:
            if self._running is None or self._running.done():
                self._running = Future()
                # The thread runs in a copy of the caller's context, so the request's trace
                # (a context variable) receives the probe's SQL; a new thread would start empty.
                threading.Thread(target=contextvars.copy_context().run,
                                 args=(self._run, self._running), daemon=True,
                                 name=f"check-{self.name}").start()
            else:
                trace_event(f"check {self.name}: waiting for the run already in flight")
            return self._running

    def _run(self, future):
        try:
            self.probe()
        except Exception as error:
            future.set_result(f"failed: {failure_reason(error)}")
        else:
            future.set_result("ok")

    def record(self, result):
        """Log on stderr when the check starts or stops failing: the first thing to read when
        an orchestrator says 'not ready'."""
        passing = result == "ok"
        with self._lock:
            changed, self.passing = passing != self.passing, passing
        if changed:
            sys.stderr.write(f"{utc_timestamp()} readiness check {self.name}: {result}\n")


def run_checks(checks, timeout):
    """Start every check at once and wait at most `timeout` for all of them together.
    Returns {name: "ok" | "failed: …" | "timed out after … s"}."""
    deadline = time.monotonic() + timeout
    running = [(check, check.start()) for check in checks]
    results = {}
    for check, future in running:
        try:
            result = future.result(max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            result = f"timed out after {timeout:g} s"
        check.record(result)
        trace_event(f"check {check.name}: {result}")
        results[check.name] = result
    return results


def readiness_checks(db, min_free_mb):
    """The checks for this server's database: the file itself and the disk under it."""
    if db.path == ":memory:":  # no file to reopen and no disk under it: ask the live connection
        return [Check("db", db.ping)]
    path = Path(db.path).resolve()
    checks = [Check("db", functools.partial(check_database, path.as_uri() + "?mode=rw"))]
    if min_free_mb:
        checks.append(Check("disk", functools.partial(check_free_disk, path.parent, min_free_mb)))
    return checks


def check_readiness(checks, timeout, *, draining):
    """The readiness verdict: `{"status": "ready", "checks": …}`, or a 503 that names what
    fails. Draining comes first and runs no check: whatever they say, the answer is no."""
    if draining:
        raise ServiceUnavailable("draining: this server is shutting down; send requests elsewhere")
    results = run_checks(checks, timeout)
    failing = [name for name, result in results.items() if result != "ok"]
    if failing:
        raise ServiceUnavailable(f"not ready: {', '.join(failing)} failing", checks=results)
    return {"status": "ready", "checks": results}


# --- routes ---------------------------------------------------------------------------------------


@app.use
def no_store(request, call_next):
    """RFC 9111 §5.2.2.5: no cache (browser, proxy, CDN) may keep a health answer; a cached
    200 would hide an outage, a cached 503 would outlive the recovery."""
    response = call_next(request)
    if request.path.startswith("/health"):
        response.headers.append(("Cache-Control", "no-store"))
    return response


@app.get("/health", public=True,
         summary="Is the process up? Status, uptime, version and start time")
def health(request):
    return {"status": "ok", "uptime_s": round(time.monotonic() - STARTED_MONOTONIC, 3),
            "version": app.version, "started_at": STARTED_AT}


@app.get("/health/live", public=True, summary="Liveness: 200 while the process serves requests")
def liveness(request):
    # Nothing is checked on purpose: reaching this line is the proof. While draining it
    # still answers 200, since a server that is shutting down must not be restarted.
    return {"status": "alive"}


@app.get("/health/ready", public=True, blocking=True,
         responses={503: "Not ready: a check failed, or the server is draining"},
         summary="Readiness: 200 when every check passes, else 503 naming the failing ones")
def readiness(request):
    # blocking=True: the checks wait up to --check-timeout, so on the asyncio transport this
    # runs in the worker pool and the event loop goes on serving everyone else.
    return check_readiness(app.state.checks, app.state.check_timeout, draining=app.draining)


# --- command line ---------------------------------------------------------------------------------


def main(argv=None):
    parser = app.arg_parser(database=True)
    parser.add_argument("--check-timeout",
                        type=bounded(float, "a duration from more than 0 to 60 s", above=0, at_most=60),
                        default=DEFAULT_CHECK_TIMEOUT,
                        help="a readiness check slower than this has failed (seconds, more than "
                             f"0 and at most 60; default {DEFAULT_CHECK_TIMEOUT})")
    parser.add_argument("--min-free-mb", type=bounded(int, "a whole number of MiB (0 or more)", at_least=0),
                        default=DEFAULT_MIN_FREE_MB,
                        help="readiness fails when the disk holding the database has less free "
                             f"space (MiB; 0 turns the check off; default {DEFAULT_MIN_FREE_MB})")
    args = parser.parse_args(argv)
    db = app.open_database(args, SCHEMA)
    app.state.checks = readiness_checks(db, args.min_free_mb)
    app.state.check_timeout = args.check_timeout
    app.run(args)


if __name__ == "__main__":
    main()
