"""Notification queue — events fanned out to the channels each user chose, through the job queue.

What it teaches
  - The transactional outbox: `POST /events` stores the event *and* one delivery row per channel
    the user enabled, in one sqlite transaction, before it answers 202. A relay thread then
    turns each delivery into a job of level05's durable queue (job_processor's `Queue`, with
    the delivery's id as the idempotency key). A crash anywhere leaves either nothing (no 202
    was sent, the producer posts again) or rows the relay picks up after the restart: no event
    is lost between "stored" and "queued", and none is queued twice.
  - Idempotent producers: an event id seen before is answered 200 with the stored event and
    fans out nothing (`INSERT … ON CONFLICT DO NOTHING` decides it, so two copies posted at the
    same moment make one event).
  - Ordering without a lock: a user's webhook deliveries go out one at a time, in event order.
    The relay queues a webhook delivery only when every earlier one of that user has
    succeeded or is dead, so a failing subscriber holds back its own later events (and only
    those: other channels and other users go on).
  - Webhooks as a subscriber sees them: a POST of the event, signed with
    `X-Signature-256: sha256=<hex HMAC-SHA256(secret, raw body)>` (GitHub's header); a non-2xx
    or no answer within `--webhook-timeout-s` is retried with the queue's backoff and jitter,
    then dead-lettered. Every attempt is recorded (`GET /events/{id}/deliveries`).
  - SSRF: a webhook URL is a request the server makes on a stranger's behalf. One that resolves
    to a loopback, private or link-local address (the cloud metadata service at
    169.254.169.254, an admin port on localhost) is refused when it is set (422) and again at
    each delivery, after resolving the name, and the request goes to the very address that was
    checked (no second lookup a DNS-rebinding attacker could answer differently). Local
    development turns that off with `--allow-private-webhooks`.

Channels: inbox (stored, read and marked read over HTTP), live (Server-Sent Events with
`Last-Event-ID` resume, on level04's `EventStream`), webhook, and email (level05/email_queue's
sending, through `--smtp`).

Standards: RFC 2104 (HMAC), HTML Living Standard §9.2 (Server-Sent Events), RFC 9110 (202
Accepted), RFC 9457 (problem details), OWASP's SSRF prevention cheat sheet.

Left out: authentication (anyone may read any user's inbox: level 03 teaches who may), digests
and quiet hours, per-channel mutes, templates per event type, webhook secret rotation with two
valid signatures, a replay-protecting timestamp in the signature (Stripe signs `t=…` too; see
payment_webhooks in level 07). notification_queue.md's "In production" says who does those.

    python level05/notification_queue.py [--allow-private-webhooks] [--webhook-timeout-s S]
        [--max-attempts N] [--backoff-s S] [--backoff-max-s S] [--smtp HOST:PORT] [--db PATH]
"""
import hashlib
import hmac
import http.client
import ipaddress
import json
import re
import secrets
import socket
import ssl
import sys
import threading
import time
from pathlib import Path
from typing import Callable, NamedTuple
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any folder

from lib import App, BadRequest, NotFound, ValidationFailed, json_response, trace_event
from lib.app import bounded
from lib.listing import Sort, SortKey, list_params, page
from lib.request import Query, utc_timestamp
from lib.response import StreamingResponse, json_body
from lib.routing import PAGE, PAGE_ANSWER
from lib.validation import Boolean, Email, Field, Invalid, Text, TextList, body_schema, validate
from level04.feature_flags import EventStream
from level04.email_notifications import MailSettings, add_sending_flags
from level04.url_shortener import MAX_URL, URL_SCHEMA_PATTERN, normalise_url
from level05 import email_queue
from level05.job_processor import (JOBS_SCHEMA, JobFailed, JobRefused, JobType, Queue,
                                   WorkerPool)
from level05.job_processor import Payload as ObjectOf   # a JSON object, its fields checked apart
from level05.job_processor import add_queue_flags, log, nullable

app = App("notification_queue", "Events fanned out through a durable job queue to each user's "
          "channels: inbox, live Server-Sent Events, signed webhooks and email.", port=8020)

# =============================================================================================
# Schema: events, preferences, the outbox of deliveries, what each channel delivered
# =============================================================================================

