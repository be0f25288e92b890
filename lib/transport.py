"""What both transports do the same way, between reading bytes and writing bytes.

A transport (threaded or asyncio) owns the sockets and the waiting; everything it decides about
HTTP — which request object to build, whether the connection stays open, which bytes to send —
comes from here and from `lib.protocol`, so the two transports cannot disagree.

Timeouts (common.md): a fresh connection must send a complete request head within
`HEAD_TIMEOUT` (10 s); between keep-alive requests a connection may stay idle up to
`--idle-timeout` (15 s) and must then send its next head within that same span. A lower
`--idle-timeout` lowers the first deadline too. Reading a body, or writing an answer to a client
that does not read, may pause at most the idle timeout between bytes.

Connections are bounded by `--max-connections` (default 1000): one more is answered 503 with
`Retry-After` and closed before its request is read, so neither threads (one per connection)
nor coroutines can grow without bound when clients pile up.
"""
import os
import signal
import sys
import traceback

from lib.problems import ServiceUnavailable
from lib.protocol import CHUNKED, ContentTooLarge, encode_chunk, encode_head, encode_response
from lib.request import Request

HEAD_TIMEOUT = 10.0
BACKLOG = 128          # PERFORMANCE.md trap 2: socketserver's default of 5 drops bursts
LINGER_SECONDS = 1.0   # how long to drop a refused body's bytes before closing


def head_timeout(first_request, idle_timeout):
    return min(HEAD_TIMEOUT, idle_timeout) if first_request else idle_timeout


def check_body_length(length, limit):
    """Refuse a declared body over the limit before reading any of it."""
    if length is not None and length != CHUNKED and length > limit:
        raise ContentTooLarge(f"request body over the limit of {limit} bytes")


def unparsed_request(app, client):
    """A stand-in request for a head that could not be parsed, so the error still gets a
    request id, an access log line and a problem answer."""
    return Request("-", "-", client=client, app=app)


def build_request(app, head, client):
    """The request for a parsed head; the transport fills in the body once it is read."""
    return Request.from_head(head, b"", False, client, app)


def keeps_alive(app, head, response, failure):
    """Whether the connection may carry another request after this answer."""
    if head is None or failure is not None or app.draining:
        return False  # after a protocol error the byte stream cannot be trusted
    if response.streaming and head.version != "HTTP/1.1":
        return False  # a 1.0 client reads a stream until the connection closes
    if ("Connection", "close") in response.headers:  # a handler asked to close
        return False
    return head.keep_alive


def encode_whole(response, head, keep_alive):
    head_only = head is not None and head.method == "HEAD"
    try:
        return encode_response(response.status, response.headers, response.body,
                               head_only=head_only, keep_alive=keep_alive)
    except (ValueError, UnicodeEncodeError) as error:
        # A handler put a line break or a non-Latin-1 character in a header value: answer
        # 500 (logged), never send the broken head or drop the connection without an answer.
        sys.stderr.write(f"error: cannot encode the response head: {error!r}\n")
        body = b'{"type": "about:blank", "title": "Internal Server Error", "status": 500}'
        return encode_response(500, [("Content-Type", "application/problem+json")], body,
                               head_only=head_only, keep_alive=False)


def encode_stream_head(response, head, keep_alive):
    """The head of a streamed answer: chunked for HTTP/1.1, close-delimited for 1.0."""
    headers = list(response.headers)
    if head.version == "HTTP/1.1":
        headers.append(("Transfer-Encoding", "chunked"))
    return encode_head(response.status, headers, None, keep_alive=keep_alive)


def frame_chunk(head, data):
    return encode_chunk(data) if head.version == "HTTP/1.1" else data


def report_broken_stream():
    """A streamed body failed halfway (call from its `except`): the status is long sent, so all
    the client can learn is that the answer is cut short, by the connection closing without
    the last chunk. The traceback goes to the log."""
    sys.stderr.write(f"error while streaming a response\n{traceback.format_exc()}")


def overloaded_answer(app, client):
    """The bytes of a 503 for a connection over `--max-connections`, sent before reading its
    request (common.md: overloaded → 503 with Retry-After). It still passes through the chain,
    so it has a request id and an access log line."""
    error = ServiceUnavailable("the server is at its connection limit; retry shortly", retry_after=1)
    response = app.handle(unparsed_request(app, client), error)
    return encode_whole(response, None, False)


def exit_now():
    """A second SIGTERM/SIGINT: stop at once, without draining (common.md)."""
    sys.stderr.write("second signal: exiting at once\n")
    sys.stderr.flush()
    os._exit(1)


def on_stop_signals(begin_shutdown):
    """SIGTERM and SIGINT begin a graceful shutdown; a second one exits at once."""
    received = []

    def handler(signum, frame):
        if received:
            exit_now()
        received.append(signum)
        begin_shutdown()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
