"""Payment webhooks — Stripe's events received as Stripe sends them, processed on a job queue.

What it teaches
  - Verifying a webhook: `Stripe-Signature: t=<unix time>,v1=<hex>[,v1=<hex>…]` is
    HMAC-SHA256 under the endpoint secret (`whsec_…`) of `"{t}.{raw body}"`. The MAC is computed
    over the bytes as they arrived (re-serialised JSON differs in a space and fails), compared in
    constant time (`hmac.compare_digest`), any `v1` may match (Stripe sends several while a
    secret is rolled), any of several secrets may be the key (rotation), and `t` must be within
    `--tolerance` of now in both directions: a captured delivery cannot be replayed later, nor one
    stamped ahead of time kept for later. Any failure is a 400 and nothing is stored.
  - Acknowledge fast, work later: a verified event is stored and answered 200 at once; a worker
    of level05's job queue (job_processor's `Queue`, imported) processes it afterwards, with its
    retries and backoff. The event row is the outbox: a crash between storing and queueing is
    mended by the next delivery of the event (Stripe retries) or the next start.
  - Idempotence per event id: the first `INSERT … ON CONFLICT DO NOTHING` of an id stores it;
    every other delivery, however concurrent, only counts (`deliveries`). Processing changes an
    event's status and its objects in one transaction that first checks the event is still
    unprocessed, so a job that runs twice (the queue delivers at least once) applies it once.
  - Out of order: each payment, order and subscription keeps the `created` time of the event that
    last changed it; an older event changes nothing (it is `ignored`, with the reason).
  - The payment state machine: `status` moves only along `MOVES` (pending → paid →
    partially_refunded → refunded, paid → refunded, pending → failed). An event that asks for
    another move is refused: nothing of it is applied and it is recorded `failed`, with why.

Standards: Stripe's webhook documentation ("Verify webhook signatures", "Best practices"),
RFC 2104 (HMAC), RFC 9110, RFC 9457 (problem details).

Left out: the Stripe API itself (no fetching of the object behind an event), thin events
(`v2`), connected accounts (`account` on an event), several endpoints, and an answer to
Stripe's retries beyond storing once. payment_webhooks.md's "In production" says who does those.

    python level07/payment_webhooks.py [--webhook-secret whsec_…]… [--tolerance S] [--dev]
        [--workers N] [--db PATH]
"""
import enum
import functools
import hashlib
import hmac
import http.client
import json
import re
import secrets
import sys
import time
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any folder

from lib import App, BadRequest, Conflict, NotFound, ValidationFailed, json_response, trace_event
from lib.app import bounded, exit_usage_error
from lib.listing import Sort, SortKey, list_params, page
from lib.request import Query, utc_timestamp
from lib.routing import PAGE, PAGE_ANSWER
from lib.validation import Text
from level05.job_processor import (JOBS_SCHEMA, JobType, Queue, WorkerPool, add_queue_flags, log,
                                   nullable)

app = App("payment_webhooks", "Stripe webhooks verified over the raw bytes, acknowledged at once, "
          "processed once each on a job queue, in order per object, through a payment state "
          "machine.", port=8028)

# =============================================================================================
# Schema: the events as received, and the objects they change
# =============================================================================================

TRACKED = """
    last_event_id      TEXT NOT NULL,      -- the event that last changed it …
    last_event_created INTEGER NOT NULL,   -- … and its `created`: older events change nothing
    updated_at         REAL NOT NULL
"""
SCHEMA = JOBS_SCHEMA + f"""
CREATE TABLE IF NOT EXISTS endpoint_secrets (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS webhook_events (
    seq            INTEGER PRIMARY KEY,     -- arrival order
    id             TEXT NOT NULL UNIQUE,    -- Stripe's evt_…: a second delivery stores nothing
    type           TEXT NOT NULL,
    created        INTEGER NOT NULL,        -- Stripe's: when it happened (unix seconds)
    body           BLOB NOT NULL,           -- the raw bytes the signature covered
    status         TEXT NOT NULL,           -- received, processed, failed, ignored
    outcome        TEXT,                    -- what processing did, or why it did nothing
    deliveries     INTEGER NOT NULL DEFAULT 1,
    times_applied  INTEGER NOT NULL DEFAULT 0,   -- processings that changed or judged it
    replays        INTEGER NOT NULL DEFAULT 0,
    received_at    REAL NOT NULL,
    processed_at   REAL
);
CREATE INDEX IF NOT EXISTS webhook_events_by_status ON webhook_events (status, seq);
CREATE INDEX IF NOT EXISTS webhook_events_by_type ON webhook_events (type, seq);
CREATE TABLE IF NOT EXISTS payments (
    id              TEXT PRIMARY KEY,       -- the PaymentIntent's pi_…
    status          TEXT NOT NULL,
    amount          INTEGER,                -- in the currency's smallest unit: never a float
    amount_refunded INTEGER NOT NULL DEFAULT 0,
    currency        TEXT,
    customer        TEXT,
    order_id        TEXT,
    {TRACKED}
);
CREATE TABLE IF NOT EXISTS orders (
    id               TEXT PRIMARY KEY,      -- client_reference_id, else metadata.order_id
    status           TEXT NOT NULL,
    payment_intent   TEXT,
    checkout_session TEXT,
    amount_total     INTEGER,
    currency         TEXT,
    customer         TEXT,
    {TRACKED}
);
CREATE INDEX IF NOT EXISTS orders_by_payment ON orders (payment_intent);
CREATE TABLE IF NOT EXISTS subscriptions (
    id                   TEXT PRIMARY KEY,  -- sub_…
    status               TEXT NOT NULL,     -- Stripe's own: active, past_due, canceled, …
    customer             TEXT,
    current_period_end   INTEGER,
    cancel_at_period_end INTEGER,
    {TRACKED}
);
"""

