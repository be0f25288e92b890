"""Central logging — every service's logs in one place: taken over HTTP, syslog and Loki's push
API, written by one batching writer, searched, tailed live, counted, and expired.

What it teaches
  - Many ways in, one record: `{"ts", "service", "level", "message", "fields", "trace_id"}`.
    HTTP JSON or NDJSON (per-line errors: the good lines are kept), syslog as RFC 5424 and the
    older RFC 3164 over UDP and TCP (so Python's `SysLogHandler` and the `logger` command ship
    here unchanged), and Grafana Loki's push format (so Loki clients do).
  - One writer, in batches (`GroupCommit`): ingestion hands its records to a bounded queue and
    the writer thread commits everything waiting in one transaction. An HTTP ingestion is
    answered only after its records' commit, so what was acknowledged survives a kill -9; when
    the writer falls behind, ingestion answers 503 with Retry-After instead of queueing without
    bound (back-pressure). UDP has no way to push back: a datagram that finds the queue full is
    dropped, and counted. level07/analytics_collector imports this writer and teaches group
    commit on it, measured both ways.
  - Syslog's wire formats, parsed by hand as pure functions of bytes: the PRI (facility and
    severity), RFC 5424's header and structured data, RFC 3164's timestamp and TAG, and TCP's two
    framings (RFC 6587: octet counting, or a line ending at LF or NUL).
  - Levels as an ordered scale (syslog's eight severities), so `level=warning` means "warning or
    worse", with the usual aliases (`warn`, `err`, `crit`, `fatal`, `emerg`).
  - Search with sqlite FTS5 over the messages, through search_api's query language (no input
    ever reaches FTS5 as syntax); a live tail over Server-Sent Events; per-minute counts;
    retention that deletes old records in small batches, so it never holds the writer long.

Left out: labels as an index (Loki) or inverted indexes over every field (Elasticsearch),
compression and object storage, protobuf+snappy pushes, TLS syslog (RFC 5425), alerting.
central_logging.md's "In production" says who does those.

    python level06/central_logging.py [--syslog-port 5514] [--retention-days 7] [--db PATH]
"""
import codecs
import collections
import datetime
import json
import re
import socket
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any folder

from lib import (App, BadRequest, ServiceUnavailable, UnsupportedMediaType, ValidationFailed,
                 no_content, trace_event)
from lib.app import bounded, port_number
from lib.listing import list_params, page
from lib.request import Query, bad_query
from lib.response import StreamingResponse
from lib.routing import PAGE
from lib.runner import bind
from lib.storage import StorageFull
from lib.validation import Field, Invalid, Text, body_schema, validate
from level04.feature_flags import EventStream
from level04.search_api import RFC3339_TIME, parse_query

app = App("central_logging", "Logs from every service in one place: HTTP, syslog and Loki "
          "ingestion, search, a live tail, per-minute counts and retention.", port=8023)

SCHEMA = """
CREATE TABLE IF NOT EXISTS logs (
    id       INTEGER PRIMARY KEY,
    ts       TEXT NOT NULL,            -- UTC, YYYY-MM-DDTHH:MM:SS.mmmZ: sorts as it reads
    service  TEXT NOT NULL,
    severity INTEGER NOT NULL,         -- syslog's: 0 emergency … 7 debug
    message  TEXT NOT NULL,
    fields   TEXT,                     -- a JSON object, or NULL
    trace_id TEXT
);
CREATE INDEX IF NOT EXISTS logs_by_service ON logs (service, id);
CREATE INDEX IF NOT EXISTS logs_by_ts ON logs (ts);
CREATE INDEX IF NOT EXISTS logs_by_trace ON logs (trace_id) WHERE trace_id IS NOT NULL;
CREATE VIRTUAL TABLE IF NOT EXISTS logs_text
    USING fts5(message, content='logs', content_rowid='id');   -- the index only: text in logs
CREATE TRIGGER IF NOT EXISTS logs_text_insert AFTER INSERT ON logs BEGIN
    INSERT INTO logs_text (rowid, message) VALUES (new.id, new.message);
END;
CREATE TRIGGER IF NOT EXISTS logs_text_delete AFTER DELETE ON logs BEGIN
    INSERT INTO logs_text (logs_text, rowid, message) VALUES ('delete', old.id, old.message);
END;
"""

