"""Analytics event collector — Segment's HTTP Tracking API, taken in through an explicit group
commit, and counted: events per bucket, top events, unique users, funnels.

What it teaches
  - Group commit. A commit is one fsync-like append to sqlite's write-ahead log; paying it once
    per request caps ingestion at the disk's commit rate. Here every validated request puts its
    events on one bounded queue (`--queue-size` events) and waits; ONE writer thread takes
    everything waiting, commits it in a single transaction, then wakes each request, which only
    now answers 200. So an acknowledged event is durable (it survives a kill -9), many requests
    share one commit, and a crash loses only events nobody was told were stored. A full queue
    is answered 503 + Retry-After (back-pressure) instead of growing memory or dropping data.
    `--trace` shows each step: queued behind how many, which commit took it, with how many
    events from how many requests, and how long the request waited. The writer is
    level06/central_logging's `GroupCommit` (its logs are written the same way); this project
    gives it the events' insert, and its README measures group commit against a commit per
    request.
  - A real wire format kept exactly, so Segment's own SDKs work unchanged: `/v1/track`,
    `identify`, `page`, `screen`, `group`, `alias` and `/v1/batch`; the write key as the HTTP
    Basic username (RFC 7617) with an empty password; 32 KB an event and 500 KB a batch;
    `messageId` de-duplicating retries (a UNIQUE column: a retry, even concurrent with the
    first try, is stored once); and Segment's clock-skew correction, since a device's clock is
    not to be trusted: timestamp = receivedAt − (sentAt − timestamp), both read off the device.
  - Queries over what was stored: counts per minute/hour/day, top events, distinct users, and
    funnels (users who did a, then b, then c, all within a window of the first step).

Left out: gzip request bodies, the write key in the body instead of Basic, OAuth tokens,
destinations (forwarding events to other tools), Protocols (event schemas), identity merging
through `alias`, and a columnar store. analytics_collector.md's "In production" says who does
those.

    python level07/analytics_collector.py [--write-key K]... [--read-key K] [--queue-size N]
"""
import base64
import binascii
import datetime
import json
import re
import sys
import uuid
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any folder

from lib import (App, BadRequest, ContentTooLarge, Forbidden, Unauthorized, UnsupportedMediaType,
                 trace_event)
from lib.app import bounded
from lib.request import Query, bad_query
from level03.jwt_auth import SECRETS_SCHEMA, bearer_token
from level04.feature_flags import is_token
from level06.central_logging import GroupCommit, parse_ts, utc_text
from level07.audit_log import kept_secret

app = App("analytics_collector", "Segment-compatible event collection (track, identify, page, "
          "screen, group, alias, batch) committed in groups, with counts, top events, unique "
          "users and funnels.", port=8026)

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id           INTEGER PRIMARY KEY,
    message_id   TEXT NOT NULL UNIQUE,   -- Segment's de-duplication key
    type         TEXT NOT NULL,          -- track, identify, page, screen, group, alias
    event        TEXT,                   -- a track's event name
    person       TEXT NOT NULL,          -- userId, else anonymousId: who counts as a user
    ts           TEXT NOT NULL,          -- the corrected timestamp, YYYY-MM-DDTHH:MM:SS.mmmZ
    received_at  TEXT NOT NULL,
    body         TEXT NOT NULL           -- the event as sent (JSON), members we do not use too
);
CREATE INDEX IF NOT EXISTS events_by_ts ON events (ts);
CREATE INDEX IF NOT EXISTS events_by_name ON events (event, ts) WHERE event IS NOT NULL;
""" + SECRETS_SCHEMA

# =============================================================================================
# Events: Segment's shapes, limits and clock-skew correction
# =============================================================================================

MAX_EVENT = 32 * 1024      # Segment: 32 KB a call, and a batch's each event
MAX_BATCH = 500 * 1024     # Segment: 500 KB a batch
TYPES = ("track", "identify", "page", "screen", "group", "alias")
REQUIRED = {"track": "event", "group": "groupId", "alias": "previousId"}  # besides an identity
INSERT = ("INSERT OR IGNORE INTO events (message_id, type, event, person, ts, received_at, body) "
          "VALUES (?, ?, ?, ?, ?, ?, ?)")


def parse_time(value):
    """An ISO 8601 / RFC 3339 time as an aware datetime, or None."""
    ts = parse_ts(value)
    return None if ts is None else datetime.datetime.fromisoformat(ts.replace("Z", "+00:00"))


def identity(value):
    """userId / anonymousId as Segment's SDKs send them: a string, or a number they stringify."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return None
    text = str(value)
    return text if 0 < len(text) <= 256 else None