# =============================================================================================
# The signature: Stripe's scheme, pure functions over bytes
# =============================================================================================

DEFAULT_TOLERANCE_S = 300
SIGNATURE_SCHEME = "v1"
HEX_SHA256 = re.compile(r"[0-9a-f]{64}")


class SignatureRejected(BadRequest):
    """Stripe's answer to a delivery it may not trust is a 400 (not a 401: there is no
    credential to ask for), and the delivery is not stored."""


def signed_payload(timestamp, body):
    return str(timestamp).encode("ascii") + b"." + body


def compute_signature(secret, timestamp, body):
    """Hex HMAC-SHA256 under the whole secret string (`whsec_…`, as Stripe's libraries key it)."""
    return hmac.new(secret.encode("utf-8"), signed_payload(timestamp, body),
                    hashlib.sha256).hexdigest()


def signature_header(secret, timestamp, body):
    return f"t={timestamp},{SIGNATURE_SCHEME}={compute_signature(secret, timestamp, body)}"


def parse_signature_header(header):
    """`t=…,v1=…,v1=…` → (t, [v1 signatures]). Other schemes (Stripe's test-only `v0`) are
    skipped; a header without exactly one integer `t` or without a `v1` is refused."""
    timestamps, signatures = [], []
    for item in header.split(","):
        key, separator, value = item.strip().partition("=")
        if not separator:
            raise SignatureRejected("Stripe-Signature is not a list of key=value pairs")
        if key == "t":
            timestamps.append(value)
        elif key == SIGNATURE_SCHEME:
            signatures.append(value)
    if len(timestamps) != 1 or not re.fullmatch(r"[0-9]{1,12}", timestamps[0]):
        raise SignatureRejected("Stripe-Signature needs one t=<unix time>")
    if not signatures:
        raise SignatureRejected(f"Stripe-Signature has no {SIGNATURE_SCHEME} signature")
    return int(timestamps[0]), signatures


def verify_signature(header, body, endpoint_secrets, tolerance_s, now=None):
    """Raise `SignatureRejected` unless one `v1` of `header` is the MAC of `body` under one of
    `endpoint_secrets`, and its `t` is within `tolerance_s` of `now`, either way."""
    if header is None:
        raise SignatureRejected("no Stripe-Signature header")
    timestamp, candidates = parse_signature_header(header)
    candidates = [text for text in candidates if HEX_SHA256.fullmatch(text)]   # others can't match
    # Every candidate against every secret, each in constant time: how long this takes says
    # nothing about how close a forgery came.
    matched = False
    for secret in endpoint_secrets:
        expected = compute_signature(secret, timestamp, body)
        for candidate in candidates:
            matched |= hmac.compare_digest(expected, candidate)
    if not matched:
        raise SignatureRejected("no v1 signature matches the body under the endpoint's secrets")
    now = time.time() if now is None else now
    if abs(now - timestamp) > tolerance_s:
        raise SignatureRejected(f"the signature's t is {now - timestamp:+.0f} s from now; at "
                                f"most {tolerance_s:g} s either way is accepted")
    return timestamp