# =============================================================================================
# Levels and records
# =============================================================================================

LEVELS = ("emergency", "alert", "critical", "error", "warning", "notice", "info", "debug")
SEVERITY = {name: number for number, name in enumerate(LEVELS)}   # syslog's numbers
SEVERITY |= {"emerg": 0, "crit": 2, "fatal": 2, "err": 3, "warn": 4}
SERVICE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,99}")
MAX_MESSAGE = 64 * 1024
MAX_FIELDS = 16 * 1024       # bytes of a record's fields, as JSON


class Record(NamedTuple):
    ts: str
    service: str
    severity: int
    message: str
    fields: str | None        # JSON
    trace_id: str | None


def severity_of(level):
    """A level's severity (any case, aliases too), or None."""
    return SEVERITY.get(level.lower()) if isinstance(level, str) else None


def utc_text(moment):
    return moment.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def parse_ts(text):
    """An RFC 3339 time → the stored form (UTC, milliseconds), or None."""
    if not isinstance(text, str) or not RFC3339_TIME.fullmatch(text):
        return None
    try:
        return utc_text(datetime.datetime.fromisoformat(text.upper().replace("Z", "+00:00")
                                                        .replace(" ", "T")))
    except ValueError:   # 2026-02-30, a leap second's :60
        return None


def now_ts():
    return utc_text(datetime.datetime.now(datetime.timezone.utc))


class Timestamp(Field):
    def shape(self):
        return {"type": "string", "format": "date-time"}

    def clean(self, value):
        if (ts := parse_ts(value)) is None:
            raise Invalid("must be an RFC 3339 time like 2026-03-01T09:30:00.250Z")
        return ts


class Level(Field):
    def shape(self):
        return {"type": "string", "enum": sorted(SEVERITY)}

    def clean(self, value):
        if (severity := severity_of(value)) is None:
            raise Invalid(f"must be one of {', '.join(LEVELS)} (any case; warn, err, crit, "
                          f"fatal, emerg too)")
        return severity


class Fields(Field):
    def shape(self):
        return {"type": "object"}

    def clean(self, value):
        if not isinstance(value, dict):
            raise Invalid("must be an object")
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        if len(text.encode()) > MAX_FIELDS:
            raise Invalid(f"must be at most {MAX_FIELDS} bytes as JSON")
        return text


RECORD = {"ts": Timestamp(required=True),
          "service": Text(1, 100, pattern=SERVICE.pattern, required=True,
                          description="letters, digits and . _ / -"),
          "level": Level(required=True),
          "message": Text(0, MAX_MESSAGE, strip=False, required=True),
          "fields": Fields(),
          "trace_id": Text(1, 128, description="the request's trace id, to follow it across "
                                               "services")}


def record_from(data):
    """A validated Record from a JSON object (ValidationFailed naming each bad field)."""
    if not isinstance(data, dict):
        raise ValidationFailed({"record": "must be a JSON object"})
    values = validate(data, RECORD)
    return Record(values["ts"], values["service"], values["level"], values["message"],
                  values.get("fields"), values.get("trace_id"))


def render(row):
    return {"id": row["id"], "ts": row["ts"], "service": row["service"],
            "level": LEVELS[row["severity"]], "message": row["message"],
            "fields": json.loads(row["fields"]) if row["fields"] else {},
            "trace_id": row["trace_id"]}


# =============================================================================================
# The writer: group commit (one thread, a bounded queue, answers after the commit)
# =============================================================================================

class Ticket(threading.Event):
    """What a `submit` waits on: set when its rows' commit is done (or failed), with which
    commit it was, for the trace."""
    failed = False
    commit = rows = requests = stored = 0
    commit_ms = 0.0