class Arrival(NamedTuple):
    """What the server knows of a call as it arrives: when (as a datetime and as stored), and
    the batch's own `sentAt`, if any."""
    at: datetime.datetime
    text: str
    sent_at: datetime.datetime | None


def event_row(data, text, kind, arrival, where):
    """One event (`text`: its JSON) as a row for INSERT, or a list of {"field", "message"}
    naming what is wrong. `kind` is the route's type (None in a batch: each says its own)."""
    if not isinstance(data, dict):
        return [{"field": where or "body", "message": "must be a JSON object"}]
    prefix = f"{where}." if where else ""
    errors = []
    kind = kind or data.get("type")
    if kind not in TYPES:
        errors.append({"field": f"{prefix}type", "message": f"must be one of {', '.join(TYPES)}"})
    user_id, anonymous_id = identity(data.get("userId")), identity(data.get("anonymousId"))
    if user_id is None and anonymous_id is None:
        errors.append({"field": f"{prefix}userId", "message": "userId or anonymousId is required "
                                                               "(a string of 1–256 characters)"})
    needed = REQUIRED.get(kind)
    if needed and not (isinstance(data.get(needed), str) and data[needed]):
        errors.append({"field": f"{prefix}{needed}", "message": f"a {kind} needs {needed}"})
    message_id = data.get("messageId")
    if message_id is not None and not (isinstance(message_id, str) and 0 < len(message_id) <= 256):
        errors.append({"field": f"{prefix}messageId", "message": "must be a string of 1–256 "
                                                                 "characters"})
    times = {}
    for name in ("timestamp", "sentAt"):
        if data.get(name) is None:
            continue
        times[name] = parse_time(data[name])
        if times[name] is None:
            errors.append({"field": f"{prefix}{name}", "message": "must be an ISO 8601 time like "
                                                                  "2026-12-06T10:00:00.000Z"})
    if errors:
        return errors
    timestamp = times.get("timestamp")
    ts = arrival.text if timestamp is None else utc_text(
        corrected_time(timestamp, times.get("sentAt") or arrival.sent_at, arrival.at))
    return (message_id or str(uuid.uuid4()), kind, data.get("event") if kind == "track" else None,
            user_id or anonymous_id, ts, arrival.text, text)


def corrected_time(timestamp, sent_at, received):
    """Segment's clock-skew correction: the device's clock may be off by any amount, but the
    time between the event and its sending (sentAt − timestamp) is measured on that one clock,
    so it holds; laid back from when the server received it, it gives the event's real time.
    Without sentAt the timestamp is taken as it is (without a timestamp, the event is stored at
    receivedAt)."""
    if sent_at is None:
        return timestamp
    return received - (sent_at - timestamp)


def rows_of(body, kind, received):
    """The rows of a /v1/<kind> call (kind None: /v1/batch); BadRequest naming every bad event,
    ContentTooLarge naming an event over 32 KB. All or nothing: one bad event refuses them all."""
    if kind is None:
        if not isinstance(body, dict) or not isinstance(body.get("batch"), list):
            raise BadRequest('a batch is {"batch": [event, …]}',
                             errors=[{"field": "batch", "message": "must be a list of events"}])
        events = body["batch"]
        sent_at = parse_time(body.get("sentAt"))
    else:
        events, sent_at = [body], None
    arrival = Arrival(received, utc_text(received), sent_at)
    rows, errors = [], []
    for index, data in enumerate(events):
        where = f"batch[{index}]" if kind is None else ""
        text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
        if kind is None and len(text.encode()) > MAX_EVENT:
            raise ContentTooLarge(f"{where} is over {MAX_EVENT // 1024} KB, Segment's limit for "
                                  "one event")
        result = event_row(data, text, kind, arrival, where)
        if isinstance(result, list):
            errors += result
        else:
            rows.append(result)
    if errors:
        raise BadRequest("the request has invalid events: none of them was stored", errors=errors)
    return rows


