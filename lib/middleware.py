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
import random
import re
import time
import traceback

from lib import logs
from lib.problems import HTTPError
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
        response.on_close = lambda: logs.access_line(
            request, response, (time.perf_counter() - started) * 1000)
    else:
        logs.access_line(request, response, request.context.get("duration_ms", 0.0))
    return response


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
    request.app.log("error", f"error in {request.method} {printable(request.path)}",
                    request_id=request.request_id, traceback="".join(traceback.format_exception(error)))
    body = {"type": "about:blank", "title": "Internal Server Error", "status": 500,
            "detail": f"unexpected error; quote request id {request.request_id} when reporting it"}
    return Response(json_body(body), 500, None, PROBLEM_JSON)


BUILT_IN = [assign_request_id, log_access, time_request, render_errors]