class GroupCommit:
    """The one writer. `submit(rows)` from any thread queues the rows and waits until the writer
    has committed them, with everything else that was waiting, in one transaction: an answer
    sent after it means stored. `offer(row)` queues one row without waiting (syslog over UDP:
    nobody to answer). `insert(conn, rows)` stores one submission's rows inside that
    transaction and returns how many it stored. At most `capacity` rows wait: one more and
    `submit` refuses (503), `offer` drops it and counts it, so a burst costs bounded memory.
    `noun` names the rows in messages. level07/analytics_collector teaches group commit on this
    class, and measures it."""

    def __init__(self, db, insert, capacity, max_group=50_000, noun="rows"):
        self.db, self.insert, self.noun = db, insert, noun
        self.capacity = capacity
        self.max_group = max_group      # rows in one transaction at most: bounds its time
        self.waiting = collections.deque()   # (rows, ticket or None), in arrival order
        self.queued = 0                 # rows in `waiting`
        self.commits = self.dropped = 0
        self.stopping = False
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._write, name="group-commit", daemon=True)
        self.thread.start()

    def _queue(self, rows, ticket):
        """Queue `rows` if all of them fit (the caller holds `changed`); whether they did."""
        if self.stopping or self.queued + len(rows) > self.capacity:
            return False
        self.waiting.append((rows, ticket))
        self.queued += len(rows)
        self.changed.notify()
        return True

    def submit(self, rows, timeout=30.0):
        """Store `rows`, returning once they are committed: how many `insert` stored."""
        if not rows:
            return 0
        ticket = Ticket()
        with self.changed:
            ahead = self.queued
            if not self._queue(rows, ticket):
                trace_event(f"queue full: {ahead} of {self.capacity} {self.noun} waiting → 503")
                raise ServiceUnavailable(f"the writer is {ahead} {self.noun} behind; retry "
                                         "shortly", retry_after=1)
        trace_event(f"{len(rows)} {self.noun} queued, {ahead} waiting ahead of them")
        waited = time.perf_counter()
        if not ticket.wait(timeout):
            # Still queued: they may yet commit, so "not stored" would be a lie.
            raise ServiceUnavailable(f"the writer did not commit in time (the {self.noun} may "
                                     "still be stored); retry shortly", retry_after=1)
        if ticket.failed:
            raise StorageFull(f"the {self.noun} could not be stored (the server's disk is full "
                              "or failing); none of them was kept, retry later")
        trace_event(f"durable: group commit #{ticket.commit} took {ticket.rows} {self.noun} "
                    f"from {ticket.requests} requests in one transaction "
                    f"({ticket.commit_ms:.2f} ms); waited "
                    f"{(time.perf_counter() - waited) * 1000:.2f} ms")
        return ticket.stored

    def offer(self, row):
        """Queue one row without waiting for it; a full queue drops it (counted in `dropped`)."""
        with self.changed:
            if not self._queue([row], None):
                self.dropped += 1

    def _take(self):
        """Everything waiting (whole submissions, up to `max_group` rows), once there is any."""
        with self.changed:
            while not self.waiting and not self.stopping:
                self.changed.wait()
            group, count = [], 0
            while self.waiting and (not group or count + len(self.waiting[0][0]) <= self.max_group):
                rows, ticket = self.waiting.popleft()
                group.append((rows, ticket))
                count += len(rows)
            return group, count

    def _write(self):
        while True:
            group, count = self._take()
            if not group:   # stopping, and nothing left
                return
            started = time.perf_counter()
            stored, failed = [0] * len(group), False
            try:
                with self.db.transaction() as conn:
                    stored = [self.insert(conn, rows) for rows, _ in group]
            except Exception as error:  # the disk: those waiting hear of it, the writer goes on
                sys.stderr.write(f"error: {count} {self.noun} not stored: {error!r}\n")
                failed = True
            elapsed = (time.perf_counter() - started) * 1000
            with self.changed:
                self.queued -= count
                self.commits += 1
                number = self.commits
            for (_, ticket), new in zip(group, stored):
                if ticket is not None:   # None: offered, nobody waits
                    ticket.failed, ticket.commit, ticket.commit_ms = failed, number, elapsed
                    ticket.rows, ticket.requests, ticket.stored = count, len(group), new
                    ticket.set()

    def stop(self):
        """Commit what is queued, then end the writer (at shutdown, before the database
        closes)."""
        with self.changed:
            self.stopping = True
            self.changed.notify()
        self.thread.join(timeout=30)


