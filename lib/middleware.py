"""The middleware chain: small functions that every request passes through, in order.

A middleware is a function `(request, call_next) -> Response`. It may look at the request,
call `call_next(request)` to pass it on (once), and look at or change the answer on the way
back — the same shape as Express's `(req, res, next)`, Starlette's `BaseHTTPMiddleware` or a
WSGI wrapper. The chain is composed once, at start-up, into nested closures, so a request costs
one function call per step (a closure, not `functools.partial`: a partial holding `call_next`
copies its keyword dict and re-enters the interpreter from C on every call, which made the chain
cost as much as the steps' own work):

    assign_request_id → log_access → time_request → render_errors → [the project's own] → handler

`render_errors` is the one place where exceptions become answers: an `HTTPError` becomes its
problem+json, anything else is logged with its traceback on stderr and answered with a 500 that
says nothing about the code.
"""
import collections
import json
import os
import random
import re
import sys
import threading
import time
import traceback
import urllib.request

from lib.problems import HTTPError
from lib.request import utc_timestamp
from lib.response import json_body, problem_response, PROBLEM_JSON, Response
from lib.trace import printable

# common.md: a client's own id is kept if it is sane: 1–128 visible ASCII characters.
_SANE_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}\Z")


def compose(steps, endpoint):
    """Nest `steps` around `endpoint`: the first step is the outermost."""
    call = endpoint
    for step in reversed(steps):
        call = _link(step, call)
    return call


def _link(step, call_next):
    return lambda request: step(request, call_next)


def assign_request_id(request, call_next):
    """Keep the client's `X-Request-Id` if sane, else make one; echo it on the answer."""
    given = request.headers.get("x-request-id")
    # A request id must be unique, not secret: 64 random bits, without a syscall per request.
    request.request_id = given if given and _SANE_REQUEST_ID.match(given) else f"{random.getrandbits(64):016x}"
    response = call_next(request)
    response.headers.append(("X-Request-Id", request.request_id))
    return response


def time_request(request, call_next):
    """Measure the time spent in the server: kept for the access log, and reported as
    `Server-Timing` (W3C), which browsers' developer tools show next to each request."""
    started = time.perf_counter()
    response = call_next(request)
    elapsed = (time.perf_counter() - started) * 1000
    request.context["duration_ms"] = elapsed
    response.headers.append(("Server-Timing", f"app;dur={elapsed:.2f}"))
    return response


def log_access(request, call_next):
    """One line per request on stderr: time, client, method, path, status, bytes, duration,
    request id. The query string is left out: it may carry tokens (a reset link's `?token=`)."""
    response = call_next(request)
    if response.streaming:  # logged when the stream ends, with the bytes really sent
        started = time.perf_counter() - request.context.get("duration_ms", 0) / 1000
        response.on_close = lambda: write_access_line(
            request, response, (time.perf_counter() - started) * 1000)
    else:
        write_access_line(request, response, request.context.get("duration_ms", 0.0))
    return response


def write_access_line(request, response, duration_ms):
    """One write(2) straight to stderr's file descriptor: a write this small is atomic, so the
    lines of many threads never interleave. A log that cannot be written (a full disk) loses
    its line; the server goes on. With `--log-to`, the line is shipped to a collector too."""
    sent = 0 if request.method == "HEAD" else response.size
    stamp = utc_timestamp()
    line = (f"{stamp} {request.client[0]} {request.method} {printable(request.path)} "
            f"{response.status} {sent}B {duration_ms:.2f}ms id={request.request_id}\n")
    try:
        os.write(2, line.encode("utf-8", "replace"))
    except OSError:
        pass
    if request.app.log_shipper is not None:
        request.app.log_shipper.ship({
            "ts": stamp, "service": request.app.name, "message": line[len(stamp) + 1:-1],
            "level": "error" if response.status >= 500 else "warning" if response.status >= 400
            else "info", "trace_id": request.request_id,
            "fields": {"method": request.method, "path": request.path, "status": response.status,
                       "bytes": sent, "duration_ms": round(duration_ms, 2)}})


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


def render_errors(request, call_next):
    try:
        return call_next(request)
    except Exception as error:
        return error_response(request, error)


def error_response(request, error):
    """The answer for an exception: its problem details, or a bare 500 whose traceback goes
    to the log only."""
    if isinstance(error, HTTPError):
        return problem_response(error)
    try:
        sys.stderr.write(f"error in {request.method} {printable(request.path)} "
                         f"id={request.request_id}\n{''.join(traceback.format_exception(error))}")
    except OSError:
        pass  # stderr cannot be written (a full disk): the client still gets its 500
    body = {"type": "about:blank", "title": "Internal Server Error", "status": 500,
            "detail": f"unexpected error; quote request id {request.request_id} when reporting it"}
    return Response(json_body(body), 500, None, PROBLEM_JSON)


BUILT_IN = [assign_request_id, log_access, time_request, render_errors]