def parse_event(body):
    """A verified body that is an event: an object with a string `id` and `type`, an integer
    `created` and an object in `data.object`. Anything else is a 400, stored nowhere."""
    try:
        event = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BadRequest("the body is not JSON") from None
    problems = []
    if not isinstance(event, dict):
        raise BadRequest("the body is not an event object")
    for name in ("id", "type"):
        if not (isinstance(event.get(name), str) and 0 < len(event[name]) <= 255):
            problems.append({"field": name, "message": "must be a string of 1–255 characters"})
    created = event.get("created")
    if not (isinstance(created, int) and not isinstance(created, bool) and 0 <= created < 1e11):
        problems.append({"field": "created", "message": "must be a unix time in seconds"})
    data = event.get("data")
    if not (isinstance(data, dict) and isinstance(data.get("object"), dict)):
        problems.append({"field": "data.object", "message": "must be an object"})
    if problems:
        raise BadRequest("the body is not a Stripe event", errors=problems)
    return event


# =============================================================================================
# The domain: payments and orders on a state machine, subscriptions as Stripe says
# =============================================================================================

class PaymentStatus(enum.StrEnum):
    PENDING = "pending"
    PAID = "paid"
    PARTIALLY_REFUNDED = "partially_refunded"
    REFUNDED = "refunded"
    FAILED = "failed"


# Where each status may go. Staying put is always allowed (a second refund that is still partial,
# the same state told again); anything else is refused.
MOVES = {
    PaymentStatus.PENDING: {PaymentStatus.PAID, PaymentStatus.FAILED},
    PaymentStatus.PAID: {PaymentStatus.PARTIALLY_REFUNDED, PaymentStatus.REFUNDED},
    PaymentStatus.PARTIALLY_REFUNDED: {PaymentStatus.REFUNDED},
    PaymentStatus.REFUNDED: set(),
    PaymentStatus.FAILED: set(),
}


class IllegalTransition(Exception):
    """An event asks for a move `MOVES` does not have: the whole event is refused."""


class Change(NamedTuple):
    """What an event does to one object: `table` row `object_id` gets `status` and `fields`."""
    table: str
    object_id: str
    status: str
    fields: dict


STATE_MACHINE_TABLES = ("payments", "orders")   # subscriptions keep Stripe's status as it is


def reference(value):
    """An id that Stripe sends either as a string or as the expanded object."""
    if isinstance(value, dict):
        value = value.get("id")
    return value if isinstance(value, str) and value else None


def integer(value):
    """An amount or a time as Stripe sends them: an integer (sqlite's fit in 64 bits)."""
    fits = isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2 ** 63
    return value if fits else None


def text(value):
    return value if isinstance(value, str) else None


def metadata_order(obj):
    metadata = obj.get("metadata")
    return reference(metadata.get("order_id")) if isinstance(metadata, dict) else None


def payment_changes(conn, payment_id, status, fields, order_id):
    """The payment, and the order it pays (named in metadata, or linked by a checkout)."""
    changes = [Change("payments", payment_id, status, {**fields, "order_id": order_id})]
    if order_id is None:
        row = conn.execute("SELECT id FROM orders WHERE payment_intent = ?",
                           (payment_id,)).fetchone()
        order_id = row["id"] if row else None
    if order_id is not None:
        changes.append(Change("orders", order_id, status, {
            "payment_intent": payment_id, "currency": fields.get("currency"),
            "customer": fields.get("customer")}))
    return changes


def payment_intent_changes(status):
    def changes(conn, obj):
        fields = {"amount": integer(obj.get("amount")), "currency": text(obj.get("currency")),
                  "customer": reference(obj.get("customer"))}
        return payment_changes(conn, obj["id"], status, fields, metadata_order(obj))
    return changes


def charge_refunded_changes(conn, charge):
    amount, refunded = integer(charge.get("amount")), integer(charge.get("amount_refunded"))
    whole = charge.get("refunded") is True or (
        amount is not None and refunded is not None and refunded >= amount)
    status = PaymentStatus.REFUNDED if whole else PaymentStatus.PARTIALLY_REFUNDED
    payment_id = reference(charge.get("payment_intent")) or charge["id"]
    fields = {"amount": amount, "amount_refunded": refunded or 0,
              "currency": text(charge.get("currency")),
              "customer": reference(charge.get("customer"))}
    return payment_changes(conn, payment_id, status, fields, metadata_order(charge))


def checkout_completed_changes(conn, session):
    order_id = reference(session.get("client_reference_id")) or metadata_order(session)
    if order_id is None:
        return []
    paid = session.get("payment_status") in ("paid", "no_payment_required")
    return [Change("orders", order_id, PaymentStatus.PAID if paid else PaymentStatus.PENDING, {
        "checkout_session": session["id"],
        "payment_intent": reference(session.get("payment_intent")),
        "amount_total": integer(session.get("amount_total")),
        "currency": text(session.get("currency")), "customer": reference(session.get("customer"))})]