INSERT_RECORD = ("INSERT INTO logs (ts, service, severity, message, fields, trace_id) "
                 "VALUES (?, ?, ?, ?, ?, ?)")


def insert_records(conn, records):
    conn.executemany(INSERT_RECORD, records)
    return len(records)


# =============================================================================================
# Syslog: RFC 5424 and RFC 3164, as pure functions of bytes
# =============================================================================================

SYSLOG_PORT = 5514   # 514 is syslog's own, which needs root
PRI = re.compile(rb"<([0-9]{1,3})>")
RFC5424 = re.compile(r"1 (\S+) (\S+) (\S+) (\S+) (\S+) (-|(?:\[(?:[^]\\]|\\.)*\])+) ?(.*)", re.S)
SD_ELEMENT = re.compile(r'\[([^ \]]+)((?: [^ =\]]+="(?:[^"\\]|\\.)*")*)\]')
SD_PARAM = re.compile(r' ([^ =\]]+)="((?:[^"\\]|\\.)*)"')
RFC3164_TIME = re.compile(r"([A-Z][a-z]{2}) ( ?[0-9]{1,2}) ([0-9]{2}:[0-9]{2}:[0-9]{2}) ")
TAG = re.compile(r"([A-Za-z0-9._/-]{1,48})(?:\[[^\]]*\])?: ?")
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def parse_syslog(data, received=None):
    """One syslog message (bytes) as a Record, or None when it has no valid PRI. RFC 5424 when
    its version is 1, else RFC 3164 as far as it goes (a sender may leave out the timestamp and
    host, as Python's SysLogHandler does): what is missing is filled in, never refused."""
    match = PRI.match(data)
    if not match or int(match.group(1)) > 191:
        return None
    severity = int(match.group(1)) % 8
    text = data[match.end():].decode("utf-8", "replace").rstrip("\x00\r\n")
    text = text.removeprefix("\ufeff")
    received = received or now_ts()
    if (header := RFC5424.fullmatch(text)) is not None:
        stamp, host, app_name, proc_id, msg_id, structured, message = header.groups()
        fields = {name: value for name, value in (("host", host), ("procid", proc_id),
                                                  ("msgid", msg_id)) if value != "-"}
        for sd_id, params in SD_ELEMENT.findall(structured):
            fields[sd_id] = {name: re.sub(r"\\(.)", r"\1", value)
                             for name, value in SD_PARAM.findall(params)}
        return Record(parse_ts(stamp) or received, app_name if app_name != "-" else "syslog",
                      severity, message.removeprefix("\ufeff"), json.dumps(fields) or None, None)
    fields, ts = {}, received
    if (stamp := RFC3164_TIME.match(text)) is not None:
        ts = bsd_time(*stamp.groups()) or received
        text = text[stamp.end():]
        host, _, rest = text.partition(" ")
        if rest:
            fields["host"], text = host, rest
    service = "syslog"
    if (tag := TAG.match(text)) is not None:
        service, text = tag.group(1), text[tag.end():]
    return Record(ts, service, severity, text, json.dumps(fields) if fields else None, None)


def bsd_time(month, day, clock):
    """RFC 3164's `Mmm dd hh:mm:ss`, which has no year: this year's, or last year's when that
    would be in the future (a message from December read in January)."""
    if month not in MONTHS:
        return None
    now = datetime.datetime.now(datetime.timezone.utc)
    try:
        moment = datetime.datetime.strptime(f"{now.year} {month} {day.strip()} {clock}",
                                            "%Y %b %d %H:%M:%S")
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    except ValueError:
        return None
    if moment > now + datetime.timedelta(days=1):
        moment = moment.replace(year=now.year - 1)
    return utc_text(moment)


