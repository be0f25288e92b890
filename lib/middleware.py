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
import os
import random
import re
import sys
import threading
import time
import traceback

from lib.problems import HTTPError
from lib.response import json_body, problem_response, PROBLEM_JSON, Response

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


class AccessLog:
    """Where access log lines go: stderr, straight to the file descriptor.

    By default each line is one write(2): a write this small is atomic, so lines from many
    threads never interleave, and it skips the text layer's buffering. Under load a system call
    per line costs more than the rest of the logging, so a server gathers the lines and writes
    them together, a millisecond or so later:

    - the asyncio transport calls `batch_on_loop(loop)`: lines written on the loop's thread
      are written at the next turn of the loop (lines from the worker pool still at once);
    - the threaded transport calls `batch_in_thread()`: lines go to a queue that a writer
      thread empties. With a thread per connection each write(2) is also a hand-over of the
      GIL among every thread that waits for it, which is what lengthened the slowest answers.

    `batch_off` writes what is left. Should the queue grow past `MAX_PENDING` lines (stderr
    blocked), lines are written at once again, so a blocked log slows the server down rather
    than filling its memory."""

    MAX_PENDING = 10_000

    def __init__(self, fd):
        self.fd = fd
        self.schedule = None       # how to get a batch written soon; None: write at once
        self.loop_thread = None    # batch_on_loop: only lines of this thread are gathered
        self.pending = collections.deque()  # append and popleft are atomic under the GIL
        self.scheduled = False
        self.wakeup = threading.Event()
        self.flushing = threading.Lock()
        self.writer = None

    def write(self, line):
        data = line.encode("utf-8", "replace")
        if self.schedule is None or len(self.pending) > self.MAX_PENDING or (
                self.loop_thread is not None and threading.get_ident() != self.loop_thread):
            os.write(self.fd, data)
            return
        self.pending.append(data)  # first append, then look: see flush
        if not self.scheduled:
            self.scheduled = True
            self.schedule()

    def batch_on_loop(self, loop):
        self.loop_thread = threading.get_ident()
        self.schedule = lambda: loop.call_soon(self.flush)

    def batch_in_thread(self):
        if self.writer is None:
            self.writer = threading.Thread(target=self._write_batches, name="access-log", daemon=True)
            self.writer.start()
        self.schedule = self.wakeup.set

    def batch_off(self):
        self.schedule = self.loop_thread = None
        self.flush()

    def _write_batches(self):
        while True:
            self.wakeup.wait()
            self.wakeup.clear()
            try:
                self.flush()
            except OSError:
                pass  # stderr is gone: the lines are lost, the server goes on

    def flush(self):
        # `scheduled` is cleared before the queue is emptied, and a writer appends before it
        # looks at it: a line is either in this batch or its writer schedules the next one.
        self.scheduled = False
        with self.flushing:  # one batch at a time, so batches keep the order of their lines
            lines = []
            while self.pending:
                lines.append(self.pending.popleft())
            data = b"".join(lines)
            while data:
                data = data[os.write(self.fd, data):]


access_log = AccessLog(fd=2)
_clock = [0, ""]


def utc_now_text():
    """Now as RFC 3339 UTC to the second, formatted once a second (the access log's hot path)."""
    now = int(time.time())
    if now != _clock[0]:
        _clock[0], _clock[1] = now, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
    return _clock[1]


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
    sent = 0 if request.method == "HEAD" else response.size
    access_log.write(f"{utc_now_text()} {request.client[0]} {request.method} {request.path} "
                     f"{response.status} {sent}B {duration_ms:.2f}ms id={request.request_id}\n")


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
    sys.stderr.write(f"error in {request.method} {request.path} id={request.request_id}\n"
                     f"{''.join(traceback.format_exception(error))}")
    body = {"type": "about:blank", "title": "Internal Server Error", "status": 500,
            "detail": f"unexpected error; quote request id {request.request_id} when reporting it"}
    return Response(json_body(body), 500, None, PROBLEM_JSON)


BUILT_IN = [assign_request_id, log_access, time_request, render_errors]
