"""The jobs scenario's measurements: no-op jobs (`sleep` for 0 ms) enqueued over HTTP on
job_processor.py, run by its workers, counted in its database until every one has succeeded.

The database is read directly (read-only, beside the server's WAL writers), so the check that
every job ran is exact: a job's `attempts` is how many times a worker claimed it, 1 for a job
that ran once; more after a worker was killed holding it (at-least-once).
"""
import http.client
import json
import sqlite3
import threading
import time
from urllib.parse import urlsplit

NO_OP = json.dumps({"type": "sleep", "payload": {"ms": 0}}).encode()
CLIENTS = 4


def enqueue(url: str, count: int) -> None:
    """POST /jobs `count` times, from CLIENTS keep-alive connections at once."""
    parts = urlsplit(url)
    errors = []

    def post(jobs: int) -> None:
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        try:
            for _ in range(jobs):
                connection.request("POST", "/jobs", NO_OP, {"Content-Type": "application/json"})
                response = connection.getresponse()
                body = response.read()
                if response.status != 202:
                    errors.append(f"POST /jobs answered {response.status}: {body[:200]!r}")
                    return
        finally:
            connection.close()

    threads = [threading.Thread(target=post, args=(count // CLIENTS + (n < count % CLIENTS),))
               for n in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(errors[0])


def succeeded(db_path) -> int:
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10) as db:
        return db.execute("SELECT count(*) FROM jobs WHERE status = 'succeeded'").fetchone()[0]


def wait_for_succeeded(db_path, count: int, timeout: float, on_progress=None) -> float:
    """Poll until `count` jobs have succeeded: the monotonic time it happened."""
    deadline = time.monotonic() + timeout
    while (done := succeeded(db_path)) < count:
        if on_progress:
            on_progress(done)
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {done} of {count} jobs succeeded within {timeout:.0f} s")
        time.sleep(0.02)
    return time.monotonic()


def attempts(db_path) -> dict[int, int]:
    """{attempts: how many jobs} over every job in the database."""
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10) as db:
        return dict(db.execute("SELECT attempts, count(*) FROM jobs GROUP BY attempts"))