class SyslogFramer:
    """Splits a TCP syslog stream into messages (RFC 6587): octet counting (`123 <14>1 …`),
    or non-transparent framing, each message ending at LF or NUL. Bytes in, messages out."""

    MAX_MESSAGE = 64 * 1024

    def __init__(self):
        self.buffer = bytearray()

    def feed(self, data):
        self.buffer += data
        messages = []
        while self.buffer:
            count = re.match(rb"([1-9][0-9]{0,5}) ", self.buffer)
            if count:  # octet counting
                end = count.end() + int(count.group(1))
                if len(self.buffer) < end:
                    break
                messages.append(bytes(self.buffer[count.end():end]))
                del self.buffer[:end]
                continue
            ends = [at for at in (self.buffer.find(b"\n"), self.buffer.find(b"\x00")) if at >= 0]
            if not ends:
                if len(self.buffer) > self.MAX_MESSAGE:  # no framing at all: cut it
                    messages.append(bytes(self.buffer))
                    self.buffer.clear()
                break
            end = min(ends)
            if end:
                messages.append(bytes(self.buffer[:end]))
            del self.buffer[:end + 1]
        return messages


class SyslogServer:
    """Syslog on one port, UDP and TCP: a thread reads datagrams, a thread per TCP sender reads
    its stream. Each message goes to the writer; a TCP sender waits when the writer is behind
    (TCP pushes back), a UDP one cannot (its datagram is dropped, and counted)."""

    def __init__(self, host, port, writer):
        self.writer = writer
        self.tcp, self.udp = bind_both(host, port)
        self.threads = []

    def start(self):
        host, port = self.tcp.getsockname()[:2]
        sys.stdout.write(f"syslog on udp+tcp://{host}:{port}\n")
        sys.stdout.flush()
        for target in (self._read_datagrams, self._accept):
            thread = threading.Thread(target=target, daemon=True, name=target.__name__)
            thread.start()
            self.threads.append(thread)

    def _read_datagrams(self):
        while True:
            try:
                data = self.udp.recv(65535)
            except OSError:   # closed at shutdown
                return
            if record := parse_syslog(data):
                self.writer.offer(record)

    def _accept(self):
        while True:
            try:
                conn, _ = self.tcp.accept()
            except OSError:
                return
            threading.Thread(target=self._read_stream, args=(conn,), daemon=True).start()

    def _read_stream(self, conn):
        framer = SyslogFramer()
        with conn:
            while data := conn.recv(65536):
                records = [r for r in map(parse_syslog, framer.feed(data)) if r]
                while records:
                    try:
                        self.writer.submit(records)
                        break
                    except ServiceUnavailable:   # behind: stop reading, so TCP pushes back
                        time.sleep(0.05)

    def stop(self):
        for sock in (self.tcp, self.udp):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


def bind_both(host, port):
    """A TCP and a UDP socket on the same port (with port 0, the one TCP got, tried a few times
    in case another program holds that port for UDP)."""
    for _ in range(10):
        tcp = bind(host, port)
        udp = socket.socket(tcp.family, socket.SOCK_DGRAM)
        try:
            udp.bind(tcp.getsockname()[:2])
            return tcp, udp
        except OSError:
            tcp.close()
            udp.close()
            if port:
                raise
    raise OSError(f"no port free for both TCP and UDP on {host}")


# =============================================================================================
# Ingestion over HTTP: JSON or NDJSON, and Loki's push format
# =============================================================================================

MAX_BODY = 5 * 1024 * 1024
JSON_TYPES = ("application/json", "application/x-ndjson", "application/jsonl", "text/plain")