# =============================================================================================
# Group commit: level06/central_logging's GroupCommit, with the events' insert
# =============================================================================================

def insert_events(conn, rows):
    """One request's rows, inside the group's transaction; how many were new (a messageId
    already stored is ignored, so a retry is stored once)."""
    return conn.executemany(INSERT, rows).rowcount


# =============================================================================================
# Credentials: write keys (Basic username), the read key (Bearer)
# =============================================================================================

def basic_username(request):
    """The username of `Authorization: Basic base64(user:password)` (RFC 7617), or None."""
    scheme, _, encoded = (request.headers.get("authorization") or "").strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return decoded.partition(":")[0]


def is_write_key(key):
    # Every key is compared (a list, not a short-circuit), so the time taken tells nothing of
    # which key came close.
    return key is not None and any([is_token(key, known) for known in app.state.write_keys])


def require_write_key(request):
    key = basic_username(request)
    if not is_write_key(key):
        raise Unauthorized("send a write key as the Basic username, with an empty password "
                           "(curl -u KEY:)" if key is None else "the write key is not valid here",
                           www_authenticate='Basic realm="analytics", charset="UTF-8"')


def require_read_key(request):
    token = bearer_token(request)
    if is_write_key(token) or is_write_key(basic_username(request)):
        raise Forbidden("a write key sends events; the stats need the read key")
    if not token or not is_token(token, app.state.read_key):
        raise Unauthorized("send the read key: Authorization: Bearer <read key>",
                           www_authenticate='Bearer realm="analytics stats"')


# =============================================================================================
# Ingestion routes
# =============================================================================================

SUCCESS = {"type": "object", "required": ["success"], "properties": {"success": {"const": True}}}
EVENT_SCHEMA = {"type": "object", "properties": {
    "userId": {"type": ["string", "number"]}, "anonymousId": {"type": ["string", "number"]},
    "messageId": {"type": "string"}, "timestamp": {"type": "string"},
    "sentAt": {"type": "string"}, "event": {"type": "string"}, "properties": {"type": "object"},
    "traits": {"type": "object"}, "context": {"type": "object"}}}
INGEST_RESPONSES = {200: "Stored durably: committed before this answer",
                    400: "Not JSON, or an invalid event (named): nothing of the call is stored",
                    401: "No write key, or a wrong one", 413: "Over Segment's size limit",
                    415: "Not application/json",
                    503: "The queue is full: retry after Retry-After"}


def ingest(request, kind):
    require_write_key(request)
    # text/plain too: a browser's sendBeacon cannot set application/json without a preflight.
    if request.content_type not in ("application/json", "text/plain"):
        raise UnsupportedMediaType("send the events as application/json")
    received = datetime.datetime.now(datetime.timezone.utc)
    rows = rows_of(request.json(), kind, received)
    trace_event(f"{len(rows)} valid events, received {utc_text(received)}")
    stored = request.app.state.writer.submit(rows)
    trace_event(f"{stored} of these {len(rows)} new, {len(rows) - stored} already stored "
                f"(messageId)")
    return {"success": True}


def ingestion_route(kind):
    def handler(request):
        return ingest(request, kind)

    handler.__name__ = f"ingest_{kind}"
    handler.__doc__ = f"Record a {kind} call (Segment's /v1/{kind})"
    app.post(f"/v1/{kind}", body_limit=MAX_EVENT, blocking=True, request_schema=EVENT_SCHEMA,
             responses=INGEST_RESPONSES, response_schema=SUCCESS)(handler)


for _kind in TYPES:
    ingestion_route(_kind)


