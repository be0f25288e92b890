"""The audit scenario's long log: N entries written straight into audit_log's sqlite file, chained
and checkpointed exactly as level07/audit_log.py chains them, so that `GET /audit/verify` can then
be timed over a million entries without a million appends over HTTP first (about 5 minutes at
the server's rate).

The chain comes from the project's own code: the schema, `canonical_json` (through
`entry_hash`) and `checkpoint_signature` are imported from audit_log.py, so what is built is
what the server itself would have stored: entry seq's hash is sha256(prev_hash ||
canonical_json(entry)), a checkpoint signs the head every CHECKPOINT_EVERY entries (the server's
default), and metadata is stored as its canonical JSON. The entries vary (actors, actions,
targets, metadata, an ip on some) as a real log does. Rows go in by `executemany`, 10,000 a
transaction.

Run: python tests/bench/audit_chain.py --db PATH --entries 1000000 --key K
Prints one JSON line: entries, checkpoints, head (the last hash), seconds.
"""

import argparse
import datetime
import json
import sqlite3
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))
from level07.audit_log import GENESIS_HASH, SCHEMA, canonical_json, checkpoint_signature, entry_hash  # noqa: E402

CHECKPOINT_EVERY = 1000  # audit_log.py's --checkpoint-every default
ROWS_PER_TRANSACTION = 10_000
ACTIONS = ("user.login", "invoice.update", "invoice.delete", "role.grant", "export.download")
START = datetime.datetime(2026, 12, 1, tzinfo=datetime.timezone.utc)


def entry_fields(seq: int) -> dict:
    """Entry seq's own fields: one of 500 actors, 5 actions, 10,000 targets; metadata on most."""
    ts = START + datetime.timedelta(milliseconds=seq * 10)
    return {"seq": seq, "ts": ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z",
            "actor": f"user-{seq % 500}", "action": ACTIONS[seq % len(ACTIONS)], "target": f"invoice:{seq % 10_000}",
            "metadata": {"amount_cents": seq % 100_000, "reason": "bench"} if seq % 4 else None,
            "ip": f"192.0.2.{seq % 250 + 1}" if seq % 3 == 0 else None}


def build(db_path: str, count: int, key: bytes) -> dict:
    db = sqlite3.connect(db_path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.executescript(SCHEMA)
    if db.execute("SELECT count(*) FROM entries").fetchone()[0]:
        raise SystemExit(f"{db_path} already holds entries")
    started = time.perf_counter()
    head, checkpoints = GENESIS_HASH, 0
    for first in range(1, count + 1, ROWS_PER_TRANSACTION):
        rows, signed = [], []
        for seq in range(first, min(first + ROWS_PER_TRANSACTION, count + 1)):
            entry = entry_fields(seq)
            digest = entry_hash(head, entry)
            metadata = canonical_json(entry["metadata"]).decode() if entry["metadata"] is not None else None
            rows.append((seq, entry["ts"], entry["actor"], entry["action"], entry["target"], metadata,
                         entry["ip"], head, digest))
            if seq % CHECKPOINT_EVERY == 0:
                signed.append((seq, digest, checkpoint_signature(key, seq, digest), entry["ts"]))
            head = digest
        db.execute("BEGIN")
        db.executemany("INSERT INTO entries (seq, ts, actor, action, target, metadata, ip, prev_hash, hash) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        db.executemany("INSERT INTO checkpoints (seq, hash, signature, ts) VALUES (?, ?, ?, ?)", signed)
        db.execute("COMMIT")
        checkpoints += len(signed)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    return {"entries": count, "checkpoints": checkpoints, "head": head,
            "seconds": round(time.perf_counter() - started, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a chained audit log straight into a new sqlite file.")
    parser.add_argument("--db", required=True, help="sqlite file (new, or without entries)")
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--key", required=True, help="the checkpoint key the server will be started with")
    args = parser.parse_args()
    print(json.dumps(build(args.db, args.entries, args.key.encode())), flush=True)


if __name__ == "__main__":
    main()