def parse_lines(body):
    """Each line of an NDJSON body as (line number, a Record or its errors)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    for number, raw in enumerate(body.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            data = json.loads(decoder.decode(raw, final=True))
            yield number, record_from(data)
        except ValidationFailed as error:
            yield number, error.errors
        except UnicodeDecodeError:
            yield number, [{"field": "line", "message": "is not valid UTF-8"}]
        except (ValueError, RecursionError) as error:
            yield number, [{"field": "line", "message": f"is not JSON: {error}"}]


@app.post("/logs", body_limit=MAX_BODY, blocking=True,
          request_schema=body_schema(RECORD),   # or NDJSON: one such object a line
          responses={200: "How many records were stored, and each line refused with why",
                     400: "Not JSON (a single object)", 415: "Not JSON or NDJSON",
                     422: "A single record that is invalid",
                     503: "The writer is behind: retry after Retry-After"},
          response_schema={"type": "object", "required": ["accepted", "rejected"]})
def ingest(request):
    """Store one record (JSON) or many (NDJSON, one per line)"""
    if request.content_type not in JSON_TYPES:
        raise UnsupportedMediaType("send application/json or application/x-ndjson")
    body = request.body
    lines = [line for line in body.split(b"\n") if line.strip()]
    if len(lines) == 1 and request.content_type == "application/json":
        records, rejected = [record_from(request.json())], []   # a lone invalid one → 422
    else:
        records, rejected = [], []
        for number, result in parse_lines(body):
            if isinstance(result, Record):
                records.append(result)
            else:
                rejected.append({"line": number, "errors": result})
    request.app.state.writer.submit(records)
    return {"accepted": len(records), "rejected": rejected}


LOKI_PUSH = {"type": "object", "required": ["streams"], "properties": {"streams": {
    "type": "array", "items": {"type": "object", "required": ["stream", "values"], "properties": {
        "stream": {"type": "object", "additionalProperties": {"type": "string"}},
        "values": {"type": "array", "items": {
            "type": "array", "minItems": 2, "maxItems": 3,
            "prefixItems": [{"type": "string", "pattern": "^[0-9]{1,20}$"}, {"type": "string"},
                            {"type": "object", "additionalProperties": {"type": "string"}}]}}}}}}}


@app.post("/loki/api/v1/push", body_limit=MAX_BODY, blocking=True,
          request_schema=LOKI_PUSH, status=204,
          responses={204: "Stored (as Loki answers)", 400: "Not Loki's JSON push format",
                     415: "Not JSON (protobuf pushes are not taken)", 503: "The writer is behind"})
def loki_push(request):
    """Store logs pushed in Grafana Loki's JSON format"""
    if request.content_type != "application/json":
        raise UnsupportedMediaType("send Loki's JSON push format (application/json); "
                                   "protobuf is not taken")
    request.app.state.writer.submit(loki_records(request.json()))
    return no_content()


def metadata_of(value):
    """A Loki value's third element, its structured metadata (Loki 3), or {}."""
    metadata = value[2] if len(value) == 3 else {}
    if not isinstance(metadata, dict):
        raise BadRequest("a value's third element is its structured metadata, an object")
    return metadata


def loki_records(push):
    """`{"streams": [{"stream": {labels}, "values": [["<unix ns>", "line"], …]}]}` as Records:
    the labels `service` (or `service_name`, `app`, `job`) and `level` (or `severity`), the
    others, and a value's structured metadata, in `fields`."""
    if not isinstance(push, dict) or not isinstance(push.get("streams"), list):
        raise BadRequest('a Loki push is {"streams": [{"stream": {...}, "values": [...]}]}')
    records = []
    for stream in push["streams"]:
        labels = stream.get("stream") if isinstance(stream, dict) else None
        values = stream.get("values") if isinstance(stream, dict) else None
        if not isinstance(labels, dict) or not isinstance(values, list) \
                or not all(isinstance(v, str) for v in labels.values()):
            raise BadRequest("each stream needs string labels (stream) and values")
        labels = dict(labels)
        service = next((labels.pop(k) for k in ("service", "service_name", "app", "job")
                        if k in labels), "loki")
        severity = severity_of(labels.pop("level", labels.pop("severity", "info")))
        for value in values:
            if not (isinstance(value, list) and len(value) in (2, 3) and isinstance(value[0], str)
                    and value[0].isascii() and value[0].isdigit() and len(value[0]) < 21
                    and isinstance(value[1], str) and all(isinstance(v, str) for v in
                                                          metadata_of(value).values())):
                raise BadRequest('each value is ["<unix epoch in nanoseconds>", "<line>"], '
                                 'and maybe {structured metadata} of strings')
            moment = datetime.datetime.fromtimestamp(int(value[0]) / 1e9, datetime.timezone.utc)
            extra = {**labels, **metadata_of(value)}
            records.append(Record(utc_text(moment), service[:100] or "loki",
                                  SEVERITY["info"] if severity is None else severity,
                                  value[1][:MAX_MESSAGE], json.dumps(extra) if extra else None,
                                  None))
    return records


