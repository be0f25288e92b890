"""The small shared library: the HTTP plumbing every server here repeats, and nothing else.

The lessons (tokens, sessions, queues, WebSocket frames, rate limits) live in the projects that
teach them; this package only moves HTTP. Read it in this order — level 01 is the ladder:

    protocol.py         HTTP/1.1 bytes ⇄ objects, pure functions (no sockets)
    problems.py         errors that carry their status; RFC 9457 problem details
    request.py          what a handler reads: query, JSON, forms, cookies, If-Match
    validation.py       declared body fields → cleaned values, or one 422 naming every bad field;
                        the same fields → the body's JSON Schema in /openapi.json
    listing.py          the list contract: limit, opaque keyset cursors, {"items", "next_cursor"}
    response.py         what a handler returns: JSON, HTML, problems, streams
    routing.py          path patterns → handlers; 404 / 405 + Allow; OpenAPI and the index
    middleware.py       the chain: request id → access log → timing → errors → handler
    trace.py            `--trace`: each request's flow, SQL and timings on stderr
    logs.py             stderr lines as text or JSON, `--log-level`, `--log-to` a collector
    metrics.py          Prometheus counters, gauges, histograms; `add_metrics(app)` → /metrics
    storage.py          sqlite: WAL, a connection per thread, transactions, SQL trace
    app.py              App: routes + middleware + the command line
    connection.py       one HTTP/1.1 connection as a state machine (sans-I/O): bytes in,
                        requests out, answers as bytes; keep-alive, limits, timeouts
    asyncio_server.py   the default transport: asyncio streams, a coroutine per connection
    threaded_server.py  `--server threaded`: http.server's ThreadingHTTPServer, a thread per
                        connection — the same loop as the asyncio one, without `await`
    runner.py           bind, announce, signals, graceful drain

A project imports what it needs from here:

    from lib import App, NotFound, json_response
"""
from lib.app import App
from lib.problems import (BadRequest, Conflict, ContentTooLarge, Forbidden, Gone, HTTPError,
                          LengthRequired, MethodNotAllowed, NotFound, PreconditionFailed,
                          ServiceUnavailable, TooManyRequests, Unauthorized, UnprocessableContent,
                          UnsupportedMediaType, ValidationFailed)
from lib.request import Request
from lib.response import (Response, StreamingResponse, created, html_response, json_response,
                          no_content, problem_response, redirect, text_response)
from lib.storage import Database
from lib.trace import trace_event

__all__ = [
    "App", "BadRequest", "Conflict", "ContentTooLarge", "Database", "Forbidden", "Gone",
    "HTTPError", "LengthRequired", "MethodNotAllowed", "NotFound", "PreconditionFailed",
    "Request", "Response", "ServiceUnavailable", "StreamingResponse", "TooManyRequests",
    "Unauthorized", "UnprocessableContent", "UnsupportedMediaType", "ValidationFailed",
    "created", "html_response", "json_response", "no_content", "problem_response", "redirect",
    "text_response", "trace_event",
]