SCHEMA = JOBS_SCHEMA + """
CREATE TABLE IF NOT EXISTS events (
    seq         INTEGER PRIMARY KEY,    -- arrival order: "event order" for a user
    id          TEXT NOT NULL UNIQUE,   -- the producer's id: a second POST of it is a no-op
    type        TEXT NOT NULL,
    user_id     TEXT NOT NULL,
    data        TEXT NOT NULL,          -- JSON object
    created_at  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS preferences (
    user_id     TEXT PRIMARY KEY,
    preferences TEXT NOT NULL,          -- JSON, as GET shows it
    updated_at  REAL NOT NULL
);
-- The outbox: one row per event and channel, written with the event. The relay gives each a
-- job (job_id) once it may go: at once, or for a webhook once the user's earlier ones are done.
CREATE TABLE IF NOT EXISTS deliveries (
    id          INTEGER PRIMARY KEY,
    event_seq   INTEGER NOT NULL REFERENCES events (seq),
    user_id     TEXT NOT NULL,
    channel     TEXT NOT NULL,
    job_id      INTEGER,
    UNIQUE (event_seq, channel)
);
CREATE INDEX IF NOT EXISTS deliveries_unqueued ON deliveries (id) WHERE job_id IS NULL;
CREATE INDEX IF NOT EXISTS deliveries_in_order ON deliveries (user_id, channel, event_seq)
    WHERE channel IN ('live', 'webhook');
-- Every attempt of every delivery: what GET /events/{id}/deliveries lists.
CREATE TABLE IF NOT EXISTS attempts (
    id          INTEGER PRIMARY KEY,
    delivery_id INTEGER NOT NULL REFERENCES deliveries (id),
    event_seq   INTEGER NOT NULL,
    channel     TEXT NOT NULL,
    attempt     INTEGER NOT NULL,
    status      TEXT NOT NULL,          -- succeeded, failed (will retry), dead (the last failed)
    http_status INTEGER,
    error       TEXT,
    at          REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS attempts_by_event ON attempts (event_seq, id);
CREATE INDEX IF NOT EXISTS attempts_final ON attempts (delivery_id) WHERE status != 'failed';
-- The inbox channel, and the live channel's feed (its id is the SSE event id). UNIQUE: a
-- delivery that runs twice (at-least-once) still leaves one row.
CREATE TABLE IF NOT EXISTS inbox (
    id          INTEGER PRIMARY KEY,
    user_id     TEXT NOT NULL,
    event_seq   INTEGER NOT NULL REFERENCES events (seq),
    read_at     REAL,
    created_at  REAL NOT NULL,
    UNIQUE (user_id, event_seq)
);
CREATE INDEX IF NOT EXISTS inbox_unread ON inbox (user_id, event_seq) WHERE read_at IS NULL;
CREATE TABLE IF NOT EXISTS live_feed (
    id          INTEGER PRIMARY KEY,
    user_id     TEXT NOT NULL,
    event_seq   INTEGER NOT NULL REFERENCES events (seq),
    UNIQUE (user_id, event_seq)
);
"""

CHANNELS = ("inbox", "live", "webhook", "email")
DEFAULT_PREFERENCES = {"channels": {"inbox": True, "live": True, "webhook": None, "email": None},
                       "muted_types": []}


def unix_text(when):
    return None if when is None else utc_timestamp(when, timespec="milliseconds")


def event_body(row):
    """The event as a webhook receives it, and as the live stream and the inbox show it."""
    return {"id": row["id"], "type": row["type"], "user_id": row["user_id"],
            "data": json.loads(row["data"]), "created_at": unix_text(row["created_at"])}


def load_preferences(conn, user_id):
    row = conn.execute("SELECT preferences FROM preferences WHERE user_id = ?",
                       (user_id,)).fetchone()
    return DEFAULT_PREFERENCES if row is None else json.loads(row["preferences"])


def enabled_channels(preferences, event_type):
    if event_type in preferences["muted_types"]:
        return []
    return [channel for channel in CHANNELS if preferences["channels"][channel]]


# =============================================================================================
# Publishing: the event and its outbox rows, one transaction
# =============================================================================================

def publish(db, event):
    """Store `event` and a delivery per channel its user has on; returns (row, created). An id
    already stored returns that event (created False) and adds nothing."""
    with db.transaction() as conn:
        row = conn.execute(
            "INSERT INTO events (id, type, user_id, data, created_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (id) DO NOTHING RETURNING *",
            (event["id"], event["type"], event["user_id"], json.dumps(event["data"]),
             time.time())).fetchone()
        if row is None:
            earlier = conn.execute("SELECT * FROM events WHERE id = ?", (event["id"],))
            return earlier.fetchone(), False
        channels = enabled_channels(load_preferences(conn, row["user_id"]), row["type"])
        conn.executemany("INSERT INTO deliveries (event_seq, user_id, channel) VALUES (?, ?, ?)",
                         [(row["seq"], row["user_id"], channel) for channel in channels])
    return row, True


# =============================================================================================
# The relay: outbox rows → jobs of the queue; a user's live and webhook deliveries in order
# =============================================================================================