# =============================================================================================
# Reading: queries, the live tail, counts
# =============================================================================================

MAX_QUERY = 500
FILTERS = {q.name: q for q in (
    Query("service", "only this service"),
    Query("level", "this level or more severe", tuple(LEVELS)),
    Query("since", "at or after this RFC 3339 time", {"format": "date-time"}),
    Query("until", "before this RFC 3339 time", {"format": "date-time"}),
    Query("q", 'words in the message (all), "a phrase", prefix*, -excluded, a OR b',
          {"maxLength": MAX_QUERY}),
    Query("trace_id", "only this trace"))}


def query_filters(request, *, times=True):
    """The query string's filters as (SQL conditions on logs `l`, parameters)."""
    conditions, params = [], []
    if service := request.query_param("service"):
        conditions.append("l.service = ?")
        params.append(service)
    if level := request.query_param("level"):
        if (severity := severity_of(level)) is None:
            raise bad_query("level", f"must be one of {', '.join(LEVELS)}")
        conditions.append("l.severity <= ?")
        params.append(severity)
    for name, operator in (("since", ">="), ("until", "<")) if times else ():
        if text := request.query_param(name):
            if (ts := parse_ts(text)) is None:
                raise bad_query(name, "must be an RFC 3339 time like 2026-03-01T09:30:00Z")
            conditions.append(f"l.ts {operator} ?")
            params.append(ts)
    if trace_id := request.query_param("trace_id"):
        conditions.append("l.trace_id = ?")
        params.append(trace_id)
    if (q := request.query_param("q")) and len(q) > MAX_QUERY:
        raise bad_query("q", f"must be at most {MAX_QUERY} characters")
    if q and (expression := parse_query(q).fts()):
        conditions.append("l.id IN (SELECT rowid FROM logs_text WHERE logs_text MATCH ?)")
        params.append(expression)
    return conditions, params


LOG_ITEM = {"type": "object", "required": ["id", "ts", "service", "level", "message", "fields",
                                           "trace_id"]}


@app.get("/logs", query=[*PAGE, *FILTERS.values()],
         responses={200: "Records, newest first", 400: "A bad filter or cursor"},
         response_schema={"type": "object", "required": ["items", "next_cursor"],
                          "properties": {"items": {"type": "array", "items": LOG_ITEM}}})
def search_logs(request):
    """Records, newest first, filtered"""
    limit, cursor = list_params(request, (int,))
    conditions, params = query_filters(request)
    conditions.append("l.id < ?")
    params.append(cursor[0] if cursor else 2**63 - 1)
    rows = request.app.state.db.query(
        f"SELECT * FROM logs l WHERE {' AND '.join(conditions)} ORDER BY l.id DESC LIMIT ?",
        (*params, limit + 1))
    return page(rows, limit, lambda row: [row["id"]], render)


class LiveTail(EventStream):
    """New records matching the filters, as Server-Sent Events, from when the tail began."""

    def __init__(self, app, conditions, params):
        self.db = app.state.db
        super().__init__(app, self.newest_id())
        self.conditions, self.params = conditions, params

    def newest_id(self):
        """The newest committed record's id. Only what is committed is read; the writer's
        newest id before its commit would let the cursor step over rows not yet visible."""
        return self.db.query_one("SELECT coalesce(max(id), 0) AS id FROM logs")["id"]

    def pending(self):
        newest = self.newest_id()   # one step down the primary key, before the filters' query
        if newest <= self.cursor:
            return b""
        rows = self.db.query(f"SELECT * FROM logs l WHERE {' AND '.join(self.conditions)} "
                             f"ORDER BY l.id LIMIT 500", (*self.params, self.cursor, newest))
        self.cursor = newest if len(rows) < 500 else rows[-1]["id"]
        return b"".join(b"id: %d\ndata: %s\n\n" % (row["id"], json.dumps(render(row)).encode())
                        for row in rows)

    def opening(self):
        return b"retry: 1000\n: live tail\n\n"


@app.get("/logs/stream", query=[FILTERS["service"], FILTERS["level"], FILTERS["q"]],
         media_type="text/event-stream", response_schema={"type": "string"},
         responses={200: "Server-Sent Events: each new record as it is stored",
                    400: "A bad filter"})
