"""Request logger — middleware made visible: every request passes through a chain, and the
logger is one link of it.

What it teaches:

- The middleware chain. A step is a function `(request, call_next) -> Response`; `lib` composes
  the steps once, and each request flows request id → access log → timing → errors → *this
  logger* → route match → handler, then back out the same way. `--trace` prints that flow.
- Structured logging: each request becomes one JSON object on one line ("JSON Lines"), so a
  machine can filter it (`jq 'select(.status >= 500)'`) and a log shipper can forward it.
- Keeping secrets out of logs: `Authorization`, `Cookie`, `Set-Cookie` (and headers named like a
  key, token or session) and query parameters named like `token`, `password`, `secret`, `key`,
  `signature`, `passwd`, `pwd`, `auth`, `sig` or `code` (an OAuth code) are written as
  "[REDACTED]". Bodies are never logged, only their size.
- Appending from many threads: one `write` of one whole line under a lock, to a file opened in
  append mode, so lines never interleave or tear; size-based rotation (`.1`, `.2`, …), written
  by hand here to show what `logging.handlers.RotatingFileHandler` does.
- Reading a log back without loading it: the newest entries sit in a bounded ring in memory;
  older ones are read from the files backwards, a block at a time, newest first.

Standards: RFC 3339 timestamps; JSON Lines (https://jsonlines.org); RFC 9457 problems for the
demo's error statuses; `Server-Timing` (W3C) comes from lib's timing step.

Left out: log shipping (see the README's "In production"), an index over the file (a filter that
matches little reads the whole log), compressing rotated files, sharing one log file between
several server processes.
"""
import base64
import json
import math
import os
import re
import sys
import threading
import time
from collections import Counter, deque
from datetime import datetime
from pathlib import Path
from urllib.parse import unquote_plus

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from any folder

from lib import App, BadRequest, HTTPError, Response, json_response, trace_event
from lib.app import bounded, exit_usage_error
from lib.listing import list_params, page
from lib.middleware import error_response
from lib.request import Query, utc_timestamp
from lib.routing import PAGE

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_LOG = REPO_ROOT / "data" / "request_logger.log"

app = App("request_logger", "Logs every request as one JSON line; read them back through /logs.",
          port=8003)


# --- redaction ---------------------------------------------------------------------------------

REDACTED = "[REDACTED]"
SECRET_HEADERS = {"authorization", "proxy-authorization", "cookie", "set-cookie"}
# A name containing one of these words names a secret: `api_key`, `access_token`, `X-Api-Key`,
# `passwd`, `X-Amz-Signature`.
SECRET_WORDS = ("token", "password", "passwd", "secret", "key", "signature")
# Words too short to look for inside others (`code` is in `zipcode`, `auth` in `author`): a name
# holding one as a word of its own names a secret: `code`, `auth_code`, `sig`, `X-Session`.
SECRET_NAME_WORDS = {"pwd", "auth", "sig", "code", "session"}
NAME_WORDS = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|[0-9]+")  # authCode → auth, Code


def is_secret_name(name):
    lowered = name.lower()
    return (any(word in lowered for word in SECRET_WORDS)
            or any(word.lower() in SECRET_NAME_WORDS for word in NAME_WORDS.findall(name)))


def redact_headers(headers):
    """The header fields with the values of credentials replaced by "[REDACTED]"."""
    return {name: REDACTED if name in SECRET_HEADERS or is_secret_name(name) else value
            for name, value in headers.items()}


def redact_query(query_string):
    """The raw query string with the values of secret-looking parameters replaced.

    It works on the raw text, so it never fails (a malformed query is still logged) and keeps
    everything else byte for byte: `q=a%20b&api_key=s3cr3t` → `q=a%20b&api_key=[REDACTED]`."""
    if not query_string:
        return ""
    pairs = []
    for pair in query_string.split("&"):
        name = pair.partition("=")[0]
        if is_secret_name(unquote_plus(name, errors="replace")):
            pair = f"{name}={REDACTED}"
        pairs.append(pair)
    return "&".join(pairs)


# --- the log: a rotating JSON Lines file plus a ring of the newest entries ---------------------

