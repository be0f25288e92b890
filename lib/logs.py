"""What a server writes to stderr: the access log and its own messages, as text or as JSON.

common.md: an access line per request on stderr (time, client, method, path, status, bytes,
duration, request id). `--log-format json` makes every line one JSON object (ts, level, msg,
and the fields by name), which log collectors (Docker, journald, Loki, level06/central_logging.py)
read without a regular expression. `--log-level` drops what is below it: an access line is
`info`, a 4xx `warning`, a 5xx `error`. `--log-to URL` ships the access log to a collector too.
"""
import collections
import json
import os
import threading
import urllib.request

from lib.request import utc_timestamp
from lib.trace import printable

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


def write(app, level, message, fields):
    """One line, unless it is below the app's level. Text: the message, then `name=value`
    pairs (a traceback on the lines after it); JSON: one object."""
    if LEVELS[level] < app.log_threshold:
        return
    if app.log_json:
        line = json.dumps({"ts": utc_timestamp(timespec="milliseconds"), "level": level,
                           "msg": message, **fields}, default=str)
    else:
        trace = fields.pop("traceback", "")
        line = message + "".join(f" {name}={value}" for name, value in fields.items())
        line += "\n" + trace.rstrip("\n") if trace else ""
    write_stderr(line + "\n")


def write_stderr(text):
    """One write(2) straight to stderr's file descriptor: a write this small is atomic, so the
    lines of many threads never interleave. A log that cannot be written (a full disk) loses
    its line; the server goes on."""
    try:
        os.write(2, text.encode("utf-8", "replace"))
    except OSError:
        pass


def access_line(request, response, duration_ms):
    """The request's access line, and with `--log-to` the same record shipped to a collector.
    The query string is left out: it may carry tokens (a reset link's `?token=`)."""
    app, status = request.app, response.status
    level = "error" if status >= 500 else "warning" if status >= 400 else "info"
    if LEVELS[level] < app.log_threshold:
        return
    sent = 0 if request.method == "HEAD" else response.size
    if app.log_json:
        write(app, level, f"{request.method} {request.path} {status}",
              access_fields(request, status, sent, duration_ms))
    else:
        write_stderr(f"{utc_timestamp()} {access_text(request, status, sent, duration_ms)}\n")
    if app.log_shipper is not None:
        app.log_shipper.ship({"ts": utc_timestamp(), "service": app.name, "level": level,
                              "message": access_text(request, status, sent, duration_ms),
                              "trace_id": request.request_id,
                              "fields": access_fields(request, status, sent, duration_ms)})


def access_text(request, status, sent, duration_ms):
    return (f"{request.client[0]} {request.method} {printable(request.path)} {status} {sent}B "
            f"{duration_ms:.2f}ms id={request.request_id}")


def access_fields(request, status, sent, duration_ms):
    return {"request_id": request.request_id, "method": request.method, "path": request.path,
            "status": status, "duration_ms": round(duration_ms, 2), "bytes": sent,
            "client": request.client[0]}


class LogShipper:
    """`--log-to URL`: the access log sent to a collector too (level06/central_logging.py), as
    NDJSON to `URL/logs`, in batches from a thread of its own. A request never waits for it and
    never fails because of it: at most `MAX_WAITING` lines wait (the oldest go first), and a
    collector that is down or slow costs the lines of that batch, never a stalled server."""

    MAX_WAITING = 10_000
    BATCH = 1000
    INTERVAL_S = 0.5

    def __init__(self, url):
        self.url = url + "/logs"
        self.waiting = collections.deque(maxlen=self.MAX_WAITING)  # append: thread-safe, O(1)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="log-shipper", daemon=True)

    def ship(self, record):
        self.waiting.append(record)

    def _run(self):
        while not self.stopping.wait(self.INTERVAL_S):
            while self._send_batch():
                pass

    def _send_batch(self):
        """Send up to BATCH waiting lines; True if a full batch went (more may wait)."""
        batch = [self.waiting.popleft() for _ in range(min(self.BATCH, len(self.waiting)))]
        if batch:
            body = "".join(json.dumps(record) + "\n" for record in batch).encode()
            request = urllib.request.Request(self.url, body,
                                             {"Content-Type": "application/x-ndjson"})
            try:
                urllib.request.urlopen(request, timeout=2).close()
            except (OSError, ValueError):
                return False  # the collector is down or refused: these lines are lost
        return len(batch) == self.BATCH

    def stop(self):
        """At shutdown: what still waits is sent once, then the thread ends."""
        self.stopping.set()
        self.thread.join(timeout=3)
        while self._send_batch():
            pass