def live_tail(request):
    """Follow new records as they arrive (Server-Sent Events)"""
    conditions, params = query_filters(request, times=False)
    conditions += ["l.id > ?", "l.id <= ?"]   # after the cursor, up to the newest committed
    return StreamingResponse(LiveTail(request.app, conditions, params),
                             headers={"Cache-Control": "no-store"},
                             content_type="text/event-stream")


@app.get("/stats", query=[FILTERS["since"]],
         responses={200: "Counts per minute, service and level; records dropped (UDP)"})
def stats(request):
    """How many records per minute, service and level (the last hour unless since=)"""
    since = request.query_param("since") or None   # `?since=` is the parameter left out
    if since is not None and (since := parse_ts(since)) is None:
        raise bad_query("since", "must be an RFC 3339 time")
    since = since or utc_text(datetime.datetime.now(datetime.timezone.utc)
                              - datetime.timedelta(hours=1))
    rows = request.app.state.db.query(
        "SELECT substr(ts, 1, 16) || 'Z' AS minute, service, severity, count(*) AS count "
        "FROM logs WHERE ts >= ? GROUP BY minute, service, severity "
        "ORDER BY minute, service, severity", (since,))
    return {"since": since, "dropped": request.app.state.writer.dropped,
            "minutes": [{"minute": row["minute"], "service": row["service"],
                         "level": LEVELS[row["severity"]], "count": row["count"]}
                        for row in rows]}


# =============================================================================================
# Retention, and running
# =============================================================================================

def expire(db, days, batch=1000):
    """Delete records older than `days`, `batch` at a time (each its own short transaction, so
    the writer is never held for long); the number deleted."""
    cutoff = utc_text(datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=days))
    deleted = 0
    while True:
        count = db.execute("DELETE FROM logs WHERE id IN (SELECT id FROM logs WHERE ts < ? "
                           "LIMIT ?)", (cutoff, batch)).rowcount
        deleted += count
        if count < batch:
            return deleted


def keep_expiring(db, days, interval, stop):
    while True:
        deleted = expire(db, days)
        if deleted:
            sys.stderr.write(f"retention: {deleted} records older than {days:g} days deleted\n")
        if stop.wait(interval):
            return


def main(argv=None):
    parser = app.arg_parser(database=True)
    parser.add_argument("--syslog-port", type=port_number, default=None,
                        help="syslog over UDP and TCP, one port, 0 for any free one (default "
                             "5514; with --port 0, also 0)")
    parser.add_argument("--retention-days", type=bounded(float, "days above 0", above=0),
                        default=7.0, help="records older than this are deleted (default 7)")
    parser.add_argument("--retention-interval-s", type=bounded(float, "seconds above 0",
                                                               above=0), default=60.0,
                        help="how often old records are looked for (default 60)")
    parser.add_argument("--max-pending", type=bounded(int, "records", at_least=1),
                        default=100_000, help="records waiting for the writer before "
                                              "ingestion answers 503 (default 100,000)")
    args = parser.parse_args(argv)
    db = app.state.db = app.open_database(args, SCHEMA)
    writer = app.state.writer = GroupCommit(db, insert_records, args.max_pending,
                                            noun="records")
    app.shutdown_hooks.append(writer.stop)   # hooks run last first: before the database closes
    syslog_port = args.syslog_port if args.syslog_port is not None else 0 if args.port == 0 \
        else SYSLOG_PORT
    try:
        syslog = SyslogServer(args.host, syslog_port, writer)
    except OSError as error:
        parser.exit(2, f"error: --syslog-port {syslog_port}: {error}\n")
    stop = threading.Event()
    retention = threading.Thread(target=keep_expiring, name="retention", daemon=True,
                                 args=(db, args.retention_days, args.retention_interval_s, stop))
    app.on_listening.append(syslog.start)   # its line right after the `listening on` line
    app.on_listening.append(retention.start)
    app.shutdown_hooks.append(syslog.stop)
    app.shutdown_hooks.append(stop.set)
    app.run(args)


if __name__ == "__main__":
    main()