@app.post("/v1/batch", body_limit=MAX_BATCH, blocking=True, responses=INGEST_RESPONSES,
          request_schema={"type": "object", "required": ["batch"], "properties": {
              "batch": {"type": "array", "items": {**EVENT_SCHEMA, "required": ["type"]}},
              "sentAt": {"type": "string"}}},
          response_schema=SUCCESS)
def ingest_batch(request):
    """Record many calls of any type at once (Segment's /v1/batch), all or none"""
    return ingest(request, None)


# =============================================================================================
# Queries
# =============================================================================================

INTERVALS = {"minute": (16, ":00Z"), "hour": (13, ":00:00Z"), "day": (10, "T00:00:00Z")}
WITHIN = re.compile(r"^([1-9][0-9]{0,5})([mhd])$")
UNITS = {"m": 60, "h": 3600, "d": 86400}
RANGE = [Query("from", "events at or after this RFC 3339 time", {"format": "date-time"}),
         Query("to", "events before this RFC 3339 time", {"format": "date-time"})]
LIMIT = Query("limit", "how many (1–100, default 20)", int, 20, 1, 100)
STEPS = re.compile(r"^[^,]+(?:,[^,]+){1,9}$")
STATS_RESPONSES = {400: "A bad parameter (named)", 401: "No read key, or a wrong one",
                   403: "A write key: it cannot read"}


def time_range(request):
    """The `from`/`to` parameters as SQL conditions on `ts` (none given: all time)."""
    conditions, params = [], []
    for name, operator in (("from", ">="), ("to", "<")):
        if text := request.query_param(name):
            if (ts := parse_ts(text)) is None:
                raise bad_query(name, "must be an RFC 3339 time like 2026-12-06T10:00:00Z")
            conditions.append(f"ts {operator} ?")
            params.append(ts)
    return conditions, params


def where(conditions):
    return f"WHERE {' AND '.join(conditions)}" if conditions else ""


@app.get("/stats/events", query=[Query("event", "only this track event (all events if left out)"),
                                 *RANGE, Query("interval", "bucket size (default hour)",
                                               tuple(INTERVALS))],
         responses={200: "Events per bucket, oldest first", **STATS_RESPONSES},
         response_schema={"type": "object", "required": ["buckets"]})
def count_events(request):
    """How many events per minute, hour or day"""
    require_read_key(request)
    length, suffix = INTERVALS[request.query_choice("interval", tuple(INTERVALS), "hour")]
    conditions, params = time_range(request)
    if event := request.query_param("event"):
        conditions.append("event = ?")
        params.append(event)
    rows = request.app.state.db.query(
        f"SELECT substr(ts, 1, {length}) || '{suffix}' AS start, count(*) AS count FROM events "
        f"{where(conditions)} GROUP BY start ORDER BY start", params)
    return {"buckets": [{"start": row["start"], "count": row["count"]} for row in rows]}


@app.get("/stats/top", query=[*RANGE, LIMIT],
         responses={200: "Track events by how often they happened, most first",
                    **STATS_RESPONSES},
         response_schema={"type": "object", "required": ["items"]})
def top_events(request):
    """The most frequent track events"""
    require_read_key(request)
    limit = LIMIT.read(request)
    conditions, params = time_range(request)
    rows = request.app.state.db.query(
        f"SELECT event, count(*) AS count FROM events {where(['event IS NOT NULL', *conditions])}"
        f" GROUP BY event ORDER BY count DESC, event LIMIT ?", (*params, limit))
    return {"items": [{"event": row["event"], "count": row["count"]} for row in rows]}


@app.get("/stats/users", query=RANGE,
         responses={200: "Distinct users (userId, else anonymousId)", **STATS_RESPONSES},
         response_schema={"type": "object", "required": ["users"]})
def unique_users(request):
    """How many distinct users sent events"""
    require_read_key(request)
    conditions, params = time_range(request)
    row = request.app.state.db.query_one(
        f"SELECT count(DISTINCT person) AS users FROM events {where(conditions)}", params)
    return {"users": row["users"]}


