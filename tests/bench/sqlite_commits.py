"""The reference for durable counter increments: raw sqlite, one row, one commit per increment.

This is the fastest an increment can be made durable the way `level01/counter.py` promises it
(committed before the answer, kept across a process crash) without HTTP in the way: WAL journal,
`synchronous=NORMAL`, a single connection running `UPDATE ... SET value = value + 1` and
`COMMIT` in a loop. The benchmark runs it in its own process, like a server, so it gets a core
of its own just as the counter server does.

Run: python tests/bench/sqlite_commits.py --db PATH --duration 5
Prints one JSON line in the load generator's shape (requests = commits): requests, ok, errors,
duration_s, rps, p50_ms, p99_ms.
"""

import argparse
import json
import sqlite3
import time

from loadgen import percentile_ms


def run_commits(db_path: str, duration: float) -> dict:
    db = sqlite3.connect(db_path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)")
    db.execute("INSERT OR IGNORE INTO counters (name, value) VALUES ('bench', 0)")
    db.commit()

    latencies: list[float] = []
    started = time.perf_counter()
    deadline = started + duration
    now = started
    while now < deadline:
        db.execute("UPDATE counters SET value = value + 1 WHERE name = ?", ("bench",))
        db.commit()
        finished = time.perf_counter()
        latencies.append(finished - now)
        now = finished
    db.close()

    latencies.sort()
    elapsed = now - started
    return {
        "requests": len(latencies),
        "ok": len(latencies),
        "errors": 0,
        "duration_s": round(elapsed, 3),
        "rps": round(len(latencies) / elapsed, 1),
        "p50_ms": round(percentile_ms(latencies, 0.50), 3),
        "p99_ms": round(percentile_ms(latencies, 0.99), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="Raw sqlite single-row commits per second (WAL).")
    parser.add_argument("--db", required=True, help="sqlite file (created if missing)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds")
    args = parser.parse_args()
    print(json.dumps(run_commits(args.db, args.duration)), flush=True)


if __name__ == "__main__":
    main()