READ_BLOCK = 64 * 1024        # bytes read at a time when reading a file backwards
MAX_LINE = 1024 * 1024        # a longer line is not one of ours; it is skipped, never buffered


def parse_entry(line):
    """One log line back into an entry, or None for anything that is not a whole entry of ours
    (a line torn by a power cut, a line someone typed into the file)."""
    try:
        entry = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(entry, dict):
        return None
    shape = {"seq": int, "ts": str, "method": str, "path": str, "status": int,
             "duration_ms": (int, float)}
    if not all(isinstance(entry.get(key), kind) and not isinstance(entry.get(key), bool)
               for key, kind in shape.items()):
        return None
    return entry


def lines_backwards(file, end):
    """The lines of `file[:end]`, last first, reading `READ_BLOCK` bytes at a time from the end:
    memory stays bounded by a block plus one line, whatever the file's size."""
    position, pending, skipping = end, b"", False
    while position > 0:
        start = max(0, position - READ_BLOCK)
        file.seek(start)
        pieces = file.read(position - start).split(b"\n")
        position = start
        if len(pieces) == 1:  # no newline in this block: still inside one line
            pending = b"" if skipping else pieces[0] + pending
            if len(pending) > MAX_LINE:
                pending, skipping = b"", True
            continue
        last = pieces[-1] + pending  # completes the line that started in this block
        if last and not skipping:
            yield last
        skipping = False
        yield from (piece for piece in reversed(pieces[1:-1]) if piece)
        pending = pieces[0]  # continues in the previous block
    if pending and not skipping:
        yield pending