def funnel_depth(times, steps, window):
    """How many steps one user went through: each step's event after the one before, all
    within `window` of the first. `times` maps an event name to its sorted datetimes. Every
    time the first step happened is tried as a start, and the deepest run counts."""
    best = 0
    for start in times.get(steps[0], ()):
        depth, at = 1, start
        for step in steps[1:]:
            at = next((t for t in times.get(step, ()) if at <= t <= start + window), None)
            if at is None:
                break
            depth += 1
        best = max(best, depth)
        if best == len(steps):
            break
    return best


@app.get("/stats/funnel", query=[
    Query("steps", "2–10 track event names, comma-separated, in order (required)",
          {"pattern": STEPS.pattern}),
    Query("within", "all steps within this of the first: N then m, h or d (default 1d)",
          {"pattern": WITHIN.pattern}), *RANGE],
         responses={200: "Users reaching each step, and their share of the first step's",
                    **STATS_RESPONSES},
         response_schema={"type": "object", "required": ["steps"]})
def funnel(request):
    """How many users went through the steps in order"""
    require_read_key(request)
    if not STEPS.fullmatch(request.query_param("steps") or ""):
        raise bad_query("steps", "must be 2–10 event names, comma-separated")
    steps = request.query_param("steps").split(",")
    match = WITHIN.fullmatch(request.query_param("within") or "1d")
    if match is None:
        raise bad_query("within", "must be a number then m, h or d, like 30m or 1d")
    window = datetime.timedelta(seconds=int(match.group(1)) * UNITS[match.group(2)])
    conditions, params = time_range(request)
    conditions.append(f"event IN ({', '.join('?' * len(set(steps)))})")
    params += sorted(set(steps))
    people = {}
    for row in request.app.state.db.query(
            f"SELECT person, event, ts FROM events {where(conditions)} ORDER BY ts", params):
        people.setdefault(row["person"], {}).setdefault(row["event"], []).append(
            parse_time(row["ts"]))
    reached = [0] * len(steps)
    for times in people.values():
        for index in range(funnel_depth(times, steps, window)):
            reached[index] += 1
    return {"steps": [{"event": step, "users": users,
                       "conversion": round(users / reached[0], 4) if reached[0] else 0.0}
                      for step, users in zip(steps, reached)]}


# =============================================================================================
# Running
# =============================================================================================

def key_flag(text):
    if not 8 <= len(text) <= 200 or not text.isascii() or not text.isprintable() \
            or " " in text or ":" in text:
        raise ValueError
    return text


def main(argv=None):
    parser = app.arg_parser(database=True)
    parser.add_argument("--write-key", type=key_flag, action="append",
                        help="a key clients send events with (HTTP Basic username), 8–200 "
                             "printable ASCII without ':' or spaces; repeatable (default: one "
                             "made once and kept in the database)")
    parser.add_argument("--read-key", type=key_flag,
                        help="the Bearer key for /stats/* (default: one made once and kept in "
                             "the database)")
    parser.add_argument("--queue-size", type=bounded(int, "a number of events (1–10,000,000)",
                                                     at_least=1, at_most=10_000_000),
                        default=100_000, help="events waiting for the writer before ingestion "
                                              "answers 503 (default 100,000)")
    parser.add_argument("--group-events", type=bounded(int, "a number of events (1–1,000,000)",
                                                       at_least=1, at_most=1_000_000),
                        default=50_000, help="events in one commit at most (whole requests; "
                                             "1 commits each request on its own, to compare; "
                                             "default 50,000)")
    args = parser.parse_args(argv)
    db = app.state.db = app.open_database(args, SCHEMA)
    app.state.write_keys = args.write_key or [kept_secret(db, "write_key", None, "--write-key")]
    app.state.read_key = args.read_key or kept_secret(db, "read_key", None, "--read-key")
    if app.state.read_key in app.state.write_keys:
        parser.error("--read-key must differ from every --write-key")
    writer = app.state.writer = GroupCommit(db, insert_events, args.queue_size,
                                            args.group_events, noun="events")
    app.shutdown_hooks.append(writer.stop)   # hooks run last first: before the database closes
    app.run(args)


if __name__ == "__main__":
    main()