def invoice_paid_changes(conn, invoice):
    payment_id = reference(invoice.get("payment_intent"))
    if payment_id is None:
        return []
    fields = {"amount": integer(invoice.get("amount_paid")),
              "currency": text(invoice.get("currency")),
              "customer": reference(invoice.get("customer"))}
    return payment_changes(conn, payment_id, PaymentStatus.PAID, fields, metadata_order(invoice))


def subscription_changes(conn, subscription, default_status="active"):
    status = subscription.get("status")
    return [Change("subscriptions", subscription["id"],
                   status if isinstance(status, str) else default_status, {
                       "customer": reference(subscription.get("customer")),
                       "current_period_end": integer(subscription.get("current_period_end")),
                       "cancel_at_period_end": subscription.get("cancel_at_period_end") is True})]


HANDLERS = {
    "payment_intent.succeeded": payment_intent_changes(PaymentStatus.PAID),
    "payment_intent.payment_failed": payment_intent_changes(PaymentStatus.FAILED),
    "charge.refunded": charge_refunded_changes,
    "checkout.session.completed": checkout_completed_changes,
    "invoice.paid": invoice_paid_changes,
    "customer.subscription.created": subscription_changes,
    "customer.subscription.updated": subscription_changes,
    "customer.subscription.deleted": lambda conn, obj: subscription_changes(conn, obj, "canceled"),
}


def apply_change(conn, change, event):
    """Apply one change unless a newer event already changed the object; returns a note.
    Raises `IllegalTransition` for a move the state machine does not have."""
    table, object_id = change.table, change.object_id      # table names come from HANDLERS
    row = conn.execute(f"SELECT status, last_event_id, last_event_created FROM {table} "
                       f"WHERE id = ?", (object_id,)).fetchone()
    if row is not None and event["created"] < row["last_event_created"]:
        return None, (f"{table} {object_id}: not changed, {row['last_event_id']} (created "
                      f"{row['last_event_created']}) is newer")
    if (row is not None and table in STATE_MACHINE_TABLES and change.status != row["status"]
            and change.status not in MOVES[PaymentStatus(row["status"])]):
        raise IllegalTransition(f"{table} {object_id}: {row['status']} → {change.status} is "
                                f"not a move of the payment state machine")
    fields = {name: value for name, value in change.fields.items() if value is not None}
    values = {**fields, "status": change.status, "last_event_id": event["id"],
              "last_event_created": event["created"], "updated_at": time.time()}
    columns = ", ".join(values)
    updates = ", ".join(f"{name} = excluded.{name}" for name in values)
    conn.execute(f"INSERT INTO {table} (id, {columns}) VALUES (?, {', '.join('?' * len(values))}) "
                 f"ON CONFLICT (id) DO UPDATE SET {updates}", (object_id, *values.values()))
    before = "new" if row is None else row["status"]
    return True, f"{table} {object_id}: {before} → {change.status}"


def judge_event(conn, event):
    """(status, outcome) of processing `event`, its changes written on `conn`."""
    handler = HANDLERS.get(event["type"])
    if handler is None:
        return "ignored", f"{event['type']} is not an event type this server handles"
    obj = event["data"]["object"]
    if reference(obj.get("id")) is None:
        return "ignored", "its data.object has no id"
    changes = handler(conn, obj)
    if not changes:
        return "ignored", "it names no payment, order or subscription"
    conn.execute("SAVEPOINT event_changes")
    try:
        results = [apply_change(conn, change, event) for change in changes]
    except IllegalTransition as refusal:
        conn.execute("ROLLBACK TO event_changes")   # none of the event, not half of it
        return "failed", f"refused: {refusal}"
    finally:
        conn.execute("RELEASE event_changes")
    notes = "; ".join(note for _, note in results)
    return ("processed" if any(applied for applied, _ in results) else "ignored"), notes


def process_event(context, judge):
    """The job: judge one stored event, once, with `judge(conn, event)` → (status, outcome),
    which writes the event's changes on `conn` (this server's `judge_event`; saas_starter
    brings its billing judge). The check that the event still waits and the writes of its
    outcome are one transaction, so a second run of the job (at-least-once) finds it done."""
    event_id = context.payload["event"]
    with context.queue.db.transaction() as conn:
        row = conn.execute("SELECT status, body FROM webhook_events WHERE id = ?",
                           (event_id,)).fetchone()
        if row is None or row["status"] not in ("received", "failed"):
            return {"event": event_id, "status": None if row is None else row["status"],
                    "note": "already processed"}
        status, outcome = judge(conn, json.loads(row["body"]))
        conn.execute("UPDATE webhook_events SET status = ?, outcome = ?, processed_at = ?, "
                     "times_applied = times_applied + 1 WHERE id = ?",
                     (status, outcome, time.time(), event_id))
    log(f"event {event_id}: {status}: {outcome}")
    return {"event": event_id, "status": status, "outcome": outcome}