class RequestLog:
    """Entries go to a JSON Lines file (rotated by size) and to a ring of the newest ones.

    One lock orders everything: an entry's sequence number, its timestamp, its line in the file
    and its place in the ring are all decided together, so the file, the ring and `seq` agree,
    and `seq` keeps counting across restarts and rotations (it is the `/logs` cursor)."""

    def __init__(self, path, *, max_bytes, backups, ring_size):
        self.path = Path(path)
        self.max_bytes = max_bytes      # 0: never rotate
        self.backups = backups          # rotated files kept: path.1 (newest) … path.N (oldest)
        self.ring = deque(maxlen=ring_size)
        self.lock = threading.Lock()
        self.write_errors = 0           # lines that reached the ring but not the file
        self.closed = False
        self._file = None
        self.size = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._open()
        newest = []
        for entry in self.newest_first():  # the ring starts as the log's tail: stats survive restarts
            newest.append(entry)
            if len(newest) == ring_size:
                break
        self.ring.extend(reversed(newest))
        self.next_seq = newest[0]["seq"] + 1 if newest else 1

    def backup_path(self, n):
        return self.path.with_name(f"{self.path.name}.{n}")

    # -- writing

    def record(self, fields):
        """Give `fields` its `seq` and `ts`, append it as one line, keep it in the ring."""
        with self.lock:
            entry = {"ts": utc_timestamp(timespec="milliseconds"), "seq": self.next_seq, **fields}
            self.next_seq += 1
            line = (json.dumps(entry, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
            if not self.closed:
                self._write_line(line)
            self.ring.append(entry)
        return entry, len(line)

    def _write_line(self, line):
        try:
            if self._file is None:
                self._open()
            if self.max_bytes and self.size and self.size + len(line) > self.max_bytes:
                self._rotate()
            self._append(line)
        except OSError as error:  # disk full, file removed, permissions: keep serving
            self.write_errors += 1
            if self.write_errors == 1 or self.write_errors % 1000 == 0:
                sys.stderr.write(f"request_logger: cannot write {self.path}: {error} "
                                 f"({self.write_errors} lines lost so far)\n")

    def _append(self, line):
        """One line, whole. The file is unbuffered and in append mode, so each `write` goes
        straight to the end of the file; if the disk fills halfway, the half line is cut off
        again so that no torn line stays behind."""
        view = memoryview(line)
        try:
            while view:
                view = view[self._file.write(view):]
        except OSError:
            try:
                os.truncate(self._file.fileno(), self.size)
            except OSError:
                pass
            raise
        self.size += len(line)

    def _open(self):
        self._file = open(self.path, "ab", buffering=0)
        self.size = os.fstat(self._file.fileno()).st_size
        if self.size and not self._ends_with_newline():
            self._append(b"\n")  # end a line torn by a crash, or the next line would join it

    def _ends_with_newline(self):
        with open(self.path, "rb") as file:
            file.seek(-1, os.SEEK_END)
            return file.read(1) == b"\n"

    def _rotate(self):
        """path.N-1 → path.N, …, path → path.1, as RotatingFileHandler does: the oldest
        backup is overwritten, so there are never more than `backups` of them."""
        self._file.close()
        self._file = None
        if self.backups:
            for n in range(self.backups - 1, 0, -1):
                if self.backup_path(n).exists():
                    os.replace(self.backup_path(n), self.backup_path(n + 1))
            os.replace(self.path, self.backup_path(1))
        else:
            os.remove(self.path)
        self._open()

    def close(self):
        with self.lock:
            self.closed = True
            if self._file is not None:
                self._file.close()
                self._file = None

    # -- reading

    def newest_first(self, below=None):
        """Every entry with `seq < below` (all, if None), newest first: the ring, then the files
        read backwards (path, path.1, …). Each entry is yielded once even if a rotation moves
        the files meanwhile: `seq` must keep going down."""
        with self.lock:
            ring = list(self.ring)
        floor = math.inf if below is None else below
        for entry in reversed(ring):
            if entry["seq"] < floor:
                floor = entry["seq"]
                yield entry
        with self.lock:  # open all of them at once, so a rotation cannot shift names under us
            files = []
            for path in [self.path] + [self.backup_path(n) for n in range(1, self.backups + 1)]:
                try:
                    file = open(path, "rb")
                except FileNotFoundError:
                    continue
                files.append((file, self.size if path == self.path else os.fstat(file.fileno()).st_size))
        try:
            for file, end in files:
                for line in lines_backwards(file, end):
                    entry = parse_entry(line)
                    if entry is not None and entry["seq"] < floor:
                        floor = entry["seq"]
                        yield entry
        finally:
            for file, _ in files:
                file.close()

    def recent(self):
        """The ring: the newest `ring_size` entries, oldest first."""
        with self.lock:
            return list(self.ring)


# --- the logger: one link in the middleware chain -----------------------------------------------


def log_requests(request, call_next):
    """Pass the request on, then log what happened to it as one JSON line.

    It is placed before the route match, so it logs 404s and 405s too; those arrive here as
    exceptions, rendered into their answer here to learn the status."""
    started = time.perf_counter()
    try:
        response = call_next(request)
    except Exception as error:
        response = error_response(request, error)
    duration_ms = (time.perf_counter() - started) * 1000
    route = request.route  # set by the route match, further down the chain
    if route is not None and not route.meta.get("logged", True):
        return response
    entry, size = app.state.log.record({
        "request_id": request.request_id,
        "method": request.method,
        "path": request.path,
        "query": redact_query(request.query_string),
        "status": response.status,
        "duration_ms": round(duration_ms, 3),
        "slow": duration_ms > app.state.slow_ms,
        "bytes_in": len(request.body),
        "bytes_out": 0 if request.method == "HEAD" else response.size,
        "client_ip": request.client[0],
        "user_agent": request.headers.get("user-agent"),
        "headers": redact_headers(request.headers),
    })
    trace_event(f"log line seq={entry['seq']} ({size} B){' SLOW' if entry['slow'] else ''}")
    return response


# --- reading the log: /logs and /logs/stats -----------------------------------------------------

_STATUS_FILTER = re.compile(r"([1-5])(xx|[0-9][0-9])\Z", re.IGNORECASE)
_METHOD_FILTER = re.compile(r"[A-Za-z]{1,32}\Z")
# RFC 3339 §5.6 date-time; `datetime.fromisoformat` then rejects impossible dates (Feb 30).
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})\Z")


