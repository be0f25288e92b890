"""The payments scenario's waiting and counting on payment_webhooks.py: the deliveries the load
generator saw acknowledged are processed by the server's workers afterwards, so the runner polls
the server's own processing status (`GET /webhooks/events?status=received`, which lists the
events still waiting) until none is left, then counts in its database (read-only, once the server
has stopped) what became of each event.
"""
import json
import sqlite3
import time
import urllib.request


def waiting(url) -> bool:
    """Whether any stored event still waits for its processing."""
    with urllib.request.urlopen(url + "/webhooks/events?status=received&limit=1", timeout=30) as response:
        return bool(json.loads(response.read())["items"])


def wait_until_processed(url, timeout) -> float:
    """Poll every 20 ms until no event waits: the monotonic time it happened."""
    deadline = time.monotonic() + timeout
    while waiting(url):
        if time.monotonic() > deadline:
            raise RuntimeError(f"events were still waiting to be processed after {timeout:.0f} s")
        time.sleep(0.02)
    return time.monotonic()


def outcome(db_path) -> dict:
    """What the stored events became: events per status, deliveries and processings in all, and
    the payments marked paid."""
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10) as db:
        statuses = dict(db.execute("SELECT status, count(*) FROM webhook_events GROUP BY status"))
        deliveries, applied = db.execute("SELECT coalesce(sum(deliveries), 0), coalesce(sum(times_applied), 0) "
                                         "FROM webhook_events").fetchone()
        paid = db.execute("SELECT count(*) FROM payments WHERE status = 'paid'").fetchone()[0]
    return {"statuses": statuses, "events": sum(statuses.values()), "deliveries": deliveries,
            "times_applied": applied, "paid": paid}