def processing_attempt(context, judge):
    """`process_event`, an error recorded on the event before the queue retries it."""
    try:
        return process_event(context, judge)
    except Exception as error:
        context.queue.db.execute(
            "UPDATE webhook_events SET status = 'failed', outcome = ? WHERE id = ? AND "
            "status IN ('received', 'failed')",
            (f"attempt {context.attempt}: {type(error).__name__}: {error}"[:1000],
             context.payload["event"]))
        raise


# `queue_event` enqueues a job of this name; a server that judges events otherwise
# (saas_starter) registers its own `run` under the same name on its own queue.
PROCESS_EVENT = JobType("payment_event", functools.partial(processing_attempt, judge=judge_event),
                        {"event": Text(1, 255, required=True)},
                        "processes one stored Stripe event")

# =============================================================================================
# Receiving: verify, store once, queue
# =============================================================================================

def job_key(event_id, replays):
    return f"payment_event:{event_id}:{replays}"


def queue_event(queue, event_id, replays):
    """The job of this processing of the event: made once, whoever asks (the idempotency key).
    Returns whether this call made it."""
    _, made = queue.enqueue(PROCESS_EVENT.name, {"event": event_id},
                            idempotency_key=job_key(event_id, replays))
    return made


def store_event(db, event, body):
    """Store a verified event; returns (row, first). A later delivery of the same id only
    counts itself, however many arrive at once: the unique id decides which one stores."""
    row = db.execute_returning(
        "INSERT INTO webhook_events (id, type, created, body, status, received_at) "
        "VALUES (?, ?, ?, ?, 'received', ?) ON CONFLICT (id) DO NOTHING RETURNING *",
        (event["id"], event["type"], event["created"], body, time.time()))
    if row:
        return row[0], True
    return db.execute_returning("UPDATE webhook_events SET deliveries = deliveries + 1 "
                                "WHERE id = ? RETURNING *", (event["id"],))[0], False


def queue_waiting_events(queue):
    """At start: an event stored but never queued (the process stopped in between) is queued."""
    rows = queue.db.query("SELECT id, replays FROM webhook_events INDEXED BY "
                          "webhook_events_by_status WHERE status = 'received'")
    queued = sum(queue_event(queue, row["id"], row["replays"]) for row in rows)
    if queued:
        log(f"{queued} received events that had no job queued for processing")


# =============================================================================================
# Endpoint secrets: given, or made once and kept
# =============================================================================================

def endpoint_secret_list(text):
    """One `--webhook-secret` value: a secret, or several separated by commas."""
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise ValueError("an empty secret")
    return items


def resolve_secrets(args, db):
    """`--webhook-secret` values (any one verifies; the first signs `--dev` events), else the
    secret kept in the database: made once and printed once to stderr."""
    if args.webhook_secret:
        return [secret for group in args.webhook_secret for secret in group]
    made = "whsec_" + secrets.token_urlsafe(32)
    if db.execute("INSERT OR IGNORE INTO endpoint_secrets (name, value) VALUES ('stripe', ?)",
                  (made,)).rowcount:
        sys.stderr.write(f"webhook secret (made now, kept in the database; give it to the "
                         f"sender): {made}\n")
    return [db.query_one("SELECT value FROM endpoint_secrets WHERE name = 'stripe'")["value"]]


# =============================================================================================
# Test events for --dev: what a field left out would look like from Stripe
# =============================================================================================

def fake_id(prefix):
    return f"{prefix}_{secrets.token_hex(12)}"


OBJECT_DEFAULTS = {   # type → (object kind, id prefix, fields)
    "payment_intent": ("payment_intent", "pi", {"amount": 2000, "currency": "usd",
                                                "status": "succeeded", "metadata": {}}),
    "charge": ("charge", "ch", {"amount": 2000, "amount_refunded": 2000, "refunded": True,
                                "currency": "usd", "metadata": {}}),
    "checkout.session": ("checkout.session", "cs", {"amount_total": 2000, "currency": "usd",
                                                    "payment_status": "paid", "mode": "payment",
                                                    "metadata": {}}),
    "invoice": ("invoice", "in", {"amount_paid": 2000, "currency": "usd", "status": "paid"}),
    "customer.subscription": ("subscription", "sub", {"status": "active",
                                                      "cancel_at_period_end": False}),
}