def parse_log_filters(request):
    """limit, cursor and the filters of `GET /logs`, each checked; every bad one is named in
    one 400. Returns (limit, below_seq, matches(entry), since_ts)."""
    errors = []

    def bad(field, message):
        errors.append({"field": field, "message": message})

    limit, below = 20, None
    try:
        limit, cursor = list_params(request, (int,))
        below = cursor[0] if cursor else None
    except BadRequest as error:
        errors.extend(error.errors or [])

    checks = []
    status = request.query_param("status")
    if status:
        found = _STATUS_FILTER.match(status)
        if not found:
            bad("status", "must be a status code (404) or a class (4xx)")
        elif found[2].lower() == "xx":
            low = int(found[1]) * 100
            checks.append(lambda e: low <= e["status"] < low + 100)
        else:
            code = int(status)
            checks.append(lambda e: e["status"] == code)
    method = request.query_param("method")
    if method:
        if not _METHOD_FILTER.match(method):
            bad("method", "must be an HTTP method such as GET or POST")
        else:
            method = method.upper()
            checks.append(lambda e: e["method"] == method)
    prefix = request.query_param("path_prefix")
    if prefix:
        if not prefix.startswith("/"):
            bad("path_prefix", "must start with /")
        else:
            checks.append(lambda e: e["path"].startswith(prefix))
    since = request.query_param("since")
    since_ts = None
    if since:
        try:
            if not _RFC3339.match(since):
                raise ValueError
            since_ts = utc_timestamp(datetime.fromisoformat(since.upper().replace(" ", "T")),
                                     timespec="milliseconds")
        except (ValueError, OverflowError):
            bad("since", "must be an RFC 3339 date-time with a time zone, e.g. 2026-11-24T06:41:00Z")
    if errors:
        names = ", ".join(dict.fromkeys(e["field"] for e in errors))
        raise BadRequest(f"invalid query parameters: {names}", errors=errors)
    return limit, below, (lambda e: all(check(e) for check in checks)), since_ts


@app.get("/logs", logged=False, query=[
    *PAGE, Query("status", "a status (404) or a class (4xx)", {"pattern": "^[1-5]([0-9]{2}|[xX]{2})$"}),
    Query("method", "GET, POST, …", {"pattern": "^[A-Za-z]{1,32}$"}),
    Query("path_prefix", "paths starting with this", {"pattern": "^/"}),
    Query("since", "RFC 3339 time: entries logged at or after it", {"format": "date-time"})])
def list_logs(request):
    """Logged requests, newest first (not including reads of /logs itself)"""
    limit, below, matches, since_ts = parse_log_filters(request)
    found = []
    for entry in app.state.log.newest_first(below):
        if since_ts is not None and entry["ts"] < since_ts:
            break  # entries are in time order: everything further back is older still
        if matches(entry):
            found.append(entry)
            if len(found) > limit:
                break
    return page(found, limit, lambda entry: [entry["seq"]])


def percentile(ordered, p):
    """Nearest-rank percentile of an ascending list: the smallest value with at least p % of
    the values at or below it. None for no values."""
    if not ordered:
        return None
    return ordered[max(1, math.ceil(p / 100 * len(ordered))) - 1]


def summarize(entries):
    durations = sorted(entry["duration_ms"] for entry in entries)
    classes = Counter(f"{entry['status'] // 100}xx" for entry in entries)
    return {
        "count": len(entries),
        "since": entries[0]["ts"] if entries else None,
        "by_status_class": {f"{n}xx": classes[f"{n}xx"] for n in range(1, 6)},
        "by_method": dict(sorted(Counter(entry["method"] for entry in entries).items())),
        "duration_ms": {"p50": percentile(durations, 50), "p95": percentile(durations, 95),
                        "p99": percentile(durations, 99), "max": durations[-1] if durations else None},
        "slow": sum(1 for entry in entries if entry.get("slow")),
    }


@app.get("/logs/stats", logged=False)
def log_stats(request):
    """Counts by status class and method, and duration percentiles, over the ring"""
    log = app.state.log
    return {**summarize(log.recent()), "ring_size": log.ring.maxlen,
            "file_write_errors": log.write_errors}


# --- demo traffic: /echo, /slow, /status/{code} ----------------------------------------------


def echo_body(request):
    """(body, encoding): JSON parsed, UTF-8 text as text, anything else as base64."""
    if not request.body:
        return None, None
    media = request.content_type
    if media == "application/json" or media.endswith("+json"):
        return request.json(), "json"
    try:
        return request.body.decode("utf-8"), "text"
    except UnicodeDecodeError:
        return base64.b64encode(request.body).decode("ascii"), "base64"


ECHO_BODY_LIMIT = 64 * 1024