IN_ORDER = ("live", "webhook")    # a user's deliveries on these go one at a time, in event order
UNFINISHED = ("queued", "scheduled", "running", "failed")   # job_processor's waiting states

# Due: a delivery on an unordered channel at once; on an ordered one when none of the user's
# earlier deliveries on that channel is still to be done: not queued yet, or its job waiting or
# running without a final attempt recorded (so a failing webhook holds back the rest).
DUE_DELIVERIES = f"""
SELECT d.id, d.channel FROM deliveries d INDEXED BY deliveries_unqueued
WHERE d.job_id IS NULL AND (d.channel NOT IN {IN_ORDER} OR NOT EXISTS (
    SELECT 1 FROM deliveries e INDEXED BY deliveries_in_order LEFT JOIN jobs j ON j.id = e.job_id
    WHERE e.user_id = d.user_id AND e.channel = d.channel AND e.event_seq < d.event_seq
      AND e.channel IN {IN_ORDER}
      AND (e.job_id IS NULL OR (j.status IN {UNFINISHED} AND NOT EXISTS (
          SELECT 1 FROM attempts a INDEXED BY attempts_final
          WHERE a.delivery_id = e.id AND a.status != 'failed')))))
ORDER BY d.id LIMIT 200
"""


class Relay:
    """A thread that queues due deliveries: woken by a publish and by a delivery's final
    attempt, and every `poll_s` anyway (a predecessor that finished otherwise, by lease expiry
    after a kill -9, is seen there: the state is read from the tables, never remembered)."""

    def __init__(self, queue, poll_s, options):
        self.queue, self.poll_s, self.options = queue, poll_s, options
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="relay", daemon=True)

    def _run(self):
        while not self.stopping.is_set():
            try:
                self.queue_due()
            except Exception as error:  # locked or full: the rows stay, the next pass takes them
                log(f"relay: {type(error).__name__}: {error}")
            self.wake.wait(self.poll_s)
            self.wake.clear()

    def queue_due(self):
        """One pass: a job for every due delivery. The idempotency key makes a pass that
        crashed between enqueue and recording the job id harmless: the same job comes back."""
        db = self.queue.db
        for delivery_id, channel in db.query(DUE_DELIVERIES):
            key = f"delivery:{delivery_id}"
            job = db.query_one("SELECT id FROM jobs WHERE idempotency_key = ?", (key,))
            if job is None:
                kind = CHANNEL_JOBS[channel]
                job, _ = self.queue.enqueue(kind.job.name, kind.payload(db, delivery_id),
                                            idempotency_key=key, **self.options)
            db.execute("UPDATE deliveries SET job_id = ? WHERE id = ?", (job["id"], delivery_id))

    def start(self):
        self.thread.start()

    def stop(self):
        self.stopping.set()
        self.wake.set()
        self.thread.join(5)


# =============================================================================================
# Delivering: one job type per channel, each attempt recorded
# =============================================================================================

class DeliveryFailed(JobFailed):
    """An attempt that failed; `http_status` when the subscriber answered."""

    def __init__(self, error, http_status=None):
        super().__init__(error)
        self.http_status = http_status


def load_delivery(context):
    return context.queue.db.query_one(
        "SELECT d.id AS delivery_id, d.channel, e.* FROM deliveries d JOIN events e "
        "ON e.seq = d.event_seq WHERE d.id = ?", (context.payload["delivery"],))


def record_attempt(context, delivery, status, http_status=None, error=None):
    context.queue.db.execute(
        "INSERT INTO attempts (delivery_id, event_seq, channel, attempt, status, http_status, "
        "error, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (delivery["delivery_id"], delivery["seq"], delivery["channel"], context.attempt, status,
         http_status, error, time.time()))


def attempted(deliver):
    """A channel's `deliver(context, delivery)` as a job's run: its outcome recorded as an
    attempt, `dead` when the queue will not try again (the job's last attempt, or a
    `JobRefused`, which no retry can mend)."""

    def run(context):
        delivery = load_delivery(context)
        try:
            deliver(context, delivery)
        except Exception as error:
            job = context.queue.get(context.job_id)
            last = not getattr(error, "retry", True) or context.attempt >= job["max_attempts"]
            record_attempt(context, delivery, "dead" if last else "failed",
                           getattr(error, "http_status", None), str(error)[:1000])
            if last:
                app.state.relay.wake.set()
            raise
        record_attempt(context, delivery, "succeeded")
        app.state.relay.wake.set()   # the user's next delivery on this channel may go now

    return run


def deliver_to_inbox(context, delivery):
    context.queue.db.execute(
        "INSERT INTO inbox (user_id, event_seq, created_at) VALUES (?, ?, ?) "
        "ON CONFLICT DO NOTHING", (delivery["user_id"], delivery["seq"], time.time()))