def sample_event(values, now):
    """A whole event from `{"type", "data": {"object": {…}}}` (plus `id` and `created` if
    given): ids, amounts and times that are left out get values Stripe would send."""
    event_type = values["type"]
    kind = next((k for k in sorted(OBJECT_DEFAULTS, key=len, reverse=True)
                 if event_type.startswith(k + ".")), None)
    name, prefix, defaults = OBJECT_DEFAULTS.get(kind, ("object", "obj", {}))
    obj = {"id": fake_id(prefix), "object": name, "created": now, **defaults,
           **values.get("data", {}).get("object", {})}
    if name == "charge":
        obj.setdefault("payment_intent", fake_id("pi"))
    if name == "subscription":
        obj.setdefault("current_period_end", now + 30 * 86_400)
    return {"id": values.get("id") or fake_id("evt"), "object": "event",
            "api_version": "2024-06-20", "created": values.get("created", now),
            "data": {"object": obj}, "livemode": False, "pending_webhooks": 1,
            "request": {"id": None, "idempotency_key": None}, "type": event_type}


def validate_test_event(data):
    errors = {}
    if not (isinstance(data.get("type"), str) and 0 < len(data["type"]) <= 100):
        errors["type"] = "is required: an event type such as payment_intent.succeeded"
    event_data = data.get("data", {})
    if not (isinstance(event_data, dict) and isinstance(event_data.get("object", {}), dict)):
        errors["data.object"] = "must be an object"
    if "id" in data and not (isinstance(data["id"], str) and 0 < len(data["id"]) <= 255):
        errors["id"] = "must be a string of 1–255 characters"
    if "created" in data and integer(data["created"]) is None:
        errors["created"] = "must be a unix time in seconds"
    unknown = set(data) - {"type", "data", "id", "created"}
    errors.update((name, "is not a field of a test event") for name in sorted(unknown))
    if errors:
        raise ValidationFailed(errors)
    return data


def deliver_to_self(settings, body, header):
    """POST the signed event to this server, as Stripe would: (status, answer)."""
    connection = http.client.HTTPConnection(settings.self_host, app.port, timeout=10)
    try:
        connection.request("POST", "/webhooks/stripe", body=body, headers={
            "Content-Type": "application/json; charset=utf-8", "Stripe-Signature": header,
            "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks) payment_webhooks-dev"})
        answer = connection.getresponse()
        return answer.status, json.loads(answer.read() or b"null")
    finally:
        connection.close()


# =============================================================================================
# Routes
# =============================================================================================

def render_time(when):
    return None if when is None else utc_timestamp(when)


def render_event(row, *, with_body=False):
    event = {"id": row["id"], "type": row["type"], "created": render_time(row["created"]),
             "status": row["status"], "outcome": row["outcome"], "deliveries": row["deliveries"],
             "times_applied": row["times_applied"], "replays": row["replays"],
             "received_at": render_time(row["received_at"]),
             "processed_at": render_time(row["processed_at"])}
    if with_body:
        event["event"] = json.loads(row["body"])
    return event


def render_tracked(row, fields):
    return {"id": row["id"], "status": row["status"], **{name: row[name] for name in fields},
            "last_event": {"id": row["last_event_id"],
                           "created": render_time(row["last_event_created"])},
            "updated_at": render_time(row["updated_at"])}


TIME = {"type": "string", "format": "date-time"}
TEXT_OR_NULL = nullable({"type": "string"})
INT_OR_NULL = nullable({"type": "integer"})
EVENT_STATUSES = ("received", "processed", "failed", "ignored")
EVENT_SCHEMA = {
    "type": "object",
    "required": ["id", "type", "created", "status", "outcome", "deliveries", "times_applied",
                 "replays", "received_at", "processed_at"],
    "properties": {"id": {"type": "string"}, "type": {"type": "string"}, "created": TIME,
                   "status": {"enum": list(EVENT_STATUSES)}, "outcome": TEXT_OR_NULL,
                   "deliveries": {"type": "integer"}, "times_applied": {"type": "integer"},
                   "replays": {"type": "integer"}, "received_at": TIME,
                   "processed_at": nullable(TIME), "event": {"type": "object"}}}
LAST_EVENT = {"type": "object", "required": ["id", "created"],
              "properties": {"id": {"type": "string"}, "created": TIME}}


def tracked_schema(fields):
    return {"type": "object", "required": ["id", "status", *fields, "last_event", "updated_at"],
            "properties": {"id": {"type": "string"}, "status": {"type": "string"}, **fields,
                           "last_event": LAST_EVENT, "updated_at": TIME}}