@app.get("/echo", body_limit=ECHO_BODY_LIMIT)
def echo(request):
    """The request as the server saw it, credentials redacted"""
    body, encoding = echo_body(request)
    query = {name: [REDACTED] * len(values) if is_secret_name(name) else values
             for name, values in request.query.items()}
    return {"method": request.method, "path": request.path, "query": query,
            "headers": redact_headers(request.headers), "body": body, "body_encoding": encoding}


@app.post("/echo", body_limit=ECHO_BODY_LIMIT, responses={200: "The request as the server saw it"})
def echo_post(request):
    """The request and its body as the server saw them, credentials redacted"""
    return echo(request)

MAX_SLOW_MS = 5000


SLOW_MS = Query("ms", f"how long to wait, 0–{MAX_SLOW_MS} (default 1000)", int, 1000, 0, MAX_SLOW_MS)


@app.get("/slow", blocking=True, query=[SLOW_MS])
def slow(request):
    """Answer after waiting ms milliseconds (a slow request for the log to flag)"""
    ms = SLOW_MS.read(request)
    time.sleep(ms / 1000)  # blocking=True: on the asyncio transport this runs in the worker pool
    return {"slept_ms": ms}


# Headers the RFCs require with some statuses, so even a demo answer is a correct one.
REQUIRED_HEADERS = {
    401: {"WWW-Authenticate": 'Bearer realm="request_logger"'},  # RFC 9110 §15.5.2
    405: {"Allow": "GET, HEAD"},                                  # RFC 9110 §15.5.6
    407: {"Proxy-Authenticate": 'Basic realm="request_logger"'},  # RFC 9110 §15.5.8
    429: {"Retry-After": "1"},                                    # RFC 6585 §4
    503: {"Retry-After": "1"},                                    # RFC 9110 §15.6.4
}


@app.get("/status/{code:int}", path_schemas={"code": {"minimum": 200, "maximum": 599}})
def answer_with_status(request, code):
    """Answer with the given status, 200–599 (a problem body from 400 on)"""
    if not 200 <= code <= 599:
        raise BadRequest("path parameter 'code' must be a status from 200 to 599",
                         errors=[{"field": "code", "message": "must be from 200 to 599"}])
    headers = REQUIRED_HEADERS.get(code, {})
    if code >= 400:
        raise HTTPError(f"answered with {code} because you asked for it", status=code,
                        headers=headers)
    if code in (204, 304):  # RFC 9110 §6.4.1: no body
        return Response(b"", code, headers)
    return json_response({"status": code}, code, headers)


# --- command line ------------------------------------------------------------------------------


def whole_number(low, high):
    return bounded(int, f"a whole number from {low} to {high}", at_least=low, at_most=high)


def main(argv=None):
    parser = app.arg_parser()
    parser.add_argument("--log", default=str(DEFAULT_LOG),
                        help="JSON Lines file to append to (default data/request_logger.log "
                             "under the repository)")
    parser.add_argument("--log-max-bytes", type=whole_number(0, 2**40), default=10 * 1024 * 1024,
                        help="rotate the file before it grows past this size; 0 never rotates "
                             "(default 10 MiB)")
    parser.add_argument("--log-backups", type=whole_number(0, 100), default=5,
                        help="rotated files to keep: LOG.1 … LOG.N (default 5)")
    parser.add_argument("--ring-size", type=whole_number(1, 100_000), default=1000,
                        help="newest entries kept in memory for /logs and /logs/stats (default 1000)")
    parser.add_argument("--slow-ms", type=bounded(float, "a duration in milliseconds", at_least=0,
                                                  below=10**9), default=500.0,
                        help="flag requests slower than this many milliseconds (default 500)")
    args = parser.parse_args(argv)
    try:
        app.state.log = RequestLog(args.log, max_bytes=args.log_max_bytes,
                                   backups=args.log_backups, ring_size=args.ring_size)
    except OSError as error:
        exit_usage_error(f"cannot use --log {args.log}: {error.strerror or error}")
    app.state.slow_ms = args.slow_ms
    app.shutdown_hooks.append(app.state.log.close)
    app.use(log_requests, before_routing=True)
    app.run(args)


if __name__ == "__main__":
    main()