def deliver_live(context, delivery):
    """Into the user's feed, which every open stream of that user reads (and a reconnecting
    one replays from its Last-Event-ID)."""
    context.queue.db.execute("INSERT INTO live_feed (user_id, event_seq) VALUES (?, ?) "
                             "ON CONFLICT DO NOTHING", (delivery["user_id"], delivery["seq"]))


def channel_setting(context, delivery):
    """The user's current setting for the delivery's channel (a URL and secret, an address):
    what they have now, not what they had when the event came."""
    with context.queue.db.reading() as conn:
        setting = load_preferences(conn, delivery["user_id"])["channels"][delivery["channel"]]
    if not setting:
        raise JobRefused(f"the user has turned the {delivery['channel']} channel off")
    return setting


# --- webhooks -------------------------------------------------------------------------------

SIGNATURE_HEADER = "X-Signature-256"


def signature(secret, body):
    """`sha256=<hex>`: HMAC-SHA256 of the raw body under the subscriber's secret (RFC 2104).
    A subscriber recomputes it over the bytes it received and compares in constant time."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class UnsafeAddress(Exception):
    """A webhook host that is, or resolves to, an address the server must not call."""


def forbidden_reason(address):
    """Why an address is off limits for webhooks, or None when it is a public one."""
    ip = ipaddress.ip_address(address.split("%")[0])    # an IPv6 zone (%eth0) says nothing
    if ip.version == 6 and ip.ipv4_mapped:              # ::ffff:127.0.0.1 is 127.0.0.1
        ip = ip.ipv4_mapped
    for reason, test in (("loopback", ip.is_loopback), ("link-local", ip.is_link_local),
                         ("private", ip.is_private), ("multicast", ip.is_multicast)):
        if test:
            return reason
    return None if ip.is_global else "reserved"


def resolve_webhook_host(host, port, allow_private):
    """The addresses to connect to for `host`, every one checked: all of them, since a client
    may use any (an attacker's name can list a public address and a private one)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as error:
        raise UnsafeAddress(f"{host} does not resolve ({error})") from None
    addresses = []
    for family, _, _, _, sockaddr in infos:
        reason = forbidden_reason(sockaddr[0])
        if reason and not allow_private:
            raise UnsafeAddress(f"{host} resolves to {sockaddr[0]}, a {reason} address "
                                f"(refused: SSRF; --allow-private-webhooks for local development)")
        addresses.append((family, sockaddr))
    return addresses


def post_webhook(url, body, headers, timeout, allow_private):
    """POST `body` to `url` and return the status; connects to the address that was checked,
    sending the name as Host (and as TLS SNI), so DNS cannot be asked twice with two answers."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    (family, sockaddr), *_ = resolve_webhook_host(parts.hostname, port, allow_private)
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(sockaddr)
        if parts.scheme == "https":
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=parts.hostname)
        conn = http.client.HTTPConnection(parts.hostname, port, timeout=timeout)
        conn.sock = sock                                  # already connected: no second lookup
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn.request("POST", target, body, headers)
        response = conn.getresponse()
        response.read(64 * 1024)                          # the answer's body is not ours to keep
        return response.status
    finally:
        sock.close()


def deliver_webhook(context, delivery):
    hook = channel_setting(context, delivery)
    body = json_body(event_body(delivery))
    headers = {"Content-Type": "application/json", "User-Agent": f"{app.name}/1.0",
               SIGNATURE_HEADER: signature(hook["secret"], body),
               "X-Event-Id": delivery["id"], "X-Delivery-Attempt": str(context.attempt)}
    settings = app.state.settings
    try:
        status = post_webhook(hook["url"], body, headers, settings.webhook_timeout,
                              settings.allow_private)
    except UnsafeAddress as error:
        raise DeliveryFailed(str(error)) from None
    except TimeoutError:
        raise DeliveryFailed(f"no answer within {settings.webhook_timeout:g} s") from None
    except (OSError, http.client.HTTPException) as error:
        raise DeliveryFailed(f"{type(error).__name__}: {error}") from None
    if not 200 <= status < 300:
        raise DeliveryFailed(f"the subscriber answered {status}", status)


CHANNEL_JOBS = {
    "inbox": JobType("notify_inbox", attempted(deliver_to_inbox), {}, "store in the inbox"),
    "live": JobType("notify_live", attempted(deliver_live), {}, "append to the live feed"),
    "webhook": JobType("notify_webhook", attempted(deliver_webhook), {}, "POST a signed event"),
}


# --- email, through level05/email_queue -------------------------------------------------------

def email_payload(db, delivery_id):
    """An email delivery's job payload: the mail as email_queue's `send_email` reads it from
    the job (From, To, subject, text), rendered when the delivery is queued."""
    row = db.query_one("SELECT e.* FROM deliveries d JOIN events e ON e.seq = d.event_seq "
                       "WHERE d.id = ?", (delivery_id,))
    with db.reading() as conn:
        address = load_preferences(conn, row["user_id"])["channels"]["email"]
    body = event_body(row)
    return {"delivery": delivery_id, "from": email_queue.app.state.mail.mail_from,
            "to": address, "reply_to": None, "template": None, "html": None,
            "subject": f"{row['type']} ({row['id']})",
            "text": f"{row['type']} for {row['user_id']} at {body['created_at']}\n\n"
                    + json.dumps(body["data"], indent=2, ensure_ascii=False) + "\n"}


def deliver_email(context, delivery):
    """Sent by email_queue's `send_email`: its SMTP path, its Message-ID fixed at enqueue time
    (so a second send after a crash can be recognised), 4xx retried, 5xx dead at once."""
    if context.payload["to"] is None:
        raise JobRefused("the user had no email address when the delivery was queued")
    email_queue.send_email(context)


def delivery_payload(db, delivery_id):
    return {"delivery": delivery_id}


class Channel(NamedTuple):
    job: JobType
    payload: Callable    # (db, delivery id) → the job's payload


CHANNEL_JOBS = {
    "inbox": Channel(JobType("notify_inbox", attempted(deliver_to_inbox), {}, "store in the inbox"),
                     delivery_payload),
    "live": Channel(JobType("notify_live", attempted(deliver_live), {}, "append to the live feed"),
                    delivery_payload),
    "webhook": Channel(JobType("notify_webhook", attempted(deliver_webhook), {},
                               "POST the signed event to the user's URL"), delivery_payload),
    "email": Channel(JobType("notify_email", attempted(deliver_email), {},
                             "mail the event through email_queue"), email_payload),
}

# =============================================================================================
# The live channel: Server-Sent Events of a user's feed, on level04's EventStream
# =============================================================================================

class LiveStream(EventStream):
    """The user's live feed after event id `cursor`, as SSE (`id:` the feed id, `data:` the
    event as a webhook receives it), for as long as the client listens; `Last-Event-ID`
    resumes after the last one it saw. A draining server ends its streams."""

    def __init__(self, db, user_id, cursor):
        super().__init__(app, cursor)
        self.db, self.user_id = db, user_id

    def pending(self):
        rows = self.db.query("SELECT f.id AS feed_id, e.* FROM live_feed f JOIN events e ON "
                             "e.seq = f.event_seq WHERE f.user_id = ? AND f.id > ? ORDER BY f.id "
                             "LIMIT 100", (self.user_id, self.cursor))
        if rows:
            self.cursor = rows[-1]["feed_id"]
        return b"".join(b"id: %d\ndata: %s\n\n" % (row["feed_id"], json_body(event_body(row)))
                        for row in rows)

    def opening(self):
        return f"retry: 1000\n: notifications of {self.user_id} after {self.cursor}\n\n".encode()


# =============================================================================================
# Validation
# =============================================================================================

NAME = r"[A-Za-z0-9][A-Za-z0-9._:@-]*"
NAME_TEXT = "must be letters, digits and . _ : @ - (starting with a letter or digit)"


class JsonObject(Field):
    """Any JSON object (the event's `data`: the producer's, passed on as it is)."""

    def shape(self):
        return {"type": "object"}

    def clean(self, value):
        if not isinstance(value, dict):
            raise Invalid("must be an object")
        return value


class WebhookUrl(Field):
    """An http(s) URL (url_shortener's `normalise_url`: IDNs, no credentials) whose host
    resolves to public addresses only, unless --allow-private-webhooks."""

    def shape(self):
        return {"type": "string", "minLength": 1, "maxLength": MAX_URL,
                "pattern": URL_SCHEMA_PATTERN,
                "description": "an absolute http(s) URL that resolves to a public address"}

    def clean(self, value):
        if not isinstance(value, str):
            raise Invalid("must be a string")
        url = normalise_url(value.strip(), None)
        parts = urlsplit(url)
        try:
            resolve_webhook_host(parts.hostname, parts.port or 80,
                                 app.state.settings.allow_private)
        except UnsafeAddress as error:
            raise Invalid(str(error)) from None
        return url


class EmailAddress(Email):
    """An address, for a server that can send mail (started with --smtp)."""

    def clean(self, value):
        if app.state.settings.smtp is None:
            raise Invalid("this server sends no email: start it with --smtp HOST:PORT")
        return super().clean(value)


NEW_EVENT = {
    "id": Text(1, 200, pattern=NAME, pattern_text=NAME_TEXT,
               description="the producer's id: the same id again is delivered once (default: "
                           "a new random id)"),
    "type": Text(1, 100, pattern=NAME, pattern_text=NAME_TEXT, required=True,
                 description="e.g. order.shipped"),
    "user_id": Text(1, 200, pattern=NAME, pattern_text=NAME_TEXT, required=True),
    "data": JsonObject(default=dict),
}
WEBHOOK = {"url": WebhookUrl(required=True),
           "secret": Text(16, 200, strip=False, required=True,
                          description="the key of X-Signature-256's HMAC (16–200 characters)")}
CHANNEL_FIELDS = {
    "inbox": Boolean(default=False), "live": Boolean(default=False),
    "webhook": ObjectOf(WEBHOOK, nullable=True, default=None),
    "email": EmailAddress(nullable=True, default=None),
}
PREFERENCES = {
    "channels": ObjectOf(CHANNEL_FIELDS, required=True,
                         description="a channel left out is off (PUT replaces)"),
    "muted_types": TextList(max_items=100, item_max=100, default=list,
                            description="event types delivered on no channel"),
}


def validate_tree(data, fields, prefix=""):
    """`validate`, descending into `ObjectOf` fields: every bad field named by its path
    (`channels.webhook.url`), all at once."""
    errors, values = {}, {}
    try:
        values = validate(data, fields)
    except ValidationFailed as failure:
        errors.update((prefix + error["field"], error["message"]) for error in failure.errors)
    for name, field in fields.items():
        if isinstance(field, ObjectOf) and isinstance(data.get(name), dict):
            try:
                values[name] = validate_tree(data[name], field.fields, f"{prefix}{name}.")
            except ValidationFailed as failure:
                errors.update((error["field"], error["message"]) for error in failure.errors)
    if errors:
        raise ValidationFailed(errors)
    return values


def user_path(user_id):
    """A user id from the path, held to the same rule as in an event (else a 400)."""
    if not (len(user_id) <= 200 and re.fullmatch(NAME, user_id)):
        raise BadRequest("bad user id in the path",
                         errors=[{"field": "user_id", "message": NAME_TEXT}])
    return user_id


# =============================================================================================
# Routes
# =============================================================================================

TIME = {"type": "string", "format": "date-time"}
EVENT_SCHEMA = {"type": "object", "required": ["id", "type", "user_id", "data", "created_at"],
                "properties": {"id": {"type": "string"}, "type": {"type": "string"},
                               "user_id": {"type": "string"}, "data": {"type": "object"},
                               "created_at": TIME}}
NOTIFICATION_SCHEMA = {"type": "object", "required": ["id", "event", "read_at", "created_at"],
                       "properties": {"id": {"type": "integer"}, "event": EVENT_SCHEMA,
                                      "read_at": nullable(TIME), "created_at": TIME}}
ATTEMPT_SCHEMA = {
    "type": "object",
    "required": ["channel", "attempt", "status", "http_status", "error", "at"],
    "properties": {"channel": {"enum": list(CHANNELS)}, "attempt": {"type": "integer"},
                   "status": {"enum": ["succeeded", "failed", "dead"]},
                   "http_status": nullable({"type": "integer"}),
                   "error": nullable({"type": "string"}), "at": TIME}}
PREFERENCES_SCHEMA = body_schema(PREFERENCES)


def page_of(item_schema):
    return {**PAGE_ANSWER, "properties": {**PAGE_ANSWER["properties"],
                                          "items": {"type": "array", "items": item_schema}}}


# One event of the live stream (OpenAPI describes an event stream's events one at a time).
LIVE_EVENT = {"type": "object", "required": ["id", "data"],
              "properties": {"id": {"type": "string", "pattern": "^[0-9]+$"},
                             "data": {"type": "string", "contentMediaType": "application/json",
                                      "contentSchema": EVENT_SCHEMA}}}
OLDEST = Sort("oldest", SortKey("id", int))
# The inbox in event order, newest first (not in the order deliveries happened to finish).
NEWEST_EVENT = Sort("newest", SortKey("seq", int, descending=True))
UNREAD = Query("unread", "true: only notifications not read yet", bool)
USER = {"user_id": {"pattern": f"^{NAME}$", "maxLength": 200}}
NO_EVENT = {404: "No event with this id"}


def load_event(event_id):
    row = app.state.db.query_one("SELECT * FROM events WHERE id = ?", (event_id,))
    if row is None:
        raise NotFound(f"no event {event_id!r}")
    return row


@app.post("/events", status=202, body_limit=64 * 1024, request_schema=body_schema(NEW_EVENT),
          response_schema=EVENT_SCHEMA,
          responses={202: "Stored; its deliveries are queued. Location: /events/{id}",
                     200: "An event with this id was stored before: that one, delivered once",
                     422: "Invalid fields"})
def create_event(request):
    """Publish an event to its user's channels (an id seen before is delivered once)"""
    values = validate(request.json_object(), NEW_EVENT)
    values.setdefault("id", "evt_" + secrets.token_hex(12))
    row, created = publish(app.state.db, values)
    if created:
        app.state.relay.wake.set()
    trace_event(f"event {row['id']} {'stored' if created else 'seen before: nothing to do'}")
    return json_response(event_body(row), 202 if created else 200,
                         {"Location": f"/events/{row['id']}"})


@app.get("/events/{event_id}", response_schema=EVENT_SCHEMA,
         responses={200: "The event", **NO_EVENT})
def read_event(request, event_id):
    """An event as it was published"""
    return event_body(load_event(event_id))


@app.get("/events/{event_id}/deliveries", query=PAGE, response_schema=page_of(ATTEMPT_SCHEMA),
         responses={200: "Every attempt, oldest first", **NO_EVENT})
def list_deliveries(request, event_id):
    """Every delivery attempt of an event: channel, attempt, status, http_status, error, at"""
    event = load_event(event_id)
    limit, cursor = list_params(request, OLDEST.shape)
    where, params = OLDEST.after(cursor) if cursor else ("1", [])
    rows = app.state.db.query(f"SELECT * FROM attempts WHERE event_seq = ? AND {where} "
                              f"ORDER BY {OLDEST.order_by} LIMIT ?",
                              [event["seq"], *params, limit + 1])
    return page(rows, limit, OLDEST.cursor_values, lambda row: {
        "channel": row["channel"], "attempt": row["attempt"], "status": row["status"],
        "http_status": row["http_status"], "error": row["error"], "at": unix_text(row["at"])})


@app.get("/users/{user_id}/preferences", path_schemas=USER, response_schema=PREFERENCES_SCHEMA,
         responses={200: "The user's channels (inbox and live until set)", 400: "A bad user id"})
def read_preferences(request, user_id):
    """A user's channels and muted event types"""
    with app.state.db.reading() as conn:
        return load_preferences(conn, user_path(user_id))


@app.put("/users/{user_id}/preferences", path_schemas=USER, blocking=True,
         request_schema=PREFERENCES_SCHEMA, response_schema=PREFERENCES_SCHEMA,
         responses={200: "Replaced", 400: "A bad user id",
                    422: "Invalid fields; a webhook URL that resolves to a loopback, private "
                         "or link-local address (SSRF); an email without --smtp"})
def replace_preferences(request, user_id):
    """Choose a user's channels (what is left out is off) and muted event types"""
    user_id = user_path(user_id)
    values = validate_tree(request.json_object(), PREFERENCES)
    app.state.db.execute("INSERT INTO preferences (user_id, preferences, updated_at) "
                         "VALUES (?, ?, ?) ON CONFLICT (user_id) DO UPDATE SET "
                         "preferences = excluded.preferences, updated_at = excluded.updated_at",
                         (user_id, json.dumps(values), time.time()))
    return values


NOTIFICATION_ROWS = ("SELECT i.id AS nid, i.read_at, i.created_at AS notified_at, e.* "
                     "FROM inbox i JOIN events e ON e.seq = i.event_seq")


def render_notification(row):
    return {"id": row["nid"], "event": event_body(row), "read_at": unix_text(row["read_at"]),
            "created_at": unix_text(row["notified_at"])}


@app.get("/users/{user_id}/notifications", path_schemas=USER, query=[*PAGE, UNREAD],
         response_schema=page_of(NOTIFICATION_SCHEMA),
         responses={200: "The inbox, newest first", 400: "A bad user id or query parameter"})
def list_notifications(request, user_id):
    """A user's inbox, newest event first (unread=true: only those not read yet)"""
    user_id = user_path(user_id)
    limit, cursor = list_params(request, NEWEST_EVENT.shape)
    where, params = NEWEST_EVENT.after(cursor) if cursor else ("1", [])
    unread = " AND read_at IS NULL" if UNREAD.read(request) else ""
    rows = app.state.db.query(
        f"SELECT * FROM (SELECT i.id, i.read_at, i.created_at AS notified_at, i.user_id AS owner, "
        f"e.seq, e.id AS event_id, e.type, e.user_id, e.data, e.created_at FROM inbox i JOIN "
        f"events e ON e.seq = i.event_seq) WHERE owner = ?{unread} AND {where} "
        f"ORDER BY {NEWEST_EVENT.order_by} LIMIT ?", [user_id, *params, limit + 1])
    return page(rows, limit, NEWEST_EVENT.cursor_values, lambda row: render_notification(
        {**row, "nid": row["id"], "id": row["event_id"]}))


@app.post("/users/{user_id}/notifications/{notification_id:int}/read", path_schemas=USER,
          response_schema=NOTIFICATION_SCHEMA,
          responses={200: "Read (reading it again keeps the first read_at)",
                     404: "No such notification for this user"})
def read_notification(request, user_id, notification_id):
    """Mark one notification read"""
    user_id = user_path(user_id)
    db = app.state.db
    marked = db.execute("UPDATE inbox SET read_at = coalesce(read_at, ?) WHERE id = ? AND "
                        "user_id = ?", (time.time(), notification_id, user_id)).rowcount
    if not marked:
        raise NotFound(f"{user_id} has no notification {notification_id}")
    return render_notification(db.query_one(f"{NOTIFICATION_ROWS} WHERE i.id = ?",
                                            (notification_id,)))


@app.post("/users/{user_id}/notifications/read-all", path_schemas=USER,
          response_schema={"type": "object", "required": ["marked"],
                           "properties": {"marked": {"type": "integer"}}},
          responses={200: "How many were unread and are read now", 400: "A bad user id"})
def read_all_notifications(request, user_id):
    """Mark every notification of a user read"""
    marked = app.state.db.execute("UPDATE inbox SET read_at = ? WHERE user_id = ? AND "
                                  "read_at IS NULL", (time.time(), user_path(user_id))).rowcount
    return {"marked": marked}


@app.get("/users/{user_id}/stream", path_schemas=USER, media_type="text/event-stream",
         response_schema=LIVE_EVENT,
         responses={200: "Server-Sent Events: id = feed id, data = the event; Last-Event-ID "
                         "resumes after it", 400: "A bad user id or Last-Event-ID"})
def live_stream(request, user_id):
    """A user's notifications as they arrive (Server-Sent Events; Last-Event-ID resumes)"""
    user_id = user_path(user_id)
    last = request.header("Last-Event-ID")
    if last is None:   # from now on
        cursor = app.state.db.query_one("SELECT coalesce(max(id), 0) FROM live_feed WHERE "
                                        "user_id = ?", (user_id,))[0]
    elif last.isascii() and last.isdigit() and len(last) < 19:
        cursor = int(last)
    else:
        raise BadRequest("Last-Event-ID must be an event id this stream sent",
                         errors=[{"field": "Last-Event-ID", "message": "is not an event id"}])
    return StreamingResponse(LiveStream(app.state.db, user_id, cursor),
                             headers={"Cache-Control": "no-store"},
                             content_type="text/event-stream")


# =============================================================================================
# Command line
# =============================================================================================

class Settings(NamedTuple):
    webhook_timeout: float
    allow_private: bool
    smtp: tuple | None


def main(argv=None):
    parser = app.arg_parser(database=True)
    add_queue_flags(parser, workers_default=2, workers_min=0)
    email_queue.add_max_attempts_flag(parser)
    parser.add_argument("--webhook-timeout-s", type=bounded(float, "seconds above 0, at most "
                                                            "300", above=0, at_most=300),
                        default=10.0, help="a webhook that has not answered by then failed its "
                                           "attempt (default 10)")
    parser.add_argument("--allow-private-webhooks", action="store_true",
                        help="let webhooks reach loopback, private and link-local addresses "
                             "(local development only: it opens the server to SSRF)")
    add_sending_flags(parser)   # without --smtp, no email channel
    args = parser.parse_args(argv)

    db = app.state.db = app.open_database(args, SCHEMA)
    app.state.settings = Settings(args.webhook_timeout_s, args.allow_private_webhooks, args.smtp)
    email_queue.app.state.mail = MailSettings(args.mail_from, args.smtp, args.smtp_timeout)
    email_queue.app.state.pacer = email_queue.Pacer(None)
    queue = Queue(db, [channel.job for channel in CHANNEL_JOBS.values()], lease_s=args.lease_s,
                  backoff_s=args.backoff_s, backoff_max_s=args.backoff_max_s)
    pool = WorkerPool(queue, args.workers, label="deliverer", poll_s=args.poll_s,
                      stop_timeout=args.stop_timeout)
    app.state.relay = Relay(queue, args.poll_s, {"max_attempts": args.max_attempts})
    app.on_listening += [app.state.relay.start, pool.start]
    app.shutdown_hooks += [pool.stop, app.state.relay.stop]   # run in reverse: the relay first
    app.run(args)


if __name__ == "__main__":
    main()