PAYMENT_FIELDS = {"amount": INT_OR_NULL, "amount_refunded": {"type": "integer"},
                  "currency": TEXT_OR_NULL, "customer": TEXT_OR_NULL, "order_id": TEXT_OR_NULL}
ORDER_FIELDS = {"payment_intent": TEXT_OR_NULL, "checkout_session": TEXT_OR_NULL,
                "amount_total": INT_OR_NULL, "currency": TEXT_OR_NULL, "customer": TEXT_OR_NULL}
SUBSCRIPTION_FIELDS = {"customer": TEXT_OR_NULL, "current_period_end": INT_OR_NULL,
                       "cancel_at_period_end": nullable({"type": "integer"})}
ACK_SCHEMA = {"type": "object", "required": ["received", "id", "duplicate"],
              "properties": {"received": {"const": True}, "id": {"type": "string"},
                             "duplicate": {"type": "boolean"}}}
NEWEST = Sort("newest", SortKey("seq", int, descending=True))
TYPE_FILTER = Query("type", "only events of this type (e.g. charge.refunded)")
STATUS_FILTER = Query("status", "only events in this state", EVENT_STATUSES)
NO_EVENT = {404: "No event with this id was received"}


@app.post("/webhooks/stripe", body_limit=512 * 1024, public=True,
          request_schema={"type": "object", "required": ["id", "type", "created", "data"]},
          response_schema=ACK_SCHEMA,
          responses={200: "Stored (or stored before: a duplicate); processed afterwards",
                     400: "No, a malformed or a stale Stripe-Signature, or none that matches "
                          "the raw body under an endpoint secret; or a verified body that is "
                          "not an event. Nothing is stored."})
def receive_webhook(request):
    """Receive a Stripe event: verify Stripe-Signature, store, acknowledge"""
    settings = app.state.settings
    signed_at = verify_signature(request.header("Stripe-Signature"), request.body,
                                 settings.secrets, settings.tolerance)
    trace_event(f"Stripe-Signature verified: t={signed_at}, {time.time() - signed_at:+.0f} s ago")
    event = parse_event(request.body)
    row, first = store_event(app.state.queue.db, event, request.body)
    if first or row["status"] == "received":   # a redelivery queues what a crash left unqueued
        queue_event(app.state.queue, row["id"], row["replays"])
    trace_event(f"event {row['id']} {'stored and queued' if first else 'delivered again'}")
    return {"received": True, "id": row["id"], "duplicate": not first}


@app.get("/webhooks/events", query=[*PAGE, TYPE_FILTER, STATUS_FILTER],
         response_schema={**PAGE_ANSWER, "properties": {
             **PAGE_ANSWER["properties"], "items": {"type": "array", "items": EVENT_SCHEMA}}})
def list_events(request):
    """Received events, newest first (filters: type, status)"""
    limit, cursor = list_params(request, NEWEST.shape)
    where, params = NEWEST.after(cursor) if cursor else ("1", [])
    chosen = {query.name: query.read(request) for query in (TYPE_FILTER, STATUS_FILTER)}
    chosen = {name: value for name, value in chosen.items() if value is not None}
    matching = "".join(f" AND {name} = ?" for name in chosen)   # the names come from the code
    rows = app.state.queue.db.query(
        f"SELECT * FROM webhook_events WHERE {where}{matching} ORDER BY {NEWEST.order_by} "
        f"LIMIT ?", [*params, *chosen.values(), limit + 1])
    return page(rows, limit, NEWEST.cursor_values, render_event)


def load_event(event_id):
    row = app.state.queue.db.query_one("SELECT * FROM webhook_events WHERE id = ?", (event_id,))
    if row is None:
        raise NotFound(f"no event {event_id!r} was received")
    return row


@app.get("/webhooks/events/{event_id}", response_schema=EVENT_SCHEMA,
         responses={200: "The event: its status and outcome, and the event as received",
                    **NO_EVENT})
def read_event(request, event_id):
    """One received event, with what processing made of it"""
    return render_event(load_event(event_id), with_body=True)


@app.post("/webhooks/events/{event_id}/replay", status=202, body_required=False,
          response_schema=EVENT_SCHEMA,
          responses={202: "Queued to be processed again (received)", **NO_EVENT,
                     409: "Still waiting for its first processing"})
def replay_event(request, event_id):
    """Process a stored event again (safe: an older state is never written over a newer)"""
    db = app.state.queue.db
    rows = db.execute_returning(
        "UPDATE webhook_events SET status = 'received', replays = replays + 1, outcome = NULL, "
        "processed_at = NULL WHERE id = ? AND status != 'received' RETURNING *", (event_id,))
    if not rows:
        load_event(event_id)
        raise Conflict(f"event {event_id} is still waiting to be processed")
    queue_event(app.state.queue, event_id, rows[0]["replays"])
    return json_response(render_event(rows[0]), 202)


