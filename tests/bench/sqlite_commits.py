"""The reference for durable counter increments: raw sqlite, one row, one commit per increment.

This is the fastest an increment can be made durable the way `level01/counter.py` promises it
(committed before the answer, kept across a process crash) without HTTP in the way. It does
exactly the sqlite work the counter does for `POST /counters/bench/increment`, and nothing else:

- the same database settings as lib/storage.py: WAL journal, `synchronous=NORMAL`, a connection
  in autocommit mode (`isolation_level=None`: no BEGIN or COMMIT sent by Python);
- the counter's own table and statement, imported from it (`SCHEMA`, `ADD_TO_COUNTER`): one
  `INSERT … ON CONFLICT DO UPDATE … RETURNING`, which sqlite runs and commits as a transaction
  of its own; `fetchall()` steps it to its end, so the commit is done when it returns, as it is
  before the counter answers;
- the same parameters (`by` 1, the 64-bit overflow bounds, a timestamp).

What it leaves out is the HTTP side: parsing, routing, validating the body, the JSON answer,
the sockets. It runs in its own process, like a server, so it gets a core of its own just as
the counter server does.

Run: python tests/bench/sqlite_commits.py --db PATH --duration 5
Prints one JSON line in the load generator's shape (requests = commits): requests, ok, errors,
duration_s, rps, p50_ms, p99_ms.
"""

import argparse
import json
import sqlite3
import sys
import time
from pathlib import Path

from loadgen import summary

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "level01")]
from counter import ADD_TO_COUNTER, SCHEMA, start_values_allowing  # noqa: E402
from lib.request import utc_timestamp  # noqa: E402  (the counter's own timestamp)


def run_commits(db_path: str, duration: float) -> dict:
    db = sqlite3.connect(db_path, isolation_level=None)  # autocommit, like lib/storage.py
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.executescript(SCHEMA)
    low, high = start_values_allowing(1)

    latencies: list[float] = []
    started = time.perf_counter()
    deadline = started + duration
    now = started
    while now < deadline:
        params = {"name": "bench", "delta": 1, "now": utc_timestamp(), "low": low, "high": high}
        db.execute(ADD_TO_COUNTER, params).fetchall()  # committed when the statement ends
        finished = time.perf_counter()
        latencies.append(finished - now)
        now = finished
    db.close()

    return summary(latencies, len(latencies), 0, now - started)


def main() -> None:
    parser = argparse.ArgumentParser(description="Raw sqlite single-row commits per second (WAL).")
    parser.add_argument("--db", required=True, help="sqlite file (created if missing)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds")
    args = parser.parse_args()
    print(json.dumps(run_commits(args.db, args.duration)), flush=True)


if __name__ == "__main__":
    main()
