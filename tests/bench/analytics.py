"""The analytics scenario's check on analytics_collector.py's database (read-only, after the
server has stopped): every batch the load generator saw acknowledged is stored whole and once.

The batch flow (flows.py `analytics-batch`) gives every event the messageId `<batch id>:<k>`,
k = 0 … EVENTS_PER_BATCH − 1, with the batch id `bench-<flow token>-<connection>-<round>`. So the
stored events say which batches arrived: each must hold every k exactly once (a request's events
are stored all together or not at all), and, since a connection sends its next batch only once
the last was answered and loadgen.py waits for every answer, each connection's rounds must run
0, 1, 2 … with no gap. Their number is then the number of batches acknowledged.
"""
import sqlite3
from collections import defaultdict

from flows import BATCH_EVENT, EVENTS_PER_BATCH


def read_only(db_path):
    return sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)


def check_batches(db_path) -> tuple[int, int, list[str]]:
    """(events stored by the batch flow, whole batches among them, what is wrong)."""
    events_of: dict[str, set[int]] = defaultdict(set)
    stored = 0
    with read_only(db_path) as db:
        for (message_id,) in db.execute("SELECT message_id FROM events WHERE event = ?", (BATCH_EVENT,)):
            batch, _, k = message_id.rpartition(":")
            events_of[batch].add(int(k))
            stored += 1
    problems = []
    if stored != sum(map(len, events_of.values())):
        problems.append(f"{stored - sum(map(len, events_of.values()))} messageIds stored twice")
    broken = [batch for batch, ks in events_of.items() if ks != set(range(EVENTS_PER_BATCH))]
    if broken:
        problems.append(f"{len(broken)} batches not stored whole, e.g. {broken[0]} "
                        f"({len(events_of[broken[0]])} of {EVENTS_PER_BATCH} events)")
    rounds_of: dict[str, set[int]] = defaultdict(set)
    for batch in events_of:
        connection, _, round_ = batch.rpartition("-")
        rounds_of[connection].add(int(round_))
    gaps = [connection for connection, rounds in rounds_of.items() if rounds != set(range(len(rounds)))]
    if gaps:
        problems.append(f"{len(gaps)} connections with a batch missing between two stored ones, e.g. {gaps[0]}")
    return stored, len(events_of) - len(broken), problems


def stored_tracks(db_path, event) -> int:
    """How many single /v1/track calls with this event name were stored."""
    with read_only(db_path) as db:
        return db.execute("SELECT count(*) FROM events WHERE type = 'track' AND event = ?", (event,)).fetchone()[0]