def tracked_route(path, table, fields, what, key):
    schema = tracked_schema(fields)

    def read(request, object_id):
        row = app.state.queue.db.query_one(f"SELECT * FROM {table} WHERE id = ?", (object_id,))
        if row is None:
            raise NotFound(f"no {what} {object_id!r}")
        return render_tracked(row, fields)

    read.__name__ = f"read_{table}"
    read.__doc__ = f"A {what} ({key}) as its events left it"
    app.get(path, response_schema=schema,
            responses={200: f"The {what}", 404: f"No event named this {what}"})(read)


tracked_route("/payments/{object_id}", "payments", PAYMENT_FIELDS, "payment",
              "its PaymentIntent's id")
tracked_route("/orders/{object_id}", "orders", ORDER_FIELDS, "order",
              "a checkout's client_reference_id, else metadata.order_id")
tracked_route("/subscriptions/{object_id}", "subscriptions", SUBSCRIPTION_FIELDS,
              "subscription", "its sub_ id")


@app.post("/dev/send", blocking=True, body_limit=64 * 1024,
          request_schema={"type": "object", "required": ["type"], "properties": {
              "type": {"type": "string"}, "id": {"type": "string"},
              "created": {"type": "integer"}, "data": {"type": "object"}}},
          responses={200: "The event, its Stripe-Signature and this server's answer to it",
                     404: "Not started with --dev", 422: "Invalid fields"})
def send_test_event(request):
    """Sign a test event and deliver it to this server (only with --dev)"""
    settings = app.state.settings
    if not settings.dev:
        raise NotFound("test events are sent only by a server started with --dev")
    now = int(time.time())
    event = sample_event(validate_test_event(request.json_object()), now)
    body = json.dumps(event, indent=2).encode()
    header = signature_header(settings.secrets[0], now, body)
    status, answer = deliver_to_self(settings, body, header)
    return {"event": event, "stripe_signature": header,
            "delivery": {"status": status, "answer": answer}}


# =============================================================================================
# Command line
# =============================================================================================

class Settings(NamedTuple):
    secrets: list
    tolerance: float
    dev: bool
    self_host: str


def add_webhook_arguments(parser):
    """`--webhook-secret` (read by `resolve_secrets`) and `--tolerance`: what verifying a
    delivery needs (saas_starter takes them too)."""
    parser.add_argument("--webhook-secret", action="append", type=endpoint_secret_list,
                        metavar="whsec_…", help="an endpoint secret; repeat it (or give a comma "
                        "list) while rotating: any one verifies (default: one made once and "
                        "kept in the database)")
    parser.add_argument("--tolerance", type=bounded(float, "seconds from 1 to 86400",
                                                    at_least=1, at_most=86_400),
                        default=DEFAULT_TOLERANCE_S, help="how far a signature's t may be from "
                        f"now, either way (default {DEFAULT_TOLERANCE_S})")


def start_event_queue(server, db, args, job_type):
    """The queue of `server`'s event jobs (`job_type`: `PROCESS_EVENT`, or saas_starter's), set
    by `add_queue_flags`' flags, every event still waiting queued again; its workers start when
    the server listens and stop before its database closes."""
    queue = Queue(db, [job_type], lease_s=args.lease_s, backoff_s=args.backoff_s,
                  backoff_max_s=args.backoff_max_s)
    try:
        queue_waiting_events(queue)
    except Exception as error:   # a full or locked file: the next delivery of each queues it
        exit_usage_error(f"cannot queue the received events: {error}")
    pool = WorkerPool(queue, args.workers, label="processor", poll_s=args.poll_s,
                      stop_timeout=args.stop_timeout)
    server.on_listening.append(pool.start)
    server.shutdown_hooks.append(pool.stop)   # hooks run in reverse: before the database closes
    return queue


def main(argv=None):
    parser = app.arg_parser(database=True)
    add_webhook_arguments(parser)
    parser.add_argument("--dev", action="store_true",
                        help="POST /dev/send signs and delivers test events (never in production)")
    add_queue_flags(parser, workers_default=2, workers_min=0)
    args = parser.parse_args(argv)
    db = app.open_database(args, SCHEMA)
    self_host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(args.host, args.host)
    app.state.settings = Settings(resolve_secrets(args, db), args.tolerance, args.dev, self_host)
    app.state.queue = start_event_queue(app, db, args, PROCESS_EVENT)
    app.run(args)


if __name__ == "__main__":
    main()
