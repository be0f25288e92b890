"""The reference for logins: raw `hashlib.scrypt` hashes per second, at the cost jwt_auth uses.

A login on `level03/jwt_auth.py` checks the password with one scrypt hash, and that hash is
meant to be slow (it is what makes guessing passwords from a leaked database expensive): the
login rate is bounded by it by design. This measures that bound without HTTP or the database:
jwt_auth's own `verify_password` against a hash made by its own `hash_password`, at its default
cost (`DEFAULT_SCRYPT`), in a loop, on as many threads as the machine has cores. scrypt runs in
OpenSSL with the GIL released, so threads use every core, as the server's worker pool does.

Run: python tests/bench/scrypt_hashes.py --duration 5 [--threads N]
Prints one JSON line in the load generator's shape (requests = hashes): requests, ok, errors,
duration_s, rps, p50_ms, p99_ms, and threads, n, r, p.
"""

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

from loadgen import summary

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "level03"))
from jwt_auth import DEFAULT_SCRYPT, hash_password, verify_password  # noqa: E402

PASSWORD = "bench password, long enough"


def run_hashes(duration: float, threads: int) -> dict:
    stored = hash_password(PASSWORD, DEFAULT_SCRYPT)
    latencies: list[float] = []  # list.append is atomic: the threads can share it
    started = time.perf_counter()
    deadline = started + duration

    def hash_until_deadline() -> None:
        now = time.perf_counter()
        while now < deadline:
            if not verify_password(PASSWORD, stored):
                raise SystemExit("verify_password refused the right password")
            finished = time.perf_counter()
            latencies.append(finished - now)
            now = finished

    workers = [threading.Thread(target=hash_until_deadline) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - started  # until the last hash begun before the deadline ends

    return {
        **summary(latencies, len(latencies), 0, elapsed),
        "threads": threads,
        **DEFAULT_SCRYPT._asdict(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="Raw scrypt hashes per second at jwt_auth's cost.")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="hashing threads (default: one per core)")
    args = parser.parse_args()
    print(json.dumps(run_hashes(args.duration, args.threads)), flush=True)


if __name__ == "__main__":
    main()
